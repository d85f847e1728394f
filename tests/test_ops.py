"""The compiled ops (csrc/) against their torch references: exact equality, awkward sizes.

Every sampling check runs the CPU kernel with each SIMD path the CPU has (AVX-512, AVX2) and with
its scalar fallback, and the CUDA kernel's block algorithm on the host over an emulated grid.
"""

import pytest
import torch

from tests.cpu_isa import use_cpu_isa
from tests.sampling_rows import rows_of
from vllm_ptp import ops, rng, sampling
from vllm_ptp.models.gated_lora_llama import UEmbedding
from vllm_ptp.rng import GREEDY_U

pytestmark = pytest.mark.skipif(not ops.compiled(), reason="compiled ops not built")
kernels = torch.ops.vllm_ptp
ISAS = ops.supported_cpu_isas() if ops.compiled() else []
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(params=ISAS)
def isa(request):
    yield from use_cpu_isa(request.param)


@pytest.fixture(params=[isa for isa in ISAS if isa != "scalar"])
def simd_isa(request):
    """The ISAs of the kernels that have no scalar version."""
    yield from use_cpu_isa(request.param)


def compiled_sample(logits, rows):
    return kernels.sample(logits, rows.temperature, rows.top_k, rows.top_p, rows.min_p, rows.u)


def emulated_cuda_sample(logits, rows, threads):
    return kernels.emulated_cuda_sample(
        logits, rows.temperature, rows.top_k, rows.top_p, rows.min_p, rows.u, threads
    )


def assert_same_tokens(logits, rows, emulate_threads=(1, 7, 64)):
    expected = sampling.sample(logits, rows)
    assert compiled_sample(logits, rows).tolist() == expected.tolist()
    for threads in emulate_threads:
        assert emulated_cuda_sample(logits, rows, threads).tolist() == expected.tolist()
    return expected


def test_compiled_ops_are_active():
    assert ops.compiled("cpu")
    assert kernels.cpu_isa() == ops.supported_cpu_isas()[0]  # the widest this CPU has
    assert "scalar" in ops.supported_cpu_isas()
    assert not kernels.cpu_isa_supported("sse9")
    with pytest.raises(RuntimeError, match="must be 'scalar', 'avx2' or 'avx512'"):
        kernels.set_cpu_isa("sse9")


# ---- uniforms ----------------------------------------------------------------------------------


def test_uniforms_are_bit_identical():
    torch.manual_seed(0)
    seeds = torch.randint(-(2**63), 2**63 - 1, (5000,))
    positions = torch.randint(-(2**40), 2**62, (5000,))
    assert torch.equal(ops.uniforms(seeds, positions), rng.uniforms(seeds, positions))
    # Broadcasting, as the proposer calls it: one seed per request, k positions each.
    seeds, positions = torch.tensor([[3], [1 << 40]]), torch.arange(16)[None]
    assert torch.equal(ops.uniforms(seeds, positions), rng.uniforms(seeds, positions))
    assert ops.uniforms(torch.zeros(0), torch.zeros(0)).shape == (0,)


# ---- sampling ----------------------------------------------------------------------------------

CONFIGS = [  # temperature, top_k, top_p, min_p
    (1.0, 0, 1.0, 0.0), (0.7, 0, 0.95, 0.0), (1.3, 5, 1.0, 0.0), (0.5, 20, 0.8, 0.0),
    (1.0, 1, 1.0, 0.0), (1.0, 0, 1e-6, 0.0), (0.9, 0, 1.0, 0.1), (0.0, 0, 1.0, 0.0),
    (1e-5, 0, 1.0, 0.0), (2.0, 50, 0.9, 0.05),
]


@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("vocab", [1, 15, 17, 1000, 4099])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sample_matches_reference(isa, config, vocab, dtype):
    torch.manual_seed(vocab)
    num_rows = 37
    logits = (torch.randn(num_rows, vocab) * 4).to(dtype)
    assert_same_tokens(logits, rows_of(num_rows, *config))


@pytest.mark.parametrize("vocab", [49152, 128256])
def test_sample_matches_reference_at_model_vocab_sizes(isa, vocab):
    torch.manual_seed(1)
    num_rows = 64
    logits = torch.randn(num_rows, vocab) * 3
    # Each row its own transform: greedy, plain, top-k, top-p, min-p and mixes.
    config = [CONFIGS[i % len(CONFIGS)] for i in range(num_rows)]
    temperature, top_k, top_p, min_p = (torch.tensor(c) for c in zip(*config))
    rows = rows_of(num_rows, temperature, top_k, top_p, min_p)
    expected = sampling.sample(logits, rows)
    assert compiled_sample(logits, rows).tolist() == expected.tolist()
    assert compiled_sample(logits.to(torch.bfloat16), rows).tolist() == sampling.sample(
        logits.to(torch.bfloat16), rows
    ).tolist()


@pytest.mark.parametrize("num_rows", [1, 2, 3, 255, 256])
def test_any_number_of_rows(isa, num_rows):
    torch.manual_seed(num_rows)
    logits = torch.randn(num_rows, 333) * 2
    assert_same_tokens(logits, rows_of(num_rows, 0.8, 0, 0.9), emulate_threads=(32,))


def test_empty_batch():
    rows = rows_of(0)
    assert compiled_sample(torch.zeros(0, 50), rows).shape == (0,)
    output, accepted = kernels.sample_and_verify(
        torch.zeros(0, 50), rows.temperature, rows.top_k, rows.top_p, rows.min_p, rows.u,
        torch.zeros(0, 4, dtype=torch.long), torch.zeros(0, dtype=torch.long),
    )
    assert output.shape == (0, 5) and accepted.shape == (0,)


def test_ties_at_a_cdf_boundary_go_to_the_next_token(isa):
    logits = torch.zeros(4, 4)  # uniform: CDF boundaries at exactly 1/4, 1/2, 3/4
    tokens = assert_same_tokens(logits, rows_of(4, u=torch.tensor([0.25, 0.5, 0.75, 0.2499])))
    assert tokens.tolist() == [1, 2, 3, 0]


def test_u_at_zero_and_just_below_one_skip_zero_probability_tokens(isa):
    inf = float("inf")
    logits = torch.tensor([[-inf, 0.0, -inf, 0.0, -inf, -200.0, -inf]] * 3)
    tokens = assert_same_tokens(logits, rows_of(3, u=torch.tensor([0.0, 0.5 - 1e-7, 1 - 2**-24])))
    # -inf and underflowing tokens are never drawn; u=0 takes the first allowed token.
    assert tokens.tolist() == [1, 1, 3]


def test_rows_without_mass_fall_back_to_the_argmax(isa):
    inf = float("inf")
    logits = torch.tensor([[-inf] * 5, [1.0, inf, 0.0, inf, 2.0]])
    assert assert_same_tokens(logits, rows_of(2)).tolist() == [0, 1]


def test_top_k_cuts_through_ties_in_token_id_order(isa):
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0, 3.0, 2.0]] * 3)
    # Top-2 of four equal maxima keeps the two lowest ids (1 and 2), as a stable sort does.
    tokens = assert_same_tokens(logits, rows_of(3, top_k=2, u=torch.tensor([0.0, 0.49, 0.99])))
    assert tokens.tolist() == [1, 1, 2]
    # Top-1 is the argmax.
    assert assert_same_tokens(logits, rows_of(3, top_k=1)).tolist() == [1, 1, 1]


def test_top_k_and_top_p_with_few_tokens_of_weight(isa):
    logits = torch.full((4, 300), float("-inf"))
    logits[:, [3, 150, 299]] = torch.tensor([0.5, 2.0, 1.0])
    rows = rows_of(4, top_k=torch.tensor([10, 2, 10, 0]), top_p=torch.tensor([1.0, 1.0, 0.5, 0.7]),
                   u=torch.tensor([0.999, 0.999, 0.999, 0.999]))
    # All three kept; top-2 drops token 3; top-p 0.5 and 0.7 keep the top token (≈0.63) alone
    # or with the next (0.63 < 0.7).
    assert assert_same_tokens(logits, rows).tolist() == [299, 299, 150, 299]


def test_top_p_mass_exactly_at_the_bound(isa):
    logits = torch.zeros(2, 4)  # mass before rank 2 is exactly 0.5 of the total: dropped
    tokens = assert_same_tokens(logits, rows_of(2, top_p=0.5, u=torch.tensor([0.0, 1 - 2**-24])))
    assert tokens.tolist() == [0, 1]
    # A tiny top-p keeps only the top token.
    torch.manual_seed(0)
    logits = torch.randn(20, 1000)
    tokens = assert_same_tokens(logits, rows_of(20, top_p=1e-9))
    assert tokens.tolist() == logits.argmax(-1).tolist()


def test_temperature_near_zero(isa):
    torch.manual_seed(0)
    logits = torch.randn(30, 500) * 0.01
    greedy = assert_same_tokens(logits, rows_of(30, temperature=0.99e-5))
    assert greedy.tolist() == logits.argmax(-1).tolist()
    # Just above the greedy threshold: sampled, and in practice the argmax.
    assert assert_same_tokens(logits, rows_of(30, temperature=1e-5)).tolist() == greedy.tolist()


def test_many_equal_weights_and_extreme_logits(isa):
    torch.manual_seed(0)
    logits = torch.randint(-3, 3, (50, 777)).float() * 10  # massive ties, underflow to 0
    logits[:, 100] = 1e30
    logits[::2, 100] = -1e30
    for config in CONFIGS:
        assert_same_tokens(logits, rows_of(50, *config), emulate_threads=(16,))


# ---- fused sampling + coupled verification -----------------------------------------------------


def verify_case(num_requests, max_k, vocab, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    num_drafts = torch.randint(0, max_k + 1, (num_requests,), generator=generator)
    num_rows = int((num_drafts + 1).sum())
    logits = (torch.randn(num_rows, vocab, generator=generator) * 2).to(dtype)
    temperature = torch.where(torch.rand(num_rows, generator=generator) < 0.3, 0.0, 0.8)
    rows = rows_of(num_rows, temperature, 0, 0.95)
    target = sampling.sample(logits, rows)
    # Drafts that mostly match the target's own samples, so acceptance lengths vary.
    drafts = torch.full((num_requests, max_k), -1, dtype=torch.long)
    row = 0
    for r, n in enumerate(num_drafts.tolist()):
        drafts[r, :n] = target[row : row + n]
        wrong = torch.rand(n, generator=generator) < 0.15
        drafts[r, :n] = torch.where(wrong, (drafts[r, :n] + 1) % vocab, drafts[r, :n])
        row += n + 1
    return logits, rows, drafts, num_drafts


@pytest.mark.parametrize("max_k", [1, 4, 16])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sample_and_verify_matches_reference(isa, max_k, dtype):
    logits, rows, drafts, num_drafts = verify_case(24, max_k, 1001, dtype, seed=max_k)
    expected = sampling.sample_and_verify(logits, rows, drafts, num_drafts)
    got = kernels.sample_and_verify(
        logits, rows.temperature, rows.top_k, rows.top_p, rows.min_p, rows.u, drafts, num_drafts
    )
    assert got[0].tolist() == expected[0].tolist()
    assert got[1].tolist() == expected[1].tolist()
    assert 0 < int(expected[1].sum()) < int(num_drafts.sum())  # partial acceptance exercised


def test_sample_and_verify_refuses_a_wrong_row_count():
    logits, rows, drafts, num_drafts = verify_case(3, 2, 50)
    with pytest.raises(RuntimeError, match="sum\\(num_drafts \\+ 1\\)"):
        kernels.sample_and_verify(
            logits[1:], rows.temperature[1:], rows.top_k[1:], rows.top_p[1:], rows.min_p[1:],
            rows.u[1:], drafts, num_drafts,
        )


# ---- u-embeddings into the drafter's input buffer ----------------------------------------------


@pytest.mark.parametrize("kind,size", [("interpolated", 16), ("interpolated", 2), ("constant", 1)])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
def test_u_embeddings_written_at_the_auxiliary_slots(kind, size, weight_dtype, out_dtype):
    torch.manual_seed(size)
    hidden, k = 67, 16
    embedding = UEmbedding(kind, size, hidden).to(weight_dtype)
    seeds = torch.randint(0, 2**62, (9,))
    positions = torch.randint(0, 10_000, (9,))
    greedy = torch.rand(9) < 0.3
    expected = torch.randn(9, k + 1, hidden).to(out_dtype)
    got = expected.clone()
    ops.reference_write_u_embeddings(expected, 1, embedding, seeds, positions, greedy)
    with torch.no_grad():
        kernels.write_u_embeddings(
            got, 1, embedding.weight, embedding.greedy_vector, seeds, positions, greedy
        )
    assert torch.equal(got, expected)  # row 0 (the newest token's embedding) untouched too


def test_u_embedding_reference_is_the_drafters_embedding_of_u():
    embedding = UEmbedding("interpolated", 16, 8)
    seeds, positions, greedy = torch.tensor([5, 6]), torch.tensor([10, 20]), torch.tensor([0, 1])
    out = torch.zeros(2, 4, 8)
    ops.write_u_embeddings(out, 1, embedding, seeds, positions, greedy.bool())
    u = rng.uniforms(seeds[:, None], positions[:, None] + torch.arange(3))
    assert torch.equal(out[0, 1:], embedding(u[0]).detach())
    assert torch.equal(out[1, 1:], embedding.greedy.detach().expand(3, -1))
    assert out[:, 0].abs().sum() == 0


def test_ablation_embedding_ignores_u_and_the_greedy_marker():
    embedding = UEmbedding("constant", 1, 8)
    u = torch.tensor([[0.0, 0.3, 0.99], [GREEDY_U, GREEDY_U, GREEDY_U]])
    assert torch.equal(embedding(u).detach(), embedding.weight[0].detach().expand(2, 3, -1))
    assert set(embedding.state_dict()) == {"weight"}  # no greedy vector to learn or ship


# ---- paged KV-cache slots ----------------------------------------------------------------------


@pytest.mark.parametrize("block_size", [1, 16, 128])
def test_paged_slots_match_block_table_indexing(block_size):
    torch.manual_seed(block_size)
    table = torch.randint(0, 1000, (7, 9), dtype=torch.int32)
    batch_index = torch.tensor([6, 0, 3, 3])
    start = torch.tensor([0, 5, block_size * 9 - 3, 17])
    num_positions = block_size * 2 + 5
    got = ops.paged_slots(table, batch_index, start, num_positions, block_size)
    assert torch.equal(
        got, ops.reference_paged_slots(table, batch_index, start, num_positions, block_size)
    )
    # Spot check against the definition; positions past the table get -1.
    assert got[1, 0] == table[0, 5 // block_size] * block_size + 5 % block_size
    assert (got[2, 3:] == -1).all() and (got[2, :3] >= 0).all()
    assert ops.paged_slots(table, batch_index[:0], start[:0], 4, block_size).shape == (0, 4)


# ---- gated LoRA expand (the compact drafter GEMM's epilogue) ------------------------------------


@pytest.mark.parametrize("stacked_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 9, 72])
def test_gated_lora_expand_matches_reference(isa, stacked_dtype, rows):
    """Projections with and without a B (column 0..100 has none), odd widths, gate 0/1 rows."""
    torch.manual_seed(rows)
    widths, ranks = [100, 576, 77, 1536], [0, 32, 8, 32]
    out_features, total_rank = sum(widths), sum(ranks)
    stacked = torch.randn(rows, out_features + total_rank).to(stacked_dtype)
    gate = (torch.rand(rows) < 0.7).float()
    gate[0] = 0.0  # the newest token's row: adapters off
    lora_Bs_t, columns, rank_starts = [], [], []
    column = rank = 0
    for width, lora_rank in zip(widths, ranks):
        if lora_rank:
            lora_Bs_t.append(torch.randn(lora_rank, width) * 0.05)
            columns.append(column)
            rank_starts.append(rank)
        column, rank = column + width, rank + lora_rank
    args = (stacked, gate, lora_Bs_t, columns, rank_starts, out_features)
    got, expected = ops.gated_lora_expand(*args), ops.reference_gated_lora_expand(*args)
    assert got.dtype == torch.float32 and got.shape == (rows, out_features)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    off = gate == 0  # gated-off rows are the GEMM output itself, cast
    assert torch.equal(got[off], stacked[off, :out_features].float())


def test_gated_lora_expand_refuses_overlapping_blocks():
    b = torch.zeros(4, 8)
    with pytest.raises(RuntimeError, match="overlap"):
        kernels.gated_lora_expand(torch.zeros(2, 20), torch.ones(2), [b, b], [0, 4], [0, 4], 12)


# ---- compact-weight GEMM (fp16 or int8 drafter weights on AVX2 CPUs) --------------------------


needs_simd = pytest.mark.skipif(not ops.compiled() or not ops.simd_kernels(),
                                reason="the kernel needs AVX2")


@pytest.mark.parametrize("dtype", [torch.float16, torch.int8])
@pytest.mark.parametrize("rows", [0, 1, 5, 6, 7, 9, 10, 18, 71])
@pytest.mark.parametrize("out_features, in_features", [(1, 8), (17, 576), (100, 37)])
def test_panel_linear_matches_reference(simd_isa, dtype, rows, out_features, in_features):
    """Panels cut short (out_features not a multiple of 16), row groups of 1 to 6 (AVX2) or 9
    (AVX-512), odd and even k."""
    torch.manual_seed(rows + out_features)
    weight = torch.randn(out_features, in_features)
    packed, scales = ops.pack_panels(weight, dtype)
    assert packed.shape == ((out_features + 15) // 16, in_features, 16)
    x = torch.randn(rows, in_features)
    expected = ops.reference_panel_linear(x, packed, scales, out_features)
    # The packing is W: rounded to fp16, or to within half an int8 step of its row's scale.
    unpacked = ops.reference_panel_linear(torch.eye(in_features), packed, scales, out_features).T
    if dtype == torch.float16:
        assert torch.equal(unpacked, weight.half().float())
    else:
        step = weight.abs().amax(dim=1, keepdim=True) / 127
        assert ((unpacked - weight).abs() <= step * 0.5001).all()
    got = ops.panel_linear(x, packed, scales, out_features)
    assert got.dtype == torch.float32 and got.shape == (rows, out_features)
    # Sums of up to 576 products of size ~1 in another order (FMA).
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@needs_simd
def test_panel_linear_keeps_leading_dimensions():
    torch.manual_seed(0)
    weight, x = torch.randn(20, 8), torch.randn(2, 3, 8)
    packed, scales = ops.pack_panels(weight, torch.int8)
    got = ops.panel_linear(x, packed, scales, 20)
    assert got.shape == (2, 3, 20)
    expected = ops.reference_panel_linear(x, packed, scales, 20)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


# A projection group as the drafter serves it: widths of its projections and their adapters'
# ranks. One cuts panels mid-way (100, 77) and has a projection without an adapter; one is
# panel-aligned, as Llama's are.
LORA_GROUPS = {"cut": ([100, 576, 77, 1536], [0, 32, 8, 32]), "aligned": ([64, 32], [16, 8])}


def lora_group(
    widths: list[int], ranks: list[int], in_features: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor], ops.LoraPanels]:
    """[W; A] packed for panel_linear, the B's, and the B's as its epilogue reads them."""
    weight = torch.randn(sum(widths) + sum(ranks), in_features) * 0.1
    lora_Bs = [torch.randn(width, rank) * 0.05 for width, rank in zip(widths, ranks)]
    packed, scales = ops.pack_panels(weight, dtype)
    return packed, scales, lora_Bs, ops.LoraPanels.pack(lora_Bs)


def some_gates(rows: int) -> torch.Tensor:
    """[rows, 1]: zero (adapters off) or any weight, so that a gate applied twice shows."""
    return torch.rand(rows, 1) * (torch.rand(rows, 1) < 0.7)


@pytest.mark.parametrize("group", LORA_GROUPS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.int8])
def test_lora_panels_reference_is_the_gated_low_rank_update(group, dtype):
    """The epilogue's reference adds ((x A^T) * gate) B^T with B as packed (fp16): checked
    against the dense product of the unpacked [W; A] and the block-diagonal B."""
    torch.manual_seed(1)
    widths, ranks = LORA_GROUPS[group]
    out_features, rank = sum(widths), sum(ranks)
    packed, scales, lora_Bs, lora = lora_group(widths, ranks, 40, dtype)
    x, gate = torch.randn(7, 40), some_gates(7)
    stacked = ops.reference_panel_linear(x, packed, scales, out_features + rank)
    xa = stacked[:, out_features:] * gate
    expected = stacked[:, :out_features] + xa @ torch.block_diag(*lora_Bs).half().float().T
    got = ops.reference_panel_linear(x, packed, scales, out_features, gate, lora)
    assert got.is_contiguous() and lora.blocks.dtype == torch.float16
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # Panels of projections without an adapter have no block (the first 100 columns).
    assert lora.offsets[: widths[0] // 16].eq(-1).all() == (ranks[0] == 0)


@pytest.mark.parametrize("group", LORA_GROUPS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.int8])
@pytest.mark.parametrize("rows", [0, 1, 5, 9, 18, 71])
def test_panel_linear_lora_epilogue_matches_reference(simd_isa, group, dtype, rows):
    torch.manual_seed(rows)
    widths, ranks = LORA_GROUPS[group]
    out_features = sum(widths)
    packed, scales, _, lora = lora_group(widths, ranks, 576, dtype)
    x, gate = torch.randn(rows, 576), some_gates(rows)
    got = ops.panel_linear(x, packed, scales, out_features, gate, lora)
    assert got.dtype == torch.float32 and got.shape == (rows, out_features)
    expected = ops.reference_panel_linear(x, packed, scales, out_features, gate, lora)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    off = gate[:, 0] == 0  # gated-off rows are the plain projection
    plain = ops.reference_panel_linear(x[off], packed, scales, out_features)
    torch.testing.assert_close(got[off], plain, rtol=1e-4, atol=1e-4)


@needs_simd
def test_panel_linear_lora_epilogue_rejects_bad_arguments():
    widths, ranks = LORA_GROUPS["cut"]
    out_features = sum(widths)
    packed, scales, _, lora = lora_group(widths, ranks, 8, torch.int8)
    x, gate = torch.zeros(2, 8), torch.ones(2)
    with pytest.raises(RuntimeError, match="come together"):
        kernels.panel_linear(x, packed, scales, out_features, None, lora.blocks, lora.offsets)
    with pytest.raises(ValueError, match="exactly when"):
        ops.panel_linear(x, packed, scales, out_features, gate)
    with pytest.raises(RuntimeError, match="gate must be"):
        kernels.panel_linear(x, packed, scales, out_features, gate[:1], lora.blocks, lora.offsets)
    # The packed rows end at the last panel's end (A, then zeros).
    for offset in (-2, packed.shape[0] * 16 - out_features - lora.blocks.shape[1] + 1):
        bad = lora.offsets.clone()
        bad[-1] = offset
        with pytest.raises(RuntimeError, match="reads past the packed A rows"):
            kernels.panel_linear(x, packed, scales, out_features, gate, lora.blocks, bad)
    with pytest.raises(RuntimeError, match="lora_b must be"):
        kernels.panel_linear(x, packed, scales, out_features, gate, lora.blocks.float(),
                             lora.offsets)


@needs_simd
def test_panel_linear_rejects_a_mismatched_packing():
    x = torch.zeros(2, 8)
    half, _ = ops.pack_panels(torch.zeros(20, 8), torch.float16)
    with pytest.raises(RuntimeError, match="ceil"):
        kernels.panel_linear(x, half, None, 40)
    with pytest.raises(RuntimeError, match="fp16 none"):
        kernels.panel_linear(x, half, torch.ones(32), 20)
    int8, scales = ops.pack_panels(torch.zeros(20, 8), torch.int8)
    with pytest.raises(RuntimeError, match="per-column scales"):
        kernels.panel_linear(x, int8, None, 20)
    with pytest.raises(RuntimeError, match="scales must be float32"):
        kernels.panel_linear(x, int8, scales[:20], 20)
