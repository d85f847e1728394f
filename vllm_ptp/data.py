"""Locating the project's data files and reading Spec-Bench-format prompts."""

import json
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SHIPPED_CHECKPOINT = REPO_ROOT / "checkpoints" / "smollm2-135m-instruct-ptp"
# The paper's ablation: same drafter and recipe, auxiliary inputs that ignore u.
SHIPPED_INDEPENDENT_CHECKPOINT = REPO_ROOT / "checkpoints" / "smollm2-135m-instruct-independent"
# The shallow drafter: the target's top layers, fed its final hidden state.
SHIPPED_SHALLOW_CHECKPOINT = REPO_ROOT / "checkpoints" / "smollm2-135m-instruct-ptp-shallow"


def shared_data_file(name: str) -> Path:
    """A file of the shared data directory (`VLLM_PTP_DATA_DIR`, default ../shared/data)."""
    data_dir = Path(os.environ.get("VLLM_PTP_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))
    path = data_dir / name
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found. Set VLLM_PTP_DATA_DIR to the directory holding {name}."
        )
    return path


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def specbench_first_turns(limit: int | None = None, path: str | Path | None = None) -> list[dict]:
    """Spec-Bench questions as single-turn chats: [{question_id, category, messages}]."""
    rows = read_jsonl(path or shared_data_file("specbench_dev.jsonl"))[:limit]
    return [
        {
            "question_id": row["question_id"],
            "category": row["category"],
            "messages": [{"role": "user", "content": row["turns"][0]}],
        }
        for row in rows
    ]
