"""Coupling layers (RealNVP affine, NICE additive, neural spline) with circular features.

A coupling layer splits features by a boolean ``mask``: ``True`` = transformed
(``b``), ``False`` = conditioning (``a``, passed through unchanged). A conditioner
:class:`~bgflow_mini.flows.nets.MLP` maps the conditioning features to the
parameters of an elementwise bijection of the transformed features.

Circular features (angles on ``[-pi, pi)``, e.g. torsions) are marked by
``circular`` (a boolean mask or a list of indices):

* the conditioner sees ``(cos a, sin a)`` of each circular conditioning feature
  instead of the raw angle, so it is 2 pi-periodic in them;
* in :class:`AffineCoupling` a transformed circular feature goes through a
  circular rational-quadratic spline plus a rotation
  (:func:`~bgflow_mini.flows.circular.circular_spline`), a smooth circle
  diffeomorphism whose density is continuous across the cut at ``+-pi``;
* in :class:`AdditiveCoupling` it is rotated, ``x_b = wrap_angle(z_b + t(z_a))``
  (volume preserving).

Non-circular transformed features: affine ``x_b = z_b * exp(s) + t`` with the
log-scale kept tame by ``s = a * tanh(raw)`` (``a`` a learnable per-feature
bound, initialised to 1), additive ``x_b = z_b + t``, or (:class:`SplineCoupling`) a
rational-quadratic spline on ``[-B, B]`` with identity tails
(:func:`~bgflow_mini.flows.spline.bounded_spline`). The conditioner's last
layer is zero at initialisation, so every fresh layer is the identity.

Masks (not permutations) are used, so features keep their positions and the
circular mask stays valid through a whole stack built by :func:`coupling_flow`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ..units import wrap_angle
from . import native
from .base import Flow, Sequential, check_batch
from .circular import circular_spline, n_circular_spline_params
from .nets import MLP
from .spline import TAIL_BOUND, bounded_spline, n_bounded_spline_params

__all__ = ["AffineCoupling", "AdditiveCoupling", "SplineCoupling", "coupling_flow", "as_mask"]

_KINDS = ("rnvp", "nice", "spline")


def as_mask(spec: Sequence[bool] | Sequence[int] | Tensor | None, dim: int, name: str) -> Tensor:
    """Turn a boolean mask of length ``dim`` or a list of indices into a bool tensor ``(dim,)``.

    ``None`` or an empty list gives an all-``False`` mask.
    """
    if spec is None:
        return torch.zeros(dim, dtype=torch.bool)
    t = torch.as_tensor(spec).detach().cpu()
    if t.numel() == 0:
        return torch.zeros(dim, dtype=torch.bool)
    if t.ndim != 1:
        raise ValueError(
            f"{name} must be 1-D (bool mask or index list), got shape {tuple(t.shape)}"
        )
    if t.dtype == torch.bool:
        if t.numel() != dim:
            raise ValueError(f"{name} is a bool mask of length {t.numel()}, expected dim={dim}")
        return t.clone()
    if t.is_floating_point() or t.is_complex():
        raise ValueError(f"{name} must be a bool mask or integer indices, got dtype {t.dtype}")
    t = t.long()
    if t.min() < 0 or t.max() >= dim or t.unique().numel() != t.numel():
        raise ValueError(f"{name} indices must be distinct and in 0..{dim - 1}, got {t.tolist()}")
    m = torch.zeros(dim, dtype=torch.bool)
    m[t] = True
    return m


def _check_bins(n_bins: int, who: str) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or not 1 <= n_bins <= 512:
        raise ValueError(f"{who} n_bins must be an int in 1..512, got {n_bins!r}")
    return n_bins


def _check_tail(tail_bound: float, who: str) -> float:
    ok = isinstance(tail_bound, (int, float)) and not isinstance(tail_bound, bool)
    if not (ok and math.isfinite(tail_bound) and tail_bound > 0):
        raise ValueError(f"{who} tail_bound must be a finite number > 0, got {tail_bound!r}")
    return float(tail_bound)


def _check_dim(dim: int, who: str) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise ValueError(f"{who} dim must be an int, got {dim!r}")
    if dim < 2:
        raise ValueError(f"{who} needs dim >= 2 (one part conditions the other), got dim={dim}")
    return dim


def _where(m: Tensor) -> Tensor:
    return torch.nonzero(m, as_tuple=False).flatten()


class _Coupling(Flow):
    """Shared bookkeeping: index sets, conditioner, reassembly of the output."""

    def __init__(
        self,
        dim: int,
        mask: Sequence[bool] | Sequence[int] | Tensor,
        hidden: Sequence[int],
        activation: Callable[[], nn.Module],
        circular: Sequence[bool] | Sequence[int] | Tensor | None,
        n_linear_params: int,
        n_circular_params: int,
    ) -> None:
        super().__init__()
        self.n_linear_params = n_linear_params
        self.n_circular_params = n_circular_params
        who = type(self).__name__
        self.dim = _check_dim(dim, who)
        m = as_mask(mask, dim, f"{who} mask")
        if not m.any() or m.all():
            raise ValueError(
                f"{who} mask must transform some but not all features, got {m.tolist()}"
            )
        c = as_mask(circular, dim, f"{who} circular")
        self.register_buffer("mask", m)
        self.register_buffer("circular", c)
        self.register_buffer("cond_linear", _where(~m & ~c))
        self.register_buffer("cond_circular", _where(~m & c))
        self.register_buffer("idx_linear", _where(m & ~c))
        self.register_buffer("idx_circular", _where(m & c))
        order = torch.cat([_where(~m), self.idx_linear, self.idx_circular])
        self.register_buffer("restore", torch.argsort(order))
        # derived index lists, not saved (state dicts keep their keys): the untransformed
        # features in conditioner order (linear, then circular) and the matching restore
        keep = {"persistent": False}
        self.register_buffer("_idx_a", torch.cat([self.cond_linear, self.cond_circular]), **keep)
        order = torch.cat([self._idx_a, self.idx_linear, self.idx_circular])
        self.register_buffer("_order", order, **keep)
        self.register_buffer("_restore", torch.argsort(order), **keep)
        self._n_cond_lin = self.cond_linear.numel()
        self._sizes = [len(self._idx_a), self.idx_linear.numel(), self.idx_circular.numel()]
        n_in = self.cond_linear.numel() + 2 * self.cond_circular.numel()
        self._n_lin_out = self.n_linear_params * self.idx_linear.numel()
        n_out = self._n_lin_out + self.n_circular_params * self.idx_circular.numel()
        self.conditioner = MLP(n_in, n_out, hidden, activation)

    def conditioner_input(self, z: Tensor) -> Tensor:
        """Conditioner features ``(batch, n_lin + 2 n_circ)``: raw linear, cos and sin of angles."""
        return self._features(z.index_select(1, self._idx_a))

    def _features(self, z_a: Tensor) -> Tensor:
        """Conditioner features of the untransformed part ``z_a`` (conditioner order)."""
        if not self.cond_circular.numel():
            return z_a
        lin, ang = z_a.split([self._n_cond_lin, self.cond_circular.numel()], dim=1)
        return torch.cat([lin, torch.cos(ang), torch.sin(ang)], dim=1)

    def _linear(self, z: Tensor, p: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        raise NotImplementedError  # pragma: no cover

    def _circular(self, z: Tensor, p: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        """Circular spline plus rotation (affine and spline couplings; NICE overrides)."""
        return circular_spline(z, p, inverse=inverse)

    def _couple(self, z: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        check_batch(z, self.dim, f"{type(self).__name__} input")
        return self._map(z, inverse)

    def _split(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One gather into (conditioning, linear, circular) order, split into the three."""
        return z.index_select(1, self._order).split(self._sizes, dim=1)

    def _map(self, z: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        """The coupling of a checked batch: conditioner, then the elementwise maps; one gather
        in, one back, and the parameters split, not sliced, so each backward pass joins
        gradients in one cat."""
        z_a, z_lin, z_circ = self._split(z)
        return self._transform(z_a, z_lin, z_circ, self.conditioner(self._features(z_a)), inverse)

    def _transform(
        self, z_a: Tensor, z_lin: Tensor, z_circ: Tensor, params: Tensor, inverse: bool
    ) -> tuple[Tensor, Tensor]:
        """The elementwise maps of the transformed parts, given the conditioner output."""
        n_lin, n_circ = self._sizes[1:]
        parts, logdet = [z_a], None
        p_lin, p_circ = params.split([self._n_lin_out, params.shape[1] - self._n_lin_out], 1)
        if n_lin:  # empty branches are skipped (a spline call costs ~0.3 ms)
            y, ld = self._linear(z_lin, p_lin.unflatten(1, (n_lin, self.n_linear_params)), inverse)
            parts.append(y)
            logdet = ld.sum(dim=1)
        if n_circ:
            p_circ = p_circ.unflatten(1, (n_circ, self.n_circular_params))
            y, ld = self._circular(z_circ, p_circ, inverse)
            parts.append(y)
            ld = ld.sum(dim=1)
            logdet = ld if logdet is None else logdet + ld
        if logdet is None:  # pragma: no cover - the mask transforms some features
            logdet = z_a.new_zeros(z_a.shape[0])
        return torch.cat(parts, dim=1).index_select(1, self._restore), logdet

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return self._couple(z, inverse=False)

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._couple(x, inverse=True)

    def extra_repr(self) -> str:
        circ = _where(self.circular).tolist()
        return f"dim={self.dim}, mask={self.mask.int().tolist()}, circular={circ}"


class AffineCoupling(_Coupling):
    """RealNVP coupling ``x_b = z_b * exp(s(z_a)) + t(z_a)``, ``x_a = z_a``.

    ``s = a * tanh(raw)`` with a learnable per-feature bound ``a`` (parameter
    ``scale_bound``, initialised to 1). Circular transformed features use a
    circular RQ spline with ``n_bins`` bins plus rotation (see module docstring).

    Arguments:
        dim: number of features (>= 2).
        mask: bool mask (True = transformed) or indices of transformed features.
        hidden: conditioner hidden widths.
        activation: conditioner activation class.
        circular: bool mask or indices of angle features in ``[-pi, pi)``.
        n_bins: spline bins for circular features (1 .. 512).
    """

    def __init__(
        self,
        dim: int,
        mask: Sequence[bool] | Sequence[int] | Tensor,
        hidden: Sequence[int] = (64, 64),
        activation: str | Callable[[], nn.Module] = nn.SiLU,
        circular: Sequence[bool] | Sequence[int] | Tensor | None = None,
        n_bins: int = 8,
    ) -> None:
        n_circ = n_circular_spline_params(_check_bins(n_bins, "AffineCoupling"))
        super().__init__(dim, mask, hidden, activation, circular, 2, n_circ)
        self.n_bins = n_bins
        self.scale_bound = nn.Parameter(torch.ones(self.idx_linear.numel()))

    def _map(self, z: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        # a layer with circular features, on the CPU: the conditioner, then the whole
        # transform as one fused kernel call. Without circular features the kernel gains
        # nothing over PyTorch's whole-tensor tanh and exp (1.04x at batch 256, 0.92x at
        # 1,024; BENCHMARKS.md, "Native kernels"), so such layers keep the PyTorch path
        if not self.idx_circular.numel() or not native.supports(z, self.scale_bound):
            return super()._map(z, inverse)
        params = self.conditioner(self.conditioner_input(z))
        return native.native_affine_coupling(
            z, params, self.scale_bound, self.idx_linear, self.idx_circular, self.n_bins,
            inverse, functools.partial(self._reference, inverse=inverse),
        )  # fmt: skip

    def _reference(self, z: Tensor, params: Tensor, scale_bound: Tensor, inverse: bool):
        """The native transform's PyTorch twin (for higher derivatives); ``scale_bound`` is
        this layer's own parameter, which ``_linear`` reads."""
        z_a, z_lin, z_circ = self._split(z)
        with native.disabled():
            return self._transform(z_a, z_lin, z_circ, params, inverse)

    def _linear(self, z: Tensor, p: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        s = self.scale_bound * torch.tanh(p[..., 0])
        t = p[..., 1]
        if inverse:
            return (z - t) * torch.exp(-s), -s
        return z * torch.exp(s) + t, s


class AdditiveCoupling(_Coupling):
    """NICE coupling ``x_b = z_b + t(z_a)`` (circular: ``wrap_angle(z_b + t(z_a))``); logdet 0.

    Arguments as :class:`AffineCoupling` (``n_bins`` is accepted and ignored, so
    both kinds share one signature).
    """

    def __init__(
        self,
        dim: int,
        mask: Sequence[bool] | Sequence[int] | Tensor,
        hidden: Sequence[int] = (64, 64),
        activation: str | Callable[[], nn.Module] = nn.SiLU,
        circular: Sequence[bool] | Sequence[int] | Tensor | None = None,
        n_bins: int = 8,
    ) -> None:
        super().__init__(dim, mask, hidden, activation, circular, 1, 1)

    def _linear(self, z: Tensor, p: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        t = p[..., 0]
        return (z - t if inverse else z + t), torch.zeros_like(z)

    def _circular(self, z: Tensor, p: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        t = p[..., 0]
        return wrap_angle(z - t if inverse else z + t), torch.zeros_like(z)


class SplineCoupling(_Coupling):
    """Neural-spline coupling: every transformed feature goes through a rational-quadratic
    spline whose knots the conditioner sets from the untransformed features.

    Non-circular features: :func:`~bgflow_mini.flows.spline.bounded_spline` on
    ``[-tail_bound, tail_bound]`` (identity outside); circular ones: the circular spline
    plus rotation of :class:`AffineCoupling`. Both with ``n_bins`` bins.

    Arguments as :class:`AffineCoupling` (``n_bins >= 2``: one bin of the bounded spline is
    the identity), plus ``tail_bound``: finite half-width ``B > 0`` of the spline interval in
    feature units (the features the flow sees are standardised, so the default 5 covers all
    but ~1e-6 of a unit Gaussian).
    """

    def __init__(
        self,
        dim: int,
        mask: Sequence[bool] | Sequence[int] | Tensor,
        hidden: Sequence[int] = (64, 64),
        activation: str | Callable[[], nn.Module] = nn.SiLU,
        circular: Sequence[bool] | Sequence[int] | Tensor | None = None,
        n_bins: int = 8,
        tail_bound: float = TAIL_BOUND,
    ) -> None:
        _check_tail(tail_bound, "SplineCoupling")
        if _check_bins(n_bins, "SplineCoupling") < 2:
            raise ValueError("SplineCoupling n_bins must be >= 2 (one bin is the identity)")
        n_lin, n_circ = n_bounded_spline_params(n_bins), n_circular_spline_params(n_bins)
        super().__init__(dim, mask, hidden, activation, circular, n_lin, n_circ)
        self.n_bins = n_bins
        self.tail_bound = float(tail_bound)

    def _linear(self, z: Tensor, p: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        return bounded_spline(z, p, self.tail_bound, inverse=inverse)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, n_bins={self.n_bins}, tail_bound={self.tail_bound}"


_MASKS = ("alternate", "random")


def _block_masks(dim: int, n_blocks: int, masks: str, mask_seed: int) -> list[Tensor]:
    """One boolean mask ``(dim,)`` per block (see :func:`coupling_flow`'s ``masks``)."""
    if masks not in _MASKS:
        raise ValueError(f"coupling_flow masks must be one of {list(_MASKS)}, got {masks!r}")
    idx = torch.arange(dim)
    if masks == "alternate":
        return [(idx < dim // 2) if i % 2 == 0 else (idx % 2 == 0) for i in range(n_blocks)]
    if isinstance(mask_seed, bool) or not isinstance(mask_seed, int):
        raise ValueError(f"coupling_flow mask_seed must be an int, got {mask_seed!r}")
    g = torch.Generator().manual_seed(mask_seed)
    out = []
    for _ in range(n_blocks):
        m = torch.zeros(dim, dtype=torch.bool)
        m[torch.randperm(dim, generator=g)[: dim // 2]] = True
        out.append(m)
    return out


def coupling_flow(
    dim: int,
    n_blocks: int,
    hidden: Sequence[int] = (64, 64),
    kind: str = "rnvp",
    activation: str | Callable[[], nn.Module] = nn.SiLU,
    circular: Sequence[bool] | Sequence[int] | Tensor | None = None,
    n_bins: int = 8,
    seed: int | None = None,
    scale: bool | None = None,
    tail_bound: float = TAIL_BOUND,
    masks: str = "alternate",
    mask_seed: int = 0,
) -> Sequential:
    """A stack of ``2 * n_blocks`` coupling layers.

    Each block is a coupling with a mask followed by one with its complement, so every
    feature is transformed in every block. ``masks="alternate"`` uses a half mask (first
    ``dim // 2`` features) for even blocks and an interleaved mask (even indices) for odd
    ones: two features of the same half and parity (e.g. two torsions of a side chain) are
    then never on opposite sides, and each sees the other only through third features.
    ``masks="random"`` gives block ``i`` a random half of the features instead, drawn from
    ``mask_seed`` alone (the global RNG is untouched, so a checkpoint rebuilds the same
    masks): any two features are split in about half of the blocks.

    ``kind="rnvp"`` uses :class:`AffineCoupling`, ``"nice"``
    :class:`AdditiveCoupling`, ``"spline"`` :class:`SplineCoupling` (with ``tail_bound``,
    which only the spline kind uses; the other kinds refuse a value other than the
    default). ``seed`` (if given) fixes the conditioner
    initialisation without touching the global RNG state.

    ``scale`` appends a learnable diagonal scaling of the non-circular features
    (:class:`~bgflow_mini.flows.scaling.Scaling`) on the data side; ``None`` means on for
    NICE, as in Dinh et al. (2015) (additive couplings alone are volume preserving and
    cannot adapt the width of a fixed prior), and off for RNVP (affine couplings scale)
    and splines (they reshape within ``tail_bound`` of the standardised features).
    """
    if kind not in _KINDS:
        raise ValueError(f"coupling_flow kind must be one of {list(_KINDS)}, got {kind!r}")
    _check_dim(dim, "coupling_flow")
    if isinstance(n_blocks, bool) or not isinstance(n_blocks, int) or n_blocks < 1:
        raise ValueError(f"coupling_flow n_blocks must be a positive int, got {n_blocks!r}")
    if kind == "spline":
        layer = functools.partial(SplineCoupling, tail_bound=tail_bound)
    elif tail_bound != TAIL_BOUND:
        raise ValueError(f"coupling_flow tail_bound is for kind='spline' only, got kind={kind!r}")
    else:
        layer = AffineCoupling if kind == "rnvp" else AdditiveCoupling
    patterns = _block_masks(dim, n_blocks, masks, mask_seed)

    scale = (kind == "nice") if scale is None else bool(scale)

    def build() -> Sequential:
        from .scaling import Scaling

        layers: list[Flow] = []
        for m in patterns:
            for mask in (m, ~m):
                layers.append(layer(dim, mask, hidden, activation, circular, n_bins))
        if scale:
            layers.append(Scaling(dim, circular))
        return Sequential(*layers)

    if seed is None:
        return build()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return build()
