import torch

from vllm_ptp import rng


def test_philox_matches_random123_known_answers():
    # Known-answer vectors of Philox4x32-10 from the Random123 distribution (kat_vectors).
    zero = torch.zeros(1, dtype=torch.long)
    ones = torch.full((1,), 0xFFFFFFFF, dtype=torch.long)
    assert [int(w) for w in rng.philox4x32((zero,) * 4, (zero,) * 2)] == [
        0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8,
    ]
    assert [int(w) for w in rng.philox4x32((ones,) * 4, (ones,) * 2)] == [
        0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD,
    ]


def test_uniforms_are_a_pure_function_of_seed_and_position():
    positions = torch.arange(1000)
    u = rng.uniforms(torch.tensor(7), positions)
    assert torch.equal(u, rng.uniforms(torch.tensor(7), positions))
    # Any subset or order of (seed, position) pairs gives the same values.
    subset = torch.tensor([5, 3, 999])
    assert torch.equal(u[subset], rng.uniforms(torch.tensor(7), subset))
    assert not torch.equal(u, rng.uniforms(torch.tensor(8), positions))
    assert u.dtype == torch.float32 and (u >= 0).all() and (u < 1).all()


def test_uniforms_look_uniform():
    u = rng.uniforms(torch.tensor(123456789), torch.arange(200_000))
    counts = torch.histc(u, bins=20, min=0, max=1)
    expected = len(u) / 20
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 50  # 19 dof: p ~ 1e-4 at 43.8
    assert abs(float(u.mean()) - 0.5) < 0.005


def test_large_seeds_and_positions_use_all_bits():
    a = rng.uniforms(torch.tensor(1), torch.tensor([1 << 33]))
    b = rng.uniforms(torch.tensor(1), torch.tensor([0]))
    c = rng.uniforms(torch.tensor((1 << 40) + 1), torch.tensor([0]))
    assert not torch.equal(a, b) and not torch.equal(b, c)


def test_request_id_seeds_are_stable_and_distinct():
    assert rng.seed_from_request_id("req-1") == rng.seed_from_request_id("req-1")
    assert rng.seed_from_request_id("req-1") != rng.seed_from_request_id("req-2")
    assert 0 <= rng.seed_from_request_id("x") < (1 << 63)
    assert rng.normalize_seed(-1) == (1 << 63) - 1
