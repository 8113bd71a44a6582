"""Training loop for Boltzmann generators: ML + reverse KL, phases, checkpoints.

The loss of one step is ``w_ml * NLL(data batch) + w_kl * reverse KL(samples)``, both
in kT per sample. A step whose loss or gradient is not finite is skipped (the
parameters are not touched) and counted. Checkpoints hold the model, optimizer,
scheduler, step, history and every random state the loop uses, so a run resumed
from a checkpoint produces the same losses as an uninterrupted one (on CPU).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .annealing import ImportanceBuffer
from .checkpoint import _alternative, full_spec
from .fileio import load_torch, save_torch
from .losses import nll, reverse_kl
from .reweighting import effective_sample_size
from .schedules import Phase, cosine_schedule

__all__ = ["Trainer", "Phase", "cosine_schedule"]  # Phase, cosine_schedule: see .schedules


class Trainer:
    """Adam training of a :class:`~bgflow_mini.BoltzmannGenerator`.

    Arguments:
        generator: the model; its ``energy`` is needed when ``w_kl > 0``.
        lr: Adam learning rate.
        batch_size: data batch size for the ML loss.
        kl_batch_size: samples per step for reverse KL (default ``batch_size``).
        w_ml, w_kl: default loss weights (a :class:`Phase` overrides them).
        clip_grad_norm: max gradient norm (``None``: no clipping; the norm is still logged).
        scheduler: optional factory ``optimizer -> torch LR scheduler`` stepped every step.
        weight_decay: Adam weight decay.
        drop_nonfinite: in reverse KL, average over the samples with finite energy only
            (their count is logged); if ``False`` one infinite energy makes the step's
            loss infinite, so the step is skipped.
        ess_every, ess_samples: every ``ess_every`` steps estimate the normalised ESS on
            ``ess_samples`` fresh samples (0 disables; needs an energy). The estimate is of
            the averaged weights when ``ema_decay`` is set, and the weights with the best
            estimate are kept for :meth:`finalize`.
        ema_decay: keep an exponential moving average of the parameters with this decay
            (e.g. 0.999; ``None``: off). Early steps use ``min(decay, (1 + t) / (10 + t))``.
        buffer_size, resample_every: the importance buffer of annealing phases
            (``Phase.w_iw > 0``, see :mod:`bgflow_mini.annealing`).
        val_data, eval_every: validation NLL every ``eval_every`` steps (0 disables).
        checkpoint_path, checkpoint_every: save a checkpoint every ``checkpoint_every``
            steps (atomically) and at the end of :meth:`fit`.
        seed: seed of the generator that draws data batches (model sampling uses the
            global torch RNG, whose state is checkpointed too).
        progress: show a tqdm progress bar.
        callbacks: functions ``callback(trainer, record)`` called after every step.
    """

    def __init__(
        self,
        generator,
        lr: float = 1e-3,
        batch_size: int = 256,
        kl_batch_size: int | None = None,
        w_ml: float = 1.0,
        w_kl: float = 0.0,
        clip_grad_norm: float | None = None,
        scheduler: Callable | None = None,
        weight_decay: float = 0.0,
        drop_nonfinite: bool = True,
        ess_every: int = 0,
        ess_samples: int = 1024,
        val_data: Tensor | None = None,
        eval_every: int = 0,
        checkpoint_path: str | os.PathLike | None = None,
        checkpoint_every: int = 0,
        seed: int = 0,
        progress: bool = True,
        callbacks: Sequence[Callable] = (),
        ema_decay: float | None = None,
        buffer_size: int = 8192,
        resample_every: int = 50,
    ) -> None:
        if lr <= 0 or batch_size < 1:
            raise ValueError(f"need lr > 0 and batch_size >= 1, got lr={lr}, {batch_size=}")
        if clip_grad_norm is not None and clip_grad_norm <= 0:
            raise ValueError(f"clip_grad_norm must be positive or None, got {clip_grad_norm}")
        self.generator = generator
        self.optimizer = torch.optim.Adam(generator.parameters(), lr=lr, weight_decay=weight_decay)
        self.scheduler = scheduler(self.optimizer) if scheduler is not None else None
        self.batch_size = int(batch_size)
        self.kl_batch_size = int(kl_batch_size or batch_size)
        self.w_ml, self.w_kl = float(w_ml), float(w_kl)
        self.clip_grad_norm = clip_grad_norm
        self.drop_nonfinite = drop_nonfinite
        self.ess_every, self.ess_samples = int(ess_every), int(ess_samples)
        self.val_data = None if val_data is None else self._check_data(val_data, "val_data")
        self.eval_every = int(eval_every)
        self.checkpoint_path = None if checkpoint_path is None else Path(checkpoint_path)
        self.checkpoint_every = int(checkpoint_every)
        self.progress = progress
        self.callbacks = list(callbacks)
        self.step = 0
        self.n_skipped = 0
        self.n_nonfinite_samples = 0
        self.n_capped_samples = 0
        self.n_energy_evaluations = 0  # target-energy calls (samples), reverse KL and ESS
        self.history: list[dict] = []
        self._batch_rng = torch.Generator().manual_seed(int(seed))
        if ema_decay is not None and not 0.0 < float(ema_decay) < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1) or None, got {ema_decay}")
        self.ema_decay = None if ema_decay is None else float(ema_decay)
        self.ema: list[Tensor] | None = None
        if self.ema_decay is not None:
            self.ema = [p.detach().clone() for p in generator.parameters()]
        # the weights with the best ESS estimate so far: {"ess", "step", "params"}
        self.best: dict = {"ess": -1.0, "step": 0, "params": None}
        self.last_eval_samples: Tensor | None = None
        self.buffer = ImportanceBuffer(buffer_size)  # for phases with w_iw > 0
        self.resample_every = int(resample_every)

    # ------------------------------------------------------------------ helpers
    @property
    def _param(self) -> Tensor:
        return next(self.generator.parameters())

    def _check_data(self, data: Tensor, name: str = "data") -> Tensor:
        if not isinstance(data, Tensor) or data.ndim != 2:
            shape = tuple(data.shape) if isinstance(data, Tensor) else type(data).__name__
            raise ValueError(f"{name} must be a tensor of shape (n, dim), got {shape}")
        if data.shape[0] < 1:
            raise ValueError(f"{name} is empty")
        bad = ~torch.isfinite(data).all(dim=1)
        if bad.any():
            raise ValueError(
                f"{name} contains {int(bad.sum())} rows with NaN/inf (first at row "
                f"{int(bad.nonzero()[0])}); clean the data before training"
            )
        return data

    def _set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = float(lr)
        if self.scheduler is not None and hasattr(self.scheduler, "base_lrs"):
            self.scheduler.base_lrs = [float(lr)] * len(self.optimizer.param_groups)

    # ------------------------------------------------------------------ training
    def fit(
        self,
        steps: int,
        data: Tensor | None = None,
        w_ml: float | None = None,
        w_kl: float | None = None,
        lr: float | None = None,
        batch_size: int | None = None,
        kl_batch_size: int | None = None,
        name: str = "",
        w_iw: float = 0.0,
        temperature: float = 1.0,
        resample_every: int | None = None,
    ) -> list[dict]:
        """Run ``steps`` optimisation steps; returns the history records of those steps.

        ``data`` ``(n, dim)`` is required when the ML weight is positive; NaN/inf rows
        raise ``ValueError``. Weights, learning rate and batch sizes default to the
        trainer's settings; ``w_iw``, ``temperature`` and ``resample_every`` are those of
        :class:`Phase`.
        """
        w_ml = self.w_ml if w_ml is None else float(w_ml)
        w_kl = self.w_kl if w_kl is None else float(w_kl)
        w_iw, temperature = float(w_iw), float(temperature)
        if min(w_ml, w_kl, w_iw) < 0 or (w_ml == 0 and w_kl == 0 and w_iw == 0):
            raise ValueError(
                f"need w_ml, w_kl, w_iw >= 0 and not all 0, got {w_ml=}, {w_kl=}, {w_iw=}"
            )
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be positive, got {temperature}")
        if w_iw > 0 and self.generator.energy is None:
            raise ValueError("w_iw > 0 (importance-weighted ML) needs a generator with an energy")
        anneal = (w_iw, temperature, int(resample_every or self.resample_every))
        if w_ml > 0:
            if data is None:
                raise ValueError("w_ml > 0 needs data: fit(steps, data=...)")
            data = self._check_data(data)
        if (w_kl > 0 or self.ess_every > 0) and self.generator.energy is None:
            raise ValueError("reverse KL and ESS need a generator with an energy")
        if lr is not None:
            self._set_lr(lr)
        bs = int(batch_size or self.batch_size)
        kl_bs = int(kl_batch_size or self.kl_batch_size)
        start = len(self.history)
        bar = tqdm(range(int(steps)), disable=not self.progress, desc=name or "train")
        for _ in bar:
            record = self._train_step(data, w_ml, w_kl, bs, kl_bs, anneal)
            record["phase"] = name
            self._periodic(record)
            self.history.append(record)
            bar.set_postfix(
                {k: f"{record[k]:.3g}" for k in ("loss", "nll", "kl", "ess") if k in record}
            )
            for cb in self.callbacks:
                cb(self, record)
            if (
                self.checkpoint_path
                and self.checkpoint_every
                and (self.step % self.checkpoint_every == 0)
            ):
                self.save_checkpoint(self.checkpoint_path)
        if self.checkpoint_path is not None:
            self.save_checkpoint(self.checkpoint_path)
        return self.history[start:]

    def fit_phases(self, phases: Sequence[Phase], data: Tensor | None = None) -> list[dict]:
        """Run a schedule of :class:`Phase` objects, continuing from ``self.step``.

        Steps already done (e.g. after :meth:`load_checkpoint`) are not repeated, so
        calling this again with the same phases resumes an interrupted schedule.
        """
        done, records = 0, []
        for phase in phases:
            end = done + int(phase.steps)
            remaining = end - max(self.step, done)
            if remaining > 0:
                fresh = self.step <= done
                records += self.fit(
                    remaining,
                    data=data,
                    w_ml=phase.w_ml,
                    w_kl=phase.w_kl,
                    lr=phase.lr if fresh else None,
                    batch_size=phase.batch_size,
                    kl_batch_size=phase.kl_batch_size,
                    name=phase.name,
                    w_iw=phase.w_iw,
                    temperature=phase.temperature,
                    resample_every=phase.resample_every,
                )
            done = end
        return records

    def _train_step(self, data, w_ml: float, w_kl: float, bs: int, kl_bs: int, anneal) -> dict:
        gen = self.generator
        w_iw, temperature, resample_every = anneal
        p = self._param
        record: dict = {"step": self.step + 1, "lr": self.optimizer.param_groups[0]["lr"]}
        if temperature != 1.0 or w_iw > 0:
            record["temperature"] = temperature
        if w_iw > 0:
            buf = self.buffer
            if buf.temperature != temperature or self.step % resample_every == 0:
                gen.eval()
                self.n_energy_evaluations += buf.refill(gen, temperature)
            record["ess_buffer"] = buf.ess
        gen.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = p.new_zeros(())
        if w_iw > 0:
            l_iw = nll(gen, self.buffer.draw(bs, self._batch_rng).detach())
            loss = loss + w_iw * l_iw
            record["nll_iw"] = float(l_iw.detach())
        if w_ml > 0:
            idx = torch.randint(data.shape[0], (bs,), generator=self._batch_rng)
            xb = data[idx].to(device=p.device, dtype=p.dtype)
            l_ml = nll(gen, xb)
            loss = loss + w_ml * l_ml
            record["nll"] = float(l_ml.detach())
        if w_kl > 0:
            vals = reverse_kl(gen, kl_bs, reduction="none", target_temperature=temperature)
            self.n_energy_evaluations += int(vals.numel())
            finite = torch.isfinite(vals)
            n_bad = int((~finite).sum())
            n_capped = 0
            # a regularised energy (LinLogCut) maps non-finite energies to a finite cap:
            # count what the real energy gave, from the wrapper's per-call statistics
            last = getattr(gen.energy, "last_stats", None)
            if isinstance(last, dict):
                n_bad = max(n_bad, int(last.get("nonfinite", 0)))
                n_capped = int(last.get("capped", 0))
            self.n_nonfinite_samples += n_bad
            self.n_capped_samples += n_capped
            record["n_nonfinite"] = n_bad
            record["n_capped"] = n_capped
            record["ess"] = effective_sample_size(-vals)
            if self.drop_nonfinite and 0 < n_bad < vals.numel():
                vals = vals[finite]
            l_kl = vals.mean()
            loss = loss + w_kl * l_kl
            record["kl"] = float(l_kl.detach())
        record["loss"] = float(loss.detach())
        skipped = not math.isfinite(record["loss"])
        if not skipped:
            loss.backward()
            max_norm = self.clip_grad_norm or math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(gen.parameters(), max_norm)
            record["grad_norm"] = float(grad_norm)
            skipped = not math.isfinite(record["grad_norm"])
        if skipped:
            self.n_skipped += 1
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.step()
            if self.ema is not None:
                t = self.step
                decay = min(self.ema_decay, (1.0 + t) / (10.0 + t))
                with torch.no_grad():
                    params = [p.detach() for p in gen.parameters()]
                    torch._foreach_lerp_(self.ema, params, 1.0 - decay)
            if self.scheduler is not None:
                self.scheduler.step()
        record["skipped"] = skipped
        self.step += 1
        return record

    @contextmanager
    def averaged_weights(self) -> Iterator[None]:
        """Inside the block the generator holds the averaged (EMA) weights, if any."""
        if self.ema is None:
            yield
            return
        params = list(self.generator.parameters())
        with torch.no_grad():
            saved = [p.detach().clone() for p in params]
            torch._foreach_copy_([p.detach() for p in params], self.ema)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_([p.detach() for p in params], saved)

    def finalize(self, select: str = "best_ess") -> dict:
        """Put the weights to evaluate into the generator; returns what was chosen.

        ``select``: ``"best_ess"`` (the weights with the best periodic ESS estimate on
        fresh samples; the averaged ones with EMA), ``"ema"`` (the final average) or
        ``"last"`` (the last step's weights). Without an estimate or an average, falls
        back to the next choice in that order.
        """
        if select not in ("best_ess", "ema", "last"):
            raise ValueError(f"select must be 'best_ess', 'ema' or 'last', got {select!r}")
        chosen = {"kind": "last", "step": self.step}
        source = None
        if select == "best_ess" and self.best["params"] is not None:
            source = self.best["params"]
            chosen = {"kind": "best_ess", "step": self.best["step"], "ess": self.best["ess"]}
        elif select in ("best_ess", "ema") and self.ema is not None:
            source, chosen = self.ema, {"kind": "ema", "step": self.step}
        if source is not None:
            with torch.no_grad():
                torch._foreach_copy_([p.detach() for p in self.generator.parameters()], source)
        return chosen

    @torch.no_grad()
    def _periodic(self, record: dict) -> None:
        gen = self.generator
        if self.ess_every and self.step % self.ess_every == 0:
            gen.eval()
            with self.averaged_weights():
                x, log_q = gen.sample(self.ess_samples, with_log_prob=True)
                self.n_energy_evaluations += int(x.shape[0])
                ess = effective_sample_size(gen.log_weights(x, log_q))
                self.last_eval_samples = x  # for callbacks, e.g. the collapse guard
                if ess > self.best["ess"]:
                    params = [p.detach().clone() for p in gen.parameters()]
                    self.best = {"ess": ess, "step": self.step, "params": params}
            record["ess_eval"] = ess
        if self.val_data is not None and self.eval_every and self.step % self.eval_every == 0:
            gen.eval()
            p = self._param
            total = 0.0
            for chunk in self.val_data.split(4096):
                total += float(nll(gen, chunk.to(p.device, p.dtype), reduction="sum"))
            record["val_nll"] = total / self.val_data.shape[0]

    # --------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """Everything needed to continue training exactly: model, optimizer, RNGs, ..."""
        state = {
            "model": self.generator.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "step": self.step,
            "n_skipped": self.n_skipped,
            "n_nonfinite_samples": self.n_nonfinite_samples,
            "n_capped_samples": self.n_capped_samples,
            "n_energy_evaluations": self.n_energy_evaluations,
            "history": self.history,
            "spec": full_spec(self.generator),
            "rng_torch": torch.get_rng_state(),
            "rng_batch": self._batch_rng.get_state(),
            "ema": self.ema,
            "best": self.best,
            "buffer": self.buffer.state_dict(),
        }
        if torch.cuda.is_available():
            state["rng_cuda"] = torch.cuda.get_rng_state_all()
        return state

    def save_checkpoint(self, path: str | os.PathLike, extra: dict | None = None) -> Path:
        """Write a checkpoint atomically (temp file + rename) and return its path.

        ``extra`` is stored under ``"extra"`` (e.g. the system name and config).
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = self.state_dict()
        state["extra"] = extra or {}
        return save_torch(state, path)

    def load_checkpoint(self, path: str | os.PathLike) -> dict:
        """Restore a checkpoint written by :meth:`save_checkpoint`; returns its ``extra``.

        Raises ``ValueError`` if the file is unreadable (truncated by a crash: the
        message names it and offers ``best.pt`` beside it) or the stored model does not
        match this generator (e.g. a checkpoint from a different system or flow).
        """
        path = Path(path)
        state = load_torch(path, alternative=_alternative(path))
        try:
            self.generator.load_state_dict(state["model"])
        except RuntimeError as err:
            raise ValueError(
                f"checkpoint {path} does not match this model (different system or flow "
                f"settings?): {str(err).splitlines()[0]}"
            ) from err
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.n_skipped = int(state["n_skipped"])
        self.n_nonfinite_samples = int(state["n_nonfinite_samples"])
        self.n_capped_samples = int(state.get("n_capped_samples", 0))
        self.n_energy_evaluations = int(state.get("n_energy_evaluations", 0))
        self.history = list(state["history"])
        torch.set_rng_state(state["rng_torch"])
        self._batch_rng.set_state(state["rng_batch"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema = [t.to(p) for t, p in zip(state["ema"], self.ema, strict=True)]
        best = state.get("best") or {"ess": -1.0, "step": 0, "params": None}
        if best["params"] is not None:
            ref = list(self.generator.parameters())
            best["params"] = [t.to(p) for t, p in zip(best["params"], ref, strict=True)]
        self.best = best
        if state.get("buffer") is not None:
            self.buffer.load_state_dict(state["buffer"])
        if "rng_cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        return state.get("extra", {})
