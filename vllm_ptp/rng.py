"""Counter-based uniforms u(seed, position): Philox4x32-10 in plain torch integer ops.

u is a pure function of (seed, position), so the drafter and the verifier agree without sharing
state, every rank computes the same value, and preemption or recompute change nothing. The bit
pattern is defined exactly (no float maths until the last step), so the C++ and CUDA kernels can
match it bit for bit.
"""

import hashlib

import torch

_MASK32 = 0xFFFFFFFF
_PHILOX_M0 = 0xD2511F53
_PHILOX_M1 = 0xCD9E8D57
_PHILOX_W0 = 0x9E3779B9
_PHILOX_W1 = 0xBB67AE85
_ROUNDS = 10
# u = top 24 bits / 2**24: exactly representable in float32, so u < 1 always holds.
_U_BITS = 24
# The u a greedy request's auxiliary rows carry: it has none, and the drafter's u-embedding gives
# this marker a learned vector of its own.
GREEDY_U = -1.0


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # int64 multiplication wraps modulo 2**64, which keeps all 64 bits of the unsigned product.
    product = b * a
    return (product >> 32) & _MASK32, product & _MASK32


def philox4x32(
    counter: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    key: tuple[torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32-10 (Salmon et al., 2011) on int64 tensors holding 32-bit words."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(_ROUNDS):
        hi0, lo0 = _mulhilo(_PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(_PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _PHILOX_W0) & _MASK32
        k1 = (k1 + _PHILOX_W1) & _MASK32
    return c0, c1, c2, c3


def uniforms(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """u(seed, position) in [0, 1) as float32; `seeds` and `positions` broadcast (int64)."""
    seeds, positions = torch.broadcast_tensors(seeds.long(), positions.long())
    zero = torch.zeros_like(positions)
    counter = (positions & _MASK32, (positions >> 32) & _MASK32, zero, zero)
    key = (seeds & _MASK32, (seeds >> 32) & _MASK32)
    word = philox4x32(counter, key)[0]
    return (word >> (32 - _U_BITS)).to(torch.float32) * (1.0 / (1 << _U_BITS))


def seed_from_request_id(request_id: str) -> int:
    """A seed for unseeded requests: identical on every rank, different per request."""
    digest = hashlib.blake2b(request_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def normalize_seed(seed: int) -> int:
    """Map any Python int seed onto the int64 range Philox keys use (two 32-bit words)."""
    return seed & ((1 << 63) - 1)
