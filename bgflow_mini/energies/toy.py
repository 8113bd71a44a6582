"""Toy energies with exact references: a double well and the Müller–Brown potential.

Both return reduced energies u(x) = E(x)/kT of shape ``(batch,)``, follow the dtype
and device of ``x`` and are differentiable. Exact free energies (in kT) are computed
by numerical quadrature with numpy/scipy, so estimators can be checked against them.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.integrate import quad, simpson
from scipy.special import logsumexp
from torch import Tensor

from .base import Energy

__all__ = ["DoubleWell", "MuellerBrown", "ToyEnergy"]

# half-width of the state ranges of the toys: far outside any sample (u ~ x^4 there)
_FAR = 1.0e3


class ToyEnergy(Energy):
    """An analytic energy that is its own target: named CVs, two states A and B, and the
    exact ``ΔF = F_B - F_A`` (kT) between them, so toys and molecules share one interface.

    Subclasses set :attr:`name` and implement :attr:`cvs`, :attr:`states`,
    :meth:`free_energy_difference` and :attr:`init_args` (the constructor arguments,
    to rebuild the energy from a checkpoint).
    """

    name = "toy"
    default_states = ("A", "B")

    @property
    def cvs(self) -> dict[str, dict]:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def states(self) -> dict[str, dict[str, list[float]]]:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def init_args(self) -> dict[str, float | int]:  # pragma: no cover - abstract
        raise NotImplementedError

    def free_energy_difference(self) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def reference_delta_f(self, state_a: str, state_b: str) -> float | None:
        """Exact ``F(state_b) - F(state_a)`` in kT for the states A/B, else None."""
        if (state_a, state_b) == ("A", "B"):
            return float(self.free_energy_difference())
        if (state_a, state_b) == ("B", "A"):
            return -float(self.free_energy_difference())
        return None


class DoubleWell(ToyEnergy):
    """Double well along ``x1`` with harmonic remaining coordinates.

    E(x) = a x1^4 - b x1^2 + c x1 + d/2 * sum_{i>=2} x_i^2, returned as E/kT.
    With the defaults (a=1, b=6, c=1, d=1, kT=1) the left well (x1 < 0, state A)
    is deeper; ΔF = F_B - F_A = -ln(P(x1>0)/P(x1<0)) = 3.380 kT.

    Arguments:
        a, b, c, d: coefficients (energy units); ``a > 0`` and ``d > 0`` are needed
            for a normalisable density.
        kT: thermal energy in the same units.
        dim: total number of coordinates (>= 1).

    CVs: ``x1`` (and ``x2`` when ``dim >= 2``); states ``A`` (x1 < 0) and ``B`` (x1 >= 0).
    """

    name = "double_well"

    def __init__(
        self,
        a: float = 1.0,
        b: float = 6.0,
        c: float = 1.0,
        d: float = 1.0,
        kT: float = 1.0,
        dim: int = 2,
    ) -> None:
        super().__init__(dim)
        if a <= 0 or d <= 0 or kT <= 0:
            raise ValueError(f"need a > 0, d > 0, kT > 0; got a={a}, d={d}, kT={kT}")
        self.a, self.b, self.c, self.d, self.kT = map(float, (a, b, c, d, kT))

    @property
    def init_args(self) -> dict[str, float | int]:
        return {"a": self.a, "b": self.b, "c": self.c, "d": self.d, "kT": self.kT, "dim": self.dim}

    @property
    def cvs(self) -> dict[str, dict]:
        return {f"x{i + 1}": {"type": "coordinate", "index": i} for i in range(min(self.dim, 2))}

    @property
    def states(self) -> dict[str, dict[str, list[float]]]:
        return {"A": {"x1": [-_FAR, 0.0]}, "B": {"x1": [0.0, _FAR]}}

    def _energy(self, x: Tensor) -> Tensor:
        x1 = x[:, 0]
        e = self.a * x1**4 - self.b * x1**2 + self.c * x1
        if self.dim > 1:
            e = e + 0.5 * self.d * (x[:, 1:] ** 2).sum(dim=1)
        return e / self.kT

    @staticmethod
    def in_state_a(x: Tensor | np.ndarray) -> Tensor | np.ndarray:
        """Boolean mask (batch,) of state A (x1 < 0, the deeper well)."""
        return x[:, 0] < 0

    # ---- exact references (numpy / scipy) ---------------------------------------------
    def _u1(self, x1: np.ndarray | float) -> np.ndarray:
        """Reduced 1-D energy of ``x1`` (numpy), without the harmonic part."""
        x1 = np.asarray(x1, dtype=np.float64)
        return (self.a * x1**4 - self.b * x1**2 + self.c * x1) / self.kT

    def _u1_min(self) -> float:
        grid = np.linspace(-50.0, 50.0, 200001)
        return float(self._u1(grid).min())

    def _log_z1_parts(self) -> tuple[float, float]:
        """ln of ∫_{-inf}^0 and ∫_0^{inf} of exp(-u1(x1)) dx1, by adaptive quadrature."""
        umin = self._u1_min()

        def f(t: float) -> float:
            return math.exp(-(float(self._u1(t)) - umin))

        left = quad(f, -np.inf, 0.0, limit=200, epsabs=0.0, epsrel=1e-12)[0]
        right = quad(f, 0.0, np.inf, limit=200, epsabs=0.0, epsrel=1e-12)[0]
        return math.log(left) - umin, math.log(right) - umin

    def log_partition(self) -> float:
        """ln Z = ln ∫ exp(-u(x)) dx over all ``dim`` coordinates."""
        lz_left, lz_right = self._log_z1_parts()
        lz1 = float(np.logaddexp(lz_left, lz_right))
        return lz1 + 0.5 * (self.dim - 1) * math.log(2.0 * math.pi * self.kT / self.d)

    def free_energy_difference(self) -> float:
        """ΔF = -ln(P(x1 > 0) / P(x1 < 0)) in kT (exact, by quadrature)."""
        lz_left, lz_right = self._log_z1_parts()
        return lz_left - lz_right

    def marginal_free_energy(self, x1: np.ndarray) -> np.ndarray:
        """-ln p(x1) of the normalised marginal density of ``x1`` (kT), any shape."""
        lz = float(np.logaddexp(*self._log_z1_parts()))
        return self._u1(x1) + lz

    def sample(self, n: int, seed: int | None = None, dtype: torch.dtype = torch.float64) -> Tensor:
        """Draw ``n`` i.i.d. samples (n, dim) from exp(-u): x1 by inverse CDF on a fine grid
        (1e6 points, linear interpolation), the other coordinates exactly Gaussian."""
        rng = np.random.default_rng(seed)
        umin = self._u1_min()
        # support where exp(-(u - umin)) > 1e-30
        grid = np.linspace(-50.0, 50.0, 200001)
        keep = grid[self._u1(grid) - umin < 70.0]
        g = np.linspace(keep[0] - 0.01, keep[-1] + 0.01, 1_000_001)
        p = np.exp(-(self._u1(g) - umin))
        cdf = np.concatenate([[0.0], np.cumsum(0.5 * (p[1:] + p[:-1]) * np.diff(g))])
        cdf /= cdf[-1]
        x1 = np.interp(rng.random(n), cdf, g)
        rest = rng.normal(0.0, math.sqrt(self.kT / self.d), size=(n, self.dim - 1))
        return torch.as_tensor(np.column_stack([x1, rest]), dtype=dtype)


# (A, a, b, c, x0, y0) of the four Müller–Brown terms
_MB_TERMS = (
    (-200.0, -1.0, 0.0, -10.0, 1.0, 0.0),
    (-100.0, -1.0, 0.0, -10.0, 0.0, 0.5),
    (-170.0, -6.5, 11.0, -6.5, -0.5, 1.5),
    (15.0, 0.7, 0.6, 0.7, -1.0, 1.0),
)


def _mb_numpy(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Unscaled Müller–Brown potential V(x, y) on numpy arrays (broadcast)."""
    v = np.zeros(np.broadcast(x, y).shape)
    for A, a, b, c, x0, y0 in _MB_TERMS:
        dx, dy = x - x0, y - y0
        v = v + A * np.exp(a * dx * dx + b * dx * dy + c * dy * dy)
    return v


class MuellerBrown(ToyEnergy):
    """Müller–Brown potential (2-D), u = scale * V(x, y) / kT.

    V = sum_k A_k exp(a_k (x-x0_k)^2 + b_k (x-x0_k)(y-y0_k) + c_k (y-y0_k)^2) with the
    standard constants. Minima of V: (-0.558, 1.442) V=-146.70, (0.623, 0.028)
    V=-108.17, (-0.050, 0.467) V=-80.77.

    States for free energies use the linear collective variable s = y - x:
    state A = {s > split} holds the deepest minimum (s = 2.0), state B = {s < split}
    the other two minima. The default ``split = 1.4`` is the top of the free-energy
    barrier along s (scale=0.1, kT=1); the saddle (-0.822, 0.624) between the deep and
    the middle minimum lies at s = 1.446. With scale=0.1, kT=1: ΔF = F_B - F_A = 3.6386 kT
    (see :meth:`free_energy_difference`).

    CVs: ``x``, ``y`` and ``s = y - x``; states ``A`` (s >= split) and ``B`` (s < split).
    """

    name = "mueller_brown"

    def __init__(self, scale: float = 0.1, kT: float = 1.0, split: float = 1.4) -> None:
        super().__init__(2)
        if kT <= 0:
            raise ValueError(f"kT must be > 0, got {kT}")
        self.scale, self.kT, self.split = float(scale), float(kT), float(split)

    @property
    def init_args(self) -> dict[str, float | int]:
        return {"scale": self.scale, "kT": self.kT, "split": self.split}

    @property
    def cvs(self) -> dict[str, dict]:
        return {
            "x": {"type": "coordinate", "index": 0},
            "y": {"type": "coordinate", "index": 1},
            "s": {"type": "linear", "coefficients": [-1.0, 1.0]},
        }

    @property
    def states(self) -> dict[str, dict[str, list[float]]]:
        return {"A": {"s": [self.split, _FAR]}, "B": {"s": [-_FAR, self.split]}}

    def _energy(self, x: Tensor) -> Tensor:
        px, py = x[:, 0], x[:, 1]
        v = torch.zeros_like(px)
        for A, a, b, c, x0, y0 in _MB_TERMS:
            dx, dy = px - x0, py - y0
            v = v + A * torch.exp(a * dx * dx + b * dx * dy + c * dy * dy)
        return v * (self.scale / self.kT)

    @staticmethod
    def cv(x: Tensor | np.ndarray) -> Tensor | np.ndarray:
        """Collective variable s = y - x of configurations (batch, 2) -> (batch,)."""
        return x[:, 1] - x[:, 0]

    def in_state_a(self, x: Tensor | np.ndarray) -> Tensor | np.ndarray:
        """Boolean mask (batch,) of state A (s > split, the deepest minimum)."""
        return self.cv(x) > self.split

    # ---- exact references: quadrature in (s, t) = (y - x, y + x), dx dy = ds dt / 2 ---
    def _u_st(self, s: np.ndarray, t: np.ndarray) -> np.ndarray:
        return self.scale * _mb_numpy((t - s) / 2.0, (t + s) / 2.0) / self.kT

    def _resolution(self) -> int:
        """Grid points per unit length: ~130 at scale/kT = 0.1, finer for sharper wells."""
        return int(130 * max(1.0, math.sqrt(10.0 * self.scale / self.kT)))

    def _log_marginal_s_unnorm(self, s: np.ndarray) -> np.ndarray:
        """ln ∫ exp(-u) dt / 2 at each ``s`` (1-D array), Simpson's rule in t."""
        t = np.linspace(-7.0, 7.0, 14 * self._resolution() + 1)
        out = np.empty(s.shape[0])
        for i in range(0, s.shape[0], 256):  # chunks bound the memory
            u = self._u_st(s[i : i + 256, None], t[None, :])
            edge = np.minimum(u[:, 0], u[:, -1])
            if (edge - u.min(axis=1) < 60.0).any():
                raise RuntimeError("Müller–Brown quadrature box too small for this kT/scale")
            shift = u.min(axis=1, keepdims=True)
            integral = simpson(np.exp(-(u - shift)), x=t, axis=1)
            with np.errstate(divide="ignore"):
                out[i : i + 256] = np.log(integral) - shift[:, 0] - math.log(2.0)
        return out

    def _log_z_range(self, lo: float, hi: float) -> float:
        s = np.linspace(lo, hi, max(int((hi - lo) * self._resolution()), 200) | 1)
        lm = self._log_marginal_s_unnorm(s)
        m = lm.max()
        return float(m + np.log(simpson(np.exp(lm - m), x=s)))

    _S_LO, _S_HI = -4.0, 7.0

    def log_partition(self) -> float:
        """ln Z = ln ∫∫ exp(-u(x, y)) dx dy (2-D quadrature)."""
        lo = self._log_z_range(self._S_LO, self.split)
        hi = self._log_z_range(self.split, self._S_HI)
        return float(np.logaddexp(lo, hi))

    def free_energy_difference(self, split: float | None = None) -> float:
        """ΔF = -ln(P(s < split) / P(s > split)) = F_B - F_A in kT, s = y - x."""
        split = self.split if split is None else float(split)
        lz_a = self._log_z_range(split, self._S_HI)
        lz_b = self._log_z_range(self._S_LO, split)
        return lz_a - lz_b

    def cv_free_energy(self, s: np.ndarray) -> np.ndarray:
        """-ln p(s) of the normalised marginal density of s = y - x (kT), 1-D input."""
        s = np.asarray(s, dtype=np.float64)
        return -(self._log_marginal_s_unnorm(s.ravel()).reshape(s.shape) - self.log_partition())

    def log_partition_grid(self, n: int = 1501) -> float:
        """ln Z by a plain Riemann sum on an ``n x n`` (x, y) grid (an independent check)."""
        xs = np.linspace(-3.5, 2.5, n)
        ys = np.linspace(-2.5, 3.5, n)
        u = self.scale * _mb_numpy(xs[:, None], ys[None, :]) / self.kT
        return float(logsumexp(-u) + math.log((xs[1] - xs[0]) * (ys[1] - ys[0])))
