"""Temperature annealing from the energy alone (after TA-BG, Schopmans & Friederich 2025).

Reverse KL at the target temperature is mode seeking: started in one basin it stays
there. At a high temperature the barriers are low, so reverse KL there finds every
basin. The model is then brought down a temperature ladder: at each rung it is trained by
maximum likelihood on its own samples *reweighted* to the next, colder Boltzmann
distribution ``p_T ∝ exp(-u / τ)`` (``u`` in kT of the target temperature, ``τ = T /
T_target``). :class:`ImportanceBuffer` holds such a weighted sample set; the
:class:`~bgflow_mini.training.Trainer` draws ML batches from it in proportion to the
weights (phases with ``w_iw > 0``) and refills it every ``resample_every`` steps.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .reweighting import effective_sample_size

__all__ = ["ImportanceBuffer", "temperature_ladder"]


def temperature_ladder(t_high: float, t_low: float = 1.0, n: int = 8) -> list[float]:
    """``n`` geometrically spaced temperatures from ``t_high`` down to ``t_low`` (both in)."""
    if not (t_high >= t_low > 0) or n < 1:
        raise ValueError(f"need t_high >= t_low > 0 and n >= 1, got {t_high}, {t_low}, {n}")
    if n == 1:
        return [float(t_low)]
    r = (t_low / t_high) ** (1.0 / (n - 1))
    return [float(t_high * r**i) for i in range(n - 1)] + [float(t_low)]


class ImportanceBuffer:
    """Generator samples with self-normalised weights towards ``exp(-u / temperature)``.

    Arguments:
        size: samples per refill.
        truncate: draw with truncated weights: the ``k = ceil(sqrt(size))`` largest
            weights are all lowered to the k-th largest (as PSIS and truncated IS treat
            the tail, Vehtari et al. 2024, Ionides 2008), so a handful of samples cannot
            take the whole buffer when the proposal is poor. Biased, with a bias that
            vanishes as the proposal improves (the top weights then agree); the stored
            ``log_w`` and ``ess`` are the raw ones.

    Attributes:
        x: ``(size, dim)`` samples; ``log_w`` their log weights (``-inf``: no weight);
        temperature: the relative temperature the weights are for (``None``: empty);
        ess: normalised Kish ESS of the weights at the last refill.
    """

    def __init__(self, size: int = 8192, truncate: bool = False) -> None:
        if int(size) < 1:
            raise ValueError(f"buffer size must be >= 1, got {size}")
        self.size = int(size)
        self.truncate = bool(truncate)
        self.x: Tensor | None = None
        self.log_w: Tensor | None = None
        self.temperature: float | None = None
        self.ess = 0.0
        self._p: Tensor | None = None

    @torch.no_grad()
    def refill(self, generator, temperature: float, batch_size: int = 4096) -> int:
        """Draw ``size`` samples and weight them; returns the number of energy calls."""
        xs, lws = [], []
        for start in range(0, self.size, batch_size):
            m = min(batch_size, self.size - start)
            x, log_q = generator.sample(m, with_log_prob=True)
            u = generator.reduced_energy(x)
            lw = -u / float(temperature) - log_q
            xs.append(x)
            lws.append(torch.where(torch.isfinite(lw), lw, torch.full_like(lw, -math.inf)))
        self.x, self.log_w = torch.cat(xs), torch.cat(lws)
        self.temperature = float(temperature)
        self.ess = effective_sample_size(self.log_w)
        self._probabilities()
        return self.size

    def _probabilities(self) -> None:
        """Drawing probabilities on the host, read back once per refill (not per draw)."""
        self._p = None
        if self.log_w is not None and torch.isfinite(self.log_w).any():
            lw = self.log_w.double()
            if self.truncate:  # the k = sqrt(N) largest weights all become the k-th
                k = min(math.ceil(math.sqrt(lw.numel())), int(torch.isfinite(lw).sum()))
                lw = torch.minimum(lw, torch.topk(lw, k).values[-1])
            self._p = torch.softmax(lw, 0).cpu()

    def draw(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` samples drawn with replacement in proportion to their weights."""
        if self.x is None or self._p is None:
            raise RuntimeError("the importance buffer is empty or has no sample with weight")
        idx = torch.multinomial(self._p, int(n), replacement=True, generator=generator)
        return self.x[idx.to(self.x.device, non_blocking=True)]

    def state_dict(self) -> dict:
        return {"x": self.x, "log_w": self.log_w, "temperature": self.temperature, "ess": self.ess}

    def load_state_dict(self, state: dict) -> None:
        self.x, self.log_w = state["x"], state["log_w"]
        self.temperature, self.ess = state["temperature"], float(state["ess"])
        self._probabilities()
