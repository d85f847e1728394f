"""Distillation on the testbed: windows, resume, and the trained checkpoint loads back."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from vllm_ptp.checkpoint import build_drafter, load_checkpoint
from vllm_ptp.config import PTPCheckpointError, TargetIdentity
from vllm_ptp.models.target import from_hf_llama
from vllm_ptp.rng import GREEDY_U
from vllm_ptp.train.data import Sequence
from vllm_ptp.train.distill import (
    IGNORE,
    TrainConfig,
    _init_inputs,
    accepted_lengths,
    init_from_checkpoint,
    make_windows,
    new_ptp_config,
    step_generator,
    teacher_pass,
    train,
)

TINY = {"k": 4, "windows": 4, "val_every": 1000, "save_every": 2, "val_sequences": 2,
        "lr": 1e-3, "warmup": 1}


@pytest.fixture(scope="module")
def model(target_dir):
    return AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def sequences(model, target_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name three colours."}], add_generation_prompt=True,
        return_dict=False,
    )
    sampled = model.generate(
        torch.tensor([prompt]), max_new_tokens=40, do_sample=True, temperature=0.7, top_p=0.95,
    )[0].tolist()
    greedy = model.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False)[0].tolist()
    return [
        Sequence(sampled, len(prompt), 0.7, 0.95, 0, "a"),
        Sequence(greedy, len(prompt), 0.0, 1.0, 0, "b"),
    ]


def test_windows_draw_u_inside_intervals_and_mark_greedy(model, sequences):
    sampled, greedy = sequences
    logits = teacher_pass(model, sampled).logits
    batch = make_windows(sampled, logits, 16, 4, step_generator(0, 0), beta=0.3)
    assert (batch.starts >= sampled.completion_start).all()
    valid = batch.labels != IGNORE
    assert ((batch.u[valid] >= 0) & (batch.u[valid] < 1)).all()
    logits = teacher_pass(model, greedy).logits
    assert (make_windows(greedy, logits, 8, 4, step_generator(0, 0), 0.3).u == GREEDY_U).all()


def test_shallow_token_row_starts_as_a_fit_of_the_hidden_state_it_stands_for(model, sequences):
    drafter = build_drafter(new_ptp_config(model, "t", TrainConfig(draft_layers=4)))
    drafter.bind_target(from_hf_llama(model))
    _init_inputs(drafter, model, sequences)
    teacher = teacher_pass(model, sequences[0])
    position = torch.arange(sequences[0].completion_start, len(sequences[0].token_ids))
    embeds = model.model.embed_tokens(torch.tensor(sequences[0].token_ids)[position])
    wanted = teacher.layer_inputs[drafter.first_layer][0, position]
    with torch.no_grad():
        fitted = drafter.token_row(embeds, teacher.hidden[position - 1])
    # The row stands for the newest token's hidden state entering layer 26. On the sequences it
    # was fitted to, the fit is closer to it than the bare embedding or their mean are.
    assert (fitted - wanted).norm() < (wanted.mean(0) - wanted).norm() < (embeds - wanted).norm()


def test_accepted_length_counts_the_correct_prefix():
    labels = torch.tensor([[1, 2, 3], [1, 2, 3], [1, IGNORE, IGNORE]])
    predicted = torch.tensor([[1, 2, 3], [1, 0, 3], [1, 5, 5]])
    assert accepted_lengths(predicted, labels).tolist() == [4, 2, 2]


def test_resume_gives_the_same_state_as_an_uninterrupted_run(model, sequences, tmp_path):
    straight = train(model, "t", sequences, sequences, tmp_path / "a", TrainConfig(steps=4, **TINY))
    train(model, "t", sequences, sequences, tmp_path / "b", TrainConfig(steps=4, stop_at=2, **TINY))
    resumed = train(model, "t", sequences, sequences, tmp_path / "b", TrainConfig(steps=4, **TINY))
    assert [r["loss"] for r in resumed["steps"]] == [r["loss"] for r in straight["steps"]]
    target = TargetIdentity.from_hf_config(model.config)
    a = load_checkpoint(tmp_path / "a", target).state_dict()
    b = load_checkpoint(tmp_path / "b", target).state_dict()
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_init_from_takes_a_checkpoints_weights_and_refuses_another_shape(
    model, untrained_checkpoint
):
    drafter = build_drafter(new_ptp_config(model, "t", TrainConfig(lora_rank=16)))
    init_from_checkpoint(drafter, str(untrained_checkpoint), model)
    source = load_checkpoint(untrained_checkpoint, TargetIdentity.from_hf_config(model.config))
    assert all(torch.equal(t, source.state_dict()[name])
               for name, t in drafter.state_dict().items())
    other = build_drafter(new_ptp_config(model, "t", TrainConfig(lora_rank=4)))
    with pytest.raises(PTPCheckpointError, match="--init-from.*LoRA rank"):
        init_from_checkpoint(other, str(untrained_checkpoint), model)


def test_head_only_training_adds_a_dependency_head_and_keeps_the_drafter(
    model, sequences, untrained_checkpoint, tmp_path
):
    cfg = TrainConfig(steps=2, dependency_head=16, head_only=True,
                      init_from=str(untrained_checkpoint), **TINY)
    train(model, "t", sequences, sequences, tmp_path / "h", cfg)
    target = TargetIdentity.from_hf_config(model.config)
    trained = load_checkpoint(tmp_path / "h", target).state_dict()
    source = load_checkpoint(untrained_checkpoint, target).state_dict()
    assert all(torch.equal(trained[name], t) for name, t in source.items())
    assert trained["dependency_head.out.weight"].abs().sum() > 0  # starts at zero


def test_short_training_raises_teacher_forced_accepted_length(model, sequences, tmp_path):
    cfg = TrainConfig(steps=40, **{**TINY, "windows": 8, "val_every": 40})
    history = train(model, "t", sequences, sequences, tmp_path / "c", cfg)
    first = sum(r["tau"] for r in history["steps"][:5]) / 5
    last = sum(r["tau"] for r in history["steps"][-5:]) / 5
    assert last > first + 0.3
