"""Running the compiled CPU kernels with one instruction set for the length of a test."""

import pytest
import torch

from vllm_ptp import ops


def use_cpu_isa(isa: str):
    """Fixture body: the kernels run `isa` while the test runs (skipped where the CPU lacks
    it), the previous ISA after."""
    if not ops.compiled():
        pytest.skip("compiled ops not built")
    if isa not in ops.supported_cpu_isas():
        pytest.skip(f"no {isa} here")
    kernels = torch.ops.vllm_ptp
    previous = kernels.cpu_isa()
    kernels.set_cpu_isa(isa)
    yield isa
    kernels.set_cpu_isa(previous)
