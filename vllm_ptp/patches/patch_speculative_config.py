"""Recognise PTP checkpoints in `speculative_config`.

Why: vLLM 0.32 detects a speculator from its checkpoint, and a PTP checkpoint is a type it does
not know. How: before vLLM's own `SpeculativeConfig.__post_init__`, a `model` that is a PTP
checkpoint directory is validated against the target (refusing misfits before any request is
served) and turned into vLLM's `custom_class` method, whose proposer slot the PTP runner fills;
the checkpoint path rides along as `ptp_checkpoint`. On x86 CPUs it also asks for Intel's OpenMP
runtime in the engine processes, which vLLM spawns after this (`vllm_ptp/openmp.py`). Remove
when vLLM has a speculator-type registry for plugins.
"""

from pathlib import Path

from vllm.config.speculative import SpeculativeConfig

from vllm_ptp.checkpoint import load_checkpoint
from vllm_ptp.config import PTPCheckpointError, TargetIdentity, is_ptp_checkpoint, load_ptp_config
from vllm_ptp.openmp import prefer_intel_openmp

PROPOSER_CLASS_PATH = "vllm_ptp.proposer.PTPProposer"
SUPPORTED_LOGPROBS_MODES = ("raw_logprobs", "raw_logits")


def _configure_ptp(spec: SpeculativeConfig) -> None:
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        raise PTPCheckpointError(
            "this vllm-ptp release wires the PTP drafter and coupled verifier into vLLM's CPU "
            "worker only (it reads the CPU paged-KV layout); GPU workers are not supported yet. "
            "Serve without --spec-model on this platform."
        )
    checkpoint = str(Path(spec.model).resolve())
    ptp = load_ptp_config(checkpoint)
    if spec.num_speculative_tokens is None:
        spec.num_speculative_tokens = ptp.default_k
    target = spec.target_model_config
    if target is not None:
        load_checkpoint(
            checkpoint, TargetIdentity.from_hf_config(target.hf_config), spec.num_speculative_tokens
        )
        if target.logprobs_mode not in SUPPORTED_LOGPROBS_MODES:
            raise PTPCheckpointError(
                f"logprobs_mode={target.logprobs_mode!r} is not supported with PTP; use one of "
                f"{SUPPORTED_LOGPROBS_MODES}."
            )
    parallel = spec.target_parallel_config
    if parallel is not None and parallel.tensor_parallel_size > 1:
        raise PTPCheckpointError(
            "the PTP drafter runs with tensor_parallel_size=1 for now; drop "
            "--tensor-parallel-size or serve without the PTP speculator."
        )
    ptp.check_k(spec.num_speculative_tokens)
    spec.method = "custom_class"
    spec.model = PROPOSER_CLASS_PATH
    spec.ptp_checkpoint = checkpoint
    prefer_intel_openmp()


def apply() -> None:
    original = SpeculativeConfig.__post_init__
    if getattr(original, "_ptp_patched", False):
        return

    def __post_init__(self: SpeculativeConfig) -> None:
        if self.method in (None, "ptp") and is_ptp_checkpoint(self.model):
            _configure_ptp(self)
        original(self)

    __post_init__._ptp_patched = True
    SpeculativeConfig.__post_init__ = __post_init__
