"""Counter-based planner noise: exact hash, Gaussian, independent per key, the same alone or in a batch."""

import torch

from planners.noise import mix32, problem_keys, standard_normal
from worldmodel.sigreg import epps_pulley


def reference_mix32(x: int) -> int:
    """The hash in plain unsigned Python arithmetic."""
    m = 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & m
    x ^= x >> 15
    x = (x * 0x846CA68B) & m
    return x ^ (x >> 16)


def test_hash_matches_unsigned_reference():
    values = [0, 1, 2, 12345, 0x7FFFFFFF, 0x80000000, 0xDEADBEEF, 0xFFFFFFFF]
    signed = torch.tensor([v - (1 << 32) if v >= 1 << 31 else v for v in values], dtype=torch.int32)
    got = [int(v) & 0xFFFFFFFF for v in mix32(signed)]
    assert got == [reference_mix32(v) for v in values]


def test_noise_is_standard_normal():
    x = standard_normal(problem_keys(0, range(8)), 3, (500, 10))  # (8, 500, 10)
    assert x.shape == (8, 500, 10) and x.dtype == torch.float32
    flat = x.reshape(8, -1)
    assert flat.mean().abs() < 0.02 and (flat.std() - 1).abs() < 0.02
    assert epps_pulley(flat).max() < 5  # each row passes a normality test (about 1 in expectation)


def test_rows_are_independent_and_depend_only_on_their_key():
    keys = problem_keys(1, range(6))
    x = standard_normal(keys, 0, (4000,))  # (6, 4000)
    corr = torch.corrcoef(x)
    assert (corr - torch.eye(6)).abs().max() < 0.06
    for b in (0, 4):  # alone, a problem gets the same noise as inside the batch
        assert torch.equal(standard_normal(keys[b:b + 1], 0, (4000,))[0], x[b])
    assert not torch.equal(standard_normal(keys, 1, (4000,)), x)  # another stream, other noise


def test_keys_are_deterministic_and_distinct():
    assert torch.equal(problem_keys(3, [0, 1, 2]), problem_keys(3, [0, 1, 2]))
    assert len(set(problem_keys(3, range(100)).tolist())) == 100
    assert not torch.equal(problem_keys(3, [0]), problem_keys(4, [0]))
