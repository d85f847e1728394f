"""The drafter reads context K/V exactly as vLLM's CPU attention op writes them, and attends
to them in place as torch's attention would over a gathered copy."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import vllm._custom_ops as ops
from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

from tests.cpu_isa import use_cpu_isa
from vllm_ptp import ops as ptp_ops
from vllm_ptp.config import PTPCheckpointError
from vllm_ptp.models.attention import draft_attention
from vllm_ptp.proposer import PagedContext, check_kv_cache_dtype


class Layer:  # the two attributes PagedContext reads from vLLM's Attention layer
    def __init__(self, kv_cache, isa):
        self.kv_cache, self.isa = kv_cache, isa


class BlockTable:  # vLLM's BlockTable fields PagedContext reads
    def __init__(self, rows, block_size):
        self.block_size = block_size
        self.block_table = type("Buffer", (), {"np": np.array(rows, dtype=np.int32)})


@pytest.fixture(params=ptp_ops.CPU_ISAS)
def isa(request):
    """The fused attention kernel (AVX-512 or AVX2), or gathered K/V and torch's attention."""
    yield from use_cpu_isa(request.param)


@pytest.fixture(params=["avx512", "avx2"])
def kernel_isa(request):
    """The fused attention kernel's SIMD paths."""
    yield from use_cpu_isa(request.param)


@pytest.mark.parametrize("block_size", [16, 32])
def test_context_attention_reads_what_vllm_wrote(block_size, isa):
    """Attention over the paged cache equals torch's attention over the K/V vLLM wrote there."""
    attn_isa = _get_attn_isa(torch.float32, block_size, 64, "auto")
    check_context_attention(attn_isa, torch.float32, block_size, tolerance=1e-5)


@pytest.mark.skipif(not torch.cpu._is_amx_tile_supported(), reason="vLLM uses AMX attention "
                    "only on CPUs with AMX")
@pytest.mark.parametrize("block_size", [32, 64])
def test_context_attention_reads_vllms_amx_packed_cache(block_size, isa):
    """With bf16 on a CPU with AMX, vLLM packs its cache for AMX tiles; the drafter reads it."""
    attn_isa = _get_attn_isa(torch.bfloat16, block_size, 64, "auto")
    assert attn_isa == "amx"
    check_context_attention(attn_isa, torch.bfloat16, block_size, tolerance=1e-2)


@pytest.mark.parametrize("cache_dtype", ["fp8", "fp8_e5m2", "float16"])
def test_a_cache_in_another_dtype_than_the_model_is_refused(cache_dtype):
    config = SimpleNamespace(cache_config=SimpleNamespace(cache_dtype=cache_dtype),
                             model_config=SimpleNamespace(dtype=torch.bfloat16))
    with pytest.raises(PTPCheckpointError, match=f"kv_cache_dtype='{cache_dtype}' is not "
                       "supported with PTP.*kv_cache_dtype='auto'"):
        check_kv_cache_dtype(config)


@pytest.mark.parametrize("cache_dtype", ["auto", "bfloat16"])
def test_a_cache_in_the_models_dtype_is_served(cache_dtype):
    check_kv_cache_dtype(SimpleNamespace(cache_config=SimpleNamespace(cache_dtype=cache_dtype),
                                         model_config=SimpleNamespace(dtype=torch.bfloat16)))


def check_context_attention(attn_isa: str, dtype: torch.dtype, block_size: int,
                            tolerance: float) -> None:
    heads, kv_heads, head_dim, num_blocks, q_len = 9, 3, 64, 6, 5
    # Two requests whose blocks are scattered: [4, 1, ...] and [2, 5, ...].
    rows = [[4, 1, 0], [2, 5, 0]]
    lengths = [block_size + 5, 2 * block_size - 3]
    layers, written = [], []
    for _ in range(2):
        cache = torch.zeros(num_blocks, kv_heads, block_size, 2 * head_dim, dtype=dtype)
        key_cache, value_cache = cache.view(num_blocks, kv_heads, 2 * block_size, head_dim).chunk(
            2, 2
        )
        keys, values = [], []
        for row, length in zip(rows, lengths):
            k = torch.randn(length, kv_heads, head_dim, dtype=dtype)
            v = torch.randn(length, kv_heads, head_dim, dtype=dtype)
            slots = torch.tensor([row[t // block_size] * block_size + t % block_size
                                  for t in range(length)])
            ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, slots, attn_isa)
            keys.append(k)
            values.append(v)
        layers.append(Layer(cache, attn_isa))
        written.append((keys, values))
    context = PagedContext(layers, BlockTable(rows, block_size), np.array([0, 1]),
                           torch.tensor(lengths), heads)
    mask = torch.ones(q_len, q_len, dtype=torch.bool).tril()  # rows among themselves
    for layer, (keys, values) in enumerate(written):
        qkv = torch.randn(2, q_len, heads + 2 * kv_heads, head_dim, dtype=dtype)
        got = context(layer, qkv, mask=None)  # the context derives the mask from the lengths
        for i, length in enumerate(lengths):
            k, v = keys[i].transpose(0, 1)[None], values[i].transpose(0, 1)[None]
            full_mask = torch.cat((torch.ones(q_len, length, dtype=torch.bool), mask), dim=1)
            expected = draft_attention(qkv[i : i + 1], heads, k, v, full_mask[None, None])
            torch.testing.assert_close(got[i : i + 1], expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("q_len", [1, 2, 5, 9])  # 3 rows per KV head, 6, 8 + 7, 3 * 8 + 3
@pytest.mark.parametrize("head_dim", [64, 40])  # 40: vectors cut short in every SIMD width
def test_attention_kernel_matches_the_torch_reference(dtype, q_len, head_dim, kernel_isa):
    torch.manual_seed(0)
    num_blocks, kv_heads, heads, block_size = 7, 3, 9, 16
    cache = torch.randn(num_blocks, kv_heads, block_size, 2 * head_dim).to(dtype)
    slots = torch.randint(0, num_blocks * block_size, (4, 37))
    slots[1, 30:] = -1  # past the block table: a zero key and value
    slots[2] = torch.arange(20, 57)  # runs of consecutive slots, across block boundaries
    context_lens = torch.tensor([37, 33, 20, 0])  # the last request has no context yet
    qkv = torch.randn(4, q_len, heads + 2 * kv_heads, head_dim).to(dtype)
    got = ptp_ops.paged_draft_attention(qkv, heads, cache, slots, context_lens)
    expected = ptp_ops.reference_paged_draft_attention(qkv, heads, cache, slots, context_lens)
    assert got.shape == expected.shape == (4, q_len, heads, head_dim)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)


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


def test_attention_kernel_rejects_slots_outside_the_cache(kernel_isa):
    cache, qkv = torch.zeros(2, 3, 16, 128), torch.zeros(1, 1, 15, 64)
    with pytest.raises(RuntimeError, match="outside the cache"):
        ptp_ops.paged_draft_attention(qkv, 9, cache, torch.tensor([[0, 32]]), torch.tensor([2]))
