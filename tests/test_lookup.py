"""Prompt lookup after the first draft (vllm_ptp/lookup.py), and its place in verification."""

import numpy as np
import pytest
import torch

from tests.test_verifier import sampling_metadata, spec_metadata, verification_step
from vllm_ptp import lookup


def tokens(*ids: int) -> np.ndarray:
    return np.array(ids, dtype=np.int32)  # vLLM's token_ids_cpu dtype


def test_continues_what_followed_the_ngram_ending_in_the_first_draft():
    context = tokens(9, 5, 6, 7, 8, 4, 3, 2, 5)
    # Context + first draft 6 ends in (5, 6), seen before at 1..2: then came 7, 8, 4, ...
    assert lookup.continuation(np.append(context, 6), 3).tolist() == [7, 8, 4]
    # Capped by max_drafts and by the end of the context.
    assert lookup.continuation(np.append(context, 6), 1).tolist() == [7]
    assert lookup.continuation(tokens(5, 6, 7, 1, 5, 6), 8).tolist() == [7, 1, 5, 6]


def test_longest_ngram_wins_and_the_first_draft_is_part_of_it():
    # (2, 3) follows by 4 at the start and by 9 later; (1, 2, 3) only before 9.
    context = tokens(2, 3, 4, 0, 1, 2, 3, 9, 7, 1, 2)
    assert lookup.continuation(np.append(context, 3), 2).tolist() == [9, 7]
    # Another first draft, another n-gram: (2, 5) never occurred.
    assert lookup.continuation(np.append(context, 5), 2).size == 0


def test_no_repeat_no_drafts():
    assert lookup.continuation(tokens(1, 2, 3, 4, 5), 4).size == 0
    assert lookup.continuation(tokens(5), 4).size == 0


def test_prompt_lookup_setting(monkeypatch):
    monkeypatch.delenv("VLLM_PTP_PROMPT_LOOKUP", raising=False)
    assert lookup.prompt_lookup_setting() == "all"
    for choice in lookup.PROMPT_LOOKUP_CHOICES:
        monkeypatch.setenv("VLLM_PTP_PROMPT_LOOKUP", choice)
        assert lookup.prompt_lookup_setting() == choice
    monkeypatch.setenv("VLLM_PTP_PROMPT_LOOKUP", "1")
    with pytest.raises(ValueError, match="VLLM_PTP_PROMPT_LOOKUP='1' is not one of"):
        lookup.prompt_lookup_setting()


def test_copy_runs_setting(monkeypatch):
    monkeypatch.delenv("VLLM_PTP_COPY_RUNS", raising=False)
    assert lookup.copy_runs_setting()
    monkeypatch.setenv("VLLM_PTP_COPY_RUNS", "off")
    assert not lookup.copy_runs_setting()
    monkeypatch.setenv("VLLM_PTP_COPY_RUNS", "0")
    with pytest.raises(ValueError, match="VLLM_PTP_COPY_RUNS='0' is not one of"):
        lookup.copy_runs_setting()


def test_lookup_rows_are_verified_but_do_not_teach_the_draft_length():
    verifier, logits, row_tokens, drafts = verification_step()
    # Request 0's (right) drafts came from lookup; request 1's (wrong) from the drafter.
    verifier.pending_lookup_rows = torch.tensor([True, False, False])
    out = verifier(spec_metadata(drafts), None, logits, sampling_metadata(None))
    assert out.sampled_token_ids[0].tolist() == row_tokens[0:3]
    assert verifier.stats.num_drafts == 2 and verifier.stats.num_lookup_drafts == 1
    assert verifier.stats.num_accepted_tokens == 2
    # Only request 1 taught the draft length: its first position was rejected, and the second
    # position was not verified at all.
    assert verifier.draft_length.rates == [0.5, 1.0]
    assert verifier.pending_lookup_rows is None
