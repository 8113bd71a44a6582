"""Optional ``torch.compile`` of flows, falling back to eager PyTorch where it fails.

Compiling a coupling flow fuses its many small elementwise kernels: on the 2-core CPU
the default alanine-dipeptide coupling stack trained 1.47x faster at batch 256 after
about 150 s of compilation (BENCHMARKS.md, "Flow speed"), so it pays for long runs, not
for a 12-minute one. The flow is compiled in place (its ``forward`` and ``inverse``
become compiled callables), so parameters, ``state_dict`` keys and checkpoints are
unchanged. Where ``torch.compile`` is missing or a compilation fails (no C++ compiler,
an unsupported Python or platform), one warning says so and the flow runs eagerly.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

from .base import Flow, Sequential

__all__ = ["compile_flow", "compile_generator", "is_compiled"]


def _compile_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = []
    for module, name in (
        ("torch._dynamo.exc", "TorchDynamoException"),  # BackendCompilerFailed, ...
        ("torch._inductor.exc", "InductorError"),
        ("torch._inductor.exc", "InvalidCxxCompiler"),
        ("torch._inductor.exc", "CppCompileError"),
    ):
        try:
            errors.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


class _CompiledOrEager:
    """Calls the compiled function where autograd records (the training step) and the
    eager one elsewhere; on a compilation error warns once and from then on calls the
    eager one (errors of the flow itself are raised by the eager call)."""

    def __init__(self, compiled: Callable, eager: Callable, name: str) -> None:
        self.compiled: Callable | None = compiled
        self.eager = eager
        self.name = name

    def __call__(self, *args, **kwargs):
        if self.compiled is not None and torch.is_grad_enabled():
            try:
                return self.compiled(*args, **kwargs)
            except _compile_errors() as err:
                first = str(err).strip().splitlines()[0] if str(err).strip() else ""
                warnings.warn(
                    f"torch.compile of {self.name} failed ({type(err).__name__}: {first}); "
                    "running it without compilation",
                    RuntimeWarning,
                    stacklevel=2,
                )
                self.compiled = None
        return self.eager(*args, **kwargs)


def is_compiled(flow: nn.Module) -> bool:
    """Whether :func:`compile_flow` was applied to ``flow`` and has not fallen back."""
    fn = flow.__dict__.get("forward")
    return isinstance(fn, _CompiledOrEager) and fn.compiled is not None


def compile_flow(
    flow: Flow, *, backend: str | Callable = "inductor", dynamic: bool | None = None, **kwargs
) -> Flow:
    """Compile ``flow.forward`` and ``flow.inverse`` in place; returns ``flow``.

    ``backend``, ``dynamic`` and ``kwargs`` (e.g. ``mode``) go to ``torch.compile``;
    ``dynamic=None`` compiles the first batch size statically and makes the batch
    dimension dynamic at the second. Only calls with autograd enabled (the training
    step's losses) use the compiled graphs; calls under ``torch.no_grad`` (ESS
    estimates, the importance buffer, validation, evaluation) run eagerly, so they add
    no compilations. The first call of each direction compiles (slow); a compilation
    error there falls back to eager with a :class:`RuntimeWarning`.
    """
    if not isinstance(flow, Flow):
        raise TypeError(f"compile_flow takes a bgflow_mini Flow, got {type(flow).__name__}")
    compile_fn = getattr(torch, "compile", None)
    if compile_fn is None:
        msg = "torch.compile is not available: the flow runs eagerly"
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        return flow
    wrapped = {}
    for direction in ("forward", "inverse"):
        current = flow.__dict__.get(direction)
        eager = current.eager if isinstance(current, _CompiledOrEager) else getattr(flow, direction)
        try:
            compiled = compile_fn(eager, backend=backend, dynamic=dynamic, **kwargs)
        except (RuntimeError, *_compile_errors()) as err:  # e.g. an unsupported Python
            msg = f"torch.compile unavailable ({err}): the flow runs eagerly"
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            return flow  # neither direction replaced
        name = f"{type(flow).__name__}.{direction}"
        wrapped[direction] = _CompiledOrEager(compiled, eager, name)
    flow.__dict__.update(wrapped)
    return flow


def compile_generator(generator: nn.Module, **kwargs) -> list[Flow]:
    """Compile the coupling flows of a :class:`~bgflow_mini.BoltzmannGenerator`.

    With an internal-coordinate transform in the generator's top-level
    :class:`Sequential`, every other flow of it is compiled (the transform's
    out-of-domain counters are Python state that a compiled graph cannot update);
    otherwise the generator's flow is compiled whole. Returns the compiled flows.
    ``kwargs`` go to :func:`compile_flow`.
    """
    from ..coordinates.normalization import ICTransform

    flow = generator.flow
    parts = list(flow.flows) if isinstance(flow, Sequential) else [flow]
    if not any(isinstance(f, ICTransform) for f in parts):
        parts = [flow]  # e.g. a toy generator: its coupling stack as one graph
    chosen = [f for f in parts if not isinstance(f, ICTransform)]
    for f in chosen:
        compile_flow(f, **kwargs)
    return chosen
