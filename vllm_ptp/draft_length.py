"""How many drafts are worth proposing, from the acceptance verification has been seeing and
what the passes cost.

Every draft position costs a row in the drafter pass and one in the verification pass, but only
pays off when it is accepted. `AdaptiveDraftLength` keeps a running acceptance rate per draft
position (the fraction of verified requests that accepted a draft there) and proposes the
leading positions whose rate is at least a threshold, plus one probe position past them so
the first rejected position keeps being measured and is taken back when its rate recovers.

The threshold is what a position's rows cost in tokens: a position adds one row per request
to each pass, b seconds in all (`PassCost`: each pass's seconds per row, fitted to its recent
passes), and pays back its acceptance rate r in tokens, so it is worth it while
r / b > the engine's tokens per second. At batch 1 the rows are cheap next to the step and
the throughput is low; with many concurrent requests the passes run out of compute and the
throughput is high, and fewer positions pay off. `min_acceptance` is the floor of the
threshold, and all of it until the passes' rows have varied enough to fit their cost.
The emitted text does not depend on it: coupled sampling draws every token from u(seed,
position), whatever the number of drafts.
"""

import os

import numpy as np
import torch

from vllm_ptp.env import ON_OFF, env_choice

# Rate memory in verification steps (exponential average): long enough to smooth one request's
# luck, short enough to follow a change of prompt mix.
RATE_HALF_LIFE_STEPS = 50
# Cost memory in passes: long enough for a fit to see the row counts vary (requests come and go,
# the draft length moves), short enough to follow a change of load.
COST_HALF_LIFE_PASSES = 200
MIN_COST_PASSES = 20  # passes before a cost fit is trusted
MIN_ROW_VARIANCE = 0.5  # rows² of spread below which a pass's seconds per row are unknown


def min_acceptance_setting(device: torch.device) -> float:
    """`VLLM_PTP_MIN_ACCEPTANCE`: the lowest running acceptance rate a draft position needs to
    be proposed (the floor of the threshold); 0 with VLLM_PTP_DRAFT_COSTS=off proposes all k.
    Default 0.2 on CPU, where the positions between 0.1 and 0.2 cost more than they return
    (benchmarks/results/zen4-min-acceptance-b1 and -b8), and 0.02 elsewhere (rows are nearly
    free at small batch)."""
    default = 0.2 if device.type == "cpu" else 0.02
    value = os.environ.get("VLLM_PTP_MIN_ACCEPTANCE")
    if value is None:
        return default
    try:
        setting = float(value)
    except ValueError:
        setting = -1.0
    if not 0.0 <= setting < 1.0:
        raise ValueError(f"VLLM_PTP_MIN_ACCEPTANCE={value!r} must be a number in [0, 1)")
    return setting


def draft_costs_setting() -> bool:
    """`VLLM_PTP_DRAFT_COSTS`: `on` (default) raises the draft-length threshold above
    VLLM_PTP_MIN_ACCEPTANCE where the passes' rows cost more than a position returns; `off`
    keeps it at VLLM_PTP_MIN_ACCEPTANCE."""
    return env_choice("VLLM_PTP_DRAFT_COSTS", ON_OFF, "on") == "on"


class PassCost:
    """A pass's seconds against its rows, seconds = a + b * rows, by least squares over the
    recent passes (exponentially forgotten); b is `seconds_per_row`."""

    def __init__(self, half_life_passes: int = COST_HALF_LIFE_PASSES):
        self.decay = 0.5 ** (1 / half_life_passes)
        self.num_passes = 0
        self.sums = np.zeros(5)  # weight, rows, seconds, rows², rows * seconds

    def record(self, rows: int, seconds: float) -> None:
        self.num_passes += 1
        self.sums = self.decay * self.sums + (1.0, rows, seconds, rows * rows, rows * seconds)

    @property
    def seconds_per_row(self) -> float | None:
        """b, or None while the rows have not varied enough to tell it from noise."""
        weight, rows, seconds, rows2, rows_seconds = self.sums
        spread = weight * rows2 - rows * rows  # weight² x the variance of the rows
        if self.num_passes < MIN_COST_PASSES or spread < MIN_ROW_VARIANCE * weight * weight:
            return None
        return max((weight * rows_seconds - rows * seconds) / spread, 0.0)


def counts_by_position(
    num_drafts: torch.Tensor, num_accepted: torch.Tensor
) -> tuple[list[int], list[int]]:
    """Per draft position of one verification step: how many requests had a draft there
    (verified) and how many accepted it. Both as long as the most drafts any request had."""
    positions = torch.arange(int(num_drafts.max()) if num_drafts.numel() else 0)
    verified = (num_drafts[None, :] > positions[:, None]).sum(dim=1)
    accepted = (num_accepted[None, :] > positions[:, None]).sum(dim=1)
    return verified.tolist(), accepted.tolist()


class AdaptiveDraftLength:
    """Running acceptance rate per draft position, and the number of drafts it is worth."""

    def __init__(self, max_k: int, min_acceptance: float, draft_costs: bool = True):
        self.min_acceptance = min_acceptance
        self.draft_costs = draft_costs
        self.decay = 0.5 ** (1 / RATE_HALF_LIFE_STEPS)
        # Every position starts at one pseudo-acceptance, so it is tried until about
        # 1 / min_acceptance verifications have shown otherwise.
        self.rates = [1.0] * max_k
        self.counts = [1] * max_k
        self.drafter_cost, self.verify_cost = PassCost(), PassCost()
        # Tokens emitted and seconds taken by the recent decoding steps (exponentially forgotten).
        self.step_tokens = self.step_seconds = 0.0

    @property
    def threshold(self) -> float:
        """The acceptance rate a position needs: `min_acceptance`, or what its rows cost in
        tokens where that is more (see the module docstring)."""
        drafter, verify = self.drafter_cost.seconds_per_row, self.verify_cost.seconds_per_row
        if not self.draft_costs or drafter is None or verify is None or not self.step_seconds:
            return self.min_acceptance
        tokens_per_second = self.step_tokens / self.step_seconds
        return max(self.min_acceptance, (drafter + verify) * tokens_per_second)

    @property
    def num_drafts(self) -> int:
        """Drafts to propose: the leading positions at or above the threshold, plus a probe."""
        threshold = self.threshold
        worth = 0
        while worth < len(self.rates) and self.rates[worth] >= threshold:
            worth += 1
        return min(worth + 1, len(self.rates))

    def record_step(self, tokens: int, seconds: float, verify_rows: int,
                    verify_seconds: float) -> None:
        """One decoding step (no prompt tokens in it): the tokens it emitted, its wall time,
        and its verification pass's rows and seconds."""
        self.step_tokens = self.decay * self.step_tokens + tokens
        self.step_seconds = self.decay * self.step_seconds + seconds
        self.verify_cost.record(verify_rows, verify_seconds)

    def record_drafter_pass(self, rows: int, seconds: float) -> None:
        self.drafter_cost.record(rows, seconds)

    def record(self, num_drafts: torch.Tensor, num_accepted: torch.Tensor) -> None:
        """One verification step: per request, drafts verified and drafts accepted."""
        verified, accepted = counts_by_position(num_drafts, num_accepted)
        for position, (n, hits) in enumerate(zip(verified[: len(self.rates)], accepted)):
            # A running mean over the first steps, then an exponential average.
            self.counts[position] += 1
            weight = max(1 / self.counts[position], 1 - self.decay)
            self.rates[position] += weight * (hits / n - self.rates[position])
