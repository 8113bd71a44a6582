"""Weight averaging and model selection for training: an exponential moving average
(EMA) of a module's parameters and the snapshot with the best ESS estimate.

The average is updated on the device with a 0-d flag (a skipped step leaves it
untouched without reading the flag back), so it adds no host synchronisation to a step.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

__all__ = ["WeightAverage", "SELECT_CHOICES"]

SELECT_CHOICES = ("best_ess", "ema", "last")


class WeightAverage:
    """EMA of ``module``'s parameters (``decay=None``: none) and the best-ESS snapshot.

    Early steps use ``min(decay, (1 + t) / (10 + t))``, so the average is not dominated
    by the initial weights. ``best`` is ``{"ess", "step", "params"}`` (``params=None``
    until an estimate is offered).
    """

    def __init__(self, module: torch.nn.Module, decay: float | None = None) -> None:
        if decay is not None and not 0.0 < float(decay) < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1) or None, got {decay}")
        self.module = module
        self.decay = None if decay is None else float(decay)
        self.ema: list[Tensor] | None = None
        if self.decay is not None:
            self.ema = [p.detach().clone() for p in module.parameters()]
        self.best: dict = {"ess": -1.0, "step": 0, "params": None}

    def _params(self) -> list[Tensor]:
        return [p.detach() for p in self.module.parameters()]

    @torch.no_grad()
    def update(self, step: int, ok: Tensor) -> None:
        """Move the average towards the current parameters where the 0-d flag ``ok`` is
        true (``step``: steps done before this one)."""
        if self.ema is None:
            return
        decay = min(self.decay, (1.0 + step) / (10.0 + step))
        weight = ok.to(self.ema[0].dtype) * (1.0 - decay)
        # ema += weight * (params - ema); a tensor weight in lerp would be read back
        diff = torch._foreach_sub(self._params(), self.ema)
        torch._foreach_mul_(diff, weight)
        torch._foreach_add_(self.ema, diff)

    @contextmanager
    def averaged(self) -> Iterator[None]:
        """Inside the block the module holds the averaged weights, if there are any."""
        if self.ema is None:
            yield
            return
        params = self._params()
        with torch.no_grad():
            saved = [p.clone() for p in params]
            torch._foreach_copy_(params, self.ema)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(params, saved)

    def offer(self, ess: float, step: int) -> bool:
        """Keep a copy of the module's current weights if ``ess`` beats the best so far."""
        if ess <= self.best["ess"]:
            return False
        params = [p.clone() for p in self._params()]
        self.best = {"ess": float(ess), "step": int(step), "params": params}
        return True

    def select(self, select: str, step: int) -> dict:
        """Copy the weights to evaluate into the module; returns what was chosen.

        ``"best_ess"``: the best snapshot; ``"ema"``: the average; ``"last"``: the weights
        as they are (``step``: the current step, reported for ``ema``/``last``). Without a
        snapshot or an average, falls back to the next choice in that order.
        """
        if select not in SELECT_CHOICES:
            raise ValueError(f"select must be 'best_ess', 'ema' or 'last', got {select!r}")
        chosen, source = {"kind": "last", "step": int(step)}, None
        if select == "best_ess" and self.best["params"] is not None:
            source = self.best["params"]
            chosen = {"kind": "best_ess", "step": self.best["step"], "ess": self.best["ess"]}
        elif select in ("best_ess", "ema") and self.ema is not None:
            source, chosen = self.ema, {"kind": "ema", "step": int(step)}
        if source is not None:
            with torch.no_grad():
                torch._foreach_copy_(self._params(), source)
        return chosen

    def state_dict(self) -> dict:
        return {"ema": self.ema, "best": self.best}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``ema`` and ``best`` onto the module's device and dtype."""
        ref = self._params()
        if self.ema is not None and state.get("ema") is not None:
            self.ema = [t.to(p) for t, p in zip(state["ema"], self.ema, strict=True)]
        best = state.get("best") or {"ess": -1.0, "step": 0, "params": None}
        if best["params"] is not None:
            best["params"] = [t.to(p) for t, p in zip(best["params"], ref, strict=True)]
        self.best = best
