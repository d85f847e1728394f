"""`vllm-ptp`: prepare-testbed, init-checkpoint, demo, pregenerate, train, eval, bench, serve,
serve-ray."""

import argparse
import sys
from pathlib import Path

from vllm_ptp.testbed import home_dir


def _default_checkpoint(target: Path) -> Path:
    """The shipped trained checkpoint when present, else an untrained one (made once)."""
    from vllm_ptp.checkpoint import init_checkpoint
    from vllm_ptp.data import SHIPPED_CHECKPOINT

    if (SHIPPED_CHECKPOINT / "config.json").is_file():
        return SHIPPED_CHECKPOINT
    untrained = home_dir() / "smollm2-135m-instruct-ptp-untrained"
    if not (untrained / "config.json").is_file():
        init_checkpoint(target, untrained)
    return untrained


def bench_checkpoints(
    target: Path, ptp: str | None = None, independent: str | None = None,
    shallow: str | None = None,
) -> dict[str, Path | None]:
    """The checkpoint of each PTP-family speculator kind: the given one, else the shipped one
    (None where none is shipped; an untrained PTP checkpoint if no PTP one is)."""
    from vllm_ptp.data import SHIPPED_INDEPENDENT_CHECKPOINT, SHIPPED_SHALLOW_CHECKPOINT

    def given_or_shipped(given: str | None, path: Path) -> Path | None:
        if given:
            return Path(given)
        return path if (path / "config.json").is_file() else None

    return {
        "ptp": Path(ptp) if ptp else _default_checkpoint(target),
        "independent": given_or_shipped(independent, SHIPPED_INDEPENDENT_CHECKPOINT),
        "shallow": given_or_shipped(shallow, SHIPPED_SHALLOW_CHECKPOINT),
    }


def _testbed() -> Path:
    from vllm_ptp.testbed import prepare_testbed

    return prepare_testbed()


def cmd_prepare_testbed(args: argparse.Namespace) -> None:
    from vllm_ptp.testbed import prepare_testbed

    print(prepare_testbed(force=args.force))


def cmd_init_checkpoint(args: argparse.Namespace) -> None:
    from vllm_ptp.checkpoint import init_checkpoint

    overrides = {"lora_rank": args.lora_rank, "max_k": args.max_k, "default_k": args.k,
                 "num_draft_layers": args.draft_layers}
    if args.u_embedding:
        overrides["u_embedding"] = args.u_embedding
    print(init_checkpoint(args.target, args.out, **overrides))


def cmd_demo(args: argparse.Namespace) -> None:
    from vllm_ptp.data import specbench_first_turns
    from vllm_ptp.demo import report, run_demo
    target = Path(args.target) if args.target else _testbed()
    checkpoint = Path(args.ptp) if args.ptp else _default_checkpoint(target)
    chats = [q["messages"] for q in specbench_first_turns(args.num_prompts)]
    print(f"target: {target}\nPTP checkpoint: {checkpoint}\nprompts: {len(chats)}, k={args.k}")
    baseline, ptp = run_demo(
        target, checkpoint, chats, args.k, args.max_tokens, args.temperature, args.max_num_seqs
    )
    print(report(baseline, ptp, greedy=args.temperature == 0))


def cmd_pregenerate(args: argparse.Namespace) -> None:
    from vllm_ptp.train.pregenerate import pregenerate

    target = args.target or str(_testbed())
    print(pregenerate(target, args.prompts, args.out, args.samples_per_prompt,
                      not args.no_greedy, args.max_tokens, args.limit))


def _load_target(target: str | None):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_ptp.testbed import TESTBED_HUB_ID

    name, path = (target, target) if target else (TESTBED_HUB_ID, str(_testbed()))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return name, model, AutoTokenizer.from_pretrained(path)


def _sequences(args, tokenizer, max_len: int):
    from vllm_ptp.train.data import is_validation, load_completions, load_text

    if args.text:
        sequences = load_text(args.text, tokenizer, max_len)
    else:
        sequences = load_completions(args.data, max_len)
    train = [s for s in sequences if not is_validation(s.source_id)]
    val = [s for s in sequences if is_validation(s.source_id)]
    return train, val


def cmd_train(args: argparse.Namespace) -> None:
    from vllm_ptp.train.distill import TrainConfig, train
    from vllm_ptp.train.pregenerate import SAMPLED_TRANSFORM
    from vllm_ptp.train.report import write_report

    cfg = TrainConfig(
        steps=args.steps, k=args.k, windows=args.windows, lr=args.lr, grad_accum=args.grad_accum,
        lora_rank=args.lora_rank, draft_layers=args.draft_layers, u_embedding=args.u_embedding,
        dtype=args.dtype, max_len=args.max_len, seed=args.seed, stop_at=args.stop_at,
        init_from=args.init_from, dependency_head=args.dependency_head,
        dependency_candidates=args.dependency_candidates, head_only=args.head_only,
    )
    target, model, tokenizer = _load_target(args.target)
    train_seqs, val_seqs = _sequences(args, tokenizer, cfg.max_len)
    print(f"{len(train_seqs)} training sequences, {len(val_seqs)} held out")
    sampling = None if args.text else SAMPLED_TRANSFORM
    history = train(model, target, train_seqs, val_seqs, args.out, cfg, sampling)
    print(write_report(args.out, history))


def cmd_eval(args: argparse.Namespace) -> None:
    from vllm_ptp.checkpoint import load_checkpoint
    from vllm_ptp.config import TargetIdentity
    from vllm_ptp.models.target import from_hf_llama
    from vllm_ptp.train.distill import evaluate

    target, model, tokenizer = _load_target(args.target)
    model.eval().requires_grad_(False)
    drafter = load_checkpoint(args.ptp, TargetIdentity.from_hf_config(model.config))
    drafter.bind_target(from_hf_llama(model))
    _, val_seqs = _sequences(args, tokenizer, args.max_len)
    for k in args.k:
        result = evaluate(drafter, model, val_seqs[: args.num_sequences], k, 16, seed=1)
        per_position = " ".join(f"{a:.2f}" for a in result["per_position"])
        print(
            f"k={k}: teacher-forced tau = {result['tau']:.3f} (greedy "
            f"{result.get('tau_greedy', float('nan')):.3f}, sampled "
            f"{result.get('tau_sampled', float('nan')):.3f}); acceptance by position: "
            f"{per_position}"
        )


def cmd_bench(args: argparse.Namespace) -> None:
    import shlex

    from benchmarks.specbench import (
        BENCH_ENGINE_KWARGS,
        Mode,
        load_questions,
        parse_speculator,
        run_bench,
        stop_engines_on_sigterm,
    )
    from benchmarks.specbench_report import write_results

    target = Path(args.target) if args.target else _testbed()
    checkpoints = bench_checkpoints(target, args.ptp, args.independent, args.shallow)
    # By default every speculator whose checkpoint exists; named ones must have theirs.
    chosen = args.speculators or [
        s for s in BENCH_SPECULATORS if checkpoints.get(s.split(":")[0], True) is not None
    ]
    speculators = [parse_speculator(s, checkpoints) for s in chosen]
    questions = load_questions(args.data, args.limit, args.categories, args.per_category)
    modes = [Mode.parse(m) for m in args.modes]
    print(f"target: {target}\nspeculators: {', '.join(s.name for s in speculators)}\n"
          f"questions: {len(questions)}, modes: {', '.join(m.name for m in modes)}")
    stop_engines_on_sigterm()
    engine_kwargs = {**BENCH_ENGINE_KWARGS, "enforce_eager": args.enforce_eager}
    if args.dtype:
        engine_kwargs["dtype"] = args.dtype
    raw = run_bench(str(target), questions, speculators, modes, args.max_tokens, engine_kwargs,
                    engine_starts=args.engine_starts)
    command = shlex.join(["vllm-ptp", *sys.argv[1:]])
    print(write_results(raw, args.out, command).read_text())


def cmd_serve(args: argparse.Namespace, rest: list[str]) -> None:
    # vLLM's own CLI; the plugin adds --speculative-model (alias of --spec-model) to it.
    from vllm_ptp.patches import patch_vllm_cpu_version

    patch_vllm_cpu_version.apply()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", "serve", *rest]
    vllm_main()


def cmd_serve_ray(args: argparse.Namespace) -> None:
    import signal

    import ray
    from ray import serve

    from vllm_ptp.ray_serve import build_ptp_app, local_ray_cpus, run_ptp_app

    target = Path(args.target) if args.target else _testbed()
    checkpoint = Path(args.ptp) if args.ptp else _default_checkpoint(target)
    # Ray first: building the app would otherwise start a default local Ray.
    if args.address:
        ray.init(address=args.address)
    else:
        ray.init(num_cpus=local_ray_cpus(args.num_replicas))
    app = build_ptp_app(target, checkpoint, args.k, args.num_replicas,
                        threads_per_replica=args.threads_per_replica)  # validates the checkpoint
    seconds = run_ptp_app(app, args.host, args.port, args.proxy_location)
    print(f"{args.num_replicas} replica(s) serving {target.name} with PTP ({checkpoint}) after "
          f"{seconds:.0f} s: http://{args.host}:{args.port}/v1 (Ctrl-C stops)")
    # Stop on SIGINT and SIGTERM alike, also when started in the background (SIGINT ignored).
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.default_int_handler)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()


BENCH_SPECULATORS = [
    "none", "ngram", "ptp:k=4", "ptp:k=8", "ptp:k=16", "independent:k=8", "shallow:k=8"
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-ptp", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare-testbed", help="build the SmolLM2-135M-Instruct HF directory")
    p.add_argument("--force", action="store_true", help="rebuild even if present")
    p.set_defaults(func=cmd_prepare_testbed)

    p = sub.add_parser("init-checkpoint", help="write an untrained PTP checkpoint for a target")
    p.add_argument("--target", required=True, help="target HF model directory")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--draft-layers", type=int,
                   help="run only the target's top N layers in the drafter (default: all)")
    p.add_argument("--max-k", type=int, default=16)
    p.add_argument("--k", type=int, default=8, help="default number of speculative tokens")
    p.add_argument("--u-embedding", choices=["interpolated", "constant"])
    p.set_defaults(func=cmd_init_checkpoint)

    p = sub.add_parser("demo", help="PTP vs no speculation on Spec-Bench prompts (one run)")
    p.add_argument("--target", help="target model (default: the SmolLM2 testbed)")
    p.add_argument("--ptp", help="PTP checkpoint (default: the shipped one)")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--max-num-seqs", type=int, default=1,
                   help="cap the batch (default 1: one request at a time, the latency case; at 8 "
                   "concurrent requests the two testbed cores are busy and PTP is slower)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("pregenerate", help="teacher completions with vLLM (resumable)")
    p.add_argument("--target", help="target model (default: the SmolLM2 testbed)")
    p.add_argument("--prompts", required=True, help="JSONL with id and prompt fields")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--samples-per-prompt", type=int, default=1)
    p.add_argument("--no-greedy", action="store_true", help="skip the greedy completion")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--limit", type=int, help="use only the first N prompts")
    p.set_defaults(func=cmd_pregenerate)

    def data_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--target", help="target model (default: the SmolLM2 testbed)")
        source = p.add_mutually_exclusive_group(required=True)
        source.add_argument("--data", help="pregenerated teacher completions directory")
        source.add_argument("--text", help="raw text file (teacher-free training)")

    p = sub.add_parser("train", help="distil (or teacher-free train) a PTP drafter")
    data_args(p)
    p.add_argument("--out", required=True, help="checkpoint directory (resumed if present)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--windows", type=int, default=32, help="windows per sequence per step")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--draft-layers", type=int,
                   help="run only the target's top N layers in the drafter (default: all)")
    p.add_argument("--u-embedding", choices=["interpolated", "constant"], default="interpolated")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--max-len", type=int, default=640)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop-at", type=int, help="end this run at that step; rerun to resume")
    p.add_argument("--init-from", help="start from this PTP checkpoint's weights (e.g. to "
                   "continue training on more data)")
    p.add_argument("--dependency-head", type=int, metavar="WIDTH",
                   help="add a dependency head of this width: later drafts re-ranked knowing "
                   "the draft before each")
    p.add_argument("--dependency-candidates", type=int, default=8,
                   help="tokens per draft the dependency head re-ranks")
    p.add_argument("--head-only", action="store_true",
                   help="train only the dependency head (with --init-from a trained drafter)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="teacher-forced accepted length, without vLLM")
    data_args(p)
    p.add_argument("--ptp", required=True, help="PTP checkpoint")
    p.add_argument("--k", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--num-sequences", type=int, default=48)
    p.add_argument("--max-len", type=int, default=640)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="Spec-Bench: speculators side by side in one vLLM run")
    p.add_argument("--target", help="target model (default: the SmolLM2 testbed)")
    p.add_argument("--ptp", help="PTP checkpoint (default: the shipped one)")
    p.add_argument("--independent", help="checkpoint of the u-ignoring ablation drafter "
                   "(default: the shipped one)")
    p.add_argument("--shallow", help="checkpoint of a shallow PTP drafter (default: the shipped "
                   "one)")
    p.add_argument("--data", help="Spec-Bench-format JSONL (default: specbench_dev.jsonl)")
    p.add_argument("--limit", type=int, help="only the first N questions")
    p.add_argument("--categories", nargs="+", help="only these categories")
    p.add_argument("--per-category", type=int, help="only the first N questions of each category")
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per turn")
    p.add_argument(
        "--speculators", nargs="+",
        help="none | ngram[:k=4,min=1,max=3] | ptp[:k=8] | independent[:k=8] | shallow[:k=8]; the "
        f"first must be none (default: those of {' '.join(BENCH_SPECULATORS)} whose "
        "checkpoints exist)",
    )
    p.add_argument("--modes", nargs="+",
                   default=["greedy-b1", "greedy-b8", "sampled-b1", "sampled-b8"],
                   help="greedy-bN / sampled-bN (N concurrent requests)")
    p.add_argument("--engine-starts", type=int, default=2,
                   help="start the engines N times, every other time in reverse order, and deal "
                   "the chunks out over the start-ups: the same engine settings run a few "
                   "percent apart in different processes (1: quicker)")
    p.add_argument("--enforce-eager", action="store_true",
                   help="run the targets eagerly: engines start in ~20 s, not ~90 s, but no "
                   "speculation runs slower than with vLLM's default torch.compile")
    p.add_argument("--dtype", choices=["float32", "bfloat16"],
                   help="every engine's dtype (default float32, the testbed's; bfloat16 is "
                   "faster where the CPU has AMX, but vLLM's bf16 GEMMs round differently at "
                   "1 and at several rows, so greedy outputs may part from no speculation's)")
    p.add_argument("--out", default="benchmarks/results", help="results directory")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "serve", help="`vllm serve` with the PTP plugin (accepts --speculative-model CKPT)",
        add_help=False,
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("serve-ray", help="OpenAI-compatible Ray Serve app, N PTP replicas")
    p.add_argument("--target", help="target model (default: the SmolLM2 testbed)")
    p.add_argument("--ptp", help="PTP checkpoint (default: the shipped one)")
    p.add_argument("--k", type=int, help="speculative tokens (default: the checkpoint's)")
    p.add_argument("--num-replicas", type=int, default=1)
    p.add_argument("--threads-per-replica", type=int, default=1, help="CPU threads per engine")
    p.add_argument("--address", help="Ray cluster (e.g. auto); default: start a local Ray")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--proxy-location", choices=["EveryNode", "HeadOnly"], default="EveryNode")
    p.set_defaults(func=cmd_serve_ray)
    return parser


def main() -> None:
    args, rest = build_parser().parse_known_args()
    if args.func is cmd_serve:
        cmd_serve(args, rest)
    elif rest:
        build_parser().error(f"unrecognized arguments: {' '.join(rest)}")
    else:
        args.func(args)


if __name__ == "__main__":
    main()
