"""How many drafts are worth proposing, from the acceptance verification has been seeing.

Every draft position costs a row in the drafter pass and one in the verification pass, but only
pays off when it is accepted. `AdaptiveDraftLength` keeps a running acceptance rate per draft
position (the fraction of verified requests that accepted a draft there) and proposes the
leading positions whose rate is at least `min_acceptance`, plus one probe position past them so
the first rejected position keeps being measured and is taken back when its rate recovers.
The emitted text does not depend on it: coupled sampling draws every token from u(seed,
position), whatever the number of drafts.
"""

import os

import torch

# Rate memory in verification steps (exponential average): long enough to smooth one request's
# luck, short enough to follow a change of prompt mix.
RATE_HALF_LIFE_STEPS = 50


def min_acceptance_setting(device: torch.device) -> float:
    """`VLLM_PTP_MIN_ACCEPTANCE`: the lowest running acceptance rate a draft position needs to
    be proposed; 0 proposes all k. Default 0.2 on CPU, where the positions between 0.1 and 0.2
    cost more than they return (benchmarks/results/zen4-min-acceptance-b1 and -b8), and 0.02
    elsewhere (rows are nearly free at small batch)."""
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

    def __init__(self, max_k: int, min_acceptance: float):
        self.min_acceptance = min_acceptance
        # Every position starts at one pseudo-acceptance, so it is tried until about
        # 1 / min_acceptance verifications have shown otherwise.
        self.rates = [1.0] * max_k
        self.counts = [1] * max_k
        self.decay = 0.5 ** (1 / RATE_HALF_LIFE_STEPS)

    @property
    def num_drafts(self) -> int:
        """Drafts to propose: the leading positions at or above the threshold, plus a probe."""
        worth = 0
        while worth < len(self.rates) and self.rates[worth] >= self.min_acceptance:
            worth += 1
        return min(worth + 1, len(self.rates))

    def record(self, num_drafts: torch.Tensor, num_accepted: torch.Tensor) -> None:
        """One verification step: per request, drafts verified and drafts accepted."""
        verified, accepted = counts_by_position(num_drafts, num_accepted)
        for position, (n, hits) in enumerate(zip(verified[: len(self.rates)], accepted)):
            # A running mean over the first steps, then an exponential average.
            self.counts[position] += 1
            weight = max(1 / self.counts[position], 1 - self.decay)
            self.rates[position] += weight * (hits / n - self.rates[position])
