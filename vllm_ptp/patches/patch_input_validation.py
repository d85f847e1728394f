"""Refuse, per request, sampling settings that PTP's coupled sampler cannot honour exactly.

Why: every token of a PTP request is F^-1(u) under temperature, min-p, top-k and top-p; a
penalty, logit bias, bad-words list, allowed-token list, min_tokens or structured output would be
silently dropped in verification. How: wrap vLLM's `InputProcessor._validate_params`, which runs
in the frontend before a request reaches the engine, so the client gets a clear 400 error. Remove
when the coupled sampler applies vLLM's logits processors.
"""

from vllm.exceptions import VLLMValidationError
from vllm.sampling_params import SamplingParams
from vllm.v1.engine.input_processor import InputProcessor


def unsupported_settings(params: SamplingParams) -> list[str]:
    checks = {
        "presence_penalty": params.presence_penalty != 0.0,
        "frequency_penalty": params.frequency_penalty != 0.0,
        "repetition_penalty": params.repetition_penalty != 1.0,
        "logit_bias": bool(params.logit_bias),
        "bad_words": bool(params.bad_words),
        "allowed_token_ids": params.allowed_token_ids is not None,
        "min_tokens": params.min_tokens > 0,
        "structured_outputs": params.structured_outputs is not None,
    }
    return [name for name, used in checks.items() if used]


def apply() -> None:
    original = InputProcessor._validate_params
    if getattr(original, "_ptp_patched", False):
        return

    def _validate_params(self, params, supported_tasks):
        from vllm_ptp.plugin import ptp_checkpoint_of

        if isinstance(params, SamplingParams) and ptp_checkpoint_of(self.speculative_config):
            unsupported = unsupported_settings(params)
            if unsupported:
                raise VLLMValidationError(  # a client error: the server answers 400
                    f"PTP speculative decoding cannot honour {', '.join(unsupported)} exactly; "
                    "drop these sampling settings, or serve this model without the PTP "
                    "speculator (no --spec-model)."
                )
        return original(self, params, supported_tasks)

    _validate_params._ptp_patched = True
    InputProcessor._validate_params = _validate_params
