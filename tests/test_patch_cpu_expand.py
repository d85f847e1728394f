import pytest
import torch
from vllm.v1.sample import rejection_sampler

from vllm_ptp.plugin import register


@pytest.fixture(scope="module", autouse=True)
def plugin():
    register()


CU_NUM_TOKENS = torch.tensor([3, 3, 5], dtype=torch.int32)  # 3 drafts, none, 2


def test_float_settings_reach_every_draft_token():
    temperature = torch.tensor([0.7, 0.8, 0.9])
    expanded = rejection_sampler.expand_batch_to_tokens(temperature, CU_NUM_TOKENS, 5)
    assert expanded.dtype == torch.float32
    assert expanded.tolist() == pytest.approx([0.7, 0.7, 0.7, 0.9, 0.9])


def test_int32_settings_keep_their_dtype_and_the_replacement():
    top_k = torch.tensor([-1, 40, 20], dtype=torch.int32)
    expanded = rejection_sampler.expand_batch_to_tokens(
        top_k, CU_NUM_TOKENS, 5, replace_from=-1, replace_to=50
    )
    assert expanded.dtype == torch.int32
    assert expanded.tolist() == [50, 50, 50, 20, 20]


def test_greedy_temperature_becomes_one_as_vllm_rewrites_it():
    temperature = torch.tensor([rejection_sampler.GREEDY_TEMPERATURE, 0.7, 0.5])
    expanded = rejection_sampler.expand_batch_to_tokens(
        temperature, CU_NUM_TOKENS, 5,
        replace_from=rejection_sampler.GREEDY_TEMPERATURE, replace_to=1,
    )
    assert expanded.tolist() == pytest.approx([1.0, 1.0, 1.0, 0.5, 0.5])
