"""Serve the testbed target with the PTP speculator on Ray Serve and query it over the OpenAI API
(chat, streaming chat, completions). The same app is `vllm-ptp serve-ray`.

    python examples/ray_serve_ptp.py                         # starts a local Ray
    python examples/ray_serve_ptp.py --address auto --num-replicas 2   # a running Ray cluster
"""

import argparse

import ray
from openai import OpenAI
from ray import serve

from vllm_ptp.data import SHIPPED_CHECKPOINT
from vllm_ptp.ray_serve import build_ptp_app, local_ray_cpus, run_ptp_app
from vllm_ptp.testbed import prepare_testbed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    parser.add_argument("--num-replicas", type=int, default=1)
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()

    if args.address:
        ray.init(address=args.address)
    else:
        ray.init(num_cpus=local_ray_cpus(args.num_replicas))
    app = build_ptp_app(prepare_testbed(), SHIPPED_CHECKPOINT, k=8,
                        num_replicas=args.num_replicas)
    seconds = run_ptp_app(app, port=args.port, proxy_location="HeadOnly")
    print(f"app serving after {seconds:.0f} s")
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{args.port}/v1", api_key="none")
        model = client.models.list().data[0].id
        chat = [{"role": "user", "content": "What is the capital of France?"}]
        reply = client.chat.completions.create(
            model=model, messages=chat, max_tokens=64, temperature=0.7, seed=1
        )
        print("chat:", reply.choices[0].message.content)
        stream = client.chat.completions.create(
            model=model, messages=chat, max_tokens=64, temperature=0.7, seed=1, stream=True
        )
        print("stream:", "".join(c.choices[0].delta.content or "" for c in stream if c.choices))
        completion = client.completions.create(
            model=model, prompt="The three primary colours are", max_tokens=32, temperature=0
        )
        print("completion:", completion.choices[0].text)
    finally:
        serve.shutdown()


if __name__ == "__main__":
    main()
