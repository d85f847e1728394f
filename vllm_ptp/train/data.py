"""Training sequences: teacher completions (JSONL) or raw text, and the held-out split."""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

COMPLETIONS_FILE = "completions.jsonl"
VALIDATION_PERCENT = 3


@dataclass
class Sequence:
    """One training sequence: a context prefix and the part windows are drawn from."""

    token_ids: list[int]
    completion_start: int  # windows start at or after this index
    temperature: float  # the transform the tokens were sampled under (0: greedy)
    top_p: float
    top_k: int
    source_id: str  # the prompt it came from (all its samples share the split)


def is_validation(source_id: str) -> bool:
    """Held-out training prompts: a fixed ~3% by hash of the prompt id."""
    digest = hashlib.blake2b(source_id.encode(), digest_size=2).digest()
    return int.from_bytes(digest, "little") % 100 < VALIDATION_PERCENT


def load_completions(data_dir: str | Path, max_len: int) -> list[Sequence]:
    sequences = []
    with open(Path(data_dir) / COMPLETIONS_FILE) as f:
        for line in f:
            row = json.loads(line)
            ids = (row["prompt_token_ids"] + row["completion_token_ids"])[:max_len]
            if len(ids) > len(row["prompt_token_ids"]) + 1:
                sequences.append(
                    Sequence(ids, len(row["prompt_token_ids"]), row["temperature"],
                             row["top_p"], row["top_k"], row["prompt_id"])
                )
    return sequences


def load_text(text_file: str | Path, tokenizer, max_len: int) -> list[Sequence]:
    """Teacher-free data: raw text cut into sequences; u comes from the target's own intervals
    under its untransformed distribution (T=1), so every data token has non-zero probability."""
    ids = tokenizer(Path(text_file).read_text())["input_ids"]
    return [
        Sequence(ids[start:start + max_len], 1, 1.0, 1.0, 0, f"{text_file}:{start}")
        for start in range(0, max(len(ids) - 2, 1), max_len)
        if len(ids[start:start + max_len]) > 2
    ]
