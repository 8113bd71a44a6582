"""Mode-collapse guard: raw state populations of the generator during training.

Reverse KL is mode seeking: a flow can lose a metastable state while its ESS looks fine
(the lost state simply gets no samples). :class:`StateMonitor` is a
:class:`~bgflow_mini.training.Trainer` callback that, at every periodic ESS estimate,
counts the fraction of those fresh samples in each state (raw, unweighted), writes it to
the step's record (``pop_<state>``) and warns once per state when a state that the
reference (the training data, or a previous temperature) populated above ``min_population``
falls below ``factor`` times its reference population. It also warns once per state when,
at the target temperature, a state holds more than ``overfill`` times its reference
population and at least ``min_excess`` more of the samples: a flow that moves a third of
its samples into a state the data visit 3 % of the time has its density in the wrong place
(seen on the alanine tetrapeptide), which the ESS alone only shows as "low".

:class:`OverfitMonitor` watches the validation NLL instead: when maximum likelihood is in
the loss and the validation NLL has risen more than ``tolerance`` nats above its best, the
flow is memorising the (correlated) MD frames, and its density between them gets too thin
for importance weights (the alanine tetrapeptide's 16,000 frames: 4.6 nats within 500
steps, ESS 0.0005 when ML stayed in the loss).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping

from .state_balance import state_masks

__all__ = ["OverfitMonitor", "StateMonitor", "state_populations"]


def state_populations(x, cvs: Mapping, states: Mapping) -> dict[str, float]:
    """Fraction of configurations ``x`` ``(n, dim)`` in each state (raw counts)."""
    return {name: float(m.mean()) for name, m in state_masks(x, cvs, states).items()}


class StateMonitor:
    """Trainer callback: raw state populations of the periodic ESS samples, collapse warnings.

    Arguments:
        cvs, states: the target's CV specs and states.
        reference: ``{state: population}`` of the reference distribution (e.g.
            :func:`state_populations` of the training data).
        min_population: states below this in the reference are not watched for collapse.
        factor: warn when a watched state falls below ``factor * reference``.
        overfill: warn when a state exceeds ``overfill * reference`` (any reference, 0
            included) and ``reference + min_excess``; checked only at relative temperature
            1 (hot phases are meant to over-fill rare states). ``None``: not checked.
        min_excess: the smallest absolute excess (fraction of samples) worth a warning.

    Attributes:
        collapsed: ``{state: {"step", "population", "reference"}}`` of the collapse warnings.
        overfilled: the same for the over-fill warnings.
    """

    def __init__(
        self,
        cvs: Mapping,
        states: Mapping,
        reference: Mapping[str, float],
        min_population: float = 0.01,
        factor: float = 0.1,
        overfill: float | None = 5.0,
        min_excess: float = 0.05,
    ) -> None:
        if overfill is not None and overfill <= 1:
            raise ValueError(f"overfill must be > 1 (or None), got {overfill}")
        self.cvs, self.states = cvs, states
        self.reference = {k: float(v) for k, v in reference.items()}
        self.min_population, self.factor = float(min_population), float(factor)
        self.overfill = None if overfill is None else float(overfill)
        self.min_excess = float(min_excess)
        self.collapsed: dict[str, dict] = {}
        self.overfilled: dict[str, dict] = {}

    @property
    def columns(self) -> list[str]:
        """The record keys this monitor writes (for a metrics CSV)."""
        return [f"pop_{name}" for name in self.states]

    def check(
        self, populations: Mapping[str, float], step: int, temperature: float = 1.0
    ) -> list[str]:
        """Record collapses (and over-fills) in ``populations``; the newly collapsed states.

        ``temperature`` is the phase's relative temperature; over-fills count only at 1.
        """
        if temperature == 1.0:
            self._check_overfill(populations, step)
        new = []
        for name, ref in self.reference.items():
            pop = populations.get(name)
            if pop is None or ref < self.min_population or name in self.collapsed:
                continue
            if pop < self.factor * ref:
                self.collapsed[name] = {"step": step, "population": pop, "reference": ref}
                new.append(name)
                warnings.warn(
                    f"mode collapse at step {step}: state {name!r} holds {pop:.4f} of the "
                    f"generator's samples, below {self.factor:g} x its reference population "
                    f"{ref:.4f}",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return new

    def _check_overfill(self, populations: Mapping[str, float], step: int) -> None:
        if self.overfill is None:
            return
        for name, ref in self.reference.items():
            pop = populations.get(name)
            if pop is None or name in self.overfilled:
                continue
            if pop > self.overfill * ref and pop > ref + self.min_excess:
                self.overfilled[name] = {"step": step, "population": pop, "reference": ref}
                warnings.warn(
                    f"over-filled state at step {step}: state {name!r} holds {pop:.4f} of "
                    f"the generator's samples, above {self.overfill:g} x its reference "
                    f"population {ref:.4f}",
                    RuntimeWarning,
                    stacklevel=3,
                )

    def __call__(self, trainer, record: dict) -> None:
        x = getattr(trainer, "last_eval_samples", None)
        if "ess_eval" not in record or x is None:
            return
        pops = state_populations(x.detach().cpu().double().numpy(), self.cvs, self.states)
        record.update({f"pop_{k}": v for k, v in pops.items()})
        self.check(pops, int(record["step"]), float(record.get("temperature", 1.0)))

    def replay(self, history) -> None:
        """Re-check the populations logged in a restored history (after resuming)."""
        for r in history:
            pops = {k[4:]: v for k, v in r.items() if k.startswith("pop_")}
            if pops:
                self.check(pops, int(r["step"]), float(r.get("temperature", 1.0)))

    def summary(self) -> list[str]:
        """One line per collapsed state, for a run's summary."""
        return [_line(k, v) for k, v in self.collapsed.items()]

    def overfill_summary(self) -> list[str]:
        """One line per over-filled state, for a run's summary."""
        return [_line(k, v) for k, v in self.overfilled.items()]


def _line(name: str, v: Mapping) -> str:
    return (
        f"state {name!r}: {v['population']:.4f} of samples at step {v['step']} "
        f"(reference {v['reference']:.4f})"
    )


class OverfitMonitor:
    """Trainer callback: warns once when maximum likelihood overfits the training frames.

    At every validation estimate (``record["val_nll"]``, nats per frame) the best value so
    far is kept; at a step whose loss has a maximum-likelihood term (``"nll"`` in the
    record) that lies more than ``tolerance`` above the best, one ``RuntimeWarning``
    names both steps and what to change (a shorter ML phase, ``w_ml: 0`` in the phases
    that use the energy, or more MD). Phases without ML are not judged: reverse KL does
    not minimise the NLL.

    Attributes:
        warning: ``{"step", "val_nll", "best_step", "best_val_nll"}`` once it fired, else
            ``None``.
    """

    def __init__(self, tolerance: float = 1.0) -> None:
        if not tolerance > 0:
            raise ValueError(f"tolerance must be positive (nats), got {tolerance}")
        self.tolerance = float(tolerance)
        self.best: tuple[int, float] | None = None
        self.warning: dict | None = None

    def check(self, step: int, val_nll: float, ml: bool) -> bool:
        """Take one validation NLL; returns whether this call warned (a non-finite one is
        not judged)."""
        if not math.isfinite(val_nll):
            return False
        if self.best is None or val_nll < self.best[1]:
            self.best = (int(step), float(val_nll))
            return False
        best_step, best = self.best
        if not ml or self.warning is not None or val_nll - best <= self.tolerance:
            return False
        self.warning = {
            "step": int(step),
            "val_nll": float(val_nll),
            "best_step": best_step,
            "best_val_nll": best,
        }
        warnings.warn(
            f"maximum likelihood overfits the training frames: {self.summary()[0]}. "
            f"Stop the ML phase near step {best_step} and leave ML out of the phases that "
            "use the energy (w_ml: 0), or generate more (less correlated) MD frames",
            RuntimeWarning,
            stacklevel=3,
        )
        return True

    def __call__(self, trainer, record: dict) -> None:
        if "val_nll" in record:
            self.check(int(record["step"]), float(record["val_nll"]), "nll" in record)

    def replay(self, history) -> None:
        """Re-read the validation NLLs of a restored history (after resuming)."""
        for r in history:
            self(None, r)

    def summary(self) -> list[str]:
        """One line when it fired (for a run's summary), else none."""
        w = self.warning
        if w is None:
            return []
        return [
            f"validation NLL {w['val_nll']:.2f} at step {w['step']} with ML in the loss, "
            f"{w['val_nll'] - w['best_val_nll']:.2f} nats above its best "
            f"{w['best_val_nll']:.2f} at step {w['best_step']}"
        ]
