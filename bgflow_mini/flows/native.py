"""Fused C kernels for the splines and affine couplings on the CPU, with a PyTorch fallback.

On the CPU a coupling layer's spline is some fifty small tensor operations forward and a
hundred backward, each costing a few microseconds of dispatch whatever the batch: at the
default batch sizes that overhead, not arithmetic, is most of a training step.
``_spline_kernels.c`` computes the same formulas (:func:`~.spline.rq_spline`,
:func:`~.spline.knot_positions`, :func:`~.spline.knot_derivatives`, the affine map of
:class:`~.coupling.AffineCoupling`) in one loop over elements, and their exact gradients
(the adjoints written out by hand) in another: a spline call, or the whole transform of an
affine coupling layer given its conditioner's output (pass-through, affine and circular
features, the log-det sum), is one autograd node of two kernel calls. Arithmetic inside is
double precision for both dtypes (float32 results are at least as accurate as PyTorch's
float32 path); the exponentials of the bin softmax are in the tensors' precision. Rows are
split over ``torch.get_num_threads()`` threads (``num_threads`` in the configs) when a call
is large enough.

The library is compiled on first use with the system C compiler, about a second, and cached
(:mod:`~.kernel_library`, whose :func:`status`, :func:`available`, :func:`use_native` and
:func:`disabled` this module re-exports). Where no compiler works, or the tensors are not
float32 / float64 on the CPU, or ``torch.compile`` is tracing, the splines and couplings
run their PyTorch code (the same values to rounding; ``tests/test_native.py`` checks values
and gradients against it). ``BGFLOW_NATIVE_KERNELS=0`` turns the kernels off.

The kernels give first derivatives; a backward pass with ``create_graph=True`` (higher
derivatives) recomputes the PyTorch formulas instead, so it is exact too.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..units import _compiling
from .kernel_library import TYPES, available, disabled, library, status, use_native

__all__ = [
    "available",
    "status",
    "use_native",
    "disabled",
    "supports",
    "native_circular_spline",
    "native_bounded_spline",
    "native_affine_coupling",
]


def supports(x: Tensor, params: Tensor) -> bool:
    """Whether ``x`` and ``params`` can take the native path: CPU, the same float32 /
    float64 dtype, kernels available, not inside ``torch.compile`` tracing."""
    return (
        x.device.type == "cpu"
        and params.device.type == "cpu"
        and x.dtype in TYPES
        and params.dtype == x.dtype
        and not _compiling()
        and available()
    )


_SAVED_HEAD = 10  # per element the forward saves SAVED_HEAD + 2 K doubles (the C file's)
_MIN_ELEMENTS_PER_THREAD = 512  # below this a thread costs more than it saves


def _threads(rows: int, elements: int) -> int:
    """Kernel threads for a call: ``torch.get_num_threads()`` (the process's compute
    threads: ``num_threads`` in the configs), fewer for small calls, at most one per row."""
    return max(1, min(torch.get_num_threads(), rows, elements // _MIN_ELEMENTS_PER_THREAD))


def _as_2d(x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
    """``x (...)`` and ``params (..., P)`` as ``(B, F)`` and ``(B, F, P)`` views (or copies)."""
    if x.ndim == 2:
        return x, params
    x2 = x.reshape(1, -1) if x.ndim < 2 else x.reshape(-1, x.shape[-1])
    return x2, params.reshape(*x2.shape, params.shape[-1])


def _forward(kind: str, x: Tensor, params: Tensor, inverse: bool, bound: float, save: bool):
    lib = library()
    suffix = TYPES[x.dtype][1]
    x2, p2 = _as_2d(x, params)
    n_b, n_f = x2.shape
    k = (params.shape[-1] - 1) // 3 if kind == "circular" else (params.shape[-1] + 1) // 3
    y = torch.empty((n_b, n_f), dtype=x.dtype)
    ld = torch.empty((n_b, n_f), dtype=x.dtype)
    sv = torch.empty((n_b, n_f, _SAVED_HEAD + 2 * k), dtype=torch.float64) if save else None
    args = [n_b, n_f, k] + ([bound] if kind == "bounded" else [])
    args += [x2.data_ptr(), *x2.stride(), p2.data_ptr(), *p2.stride(), int(inverse)]
    args += [y.data_ptr(), ld.data_ptr(), sv.data_ptr() if save else None]
    args += [_threads(n_b, n_b * n_f)]
    if getattr(lib, f"{kind}_forward{suffix}")(*args) != 0:
        raise ValueError(f"native {kind} spline: unsupported number of bins {k}")
    return y.view(x.shape), ld.view(x.shape), sv


class _NativeSpline(torch.autograd.Function):
    """One spline call as one autograd node: kernel forward, kernel backward."""

    @staticmethod
    def forward(ctx, x: Tensor, params: Tensor, kind: str, inverse: bool, bound: float):
        y, ld, sv = _forward(kind, x, params, inverse, bound, save=True)
        ctx.save_for_backward(x, params, sv)
        ctx.kind, ctx.inverse, ctx.bound, ctx.x_shape = kind, inverse, bound, x.shape
        return y, ld

    @staticmethod
    def backward(ctx, gy: Tensor | None, gld: Tensor | None):
        x, params, sv = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiable PyTorch gradients
            ctx.reference = _spline_reference(ctx.kind, ctx.inverse, ctx.bound)
            return (*_graph_backward(ctx, (x, params), (gy, gld)), None, None, None)
        lib = library()
        suffix = TYPES[params.dtype][1]
        n_b, n_f = sv.shape[:2]
        p2 = params.reshape(n_b, n_f, params.shape[-1])
        gx = torch.empty((n_b, n_f), dtype=params.dtype)
        gp = torch.empty((n_b, n_f, params.shape[-1]), dtype=params.dtype)
        grads = [None if g is None else g.contiguous() for g in (gy, gld)]
        args = [n_b, n_f, (sv.shape[-1] - _SAVED_HEAD) // 2]
        args += [ctx.bound] if ctx.kind == "bounded" else []
        args += [p2.data_ptr(), *p2.stride(), int(ctx.inverse), sv.data_ptr()]
        # both gradients contiguous (B, F): row stride F, feature stride 1 (shared)
        ptrs = [None if g is None else g.data_ptr() for g in grads]
        args += [ptrs[0], n_f, 1, ptrs[1], n_f]
        args += [gx.data_ptr(), gp.data_ptr(), _threads(n_b, n_b * n_f)]
        getattr(lib, f"{ctx.kind}_backward{suffix}")(*args)
        return gx.view(ctx.x_shape), gp.view(params.shape), None, None, None


def _graph_backward(ctx, inputs: tuple, grads: tuple) -> list:
    """Gradients as a graph (for higher derivatives): the PyTorch reference ``ctx.reference``
    recomputed from the saved inputs themselves, so the graph reaches what produced them."""
    with torch.enable_grad():
        # aliases, so that each gradient counts only the paths through its own input (an
        # input may depend on another: a coupling's parameters on its z)
        inputs = tuple(t.view_as(t) for t in inputs)
        outs = [(t, g) for t, g in zip(ctx.reference(*inputs), grads) if g is not None]
        need = ctx.needs_input_grad[: len(inputs)]
        wrt = [t for t, n in zip(inputs, need) if n]
        got = iter(
            torch.autograd.grad(
                [t for t, _ in outs],
                wrt,
                [g for _, g in outs],
                create_graph=True,
                allow_unused=True,
            )
        )
    return [next(got) if n else None for n in need]


def _spline_reference(kind: str, inverse: bool, bound: float):
    def ref(x: Tensor, params: Tensor):
        from .circular import circular_spline_torch
        from .spline import bounded_spline_torch

        if kind == "circular":
            return circular_spline_torch(x, params, inverse)
        return bounded_spline_torch(x, params, bound, inverse)

    return ref


def _apply(kind: str, x: Tensor, params: Tensor, inverse: bool, bound: float = 0.0):
    if torch.is_grad_enabled() and (x.requires_grad or params.requires_grad):
        return _NativeSpline.apply(x, params, kind, inverse, bound)
    y, ld, _ = _forward(kind, x, params, inverse, bound, save=False)
    return y, ld


def native_circular_spline(
    x: Tensor, params: Tensor, inverse: bool = False
) -> tuple[Tensor, Tensor]:
    """:func:`~.circular.circular_spline` by the C kernel (``supports(x, params)`` must hold;
    shapes already checked by the caller): ``x (...)``, ``params (..., 3 K + 1)`` ->
    ``(y, logabsdet)``, both ``(...)``."""
    return _apply("circular", x, params, inverse)


def native_bounded_spline(
    x: Tensor, params: Tensor, bound: float, inverse: bool = False
) -> tuple[Tensor, Tensor]:
    """:func:`~.spline.bounded_spline` by the C kernel (``supports(x, params)`` must hold;
    arguments already checked by the caller): ``x (...)``, ``params (..., 3 K - 1)``,
    ``bound`` the half-width -> ``(y, logabsdet)``, both ``(...)``."""
    return _apply("bounded", x, params, inverse, float(bound))


class _NativeAffineCoupling(torch.autograd.Function):
    """A whole affine coupling transform (given its conditioner's output) as one node."""

    @staticmethod
    def forward(ctx, z, params, scale_bound, idx_lin, idx_circ, n_bins, inverse, reference):
        out, logdet, sv = _coupling_forward(
            z, params, scale_bound, idx_lin, idx_circ, n_bins, inverse, True
        )
        ctx.save_for_backward(z, params, scale_bound, sv)
        ctx.idx, ctx.n_bins, ctx.inverse, ctx.reference = (
            (idx_lin, idx_circ),
            n_bins,
            inverse,
            reference,
        )
        return out, logdet

    @staticmethod
    def backward(ctx, gout: Tensor | None, gld: Tensor | None):
        z, params, scale_bound, sv = ctx.saved_tensors
        none = (None,) * 5
        if torch.is_grad_enabled():  # create_graph=True: differentiable PyTorch gradients
            return (*_graph_backward(ctx, (z, params, scale_bound), (gout, gld)), *none)
        idx_lin, idx_circ = ctx.idx
        n_b, dim = z.shape
        gz = torch.empty((n_b, dim), dtype=z.dtype)
        gp = torch.empty(params.shape, dtype=z.dtype)
        n_threads = _threads(n_b, n_b * (idx_lin.numel() + idx_circ.numel()))
        ga = torch.empty((n_threads, idx_lin.numel()), dtype=torch.float64)
        args = _coupling_args(z, params, scale_bound, idx_lin, idx_circ, ctx.n_bins, ctx.inverse)
        args += [sv.data_ptr()]
        args += [None, 0, 0] if gout is None else [gout.data_ptr(), *gout.stride()]
        args += [None, 0] if gld is None else [gld.data_ptr(), *gld.stride()]
        args += [gz.data_ptr(), gp.data_ptr(), ga.data_ptr(), n_threads]
        getattr(library(), "affine_coupling_backward" + TYPES[z.dtype][1])(*args)
        return gz, gp, ga.sum(0).to(scale_bound.dtype), *none


def _coupling_args(z, params, scale_bound, idx_lin, idx_circ, n_bins, inverse) -> list:
    return [
        *z.shape, z.data_ptr(), *z.stride(), params.data_ptr(), *params.stride(),
        idx_lin.numel(), idx_lin.data_ptr(), idx_circ.numel(), idx_circ.data_ptr(), n_bins,
        scale_bound.data_ptr(), *scale_bound.stride(), int(inverse),
    ]  # fmt: skip


def _coupling_forward(z, params, scale_bound, idx_lin, idx_circ, n_bins, inverse, save):
    n_b, dim = z.shape
    out = torch.empty((n_b, dim), dtype=z.dtype)
    logdet = torch.empty(n_b, dtype=z.dtype)
    n_saved = _SAVED_HEAD + 2 * n_bins
    sv = torch.empty((n_b, idx_circ.numel(), n_saved), dtype=torch.float64) if save else None
    args = _coupling_args(z, params, scale_bound, idx_lin, idx_circ, n_bins, inverse)
    args += [out.data_ptr(), logdet.data_ptr(), sv.data_ptr() if save else None]
    args += [_threads(n_b, n_b * (idx_lin.numel() + idx_circ.numel()))]
    if getattr(library(), "affine_coupling_forward" + TYPES[z.dtype][1])(*args) != 0:
        raise ValueError(f"native affine coupling: unsupported number of bins {n_bins}")
    return out, logdet, sv


def native_affine_coupling(
    z: Tensor,
    params: Tensor,
    scale_bound: Tensor,
    idx_linear: Tensor,
    idx_circular: Tensor,
    n_bins: int,
    inverse: bool,
    reference,
) -> tuple[Tensor, Tensor]:
    """:class:`~.coupling.AffineCoupling`'s transform by the C kernel, given the
    conditioner output: ``z (batch, dim)``, ``params (batch, 2 n_lin + (3 K + 1) n_circ)``,
    ``scale_bound (n_lin,)``, the transformed feature indices (int64, CPU) ->
    ``(x (batch, dim), logdet (batch,))``. ``reference(z, params, scale_bound)`` computes the
    same in PyTorch operations (used for higher derivatives). ``supports`` must hold for
    ``z`` and ``params``; shapes are checked by the caller."""
    if scale_bound.dtype != z.dtype:
        raise ValueError(f"scale_bound dtype {scale_bound.dtype} differs from z's {z.dtype}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (z, params, scale_bound)):
        return _NativeAffineCoupling.apply(
            z, params, scale_bound, idx_linear, idx_circular, n_bins, inverse, reference
        )
    out, logdet, _ = _coupling_forward(
        z, params, scale_bound, idx_linear, idx_circular, n_bins, inverse, False
    )
    return out, logdet
