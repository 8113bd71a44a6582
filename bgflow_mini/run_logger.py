"""Logging of a training run: ``metrics.csv`` rows and the latest / best checkpoints.

:class:`RunLogger` is a :class:`~bgflow_mini.training.Trainer` callback. Every
``every`` steps it appends a row (losses, validation NLL, ESS, learning rate, running
counts of non-finite and capped energies and of skipped steps); every ``ckpt_every``
steps it writes ``checkpoints/latest.pt``, and ``checkpoints/best.pt`` whenever the
validation NLL improves. On resume, :meth:`RunLogger.restart` rewrites the CSV from the
trainer's restored history, so rows logged after the last checkpoint are not doubled.
"""

from __future__ import annotations

import csv
import io
import math
import time
from collections.abc import Mapping
from pathlib import Path

from .fileio import save_text

__all__ = ["RunLogger", "CSV_KEYS"]

CSV_KEYS = [
    "step",
    "phase",
    "loss",
    "nll",
    "kl",
    "nll_iw",
    "temperature",
    "ess_buffer",
    "val_nll",
    "ess",
    "ess_eval",
    "lr",
    "n_nonfinite_total",
    "n_capped_total",
    "n_skipped_total",
    "grad_norm",
    "elapsed_s",
]


class RunLogger:
    """Metrics CSV every ``every`` steps, checkpoints (latest, best by validation NLL).

    Arguments:
        out: the run folder (``metrics.csv`` and ``checkpoints/`` go there).
        every, ckpt_every: steps between CSV rows / ``latest.pt`` writes (>= 1).
        extra: stored in every checkpoint (e.g. the run's config).
        t0: wall-clock start of the run (``time.time()``), for ``elapsed_s``.
        tensorboard: also write scalars with TensorBoard's ``SummaryWriter`` if installed.
        columns: extra record keys written as CSV columns (e.g. ``StateMonitor.columns``).
    """

    def __init__(
        self,
        out: str | Path,
        every: int,
        ckpt_every: int,
        extra: Mapping | None = None,
        t0: float | None = None,
        tensorboard: bool = True,
        columns: list[str] | tuple[str, ...] = (),
    ) -> None:
        self.out = Path(out)
        self.keys = CSV_KEYS + [c for c in columns if c not in CSV_KEYS]
        self.every, self.ckpt_every = int(every), int(ckpt_every)
        self.extra = dict(extra or {})
        self.t0 = time.time() if t0 is None else t0
        self.csv_path = self.out / "metrics.csv"
        self.best = math.inf
        self.last_val = math.nan
        self.tb = None
        if tensorboard:
            try:  # optional dependency
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.out / "tensorboard"))
            except Exception:  # noqa: BLE001 - tensorboard missing or broken
                self.tb = None

    def close(self) -> None:
        """Flush and close the TensorBoard writer (if any)."""
        if self.tb is not None:
            self.tb.close()
            self.tb = None

    def _row(self, r: Mapping, totals: tuple[int, int, int], elapsed: float) -> dict:
        row = {k: r.get(k, "") for k in self.keys}
        row.update(
            val_nll=self.last_val,
            n_nonfinite_total=totals[0],
            n_capped_total=totals[1],
            n_skipped_total=totals[2],
            elapsed_s=round(elapsed, 2) if math.isfinite(elapsed) else "",
        )
        return row

    def restart(self, trainer) -> None:
        """Rewrite the CSV (atomically) from the trainer's history, e.g. after resuming."""
        vals = [r["val_nll"] for r in trainer.history if "val_nll" in r]
        self.best = min(vals) if vals else math.inf
        buf = io.StringIO()
        writer = csv.DictWriter(buf, self.keys)
        writer.writeheader()
        n_bad = n_cap = n_skip = 0
        for r in trainer.history:
            n_bad += r.get("n_nonfinite", 0)
            n_cap += r.get("n_capped", 0)
            n_skip += int(r.get("skipped", False))
            self.last_val = r.get("val_nll", self.last_val)
            if r["step"] % self.every == 0:
                writer.writerow(self._row(r, (n_bad, n_cap, n_skip), math.nan))
        save_text(buf.getvalue(), self.csv_path)

    def __call__(self, trainer, r: Mapping) -> None:
        if "val_nll" in r:
            self.last_val = r["val_nll"]
            if r["val_nll"] < self.best:
                self.best = r["val_nll"]
                trainer.save_checkpoint(self.out / "checkpoints" / "best.pt", self.extra)
        if r["step"] % self.every == 0:
            totals = (trainer.n_nonfinite_samples, trainer.n_capped_samples, trainer.n_skipped)
            row = self._row(r, totals, time.time() - self.t0)
            with open(self.csv_path, "a", newline="") as f:
                csv.DictWriter(f, self.keys).writerow(row)
            if self.tb is not None:
                for k in ("loss", "nll", "kl", "ess", "ess_eval", "val_nll"):
                    v = row.get(k)
                    if isinstance(v, float) and math.isfinite(v):
                        self.tb.add_scalar(k, v, r["step"])
        if r["step"] % self.ckpt_every == 0:
            if trainer.step != r["step"]:
                raise RuntimeError(
                    f"checkpoint due at step {r['step']} but the trainer is at step "
                    f"{trainer.step}: make ckpt_every ({self.ckpt_every}) a multiple of the "
                    f"trainer's sync_every ({trainer.sync_every})"
                )
            trainer.save_checkpoint(self.out / "checkpoints" / "latest.pt", self.extra)
