"""Speed of the same affine coupling flow in bgflow_mini, zuko, nflows and normflows.

Builds, in each library, a stack of ``2 * n_blocks`` affine (RealNVP) coupling layers
with the masks of ``bgflow_mini.flows.coupling_flow`` (block ``i``: first ``dim // 2``
features for even ``i``, even indices for odd ``i``; a coupling with the mask, then one
with its complement), conditioners ``Linear -> SiLU -> ... -> Linear`` with the same
hidden widths, and times one training-like step per case:

* draw ``z ~ N(0, I)`` of shape ``(batch, dim)``;
* data -> latent (the log-density direction of maximum likelihood) on a fixed data batch,
  and latent -> data (sampling) on ``z``, each with its log|det J|;
* the sum of both outputs and both log-dets, ``.backward()``, ``optimizer.zero_grad()``
  (an Adam step too with ``--adam``).

Samples/s counts both directions: ``2 * batch * steps / seconds``. Each case runs for at
least ``--min-seconds`` after ``--warmup`` untimed steps, in ``--rounds`` interleaved
rounds (the best round is reported). zuko, nflows and normflows are optional (``pip
install -e '.[bench]'``); a missing one is reported as "not installed". Every flow gets
weights drawn by one rule (:func:`randomise`) and, before timing, is checked to be
invertible with opposite log-dets; ``--check`` prints the errors.

The default generator's full training step (circular splines, internal coordinates,
energy), this tree against an earlier commit: ``benchmarks/generator_step.py``.

Usage::

    python benchmarks/flow_speed.py                  # dim 60, 5 blocks, batch 256 and 1024
    python benchmarks/flow_speed.py --check --min-seconds 0.5 --rounds 1   # smoke test
    python benchmarks/flow_speed.py --torch-threads 2 --batch 256 1024 4096
"""

from __future__ import annotations

import argparse
import datetime
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata

import torch
from _machine import cpu_model  # benchmarks/_machine.py
from torch import Tensor, nn

__all__ = [
    "Model",
    "build_cases",
    "check_model",
    "coupling_masks",
    "main",
    "randomise",
    "time_model",
]

Pair = tuple[Tensor, Tensor]

# absolute tolerance of the invertibility check (float32, randomised weights)
CHECK_TOL = 1e-3


@dataclass
class Model:
    """One library's flow behind a common interface.

    ``to_latent(x) -> (z, log|det J|)`` (data -> latent, the log-density direction) and
    ``to_data(z) -> (x, log|det J|)`` (sampling); ``module`` holds the parameters.
    """

    module: nn.Module
    to_latent: Callable[[Tensor], Pair]
    to_data: Callable[[Tensor], Pair]
    layers: str  # the library classes used, for the table
    notes: list[str] = field(default_factory=list)


class Unsupported(Exception):
    """The library cannot express this configuration (reported in the table)."""


@dataclass
class Case:
    """A row group of the table: a library (distribution name) and a flow factory."""

    label: str
    dist: str  # distribution name for importlib.metadata
    build: Callable[[argparse.Namespace], Model]
    version: str = ""
    status: str = ""  # "" = runnable, else why not (shown in the table)
    model: Model | None = None
    check: tuple[float, float, float] | None = None  # inverse err, logdet err, mean |logdet|
    rates: dict[int, float] = field(default_factory=dict)


def coupling_masks(dim: int, n_blocks: int) -> list[Tensor]:
    """Transformed-feature masks (True = transformed) of the layers, latent -> data order."""
    idx = torch.arange(dim)
    patterns = (idx < dim // 2, idx % 2 == 0)
    masks = []
    for i in range(n_blocks):
        m = patterns[i % 2]
        masks += [m, ~m]
    return masks


class ConditionerMLP(nn.Sequential):
    """``Linear -> activation -> ... -> Linear``; accepts (and ignores) a ``context``
    argument, as nflows calls its conditioners ``net(x, context)``."""

    def __init__(
        self, n_in: int, n_out: int, hidden: Sequence[int], activation: type[nn.Module]
    ) -> None:
        layers: list[nn.Module] = []
        width = n_in
        for h in hidden:
            layers += [nn.Linear(width, h), activation()]
            width = h
        layers.append(nn.Linear(width, n_out))
        super().__init__(*layers)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        return super().forward(x)


# ---------------------------------------------------------------------------- builders


def build_bgflow(args: argparse.Namespace) -> Model:
    from bgflow_mini.flows import coupling_flow

    flow = coupling_flow(
        args.dim, args.n_blocks, hidden=tuple(args.hidden), kind="rnvp", activation="silu"
    )
    return Model(flow, flow.inverse, flow, "coupling_flow (AffineCoupling)")


def build_zuko(args: argparse.Namespace) -> Model:
    from zuko.distributions import DiagNormal
    from zuko.flows import Flow, GeneralCouplingTransform, UnconditionalDistribution

    dim = args.dim
    # zuko's transform runs data -> latent and its mask marks the *constant* features
    layers = [
        GeneralCouplingTransform(
            dim, mask=~m, hidden_features=tuple(args.hidden), activation=nn.SiLU
        )
        for m in reversed(coupling_masks(dim, args.n_blocks))
    ]
    base = UnconditionalDistribution(DiagNormal, torch.zeros(dim), torch.ones(dim), buffer=True)
    flow = Flow(layers, base)

    def to_latent(x: Tensor) -> Pair:
        return flow().transform.call_and_ladj(x)

    def to_data(z: Tensor) -> Pair:
        return flow().transform.inv.call_and_ladj(z)

    notes = [
        "zuko: `GeneralCouplingTransform(mask=...)` with its default `MonotonicAffineTransform`"
        " (log-scale soft-clipped as s / (1 + |s / ln 1e-3|) instead of a * tanh(raw)); "
        "conditioner `zuko.nn.MLP(activation=nn.SiLU)`. The latent -> data direction goes "
        "through torch's inverse transform, which computes each layer's log-det by a second "
        "conditioner pass (zuko's own `rsample_and_log_prob` does the same).",
    ]
    return Model(flow, to_latent, to_data, "GeneralCouplingTransform", notes)


def build_nflows(args: argparse.Namespace) -> Model:
    from nflows.transforms import AffineCouplingTransform, CompositeTransform

    hidden = tuple(args.hidden)

    def net(n_in: int, n_out: int) -> nn.Module:
        return ConditionerMLP(n_in, n_out, hidden, nn.SiLU)

    # nflows' forward runs data -> latent; its mask marks the transformed features
    layers = [
        AffineCouplingTransform(m.int(), net)
        for m in reversed(coupling_masks(args.dim, args.n_blocks))
    ]
    flow = CompositeTransform(layers)
    notes = [
        "nflows: `AffineCouplingTransform(mask, net)` with its fixed scale map "
        "sigmoid(raw + 2) + 1e-3 (scale in (0, 1), not exp(a * tanh(raw))); the conditioner "
        "is a plain torch Linear/SiLU stack (nflows' `nn.nets.MLP` takes no `context` "
        "argument, which couplings pass, and its `ResidualNet` has another shape).",
    ]
    return Model(flow, flow, flow.inverse, "AffineCouplingTransform", notes)


def _normflows_split_mode(m: Tensor) -> str:
    """The ``Split`` mode of normflows whose transformed half is ``m`` (else Unsupported)."""
    dim = m.numel()
    idx = torch.arange(dim)
    first = (dim + 1) // 2  # Tensor.chunk(2) puts the larger half first
    transformed = {  # normflows keeps z1 constant and transforms z2
        "channel": idx >= first,
        "channel_inv": idx < first,
    }
    if dim % 2 == 0:  # its checkerboard split needs an even number of features
        transformed["checkerboard"] = idx % 2 == 0
        transformed["checkerboard_inv"] = idx % 2 == 1
    for mode, t in transformed.items():
        if torch.equal(t, m):
            return mode
    raise Unsupported("n/a: masks need an even dim")


def build_normflows_block(args: argparse.Namespace) -> Model:
    import normflows as nf

    hidden = tuple(args.hidden)
    layers = []
    for m in coupling_masks(args.dim, args.n_blocks):  # normflows' forward: latent -> data
        n_t = int(m.sum())
        param_map = ConditionerMLP(args.dim - n_t, 2 * n_t, hidden, nn.SiLU)
        layers.append(nf.flows.AffineCouplingBlock(param_map, split_mode=_normflows_split_mode(m)))
    flow = nf.NormalizingFlow(nf.distributions.DiagGaussian(args.dim, trainable=False), layers)
    notes = [
        "normflows (block): `AffineCouplingBlock(param_map, split_mode=...)`; the masks are "
        "its split modes channel / channel_inv / checkerboard / checkerboard_inv, which equal "
        "the bgflow_mini masks for an even dim (not expressible for an odd dim). Scale map "
        "exp(raw), unbounded; conditioner a plain torch Linear/SiLU stack (normflows' "
        "`nets.MLP` only has (leaky) ReLU).",
    ]
    return Model(
        flow.flows,
        flow.inverse_and_log_det,
        flow.forward_and_log_det,
        "AffineCouplingBlock",
        notes,
    )


def build_normflows_masked(args: argparse.Namespace) -> Model:
    import normflows as nf

    hidden = tuple(args.hidden)
    dim = args.dim
    layers = [
        # b = 1 marks the constant features; s and t are two networks on the masked vector
        nf.flows.MaskedAffineFlow(
            (~m).float(),
            ConditionerMLP(dim, dim, hidden, nn.SiLU),
            ConditionerMLP(dim, dim, hidden, nn.SiLU),
        )
        for m in coupling_masks(dim, args.n_blocks)
    ]
    flow = nf.NormalizingFlow(nf.distributions.DiagGaussian(dim, trainable=False), layers)
    notes = [
        "normflows (masked): `MaskedAffineFlow(b, t, s)`, normflows' documented RealNVP, "
        "exact masks; it needs two conditioners per layer (shift t and log-scale s, each "
        f"dim -> {'-'.join(map(str, hidden))} -> dim on the zero-masked full vector), so "
        "more parameters (2.4x at dim 60) and twice the conditioner passes of the others at "
        "the same hidden widths. Scale map exp(s), unbounded.",
    ]
    return Model(
        flow.flows,
        flow.inverse_and_log_det,
        flow.forward_and_log_det,
        "MaskedAffineFlow",
        notes,
    )


def build_cases() -> list[Case]:
    """bgflow_mini first (the reference of the ratio column), then the other libraries."""
    return [
        Case("bgflow_mini", "bgflow_mini", build_bgflow),
        Case("zuko", "zuko", build_zuko),
        Case("nflows", "nflows", build_nflows),
        Case("normflows (block)", "normflows", build_normflows_block),
        Case("normflows (masked)", "normflows", build_normflows_masked),
    ]


# ------------------------------------------------------------------- check and timing


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


@torch.no_grad()
def randomise(module: nn.Module, gain: float = 0.5) -> None:
    """Fresh weights by one rule for every library: each 2-D parameter ~ N(0, gain^2 /
    fan_in), biases and other parameters kept (fresh bgflow_mini layers are the identity,
    and some libraries' default initialisations overflow exp over 10 unbounded layers)."""
    for p in module.parameters():
        if p.ndim == 2:
            p.normal_(0.0, gain / p.shape[1] ** 0.5)


@torch.no_grad()
def check_model(model: Model, dim: int, batch: int = 256) -> tuple[float, float, float]:
    """``(max |z' - z|, max |logdet_data + logdet_latent|, mean |logdet_data|)`` for
    ``x = to_data(z)``, ``z' = to_latent(x)``, ``z ~ N(0, I)``."""
    z = torch.randn(batch, dim)
    x, ld_data = model.to_data(z)
    z2, ld_latent = model.to_latent(x)
    if ld_data.shape != (batch,) or ld_latent.shape != (batch,):
        raise RuntimeError(f"log-det shapes {ld_data.shape}, {ld_latent.shape}")
    return (
        (z2 - z).abs().max().item(),
        (ld_data + ld_latent).abs().max().item(),
        ld_data.abs().mean().item(),
    )


def time_model(
    model: Model, batch: int, dim: int, min_seconds: float, warmup: int, adam: bool
) -> float:
    """Samples/s (both directions) of training-like steps on ``model``."""
    opt = torch.optim.Adam(model.module.parameters(), lr=1e-5)
    data = torch.randn(batch, dim)

    def step() -> None:
        z = torch.randn(batch, dim)
        latent, ld_latent = model.to_latent(data)
        sample, ld_data = model.to_data(z)
        loss = latent.sum() + ld_latent.sum() + sample.sum() + ld_data.sum()
        loss.backward()
        if adam:
            opt.step()
        opt.zero_grad()

    for _ in range(warmup):
        step()
    steps, t0 = 0, time.perf_counter()
    while True:
        step()
        steps += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds:
            return 2 * batch * steps / elapsed


# ---------------------------------------------------------------------------------- main


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return ""


def _prepare(case: Case, args: argparse.Namespace) -> None:
    """Build the model, randomise its weights and check it; sets ``case.status``."""
    case.version = _version(case.dist)
    if not case.version:
        case.status = "not installed"
        return
    try:
        torch.manual_seed(0)
        case.model = case.build(args)
        randomise(case.model.module)
        case.check = check_model(case.model, args.dim)
    except ImportError as err:
        missing = (err.name or "").split(".")[0] == case.dist
        case.status = "not installed" if missing else f"import failed: {err}"
        case.model = None
        return
    except Unsupported as err:
        case.status, case.model = str(err), None
        return
    except Exception as err:  # a broken optional library must not stop the others
        case.status, case.model = f"error: {type(err).__name__}: {err}", None
        return
    if not max(case.check[:2]) < CHECK_TOL:
        case.status = "failed invertibility check (see --check)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=60)
    ap.add_argument("--n-blocks", type=int, default=5, help="2 coupling layers per block")
    ap.add_argument("--hidden", type=int, nargs="+", default=[64, 64])
    ap.add_argument("--batch", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--min-seconds", type=float, default=3.0, help="timed per case and round")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps per case and round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; best is shown")
    ap.add_argument("--adam", action="store_true", help="also take an Adam step (lr 1e-5)")
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--check", action="store_true", help="print the invertibility errors")
    args = ap.parse_args()
    torch.set_num_threads(args.torch_threads)
    torch.set_default_dtype(torch.float32)

    cases = build_cases()
    for case in cases:
        _prepare(case, args)

    if args.check:
        print("## Invertibility check (the timed weights, batch 256, float32)\n")
        print("| library | max abs(z' - z) | max abs(ld_data + ld_latent) | mean abs(ld_data) |")
        print("|---|---:|---:|---:|")
        for case in cases:
            if case.check is None:
                print(f"| {case.label} | {case.status} | | |")
            else:
                inv, ld, mag = case.check
                print(f"| {case.label} | {inv:.2e} | {ld:.2e} | {mag:.2f} |")
        print()

    for _ in range(args.rounds):
        for case in cases:
            for batch in args.batch:
                if case.status:
                    break
                try:
                    rate = time_model(
                        case.model, batch, args.dim, args.min_seconds, args.warmup, args.adam
                    )
                except Exception as err:  # an optional library failing mid-run
                    if case is cases[0]:
                        raise
                    case.status, case.model = f"error: {type(err).__name__}: {err}", None
                    break
                case.rates[batch] = max(rate, case.rates.get(batch, 0.0))

    hidden = "-".join(map(str, args.hidden))
    n_layers = 2 * args.n_blocks
    print(
        f"## Affine coupling flow speed, bgflow_mini vs other libraries ({datetime.date.today()})\n"
    )
    print(
        f"machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{args.torch_threads} torch thread(s), float32"
    )
    print(
        f"flow: dim {args.dim}, {n_layers} affine coupling layers ({args.n_blocks} block(s)), "
        f"conditioners {hidden} SiLU; weights: every 2-D parameter ~ N(0, 0.25 / fan_in)"
    )
    step = "data->latent on a fixed batch + latent->data on fresh z, backward, zero_grad"
    print(f"step: {step}{' + Adam step' if args.adam else ''}")
    print(
        f"timing: >= {args.min_seconds:g} s per case after {args.warmup} warm-up steps, "
        f"best of {args.rounds} interleaved round(s); samples/s = 2 * batch * steps / s\n"
    )
    ref = cases[0]
    print(
        "| library | version | coupling layers | parameters | batch | samples/s | "
        "bgflow_mini / other |"
    )
    print("|---|---|---|---:|---:|---:|---:|")
    for case in cases:
        if case.status:
            version = case.version or "-"
            print(f"| {case.label} | {version} | {case.status} | - | - | - | - |")
            continue
        params = n_params(case.model.module)
        for batch in args.batch:
            rate = case.rates[batch]
            ratio = f"{ref.rates[batch] / rate:.2f}" if batch in ref.rates else "-"
            print(
                f"| {case.label} | {case.version} | {case.model.layers} | {params:,} | "
                f"{batch:,} | {rate:,.0f} | {ratio} |"
            )
    print("\nbgflow_mini / other > 1: bgflow_mini is faster. Notes:\n")
    print(
        "- bgflow_mini: `coupling_flow(kind='rnvp', activation='silu')`, x_b = z_b * "
        "exp(a * tanh(raw)) + t with a learnable bound a per feature (counted in its "
        "parameters)."
    )
    print(
        "- zuko and nflows run data -> latent forward, so their layers are built in reverse "
        "order: the composed maps have the same structure as bgflow_mini's."
    )
    for case in cases[1:]:
        if case.model is not None:
            for note in case.model.notes:
                print(f"- {note}")


if __name__ == "__main__":
    main()
