"""vLLM general plugin entry point: wires PTP into every vLLM process (API server, engine
core, workers, Ray workers). Idempotent and import-light: patches are applied on first call."""

from typing import Any

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from vllm_ptp.patches import (
        patch_cli,
        patch_cpu_expand,
        patch_cpu_worker,
        patch_input_validation,
        patch_speculative_config,
    )

    for patch in (
        patch_speculative_config,
        patch_cpu_worker,
        patch_cpu_expand,
        patch_input_validation,
        patch_cli,
    ):
        patch.apply()
    _registered = True


def ptp_checkpoint_of(speculative_config: Any) -> str | None:
    """The PTP checkpoint a speculative config serves, or None when it is not PTP."""
    return getattr(speculative_config, "ptp_checkpoint", None)
