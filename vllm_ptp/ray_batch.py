"""Ray Data: batch chat generation over a JSONL prompt file, vLLM engines with the PTP speculator
in a pool of Ray actors, results written to JSONL in input order.

Each input row has `prompt` (one user turn) or `messages` (a chat), and optionally `id`. Row i
is sampled with seed `seed + i`, so a run is reproducible and equals offline `LLM.chat` with the
same per-row seeds, whatever the number of workers or the batching.
"""

import json
from pathlib import Path
from typing import Any

import numpy as np

from vllm_ptp.data import read_jsonl
from vllm_ptp.engine import speculative_config
from vllm_ptp.ray_serve import RAY_ENGINE_KWARGS, replica_env, validate_checkpoint


def chat_of(row: dict[str, Any]) -> list[dict[str, str]]:
    if "messages" in row:
        return row["messages"]
    return [{"role": "user", "content": row["prompt"]}]


class PTPGenerator:
    """A Ray Data actor: one vLLM engine with the PTP speculator, called on batches of rows."""

    def __init__(self, target: str, checkpoint: str, k: int, sampling: dict[str, Any],
                 engine_kwargs: dict[str, Any]) -> None:
        from vllm import LLM

        self.llm = LLM(model=target, speculative_config=speculative_config(checkpoint, k),
                       **engine_kwargs)
        self.sampling = sampling

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from vllm import SamplingParams

        chats = [json.loads(m) for m in batch["messages"]]
        params = [SamplingParams(**self.sampling, seed=int(s)) for s in batch["seed"]]
        outputs = self.llm.chat(chats, params, use_tqdm=False)
        completions = [o.outputs[0] for o in outputs]
        return {
            "id": batch["id"],
            "completion": np.array([c.text for c in completions], dtype=object),
            "num_tokens": np.array([len(c.token_ids) for c in completions]),
            "finish_reason": np.array([c.finish_reason for c in completions], dtype=object),
        }


def generate_jsonl(
    prompts: str | Path,
    out: str | Path,
    target: str | Path,
    checkpoint: str | Path,
    k: int | None = None,
    sampling: dict[str, Any] | None = None,
    seed: int = 0,
    num_workers: int = 2,
    batch_size: int = 16,
    threads_per_worker: int = 1,
    engine_kwargs: dict[str, Any] | None = None,
    limit: int | None = None,
) -> int:
    """Generate one completion per prompt row (the first `limit` rows) on the connected Ray
    cluster; write `out` as JSONL rows {id, completion, num_tokens, finish_reason} in input
    order. Returns the number of rows written."""
    import ray.data

    checkpoint = Path(checkpoint).resolve()
    k = validate_checkpoint(target, checkpoint, k)  # once, on the driver
    rows = read_jsonl(prompts)[:limit]
    items = [
        {"id": str(row.get("id", i)), "seed": seed + i,
         "messages": json.dumps(chat_of(row))}  # a string column: no nested Arrow types
        for i, row in enumerate(rows)
    ]
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    dataset = ray.data.from_items(items).map_batches(
        PTPGenerator,
        fn_constructor_kwargs={
            "target": str(Path(target).resolve()), "checkpoint": str(checkpoint), "k": k,
            "sampling": sampling or {"temperature": 0.7, "top_p": 0.95, "max_tokens": 256},
            "engine_kwargs": RAY_ENGINE_KWARGS if engine_kwargs is None else engine_kwargs,
        },
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=num_workers),
        num_cpus=1,
        runtime_env={"env_vars": replica_env(threads_per_worker)},
    )
    count = 0
    with open(out, "w") as f:
        for row in dataset.iter_rows():  # streamed: rows are written as batches finish
            f.write(json.dumps({key: _plain(row[key]) for key in
                                ("id", "completion", "num_tokens", "finish_reason")}) + "\n")
            count += 1
    return count


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value
