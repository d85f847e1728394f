"""The paper's PTP drafter: the target's own Llama weights plus LoRA adapters that are switched on
only at auxiliary positions, whose inputs are embeddings of the uniforms u.

The drafter runs all of the target's layers (the paper's drafter) or only its top ones
(`num_draft_layers`): a drafter a fraction of the target's cost whose rows enter at that depth
and still attend to the context's K/V of those deep layers. Such a shallow drafter also reads
the target's final hidden state of the position before the newest token (EAGLE's input), since
the newest token's row skips the layers that would have told it about the context.

One module serves training and vLLM: the caller supplies the attention over the context (K/V
from a full target forward in training, `KVContext`; vLLM's paged KV cache at inference) and the
query rows to compute, laid out by `draft_query` in both.
"""

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from vllm import _custom_ops as vllm_ops

from vllm_ptp.config import PTPConfig
from vllm_ptp.models.attention import draft_attention
from vllm_ptp.models.quantized import CompactLinear
from vllm_ptp.models.target import Projection, TargetView

# layer index -> (keys, values), each [sequences, kv_heads, context_len, head_dim], after RoPE;
# or [.., context_len + Q, ..] with room for the pass's Q rows, which the layer then writes there.
ContextKV = Callable[[int], tuple[torch.Tensor, torch.Tensor]]


class ContextAttention(Protocol):
    """The attention of one layer's query rows over their context and their own rows:
    (layer, qkv [N, Q, heads + 2 kv_heads, head_dim] after RoPE, mask [N, 1, Q, L + Q]) ->
    [N, Q, heads, head_dim]."""

    def __call__(self, layer: int, qkv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor: ...


@dataclass
class KVContext:
    """ContextAttention over context K/V in hand (training, tests): torch's attention."""

    kv: ContextKV
    num_heads: int

    def __call__(self, layer: int, qkv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return draft_attention(qkv, self.num_heads, *self.kv(layer), mask)


# (x, gate) -> a projection group's fused output with the gated adapters added.
GatedProjection = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class DraftQuery:
    """The rows one drafter pass computes, for N sequences of Q rows each."""

    inputs_embeds: torch.Tensor  # [N, Q, hidden]
    positions: torch.Tensor  # [N, Q] int64 RoPE positions
    lora_gate: torch.Tensor  # [N, Q] bool: adapters on (auxiliary rows)
    self_mask: torch.Tensor  # [N, Q, Q] bool: row i may attend row j
    context_mask: torch.Tensor  # [N, Q, L] bool: row i may attend context position l


def draft_query(
    inputs_embeds: torch.Tensor, position: torch.Tensor, context_len: int, adapt_token_row: bool
) -> DraftQuery:
    """The rows of one drafter pass, per sequence: its newest token (row 0, at `position`, not
    in the context) and k auxiliary rows. Aux row j drafts token position+1+j and sits at RoPE
    position position+j, as in the paper. Every row attends to the context before `position`
    and causally to the rows of its own sequence. inputs_embeds: [N, 1 + k, hidden]."""
    n, rows = inputs_embeds.shape[:2]
    position = position.long()
    steps = torch.arange(rows - 1, device=position.device)
    lora_gate = torch.ones(n, rows, dtype=torch.bool)
    lora_gate[:, 0] = adapt_token_row
    context_mask = torch.arange(context_len)[None, :] < position[:, None]
    return DraftQuery(
        inputs_embeds=inputs_embeds,
        positions=torch.cat((position[:, None], position[:, None] + steps), dim=1),
        lora_gate=lora_gate,
        self_mask=torch.ones(rows, rows, dtype=torch.bool).tril().expand(n, -1, -1),
        context_mask=context_mask[:, None, :].expand(-1, rows, -1),
    )


class UEmbedding(nn.Module):
    """u in [0, 1) -> hidden vector, by linear interpolation between learned vectors.

    Greedy requests have no u: they are marked with rng.GREEDY_U and get a learned vector of their
    own, so one checkpoint serves greedy and sampled decoding. kind="constant" ignores u
    altogether, the greedy marker included (one vector): the independent-parallel-drafting
    ablation, whose placeholders, like PARD's mask tokens, cannot tell how a request samples.
    """

    def __init__(self, kind: str, size: int, hidden_size: int):
        super().__init__()
        num_vectors = size if kind == "interpolated" else 1
        self.weight = nn.Parameter(torch.randn(num_vectors, hidden_size) * 0.02)
        self.greedy = (
            nn.Parameter(torch.randn(hidden_size) * 0.02) if kind == "interpolated" else None
        )

    @property
    def greedy_vector(self) -> torch.Tensor:
        """What a greedy request's auxiliary rows get."""
        return self.weight[0] if self.greedy is None else self.greedy

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        num_vectors = self.weight.shape[0]
        if num_vectors == 1:
            return self.weight[0].expand(*u.shape, -1)
        scaled = u.float().clamp(0.0, 1.0) * (num_vectors - 1)
        lower = scaled.floor().long().clamp_(max=num_vectors - 1)
        upper = (lower + 1).clamp_(max=num_vectors - 1)
        frac = (scaled - lower).unsqueeze(-1)
        # low + frac * (high - low) in float32, one rounded op at a time (no torch.lerp,
        # whose FMA use varies by path), so csrc/ reproduces it bit for bit.
        weight = self.weight.float()
        low = weight[lower]
        sampled = (low + frac * (weight[upper] - low)).to(self.weight.dtype)
        return torch.where((u < 0).unsqueeze(-1), self.greedy, sampled)


@dataclass
class HeadMaps:
    """A dependency head's three layers, read over the target's input embedding `embed`."""

    fc_hidden: Projection
    fc_previous: Projection
    out: Projection
    embed: Callable[[torch.Tensor], torch.Tensor]

    def direction(self, hidden_part: torch.Tensor, previous_embeds: torch.Tensor) -> torch.Tensor:
        """d for rows whose fc_hidden(h) is `hidden_part`, given e(previous draft)."""
        return self.out(F.silu(hidden_part + self.fc_previous(previous_embeds)))

    def previous_part(self, previous: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """fc_previous(e(previous)) for draft tokens [N]: [N, width]."""
        return self.fc_previous(self.embed(previous).to(dtype))

    def candidate_scores(self, candidates: torch.Tensor, activation: torch.Tensor) -> torch.Tensor:
        """e(c) . out(activation) for candidates [N, C] and activations [N, width]: [N, C]."""
        embeds = self.embed(candidates).to(activation.dtype)
        return (embeds @ self.out(activation)[:, :, None])[..., 0]


@dataclass
class HeadTables:
    """A dependency head for serving: the two maps it applies to token embeddings,
    fc_previous(e(c)) and out^T e(c), tabulated for every token c once (stored in bf16), so
    that re-ranking a row is two row gathers and a dot product per candidate instead of two
    GEMVs. At a pass's few rows those GEMVs were most of the head's time."""

    fc_hidden: Projection
    previous: torch.Tensor  # [vocab, width]: fc_previous(e(c))
    candidate: torch.Tensor  # [vocab, width]: out^T e(c), so e(c) . out(a) = candidate[c] . a

    def previous_part(self, previous: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.previous[previous].to(dtype)

    def candidate_scores(self, candidates: torch.Tensor, activation: torch.Tensor) -> torch.Tensor:
        embeds = self.candidate[candidates].to(activation.dtype)
        return (embeds @ activation[:, :, None])[..., 0]


class DependencyHead(nn.Module):
    """Makes each later draft depend on the token drafted just before it, which the auxiliary
    rows only infer inside the pass. It adds e(c) . d to the logit of candidate c, where e is
    the target's input embedding and d = out(silu(fc_hidden(h) + fc_previous(e(previous)))),
    h the row's final hidden state. Its output starts at zero: a new head changes no draft."""

    def __init__(self, hidden_size: int, width: int):
        super().__init__()
        self.fc_hidden = nn.Linear(hidden_size, width)
        self.fc_previous = nn.Linear(hidden_size, width, bias=False)
        self.out = nn.Linear(width, hidden_size, bias=False)
        nn.init.zeros_(self.out.weight)

    def maps(self, embed: Callable[[torch.Tensor], torch.Tensor]) -> HeadMaps:
        return HeadMaps(self.fc_hidden, self.fc_previous, self.out, embed)

    def tables(
        self,
        embeddings: torch.Tensor,
        linear: Callable[[torch.Tensor], Projection] | None,
    ) -> HeadTables:
        """The serving form over the target's input embeddings [vocab, hidden] as they are now.
        `linear`, the draft weights' format, serves fc_hidden too (None: its own layer).
        Call without autograd (`prepare_for_serving` does)."""
        embeddings = embeddings.to(self.out.weight.dtype)
        previous = self.fc_previous(embeddings).to(torch.bfloat16)
        candidate = (embeddings @ self.out.weight).to(torch.bfloat16)
        if linear is None:
            return HeadTables(self.fc_hidden, previous, candidate)
        # torch's float32 GEMM is slow at the row or few that re-ranking runs fc_hidden on.
        project, bias = linear(self.fc_hidden.weight.detach()), self.fc_hidden.bias.detach()

        def fc_hidden(x: torch.Tensor) -> torch.Tensor:
            return project(x) + bias

        return HeadTables(fc_hidden, previous, candidate)


class LoraAdapter(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.lora_A = nn.Parameter(torch.randn(rank, in_features) / in_features**0.5)
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))  # starts as the target


# Projections that share an input, in the order the target computes them as one fused GEMM
# (vLLM's qkv_proj and gate_up_proj), with the TargetLayer field that computes them. Their
# adapters act on that fused output together.
PROJECTION_GROUPS = {
    "qkv": ("qkv", ("q_proj", "k_proj", "v_proj")),
    "o": ("o_proj", ("o_proj",)),
    "gate_up": ("gate_up", ("gate_proj", "up_proj")),
    "down": ("down_proj", ("down_proj",)),
}


@dataclass
class GroupAdapter:
    """The adapters of one projection group as one low-rank update of the fused output: their
    A's stacked [P * r, in] and their B's, one per projection in output order ([out_i, r], or
    [out_i, 0] for a projection without one). At a drafter pass's few rows, calls cost more
    than FLOPs."""

    lora_A: torch.Tensor
    lora_Bs: list[torch.Tensor]

    @property
    def lora_B(self) -> torch.Tensor:
        """The B's as one block-diagonal [out, P * r]."""
        return torch.block_diag(*self.lora_Bs)

    @classmethod
    def of(
        cls, adapters: nn.ModuleDict, shapes: dict[str, tuple[int, int]], names: Iterable[str]
    ) -> "GroupAdapter | None":
        present = [adapters[name] for name in names if name in adapters]
        if not present:
            return None
        empty = present[0].lora_B.new_zeros
        b_blocks = [
            adapters[name].lora_B if name in adapters else empty(shapes[name][1], 0)
            for name in names
        ]
        return cls(torch.cat([a.lora_A for a in present]), b_blocks)


class AdaptedProjection:
    """A target projection plus its group's gated adapters:
    base(x) + scaling * ((x A^T) * gate) B^T, the 0/1 row gate applied at rank (same result,
    fewer elements)."""

    def __init__(self, base: Projection, adapter: GroupAdapter | None, scaling: float):
        self.base, self.adapter, self.scaling = base, adapter, scaling
        # Assembled once: a served drafter keeps this projection for every pass (training
        # builds a new one per forward, so gradients still reach each B).
        self.lora_B = adapter.lora_B if adapter is not None else None

    def __call__(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.adapter is None:
            return out
        low = F.linear(x, self.adapter.lora_A) * gate
        return torch.addmm(out, low, self.lora_B.T, alpha=self.scaling)


def adapted_projection(
    base: Projection, adapter: GroupAdapter | None, scaling: float
) -> GatedProjection:
    """`AdaptedProjection`, or for compact draft weights the same map with A fused into the base
    GEMM (serving only: the fused copy is no longer a view of the trainable parameters)."""
    if adapter is not None and isinstance(base, CompactLinear):
        return base.fused_with(adapter.lora_A, [b * scaling for b in adapter.lora_Bs])
    return AdaptedProjection(base, adapter, scaling)


def lora_shapes(config: PTPConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every adaptable projection of the target."""
    t = config.target
    q_size, kv_size = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    h, i = t.hidden_size, t.intermediate_size
    return {
        "q_proj": (h, q_size),
        "k_proj": (h, kv_size),
        "v_proj": (h, kv_size),
        "o_proj": (q_size, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if torch.is_grad_enabled():
        return F.rms_norm(x, weight.shape, weight, eps)
    # Without autograd, vLLM's one-kernel RMSNorm: F.rms_norm launches five kernels, which at a
    # drafter pass's few rows cost more than the arithmetic.
    out = torch.empty_like(x)
    vllm_ops.rms_norm(out, x.contiguous(), weight, eps)
    return out


def _add_rms_norm(
    hidden: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden + delta, its RMS norm). Without autograd in vLLM's one kernel, in place: hidden
    becomes the sum and delta the norm."""
    if torch.is_grad_enabled():
        hidden = hidden + delta
        return hidden, F.rms_norm(hidden, weight.shape, weight, eps)
    vllm_ops.fused_add_rms_norm(delta, hidden, weight, eps)
    return hidden, delta


def _silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of [.., gate | up], in torch's two ops: on CPU they took half the time of
    vLLM's one-kernel silu_and_mul at 5 rows and a third at 72 (a Zen 3 EPYC)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, where rotate_half(x) = roll(x, half) * [-1.., +1..] and
    the signs are folded into signed_sin (bit-identical, two ops fewer)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


class GatedLoraDrafter(nn.Module):
    """Gated-LoRA PTP drafter. Its parameters are only the adapters and the u-embedding; the
    target's weights are bound at run time with `bind_target` and never copied or saved."""

    def __init__(self, config: PTPConfig):
        super().__init__()
        self.config = config
        self.scaling = config.lora_scaling
        self.first_layer = config.first_draft_layer
        self.u_embedding = UEmbedding(
            config.u_embedding, config.u_embedding_size, config.target.hidden_size
        )
        hidden_size = config.target.hidden_size
        # Shallow drafters: the newest token's row input from [its embedding, the target's
        # final hidden state of the position before it].
        self.token_row_fc = (
            nn.Linear(2 * hidden_size, hidden_size, bias=False) if self.first_layer else None
        )
        self.dependency_head = (
            DependencyHead(hidden_size, config.dependency_head) if config.dependency_head else None
        )
        self.lora_shapes = lora_shapes(config)
        self.lora = nn.ModuleList(
            nn.ModuleDict(
                {
                    name: LoraAdapter(*self.lora_shapes[name], config.lora_rank)
                    for name in config.lora_modules
                }
            )
            for _ in range(self.first_layer, config.target.num_hidden_layers)
        )
        self.target: TargetView | None = None
        self.served_projections: list[dict[str, GatedProjection]] | None = None
        self.served_head: HeadTables | None = None

    @property
    def adapts_token_row(self) -> bool:
        """Whether the newest token's row needs the adapters. At full depth they stay off there,
        so its K/V are the target's own; a shallower drafter feeds that token in below its
        depth, and the adapters learn to make up for the missing layers."""
        return self.first_layer > 0

    def token_row(self, token_embeds: torch.Tensor, previous_hidden: torch.Tensor) -> torch.Tensor:
        """Input of the newest token's row: its embedding at full depth; for a shallow drafter,
        mixed with `previous_hidden`, the target's final (normed) hidden state of the position
        before it, which vLLM's verification pass has just computed. Both [N, hidden]."""
        if self.token_row_fc is None:
            return token_embeds
        return self.token_row_fc(torch.cat((token_embeds, previous_hidden.to(token_embeds)), -1))

    @property
    def layer_indices(self) -> range:
        """The target layers the drafter runs (and whose context K/V it reads)."""
        return range(self.first_layer, self.config.target.num_hidden_layers)

    def bind_target(self, target: TargetView) -> None:
        self.target = target
        self.served_projections, self.served_head = None, None

    def prepare_for_serving(
        self, linear: Callable[[torch.Tensor], Projection] | None = None
    ) -> None:
        """Join every layer's adapters to the bound target's projections once, for a drafter
        that will not be trained again. Training joins them in each forward instead, so
        gradients reach every projection's own A and B (the checkpoint's parameters).
        `linear`, the compact draft weights' format, also serves the dependency head's
        fc_hidden (None: its own layer); the head's maps of token embeddings are tabulated."""
        with torch.no_grad():
            self.served_projections = [
                self._projections(index, adapters)
                for index, adapters in zip(self.layer_indices, self.lora)
            ]
            head = self.dependency_head
            if head is not None:
                vocab = torch.arange(self.config.target.vocab_size, device=head.out.weight.device)
                self.served_head = head.tables(self.target.embed_tokens(vocab), linear)

    def expected_weight_shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(p.shape) for name, p in self.named_parameters()}

    def forward(self, query: DraftQuery, context: ContextAttention) -> torch.Tensor:
        """Final-norm hidden states of every query row: [N, Q, hidden]."""
        target = self.target
        assert target is not None, "bind_target() before running the drafter"
        n, q_len, hidden_size = query.inputs_embeds.shape
        # The residual stream, as [N * Q, hidden]; a copy, as _add_rms_norm updates it in place.
        hidden = query.inputs_embeds.reshape(n * q_len, hidden_size).clone()
        rope = self._rope(query.positions, hidden.dtype)
        gate = query.lora_gate.reshape(-1, 1).to(hidden.dtype)
        mask = torch.cat((query.context_mask, query.self_mask), dim=-1).unsqueeze(1)
        projections = self.served_projections or map(
            self._projections, self.layer_indices, self.lora
        )
        # Each residual add is fused with the norm after it: the next layer's input norm, or
        # after the last layer the final norm.
        layers = [target.layers[index] for index in self.layer_indices]
        next_norms = [layer.input_norm for layer in layers[1:]] + [target.final_norm]
        x = _rms_norm(hidden, layers[0].input_norm, target.rms_norm_eps)
        for index, layer_projections, next_norm in zip(self.layer_indices, projections, next_norms):
            hidden, x = self._layer(
                hidden, x, index, layer_projections, next_norm, gate, rope, mask, context
            )
        return x.view(n, q_len, hidden_size)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        assert self.target is not None
        return self.target.lm_head(hidden.flatten(0, -2)).view(*hidden.shape[:-1], -1)

    def later_drafts(
        self, hidden: torch.Tensor, logits: torch.Tensor, first: torch.Tensor
    ) -> torch.Tensor:
        """Drafts 2..k of a pass: [N, k - 1]. hidden and logits are those of auxiliary rows 2..k,
        [N, k - 1, ...] (row 1 drafts the token the newest token's row already drafts); first
        [N] is the first draft. Without a dependency head each row's argmax; with one, row by
        row, the row's top candidates re-ranked knowing the draft before it (a few small ops
        per row: the candidates' logits are already there)."""
        head: HeadMaps | HeadTables | None = self.served_head
        if head is None and self.dependency_head is not None:
            head = self.dependency_head.maps(self.target.embed_tokens)
        if head is None or logits.shape[1] == 0:
            return logits.argmax(dim=-1)
        scores, candidates = logits.topk(self.config.dependency_candidates, dim=-1)
        hidden_part = head.fc_hidden(hidden)
        drafts, previous = [], first
        for row in range(logits.shape[1]):
            activation = F.silu(hidden_part[:, row] + head.previous_part(previous, hidden.dtype))
            corrected = scores[:, row] + head.candidate_scores(candidates[:, row], activation)
            previous = candidates[:, row].gather(1, corrected.argmax(-1, keepdim=True))[:, 0]
            drafts.append(previous)
        return torch.stack(drafts, dim=1)

    def dependent_logits(
        self, hidden: torch.Tensor, logits: torch.Tensor, previous: torch.Tensor
    ) -> torch.Tensor:
        """Training: logits of auxiliary rows 2..k over the whole vocabulary with the dependency
        head's correction, given the true previous tokens [N, k - 1]: [N, k - 1, vocab]. hidden
        and logits are those of rows 2..k, as for `later_drafts`."""
        head = self.dependency_head.maps(self.target.embed_tokens)
        embeddings = self.target.embed_tokens.weight
        direction = head.direction(head.fc_hidden(hidden), embeddings[previous])
        return logits + direction @ embeddings.T

    def _projections(self, index: int, adapters: nn.ModuleDict) -> dict[str, GatedProjection]:
        """Layer `index`'s projection groups, each with its adapters."""
        weights = self.target.layers[index]
        return {
            group: adapted_projection(
                getattr(weights, field),
                GroupAdapter.of(adapters, self.lora_shapes, names),
                self.scaling,
            )
            for group, (field, names) in PROJECTION_GROUPS.items()
        }

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype) -> "RotaryEmbedding":
        """RoPE of every row: the target's own in-place op when it has one and no gradients are
        needed (serving), else from cos and signed-sin tables (see `_apply_rope`)."""
        target = self.target
        if target.rotary is not None and not torch.is_grad_enabled():
            return RotaryEmbedding(target, positions.reshape(-1))
        half = target.head_dim // 2
        exponent = torch.arange(0, target.head_dim, 2, device=positions.device) / target.head_dim
        inv_freq = 1.0 / (target.rope_theta ** exponent.double())
        freqs = positions.unsqueeze(-1).double() * inv_freq
        angles = torch.cat((freqs, freqs), dim=-1).unsqueeze(2)
        sign = torch.cat((-torch.ones(half), torch.ones(half))).to(angles)
        return RotaryEmbedding(target, cos=angles.cos().to(dtype),
                               signed_sin=(angles.sin() * sign).to(dtype))

    def _layer(
        self,
        hidden: torch.Tensor,
        x: torch.Tensor,
        index: int,
        project: dict[str, GatedProjection],
        next_norm: torch.Tensor,
        gate: torch.Tensor,
        rope: "RotaryEmbedding",
        mask: torch.Tensor,
        context: ContextAttention,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Target layer `index` over the query rows, each fused projection group plus its gated
        adapters (zero at non-auxiliary rows). hidden is the residual stream and x its input
        norm, both [N * Q, hidden]; returns the new residual stream and its `next_norm`."""
        target = self.target
        n, q_len = mask.shape[0], mask.shape[2]
        heads, kv_heads, eps = target.num_heads, target.num_kv_heads, target.rms_norm_eps

        qkv = project["qkv"](x, gate).view(n, q_len, heads + 2 * kv_heads, target.head_dim)
        attn = context(index, rope(qkv), mask).reshape(n * q_len, -1)
        hidden, x = _add_rms_norm(hidden, project["o"](attn, gate), target.layers[index].post_norm,
                                  eps)
        down = project["down"](_silu_and_mul(project["gate_up"](x, gate)), gate)
        return _add_rms_norm(hidden, down, next_norm, eps)


@dataclass
class RotaryEmbedding:
    """qkv [N, Q, heads + 2 kv_heads, head_dim] -> the same with RoPE on q and k: in place by
    the target's own op at `positions` [N * Q], or from `cos`/`signed_sin` [N, Q, 1, head_dim]
    (differentiable, into a new tensor)."""

    target: TargetView
    positions: torch.Tensor | None = None
    cos: torch.Tensor | None = None
    signed_sin: torch.Tensor | None = None

    def __call__(self, qkv: torch.Tensor) -> torch.Tensor:
        t = self.target
        q_size, kv_size = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
        if self.positions is not None:
            rows = qkv.view(-1, q_size + 2 * kv_size)
            q, k = rows[:, :q_size], rows[:, q_size : q_size + kv_size]
            rotated_q, rotated_k = t.rotary(self.positions, q, k)
            q.copy_(rotated_q)  # no-ops where the op rotated in place (vLLM's CPU/CUDA ops)
            k.copy_(rotated_k)
            return qkv
        qk = t.num_heads + t.num_kv_heads
        rotated = _apply_rope(qkv[:, :, :qk], self.cos, self.signed_sin)
        return torch.cat((rotated, qkv[:, :, qk:]), dim=2)
