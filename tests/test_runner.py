"""PTPRunnerMixin pieces that need no engine."""

import dataclasses

import torch
from vllm.v1.core.sched.output import SchedulerOutput

from tests.test_verifier import spec_metadata
from vllm_ptp.runner import _decodes_only, _hidden_of_newest_tokens


def test_previous_hidden_comes_from_the_row_that_sampled_the_newest_token():
    # Row r's hidden state is [r, r]. Request 0 drafted 2 tokens and kept 1 (+ its correction),
    # request 1 drafted nothing, request 2 kept all 3 drafts (+ the bonus token).
    rows = torch.arange(8.0)[:, None].expand(-1, 2)
    sampled = [[5, 11], [12], [7, 8, 9, 13]]
    hidden = _hidden_of_newest_tokens(rows, sampled, spec_metadata([[5, 6], [], [7, 8, 9]]))
    assert hidden[:, 0].tolist() == [1.0, 3.0, 7.0]


def test_previous_hidden_without_drafts_is_each_requests_row():
    # A step without drafts has one row per request; a partial prefill samples no token.
    rows = torch.arange(3.0)[:, None]
    assert _hidden_of_newest_tokens(rows, [[4], [], [6]], None)[:, 0].tolist() == [0.0, 1.0, 2.0]


def scheduled(tokens: dict[str, int], drafts: dict[str, list[int]]) -> SchedulerOutput:
    return dataclasses.replace(
        SchedulerOutput.make_empty(), num_scheduled_tokens=tokens,
        total_num_scheduled_tokens=sum(tokens.values()), scheduled_spec_decode_tokens=drafts)


def test_a_step_decodes_only_when_every_request_computes_its_newest_token_and_drafts():
    assert _decodes_only(scheduled({"a": 3, "b": 1}, {"a": [7, 8]}))
    # Request b is a prompt being prefilled (or resumed): its rows are not a decoding step's.
    assert not _decodes_only(scheduled({"a": 3, "b": 40}, {"a": [7, 8]}))
