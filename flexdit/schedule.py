"""Token density over denoising time (paper Sec. 3, Eq. 5).

Timesteps are integers 0..T with T = 999 the pure-noise end of DiT's 1000-step DDPM schedule.
The pruning rate r = 1 - M/N (M sparse tokens, N dense tokens) is r_min (most tokens) on the quarter
nearest the data, t < T/4, then rises linearly to r_max at t = T:

    r(t) = (4T - 4t) / (3T) * r_min + (4t - T) / (3T) * r_max        for T/4 <= t <= T.

Rounding rule (the paper does not state one): a sparse grid keeps the aspect of the dense grid and
each side is scaled by sqrt(1 - r) and rounded half up, clamped to [1, side]:
    h' = floor(H * sqrt(1 - r) + 1/2),  w' = floor(W * sqrt(1 - r) + 1/2).
At 256 px (16 x 16 tokens) this gives r 0.44 -> 12x12, 0.61 -> 10x10, 0.86 -> 6x6, the paper's grids;
at 512 px (32 x 32): 0.61 -> 20x20, 0.86 -> 12x12, 0.90 -> 10x10, 0.96 -> 6x6.

Training uses the piecewise-constant form: [0, T] is cut into K equal intervals of integer timesteps,
each has the grid of its midpoint timestep, and a process draws t uniformly inside one interval,
so a batch runs at one token count while t stays uniform over all processes.
"""
import math
from dataclasses import dataclass

import torch

from flexdit.errors import FlexDiTError
from flexdit.nn.density import Grid

NUM_TIMESTEPS = 1000
T_MAX = NUM_TIMESTEPS - 1


def grid_for_rate(r: float, dense_grid: Grid) -> Grid:
    """The sparse grid for pruning rate r on a dense (H, W) token grid (rounding rule above)."""
    keep = math.sqrt(max(0.0, 1.0 - r))
    return tuple(min(side, max(1, math.floor(side * keep + 0.5))) for side in dense_grid)


def rate_for_grid(grid: Grid, dense_grid: Grid) -> float:
    return 1.0 - (grid[0] * grid[1]) / (dense_grid[0] * dense_grid[1])


def _check_timesteps(t: torch.Tensor | int) -> torch.Tensor:
    t = torch.as_tensor(t)
    if t.is_floating_point():
        t = t.round()
    t = t.long()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) > T_MAX):
        raise FlexDiTError(f"timesteps must lie in 0..{T_MAX}, got {int(t.min())}..{int(t.max())}")
    return t


@dataclass(frozen=True)
class DensitySchedule:
    """Pruning rate r(t) in [r_min, r_max] (Eq. 5); r_min = r_max is a constant rate."""

    r_min: float
    r_max: float

    def __post_init__(self):
        if not (0.0 <= self.r_min <= self.r_max < 1.0):
            raise FlexDiTError(
                f"density needs 0 <= r_min <= r_max < 1, got r_min={self.r_min}, r_max={self.r_max}; "
                "e.g. --density 0.61,0.86"
            )

    @classmethod
    def from_grids(cls, near_data: int | Grid, at_noise: int | Grid, dense_grid: Grid) -> "DensitySchedule":
        """From grid sides: `near_data` tokens for t < T/4 and `at_noise` at t = T (e.g. 10 and 6 at 256 px)."""
        near, noise = (g if isinstance(g, tuple) else (g, g) for g in (near_data, at_noise))
        for g in (near, noise):
            if not (1 <= g[0] <= dense_grid[0] and 1 <= g[1] <= dense_grid[1]):
                raise FlexDiTError(f"sparse grid {g[0]}x{g[1]} does not fit the {dense_grid[0]}x{dense_grid[1]} "
                                   "token grid; choose sides between 1 and the token grid's")
        return cls(rate_for_grid(near, dense_grid), rate_for_grid(noise, dense_grid))

    def rate(self, t: torch.Tensor | int) -> torch.Tensor:
        """r(t) for integer timesteps (any shape) as float64."""
        t = _check_timesteps(t).double()
        ramp = ((4 * T_MAX - 4 * t) * self.r_min + (4 * t - T_MAX) * self.r_max) / (3 * T_MAX)
        return torch.where(t < T_MAX / 4, torch.full_like(t, self.r_min), ramp)

    def grid(self, t: int, dense_grid: Grid) -> Grid:
        return grid_for_rate(float(self.rate(t)), dense_grid)

    def grids(self, t: torch.Tensor, dense_grid: Grid) -> list[Grid]:
        return [grid_for_rate(r, dense_grid) for r in self.rate(t).tolist()]

    def to_dict(self) -> dict:
        return {"r_min": self.r_min, "r_max": self.r_max}


@dataclass(frozen=True)
class FixedGrid:
    """The same sparse grid at every timestep (the released code's behaviour; the paper's fixed ablation)."""

    height: int
    width: int

    def __post_init__(self):
        if self.height < 1 or self.width < 1:
            raise FlexDiTError(f"a sparse grid needs positive sides, got {self.height}x{self.width}")

    def grid(self, t: int, dense_grid: Grid) -> Grid:
        _check_timesteps(t)
        if self.height > dense_grid[0] or self.width > dense_grid[1]:
            raise FlexDiTError(f"sparse grid {self.height}x{self.width} is larger than the "
                               f"{dense_grid[0]}x{dense_grid[1]} token grid; choose a smaller --grid")
        return (self.height, self.width)

    def grids(self, t: torch.Tensor, dense_grid: Grid) -> list[Grid]:
        return [self.grid(0, dense_grid)] * _check_timesteps(t).numel()

    def to_dict(self) -> dict:
        return {"grid": [self.height, self.width]}


Density = DensitySchedule | FixedGrid


def density_from_dict(spec: dict | None) -> Density | None:
    if spec is None:
        return None
    if "grid" in spec:
        return FixedGrid(*spec["grid"])
    return DensitySchedule(spec["r_min"], spec["r_max"])


def parse_density(density: str | None = None, grid: str | None = None) -> Density | None:
    """Command-line forms: --density R_MIN,R_MAX (or one R) | --grid G or HxW."""
    if density is not None and grid is not None:
        raise FlexDiTError("give either --density or --grid, not both")
    if density is not None:
        try:
            values = [float(v) for v in density.split(",")]
        except ValueError:
            values = []
        if len(values) not in (1, 2):
            raise FlexDiTError(f"cannot read --density {density!r}; expected R_MIN,R_MAX such as 0.61,0.86")
        return DensitySchedule(values[0], values[-1])
    if grid is not None:
        try:
            sides = [int(v) for v in grid.lower().split("x")]
        except ValueError:
            sides = []
        if len(sides) not in (1, 2):
            raise FlexDiTError(f"cannot read --grid {grid!r}; expected a side such as 8 or HxW such as 8x6")
        return FixedGrid(sides[0], sides[-1])
    return None


@dataclass(frozen=True)
class TimestepIntervals:
    """K equal intervals of the integer timesteps 0..T, each run at the grid of its midpoint."""

    schedule: Density
    num_intervals: int = 4

    def __post_init__(self):
        if not 1 <= self.num_intervals <= NUM_TIMESTEPS:
            raise FlexDiTError(f"the number of timestep intervals must lie in 1..{NUM_TIMESTEPS}, "
                               f"got {self.num_intervals}")

    def bounds(self, k: int) -> tuple[int, int]:
        """Interval k as [lo, hi): integers lo..hi-1."""
        if not 0 <= k < self.num_intervals:
            raise FlexDiTError(f"interval {k} does not exist; there are {self.num_intervals}")
        return (k * NUM_TIMESTEPS // self.num_intervals, (k + 1) * NUM_TIMESTEPS // self.num_intervals)

    def interval_of(self, t: torch.Tensor | int) -> torch.Tensor:
        """The k whose bounds(k) holds t (the inverse of bounds' floor(k * 1000 / K))."""
        return ((_check_timesteps(t) + 1) * self.num_intervals - 1) // NUM_TIMESTEPS

    def grid(self, k: int, dense_grid: Grid) -> Grid:
        lo, hi = self.bounds(k)
        return self.schedule.grid((lo + hi - 1) // 2, dense_grid)

    def sample(self, k: int, n: int, generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> torch.Tensor:
        """n timesteps drawn uniformly from interval k."""
        lo, hi = self.bounds(k)
        return torch.randint(lo, hi, (n,), generator=generator).to(device)
