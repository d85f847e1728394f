"""A Llama target as the drafter sees it: its own projections, norms, embedding and LM head.

The drafter calls the target's modules instead of copying weights, so they are shared, never
duplicated, and vLLM's packed CPU GEMMs (which drop `.weight` after loading) are used as they
are. Two constructors: from a vLLM model (fused qkv / gate_up) and from a transformers model.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

Projection = Callable[[torch.Tensor], torch.Tensor]
# (positions [T], q [T, heads * head_dim], k [T, kv_heads * head_dim]) -> rotated (q, k), which
# vLLM's own ops write in place.
Rotary = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class TargetLayer:
    input_norm: torch.Tensor  # [hidden]
    qkv: Projection  # -> [.., q | k | v], as vLLM's fused qkv_proj
    o_proj: Projection
    post_norm: torch.Tensor  # [hidden]
    gate_up: Projection  # -> [.., gate | up], as vLLM's fused gate_up_proj
    down_proj: Projection


@dataclass
class TargetView:
    embed_tokens: Callable[[torch.Tensor], torch.Tensor]  # token ids -> [.., hidden]
    layers: list[TargetLayer]
    final_norm: torch.Tensor  # [hidden]
    lm_head: Projection  # [tokens, hidden] -> [tokens, vocab]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    dtype: torch.dtype
    # The target's own RoPE op (vLLM's); None: the drafter computes RoPE itself.
    rotary: Rotary | None = None


def _rope_theta(hf_config) -> float:
    params = getattr(hf_config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(
            f"the PTP drafter implements plain RoPE; this target uses rope_type={rope_type!r}."
        )
    return float(params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))


def _head_dims(hf_config) -> tuple[int, int, int]:
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    return heads, kv_heads, getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads


def _vllm_linear(module: nn.Module) -> Projection:
    return lambda x: module(x)[0]


def _platform_kernel(op: nn.Module) -> Callable:
    """A vLLM CustomOp's own kernel for this platform. Calling the op would dispatch as in the
    target's forward: to its torch-native version when the target is compiled (vLLM's default),
    for inductor to fuse; run eagerly, as the drafter runs, that RoPE took a drafter layer from
    0.38 to 0.50 ms (SmolLM2, batch 1)."""
    from vllm.platforms import current_platform

    return op.forward_cpu if current_platform.is_cpu() else op.forward_cuda


def from_vllm_llama(model: nn.Module, hf_config) -> TargetView:
    """The target as served by vLLM (LlamaForCausalLM with fused qkv_proj and gate_up_proj)."""
    heads, kv_heads, head_dim = _head_dims(hf_config)
    layers = [
        TargetLayer(
            input_norm=layer.input_layernorm.weight,
            qkv=_vllm_linear(layer.self_attn.qkv_proj),
            o_proj=_vllm_linear(layer.self_attn.o_proj),
            post_norm=layer.post_attention_layernorm.weight,
            gate_up=_vllm_linear(layer.mlp.gate_up_proj),
            down_proj=_vllm_linear(layer.mlp.down_proj),
        )
        for layer in model.model.layers
    ]
    return TargetView(
        embed_tokens=model.model.embed_tokens,
        layers=layers,
        final_norm=model.model.norm.weight,
        lm_head=model.compute_logits,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rope_theta=_rope_theta(hf_config),
        rms_norm_eps=hf_config.rms_norm_eps,
        dtype=model.model.norm.weight.dtype,
        # One table, shared by all layers.
        rotary=_platform_kernel(model.model.layers[0].self_attn.rotary_emb),
    )


def from_hf_llama(model: nn.Module) -> TargetView:
    """The target as a transformers LlamaForCausalLM (separate q/k/v and gate/up)."""
    heads, kv_heads, head_dim = _head_dims(model.config)

    def layer_view(layer: nn.Module) -> TargetLayer:
        attn, mlp = layer.self_attn, layer.mlp
        return TargetLayer(
            input_norm=layer.input_layernorm.weight,
            qkv=lambda x: torch.cat((attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)), dim=-1),
            o_proj=attn.o_proj,
            post_norm=layer.post_attention_layernorm.weight,
            gate_up=lambda x: torch.cat((mlp.gate_proj(x), mlp.up_proj(x)), dim=-1),
            down_proj=mlp.down_proj,
        )

    return TargetView(
        embed_tokens=model.model.embed_tokens,
        layers=[layer_view(layer) for layer in model.model.layers],
        final_norm=model.model.norm.weight,
        lm_head=model.lm_head,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rope_theta=_rope_theta(model.config),
        rms_norm_eps=model.config.rms_norm_eps,
        dtype=model.model.norm.weight.dtype,
    )
