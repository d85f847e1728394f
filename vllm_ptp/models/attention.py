"""The drafter's attention in torch: a pass's rows over their context K/V and their own rows."""

import torch
import torch.nn.functional as F


def draft_attention(
    qkv: torch.Tensor,
    num_heads: int,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """qkv [N, Q, heads + 2 kv_heads, head_dim] (q and k after RoPE) attending the context K/V
    and then the rows' own K/V under mask [N, 1, Q, L + Q]: [N, Q, heads, head_dim].

    keys and values are [N, kv_heads, L, head_dim], or [.., L + Q, ..] with room for the rows'
    own K/V, which are then written there instead of concatenated (no copy of the context)."""
    q_len, context_len = qkv.shape[1], mask.shape[-1] - qkv.shape[1]
    kv_heads = (qkv.shape[2] - num_heads) // 2
    q = qkv[:, :, :num_heads].transpose(1, 2)
    own_keys = qkv[:, :, num_heads : num_heads + kv_heads].transpose(1, 2)
    own_values = qkv[:, :, num_heads + kv_heads :].transpose(1, 2)
    if keys.shape[2] == context_len + q_len and keys.dtype == qkv.dtype:
        keys[:, :, context_len:], values[:, :, context_len:] = own_keys, own_values
    else:
        keys = torch.cat((keys[:, :, :context_len].to(qkv.dtype), own_keys), dim=2)
        values = torch.cat((values[:, :, :context_len].to(qkv.dtype), own_values), dim=2)
    out = F.scaled_dot_product_attention(
        q, keys, values, attn_mask=mask, enable_gqa=True
    )
    return out.transpose(1, 2)
