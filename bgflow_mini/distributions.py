"""Base (latent) distributions for flows.

All distributions are ``nn.Module`` objects whose tensors are registered buffers
(or parameters), so ``.to(dtype)`` / ``.to(device)`` moves them; samples are
drawn with the dtype/device of those buffers using torch's global RNG (so a
checkpointed ``torch.get_rng_state()`` reproduces a run).

Temperature: ``sample(n, temperature=T)`` and ``log_prob(z, temperature=T)``
refer to the density ``p_T`` whose Gaussian features have their standard
deviation scaled by ``sqrt(T)`` (i.e. ``p_T ~ p^(1/T)`` for a Gaussian).
Uniform (circular) features are unaffected by ``T``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .flows.base import check_batch
from .flows.coupling import as_mask
from .units import wrap_angle

__all__ = ["StandardNormal", "DiagonalNormal", "NormalUniform"]

_LOG_2PI = math.log(2 * math.pi)


def _check_dim(dim: int, who: str) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"{who} dim must be a positive int, got {dim!r}")
    return dim


def _check_n(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"number of samples must be a non-negative int, got {n!r}")
    return n


def _check_temperature(temperature: float) -> float:
    t = float(temperature)
    if not (t > 0 and math.isfinite(t)):
        raise ValueError(f"temperature must be positive and finite, got {temperature!r}")
    return t


def _float_dtype(*values: object) -> torch.dtype:
    """Default dtype, promoted with the dtype of any floating tensor among ``values``."""
    dtype = torch.get_default_dtype()
    for v in values:
        if isinstance(v, Tensor) and v.is_floating_point():
            dtype = torch.promote_types(dtype, v.dtype)
    return dtype


def _vector(
    value: float | Sequence[float] | Tensor | None,
    dim: int,
    default: float,
    name: str,
    dtype: torch.dtype,
) -> Tensor:
    if value is None:
        return torch.full((dim,), default, dtype=dtype)
    t = torch.as_tensor(value, dtype=dtype)
    if t.ndim == 0:
        t = t.expand(dim)
    if t.shape != (dim,):
        raise ValueError(f"{name} must be a scalar or have shape ({dim},), got {tuple(t.shape)}")
    return t.clone()


class DiagonalNormal(nn.Module):
    """Normal distribution with diagonal covariance, ``N(loc, diag(scale**2))``.

    Arguments:
        dim: number of features.
        loc: mean, scalar or ``(dim,)`` (default 0).
        scale: standard deviations > 0, scalar or ``(dim,)`` (default 1). Buffers
            get the default dtype, or a wider one if ``loc``/``scale`` are tensors
            of that dtype (e.g. float64 stays float64).
        learnable: if True, ``loc`` and ``log_scale`` are ``nn.Parameter`` objects,
            otherwise buffers.
    """

    def __init__(
        self,
        dim: int,
        loc: float | Sequence[float] | Tensor | None = None,
        scale: float | Sequence[float] | Tensor | None = None,
        learnable: bool = False,
    ) -> None:
        super().__init__()
        self.dim = _check_dim(dim, type(self).__name__)
        dtype = _float_dtype(loc, scale)
        loc_t = _vector(loc, dim, 0.0, "loc", dtype)
        scale_t = _vector(scale, dim, 1.0, "scale", dtype)
        if not (scale_t > 0).all() or not torch.isfinite(scale_t).all():
            raise ValueError(f"scale must be positive and finite, got {scale_t.tolist()}")
        if not torch.isfinite(loc_t).all():
            raise ValueError(f"loc must be finite, got {loc_t.tolist()}")
        if learnable:
            self.loc = nn.Parameter(loc_t)
            self.log_scale = nn.Parameter(scale_t.log())
        else:
            self.register_buffer("loc", loc_t)
            self.register_buffer("log_scale", scale_t.log())

    @property
    def scale(self) -> Tensor:
        """Standard deviations, shape ``(dim,)``."""
        return self.log_scale.exp()

    def sample(self, n: int, temperature: float = 1.0) -> Tensor:
        """Draw ``n`` samples ``(n, dim)``; std scaled by ``sqrt(temperature)``."""
        n = _check_n(n)
        t = _check_temperature(temperature)
        eps = torch.randn(n, self.dim, dtype=self.loc.dtype, device=self.loc.device)
        return self.loc + math.sqrt(t) * self.scale * eps

    def log_prob(self, z: Tensor, temperature: float = 1.0) -> Tensor:
        """Log-density ``(n,)`` of ``z`` ``(n, dim)`` (std scaled by ``sqrt(temperature)``)."""
        check_batch(z, self.dim, f"{type(self).__name__}.log_prob input")
        t = _check_temperature(temperature)
        log_std = self.log_scale + 0.5 * math.log(t)
        u = (z - self.loc) * torch.exp(-log_std)
        return (-0.5 * u * u - log_std - 0.5 * _LOG_2PI).sum(dim=1)

    def forward(self, z: Tensor) -> Tensor:
        """Same as :meth:`log_prob` at temperature 1."""
        return self.log_prob(z)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class StandardNormal(DiagonalNormal):
    """Standard normal ``N(0, I)`` on ``dim`` features (buffers only, nothing learnable)."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim)


class NormalUniform(nn.Module):
    """Standard normal on non-circular features, uniform on ``[-pi, pi)`` on circular ones.

    The prior for flows with torsion angles. ``log_prob`` is ``-log(2 pi)`` per
    circular feature inside ``[-pi, pi]`` and ``-inf`` outside (the closed interval,
    so an angle of exactly ``+pi`` is not penalised). Temperature scales only the
    Gaussian part.

    Arguments:
        dim: number of features.
        circular: bool mask ``(dim,)`` or indices of the circular features.
    """

    def __init__(self, dim: int, circular: Sequence[bool] | Sequence[int] | Tensor) -> None:
        super().__init__()
        self.dim = _check_dim(dim, type(self).__name__)
        mask = as_mask(circular, dim, "NormalUniform circular")
        self.register_buffer("circular", mask)
        # a float buffer that carries dtype and device (the mask is bool)
        self.register_buffer("_ref", torch.zeros((), dtype=torch.get_default_dtype()), False)

    def sample(self, n: int, temperature: float = 1.0) -> Tensor:
        """Draw ``n`` samples ``(n, dim)``; Gaussian std scaled by ``sqrt(temperature)``."""
        n = _check_n(n)
        t = _check_temperature(temperature)
        kw = {"dtype": self._ref.dtype, "device": self._ref.device}
        gauss = math.sqrt(t) * torch.randn(n, self.dim, **kw)
        unif = wrap_angle((2 * torch.rand(n, self.dim, **kw) - 1) * math.pi)
        return torch.where(self.circular, unif, gauss)

    def log_prob(self, z: Tensor, temperature: float = 1.0) -> Tensor:
        """Log-density ``(n,)`` of ``z`` ``(n, dim)``."""
        check_batch(z, self.dim, f"{type(self).__name__}.log_prob input")
        t = _check_temperature(temperature)
        gauss = -0.5 * z * z / t - 0.5 * math.log(t) - 0.5 * _LOG_2PI
        inside = (z >= -math.pi) & (z <= math.pi)
        unif = torch.full_like(z, -_LOG_2PI).masked_fill(~inside, -math.inf)
        return torch.where(self.circular, unif, gauss).sum(dim=1)

    def forward(self, z: Tensor) -> Tensor:
        """Same as :meth:`log_prob` at temperature 1."""
        return self.log_prob(z)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, circular={torch.nonzero(self.circular).flatten().tolist()}"
