"""The adaptive number of drafts: positions stay while verification keeps accepting them."""

import pytest
import torch

from vllm_ptp.draft_length import AdaptiveDraftLength, min_acceptance_setting


def verify(length: AdaptiveDraftLength, accepted: list[int], steps: int = 200) -> None:
    """`steps` verification steps of len(accepted) requests, each drafting what `length` says
    and accepting min(its entry, that many) drafts."""
    for _ in range(steps):
        drafts = torch.full((len(accepted),), length.num_drafts)
        length.record(drafts, torch.minimum(torch.tensor(accepted), drafts))


def test_starts_at_k_and_drops_positions_that_are_never_accepted():
    length = AdaptiveDraftLength(max_k=8, min_acceptance=0.1)
    assert length.num_drafts == 8
    # Half the requests accept 2 drafts, half accept 1: positions 3.. are never accepted.
    verify(length, [2, 1])
    assert length.num_drafts == 3  # positions 1 and 2 pay off; position 3 stays as the probe
    assert length.rates[0] == 1.0 and length.rates[1] == pytest.approx(0.5, abs=0.05)
    assert length.rates[2] < length.min_acceptance


def test_probe_position_brings_drafts_back_when_acceptance_recovers():
    length = AdaptiveDraftLength(max_k=8, min_acceptance=0.1)
    verify(length, [1])
    assert length.num_drafts == 2
    verify(length, [8])  # every draft is accepted again: one more position per recovery
    assert length.num_drafts == 8


def test_threshold_zero_always_drafts_k():
    length = AdaptiveDraftLength(max_k=4, min_acceptance=0.0)
    verify(length, [0, 0])
    assert length.num_drafts == 4


def test_steps_without_drafts_change_nothing():
    length = AdaptiveDraftLength(max_k=4, min_acceptance=0.1)
    length.record(torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long))
    length.record(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    assert length.rates == [1.0] * 4


def test_min_acceptance_setting(monkeypatch):
    monkeypatch.delenv("VLLM_PTP_MIN_ACCEPTANCE", raising=False)
    assert min_acceptance_setting(torch.device("cpu")) == 0.2
    monkeypatch.setenv("VLLM_PTP_MIN_ACCEPTANCE", "0")
    assert min_acceptance_setting(torch.device("cpu")) == 0.0
    for bad in ("1.5", "-0.1", "often"):
        monkeypatch.setenv("VLLM_PTP_MIN_ACCEPTANCE", bad)
        with pytest.raises(ValueError, match="VLLM_PTP_MIN_ACCEPTANCE"):
            min_acceptance_setting(torch.device("cpu"))
