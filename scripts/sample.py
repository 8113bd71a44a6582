"""Draw samples from a trained Boltzmann generator (Hydra config ``configs/sample.yaml``).

    python scripts/sample.py checkpoint=outputs/DATE/TIME n_samples=100000
    python scripts/sample.py checkpoint=RUN/checkpoints/best.pt n_samples=1000000 \\
        formats=[h5,dcd,pdb] out=samples/best energy=torchff device=cuda

Writes (to ``out`` or the Hydra run folder): ``samples.h5`` (mdtraj HDF5, nm; plus
``samples.dcd`` and ``samples.pdb`` = first frame as DCD topology) or ``samples.npy``
for toy systems, ``log_weights.npy`` (-u - log q), ``energies.npy`` (reduced, kT),
``log_q.npy``, ``summary.json`` (n, ESS, fraction of non-finite energies, ...) and
``run_config.yaml`` (the training config, used by ``scripts/free_energy.py``).
Positions are written batch by batch, so 10^6 samples need little memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import torch
from common import RUN_CONFIG, close_energy, load_run, pick_device, write_samples
from hydra.core.hydra_config import HydraConfig
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

__all__ = ["sample_run", "main"]


def output_dir(cfg: DictConfig) -> Path:
    """``out`` (relative to the launch folder) or the Hydra run folder."""
    if cfg.get("out") is not None:
        return Path(to_absolute_path(str(cfg.out)))
    return Path(HydraConfig.get().runtime.output_dir)


def energy_option(value):
    """``energy=`` as None, a config name (str) or a plain dict."""
    if value is None or isinstance(value, str):
        return value
    return OmegaConf.to_container(value, resolve=True)


def sample_run(cfg: DictConfig, out: Path) -> dict:
    """Rebuild the generator named by ``cfg.checkpoint``, sample, write ``out``; the summary."""
    if cfg.num_threads:
        torch.set_num_threads(int(cfg.num_threads))
    torch.manual_seed(int(cfg.seed))
    checkpoint = to_absolute_path(str(cfg.checkpoint))
    config = None if cfg.get("config") is None else to_absolute_path(str(cfg.config))
    run_cfg, system, generator = load_run(
        checkpoint,
        pick_device(str(cfg.device)),
        None if cfg.get("dtype") is None else str(cfg.dtype),
        config=config,
        energy=energy_option(cfg.get("energy")),
        regularize=bool(cfg.get("regularize", False)),
    )
    out.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(run_cfg, out / RUN_CONFIG, resolve=True)
    extra = {
        "system": str(run_cfg.system.name),
        "checkpoint": checkpoint,
        "energy": type(generator.energy).__name__,
        "regularized_energy": bool(cfg.get("regularize", False)),
        "seed": int(cfg.seed),
        "device": str(next(generator.parameters()).device),
        "dtype": str(next(generator.parameters()).dtype).replace("torch.", ""),
    }
    try:
        summary = write_samples(
            generator,
            system,
            out,
            int(cfg.n_samples),
            int(cfg.batch_size),
            formats=list(cfg.formats),
            progress=bool(cfg.progress),
            extra=extra,
        )
    finally:
        close_energy(generator.energy)
    return summary


@hydra.main(config_path="../configs", config_name="sample", version_base="1.3")
def main(cfg: DictConfig) -> None:
    out = output_dir(cfg)
    summary = sample_run(cfg, out)
    keys = ("n_samples", "ess", "nonfinite_energy_fraction", "samples_per_s")
    print(f"[sample] {summary['system']}: {out}")
    print(json.dumps({k: summary[k] for k in keys}, indent=2))


if __name__ == "__main__":
    main()
