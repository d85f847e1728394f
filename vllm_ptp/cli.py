"""`vllm-ptp`: prepare-testbed, init-checkpoint, demo, serve."""

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


def cmd_prepare_testbed(args: argparse.Namespace) -> None:
    from vllm_ptp.testbed import prepare_testbed

    print(prepare_testbed(force=args.force))


def cmd_init_checkpoint(args: argparse.Namespace) -> None:
    from vllm_ptp.checkpoint import init_checkpoint

    overrides = {"lora_rank": args.lora_rank, "max_k": args.max_k, "default_k": args.k}
    if args.u_embedding:
        overrides["u_embedding"] = args.u_embedding
    print(init_checkpoint(args.target, args.out, **overrides))


def cmd_demo(args: argparse.Namespace) -> None:
    from vllm_ptp.data import specbench_first_turns
    from vllm_ptp.demo import report, run_demo
    from vllm_ptp.testbed import prepare_testbed

    target = Path(args.target) if args.target else prepare_testbed()
    checkpoint = Path(args.ptp) if args.ptp else _default_checkpoint(target)
    chats = [q["messages"] for q in specbench_first_turns(args.num_prompts)]
    print(f"target: {target}\nPTP checkpoint: {checkpoint}\nprompts: {len(chats)}, k={args.k}")
    baseline, ptp = run_demo(target, checkpoint, chats, args.k, args.max_tokens, args.temperature)
    print(report(baseline, ptp))


def cmd_serve(args: argparse.Namespace, rest: list[str]) -> None:
    # vLLM's own CLI; the plugin adds --speculative-model (alias of --spec-model) to it.
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", "serve", *rest]
    vllm_main()


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
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "serve", help="`vllm serve` with the PTP plugin (accepts --speculative-model CKPT)",
        add_help=False,
    )
    p.set_defaults(func=cmd_serve)
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
