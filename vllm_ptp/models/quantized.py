"""A compact copy of the target's projections for the drafter (CPU): int8 (bf16 for down_proj
where the CPU has bf16 GEMMs).

A drafter pass reads all of the target's weights for a few rows, like the verification pass.
Drafts only need to be good, not exact (verification is), so the drafter reads a compact copy:
per-channel int8 weights with dynamically quantized activations (fbgemm), 4x fewer bytes and
GEMMs 2-3x faster than fp32 at a pass's 9 rows. down_proj's input (SiLU(gate) * up) has outlier
channels that fbgemm's per-tensor 7-bit activations round hardest, so where bf16 GEMMs exist it
gets bf16, which keeps a float exponent. On SmolLM2 in 9-row passes over cached context, top-1
agreement with the fp32 target was 0.897 with down_proj in fp32 and 0.889 with it in int8
(README, "How the drafter runs"), while the fp32 down_proj took about a sixth of the pass.
The copy is made from the projections as served, by applying each to the identity (exact for a
linear map), so it needs no access to vLLM's packed weight formats or to the checkpoint files.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F

from vllm_ptp.models.target import TargetLayer, TargetView

_QINT8_MAX = 127


class Int8Linear:
    """y = x W^T with W per-channel int8 and x quantized per call (torch's fbgemm dynamic op)."""

    def __init__(self, weight: torch.Tensor):
        weight = weight.float()
        scales = (weight.abs().amax(dim=1) / _QINT8_MAX).clamp_min(1e-12).double()
        zero_points = torch.zeros(len(weight), dtype=torch.long)
        quantized = torch.quantize_per_channel(weight, scales, zero_points, 0, torch.qint8)
        self.packed = torch.ops.quantized.linear_prepack(quantized, None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # reduce_range: 7-bit activations, as fbgemm needs to avoid int16 overflow on x86.
        out = torch.ops.quantized.linear_dynamic(x.float(), self.packed, True)
        return out.to(x.dtype)

    def fused_with(self, lora_A: torch.Tensor, lora_B: torch.Tensor) -> "Int8LoraLinear":
        """This map plus a gated low-rank update x -> ((x A^T) * gate) B^T, with A's rows
        quantized under W's (one GEMM for both). Per-channel scales make W's rows re-quantize
        to the same int8 values (scales equal up to rounding) and x is quantized once for
        both, so rows with the gate off get this map's output."""
        weight = torch.ops.quantized.linear_unpack(self.packed)[0].dequantize()
        return Int8LoraLinear(Int8Linear(torch.cat((weight, lora_A.float()))), lora_B)


class Int8LoraLinear:
    """An Int8Linear over [W; A] and a dense B (scaling folded in), called as (x, gate)."""

    def __init__(self, stacked: Int8Linear, lora_B: torch.Tensor):
        self.stacked = stacked
        self.lora_B_t = lora_B.T.contiguous()
        self.out_features = len(lora_B)

    def __call__(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        out = self.stacked(x)
        base, low = out[:, : self.out_features], out[:, self.out_features :]
        return torch.addmm(base, low * gate, self.lora_B_t)


class Bf16Linear:
    """y = x W^T in bf16 (oneDNN), returned in the input's dtype."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight.bfloat16()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.bfloat16(), self.weight).to(x.dtype)


def _recover_weight(projection: Callable, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """W of a linear map from its action on I."""
    return projection(torch.eye(in_features, dtype=dtype)).T.contiguous()


def int8_view(
    target: TargetView, hidden_size: int, intermediate_size: int, layers: range
) -> TargetView:
    """The same target with its projections and LM head replaced by Int8Linears (down_proj by
    a Bf16Linear where the CPU has bf16 GEMMs), in the given layers (the ones the drafter runs;
    the others are left as served)."""
    q_size = target.num_heads * target.head_dim

    def quantize(projection: Callable, in_features: int) -> Int8Linear:
        return Int8Linear(_recover_weight(projection, in_features, target.dtype))

    def down_proj(projection: Callable) -> Callable:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return quantize(projection, intermediate_size)  # emulated bf16 would be slow
        return Bf16Linear(_recover_weight(projection, intermediate_size, target.dtype))

    def compact(layer: TargetLayer) -> TargetLayer:
        return TargetLayer(
            input_norm=layer.input_norm,
            qkv=quantize(layer.qkv, hidden_size),
            o_proj=quantize(layer.o_proj, q_size),
            post_norm=layer.post_norm,
            gate_up=quantize(layer.gate_up, hidden_size),
            down_proj=down_proj(layer.down_proj),
        )

    with torch.inference_mode():
        compact_layers = [
            compact(layer) if index in layers else layer
            for index, layer in enumerate(target.layers)
        ]
        lm_head = quantize(target.lm_head, hidden_size)
    return TargetView(
        embed_tokens=target.embed_tokens,
        layers=compact_layers,
        final_norm=target.final_norm,
        lm_head=lm_head,
        num_heads=target.num_heads,
        num_kv_heads=target.num_kv_heads,
        head_dim=target.head_dim,
        rope_theta=target.rope_theta,
        rms_norm_eps=target.rms_norm_eps,
        dtype=target.dtype,
    )
