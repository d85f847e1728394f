"""The adaptive number of drafts: positions stay while verification keeps accepting them."""

import pytest
import torch

from vllm_ptp.draft_length import (
    MIN_COST_PASSES,
    AdaptiveDraftLength,
    PassCost,
    draft_costs_setting,
    min_acceptance_setting,
)


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


def test_pass_cost_fits_seconds_per_row_once_rows_vary():
    cost = PassCost()
    for _ in range(2 * MIN_COST_PASSES):
        cost.record(rows=9, seconds=0.038)
    assert cost.seconds_per_row is None  # always 9 rows: the slope is unknown
    for step in range(2 * MIN_COST_PASSES):
        rows = 8 + 8 * (step % 6)  # 8..48 rows, as requests come and go
        cost.record(rows, 0.020 + 0.002 * rows)
    assert cost.seconds_per_row == pytest.approx(0.002, rel=0.02)


def test_pass_cost_needs_enough_passes_and_is_never_negative():
    cost = PassCost()
    for rows in range(MIN_COST_PASSES - 1):
        cost.record(rows, 0.010)
    assert cost.seconds_per_row is None
    cost.record(0, 0.5)  # one slow pass at few rows: a negative slope reads as free rows
    assert cost.seconds_per_row == 0.0


def fit_costs(length: AdaptiveDraftLength, drafter_per_row: float, verify_per_row: float,
              tokens_per_second: float) -> None:
    for step in range(2 * MIN_COST_PASSES):
        rows = 8 * (1 + step % 5)
        length.record_drafter_pass(rows, 0.010 + drafter_per_row * rows)
        length.record_step(tokens=int(tokens_per_second / 10), seconds=0.1, verify_rows=rows,
                           verify_seconds=0.030 + verify_per_row * rows)


def test_costly_rows_raise_the_threshold_above_the_floor():
    length = AdaptiveDraftLength(max_k=8, min_acceptance=0.2)
    assert length.threshold == 0.2  # nothing measured yet
    # Each position costs 1 + 2 ms per request and the engine makes 150 tokens/s: a position
    # must be accepted 45% of the time to pay for its rows.
    fit_costs(length, drafter_per_row=0.001, verify_per_row=0.002, tokens_per_second=150)
    assert length.threshold == pytest.approx(0.45, rel=0.02)
    length.rates = [0.95, 0.5, 0.4, 0.2, 0.1, 0.1, 0.1, 0.1]
    assert length.num_drafts == 3  # positions 1 and 2, and position 3 as the probe


def test_cheap_rows_keep_the_floor_and_costs_off_ignore_them():
    cheap = AdaptiveDraftLength(max_k=8, min_acceptance=0.2)
    fit_costs(cheap, drafter_per_row=0.0005, verify_per_row=0.0005, tokens_per_second=40)
    assert cheap.threshold == 0.2  # 1 ms x 40 tokens/s = 0.04 is below the floor
    off = AdaptiveDraftLength(max_k=8, min_acceptance=0.2, draft_costs=False)
    fit_costs(off, drafter_per_row=0.001, verify_per_row=0.002, tokens_per_second=150)
    assert off.threshold == 0.2


def test_draft_costs_setting(monkeypatch):
    monkeypatch.delenv("VLLM_PTP_DRAFT_COSTS", raising=False)
    assert draft_costs_setting() is True
    monkeypatch.setenv("VLLM_PTP_DRAFT_COSTS", "off")
    assert draft_costs_setting() is False
    monkeypatch.setenv("VLLM_PTP_DRAFT_COSTS", "maybe")
    with pytest.raises(ValueError, match="VLLM_PTP_DRAFT_COSTS"):
        draft_costs_setting()
