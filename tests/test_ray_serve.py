"""The Ray Serve app's configuration, validated on the driver before any replica starts."""

import pytest

from vllm_ptp.config import PTPCheckpointError, load_ptp_config
from vllm_ptp.ray_serve import ptp_llm_config


def test_config_carries_the_validated_checkpoint(target_dir, untrained_checkpoint):
    config = ptp_llm_config(target_dir, untrained_checkpoint, num_replicas=2)
    assert config.engine_kwargs["speculative_config"] == {
        "model": str(untrained_checkpoint.resolve()),
        "num_speculative_tokens": load_ptp_config(untrained_checkpoint).default_k,
    }
    assert config.deployment_config["num_replicas"] == 2
    assert config.engine_kwargs["kv_cache_memory_bytes"] == 512 << 20


def test_k_outside_the_checkpoint_is_refused(target_dir, untrained_checkpoint):
    with pytest.raises(PTPCheckpointError, match="outside what this PTP checkpoint supports"):
        ptp_llm_config(target_dir, untrained_checkpoint, k=999)


def test_missing_checkpoint_is_refused(target_dir, tmp_path):
    with pytest.raises(PTPCheckpointError, match="has no config.json"):
        ptp_llm_config(target_dir, tmp_path / "no-such-checkpoint")
