"""Shared vLLM engine settings for the CPU testbed, and per-engine PTP statistics."""

import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from vllm_ptp.openmp import intel_openmp_preload

# One place for the settings every engine of a comparison uses (same dtype, length, KV size).
TESTBED_ENGINE_KWARGS: dict[str, Any] = {
    "dtype": "float32",  # bf16 is slower than fp32 on CPUs without AVX-512 BF16
    "max_model_len": 4096,
    "kv_cache_memory_bytes": 2 << 30,
    "enforce_eager": True,  # starts in ~20 s instead of ~90 s: for the tests
    "disable_log_stats": False,
    "seed": 0,
}
# Engines whose speed is reported (demo, bench): the target compiled by torch.compile, vLLM's
# default. Eagerly, no speculation ran 10% slower and PTP as fast (benchmarks/results/
# zen4-compile-ab-b1), which would flatter every speed-up.
MEASURED_ENGINE_KWARGS: dict[str, Any] = {**TESTBED_ENGINE_KWARGS, "enforce_eager": False}
RESERVED_CPU_VARIABLE = "VLLM_CPU_NUM_OF_RESERVED_CPU"


def speculative_config(checkpoint: str, k: int) -> dict[str, Any]:
    return {"model": str(checkpoint), "num_speculative_tokens": k}


@contextmanager
def environment(variables: dict[str, str]) -> Iterator[None]:
    """These environment variables inside, the previous values after. vLLM's engine processes
    read the environment when they start, so an engine started inside keeps the setting."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def every_cpu_core() -> AbstractContextManager[None]:
    """Engines started inside run vLLM-cpu's model worker on every core. By default vLLM-cpu
    keeps one core per worker for its engine-core process, which busy-waits on the worker:
    half of a 2-core machine. On the testbed, in one interleaved run (benchmarks/results/
    cores-ab-b1), no speculation went from 12.7 to 16.1 tok/s and PTP k=8 from 12.7 to 16.4.
    A value set in the environment wins."""
    return environment({} if RESERVED_CPU_VARIABLE in os.environ else {RESERVED_CPU_VARIABLE: "0"})


def same_openmp_runtime() -> AbstractContextManager[None]:
    """Engines started inside all run Intel's OpenMP runtime, as PTP engines do by default
    (vllm_ptp/openmp.py): otherwise vLLM-cpu gives engines without PTP GNU's, and a comparison
    would measure the runtimes too. With VLLM_PTP_INTEL_OPENMP=off all keep vLLM-cpu's."""
    return environment(intel_openmp_preload())


def shutdown_engine(llm) -> None:
    """Stop an `LLM`'s engine processes now: garbage collection alone leaves them to finalizers,
    and every engine still alive holds its KV cache (gigabytes on the testbed)."""
    llm.llm_engine.engine_core.shutdown()


def allow_function_rpc() -> None:
    """Let `LLM.collective_rpc` ship our functions to the engine's workers (cloudpickle over the
    engine's local IPC). Call before the engine starts; its processes inherit the setting."""
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"


def _count_verifications(sampler) -> None:
    """Give vLLM's own rejection sampler (ngram, EAGLE, ...) the counters PTP's keeps."""
    import torch

    from vllm_ptp.sampling import PLACEHOLDER_TOKEN_ID
    from vllm_ptp.verifier import VerificationStats

    sampler.stats = VerificationStats()
    forward = sampler.forward

    def counted(metadata, *args, **kwargs):
        output = forward(metadata, *args, **kwargs)
        emitted = (output.sampled_token_ids != PLACEHOLDER_TOKEN_ID).sum(dim=1).cpu()
        sampler.stats.record(torch.tensor(metadata.num_draft_tokens), emitted - 1)
        return output

    sampler.forward = counted


def _speculation_stats(worker, reset: bool) -> dict[str, Any]:
    from vllm_ptp.verifier import VerificationStats

    runner = worker.model_runner
    sampler = runner.rejection_sampler
    if not hasattr(sampler, "stats"):
        _count_verifications(sampler)
    stats = sampler.stats
    drafter_times = getattr(runner.drafter, "pass_times", [])
    verify_times = getattr(runner, "verify_pass_times", [])
    result = {
        "num_drafts": stats.num_drafts,
        "num_draft_tokens": stats.num_draft_tokens,
        "num_accepted_tokens": stats.num_accepted_tokens,
        "num_lookup_drafts": stats.num_lookup_drafts,
        "accepted_per_position": list(stats.accepted_per_position),
        "mean_accepted_length": stats.mean_accepted_length,
        "acceptance_by_position": stats.acceptance_by_position,
        "drafter_pass_seconds": list(drafter_times),
        "verify_pass_seconds": list(verify_times),
    }
    if draft_length := getattr(runner, "draft_length", None):
        # PTP's adaptive draft length: the floor of its threshold (VLLM_PTP_MIN_ACCEPTANCE),
        # whether the passes' costs raise it (VLLM_PTP_DRAFT_COSTS), and the threshold now.
        result["min_acceptance"] = draft_length.min_acceptance
        result["draft_costs"] = draft_length.draft_costs
        result["acceptance_threshold"] = draft_length.threshold
    if reset:
        sampler.stats = VerificationStats()
        drafter_times.clear()
        verify_times.clear()
    return result


def speculation_stats(llm, reset: bool = False) -> dict[str, Any]:
    """Verification counters and pass times of one speculative engine (its first worker): PTP's
    own, or counted from vLLM's rejection sampler for other speculators (from the first call
    on). Pass times are PTP's only. The engine must have been started after
    `allow_function_rpc()`."""
    return llm.collective_rpc(_speculation_stats, args=(reset,))[0]
