"""Compact copies of the target's projections for the drafter (CPU): bf16, fp16, w8a32, w8a32-bf16
or int8.

A drafter pass reads all of the target's weights for a few rows, like the verification pass.
Drafts only need to be good, not exact (verification is), so the drafter reads a compact copy:
- `bf16`: every projection in bf16 through vLLM's prepacked oneDNN GEMM (`onednn_mm`), where
  the CPU has native bf16 GEMMs (AVX-512 BF16 / AMX). Half the bytes of fp32 and rounding far
  below a CDF boundary's typical margin.
- `fp16`: fp16 weights and float32 activations through csrc's GEMM (`ops.panel_linear`),
  for CPUs with AVX2 but no bf16 GEMMs (e.g. AMD Zen 3). The bytes of bf16, with 3 more bits
  of mantissa.
- `w8a32`: per-channel int8 weights and float32 activations through the same GEMM, for the
  same CPUs: half of fp16's bytes, a little faster (the GEMM is mostly compute-bound at a
  pass's rows there); rounding only the weights, not the activations, keeps the drafts close
  to the target's.
- `w8a32-bf16`: copies in `w8a32` and in `bf16`, chosen per call by the number of rows:
  w8a32 at the few rows of a pass at batch 1, where reading half of bf16's bytes wins, and
  bf16 at more, where the AMX arithmetic does; for CPUs with bf16 GEMMs and AVX-512 (50% more
  memory than bf16).
- `int8`: per-channel int8 weights with dynamically quantized activations (fbgemm), for CPUs
  without AVX2. 4x fewer bytes than fp32, but fbgemm's per-tensor 7-bit activations move the
  argmax now and then (down_proj's input, SiLU(gate) * up, has outlier channels).
Each group's LoRA A matrices can be stacked under the copy's weight (`fused_with`), so one GEMM
gives both the projection and the adapters' low-rank input. The gated B update is then added by
one fused op (csrc's `gated_lora_expand`) while casting to the activations' dtype, or for fp16
and w8a32 in the panel GEMM's own epilogue.
The copy is made from the projections as served, by applying each to the identity (exact for a
linear map), so it needs no access to vLLM's packed weight formats or to the checkpoint files.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch
from vllm import _custom_ops as vllm_ops

from vllm_ptp import ops
from vllm_ptp.models.target import TargetLayer, TargetView

_QINT8_MAX = 127
# oneDNN primitives cached per handler (one per distinct row count, as vLLM's own linears).
_ONEDNN_PRIMITIVE_CACHE = 32
COMPACT_FORMATS = ("bf16", "fp16", "w8a32", "w8a32-bf16", "int8")


def has_bf16_gemms() -> bool:
    """Native bf16 GEMMs through vLLM's oneDNN build (emulated bf16 would be slower)."""
    return vllm_ops._supports_onednn and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def best_compact_format() -> str:
    """The compact format this CPU runs best: w8a32-bf16 with native bf16 GEMMs and AVX-512
    (bf16 without AVX-512), else w8a32 with csrc's AVX2 GEMM, else int8."""
    if has_bf16_gemms():
        return "w8a32-bf16" if ops.cpu_isa() == "avx512" else "bf16"
    return "w8a32" if ops.simd_kernels() else "int8"


@runtime_checkable
class CompactLinear(Protocol):
    """A compact copy of a projection that can take a group's LoRA A into its own GEMM."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    def gemm(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T in the GEMM's own output dtype (__call__ casts it to x's)."""
        ...

    def fused_with(
        self, lora_A: torch.Tensor, lora_Bs: list[torch.Tensor]
    ) -> "LoraFusedLinear | PanelLoraLinear | RowSplitLinear": ...


class Int8Linear:
    """y = x W^T with W per-channel int8 and x quantized per call (torch's fbgemm dynamic op)."""

    def __init__(self, weight: torch.Tensor):
        weight = weight.float()
        scales = (weight.abs().amax(dim=1) / _QINT8_MAX).clamp_min(1e-12).double()
        zero_points = torch.zeros(len(weight), dtype=torch.long)
        quantized = torch.quantize_per_channel(weight, scales, zero_points, 0, torch.qint8)
        self.packed = torch.ops.quantized.linear_prepack(quantized, None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.gemm(x).to(x.dtype)

    def gemm(self, x: torch.Tensor) -> torch.Tensor:
        # reduce_range: 7-bit activations, as fbgemm needs to avoid int16 overflow on x86.
        return torch.ops.quantized.linear_dynamic(x.float(), self.packed, True)

    def fused_with(self, lora_A: torch.Tensor, lora_Bs: list[torch.Tensor]) -> "LoraFusedLinear":
        """This map plus a gated low-rank update, with A's rows quantized under W's. Per-channel
        scales make W's rows re-quantize to the same int8 values (scales equal up to rounding)
        and x is quantized once for both, so rows with the gate off get this map's output."""
        weight = torch.ops.quantized.linear_unpack(self.packed)[0].dequantize()
        return LoraFusedLinear(Int8Linear(torch.cat((weight, lora_A.float()))), lora_Bs)


class Bf16Linear:
    """y = x W^T with W in bf16, prepacked for oneDNN once; x is rounded to bf16 per call."""

    def __init__(self, weight: torch.Tensor):
        self.in_features = weight.shape[1]
        self.handler = vllm_ops.create_onednn_mm(weight.bfloat16().t(), _ONEDNN_PRIMITIVE_CACHE)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.gemm(x).to(x.dtype)

    def gemm(self, x: torch.Tensor) -> torch.Tensor:
        return vllm_ops.onednn_mm(self.handler, x.bfloat16(), None)

    def fused_with(self, lora_A: torch.Tensor, lora_Bs: list[torch.Tensor]) -> "LoraFusedLinear":
        """This map plus a gated low-rank update, A's rows stacked under W's in bf16. W is read
        back from the prepacked copy (exact: each output of x = I is one bf16 product), so no
        second copy of it is kept."""
        weight = _recover_weight(self, self.in_features, torch.bfloat16)
        return LoraFusedLinear(Bf16Linear(torch.cat((weight, lora_A.bfloat16()))), lora_Bs)


class PanelLinear:
    """y = x W^T with W in fp16 or int8 (per-column scales), packed once for csrc's GEMM;
    x stays float32."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype):
        self.out_features, self.in_features = weight.shape
        self.packed, self.scales = ops.pack_panels(weight, dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.gemm(x).to(x.dtype)

    def gemm(self, x: torch.Tensor) -> torch.Tensor:
        return ops.panel_linear(x, self.packed, self.scales, self.out_features)

    def fused_with(self, lora_A: torch.Tensor, lora_Bs: list[torch.Tensor]) -> "PanelLoraLinear":
        """This map plus a gated low-rank update, A's rows packed after W's. W is read back from
        the packed copy (exactly; int8 rows re-quantize to the same values, as in Int8Linear)."""
        weight = _recover_weight(self, self.in_features, torch.float32)
        packed, scales = ops.pack_panels(torch.cat((weight, lora_A.float())), self.packed.dtype)
        return PanelLoraLinear(packed, scales, self.out_features, lora_Bs)


class PanelLoraLinear:
    """A panel GEMM over [W; A] whose epilogue adds the gated update ((x A^T) * gate) B^T, B in
    fp16 blocks per output panel (`ops.LoraPanels`): one op per projection group, and the update
    added to the accumulators before they are stored, instead of a second op over the output
    (`LoraFusedLinear`). On a Zen 3 EPYC at batch 1 (5 rows a pass), that second op took
    8.4 ms of a drafter pass whose GEMMs took 20 ms; fused, the GEMMs take 21 ms."""

    def __init__(
        self,
        packed: torch.Tensor,
        scales: torch.Tensor | None,
        out_features: int,
        lora_Bs: list[torch.Tensor],
    ):
        covered = sum(len(lora_B) for lora_B in lora_Bs)
        if covered != out_features:
            raise ValueError(f"the B's cover {covered} output columns, the projection "
                             f"{out_features}")
        self.packed, self.scales, self.out_features = packed, scales, out_features
        self.lora = ops.LoraPanels.pack(lora_Bs)

    def __call__(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        out = ops.panel_linear(x, self.packed, self.scales, self.out_features, gate, self.lora)
        return out.to(x.dtype)


class RowSplitLinear:
    """Two compact copies of one map, the call going to `few` up to MAX_FEW_ROWS rows of x and
    to `many` above; the same for the maps they fuse with a LoRA group. Sapphire Rapids, a
    pass's 30 layers streamed from DRAM (caches flushed): w8a32 7.9 ms against bf16's 11.7 ms
    at 5 rows, 10.2 / 12.4 at 9, 13.0 / 12.3 at 12, 34.9 / 16.6 at 40."""

    MAX_FEW_ROWS = 10

    def __init__(self, few: Callable, many: Callable):
        self.few, self.many = few, many

    def _for(self, x: torch.Tensor) -> Callable:
        return self.few if len(x) <= self.MAX_FEW_ROWS else self.many

    def __call__(self, x: torch.Tensor, *gate: torch.Tensor) -> torch.Tensor:
        return self._for(x)(x, *gate)

    def gemm(self, x: torch.Tensor) -> torch.Tensor:
        return self._for(x).gemm(x)

    def fused_with(self, lora_A: torch.Tensor, lora_Bs: list[torch.Tensor]) -> "RowSplitLinear":
        return RowSplitLinear(self.few.fused_with(lora_A, lora_Bs),
                              self.many.fused_with(lora_A, lora_Bs))


class LoraFusedLinear:
    """A compact linear over [W; A] and the group's B's (scaling folded in), called as (x, gate):
    x W^T + ((x A^T) * gate) B^T. B stays in float32: at rank 32 it is a small read. The update
    is one fused op (`ops.gated_lora_expand`) on the GEMM's raw output: per projection that has
    an adapter, only its own output columns (the block-diagonal B of a group is mostly zeros,
    two thirds for qkv), and the cast to x's dtype in the same pass. At a drafter pass's few
    rows, op calls cost more than the arithmetic."""

    def __init__(self, stacked: CompactLinear, lora_Bs: list[torch.Tensor]):
        self.stacked = stacked
        self.out_features = sum(len(b) for b in lora_Bs)
        blocks = ops.adapter_blocks(lora_Bs)
        self.lora_Bs_t = [lora_B.T.float().contiguous() for _, _, lora_B in blocks]
        self.columns = [column for column, _, _ in blocks]  # first output column of each B
        self.ranks = [rank for _, rank, _ in blocks]  # first low-rank column of each B

    def __call__(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        out = ops.gated_lora_expand(
            self.stacked.gemm(x), gate, self.lora_Bs_t, self.columns, self.ranks, self.out_features
        )
        return out.to(x.dtype)


def _recover_weight(projection: Callable, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """W of a linear map from its action on I."""
    return projection(torch.eye(in_features, dtype=dtype)).T.contiguous()


def compact_linear(weight_format: str) -> Callable[[torch.Tensor], CompactLinear]:
    """What makes a compact copy in `weight_format` of a weight matrix [out, in]."""
    if weight_format not in COMPACT_FORMATS:
        raise ValueError(f"compact weight format {weight_format!r} is not one of {COMPACT_FORMATS}")
    if weight_format == "bf16" and not has_bf16_gemms():
        raise ValueError("bf16 draft weights need a CPU with bf16 GEMMs (AVX-512 BF16 or AMX); "
                         f"use {best_compact_format()}")
    return {
        "bf16": Bf16Linear,
        "fp16": functools.partial(PanelLinear, dtype=torch.float16),
        "w8a32": functools.partial(PanelLinear, dtype=torch.int8),
        "w8a32-bf16": lambda weight: RowSplitLinear(PanelLinear(weight, torch.int8),
                                                    Bf16Linear(weight)),
        "int8": Int8Linear,
    }[weight_format]


def compact_view(
    target: TargetView,
    linear: Callable[[torch.Tensor], CompactLinear],
    hidden_size: int,
    intermediate_size: int,
    layers: range,
) -> TargetView:
    """The same target with its projections and LM head replaced by compact copies made by
    `linear` (`compact_linear(format)`), in the given layers (the ones the drafter runs; the
    others are left as served)."""
    q_size = target.num_heads * target.head_dim

    def compact(projection: Callable, in_features: int) -> CompactLinear:
        return linear(_recover_weight(projection, in_features, target.dtype))

    def compact_layer(layer: TargetLayer) -> TargetLayer:
        return TargetLayer(
            input_norm=layer.input_norm,
            qkv=compact(layer.qkv, hidden_size),
            o_proj=compact(layer.o_proj, q_size),
            post_norm=layer.post_norm,
            gate_up=compact(layer.gate_up, hidden_size),
            down_proj=compact(layer.down_proj, intermediate_size),
        )

    with torch.inference_mode():
        compact_layers = [
            compact_layer(layer) if index in layers else layer
            for index, layer in enumerate(target.layers)
        ]
        lm_head = compact(target.lm_head, hidden_size)
    return dataclasses.replace(target, layers=compact_layers, lm_head=lm_head)
