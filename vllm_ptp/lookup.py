"""Prompt lookup after the first draft: later drafts copied from where the text repeats.

PTP's first draft is (nearly) the target's own next token; its auxiliary rows are much weaker
past the second position. When the context followed by the first draft ends with an n-gram
(2 to 4 tokens) seen earlier in the context, the tokens that followed it there are often the
ones that follow now (code, quotes, lists, rewrites of the prompt), and better drafts than the
auxiliary rows'. Any drafts keep the output exact: coupled verification accepts a draft only
where it equals the target's own sample.

Copy runs: while a request's copied drafts were all accepted in the previous step, the text is
being copied, and the next drafts are copied straight away, without a drafter pass for that
request (at batch 1 that skips the pass: about 40% of a step here).
"""

import numpy as np
from vllm.v1.spec_decode.ngram_proposer import _find_longest_matched_ngram_and_propose_tokens

from vllm_ptp.env import ON_OFF, env_choice

MIN_NGRAM, MAX_NGRAM = 2, 4
PROMPT_LOOKUP_CHOICES = ("all", "greedy", "off")


def prompt_lookup_setting() -> str:
    """`VLLM_PTP_PROMPT_LOOKUP`: which requests get prompt-lookup drafts after their first
    draft: `all` (default), `greedy` requests only, or `off`."""
    return env_choice("VLLM_PTP_PROMPT_LOOKUP", PROMPT_LOOKUP_CHOICES, "all")


def copy_runs_setting() -> bool:
    """`VLLM_PTP_COPY_RUNS`: `on` (default) copies drafts without a drafter pass while the
    previous step's copied drafts were all accepted; `off` always runs the drafter first."""
    return env_choice("VLLM_PTP_COPY_RUNS", ON_OFF, "on") == "on"


def continuation(tokens: np.ndarray, max_drafts: int) -> np.ndarray:
    """Up to `max_drafts` tokens that followed the longest earlier occurrence (the earliest of
    equally long ones) of the n-gram ending `tokens`; empty without one."""
    return _find_longest_matched_ngram_and_propose_tokens(
        origin_tokens=tokens,
        min_ngram=MIN_NGRAM,
        max_ngram=MAX_NGRAM,
        max_model_len=len(tokens) + max_drafts,
        k=max_drafts,
    )


def warm_up() -> None:
    """Compile the numba matcher for vLLM's token dtype before the first request."""
    continuation(np.array([1, 2, 3, 1, 2, 3], dtype=np.int32), 1)
