"""The drafter reads context K/V exactly as vLLM's CPU attention op writes them."""

import numpy as np
import pytest
import torch
import vllm._custom_ops as ops
from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

from vllm_ptp import ops as ptp_ops
from vllm_ptp.proposer import KVWorkspace, PagedContext


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
    heads, head_dim, num_blocks, room = 3, 64, 6, 5
    # Two requests whose blocks are scattered: [4, 1, ...] and [2, 5, ...].
    rows = [[4, 1, 0], [2, 5, 0]]
    lengths = [block_size + 5, 2 * block_size - 3]
    layers, written = [], []
    for _ in range(2):
        cache = torch.zeros(num_blocks, heads, block_size, 2 * head_dim)
        key_cache, value_cache = cache.view(num_blocks, heads, 2 * block_size, head_dim).chunk(2, 2)
        keys, values = [], []
        for row, length in zip(rows, lengths):
            k, v = torch.randn(length, heads, head_dim), torch.randn(length, heads, head_dim)
            slots = torch.tensor([row[t // block_size] * block_size + t % block_size
                                  for t in range(length)])
            ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, slots, isa)
            keys.append(k)
            values.append(v)
        layers.append(Layer(cache, isa))
        written.append((keys, values))
    context = PagedContext(layers, BlockTable(rows, block_size), np.array([0, 1]), max(lengths),
                           room, KVWorkspace())
    for layer, (keys, values) in enumerate(written):
        got_k, got_v = context(layer)  # [N, heads, L + room, head_dim]
        assert got_k.shape == (2, heads, max(lengths) + room, head_dim)
        for i, length in enumerate(lengths):
            assert torch.equal(got_k[i, :, :length], keys[i].transpose(0, 1))
            assert torch.equal(got_v[i, :, :length], values[i].transpose(0, 1))


@pytest.mark.skipif(not ptp_ops.compiled(), reason="compiled ops not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_kernel_matches_the_torch_reference(dtype):
    num_blocks, heads, block_size, head_dim, room = 7, 3, 16, 64, 9
    cache = torch.randn(num_blocks, heads, block_size, 2 * head_dim).to(dtype)
    slots = torch.randint(0, num_blocks * block_size, (4, 37))
    slots[1, 30:] = -1  # past the block table: zeros
    slots[2] = torch.arange(20, 57)  # runs of consecutive slots, across block boundaries
    got = [torch.full((4, heads, 37 + room, head_dim), 7.0, dtype=dtype) for _ in range(2)]
    expected = [torch.full_like(got[0], 7.0) for _ in range(2)]
    ptp_ops.gather_paged_kv(cache, slots, *got)
    ptp_ops.reference_gather_paged_kv(cache, slots, *expected)
    for g, e in zip(got, expected):
        assert torch.equal(g, e)  # the room after the context untouched (7.0) in both
        assert not g[1, :, 30:37].any() and (g[:, :, 37:] == 7.0).all()


@pytest.mark.skipif(not ptp_ops.compiled(), reason="compiled ops not built")
def test_gather_kernel_rejects_slots_outside_the_cache():
    cache, out = torch.zeros(2, 3, 16, 128), torch.zeros(1, 3, 2, 64)
    with pytest.raises(RuntimeError, match="outside the cache"):
        ptp_ops.gather_paged_kv(cache, torch.tensor([[0, 32]]), out, out.clone())
