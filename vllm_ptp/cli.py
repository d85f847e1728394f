"""`vllm-ptp`: prepare-testbed, init-checkpoint, demo, pregenerate, train, eval, serve."""

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


def _testbed() -> Path:
    from vllm_ptp.testbed import prepare_testbed

    return prepare_testbed()


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
        lora_rank=args.lora_rank, u_embedding=args.u_embedding, dtype=args.dtype,
        max_len=args.max_len, seed=args.seed, stop_at=args.stop_at,
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


def cmd_serve(args: argparse.Namespace, rest: list[str]) -> None:
    # vLLM's own CLI; the plugin adds --speculative-model (alias of --spec-model) to it.
    from vllm_ptp.patches import patch_vllm_cpu_version

    patch_vllm_cpu_version.apply()
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
    p.add_argument("--max-num-seqs", type=int, help="cap the batch (1: one request at a time)")
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
    p.add_argument("--u-embedding", choices=["interpolated", "constant"], default="interpolated")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--max-len", type=int, default=640)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop-at", type=int, help="end this run at that step; rerun to resume")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="teacher-forced accepted length, without vLLM")
    data_args(p)
    p.add_argument("--ptp", required=True, help="PTP checkpoint")
    p.add_argument("--k", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--num-sequences", type=int, default=48)
    p.add_argument("--max-len", type=int, default=640)
    p.set_defaults(func=cmd_eval)

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
