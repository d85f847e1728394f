"""Ray Serve and Ray Data with the PTP speculator on a real two-node Ray cluster on this machine.

Replicas and Ray Data workers run PTP in their own processes (the plugin comes in through its
entry point); their seeded outputs equal offline `LLM(...)` with PTP, which plain vLLM sampling
would not reproduce, so the equality also shows the speculator is active in every worker.
"""

import contextlib
import json
import os
import shutil
import signal
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from vllm import SamplingParams

from tests.e2e.ray_cluster import free_ports, local_cluster
from vllm_ptp.ray_serve import local_ray_cpus

pytestmark = pytest.mark.e2e

K = 8
MAX_TOKENS = 48
SAMPLED = {"temperature": 0.7, "top_p": 0.95, "max_tokens": MAX_TOKENS}
REQUEST_TIMEOUT = 180  # seconds per HTTP attempt
MAX_ATTEMPTS = 5
MODEL = "smollm2-135m-instruct"  # the app's model id: the target directory's name
DEPLOYMENT = f"LLMServer:{MODEL}"
REPLICA_TITLE = f"ray::ServeReplica:default:{DEPLOYMENT}"
ENGINE_TITLE = "VLLM::EngineCore"


def test_cluster_is_torn_down_when_the_body_fails():
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths
    try:
        with pytest.raises(RuntimeError, match="test body failed"):
            with local_cluster(temp_dir) as cluster:
                assert len(cluster.nodes) == 2 and cluster.processes()
                raise RuntimeError("test body failed")
        assert cluster.processes() == []
        assert all(node.poll() is not None for node in cluster.nodes)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    try:
        # Logical CPUs for exactly one replica a node: the two replicas land on distinct nodes.
        with local_cluster(temp_dir, num_cpus_per_node=local_ray_cpus(1)) as cluster:
            ray.init(address=cluster.address, log_to_driver=False)
            try:
                assert sum(node["Alive"] for node in ray.nodes()) == 2
                yield cluster
            finally:
                ray.shutdown()
        assert cluster.processes() == [], "Ray or vLLM processes outlived the cluster"
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def chats(specbench_chats):
    return specbench_chats[:6]


def request_params(i: int) -> dict:
    """Requests alternate greedy and seeded sampling."""
    return {"temperature": 0.0, "max_tokens": MAX_TOKENS} if i % 2 == 0 else {**SAMPLED, "seed": i}


@pytest.fixture(scope="module")
def offline_text(engine, chats):
    params = [SamplingParams(**request_params(i)) for i in range(len(chats))]
    return [o.outputs[0].text for o in engine(K).chat(chats, params)]


def processes_named(cluster, prefix: str) -> list[int]:
    """The cluster's processes whose title (Ray and vLLM set one) starts with `prefix`."""
    pids = []
    for pid in cluster.processes():
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(prefix.encode()):
                pids.append(pid)
    return pids


def chat(base: str, messages: list[dict], params: dict,
         first_token: threading.Event | None = None) -> str | None:
    """One streamed chat request: its text, or None when it failed or broke off before the end."""
    body = {"model": MODEL, "messages": messages, "stream": True, **params}
    text, finished = [], False
    try:
        with requests.post(f"{base}/v1/chat/completions", json=body, stream=True,
                           timeout=REQUEST_TIMEOUT) as response:
            if response.status_code != 200:
                return None
            for line in response.iter_lines():
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                choices = json.loads(line[6:]).get("choices")
                if not choices:  # an error event in place of a chunk
                    return None
                choice = choices[0]
                text.append(choice["delta"].get("content") or "")
                finished = finished or choice["finish_reason"] is not None
                if first_token is not None:
                    first_token.set()
    except (requests.RequestException, ValueError):  # refused, cut off, or a torn chunk
        return None
    return "".join(text) if finished else None


class TestServe:
    @pytest.fixture(scope="class")
    def serve_app(self, ray_cluster, target_dir, ptp_checkpoint):
        """The OpenAI-compatible app, 2 PTP replicas (one per node); yields its base URL."""
        from ray import serve

        from vllm_ptp.ray_serve import build_ptp_app, run_ptp_app

        port = free_ports(1)[0]
        app = build_ptp_app(target_dir, ptp_checkpoint, K, num_replicas=2)
        try:  # a failed deployment must not leave replicas holding the cluster's CPUs
            seconds = run_ptp_app(app, port=port, proxy_location="HeadOnly")  # one proxy
            print(f"Serve app with 2 PTP replicas serving after {seconds:.0f} s")
            yield f"http://127.0.0.1:{port}"
        finally:
            serve.shutdown()

    def test_chat_matches_offline(self, ray_cluster, serve_app, engine, chats, offline_text):
        assert len(processes_named(ray_cluster, REPLICA_TITLE)) == 2
        # Concurrent streamed requests: the router spreads them over both replicas.
        with ThreadPoolExecutor(len(chats)) as pool:
            answers = list(pool.map(lambda i: chat(serve_app, chats[i], request_params(i)),
                                    range(len(chats))))
        assert answers == offline_text
        reply = requests.post(f"{serve_app}/v1/chat/completions", timeout=REQUEST_TIMEOUT,
                              json={"model": MODEL, "messages": chats[1], **request_params(1)})
        assert reply.json()["choices"][0]["message"]["content"] == offline_text[1]
        prompt, params = "The capital of France is", {"max_tokens": 16, "temperature": 0.0}
        reply = requests.post(f"{serve_app}/v1/completions", timeout=REQUEST_TIMEOUT,
                              json={"model": MODEL, "prompt": prompt, **params})
        offline = engine(K).generate([prompt], SamplingParams(**params))[0].outputs[0].text
        assert reply.json()["choices"][0]["text"] == offline

    def test_killed_replica_loses_no_request(self, ray_cluster, serve_app, chats, offline_text):
        from ray import serve

        victim = processes_named(ray_cluster, REPLICA_TITLE)[0]
        attempts = [0] * len(chats)
        first_token = threading.Event()

        def until_complete(i: int) -> str | None:
            for _ in range(MAX_ATTEMPTS):  # the client's retry: a broken stream is re-requested
                attempts[i] += 1
                text = chat(serve_app, chats[i], request_params(i), first_token)
                if text is not None:
                    return text
                time.sleep(2)
            return None

        with ThreadPoolExecutor(len(chats)) as pool:
            futures = [pool.submit(until_complete, i) for i in range(len(chats))]
            assert first_token.wait(REQUEST_TIMEOUT)
            os.kill(victim, signal.SIGKILL)  # while the requests are streaming
            answers = [f.result() for f in futures]
        assert answers == offline_text  # every request answered once, completely, exactly
        assert sum(attempts) > len(chats), "the kill hit no request in flight"

        deadline = time.time() + 300
        while time.time() < deadline:
            replicas = processes_named(ray_cluster, REPLICA_TITLE)
            status = serve.status().applications["default"].deployments
            running = status[DEPLOYMENT].replica_states.get("RUNNING", 0)
            if len(replicas) == 2 and victim not in replicas and running == 2:
                break
            time.sleep(3)
        else:
            pytest.fail("the killed replica did not come back within 300 s")
        # The killed replica's engine went with it: one engine process per live replica.
        assert len(processes_named(ray_cluster, ENGINE_TITLE)) == 2
        assert chat(serve_app, chats[0], request_params(0)) == offline_text[0]


def test_ray_data_batch_matches_offline(ray_cluster, target_dir, ptp_checkpoint, engine,
                                        specbench_chats, tmp_path):
    from vllm_ptp.ray_batch import generate_jsonl

    chats = specbench_chats[:20]
    prompts, out = tmp_path / "prompts.jsonl", tmp_path / "out.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "messages": c}) + "\n"
                               for i, c in enumerate(chats)))
    sampling = {**SAMPLED, "max_tokens": 32}
    count = generate_jsonl(prompts, out, target_dir, ptp_checkpoint, K, sampling, seed=100,
                           num_workers=2, batch_size=5)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    offline = engine(K).chat(chats, [SamplingParams(**sampling, seed=100 + i)
                                     for i in range(len(chats))])
    assert count == 20 and [r["id"] for r in rows] == [f"q{i}" for i in range(20)]
    assert [r["completion"] for r in rows] == [o.outputs[0].text for o in offline]
    assert [r["num_tokens"] for r in rows] == [len(o.outputs[0].token_ids) for o in offline]
