"""Batch chat generation with Ray Data: vLLM workers with the PTP speculator over a JSONL prompt
file ({"id", "prompt"} or {"id", "messages"} per line), results to JSONL in input order.

    python examples/ray_batch_ptp.py --prompts ../shared/data/train_prompts.jsonl --limit 20 \\
        --out /tmp/ptp_batch.jsonl
    python examples/ray_batch_ptp.py --address auto ...      # a running Ray cluster
"""

import argparse
import time

import ray

from vllm_ptp.data import SHIPPED_CHECKPOINT
from vllm_ptp.ray_batch import generate_jsonl
from vllm_ptp.testbed import prepare_testbed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompts", required=True, help="input JSONL")
    parser.add_argument("--out", required=True, help="output JSONL")
    parser.add_argument("--limit", type=int, help="only the first N prompts")
    parser.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    parser.add_argument("--num-workers", type=int, default=2, help="vLLM engines")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=0, help="row i is sampled with seed + i")
    args = parser.parse_args()

    ray.init(address=args.address)
    started = time.perf_counter()
    count = generate_jsonl(
        args.prompts, args.out, prepare_testbed(), SHIPPED_CHECKPOINT, k=8,
        sampling={"temperature": args.temperature, "top_p": 0.95, "max_tokens": args.max_tokens},
        seed=args.seed, num_workers=args.num_workers, limit=args.limit,
    )
    print(f"{count} completions written to {args.out} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
