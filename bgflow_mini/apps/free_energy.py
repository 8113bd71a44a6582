"""``bgflow-free-energy``: free energies of generator samples vs MD (``configs/free_energy.yaml``).

    bgflow-free-energy samples=outputs/sample/DATE/TIME        # a sample folder (or a run)
    bgflow-free-energy checkpoint=outputs/DATE/TIME n_samples=100000
    bgflow-free-energy samples=S state_b=alpha_l \\
        '+states.alpha_l={phi: [0.0, 2.0], psi: [-1.0, 1.5]}' 'cvs=[phi]' cvs_2d=[]
    bgflow-free-energy samples=S md_reference=data/aldp_vacuum/KEY/traj.h5
    bgflow-free-energy samples=S md_replicas=3   # 3 replica temperatures, MBAR-weighted
    bgflow-free-energy samples=S md_replicas=3 'md_reference=[CACHE_A,CACHE_B]'  # 2 runs pooled

See :mod:`bgflow_mini.analysis` for what is computed and written: besides ΔF between
``state_a`` and ``state_b``, the ΔF of every ``<cv>_negative`` / ``<cv>_positive`` state
pair (each residue's phi > 0 state of a peptide), a PMF along every CV, a 2-D surface per
backbone pair ``phi_k`` / ``psi_k`` and a per-residue Ramachandran grid.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, ListConfig, OmegaConf

from bgflow_mini.analysis import AnalysisSettings, analyse
from bgflow_mini.checkpoint import find_checkpoint, read_checkpoint
from bgflow_mini.data import find_cached
from bgflow_mini.md_reference import MDReference, load_reference, pool_runs
from bgflow_mini.pareto import describe_k
from bgflow_mini.samples import SampleSet, reduced_energies
from bgflow_mini.targets import load_target

from ._common import CONFIG_PATH, plain, run_app, set_threads
from .sample import output_dir, run_energy, sample
from .validation import ConfigError, md_replica_problems, validate_free_energy_config

__all__ = ["main", "free_energy", "load_md", "md_replicas"]

_SAMPLE_KEYS = (
    "checkpoint", "weights", "n_samples", "batch_size", "energy", "seed", "device", "dtype",
    "ais",
)  # fmt: skip


def md_replicas(cfg: DictConfig, summary: dict) -> int:
    """Replica temperatures in the MD reference: ``md_replicas``, or for ``auto`` the
    training run's ``data.replicas`` (``data_replicas`` in the sample summary; 1 if absent)."""
    k = cfg.get("md_replicas", "auto")
    return int(summary.get("data_replicas") or 1) if k == "auto" else int(k)


def load_md(cfg: DictConfig, summary: dict, target) -> MDReference | None:
    """The MD reference (:class:`~bgflow_mini.md_reference.MDReference`) or None.

    One replica: the target temperature's frames in time order. ``k > 1`` replicas
    (:func:`md_replicas`): every frame of the k lowest temperatures of the replica-exchange
    cache entry, MBAR-weighted to the target temperature. A list of references (independent
    runs of equal length, e.g. replica exchanges with other ``md.seed``) is pooled into one
    (:func:`~bgflow_mini.md_reference.pool_runs`)."""
    ref = cfg.get("md_reference")
    if ref is None or ref is False or str(ref).lower() in ("none", "null", "false", "off"):
        return None
    k = md_replicas(cfg, summary)
    if isinstance(ref, (list, tuple, ListConfig)):  # validated: paths, no 'auto'
        return pool_runs([_load_one(cfg, summary, target, r, k) for r in ref])
    return _load_one(cfg, summary, target, ref, k)


def _load_one(cfg: DictConfig, summary: dict, target, ref, k: int) -> MDReference | None:
    """One run's reference (``ref``: ``auto``, a cache folder or a trajectory file)."""
    if str(ref) == "auto":
        if target.kind != "molecular" or not summary.get("md"):
            return None
        data_dir = cfg.get("data_dir") or summary.get("data_dir") or "data"
        # checksums once, by the loader below
        entry = find_cached(
            target.system, summary["md"], to_absolute_path(str(data_dir)), verify=False
        )
        if entry is None:
            print("[free_energy] no MD cache of this run on disk: MD reference skipped")
            return None
        source, path = entry, entry.traj_path
    else:
        path = Path(to_absolute_path(str(ref)))
        if not path.exists():
            raise FileNotFoundError(f"md_reference={ref}: no such file or folder ({path})")
        source = path
    md = load_reference(source, k)  # ValueError for k > 1 replicas of one trajectory file
    _check_atoms(md.positions.shape[1] // 3, path if k == 1 else md.path, target)
    return md


def _check_atoms(n_atoms: int, path, target) -> None:
    if 3 * n_atoms != target.dim:
        raise ValueError(
            f"MD reference {path} has {n_atoms} atoms; {target.name!r} has {target.dim // 3}"
        )


def free_energy(cfg: DictConfig, out: Path) -> dict:
    """The whole analysis: samples (drawn first for ``checkpoint=``), MD, ΔF, PMFs, plots."""
    validate_free_energy_config(cfg)
    set_threads(cfg.num_threads)
    if cfg.samples is None:  # check names against the checkpoint's target, then sample
        weights = str(cfg.get("weights") or "saved")
        state = read_checkpoint(find_checkpoint(to_absolute_path(str(cfg.checkpoint)), weights))
        validate_free_energy_config(cfg, load_target(state["spec"]["target"]))
        run = ((state.get("extra") or {}).get("config") or {}).get("data") or {}
        k = md_replicas(cfg, {"data_replicas": run.get("replicas")})
        if cfg.get("md_reference") is not None:  # before sampling
            if problems := md_replica_problems(k, "md_replicas (the run's data.replicas)"):
                raise ConfigError(problems)
        scfg = OmegaConf.create({k: cfg.get(k) for k in _SAMPLE_KEYS})
        scfg.update(formats=["h5"], regularize=False, num_threads=None, progress=cfg.progress)
        sample(scfg, out / "samples")
    ss = SampleSet.open(to_absolute_path(str(cfg.samples)) if cfg.samples else out / "samples")
    target = ss.target()
    validate_free_energy_config(cfg, target)
    md = load_md(cfg, ss.summary, target)
    md_u = None
    if md is not None and cfg.md_energies:
        energy, _ = run_energy(target, cfg.get("energy") or ss.summary.get("energy_config"), {})
        with energy:
            md_u = reduced_energies(energy, md.positions[: md.n_target])
    keys = AnalysisSettings.__dataclass_fields__
    settings = AnalysisSettings(**{k: plain(cfg[k]) for k in keys if k in cfg})
    result, table = analyse(ss, target, out, settings, md, md_u)
    sampler = ss.summary.get("sampler") or {}
    how = f" (AIS, {sampler['steps']} steps)" if sampler.get("kind") == "ais" else ""
    print(
        f"[free_energy] {target.name}: results in {out}; Pareto k of the weights{how} "
        f"{result['pareto_k']:.2f} ({describe_k(result['pareto_k'])})\n{table}"
    )
    return result


@hydra.main(config_path=CONFIG_PATH, config_name="free_energy", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_app(lambda: free_energy(cfg, output_dir(cfg)))


if __name__ == "__main__":
    main()
