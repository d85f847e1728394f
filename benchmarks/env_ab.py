"""A/B of engine settings in one interleaved Spec-Bench run: no speculation plus one engine
per variant, each started with its own environment variables.

    python -m benchmarks.env_ab --out DIR --variant ptp-int8 VLLM_PTP_DRAFT_WEIGHTS=int8 \
        --variant ptp-fp16 VLLM_PTP_DRAFT_WEIGHTS=fp16 --per-category 1

writes the same report as `vllm-ptp bench` (README.md, results.json, plots) to DIR. A variant is
PTP at --k unless a speculator of `vllm-ptp bench --speculators` follows its name, e.g.
`--variant none-thp none THP_MEM_ALLOC_ENABLE=1` for a setting of the engine itself, whose
speed-up is then over the plain no-speculation engine of the same run.
"""

import argparse
import dataclasses
import re
import shlex
import sys
from pathlib import Path

from benchmarks.specbench import (
    BENCH_ENGINE_KWARGS,
    Mode,
    Speculator,
    load_questions,
    parse_speculator,
    run_bench,
    stop_engines_on_sigterm,
)
from benchmarks.specbench_report import write_results
from vllm_ptp.cli import _testbed, bench_checkpoints

ASSIGNMENT = re.compile(r"[A-Za-z_]\w*=")  # VAR=VALUE; a speculator is `kind[:options]`


def parse_variant(
    name: str, words: list[str], default: str, checkpoints: dict[str, Path | None]
) -> Speculator:
    """NAME [SPECULATOR] [VAR=VALUE ...]: the speculator (`default` if none is named) under NAME,
    its engine started with these variables on top of the speculator's own."""
    named = bool(words) and not ASSIGNMENT.match(words[0])
    text, assignments = (words[0], words[1:]) if named else (default, words)
    environment = {}
    for assignment in assignments:
        if not ASSIGNMENT.match(assignment):
            raise SystemExit(f"variant {name}: expected VAR=VALUE, got {assignment!r}")
        variable, _, value = assignment.partition("=")
        environment[variable] = value
    speculator = parse_speculator(text, checkpoints)
    return dataclasses.replace(speculator, name=name,
                               environment={**speculator.environment, **environment})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="results directory")
    parser.add_argument("--variant", nargs="+", action="append", required=True,
                        metavar=("NAME", "[SPECULATOR] VAR=VALUE"),
                        help="an engine and its environment (PTP at --k unless named)")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--modes", nargs="+", default=["greedy-b1"])
    parser.add_argument("--per-category", type=int, help="only the first N questions of each")
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens per turn")
    parser.add_argument("--enforce-eager", action="store_true",
                        help="run the targets eagerly (quicker starts; vLLM compiles them)")
    args = parser.parse_args()
    target = _testbed()
    checkpoints = bench_checkpoints(target)
    speculators = [parse_speculator("none", checkpoints)]
    speculators += [parse_variant(name, words, f"ptp:k={args.k}", checkpoints)
                    for name, *words in args.variant]
    questions = load_questions(per_category=args.per_category)
    stop_engines_on_sigterm()
    raw = run_bench(str(target), questions, speculators, [Mode.parse(m) for m in args.modes],
                    args.max_tokens, {**BENCH_ENGINE_KWARGS, "enforce_eager": args.enforce_eager})
    command = shlex.join(["python", "-m", "benchmarks.env_ab", *sys.argv[1:]])
    print(write_results(raw, args.out, command).read_text())


if __name__ == "__main__":
    main()
