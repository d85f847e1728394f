"""The Spec-Bench report's PTP-against-ablation comparison: τ gaps and their intervals."""

import pytest

from benchmarks.specbench_report import MIN_PAIRED_RUNS, ablation_of, paired_tau_gap


def runs(speculator: str, accepted: list[int], tokens: int = 64) -> list[dict]:
    """One single-question run per entry: `tokens` generated, `accepted[i]` of them drafts."""
    return [{"speculator": speculator, "question_ids": [i], "category": "qa", "tokens": tokens,
             "num_accepted_tokens": a} for i, a in enumerate(accepted)]


def test_gap_is_the_difference_of_the_pooled_taus():
    ptp, ablation = runs("ptp-k8", [40, 44, 48, 32, 36]), runs("independent-k8", [32] * 5)
    gap = paired_tau_gap(ptp, ablation)
    # Pooled: 320 tokens; 200 against 160 accepted, i.e. 120 against 160 steps.
    assert gap["gap"] == pytest.approx(320 / 120 - 320 / 160)
    assert gap["pairs"] == 5
    assert 0 < gap["low"] < gap["gap"] < gap["high"]  # ahead on every question: excludes 0


def test_identical_runs_give_a_zero_interval_and_mixed_ones_straddle_zero():
    same = runs("ptp-k8", [40, 30, 20, 35, 25])
    assert paired_tau_gap(same, same) == {"gap": 0.0, "low": 0.0, "high": 0.0, "pairs": 5}
    ahead_and_behind = runs("ptp-k8", [48, 16, 48, 16, 32, 32])
    mirrored = runs("independent-k8", [16, 48, 16, 48, 32, 32])
    gap = paired_tau_gap(ahead_and_behind, mirrored)
    assert gap["gap"] == pytest.approx(0.0) and gap["low"] < 0 < gap["high"]


def test_pairs_follow_the_question_ids_and_too_few_give_none():
    ptp = runs("ptp-k8", [40] * MIN_PAIRED_RUNS)
    shuffled = list(reversed(runs("independent-k8", [40] * MIN_PAIRED_RUNS)))
    assert paired_tau_gap(ptp, shuffled)["high"] == 0.0
    assert paired_tau_gap(ptp[:-1], shuffled) is None
    assert paired_tau_gap(ptp, runs("independent-k8", [])) is None


def test_ablation_pairs_with_the_ptp_run_of_the_same_k_and_options():
    names = ["no-spec", "ptp-k8", "independent-k8", "ptp-k4", "ptp-k8-no-lookup"]
    assert ablation_of("ptp-k8", names) == "independent-k8"
    assert ablation_of("ptp-k4", names) is None
    assert ablation_of("ptp-k8-no-lookup", names) is None
    assert ablation_of("independent-k8", names) is None
