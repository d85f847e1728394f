"""Shared vLLM engine settings for the CPU testbed, and per-engine PTP statistics."""

import os
from typing import Any

# One place for the settings every engine of a comparison uses (same dtype, length, KV size).
TESTBED_ENGINE_KWARGS: dict[str, Any] = {
    "dtype": "float32",  # bf16 is slower than fp32 on CPUs without AVX-512 BF16
    "max_model_len": 4096,
    "kv_cache_memory_bytes": 2 << 30,
    "enforce_eager": True,
    "disable_log_stats": False,
    "seed": 0,
}


def speculative_config(checkpoint: str, k: int) -> dict[str, Any]:
    return {"model": str(checkpoint), "num_speculative_tokens": k}


def allow_function_rpc() -> None:
    """Let `LLM.collective_rpc` ship our functions to the engine's workers (cloudpickle over the
    engine's local IPC). Call before the engine starts; its processes inherit the setting."""
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"


def _read_ptp_stats(worker) -> dict[str, Any]:
    runner = worker.model_runner
    stats = runner.rejection_sampler.stats
    return {
        "num_drafts": stats.num_drafts,
        "num_draft_tokens": stats.num_draft_tokens,
        "num_accepted_tokens": stats.num_accepted_tokens,
        "mean_accepted_length": stats.mean_accepted_length,
        "acceptance_by_position": stats.acceptance_by_position,
        "drafter_pass_seconds": list(runner.drafter.pass_times),
        "verify_pass_seconds": list(runner.verify_pass_times),
    }


def _reset_ptp_stats(worker) -> None:
    from vllm_ptp.verifier import VerificationStats

    runner = worker.model_runner
    runner.rejection_sampler.stats = VerificationStats()
    runner.drafter.pass_times.clear()
    runner.verify_pass_times.clear()


def ptp_stats(llm, reset: bool = False) -> dict[str, Any]:
    """Coupled-verification counters and pass times of one engine (its first worker).
    The engine must have been started after `allow_function_rpc()`."""
    stats = llm.collective_rpc(_read_ptp_stats)[0]
    if reset:
        llm.collective_rpc(_reset_ptp_stats)
    return stats
