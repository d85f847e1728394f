"""Ray Serve: vLLM's OpenAI-compatible server with the PTP speculator, N replicas (`ray.serve.llm`).

`ray.serve.llm` (Ray 2.60) runs vLLM 0.32's async engine and OpenAI serving classes unchanged;
its CPU accelerator config starts each replica's engine with vLLM's multiprocessing executor. The
plugin reaches every replica through its `vllm.general_plugins` entry point (installed package),
so the replicas need nothing but the speculative config. The checkpoint is validated here, on the
driver, so a misfit fails once with a clear error instead of in every replica.
"""

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vllm_ptp.engine import TESTBED_ENGINE_KWARGS, speculative_config

if TYPE_CHECKING:
    from ray.serve import Application
    from ray.serve.llm import LLMConfig

# Several engines share one machine on the testbed: a modest KV cache and context per replica.
RAY_ENGINE_KWARGS: dict[str, Any] = {
    **TESTBED_ENGINE_KWARGS,
    "max_model_len": 2048,
    "kv_cache_memory_bytes": 512 << 20,
}


def validate_checkpoint(target: str | Path, checkpoint: str | Path, k: int | None) -> int:
    """Check the PTP checkpoint against the target (as the speculative-config patch does in
    every engine); return the k to serve. Raises PTPCheckpointError naming the fix."""
    from transformers import AutoConfig

    from vllm_ptp.checkpoint import load_checkpoint
    from vllm_ptp.config import TargetIdentity, load_ptp_config

    k = k or load_ptp_config(checkpoint).default_k
    identity = TargetIdentity.from_hf_config(AutoConfig.from_pretrained(str(target)))
    load_checkpoint(checkpoint, identity, k)
    return k


def replica_env(threads: int) -> dict[str, str]:
    """Per-replica thread settings: vLLM's CPU auto-binding would pin every replica's engine to
    the same cores (it sees the whole machine), so replicas run unbound with `threads` threads."""
    return {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": str(threads)}


def ptp_llm_config(
    target: str | Path,
    checkpoint: str | Path,
    k: int | None = None,
    num_replicas: int = 1,
    model_id: str | None = None,
    threads_per_replica: int = 1,
    engine_kwargs: dict[str, Any] | None = None,
) -> "LLMConfig":
    """The `ray.serve.llm.LLMConfig` of a PTP-speculated model, checkpoint validated first."""
    from ray.serve.llm import LLMConfig

    checkpoint = Path(checkpoint).resolve()
    k = validate_checkpoint(target, checkpoint, k)
    return LLMConfig(
        model_loading_config={
            "model_id": model_id or Path(target).name,
            "model_source": str(Path(target).resolve()),
        },
        accelerator_config={"kind": "cpu"},
        engine_kwargs={
            **(RAY_ENGINE_KWARGS if engine_kwargs is None else engine_kwargs),
            "speculative_config": speculative_config(str(checkpoint), k),
        },
        deployment_config={"num_replicas": num_replicas},
        runtime_env={"env_vars": replica_env(threads_per_replica)},
    )


def build_ptp_app(*args, **kwargs) -> "Application":
    """An OpenAI-compatible Serve application (/v1/chat/completions, /v1/completions, streaming)
    over `ptp_llm_config(*args, **kwargs)`. Connect to Ray first: building it otherwise starts a
    default local Ray."""
    from ray.serve.llm import build_openai_app

    return build_openai_app({"llm_configs": [ptp_llm_config(*args, **kwargs)]})


def local_ray_cpus(num_replicas: int) -> int:
    """Logical CPUs a Ray started on this machine needs for `num_replicas` replicas: each holds
    2 (its actor and its engine's placement-group bundle) and Serve LLM's start-up task 1 more.
    They are scheduling tokens only; the engines' threads come from `replica_env`."""
    return 3 * num_replicas


def run_ptp_app(
    app: "Application", host: str = "127.0.0.1", port: int = 8000, proxy_location: str = "EveryNode"
) -> float:
    """Deploy `app` on the connected Ray cluster behind http://host:port; return the seconds
    until every replica's engine serves (`serve.run` waits for that)."""
    from ray import serve

    serve.start(proxy_location=proxy_location, http_options={"host": host, "port": port})
    started = time.perf_counter()
    serve.run(app, blocking=False)
    return time.perf_counter() - started
