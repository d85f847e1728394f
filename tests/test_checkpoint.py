"""Checkpoint format: round trip, and every refusal names the problem and the fix."""

import json
import shutil

import pytest
import torch
from transformers import AutoConfig

from vllm_ptp.checkpoint import init_checkpoint, load_checkpoint
from vllm_ptp.config import (
    WEIGHTS_FILE,
    PTPCheckpointError,
    TargetIdentity,
    is_ptp_checkpoint,
    load_ptp_config,
)
from vllm_ptp.data import SHIPPED_CHECKPOINT, SHIPPED_INDEPENDENT_CHECKPOINT
from vllm_ptp.rng import GREEDY_U


@pytest.fixture
def target(target_dir):
    return TargetIdentity.from_hf_config(AutoConfig.from_pretrained(target_dir))


@pytest.fixture
def checkpoint(untrained_checkpoint, tmp_path):
    copy = tmp_path / "ckpt"
    shutil.copytree(untrained_checkpoint, copy)
    return copy


def edit_config(path, edit):
    config_file = path / "config.json"
    data = json.loads(config_file.read_text())
    edit(data)
    config_file.write_text(json.dumps(data))


def test_init_writes_a_speculators_style_checkpoint(checkpoint, target, target_dir):
    data = json.loads((checkpoint / "config.json").read_text())
    assert data["speculators_model_type"] == "ptp"
    spec = data["speculators_config"]
    assert spec["algorithm"] == "ptp"
    assert spec["verifier"]["name_or_path"] == str(target_dir)
    assert spec["proposal_methods"][0]["speculative_tokens"] == 8
    ptp = load_ptp_config(checkpoint)
    assert ptp.target == target and ptp.drafter_kind == "gated_lora" and ptp.max_k == 16
    assert is_ptp_checkpoint(str(checkpoint)) and not is_ptp_checkpoint(str(target_dir))


def test_round_trip_restores_every_weight(checkpoint, target):
    first = load_checkpoint(checkpoint, target, k=8)
    second = load_checkpoint(checkpoint, target, k=8)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert a.equal(b), name


def test_refuses_another_target(checkpoint, target):
    other = TargetIdentity(**{**target.__dict__, "hidden_size": 2048, "vocab_size": 32000})
    with pytest.raises(PTPCheckpointError, match="hidden_size.*vocab_size|vocab_size") as e:
        load_checkpoint(checkpoint, other)
    assert "train" in str(e.value)


def test_refuses_missing_weights(checkpoint, target):
    (checkpoint / WEIGHTS_FILE).unlink()
    with pytest.raises(PTPCheckpointError, match="no model.safetensors"):
        load_checkpoint(checkpoint, target)


def test_refuses_corrupt_weights(checkpoint, target):
    (checkpoint / WEIGHTS_FILE).write_bytes(b"\x00garbage" * 100)
    with pytest.raises(PTPCheckpointError, match="corrupt"):
        load_checkpoint(checkpoint, target)


def test_refuses_weights_of_another_configuration(checkpoint, target):
    edit_config(checkpoint, lambda d: d["ptp_config"].update(lora_rank=32))
    with pytest.raises(PTPCheckpointError, match="does not match its config.json|shape"):
        load_checkpoint(checkpoint, target)


def test_refuses_unknown_drafter_kind(checkpoint, target):
    edit_config(checkpoint, lambda d: d["ptp_config"].update(drafter_kind="medusa_heads"))
    with pytest.raises(PTPCheckpointError, match="unknown drafter kind 'medusa_heads'"):
        load_checkpoint(checkpoint, target)


@pytest.mark.parametrize("layers", [0, 31])
def test_refuses_impossible_number_of_draft_layers(checkpoint, target, layers):
    edit_config(checkpoint, lambda d: d["ptp_config"].update(num_draft_layers=layers))
    with pytest.raises(PTPCheckpointError, match=f"num_draft_layers={layers}.*1..30"):
        load_checkpoint(checkpoint, target)


@pytest.mark.parametrize(
    "setting,message",
    [({"dependency_head": 0}, "dependency_head=0 must be a positive width"),
     ({"dependency_candidates": 0}, r"dependency_candidates=0 must be within 1..49152")],
)
def test_refuses_impossible_dependency_head(checkpoint, target, setting, message):
    edit_config(checkpoint, lambda d: d["ptp_config"].update(setting))
    with pytest.raises(PTPCheckpointError, match=message):
        load_checkpoint(checkpoint, target)


@pytest.mark.parametrize("k", [0, 17])
def test_refuses_impossible_k(checkpoint, target, k):
    with pytest.raises(PTPCheckpointError, match=f"num_speculative_tokens={k}.*1..16"):
        load_checkpoint(checkpoint, target, k=k)


def test_refuses_invalid_json_and_foreign_configs(checkpoint, tmp_path, target_dir):
    (checkpoint / "config.json").write_text("{not json")
    with pytest.raises(PTPCheckpointError, match="not valid JSON"):
        load_ptp_config(checkpoint)
    with pytest.raises(PTPCheckpointError, match="not a PTP checkpoint"):
        load_ptp_config(target_dir)
    with pytest.raises(PTPCheckpointError, match="no config.json"):
        load_ptp_config(tmp_path / "nowhere")


def test_init_checkpoint_cli_options(target_dir, tmp_path, target):
    path = init_checkpoint(target_dir, tmp_path / "c", lora_rank=4, u_embedding="constant",
                           num_draft_layers=3)
    ptp = load_ptp_config(path)
    assert ptp.lora_rank == 4 and ptp.u_embedding == "constant" and ptp.num_draft_layers == 3
    drafter = load_checkpoint(path, target)
    assert list(drafter.layer_indices) == [27, 28, 29] and len(drafter.lora) == 3


@pytest.mark.parametrize(
    "path,reads_u", [(SHIPPED_CHECKPOINT, True), (SHIPPED_INDEPENDENT_CHECKPOINT, False)]
)
def test_shipped_checkpoints_load_for_the_testbed(path, reads_u, target):
    """PTP's auxiliary inputs depend on u and on the greedy marker; the ablation's on neither."""
    drafter = load_checkpoint(path, target, k=8)
    embedding = drafter.u_embedding(torch.tensor([0.1, 0.9, GREEDY_U]))
    assert torch.equal(embedding[0], embedding[1]) != reads_u
    assert torch.equal(embedding[0], embedding[2]) != reads_u
