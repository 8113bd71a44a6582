"""The default generator's full training step, this tree against an earlier one.

Times ML + reverse-KL steps of the default alanine-dipeptide generator
(``configs/flow/rnvp.yaml`` on the default replica-exchange data, ``TorchForceField``
float32, one torch thread unless ``--torch-threads``) at several batch sizes, where one
step is ``batch`` data frames (maximum likelihood) plus ``batch`` generator samples (reverse
KL, energy and forces), so samples/s = ``2 * batch * steps / s``. With ``--baseline DIR``
(a source tree of an earlier commit, e.g. ``git worktree add /tmp/old <commit>``) the
same measurement runs in that tree too, in alternating subprocesses (``PYTHONPATH=DIR``),
and the table gives both rates and their ratio. Every subprocess also writes the model's
log-probabilities of 1,024 MD frames and of 1,024 of its own samples (seeded draws) under
one seeded perturbation of all parameters; the largest difference between the trees is
printed, so a faster step is shown to compute the same model. With ``--compile`` the
comparison is this tree eager against this tree with the coupling flow compiled
(``bgflow_mini.flows.compile_generator``), or with ``--baseline`` too, the baseline eager
against this tree compiled; the warm-up line gives the time the first steps took (the
compilation). With ``--iw`` a step is the default recipe's mixed phase instead: ML, reverse
KL and importance-weighted ML on ``batch`` draws from the model's own weighted samples
(buffer of 8,192 refilled every 50 steps, its energies included), so samples/s =
``3 * batch * steps / s``. Trees from before random coupling masks (e.g. ad87fb5, the code
before issue 14) build only the alternating ones: compare with ``--masks alternate`` (both
trees then build the same model). Each tree's line says which spline path it took (native
kernels or PyTorch).

Usage::

    git worktree add /tmp/bgflow_old <commit>
    python benchmarks/generator_step.py --baseline /tmp/bgflow_old
    python benchmarks/generator_step.py --baseline /tmp/bgflow_old --masks alternate
    python benchmarks/generator_step.py --batch 256 1024 --seconds 10 --rounds 3
    python benchmarks/generator_step.py --compile --batch 256 1024 --rounds 1
    python benchmarks/generator_step.py --iw --baseline /tmp/bgflow_old --batch 128 256
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

__all__ = ["main", "measure", "compare"]

ROOT = Path(__file__).resolve().parents[1]


def _frames(data_dir: str, path: Path) -> None:
    """The default MD data (this tree's pipeline: generated or found in the cache), its
    training and test frames saved to ``path``, so that every tree measures on the same
    frames even where an older tree could not read today's MD settings."""
    from omegaconf import OmegaConf

    from bgflow_mini import pipeline
    from bgflow_mini.systems import load_system

    md = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "md" / "remd.yaml"))
    system = load_system("aldp_vacuum")
    data = pipeline.molecular_data(system, md, data_dir, progress=False, log=None)
    torch.save({"train": data.train, "test": data.test}, path)


def _generator(frames: str, masks: str = "config"):
    """The default generator (float32, TorchForceField) and its float32 training frames;
    ``masks`` other than ``config`` overrides the coupling masks (trees from before random
    masks know only the alternating ones: compare with ``--masks alternate``)."""
    import inspect

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from bgflow_mini import pipeline
    from bgflow_mini.energies import TorchForceField
    from bgflow_mini.flows import coupling_flow
    from bgflow_mini.systems import load_system

    system = load_system("aldp_vacuum")
    data = torch.load(frames, weights_only=True)
    cfg = OmegaConf.load(ROOT / "configs" / "flow" / "rnvp.yaml")
    if masks != "config":
        cfg.masks = masks
    if "masks" not in inspect.signature(coupling_flow).parameters:
        if cfg.masks != "alternate":
            raise SystemExit("this tree has alternating masks only: use --masks alternate")
        del cfg["masks"], cfg["mask_seed"]
    factory = instantiate(cfg)
    energy = TorchForceField.from_openmm(system).float()
    # fitted to the frames as the pipeline has them (float64), then run in float32
    gen = pipeline.molecular_generator(system, data["train"], factory, energy).float()
    return gen, data["train"].float(), data["test"].float()


def measure(args: argparse.Namespace) -> dict:
    """Log-probabilities under perturbed weights, then steps/s per batch size (one tree)."""
    import bgflow_mini
    from bgflow_mini.training import Trainer

    if args.compiled:  # a baseline tree may predate compile_generator
        from bgflow_mini.flows import compile_generator
    torch.set_num_threads(args.torch_threads)
    torch.manual_seed(0)
    gen, train, test = _generator(args.frames, args.masks)
    if args.compiled:
        compile_generator(gen)
    out: dict = {"source": str(Path(bgflow_mini.__file__).resolve().parents[1])}
    try:  # trees before the native spline kernels have none
        from bgflow_mini.flows import native

        out["kernels"] = native.status()
    except ImportError:
        out["kernels"] = "PyTorch (no native kernels in this tree)"
    with torch.no_grad():  # the same perturbed model in every tree: compare log q
        g = torch.Generator().manual_seed(1)
        for _, p in sorted(gen.named_parameters()):
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    # with autograd on, as in a training step (the path a compiled flow compiles)
    torch.manual_seed(2)
    _, log_q = gen.sample(1024, with_log_prob=True)
    out["log_q_samples"] = log_q.detach().tolist()
    out["log_q_data"] = gen.log_prob(test[:1024]).detach().tolist()
    torch.manual_seed(0)
    gen, train, _ = _generator(args.frames, args.masks)  # fresh weights for the timing
    if args.compiled:
        compile_generator(gen)
    rates, warmup = {}, {}
    terms = {"w_ml": 1.0, "w_kl": 1.0, "w_iw": 1.0 if args.iw else 0.0}
    per_step = 3 if args.iw else 2  # batches per step
    for bs in args.batch:
        extra = {"iw_truncate": True} if args.iw else {}  # (older trees lack the option)
        trainer = Trainer(gen, lr=1e-4, batch_size=bs, kl_batch_size=bs, progress=False, **extra)
        t0 = time.perf_counter()
        trainer.fit(args.warmup, data=train, **terms)
        warmup[str(bs)] = time.perf_counter() - t0
        steps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < args.seconds or steps < 3:
            trainer.fit(1, data=train, **terms)
            steps += 1
        rates[str(bs)] = per_step * bs * steps / (time.perf_counter() - t0)
    out["samples_per_s"] = rates
    out["warmup_s"] = warmup
    return out


def _run(tree: Path | None, args: argparse.Namespace, batch: int, compiled: bool) -> dict:
    """One measuring subprocess in ``tree`` (None: this tree) for one batch size."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "out.json"
        cmd = [sys.executable, __file__, "--worker", str(result), "--batch", str(batch)]
        cmd += ["--seconds", str(args.seconds), "--warmup", str(args.warmup)]
        cmd += ["--torch-threads", str(args.torch_threads), "--frames", args.frames]
        cmd += ["--masks", args.masks]
        cmd += ["--compiled"] if compiled else []
        cmd += ["--iw"] if args.iw else []
        env = dict(os.environ, PYTHONPATH=str(tree or ROOT))
        subprocess.run(cmd, check=True, env=env, cwd=ROOT)
        return json.loads(result.read_text())


def compare(args: argparse.Namespace) -> None:
    """Alternate the trees per batch size and round; print the best rate of each."""
    trees: dict[str, tuple[Path | None, bool]] = {"this tree": (None, False)}
    if args.baseline:  # with --compile: the baseline eager against this tree compiled
        name = "this tree compiled" if args.compile else "this tree"
        trees = {"baseline": (Path(args.baseline).resolve(), False), name: (None, args.compile)}
    elif args.compile:
        trees = {"eager": (None, False), "compiled": (None, True)}
    warmup: dict[tuple[str, int], float] = {}
    best: dict[tuple[str, int], float] = {}
    logq: dict[str, dict] = {}
    for batch in args.batch:
        for _ in range(args.rounds):
            for name, (tree, compiled) in trees.items():
                r = _run(tree, args, batch, compiled)
                rate = r["samples_per_s"][str(batch)]
                warmup[name, batch] = r["warmup_s"][str(batch)]
                best[name, batch] = max(best.get((name, batch), 0.0), rate)
                logq[name] = r
    from _machine import cpu_model  # benchmarks/_machine.py

    print(f"## Default generator training step ({datetime.date.today()})\n")
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, ")
    print(f"{args.torch_threads} torch thread(s); best of {args.rounds} round(s) of ")
    step = "ML + reverse KL + importance-weighted ML" if args.iw else "ML + reverse KL"
    print(f">= {args.seconds} s per case; {step}, TorchForceField float32\n")
    for name in trees:
        print(f"- {name}: {logq[name]['source']}; splines: {logq[name].get('kernels', '?')}")
    head = "| batch | " + " | ".join(f"{n} samples/s" for n in trees)
    print("\n" + head + (" | ratio |" if len(trees) > 1 else " |"))
    print("|---:|" + "---:|" * (len(trees) + (len(trees) > 1)))
    for batch in args.batch:
        rates = [best[n, batch] for n in trees]
        row = f"| {batch:,} | " + " | ".join(f"{r:,.0f}" for r in rates)
        print(row + (f" | {rates[1] / rates[0]:.2f}x |" if len(rates) > 1 else " |"))
    print(f"\nwarm-up ({args.warmup} steps, first round; includes any compilation), s: ", end="")
    print(", ".join(f"{n} {warmup[n, b]:.1f} at {b:,}" for b in args.batch for n in trees))
    if len(trees) > 1:
        for key in ("log_q_data", "log_q_samples"):
            a, b = (torch.tensor(logq[n][key], dtype=torch.float64) for n in trees)
            print(f"\nmax |log q difference| ({key}, 1,024 points, float32): ", end="")
            print(f"{float((a - b).abs().max()):.2e} (values of order {float(a.abs().mean()):.0f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", help="source tree of an earlier commit to compare with")
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 256, 1024, 4096])
    ap.add_argument("--seconds", type=float, default=8.0, help="timed seconds per case")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--compile", action="store_true", help="compare eager and compiled")
    ap.add_argument("--iw", action="store_true", help="the default mixed phase (w_iw = 1)")
    ap.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)  # worker
    ap.add_argument("--data-dir", default=os.environ.get("BGFLOW_DATA", str(ROOT / "data")))
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # internal: write results here
    ap.add_argument(
        "--masks",
        default="config",
        choices=["config", "alternate", "random"],
        help="coupling masks (config: configs/flow/rnvp.yaml's; older trees: alternate)",
    )
    ap.add_argument("--frames", help=argparse.SUPPRESS)  # internal: the saved MD frames
    args = ap.parse_args()
    if args.worker:
        Path(args.worker).write_text(json.dumps(measure(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        args.frames = str(Path(tmp) / "frames.pt")
        _frames(args.data_dir, Path(args.frames))
        compare(args)


if __name__ == "__main__":
    main()
