"""``bgflow-train``: train a Boltzmann generator from a Hydra config (``configs/train.yaml``).

    bgflow-train                                   # default: ALDP vacuum, RNVP
    bgflow-train experiment=aldp_vacuum_rnvp       # the long quality run
    bgflow-train system=double_well flow=nice      # toy systems
    bgflow-train -m flow=rnvp,nice                 # multirun, one folder each
    bgflow-train resume=outputs/DATE/TIME          # continue a killed run
    torchrun --nproc_per_node=2 -m bgflow_mini.apps.train ...   # data parallel, 2 processes

Outputs go to the Hydra run folder: ``config.yaml``, ``checkpoints/{latest,best}.pt``,
``model.pt`` (self-describing: :func:`bgflow_mini.load_generator`), ``metrics.csv``,
``metrics.json``, the evaluation samples as a sample folder (``samples.h5`` or
``samples.npy``, ``log_weights.npy``, ``energies.npy``, ``summary.json``) and plots.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate, to_absolute_path
from omegaconf import DictConfig, OmegaConf

from bgflow_mini import distributed, plotting, run_evaluation
from bgflow_mini.ais import settings as ais_settings
from bgflow_mini.checkpoint import resolve_device, resolve_dtype, save_generator
from bgflow_mini.fileio import save_json, save_text
from bgflow_mini.flows import compile_generator, is_compiled
from bgflow_mini.monitor import OverfitMonitor, StateMonitor, state_populations
from bgflow_mini.pipeline import apply_state_floor
from bgflow_mini.report import peak_memory_mb, summary_table
from bgflow_mini.run_logger import RunLogger
from bgflow_mini.samples import save_sample_set
from bgflow_mini.state_balance import state_masks
from bgflow_mini.targets import as_target
from bgflow_mini.training import Phase, Trainer, check_global_batches

from ._common import CONFIG_PATH, device_default_energy, plain, run_app
from .resources import Budget, Resources, job_budget, job_resources, launcher_config, plan
from .validation import ConfigError, validate_train_config

__all__ = ["main", "train", "RESUME_SAFE"]

log = logging.getLogger(__name__)

# keys that may change when a run is resumed: they do not change what is trained
RESUME_SAFE = (
    "resume",
    "progress",
    "num_threads",
    "device",
    "data_dir",  # the MD cache is keyed by its content, not by where it lies
    "evaluation",
    "training.metrics_every",
    "training.checkpoint_every",
    "training.compile",  # the same numbers to float rounding, only faster
)


def _bounded(value) -> bool | str:
    """``bounded_ics`` from the config: ``"box"`` or a bool."""
    return "box" if value == "box" else bool(value)


def _sync_every(tc) -> int:
    """``training.sync_every``, or (null) the largest period that divides both the metrics
    rows' and the checkpoints' periods."""
    k = tc.get("sync_every")
    return int(k) if k is not None else math.gcd(int(tc.metrics_every), int(tc.checkpoint_every))


def _override_keys() -> list[str]:
    return [o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task]


def resolve_run_dir(cfg: DictConfig) -> tuple[Path, DictConfig, Path | None]:
    """``(run folder, config, checkpoint to resume from or None)``: a fresh Hydra folder, or
    the run being resumed with this call's safe overrides applied (any other override is
    an error). ``resume`` is a run folder (its ``checkpoints/latest.pt``) or a checkpoint
    file of it (e.g. ``checkpoints/best.pt``)."""
    if cfg.resume is None:
        cfg.data_dir = to_absolute_path(str(cfg.data_dir))  # resumable from anywhere
        return Path(HydraConfig.get().runtime.output_dir), cfg, None
    path = Path(to_absolute_path(str(cfg.resume)))
    if path.is_file() and path.name == "model.pt":
        raise ConfigError(
            f"resume={cfg.resume}: model.pt holds no optimizer state; resume from the run "
            f"folder ({path.parent}) or from {path.parent / 'checkpoints' / 'best.pt'}"
        )
    run = path.parent.parent if path.is_file() else path
    ckpt = path if path.is_file() else run / "checkpoints" / "latest.pt"
    saved = run / "config.yaml"
    if not saved.is_file():
        raise FileNotFoundError(f"resume={cfg.resume}: no config.yaml in run folder {run}")
    keys = _override_keys()
    safe = lambda k: any(k == s or k.startswith(s + ".") for s in RESUME_SAFE)  # noqa: E731
    refused = [k for k in keys if not safe(k)]
    if refused:
        raise ConfigError(
            f"resume={cfg.resume}: cannot change {refused} of a run being resumed (they change "
            f"what is trained); allowed with resume: {list(RESUME_SAFE)}. Start a new run instead."
        )
    old = OmegaConf.load(saved)
    for key in keys:
        if key != "resume":
            OmegaConf.update(old, key, OmegaConf.select(cfg, key), merge=False)
    old.resume = str(run)
    return run, old, ckpt


def train(cfg: DictConfig) -> dict:
    """The whole job; returns the metrics dict (empty on ranks other than 0).

    Under ``torchrun`` every rank trains its share of each global batch
    (:mod:`bgflow_mini.distributed`); rank 0 alone writes the run folder and evaluates
    while the other ranks wait for it in a barrier, then leave.
    """
    t0 = time.time()
    out, cfg, ckpt = resolve_run_dir(cfg)
    target = as_target(instantiate(cfg.system.load))
    validate_train_config(cfg, target)  # every config mistake, before any MD or training
    target.check_supported()
    device, dtype = resolve_device(str(cfg.device)), resolve_dtype(str(cfg.dtype))
    if ckpt is None and HydraConfig.initialized():  # a resumed run keeps its energy
        hc = HydraConfig.get()
        gpu_energy = device_default_energy(
            device, hc.runtime.choices.get("energy"), list(hc.overrides.task)
        )
        if gpu_energy is not None:
            log.info(
                "device %s: energy TorchForceField on the device (energy=openmm to keep "
                "OpenMM, with energy.platform=CUDA for its GPU platform)",
                device,
            )
            cfg.energy = gpu_energy
    tc = cfg.training
    phases = [Phase(**p) for p in plain(tc.phases)]
    with distributed.init_from_env(device) as ctx:
        if ctx.world_size > 1:
            check_global_batches(phases, tc.batch_size, tc.kl_batch_size, ctx.world_size)
            if HydraConfig.get().mode == RunMode.MULTIRUN:
                raise ConfigError(
                    "a multirun (-m) cannot run under torchrun: start one torchrun per job"
                )
        metrics = _train(cfg, out, ckpt, target, ctx, dtype, phases, t0)
        ctx.barrier()  # the other ranks wait until rank 0 has evaluated and written
    return metrics


def _train(cfg, out, ckpt, target, ctx, dtype, phases, t0) -> dict:
    device, main = ctx.device, ctx.is_main
    out = distributed.broadcast_object(out)  # rank 0's Hydra folder (fresh runs)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        save_text(OmegaConf.to_yaml(cfg, resolve=ckpt is None), out / "config.yaml")
    resources = rank_resources(cfg, ctx)  # torch threads and workers sized to this job's cores
    torch.manual_seed(int(cfg.seed))
    data_dir = to_absolute_path(str(cfg.data_dir))
    floor = cfg.data.get("state_floor")  # checked against the states by validation
    own_weightings = sorted({p.replica_weights for p in phases if p.replica_weights})
    if not main:
        ctx.barrier()  # rank 0 generates (or finds) the MD data first; the others load it
    data = target.data(
        md=plain(cfg.get("md")),
        toy=plain(cfg.data.toy),
        data_dir=data_dir,
        fractions=list(cfg.data.fractions),
        stride=cfg.data.stride,
        n_workers=resources.md_workers,
        replicas=cfg.data.get("replicas", 1),
        replica_weights=cfg.data.get("replica_weights", "mbar"),
        reference_seeds=list(cfg.evaluation.get("md_reference_seeds") or []),
        extra_weightings=own_weightings,  # phases that draw the pool their own way
        seed=int(cfg.seed),
        progress=bool(cfg.progress) and main,
    )
    if main:
        ctx.barrier()
    if floor is not None:  # raise rare states' share of the ML draws (reverse KL empties them)
        apply_state_floor(data, target.cvs, target.states, floor, log=print if main else None)
    pool = data.info.get("replica_pool")
    if pool and main:
        log.info(
            "ML data: %d frames of the %d lowest temperatures (%s weights; Kish effective "
            "%.0f frames, target temperature alone %d); weight shares %s",
            pool["n_frames"],
            pool["replicas"],
            pool["weighting"],
            pool["kish_frames"],
            pool["target_frames"],
            " / ".join(f"{s:.3f}" for s in pool["weight_share"]),
        )
    tc = cfg.training
    energy = target.energy(instantiate(cfg.energy, **resources.energy_kwargs()))
    train_energy = instantiate(tc.regularization)(energy) if tc.regularization else energy
    generator = target.generator(
        data.train,
        instantiate(cfg.flow),
        train_energy,
        bounded_ics=_bounded(cfg.get("bounded_ics", False)),
        # runs from before ring support have no key: they used internal coordinates
        ring_coordinates=str(cfg.get("ring_coordinates", "internal")),
    )
    if cfg.get("symmetrize", False) and target.kind == "molecular":
        from ..symmetry import symmetrize

        generator = symmetrize(generator, target.topology)
        n_sym = len(generator.spec.get("symmetries", []))
        log.info("symmetrize: %d side-chain flip(s), %d flow passes per density", n_sym, 2**n_sym)
    generator = generator.to(device=device, dtype=dtype)
    compiled = compile_generator(generator) if tc.get("compile") else []  # at the 1st step
    total = sum(p.steps for p in phases)
    sched = None
    if tc.scheduler is not None:
        factory = instantiate(tc.scheduler)
        sched = lambda opt: factory(opt, total_steps=total)  # noqa: E731
    extra = {
        "system": target.name,
        "md": plain(cfg.get("md")),
        "data_dir": data_dir,
        "config": plain(cfg),
    }
    reference = state_populations(data.train, target.cvs, target.states)
    if floor is not None:  # a raised state may hold its floored share of the draws
        shares = data.info["state_floor"]["states"]
        reference = {
            s: max(p, shares[s]["after"]) if shares[s]["raised"] else p
            for s, p in reference.items()
        }
    monitor = StateMonitor(target.cvs, target.states, reference)
    ml_rows, ml_weights = data.ml_data()  # replica pool (data.replicas > 1) or train
    feedback = None
    if tc.get("state_feedback"):  # every rank: it changes the ML draws
        masks = state_masks(ml_rows.detach().cpu().double().numpy(), target.cvs, target.states)
        feedback = instantiate(tc.state_feedback)(target.cvs, target.states, masks)
    columns = monitor.columns + (feedback.columns if feedback else [])
    overfit = OverfitMonitor()  # warns when ML memorises the MD frames
    logger = None
    if main:  # rank 0 alone writes metrics.csv and checkpoints
        logger = RunLogger(out, tc.metrics_every, tc.checkpoint_every, extra, t0, columns=columns)
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
        seed=int(cfg.seed),
        progress=bool(cfg.progress),
        # the monitor adds pop_<state> before the row is written
        callbacks=([feedback] if feedback else []) + ([monitor, overfit, logger] if main else []),
        ema_decay=tc.get("ema_decay"),
        buffer_size=int(tc.get("buffer_size", 8192)),
        resample_every=int(tc.get("resample_every", 50)),
        iw_truncate=bool(tc.get("iw_truncate", False)),
        sync_every=_sync_every(tc),
        stall_window=int(tc.get("stall_window", 200)),
        max_skipped=float(tc.get("max_skipped", 0.9)),
    )
    if ckpt is not None and ckpt.is_file():
        got = trainer.load_checkpoint(ckpt)  # every rank reads it
        if got.get("system") != target.name:
            raise ValueError(f"checkpoint {ckpt} is for {got.get('system')!r}, not {target.name!r}")
        if main:
            print(f"[train] resumed from {ckpt} at step {trainer.step}/{total}")
    elif ckpt is not None and main:
        print(f"[train] no checkpoint {ckpt}; starting from step 0")
    latest = out / "checkpoints" / "latest.pt"
    if main:
        logger.restart(trainer)  # (re)writes metrics.csv from the restored history
        monitor.replay(trainer.history)
        overfit.replay(trainer.history)
    if feedback is not None:  # the factors the run had reached, on every rank
        feedback.replay(trainer, trainer.history)
    t_train, steps_before = time.time(), trainer.step
    try:
        if own_weightings:  # a mapping: each phase's weights by its replica_weights
            ml_weights = {None: ml_weights, **{w: data.ml_data(w)[1] for w in own_weightings}}
        trainer.fit_phases(phases, data=ml_rows, data_weights=ml_weights)
        train_time = time.time() - t_train
        trainer.save_checkpoint(latest, extra)  # the last step's state, for resuming (rank 0)
        selected = trainer.finalize(str(tc.get("select", "last")))  # the weights to evaluate
        if main:
            save_generator(generator, out / "model.pt", {**extra, "selected": selected})
        ev = cfg.evaluation
        t_eval = time.time()
        metrics, samples = run_evaluation.evaluate(
            generator,
            target,
            data,
            energy=energy,  # the real energy: weights and finite fractions are honest
            n_samples=ev.n_samples,
            batch_size=ev.batch_size,
            state_a=ev.state_a,
            state_b=ev.state_b,
            bins=ev.bins,
            n_bootstrap=ev.n_bootstrap,
            cap=getattr(train_energy, "high", None),
            seed=int(cfg.seed),
            progress=bool(cfg.progress),
            shards=trainer.shards,  # every rank samples its shards; all get the union
        )
        eval_time = time.time() - t_eval
        ais = ais_settings(plain(ev.get("ais")))
        if main and ais is not None:  # rank 0 alone: AIS draws are local
            metrics["ais"] = ais_evaluation(generator, target, data, energy, ev, ais, cfg)
        if not main:  # rank 0 alone writes the results
            return {}
    finally:
        energy.close()
        if logger is not None:
            logger.close()
    metrics.update(
        system=target.name,
        steps=trainer.step,
        selected_model=selected,
        training_state_populations_reference=monitor.reference,
        collapse_warnings=monitor.summary(),
        overfill_warnings=monitor.overfill_summary(),
        overfit_warnings=overfit.summary(),
        state_feedback=feedback.summary() if feedback else None,
        skipped_steps=trainer.n_skipped,
        training_nonfinite_energies=trainer.n_nonfinite_samples,
        training_capped_energies=trainer.n_capped_samples,
        energy_evaluations={
            "training": trainer.n_energy_evaluations,
            "evaluation": int(cfg.evaluation.n_samples),
        },
        steps_per_s=(trainer.step - steps_before) / max(train_time, 1e-9),
        evaluation_time_s=eval_time,  # sampling, energies and every metric
        wall_time_s=time.time() - t0,
        data_info=data.info,
        peak_memory_mb=peak_memory_mb(device),
        resources=resources.as_dict(),
        world_size=ctx.world_size,
        distributed=ctx.as_dict(),
        global_batch_sizes=global_batch_sizes(phases, trainer),
        # flows compiled with torch.compile that ran compiled (not fallen back to eager)
        compiled_flows=sum(is_compiled(f) for f in compiled),
    )
    write_outputs(out, target, samples, metrics, trainer, data, cfg)
    print(f"\n[train] {target.name}: results in {out}\n" + summary_table(metrics))
    return metrics


# metrics of the AIS evaluation that would only repeat the plain one's
_AIS_SAME = ("test_nll", "dF_unweighted", "dF_unweighted_stderr", "dF_reference",
             "dF_reference_stderr", "dF_reference_kind", "state_a", "state_b")  # fmt: skip


def ais_evaluation(generator, target, data, energy, ev, ais: dict, cfg) -> dict:
    """The evaluation's metrics again on ``evaluation.n_samples`` annealed importance
    samples (``evaluation.ais``; :mod:`bgflow_mini.ais`), less those it would repeat."""
    t = time.time()
    metrics, _ = run_evaluation.evaluate(
        generator, target, data, energy=energy, n_samples=ev.n_samples,
        batch_size=ev.batch_size, state_a=ev.state_a, state_b=ev.state_b, bins=ev.bins,
        n_bootstrap=ev.n_bootstrap, seed=int(cfg.seed), progress=bool(cfg.progress), ais=ais,
    )  # fmt: skip
    out = {k: v for k, v in metrics.items() if k not in _AIS_SAME and not k.startswith("dF_ref")}
    per_chain = 1 + ais["steps"] * ais["leapfrog"]  # with gradients
    tuning = 4 * 512 * per_chain  # bgflow_mini.ais.tune_step_sizes' pilot chains
    evaluations = int(ev.n_samples) * per_chain + tuning
    return {**out, "energy_evaluations": evaluations, "time_s": time.time() - t}


def global_batch_sizes(phases: list[Phase], trainer: Trainer) -> dict:
    """The global batch sizes (all ranks together) of the trainer and of every phase."""
    return {
        "batch_size": trainer.batch_size,
        "kl_batch_size": trainer.kl_batch_size,
        "phases": [
            {
                "name": p.name,
                "batch_size": int(p.batch_size or trainer.batch_size),
                "kl_batch_size": int(p.kl_batch_size or trainer.kl_batch_size),
            }
            for p in phases
        ],
    }


def rank_resources(cfg: DictConfig, ctx: distributed.Context) -> Resources:
    """:func:`~bgflow_mini.apps.resources.job_resources`, with the job's cores shared by
    the ``LOCAL_WORLD_SIZE`` ranks that torchrun started on this node."""
    if ctx.local_world_size == 1:
        return job_resources(cfg)
    job = job_budget(launcher_config())
    n = max(1, job.cores // ctx.local_world_size)
    why = f"{job.reason}; shared by {ctx.local_world_size} ranks on this node"
    energy, data = cfg.get("energy"), cfg.get("data")
    res = plan(
        Budget(n, why, True),
        cfg.get("num_threads"),
        data.get("n_workers") if data is not None else None,
        energy.get("n_workers") if energy is not None else None,
    )
    if res.threads:
        torch.set_num_threads(res.threads)
    log.info("resources (rank %d): %s", ctx.rank, res.summary())
    return res


def write_outputs(out: Path, target, samples: dict, metrics: dict, trainer, data, cfg) -> None:
    """Sample folder files, metrics.json and plots (every file written atomically)."""
    formats = ["h5"] if cfg.evaluation.save_samples else []
    if formats or target.topology is None:
        extra = {"checkpoint": str(out / "model.pt"), "md": plain(cfg.get("md"))}
        extra.update(data_dir=to_absolute_path(str(cfg.data_dir)), energy_config=plain(cfg.energy))
        extra["data_replicas"] = int((cfg.get("data") or {}).get("replicas", 1))
        save_sample_set(out, target, samples["x"], samples["log_q"], samples["u"], formats, extra)
    save_json(metrics, out / "metrics.json")
    plots = out / "plots"
    plotting.plot_training_curves(plots / "training.png", trainer.history)
    plotting.plot_log_weights(plots / "log_weights.png", samples["log_w"])
    from bgflow_mini import cv as cvmod

    pairs = cvmod.ramachandran_pairs(target.cvs)
    if pairs:
        names = [n for _, phi, psi in pairs for n in (phi, psi)]
        md_cv = cvmod.compute_cvs(data.test.numpy(), target.cvs, names)
        g_cv = cvmod.compute_cvs(samples["x"], target.cvs, names)
        plotting.plot_ramachandran_pairs(
            plots / "ramachandran.png",
            pairs,
            {
                "MD (test)": (md_cv, None),
                "generator": (g_cv, None),
                "generator, reweighted": (g_cv, samples["log_w"]),
            },
        )


@hydra.main(config_path=CONFIG_PATH, config_name="train", version_base="1.3")
def _main(cfg: DictConfig) -> float:
    metrics = run_app(lambda: train(cfg))
    return float(metrics.get("ess", math.nan))


def main() -> float:
    """``bgflow-train``. Under torchrun, ranks other than 0 point Hydra's own folder (its
    log and ``.hydra/``) at a temporary folder, removed at exit: the run folder is rank
    0's alone."""
    rank, world = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
    if world.isdigit() and int(world) > 1 and rank != "0":
        tmp = tempfile.mkdtemp(prefix=f"bgflow-train-rank{rank}-")
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)
        sys.argv += [f"hydra.run.dir={tmp}", "hydra.output_subdir=null"]
    return _main()


if __name__ == "__main__":
    main()
