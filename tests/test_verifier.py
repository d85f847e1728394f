"""PTPRejectionSampler on hand-built spec-decode batches (no engine)."""

import numpy as np
import torch
from vllm.v1.sample.logits_processor import LogitsProcessors
from vllm.v1.sample.metadata import SamplingMetadata
from vllm.v1.spec_decode.metadata import SpecDecodeMetadata

from vllm_ptp import sampling
from vllm_ptp.draft_length import AdaptiveDraftLength
from vllm_ptp.sampling import SamplingRows
from vllm_ptp.verifier import PTPRejectionSampler, PTPSampler

VOCAB = 97


def spec_metadata(drafts: list[list[int]]) -> SpecDecodeMetadata:
    num_drafts = [len(d) for d in drafts]
    num_sampled = [n + 1 for n in num_drafts]
    cu_sampled = np.cumsum(num_sampled)
    bonus = cu_sampled - 1
    target = [start + j for start, n in zip(cu_sampled - num_sampled, num_drafts) for j in range(n)]
    return SpecDecodeMetadata(
        draft_token_ids=torch.tensor(sum(drafts, []), dtype=torch.int32),
        num_draft_tokens=num_drafts,
        cu_num_draft_tokens=torch.tensor(np.cumsum(num_drafts), dtype=torch.int32),
        cu_num_sampled_tokens=torch.tensor(cu_sampled, dtype=torch.int32),
        target_logits_indices=torch.tensor(target, dtype=torch.int32),
        bonus_logits_indices=torch.tensor(bonus, dtype=torch.int32),
        logits_indices=torch.arange(int(cu_sampled[-1]), dtype=torch.int32),
    )


def sampling_metadata(max_num_logprobs: int | None) -> SamplingMetadata:
    return SamplingMetadata(
        temperature=None, all_greedy=False, all_random=False, top_p=None, top_k=None,
        generators={}, max_num_logprobs=max_num_logprobs, no_penalties=True,
        prompt_token_ids=None, frequency_penalties=torch.tensor([]),
        presence_penalties=torch.tensor([]), repetition_penalties=torch.tensor([]),
        output_token_ids=[], allowed_token_ids_mask=None, bad_words_token_ids={},
        logitsprocs=LogitsProcessors(),
    )


def sampled_rows(num_rows: int) -> SamplingRows:
    torch.manual_seed(1)
    temperature = torch.tensor([0.0, 0.0, 0.0, 0.8, 0.8, 1.0][:num_rows])
    return SamplingRows(
        temperature=temperature,
        top_k=torch.zeros(num_rows, dtype=torch.long),
        top_p=torch.full((num_rows,), 0.95),
        min_p=torch.zeros(num_rows),
        u=torch.rand(num_rows),
    )


def verification_step():
    """A verifier with its rows pending, 3 requests' target logits [6, VOCAB], the target's
    sample of every row, and the drafts: request 0 drafts exactly the target's samples (all
    accepted + bonus); request 1's first draft is wrong (the target's token replaces it);
    request 2 has no drafts."""
    torch.manual_seed(0)
    logits = torch.randn(6, VOCAB) * 4
    rows = sampled_rows(6)
    row_tokens = sampling.sample(logits, rows).tolist()
    drafts = [row_tokens[0:2], [(row_tokens[3] + 1) % VOCAB], []]
    sampler = PTPSampler("raw_logprobs")
    draft_length = AdaptiveDraftLength(max_k=2, min_acceptance=0.1)
    verifier = PTPRejectionSampler(sampler, draft_length=draft_length)
    sampler.pending_rows = rows
    return verifier, logits, row_tokens, drafts


def test_coupled_verification_emits_the_targets_own_samples():
    verifier, logits, row_tokens, drafts = verification_step()
    out = verifier(spec_metadata(drafts), None, logits, sampling_metadata(max_num_logprobs=2))
    assert out.sampled_token_ids.tolist() == [
        row_tokens[0:3],
        [row_tokens[3], -1, -1],
        [row_tokens[5], -1, -1],
    ]
    # Logprobs of the emitted tokens are the target's raw log-softmax values.
    logprobs = torch.log_softmax(logits, -1)
    token_logprobs = out.logprobs_tensors.logprobs[:, 0].view(3, 3)
    torch.testing.assert_close(token_logprobs[0], logprobs[[0, 1, 2], row_tokens[0:3]])
    torch.testing.assert_close(token_logprobs[1, 0], logprobs[3, row_tokens[3]])
    assert verifier.sampler.pending_rows is None  # consumed by exactly one sampling call
    # The draft length learned from it: 1 of 2 first drafts and 1 of 1 second drafts accepted.
    assert verifier.draft_length.rates[0] < 1.0 and verifier.draft_length.rates[1] == 1.0


def test_plain_sampler_uses_inverse_cdf_rows():
    torch.manual_seed(0)
    logits = torch.randn(6, VOCAB)
    rows = sampled_rows(6)
    sampler = PTPSampler("raw_logprobs")
    sampler.pending_rows = rows
    out = sampler(logits, sampling_metadata(max_num_logprobs=None))
    assert out.sampled_token_ids[:, 0].tolist() == sampling.sample(logits, rows).tolist()
