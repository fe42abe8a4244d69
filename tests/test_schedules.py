"""Mask schedules against the official formulas (google-research/maskgit, libml/mask_schedule.py),
the official clamp of the re-mask count (libml/parallel_decode.py) and the Halton order."""
import math

import pytest
import torch

from models import NEEDS_N, SCHEDULES, gamma_func, halton_order, masked_count
from models.decoding import halton_sequence


def _official(mode, r, n):
    """The official schedule, written out with math; the lab's three are not clipped."""
    v = {"linear": 1 - r, "cosine": math.cos(math.pi / 2 * r), "square": 1 - r ** 2, "cubic": 1 - r ** 3,
         "sqrt": 1 - math.sqrt(r),
         "log": (-math.log2(r) / math.log2(n)) if r > 0 else math.inf,
         "exp": 1 - 2 ** (-math.log2(n) * (1 - r))}[mode]
    return min(max(v, 1e-6), 1.0) if mode in ("log", "exp") else v


@pytest.mark.parametrize("mode", SCHEDULES)
def test_every_schedule_equals_the_official_formula(mode):
    g = gamma_func(mode)
    for n in (2, 10, 85, 256):
        for r in (0.0, 0.01, 0.1, 0.25, 0.3, 0.5, 0.75, 0.9, 1.0):
            assert g(r, n) == pytest.approx(_official(mode, r, n), rel=1e-12, abs=1e-15), (n, r)
    # tensors of per-image N (decoding) and per-sample (r, N) pairs (MVTM) give the same numbers
    n = torch.tensor([2, 10, 85, 256])
    v = g(0.3, n)
    assert torch.allclose(v, torch.tensor([_official(mode, 0.3, int(k)) for k in n], dtype=torch.float64))
    r = torch.tensor([0.1, 0.5, 0.75, 0.9], dtype=torch.float64)
    v = g(r, n)
    assert torch.allclose(v, torch.tensor([_official(mode, float(a), int(k)) for a, k in zip(r, n)],
                                          dtype=torch.float64))


def test_hand_computed_values():
    assert gamma_func("linear")(0.3) == pytest.approx(0.7)
    assert gamma_func("cosine")(0.3) == pytest.approx(math.cos(math.pi * 0.3 / 2))
    assert gamma_func("square")(0.3) == pytest.approx(1 - 0.09)
    # log, N = 10: -log2(1/4) / log2(10) = 2 / 3.321928 = log10(4)
    assert gamma_func("log")(0.25, 10) == pytest.approx(0.6020599913, abs=1e-9)
    # exp = 1 - N^-(1-r): N = 10, r = 1/2 -> 1 - 1/sqrt(10)
    assert gamma_func("exp")(0.5, 10) == pytest.approx(0.6837722340, abs=1e-9)
    # the figure: after the first of 10 steps on an 85-token hole the official log keeps 52% masked
    assert gamma_func("log")(0.1, 85) == pytest.approx(0.5183, abs=1e-4)
    # the clip to [1e-6, 1]
    assert gamma_func("log")(0.01, 10) == 1.0 and gamma_func("log")(1.0, 10) == 1e-6
    assert gamma_func("exp")(1.0, 10) == 1e-6
    # one token (log2 N = 0): log is 1 before the end, exp is at its floor
    assert gamma_func("log")(0.5, 1) == 1.0 and gamma_func("exp")(0.5, 1) == 1e-6
    with pytest.raises(ValueError, match="depends on N"):
        gamma_func("log")(0.5)
    with pytest.raises(ValueError, match="unknown mask schedule"):
        gamma_func("bogus")


@pytest.mark.parametrize("mode", SCHEDULES)
def test_endpoints_and_monotone(mode):
    """The lab's and the paper's: gamma(0) = 1, gamma(1) = 0. log: 1 and 1e-6 (clip); exp: 1 - 1/N and 1e-6."""
    g, n = gamma_func(mode), 85
    start, end = {"log": (1.0, 1e-6), "exp": (1 - 1 / n, 1e-6)}.get(mode, (1.0, 0.0))
    assert g(0.0, n) == pytest.approx(start, abs=1e-12) and g(1.0, n) == pytest.approx(end, abs=1e-12)
    v = g(torch.linspace(0, 1, 1001, dtype=torch.float64), n)
    assert (v[1:] <= v[:-1] + 1e-12).all()
    if mode not in NEEDS_N:  # no N needed; floats in, float out
        assert isinstance(g(0.5), float) and g(torch.tensor([0.5], dtype=torch.float32)).dtype == torch.float32


def _counts(mode, n_hole, T):
    """Tokens still masked after each step, from masked_count alone."""
    unknown, out = torch.tensor([n_hole]), []
    for t in range(T):
        unknown = masked_count(gamma_func(mode), (t + 1) / T, torch.tensor([n_hole]), unknown)
        out.append(int(unknown))
    return out


# hand-computed: N = 10, T = 4, r = 1/4, 1/2, 3/4, 1; n = max(1, min(unknown - 1, floor(10 gamma))), 0 at the end
HAND_N10_T4 = {
    "linear": [7, 5, 2, 0],  # 7.5, 5, 2.5
    "cosine": [9, 7, 3, 0],  # 9.24, 7.07, 3.83
    "square": [9, 7, 4, 0],  # 9.375, 7.5, 4.375
    "cubic": [9, 8, 5, 0],  # 9.84, 8.75 (clamped to 9 - 1), 5.78
    "sqrt": [5, 2, 1, 0],  # 5, 2.93, 1.34
    "log": [6, 3, 1, 0],  # 10 * log10(4) = 6.02, 10 * log10(2) = 3.01, 10 * log10(4/3) = 1.25
    "exp": [8, 6, 4, 0],  # 10 (1 - 10^-.75) = 8.22, 6.84, 4.38
}


@pytest.mark.parametrize("mode", SCHEDULES)
def test_masked_counts_official_with_clamp_hand_computed(mode):
    assert _counts(mode, 10, 4) == HAND_N10_T4[mode]


def test_clamp_hand_computed_cases():
    # cubic, T = 10: floor(10 gamma) = 9, 9, 9, 9, 8, 7, 6, 4, 2: the clamp commits one token a step
    assert _counts("cubic", 10, 10) == [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    # linear, N = 4, T = 8: floor(4 gamma) = 3, 3, 2, 2, 1, 1, 0: at least one stays masked before the end
    assert _counts("linear", 4, 8) == [3, 2, 1, 1, 1, 1, 1, 0]
    assert _counts("cosine", 1, 3) == [1, 1, 0]  # one token: it waits for the last step (official)
    assert _counts("log", 1, 3) == [1, 1, 0] and _counts("exp", 1, 3) == [1, 1, 0]
    assert _counts("cosine", 0, 3) == [0, 0, 0]  # no hole: nothing ever masked
    assert _counts("exp", 0, 3) == [0, 0, 0] and _counts("log", 0, 3) == [0, 0, 0]


@pytest.mark.parametrize("mode", SCHEDULES)
def test_every_step_commits_and_never_all_early(mode):
    """Every hole size of a 16x16 grid, T = 10: each step before the last commits >= 1 token
    while more than one is left and keeps >= 1 masked; the last unmasks everything."""
    T, n = 10, torch.arange(0, 257)
    unknown = n.clone()
    for t in range(T):
        after = masked_count(gamma_func(mode), (t + 1) / T, n, unknown)
        if t < T - 1:
            assert (after[n > 0] >= 1).all()  # never all early
            assert (after[unknown > 1] < unknown[unknown > 1]).all()  # at least one committed
        else:
            assert (after == 0).all()
        assert (after <= unknown).all() and (after[n == 0] == 0).all()
        unknown = after


def test_halton_sequence_first_values():
    assert halton_sequence(2, 8) == pytest.approx([1 / 2, 1 / 4, 3 / 4, 1 / 8, 5 / 8, 3 / 8, 7 / 8, 1 / 16], abs=0)
    assert halton_sequence(3, 9) == pytest.approx([1 / 3, 2 / 3, 1 / 9, 4 / 9, 7 / 9, 2 / 9, 5 / 9, 8 / 9, 1 / 27],
                                                  rel=1e-15)
    assert halton_sequence(5, 3) == pytest.approx([1 / 5, 2 / 5, 3 / 5])


def test_halton_order_hand_computed_and_a_permutation():
    # 4x4: points (h2, h3) = (1/2, 1/3), (1/4, 2/3), (3/4, 1/9), (1/8, 4/9), (5/8, 7/9), (3/8, 2/9), (7/8, 5/9),
    # (1/16, 8/9) -> (row, col) = (1, 2), (2, 1), (0, 3), (1, 0), (3, 2), (0, 1), (2, 3), (3, 0)
    assert halton_order(4)[:8] == (6, 9, 3, 4, 14, 1, 11, 12)
    # 16x16: (5, 8), (10, 4), (1, 12), (7, 2)
    assert halton_order(16)[:4] == (5 * 16 + 8, 10 * 16 + 4, 1 * 16 + 12, 7 * 16 + 2)
    for side in (1, 2, 3, 4, 5, 16, 22, 25, 32):  # 22, 25: 4 side^2 points miss a cell
        assert sorted(halton_order(side)) == list(range(side * side))
