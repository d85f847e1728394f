"""Create, validate, load and save PTP checkpoints (config.json + model.safetensors)."""

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from vllm_ptp.config import (
    WEIGHTS_FILE,
    PTPCheckpointError,
    PTPConfig,
    TargetIdentity,
    load_ptp_config,
    save_ptp_config,
)
from vllm_ptp.models.gated_lora_llama import GatedLoraDrafter


def build_drafter(config: PTPConfig) -> GatedLoraDrafter:
    return GatedLoraDrafter(config)


def _read_weights(path: Path, expected: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    weights_file = path / WEIGHTS_FILE
    if not weights_file.is_file():
        raise PTPCheckpointError(
            f"{path} has no {WEIGHTS_FILE}. The checkpoint is incomplete: copy it again or "
            "re-create it with `vllm-ptp init-checkpoint` / `vllm-ptp train`."
        )
    try:
        with safe_open(weights_file, framework="pt") as f:
            names = set(f.keys())
            missing = sorted(set(expected) - names)
            unexpected = sorted(names - set(expected))
            if missing or unexpected:
                raise PTPCheckpointError(
                    f"{weights_file} does not match its config.json: missing {missing[:5]}"
                    f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}. The "
                    "weights belong to another drafter configuration; re-export the checkpoint."
                )
            tensors = {name: f.get_tensor(name) for name in expected}
    except (SafetensorError, OSError, ValueError) as e:
        if isinstance(e, PTPCheckpointError):
            raise
        raise PTPCheckpointError(
            f"{weights_file} is corrupt or unreadable ({e}). Copy the checkpoint again."
        ) from e
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != expected[name]:
            raise PTPCheckpointError(
                f"{weights_file}: {name} has shape {tuple(tensor.shape)}, config.json implies "
                f"{expected[name]}. The checkpoint is inconsistent; re-export it."
            )
        if not torch.isfinite(tensor).all():
            raise PTPCheckpointError(f"{weights_file}: {name} contains NaN or inf values.")
    return tensors


def load_checkpoint(
    path: str | Path, target: TargetIdentity, k: int | None = None
) -> GatedLoraDrafter:
    """Validate a checkpoint against the served target (and k) and load its drafter."""
    path = Path(path)
    config = load_ptp_config(path)
    config.check_target(target, str(path))
    if k is not None:
        config.check_k(k)
    drafter = build_drafter(config)
    drafter.load_state_dict(_read_weights(path, drafter.expected_weight_shapes()))
    return drafter


def save_checkpoint(drafter: GatedLoraDrafter, path: str | Path) -> None:
    path = Path(path)
    save_ptp_config(drafter.config, path)
    state = {name: t.detach().contiguous() for name, t in drafter.state_dict().items()}
    save_file(state, str(path / WEIGHTS_FILE))


def init_checkpoint(target_dir: str | Path, out: str | Path, **overrides) -> Path:
    """Write an untrained checkpoint (adapters at zero) for the target in `target_dir`."""
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(target_dir)
    config = PTPConfig(
        target=TargetIdentity.from_hf_config(hf_config),
        target_name_or_path=str(target_dir),
        **overrides,
    )
    config.check_self_consistent("init-checkpoint")
    torch.manual_seed(0)
    save_checkpoint(build_drafter(config), out)
    return Path(out)
