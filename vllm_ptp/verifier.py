"""Coupled verification inside vLLM: replacements for vLLM's Sampler and RejectionSampler.

Every token of a PTP request is drawn as F^-1(u(seed, position)), with and without drafts, so the
text is the same at any k and in any batch. The runner hands each step's per-row transform and
uniforms to the sampler (`pending_rows`) right before vLLM samples.
"""

from dataclasses import dataclass, field

import torch
from vllm.v1.outputs import SamplerOutput
from vllm.v1.sample.metadata import SamplingMetadata
from vllm.v1.sample.rejection_sampler import RejectionSampler
from vllm.v1.sample.sampler import Sampler
from vllm.v1.spec_decode.metadata import SpecDecodeMetadata

from vllm_ptp import ops, sampling
from vllm_ptp.draft_length import AdaptiveDraftLength, counts_by_position
from vllm_ptp.sampling import SamplingRows


@dataclass
class VerificationStats:
    """Per-engine counters of coupled verification (vLLM's metrics are process-global)."""

    num_drafts: int = 0  # (request, step) pairs that carried drafts
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_lookup_drafts: int = 0  # of num_drafts, those continued by prompt lookup
    accepted_per_position: list[int] = field(default_factory=list)

    def record(
        self,
        num_drafts: torch.Tensor,
        num_accepted: torch.Tensor,
        lookup_rows: torch.Tensor | None = None,
    ) -> None:
        _, accepted = counts_by_position(num_drafts, num_accepted)
        self.num_drafts += int((num_drafts > 0).sum())
        if lookup_rows is not None:
            self.num_lookup_drafts += int(((num_drafts > 0) & lookup_rows).sum())
        self.num_draft_tokens += int(num_drafts.sum())
        self.num_accepted_tokens += int(num_accepted.sum())
        missing = len(accepted) - len(self.accepted_per_position)
        self.accepted_per_position += [0] * max(missing, 0)
        for position, hits in enumerate(accepted):
            self.accepted_per_position[position] += hits

    @property
    def mean_accepted_length(self) -> float:
        """tau: tokens emitted per verification step that carried drafts."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 1.0

    @property
    def acceptance_by_position(self) -> list[float]:
        return [n / self.num_drafts for n in self.accepted_per_position] if self.num_drafts else []


class PTPSampler(Sampler):
    """vLLM's sampler (logprobs, logits processors) with the final draw replaced by F^-1(u)."""

    def __init__(self, logprobs_mode: str):
        super().__init__(logprobs_mode=logprobs_mode)
        self.pending_rows: SamplingRows | None = None

    def take_rows(self, logits: torch.Tensor) -> SamplingRows:
        """The rows the runner prepared for this step, consumed once. vLLM's warm-up runs
        sample dummy logits without any request: those get greedy rows."""
        rows, self.pending_rows = self.pending_rows, None
        num_rows = logits.shape[0]
        if rows is None:
            return SamplingRows.greedy(num_rows, logits.device)
        if rows.u.shape[0] != num_rows:
            raise RuntimeError(
                f"PTP sampling rows out of step: {rows.u.shape[0]} rows for {num_rows} logits"
            )
        return rows

    def sample(
        self,
        logits: torch.Tensor,
        sampling_metadata: SamplingMetadata,
        logprobs_mode_override=None,
    ) -> tuple[torch.Tensor, None]:
        return ops.sample(logits, self.take_rows(logits)), None


class PTPRejectionSampler(RejectionSampler):
    """Coupled verification: the target samples every draft position with the drafter's u and
    the longest prefix of drafts equal to those samples is accepted."""

    sampler: PTPSampler

    def __init__(self, *args, draft_length: AdaptiveDraftLength, **kwargs):
        super().__init__(*args, **kwargs)
        self.stats = VerificationStats()
        self.draft_length = draft_length  # learns from the drafter's drafts
        # Per request of the step: drafts after the first came from prompt lookup. Set by the
        # runner before each verification; those rows would skew the drafter's acceptance rates.
        self.pending_lookup_rows: torch.Tensor | None = None

    def forward(
        self,
        metadata: SpecDecodeMetadata,
        draft_probs: torch.Tensor | None,
        logits: torch.Tensor,
        sampling_metadata: SamplingMetadata,
    ) -> SamplerOutput:
        rows = self.sampler.take_rows(logits)
        num_drafts = torch.tensor(metadata.num_draft_tokens, device=logits.device)
        max_k = metadata.max_spec_len
        first_draft = metadata.cu_num_draft_tokens.long() - num_drafts
        draft_index = (first_draft[:, None] + torch.arange(max_k, device=logits.device)).clamp(
            min=0, max=max(metadata.draft_token_ids.shape[0] - 1, 0)
        )
        draft_tokens = (
            metadata.draft_token_ids.long()[draft_index]
            if metadata.draft_token_ids.numel()
            else torch.full_like(draft_index, sampling.PLACEHOLDER_TOKEN_ID)
        )
        # Logits rows are grouped per request: its draft positions, then its bonus position.
        output, num_accepted = ops.sample_and_verify(logits, rows, draft_tokens, num_drafts)
        lookup_rows, self.pending_lookup_rows = self.pending_lookup_rows, None
        self.stats.record(num_drafts, num_accepted, lookup_rows)
        drafter_rows = ~lookup_rows if lookup_rows is not None else slice(None)
        self.draft_length.record(num_drafts[drafter_rows], num_accepted[drafter_rows])
        output = output.to(torch.int32)

        logprobs_tensors = None
        if sampling_metadata.max_num_logprobs is not None:
            logprobs_tensors = self._get_logprobs_tensors(
                sampling_metadata.max_num_logprobs,
                metadata,
                logits,
                logits[metadata.target_logits_indices].float(),
                logits[metadata.bonus_logits_indices].float(),
                output,
            )
        return SamplerOutput(sampled_token_ids=output, logprobs_tensors=logprobs_tensors)

