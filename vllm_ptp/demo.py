"""The main job: PTP generation on a target, against no speculation, measured in one run."""

import time
from dataclasses import dataclass
from pathlib import Path
from statistics import median

from vllm_ptp.engine import (
    MEASURED_ENGINE_KWARGS,
    allow_function_rpc,
    every_cpu_core,
    same_openmp_runtime,
    shutdown_engine,
    speculation_stats,
    speculative_config,
)


@dataclass
class RunResult:
    texts: list[str]
    token_ids: list[list[int]]
    seconds: float
    stats: dict | None  # speculation_stats() of the run; None without speculation

    @property
    def tokens_per_second(self) -> float:
        return sum(len(t) for t in self.token_ids) / self.seconds


def generate(
    target: str, chats: list[list[dict]], sampling_params, spec: dict | None = None,
    max_num_seqs: int | None = None,
):
    """Start an engine, warm it up, time one `chat` call over all conversations, shut down.
    `max_num_seqs` caps the batch (1: requests run one at a time)."""
    from vllm import LLM

    allow_function_rpc()
    batch = {"max_num_seqs": max_num_seqs} if max_num_seqs else {}
    with every_cpu_core(), same_openmp_runtime():
        llm = LLM(model=target, speculative_config=spec, **MEASURED_ENGINE_KWARGS, **batch)
    try:
        llm.chat(chats[:1], sampling_params, use_tqdm=False)  # warm-up
        if spec:
            speculation_stats(llm, reset=True)
        start = time.perf_counter()
        outputs = llm.chat(chats, sampling_params)
        seconds = time.perf_counter() - start
        stats = speculation_stats(llm) if spec else None
    finally:
        shutdown_engine(llm)
    return RunResult(
        texts=[o.outputs[0].text for o in outputs],
        token_ids=[list(o.outputs[0].token_ids) for o in outputs],
        seconds=seconds,
        stats=stats,
    )


def run_demo(
    target: str | Path,
    checkpoint: str | Path,
    chats: list[list[dict]],
    k: int,
    max_tokens: int,
    temperature: float,
    max_num_seqs: int | None = None,
) -> tuple[RunResult, RunResult]:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=0.95)
    baseline = generate(str(target), chats, params, max_num_seqs=max_num_seqs)
    spec = speculative_config(checkpoint, k)
    ptp = generate(str(target), chats, params, spec, max_num_seqs=max_num_seqs)
    return baseline, ptp


def report(baseline: RunResult, ptp: RunResult, greedy: bool, shown: int = 2) -> str:
    lines = []
    for i, text in enumerate(ptp.texts[:shown]):
        lines.append(f"--- answer {i + 1} (PTP) ---\n{text.strip()}")
    same = sum(a == b for a, b in zip(baseline.token_ids, ptp.token_ids))
    stats = ptp.stats
    drafter_ms = 1000 * median(stats["drafter_pass_seconds"] or [0.0])
    verify_ms = 1000 * median(stats["verify_pass_seconds"] or [0.0])
    lines += [
        "---",
        f"identical outputs with and without PTP: {same}/{len(ptp.token_ids)}"
        + ("" if greedy else " (sampled: vLLM's own sampler differs from F^-1(u))"),
        f"mean accepted tokens per step (tau): {stats['mean_accepted_length']:.2f}",
        "acceptance by draft position: "
        + " ".join(f"{a:.2f}" for a in stats["acceptance_by_position"]),
        f"drafter pass {drafter_ms:.1f} ms vs verification pass {verify_ms:.1f} ms (medians)",
        f"no speculation: {baseline.tokens_per_second:.1f} tok/s",
        f"PTP:            {ptp.tokens_per_second:.1f} tok/s",
        f"speed-up: {ptp.tokens_per_second / baseline.tokens_per_second:.2f}x",
    ]
    return "\n".join(lines)
