"""The Spec-Bench report's numbers: speed-ups of whole turns and of decoding, and the
PTP-against-ablation comparison (τ gaps and their intervals)."""

import pytest

from benchmarks.specbench_report import (
    MIN_PAIRED_RUNS,
    ablation_of,
    own_settings_note,
    paired_tau_gap,
    summarize,
)


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


def timed_run(speculator: str, seconds: float, prefill: float, decode: float, **fields) -> dict:
    """One 2-turn question of 64 tokens per turn, with vLLM's prefill/decode split."""
    return {"speculator": speculator, "mode": "greedy-b1", "category": "qa", "question_ids": [1],
            "engine_start": 0, "seconds": seconds, "tokens": 128, "num_drafts": 0,
            "num_draft_tokens": 0, "num_accepted_tokens": 0, "num_lookup_drafts": 0,
            "accepted_per_position": [], "drafter_pass_seconds": [], "verify_pass_seconds": [],
            "prefill_seconds": prefill, "decode_seconds": decode, "decode_tokens": 126, **fields}


def raw_results(runs: list[dict], categories: tuple[str, ...] = ("qa",)) -> dict:
    return {"runs": runs, "settings": {"modes": ["greedy-b1"], "engine_starts": 1, "speculators": [
        {"name": "no-spec"}, {"name": "ptp-k8"}], "categories": list(categories)}}


def test_categories_keep_the_question_files_order_whatever_order_they_ran_in():
    runs = [timed_run(name, 10.0, 1.0, 9.0, category=category)
            for category in ("rag", "writing") for name in ("no-spec", "ptp-k8")]
    summary = summarize(raw_results(runs, categories=("writing", "rag")))
    assert list(summary["greedy-b1"]["ptp-k8"]["per_category"]) == ["writing", "rag"]


def test_decode_speedup_leaves_the_prefill_out():
    # Both spend 2 s on prefill; PTP decodes in 3 s what no speculation decodes in 9 s.
    summary = summarize(raw_results([timed_run("no-spec", 12.0, 2.0, 9.0),
                                     timed_run("ptp-k8", 5.5, 2.0, 3.0, num_accepted_tokens=80)]))
    base, ptp = summary["greedy-b1"]["no-spec"], summary["greedy-b1"]["ptp-k8"]
    assert ptp["speedup"] == pytest.approx(12.0 / 5.5)
    assert ptp["decode_speedup"] == pytest.approx(3.0)
    assert ptp["per_category"]["qa"]["decode_speedup"] == pytest.approx(3.0)
    assert ptp["decode_tokens_per_second"] == pytest.approx(126 / 3.0)
    assert base["prefill_share"] == pytest.approx(2.0 / 11.0)
    assert ptp["prefill_share"] == pytest.approx(2.0 / 5.0)


def test_prefill_share_of_concurrent_requests_is_of_their_own_time():
    # Eight concurrent requests: their prefill times (8 x 1.5 s) add up to more than the
    # chunk's 10 s of wall time; each spent 1.5 of its 1.5 + 6 s in prefill.
    run = timed_run("no-spec", 10.0, prefill=8 * 1.5, decode=8 * 6.0)
    summary = summarize(raw_results([run, {**run, "speculator": "ptp-k8"}]))
    assert summary["greedy-b1"]["no-spec"]["prefill_share"] == pytest.approx(1.5 / 7.5)


def test_runs_recorded_before_the_split_have_no_decode_numbers():
    old = [{k: v for k, v in timed_run(name, 10.0, 0, 0).items()
            if k not in ("prefill_seconds", "decode_seconds", "decode_tokens")}
           for name in ("no-spec", "ptp-k8")]
    ptp = summarize(raw_results(old))["greedy-b1"]["ptp-k8"]
    assert ptp["speedup"] == pytest.approx(1.0)
    assert ptp["decode_speedup"] is None and ptp["prefill_share"] is None


def test_engines_own_settings_are_named_in_the_report():
    settings = {"speculators": [
        {"name": "no-spec", "environment": {}, "engine": {}},
        {"name": "no-spec-eager", "environment": {}, "engine": {"enforce_eager": True}},
        {"name": "ptp-costs", "environment": {"VLLM_PTP_DRAFT_COSTS": "on"}},  # older results
    ]}
    assert own_settings_note(settings) == (
        ". Engines started with their own settings: no-spec-eager with enforce_eager=True; "
        "ptp-costs with VLLM_PTP_DRAFT_COSTS=on")
    assert own_settings_note({"speculators": [{"name": "no-spec", "environment": {}}]}) == ""
