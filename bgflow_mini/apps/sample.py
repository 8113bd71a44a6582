"""``bgflow-sample``: draw samples from a trained generator (``configs/sample.yaml``).

    bgflow-sample checkpoint=outputs/DATE/TIME n_samples=100000
    bgflow-sample checkpoint=RUN/checkpoints/best.pt n_samples=1000000 \\
        formats=[h5,dcd,pdb] out=samples/best energy=torchff device=cuda
    bgflow-sample checkpoint=RUN energy=torchff ais.steps=16   # annealed importance sampling
    bgflow-sample checkpoint=RUN weights=ema   # the final EMA of checkpoints/latest.pt

The checkpoint alone rebuilds the generator and its target (no config file needed).
Writes a sample folder (see :func:`bgflow_mini.samples.write_samples`): positions batch by
batch, so 10^6 samples need little memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate, to_absolute_path
from omegaconf import DictConfig, OmegaConf

from bgflow_mini.checkpoint import find_checkpoint, load_generator, read_checkpoint
from bgflow_mini.samples import write_samples
from bgflow_mini.targets import load_target

from ._common import CONFIG_PATH, plain, run_app, set_threads
from .validation import validate_sample_config

__all__ = ["main", "sample", "output_dir", "run_energy"]


def output_dir(cfg: DictConfig) -> Path:
    """``out`` (relative to the launch folder) or the Hydra run folder."""
    if cfg.get("out") is not None:
        return Path(to_absolute_path(str(cfg.out)))
    return Path(HydraConfig.get().runtime.output_dir)


def run_energy(target, energy_cfg, run_config: dict, regularize: bool = False):
    """The target energy: ``energy_cfg`` (a configs/energy node) or else the training
    run's; ``regularize`` wraps it in the run's regularisation (default: the real one)."""
    spec = plain(energy_cfg) if energy_cfg is not None else run_config.get("energy")
    energy = target.energy(None if spec is None else instantiate(OmegaConf.create(spec)))
    reg = (run_config.get("training") or {}).get("regularization")
    if regularize and reg:
        energy = instantiate(OmegaConf.create(reg))(energy)
    return energy, spec


def sample(cfg: DictConfig, out: Path) -> dict:
    """Rebuild the generator of ``cfg.checkpoint``, sample, write ``out``; the summary."""
    validate_sample_config(cfg)
    set_threads(cfg.num_threads)
    torch.manual_seed(int(cfg.seed))
    weights = str(cfg.get("weights") or "saved")
    checkpoint = find_checkpoint(to_absolute_path(str(cfg.checkpoint)), weights)
    state = read_checkpoint(checkpoint)
    run = dict(state.get("extra") or {})
    target = load_target(state["spec"]["target"])
    energy, spec = run_energy(target, cfg.get("energy"), run.get("config") or {}, cfg.regularize)
    with energy:
        generator = load_generator(
            checkpoint, target, energy, str(cfg.device), cfg.get("dtype"), weights
        )
        p = next(generator.parameters())
        extra = {
            "system": target.name,
            "checkpoint": str(checkpoint),
            "weights": weights,
            "energy": type(energy).__name__,
            "energy_config": spec,
            "regularized_energy": bool(cfg.regularize),
            "md": run.get("md"),
            "data_dir": run.get("data_dir"),
            "data_replicas": ((run.get("config") or {}).get("data") or {}).get("replicas", 1),
            "seed": int(cfg.seed),
            "device": str(p.device),
            "dtype": str(p.dtype).replace("torch.", ""),
        }
        return write_samples(
            generator,
            target,
            out,
            int(cfg.n_samples),
            int(cfg.batch_size),
            formats=list(cfg.formats),
            progress=bool(cfg.progress),
            extra=extra,
            ais=plain(cfg.get("ais")),
        )


@hydra.main(config_path=CONFIG_PATH, config_name="sample", version_base="1.3")
def main(cfg: DictConfig) -> None:
    out = output_dir(cfg)
    summary = run_app(lambda: sample(cfg, out))
    keys = ("n_samples", "ess", "nonfinite_energy_fraction", "samples_per_s")
    print(f"[sample] {summary['system']}: {out}")
    print(json.dumps({k: summary[k] for k in keys}, indent=2))


if __name__ == "__main__":
    main()
