"""The temporal density schedule (paper Sec. 3, Eq. 5) and its piecewise-constant training form.

Conventions (flexdit/schedule.py): integer timesteps 0..T, T = 999 = pure noise; r = 1 - M/N;
grid sides scaled by sqrt(1 - r), rounded half up, aspect kept.
"""
import pytest
import torch

from flexdit.errors import FlexDiTError
from flexdit.schedule import (DensitySchedule, FixedGrid, TimestepIntervals, grid_for_rate, parse_density,
                              rate_for_grid)

T = 999
PAPER = DensitySchedule(0.61, 0.86)
ALL_T = torch.arange(T + 1)


def eq5(t: int, r_min: float, r_max: float) -> float:
    """Paper Eq. 5, written out directly (valid for T/4 <= t <= T)."""
    return (4 * T - 4 * t) / (3 * T) * r_min + (4 * t - T) / (3 * T) * r_max


# --- r(t) ----------------------------------------------------------------------------------------
def test_rate_endpoints():
    # r_min on the quarter nearest the data (t < T/4, so up to 249), r_max at pure noise.
    assert PAPER.rate(0).item() == 0.61
    assert PAPER.rate(249).item() == 0.61
    assert PAPER.rate(T).item() == pytest.approx(0.86, abs=1e-12)


@pytest.mark.parametrize("t", [250, 300, 500, 600, 750, 998])
def test_rate_follows_eq5(t):
    assert PAPER.rate(t).item() == pytest.approx(eq5(t, 0.61, 0.86), abs=1e-12)


def test_rate_is_continuous_at_quarter():
    # Eq. 5 gives r_min at t = T/4, so the ramp joins the flat part without a jump.
    assert eq5(T / 4, 0.61, 0.86) == pytest.approx(0.61)
    assert PAPER.rate(250).item() - PAPER.rate(249).item() < 1e-3


def test_rate_accepts_tensors_of_any_shape():
    t = torch.tensor([[0, 999], [500, 600]])
    r = PAPER.rate(t)
    assert r.shape == t.shape and r.dtype == torch.float64


def test_rate_is_monotone_non_decreasing():
    r = PAPER.rate(ALL_T)
    assert bool((r[1:] >= r[:-1]).all())


def test_grid_area_is_monotone_non_increasing():
    # More pruning at noisier steps: the sparse grid never grows as t increases.
    areas = torch.tensor([h * w for h, w in PAPER.grids(ALL_T, (16, 16))])
    assert bool((areas[1:] <= areas[:-1]).all())


def test_constant_rate():
    s = DensitySchedule(0.75, 0.75)
    assert torch.allclose(s.rate(ALL_T), torch.full((T + 1,), 0.75, dtype=torch.float64))


# --- rate -> grid --------------------------------------------------------------------------------
@pytest.mark.parametrize("r, side", [(0.44, 12), (0.61, 10), (0.86, 6)])
def test_paper_grids_at_256px(r, side):
    assert grid_for_rate(r, (16, 16)) == (side, side)


@pytest.mark.parametrize("r, side", [(0.61, 20), (0.86, 12), (0.90, 10), (0.96, 6)])
def test_paper_grids_at_512px(r, side):
    assert grid_for_rate(r, (32, 32)) == (side, side)


def test_schedule_grid_endpoints():
    assert PAPER.grid(0, (16, 16)) == (10, 10)
    assert PAPER.grid(999, (16, 16)) == (6, 6)


def test_from_grids_reproduces_grids():
    s = DensitySchedule.from_grids(10, 6, (16, 16))
    assert s.grid(0, (16, 16)) == (10, 10)
    assert s.grid(999, (16, 16)) == (6, 6)


def test_rate_for_grid_inverts_grid_for_rate():
    for side in range(1, 17):
        assert grid_for_rate(rate_for_grid((side, side), (16, 16)), (16, 16)) == (side, side)


def test_non_square_grid_keeps_aspect():
    assert PAPER.grid(0, (16, 8)) == (10, 5)
    assert PAPER.grid(0, (32, 16)) == (20, 10)
    assert PAPER.grid(999, (32, 16)) == (12, 6)


def test_grid_is_clamped_to_one_token():
    assert grid_for_rate(0.999, (4, 2)) == (1, 1)


# --- piecewise-constant training intervals -------------------------------------------------------
@pytest.mark.parametrize("K", [1, 3, 4, 7])
def test_intervals_cover_timesteps_without_gaps(K):
    intervals = TimestepIntervals(PAPER, K)
    bounds = [intervals.bounds(k) for k in range(K)]
    assert bounds[0][0] == 0 and bounds[-1][1] == T + 1
    assert all(hi == next_lo for (_, hi), (next_lo, _) in zip(bounds, bounds[1:]))
    assert all(lo < hi for lo, hi in bounds)


@pytest.mark.parametrize("K", [1, 3, 4, 7])
def test_interval_of_matches_bounds(K):
    # Every timestep lies in the interval interval_of names, including both ends of every interval.
    intervals = TimestepIntervals(PAPER, K)
    expected = torch.cat([torch.full((hi - lo,), k) for k, (lo, hi) in
                          ((k, intervals.bounds(k)) for k in range(K))])
    got = intervals.interval_of(ALL_T)
    wrong = (got != expected).nonzero().flatten().tolist()
    assert wrong == [], f"interval_of disagrees with bounds at t = {wrong[:5]}"


@pytest.mark.parametrize("K", [3, 4, 7])
def test_interval_grid_is_grid_at_midpoint(K):
    intervals = TimestepIntervals(PAPER, K)
    for k in range(K):
        lo, hi = intervals.bounds(k)
        assert intervals.grid(k, (16, 16)) == PAPER.grid((lo + hi - 1) // 2, (16, 16))


def test_paper_quarters_run_from_dense_to_sparse():
    grids = [TimestepIntervals(PAPER, 4).grid(k, (16, 16)) for k in range(4)]
    assert grids[0] == (10, 10) and grids == sorted(grids, reverse=True)


@pytest.mark.parametrize("K", [3, 4, 7])
def test_sample_stays_in_and_covers_interval(K):
    intervals = TimestepIntervals(PAPER, K)
    g = torch.Generator().manual_seed(0)
    for k in range(K):
        lo, hi = intervals.bounds(k)
        t = intervals.sample(k, 20000, generator=g)
        assert t.dtype == torch.int64 and t.shape == (20000,)
        assert int(t.min()) == lo and int(t.max()) == hi - 1


def test_sample_is_reproducible_with_seed():
    intervals = TimestepIntervals(PAPER, 4)
    a = intervals.sample(2, 100, generator=torch.Generator().manual_seed(5))
    b = intervals.sample(2, 100, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_fixed_grid_ignores_timestep():
    fixed = FixedGrid(8, 6)
    assert fixed.grid(0, (16, 16)) == fixed.grid(999, (16, 16)) == (8, 6)
    assert fixed.grids(torch.tensor([0, 500, 999]), (16, 16)) == [(8, 6)] * 3


def test_parse_density_forms():
    assert parse_density("0.61,0.86") == PAPER
    assert parse_density("0.5") == DensitySchedule(0.5, 0.5)
    assert parse_density(grid="8") == FixedGrid(8, 8)
    assert parse_density(grid="8x6") == FixedGrid(8, 6)
    assert parse_density() is None


# --- errors --------------------------------------------------------------------------------------
def raises(fn, match: str):
    """Assert a one-line FlexDiTError whose message contains `match`."""
    with pytest.raises(FlexDiTError, match=match) as info:
        fn()
    assert "\n" not in str(info.value)


def test_error_r_min_above_r_max():
    raises(lambda: DensitySchedule(0.9, 0.5), "r_min <= r_max")


@pytest.mark.parametrize("r_max", [1.0, 1.5])
def test_error_r_max_not_below_one(r_max):
    raises(lambda: DensitySchedule(0.5, r_max), "r_max < 1")


def test_error_negative_rate():
    raises(lambda: DensitySchedule(-0.1, 0.5), "0 <= r_min")


@pytest.mark.parametrize("t", [-1, 1000, [0, 1000]])
def test_error_timesteps_outside_range(t):
    raises(lambda: PAPER.rate(torch.tensor(t)), "0..999")
    raises(lambda: PAPER.grids(torch.tensor(t).reshape(-1), (16, 16)), "0..999")


def test_error_zero_intervals():
    raises(lambda: TimestepIntervals(PAPER, 0), "number of timestep intervals")


@pytest.mark.parametrize("k", [-1, 4])
def test_error_interval_index_out_of_range(k):
    raises(lambda: TimestepIntervals(PAPER, 4).bounds(k), "does not exist")
    raises(lambda: TimestepIntervals(PAPER, 4).sample(k, 1), "does not exist")


def test_error_unreadable_density():
    raises(lambda: parse_density("a,b"), "cannot read --density")
    raises(lambda: parse_density("0.1,0.2,0.3"), "cannot read --density")


def test_error_unreadable_grid():
    raises(lambda: parse_density(grid="eight"), "cannot read --grid")


def test_error_density_and_grid_together():
    raises(lambda: parse_density("0.61,0.86", "8"), "not both")


def test_error_fixed_grid_larger_than_token_grid():
    raises(lambda: FixedGrid(20, 8).grid(0, (16, 16)), "larger than")
    raises(lambda: FixedGrid(8, 20).grids(torch.tensor([0]), (16, 16)), "larger than")


def test_error_fixed_grid_non_positive():
    raises(lambda: FixedGrid(0, 4), "positive sides")


def test_error_from_grids_that_do_not_fit():
    raises(lambda: DensitySchedule.from_grids(20, 6, (16, 16)), "does not fit")
