"""The drafter reads context K/V exactly as vLLM's CPU attention op writes them."""

import numpy as np
import pytest
import torch
import vllm._custom_ops as ops
from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

from vllm_ptp.proposer import PagedContext, split_cpu_kv_cache


class Layer:  # the two attributes PagedContext reads from vLLM's Attention layer
    def __init__(self, kv_cache, isa):
        self.kv_cache, self.isa = kv_cache, isa


class BlockTable:  # vLLM's BlockTable fields PagedContext reads
    def __init__(self, rows, block_size):
        self.block_size = block_size
        self.block_table = type("Buffer", (), {"np": np.array(rows, dtype=np.int32)})


@pytest.mark.parametrize("block_size", [16, 32])
def test_gathered_context_equals_what_vllm_wrote(block_size):
    isa = _get_attn_isa(torch.float32, block_size, 64, "auto")
    heads, head_dim, num_blocks = 3, 64, 6
    cache = torch.zeros(num_blocks, heads, block_size, 2 * head_dim)
    key_cache, value_cache = cache.view(num_blocks, heads, 2 * block_size, head_dim).chunk(2, 2)
    # Two requests whose blocks are scattered: [4, 1, ...] and [2, 5, ...].
    rows = [[4, 1, 0], [2, 5, 0]]
    lengths = [block_size + 5, 2 * block_size - 3]
    keys, values = [], []
    for row, length in zip(rows, lengths):
        k, v = torch.randn(length, heads, head_dim), torch.randn(length, heads, head_dim)
        slots = torch.tensor([row[t // block_size] * block_size + t % block_size
                              for t in range(length)])
        ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, slots, isa)
        keys.append(k)
        values.append(v)
    context = PagedContext([Layer(cache, isa)], BlockTable(rows, block_size), np.array([0, 1]),
                           max(lengths))
    got_k, got_v = context(0)  # [N, heads, L, head_dim]
    for i, length in enumerate(lengths):
        assert torch.equal(got_k[i, :, :length], keys[i].transpose(0, 1))
        assert torch.equal(got_v[i, :, :length], values[i].transpose(0, 1))
    assert split_cpu_kv_cache(cache, block_size)[0].shape == (num_blocks, heads, head_dim,
                                                               block_size)
