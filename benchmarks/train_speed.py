"""Training speed of the default ALDP generator: steps/s and peak memory per energy backend.

Builds the default generator (``configs/flow/rnvp.yaml``, instantiated as is) on the
default replica-exchange data (``configs/md/remd.yaml``, generated and cached on first
use) and times, after ``--warmup`` steps,

* ``ml``: maximum-likelihood steps (no energy calls);
* ``mixed``: ML + reverse KL steps (256 data + 256 generator samples, energy + forces),

with the target energy from ``OpenMMEnergy`` (Reference platform, 1 and 2 worker
processes) and from ``TorchForceField`` (float32, in the training process). Peak memory
is the maximum resident set size of the training process (``ru_maxrss``; OpenMM worker
processes come on top: their own peak is printed separately).

With ``--device cuda`` the generator and ``TorchForceField`` run on the GPU (OpenMM cases
are skipped) and every case is timed with the step records read back every step
(``--sync-every 1``) and every 50 steps (the training config's default), to show what the
loop's host reads cost there.

Usage::

    python benchmarks/train_speed.py                 # 300 timed steps per case
    python benchmarks/train_speed.py --steps 1000 --torch-threads 2
    python benchmarks/train_speed.py --device cuda --batch-size 1024
"""

from __future__ import annotations

import argparse
import datetime
import os
import resource
import time
from pathlib import Path

import torch
from _machine import cpu_model  # benchmarks/_machine.py
from hydra.utils import instantiate
from omegaconf import OmegaConf

from bgflow_mini import pipeline
from bgflow_mini.energies import OpenMMEnergy, TorchForceField
from bgflow_mini.systems import load_system
from bgflow_mini.training import Trainer

__all__ = ["main", "time_steps"]

ROOT = Path(__file__).resolve().parents[1]


def _cfg(path: str):
    """A config file of ``configs/`` as an OmegaConf node."""
    return OmegaConf.load(ROOT / "configs" / path)


def time_steps(
    generator,
    data: torch.Tensor,
    steps: int,
    warmup: int,
    w_kl: float,
    batch_size: int = 256,
    sync_every: int = 1,
) -> float:
    """Steps/s of ``steps`` Adam steps after ``warmup`` untimed ones (waits for the GPU)."""
    trainer = Trainer(
        generator, lr=1e-4, batch_size=batch_size, progress=False, sync_every=sync_every
    )
    trainer.fit(warmup, data=data, w_ml=1.0, w_kl=w_kl)
    cuda = next(generator.parameters()).is_cuda
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    trainer.fit(steps, data=data, w_ml=1.0, w_kl=w_kl)
    if cuda:
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - t0)


def _rss_mib(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024.0  # Linux: KiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--data-dir", default=os.environ.get("BGFLOW_DATA", str(ROOT / "data")))
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--batch-size", type=int, default=256, help="data and generator samples")
    args = ap.parse_args()
    dev = torch.device(args.device)
    syncs = (1, 50) if dev.type == "cuda" else (1,)
    torch.set_num_threads(args.torch_threads)
    torch.manual_seed(0)

    system = load_system("aldp_vacuum")
    data = pipeline.molecular_data(
        system,
        OmegaConf.to_container(_cfg("md/remd.yaml")),
        args.data_dir,
        progress=False,
        log=None,
    )
    factory = instantiate(_cfg("flow/rnvp.yaml"))

    train = data.train.float()
    cases = [("TorchForceField float32", lambda: TorchForceField.from_openmm(system).float())]
    if dev.type == "cpu":
        cases = [
            ("OpenMMEnergy, 1 worker", lambda: OpenMMEnergy(system, n_workers=1)),
            ("OpenMMEnergy, 2 workers", lambda: OpenMMEnergy(system, n_workers=2)),
            *cases,
        ]
    bs, rows = args.batch_size, []
    base = pipeline.molecular_generator(system, data.train, factory).float().to(dev)
    for k in syncs:
        ml = time_steps(base, train, args.steps, args.warmup, 0.0, bs, k)
        rows.append(("none (ML only)", "ML", k, ml))
    for name, make in cases:
        energy = make().to(dev)
        generator = pipeline.molecular_generator(system, data.train, factory, energy).float()
        generator = generator.to(dev)
        for k in syncs:
            rate = time_steps(generator, train, args.steps, args.warmup, 1.0, bs, k)
            rows.append((name, "ML + reverse KL", k, rate))
        if hasattr(energy, "close"):
            energy.close()

    print(f"## Training speed, default ALDP generator ({datetime.date.today()})\n")
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, ")
    if dev.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(dev)}, ")
    print(f"{args.torch_threads} torch thread(s); batch {bs}; {args.steps} timed steps ")
    print(f"after {args.warmup}\n")
    print("| energy | step | records read every | steps/s | samples/s | vs ML step |")
    print("|---|---|---:|---:|---:|---:|")
    ml = rows[0][3]
    for name, kind, k, rate in rows:
        print(f"| {name} | {kind} | {k} | {rate:.1f} | {rate * bs:,.0f} | {rate / ml:.2f}x |")
    print(
        f"\npeak memory: training process {_rss_mib():.0f} MiB (ru_maxrss); "
        f"largest finished child (OpenMM worker) {_rss_mib(resource.RUSAGE_CHILDREN):.0f} MiB"
    )


if __name__ == "__main__":
    main()
