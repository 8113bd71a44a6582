"""Train a Boltzmann generator from a Hydra config (``configs/train.yaml``).

    python scripts/train.py                                  # default: ALDP vacuum, RNVP
    python scripts/train.py experiment=aldp_vacuum_rnvp      # the long quality run
    python scripts/train.py system=double_well flow=nice     # toy systems
    python scripts/train.py -m flow=rnvp,nice                # multirun, one folder each
    python scripts/train.py resume=outputs/DATE/TIME         # continue a killed run

Outputs go to the Hydra run folder: ``config.yaml``, ``checkpoints/{latest,best}.pt``,
``model.pt``, ``metrics.csv``, ``metrics.json``, samples and plots.
"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from common import pick_device, pick_dtype  # scripts/common.py
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate, to_absolute_path
from omegaconf import DictConfig, OmegaConf

from bgflow_mini import pipeline
from bgflow_mini.energies import Energy
from bgflow_mini.training import Phase, Trainer

CSV_KEYS = [
    "step",
    "phase",
    "loss",
    "nll",
    "kl",
    "val_nll",
    "ess",
    "ess_eval",
    "lr",
    "n_nonfinite_total",
    "n_skipped_total",
    "grad_norm",
    "elapsed_s",
]


def resolve_run_dir(cfg: DictConfig) -> tuple[Path, DictConfig, bool]:
    """The run folder and config: a fresh Hydra folder, or the folder being resumed."""
    if cfg.resume is None:
        out = Path(HydraConfig.get().runtime.output_dir)
        return out, cfg, False
    path = Path(to_absolute_path(str(cfg.resume)))
    run = path.parent.parent if path.is_file() else path
    saved = run / "config.yaml"
    if not saved.is_file():
        raise FileNotFoundError(f"resume={cfg.resume}: no config.yaml in run folder {run}")
    old = OmegaConf.load(saved)
    old.resume = str(run)
    old.progress = cfg.progress
    return run, old, True


class RunLogger:
    """Metrics CSV every ``every`` steps, checkpoints (latest, best by validation NLL)."""

    def __init__(self, out: Path, every: int, ckpt_every: int, extra: dict, t0: float) -> None:
        self.out, self.every, self.ckpt_every, self.extra = out, every, ckpt_every, extra
        self.t0 = t0
        self.csv_path = out / "metrics.csv"
        self.best = math.inf
        self.last_val = math.nan
        self.tb = None
        try:  # TensorBoard only if installed
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
        except Exception:  # noqa: BLE001 - optional dependency
            self.tb = None

    def restart(self, trainer: Trainer) -> None:
        """Rewrite the CSV from the trainer's history (drops rows past a checkpoint)."""
        vals = [r["val_nll"] for r in trainer.history if "val_nll" in r]
        self.best = min(vals) if vals else math.inf
        with open(self.csv_path, "w", newline="") as f:
            csv.DictWriter(f, CSV_KEYS).writeheader()
        n_bad = n_skip = 0
        for r in trainer.history:
            n_bad += r.get("n_nonfinite", 0)
            n_skip += int(r.get("skipped", False))
            self.last_val = r.get("val_nll", self.last_val)
            if r["step"] % self.every == 0:
                self._row(r, n_bad, n_skip, math.nan)

    def _row(self, r: dict, n_bad: int, n_skip: int, elapsed: float) -> None:
        row = {k: r.get(k, "") for k in CSV_KEYS}
        row.update(
            val_nll=self.last_val,
            n_nonfinite_total=n_bad,
            n_skipped_total=n_skip,
            elapsed_s=round(elapsed, 2),
        )
        with open(self.csv_path, "a", newline="") as f:
            csv.DictWriter(f, CSV_KEYS).writerow(row)
        if self.tb is not None:
            for k in ("loss", "nll", "kl", "ess", "ess_eval", "val_nll"):
                v = row.get(k)
                if isinstance(v, float) and math.isfinite(v):
                    self.tb.add_scalar(k, v, r["step"])

    def __call__(self, trainer: Trainer, r: dict) -> None:
        if "val_nll" in r:
            self.last_val = r["val_nll"]
            if r["val_nll"] < self.best:
                self.best = r["val_nll"]
                trainer.save_checkpoint(self.out / "checkpoints" / "best.pt", self.extra)
        if r["step"] % self.every == 0:
            self._row(r, trainer.n_nonfinite_samples, trainer.n_skipped, time.time() - self.t0)
        if r["step"] % self.ckpt_every == 0:
            trainer.save_checkpoint(self.out / "checkpoints" / "latest.pt", self.extra)


def build(cfg: DictConfig, device: torch.device, dtype: torch.dtype):
    """System, data and generator from the config."""
    system = instantiate(cfg.system.load)
    flow_factory = instantiate(cfg.flow)
    if isinstance(system, Energy):  # analytic toy energy
        data = pipeline.toy_data(
            system, **cfg.data.toy, fractions=tuple(cfg.data.fractions), seed=cfg.seed
        )
        generator = pipeline.toy_generator(system, data.train, flow_factory)
        name = cfg.system.name
    else:
        data = pipeline.molecular_data(
            system,
            OmegaConf.to_container(cfg.md, resolve=True),
            to_absolute_path(cfg.data_dir),
            fractions=tuple(cfg.data.fractions),
            seed=cfg.seed,
            stride=cfg.data.stride,
            n_workers=cfg.data.n_workers,
            progress=cfg.progress,
        )
        energy = instantiate(cfg.energy)(system)
        if cfg.training.regularization is not None:
            energy = instantiate(cfg.training.regularization)(energy)
        generator = pipeline.molecular_generator(system, data.train, flow_factory, energy)
        name = cfg.system.name
    return system, data, generator.to(device=device, dtype=dtype), name


def write_outputs(
    out: Path, system, samples: dict, metrics: dict, trainer: Trainer, data, cfg: DictConfig
) -> None:
    """Samples (mdtraj HDF5 + .npy), metrics.json and plots."""
    from bgflow_mini import plotting

    np.save(out / "log_weights.npy", samples["log_w"])
    np.save(out / "energies.npy", samples["u"])
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    plots = out / "plots"
    plotting.plot_training_curves(plots / "training.png", trainer.history)
    plotting.plot_log_weights(plots / "log_weights.png", samples["log_w"])
    if isinstance(system, Energy):
        np.save(out / "samples.npy", samples["x"])
        return
    import mdtraj

    x = samples["x"].reshape(len(samples["x"]), -1, 3).astype(np.float32)
    if cfg.evaluation.save_samples:
        mdtraj.Trajectory(x, system.mdtraj_topology).save_hdf5(str(out / "samples.h5"))
    from bgflow_mini import cv as cvmod

    if {"phi", "psi"} <= set(system.cvs):
        md_cv = cvmod.compute_cvs(data.test.numpy(), system.cvs, ["phi", "psi"])
        g_cv = cvmod.compute_cvs(samples["x"], system.cvs, ["phi", "psi"])
        plotting.plot_ramachandran(
            plots / "ramachandran.png",
            {
                "MD (test)": (md_cv["phi"], md_cv["psi"]),
                "generator": (g_cv["phi"], g_cv["psi"]),
                "generator, reweighted": (g_cv["phi"], g_cv["psi"], samples["log_w"]),
            },
        )


def summary_table(metrics: dict) -> str:
    rows = [
        ("ESS (normalised)", "ess", "{:.4f}"),
        ("test NLL", "test_nll", "{:.3f}"),
        ("dF reweighted (kT)", "dF_reweighted", "{:.3f}"),
        ("dF reference (kT)", "dF_md", "{:.3f}"),
        ("dF exact (kT)", "dF_exact", "{:.3f}"),
        ("dF error (kT)", "dF_error", "{:+.3f}"),
        ("Ramachandran KL", "ramachandran_kl", "{:.4f}"),
        ("Ramachandran KL, MD train (floor)", "ramachandran_kl_md_train", "{:.4f}"),
        ("finite energies", "finite_energy_fraction", "{:.4f}"),
        ("wall time (s)", "wall_time_s", "{:.0f}"),
        ("steps/s", "steps_per_s", "{:.2f}"),
    ]
    lines = ["| metric | value |", "| --- | --- |"]
    for label, key, fmt in rows:
        if key in metrics:
            v = metrics[key]
            err = metrics.get(key + "_stderr")
            s = fmt.format(v) + (f" ± {err:.3f}" if err is not None else "")
            lines.append(f"| {label} | {s} |")
    return "\n".join(lines)


def run(cfg: DictConfig) -> dict:
    """The whole job; returns the metrics dict."""
    t0 = time.time()
    out, cfg, resuming = resolve_run_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    if not resuming:
        OmegaConf.save(cfg, out / "config.yaml", resolve=True)
    device, dtype = pick_device(cfg.device), pick_dtype(cfg.dtype)
    if cfg.num_threads:
        torch.set_num_threads(int(cfg.num_threads))
    torch.manual_seed(cfg.seed)
    system, data, generator, name = build(cfg, device, dtype)
    phases = [Phase(**p) for p in OmegaConf.to_container(cfg.training.phases, resolve=True)]
    total = sum(p.steps for p in phases)
    tc = cfg.training
    sched = None
    if tc.scheduler is not None:
        factory = instantiate(tc.scheduler)
        sched = lambda opt: factory(opt, total_steps=total)  # noqa: E731
    extra = {"system": name, "flow": OmegaConf.to_container(cfg.flow, resolve=True)}
    logger = RunLogger(out, tc.metrics_every, tc.checkpoint_every, extra, t0)
    trainer = Trainer(
        generator,
        lr=tc.lr,
        batch_size=tc.batch_size,
        kl_batch_size=tc.kl_batch_size,
        clip_grad_norm=tc.clip_grad_norm,
        scheduler=sched,
        weight_decay=tc.weight_decay,
        ess_every=tc.ess_every,
        ess_samples=tc.ess_samples,
        val_data=data.val,
        eval_every=tc.eval_every,
        seed=cfg.seed,
        progress=cfg.progress,
        callbacks=[logger],
    )
    if resuming:
        ckpt = out / "checkpoints" / "latest.pt"
        if ckpt.is_file():
            got = trainer.load_checkpoint(ckpt)
            if got.get("system") != name:
                raise ValueError(
                    f"checkpoint {ckpt} is for system {got.get('system')!r}, not {name!r}"
                )
            print(f"[train] resumed from {ckpt} at step {trainer.step}/{total}")
        else:
            print(f"[train] no checkpoint in {out}; starting from step 0")
    logger.restart(trainer)  # (re)writes metrics.csv from the restored history
    t_train = time.time()
    steps_before = trainer.step
    trainer.fit_phases(phases, data=data.train)
    train_time = time.time() - t_train
    trainer.save_checkpoint(out / "checkpoints" / "latest.pt", extra)
    torch.save(generator.state_dict(), out / "model.pt")

    ev = cfg.evaluation
    if isinstance(system, Energy):
        metrics, samples = pipeline.evaluate_toy(
            generator,
            data,
            n_samples=ev.n_samples,
            batch_size=ev.batch_size,
            n_bootstrap=ev.n_bootstrap,
            seed=cfg.seed,
            progress=cfg.progress,
        )
    else:
        metrics, samples = pipeline.evaluate_molecular(
            generator,
            system,
            data,
            n_samples=ev.n_samples,
            batch_size=ev.batch_size,
            state_a=ev.state_a,
            state_b=ev.state_b,
            bins=ev.bins,
            n_bootstrap=ev.n_bootstrap,
            seed=cfg.seed,
            progress=cfg.progress,
        )
        energy = generator.energy
        metrics["energy_stats"] = dict(getattr(energy, "stats", {}) or {})
    metrics.update(
        system=name,
        steps=trainer.step,
        skipped_steps=trainer.n_skipped,
        nonfinite_training_samples=trainer.n_nonfinite_samples,
        steps_per_s=(trainer.step - steps_before) / max(train_time, 1e-9),
        wall_time_s=time.time() - t0,
        data_info=data.info,
        peak_memory_mb=_peak_memory_mb(device),
    )
    write_outputs(out, system, samples, metrics, trainer, data, cfg)
    print(f"\n[train] {name}: results in {out}\n" + summary_table(metrics))
    return metrics


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@hydra.main(config_path="../configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    metrics = run(cfg)
    return float(metrics.get("ess", math.nan))


if __name__ == "__main__":
    main()
