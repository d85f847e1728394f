"""Real vLLM engines on the SmolLM2 testbed, shared across the e2e tests (one per k)."""

import pytest

from vllm_ptp.data import SHIPPED_CHECKPOINT, specbench_first_turns
from vllm_ptp.engine import (
    TESTBED_ENGINE_KWARGS,
    allow_function_rpc,
    shutdown_engine,
    speculative_config,
)

# The tests inspect and fault-inject the engines' workers through collective_rpc.
allow_function_rpc()


@pytest.fixture(scope="session")
def ptp_checkpoint(untrained_checkpoint):
    """The shipped trained checkpoint when present (drafts get accepted), else untrained."""
    if (SHIPPED_CHECKPOINT / "config.json").is_file():
        return SHIPPED_CHECKPOINT
    return untrained_checkpoint


# Engines kept alive at once: a comparison needs two (with and without speculation); more would
# let the suite's many k values pile up gigabytes of KV cache before the Ray tests start replicas.
MAX_LIVE_ENGINES = 2


@pytest.fixture(scope="session")
def engine(target_dir, ptp_checkpoint):
    """engine(k): an `LLM` with the PTP speculator at k, or without speculation for k=None.
    The least recently used engine is shut down when a third is asked for."""
    from vllm import LLM

    engines: dict[int | None, LLM] = {}

    def get(k: int | None):
        if k in engines:
            engines[k] = engines.pop(k)  # most recently used last
        else:
            if len(engines) == MAX_LIVE_ENGINES:
                shutdown_engine(engines.pop(next(iter(engines))))
            spec = speculative_config(ptp_checkpoint, k) if k else None
            engines[k] = LLM(
                model=str(target_dir), speculative_config=spec, **TESTBED_ENGINE_KWARGS
            )
        return engines[k]

    yield get
    for llm in engines.values():
        shutdown_engine(llm)


@pytest.fixture(scope="session")
def specbench_chats():
    return [q["messages"] for q in specbench_first_turns()]
