"""Shared vLLM engine settings for the CPU testbed, and spec-decode statistics from vLLM's metrics."""

from dataclasses import dataclass
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


@dataclass
class SpecDecodeStats:
    num_drafts: int = 0  # verification steps that carried drafts
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: tuple[int, ...] = ()

    @property
    def mean_accepted_length(self) -> float:
        """tau: tokens emitted per verification step (vLLM's "mean acceptance length")."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 1.0

    @property
    def acceptance_by_position(self) -> list[float]:
        return [n / self.num_drafts for n in self.accepted_per_position] if self.num_drafts else []

    def minus(self, earlier: "SpecDecodeStats") -> "SpecDecodeStats":
        return SpecDecodeStats(
            self.num_drafts - earlier.num_drafts,
            self.num_draft_tokens - earlier.num_draft_tokens,
            self.num_accepted_tokens - earlier.num_accepted_tokens,
            tuple(
                a - b
                for a, b in zip(
                    self.accepted_per_position,
                    earlier.accepted_per_position or (0,) * len(self.accepted_per_position),
                )
            ),
        )


def spec_decode_stats(llm) -> SpecDecodeStats:
    """Cumulative spec-decode counters of an `LLM` (needs disable_log_stats=False)."""
    from vllm.v1.metrics.reader import Counter, Vector

    stats = SpecDecodeStats()
    for metric in llm.get_metrics():
        if metric.name == "vllm:spec_decode_num_drafts" and isinstance(metric, Counter):
            stats.num_drafts += metric.value
        elif metric.name == "vllm:spec_decode_num_draft_tokens" and isinstance(metric, Counter):
            stats.num_draft_tokens += metric.value
        elif metric.name == "vllm:spec_decode_num_accepted_tokens" and isinstance(
            metric, Counter
        ):
            stats.num_accepted_tokens += metric.value
        elif metric.name == "vllm:spec_decode_num_accepted_tokens_per_pos" and isinstance(
            metric, Vector
        ):
            stats.accepted_per_position = tuple(metric.values)
    return stats
