"""PTPRunnerMixin pieces that need no engine."""

import torch

from tests.test_verifier import spec_metadata
from vllm_ptp.runner import _hidden_of_newest_tokens


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
