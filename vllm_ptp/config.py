"""The PTP checkpoint: `config.json` in the speculators convention plus a `ptp_config` block.

Everything a checkpoint must agree on with its target is checked here, before any request is
served, and every refusal names the mismatch and the fix.
"""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PTP_MODEL_TYPE = "ptp"
SPECULATORS_VERSION = "0.1.0"
WEIGHTS_FILE = "model.safetensors"
DRAFTER_KINDS = ("gated_lora",)
U_EMBEDDING_KINDS = ("interpolated", "constant")
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)


class PTPCheckpointError(ValueError):
    """A PTP checkpoint that cannot serve the requested target or settings."""


@dataclass(frozen=True)
class TargetIdentity:
    """What a drafter's weights are shaped for: the target's architecture and sizes."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int

    @classmethod
    def from_hf_config(cls, hf_config: Any) -> "TargetIdentity":
        heads = hf_config.num_attention_heads
        return cls(
            architecture=(hf_config.architectures or ["?"])[0],
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            num_hidden_layers=hf_config.num_hidden_layers,
            num_attention_heads=heads,
            num_key_value_heads=getattr(hf_config, "num_key_value_heads", None) or heads,
            head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads,
        )


@dataclass
class PTPConfig:
    """The `ptp_config` block of a PTP checkpoint."""

    target: TargetIdentity
    target_name_or_path: str
    drafter_kind: str = "gated_lora"
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_modules: tuple[str, ...] = LORA_MODULES
    u_embedding: str = "interpolated"
    u_embedding_size: int = 16
    max_k: int = 16
    default_k: int = 8
    # The drafter runs the target's top `num_draft_layers` layers (None: all of them, the
    # paper's drafter). Fewer layers make a cheaper drafter that still reads the context's
    # K/V of those (deep) layers from the target's KV cache.
    num_draft_layers: int | None = None
    # Width of the dependency head's hidden layer (None: no head). The head re-ranks each
    # later draft's `dependency_candidates` most likely tokens knowing the draft before it.
    dependency_head: int | None = None
    dependency_candidates: int = 8
    # The sampling transform the drafter was trained under (None: untrained).
    training_sampling: dict[str, float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def lora_scaling(self) -> float:
        return self.lora_alpha / self.lora_rank

    @property
    def first_draft_layer(self) -> int:
        """Index of the first target layer the drafter runs."""
        return self.target.num_hidden_layers - (
            self.num_draft_layers or self.target.num_hidden_layers
        )

    def to_checkpoint_json(self) -> dict[str, Any]:
        ptp = asdict(self)
        ptp["lora_modules"] = list(self.lora_modules)
        return {
            "architectures": ["PTPDrafter"],
            "speculators_model_type": PTP_MODEL_TYPE,
            "speculators_version": SPECULATORS_VERSION,
            "speculators_config": {
                "algorithm": PTP_MODEL_TYPE,
                "proposal_methods": [
                    {"proposal_type": PTP_MODEL_TYPE, "speculative_tokens": self.default_k}
                ],
                "default_proposal_method": PTP_MODEL_TYPE,
                "verifier": {
                    "name_or_path": self.target_name_or_path,
                    "architectures": [self.target.architecture],
                },
            },
            "ptp_config": ptp,
        }

    @classmethod
    def from_checkpoint_json(cls, data: dict[str, Any], where: str) -> "PTPConfig":
        if data.get("speculators_model_type") != PTP_MODEL_TYPE or "ptp_config" not in data:
            raise PTPCheckpointError(
                f"{where} is not a PTP checkpoint (needs speculators_model_type='ptp' and a "
                "ptp_config block). Create one with `vllm-ptp init-checkpoint` or `vllm-ptp train`."
            )
        ptp = dict(data["ptp_config"])
        try:
            ptp["target"] = TargetIdentity(**ptp["target"])
            ptp["lora_modules"] = tuple(ptp["lora_modules"])
            config = cls(**ptp)
        except (KeyError, TypeError) as e:
            raise PTPCheckpointError(f"{where}: malformed ptp_config ({e}).") from e
        config.check_self_consistent(where)
        return config

    def check_self_consistent(self, where: str) -> None:
        if self.drafter_kind not in DRAFTER_KINDS:
            raise PTPCheckpointError(
                f"{where}: unknown drafter kind {self.drafter_kind!r}; this vllm-ptp knows "
                f"{DRAFTER_KINDS}. Upgrade vllm-ptp or retrain the checkpoint."
            )
        if self.u_embedding not in U_EMBEDDING_KINDS:
            raise PTPCheckpointError(
                f"{where}: unknown u-embedding {self.u_embedding!r}; known: {U_EMBEDDING_KINDS}."
            )
        unknown = set(self.lora_modules) - set(LORA_MODULES)
        if unknown:
            raise PTPCheckpointError(f"{where}: unknown LoRA modules {sorted(unknown)}.")
        layers = self.target.num_hidden_layers
        if self.num_draft_layers is not None and not 1 <= self.num_draft_layers <= layers:
            raise PTPCheckpointError(
                f"{where}: num_draft_layers={self.num_draft_layers} must be within 1..{layers} "
                "(the target's layers) or null for all of them."
            )
        if self.dependency_head is not None and self.dependency_head < 1:
            raise PTPCheckpointError(
                f"{where}: dependency_head={self.dependency_head} must be a positive width or "
                "null (no head)."
            )
        if not 1 <= self.dependency_candidates <= self.target.vocab_size:
            raise PTPCheckpointError(
                f"{where}: dependency_candidates={self.dependency_candidates} must be within "
                f"1..{self.target.vocab_size} (the vocabulary)."
            )
        if not 1 <= self.default_k <= self.max_k:
            raise PTPCheckpointError(
                f"{where}: default_k={self.default_k} must be within 1..max_k={self.max_k}."
            )

    def check_target(self, target: TargetIdentity, where: str) -> None:
        """Refuse a checkpoint whose weights are shaped for another target."""
        if target.architecture not in SUPPORTED_ARCHITECTURES:
            raise PTPCheckpointError(
                f"target architecture {target.architecture} is not supported by the PTP "
                f"drafter yet (supported: {SUPPORTED_ARCHITECTURES})."
            )
        mismatches = [
            f"{name}: checkpoint {mine} vs target {theirs}"
            for name, mine, theirs in zip(
                TargetIdentity.__dataclass_fields__,
                asdict(self.target).values(),
                asdict(target).values(),
            )
            if mine != theirs
        ]
        if mismatches:
            raise PTPCheckpointError(
                f"{where} was built for target {self.target_name_or_path!r}, which differs from "
                f"the served model ({'; '.join(mismatches)}). Use a PTP checkpoint trained for "
                "this target, or train one with `vllm-ptp train --target <model>`."
            )

    def check_k(self, k: int) -> None:
        if not 1 <= k <= self.max_k:
            raise PTPCheckpointError(
                f"num_speculative_tokens={k} is outside what this PTP checkpoint supports "
                f"(1..{self.max_k}). Pass a k in that range, e.g. --spec-tokens {self.default_k}."
            )


def is_ptp_checkpoint(path: str | None) -> bool:
    """True when `path` is a directory whose config.json declares a PTP speculator."""
    if not path:
        return False
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return False
    try:
        return json.loads(config_file.read_text()).get("speculators_model_type") == PTP_MODEL_TYPE
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def load_ptp_config(path: str | Path) -> PTPConfig:
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise PTPCheckpointError(
            f"{path} has no config.json. Point --spec-model at a PTP checkpoint directory."
        )
    try:
        data = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PTPCheckpointError(f"{config_file} is not valid JSON ({e}).") from e
    return PTPConfig.from_checkpoint_json(data, str(path))


def save_ptp_config(config: PTPConfig, path: str | Path) -> None:
    Path(path).mkdir(parents=True, exist_ok=True)
    (Path(path) / "config.json").write_text(json.dumps(config.to_checkpoint_json(), indent=2))
