"""Free energies of a trained generator vs MD (Hydra config ``configs/free_energy.yaml``).

    python scripts/free_energy.py samples=outputs/sample/DATE/TIME
    python scripts/free_energy.py checkpoint=outputs/DATE/TIME n_samples=100000
    python scripts/free_energy.py samples=S state_b=alpha_l \\
        '+states.alpha_l={phi: [0.0, 2.0], psi: [-1.0, 1.5]}' 'cvs=[phi]' cvs_2d=[]
    python scripts/free_energy.py samples=S md_reference=data/aldp_vacuum/KEY/traj.h5

Sources: (a) generator samples reweighted to the Boltzmann distribution (ESS beside),
(b) the same samples unweighted (those with a finite energy), (c) MD reference frames
(the run's MD cache if it is on disk, or ``md_reference=PATH``). Generator errors are
i.i.d. bootstrap errors, MD errors block-bootstrap errors (``n_blocks`` contiguous
blocks of the time series), for ΔF and for the PMFs.

Outputs: ``free_energy.json`` (ΔF = F(state_b) - F(state_a) in kT, populations, ESS),
``pmf_<cv>.csv`` and ``pmf_<cv1>_<cv2>.csv`` (bin centres, F and stderr per source, kT),
plots ``ramachandran.png``, ``pmf_<cv>.png``, ``energies.png``, ``log_weights.png``,
and a printed table.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from common import (
    SampleSet,
    close_energy,
    ess_or_zero,
    find_md_cache,
    is_toy,
    make_energy,
    reduced_energies,
    run_config,
)
from hydra.utils import instantiate, to_absolute_path
from omegaconf import DictConfig, OmegaConf
from sample import energy_option, output_dir, sample_run

from bgflow_mini import cv as cvmod
from bgflow_mini import free_energy as fe
from bgflow_mini import free_energy_io as fe_io

__all__ = ["Analysis", "get_samples", "load_md", "analyse", "main"]

SOURCES = ("md", "unweighted", "reweighted")
UNITS = {"torsion": "rad", "angle": "rad", "distance": "nm"}


class Analysis:
    """Validated analysis settings for one system: CVs, CV pairs and states.

    Checks CV and state names (``KeyError`` listing the known ones) before any
    expensive work.
    """

    def __init__(self, cfg: DictConfig, system: Any) -> None:
        if is_toy(system):
            raise ValueError(
                f"free_energy.py needs a molecular system with CVs and states; "
                f"{type(system).__name__} is a toy energy (train.py's metrics.json holds its "
                "reweighted ΔF against the exact value)"
            )
        self.system = system
        self.cvs = fe.check_cv_names(list(cfg.cvs or []), system.cvs)
        self.pairs = []
        for pair in list(cfg.cvs_2d or []):
            names = fe.check_cv_names(list(pair), system.cvs)
            if len(names) != 2:
                raise ValueError(f"cvs_2d entries must be pairs of CV names, got {names}")
            self.pairs.append(tuple(names))
        extra = OmegaConf.to_container(cfg.states, resolve=True) if cfg.states else {}
        self.states = fe.merge_states(system.states, extra, system.cvs)
        self.state_a, self.state_b = str(cfg.state_a), str(cfg.state_b)
        fe.check_state_names([self.state_a, self.state_b], self.states)
        if self.state_a == self.state_b:
            raise ValueError(f"state_a and state_b are both {self.state_a!r}")
        names = set(self.cvs) | {n for p in self.pairs for n in p}
        names |= {n for s in (self.state_a, self.state_b) for n in self.states[s]}
        self.needed = sorted(names)


def get_samples(cfg: DictConfig, out: Path) -> tuple[SampleSet, Any, Analysis]:
    """The sample folder (drawn first when ``checkpoint`` is given), system and settings."""
    if (cfg.samples is None) == (cfg.checkpoint is None):
        raise ValueError("give exactly one of samples=PATH (sample.py output) or checkpoint=PATH")
    if cfg.samples is not None:
        ss = SampleSet.open(to_absolute_path(str(cfg.samples)))
        system = instantiate(ss.run_cfg.system.load)
        analysis = Analysis(cfg, system)
        ss.check_system(system)
        return ss, system, analysis
    config = None if cfg.get("config") is None else to_absolute_path(str(cfg.config))
    _, _, run_cfg = run_config(to_absolute_path(str(cfg.checkpoint)), config)
    analysis = Analysis(cfg, instantiate(run_cfg.system.load))  # before sampling
    keys = ["checkpoint", "config", "n_samples", "batch_size", "energy", "seed", "device"]
    keys += ["dtype", "num_threads", "progress"]
    scfg = OmegaConf.create({k: cfg.get(k) for k in keys})
    scfg.update(formats=["h5"], regularize=False)
    sample_run(scfg, out / "samples")
    ss = SampleSet.open(out / "samples")
    system = analysis.system
    ss.check_system(system)
    return ss, system, analysis


def load_md(cfg: DictConfig, run_cfg: DictConfig, system: Any) -> tuple[np.ndarray, str] | None:
    """MD reference positions ``(n_frames, dim)`` nm in time order and their path, or None."""
    from bgflow_mini.data import load_trajectory

    ref = cfg.get("md_reference")
    if ref is None or ref is False or str(ref).lower() in ("none", "null", "false", "off"):
        return None
    if str(ref) == "auto":
        data_dir = None if cfg.get("data_dir") is None else to_absolute_path(str(cfg.data_dir))
        entry = find_md_cache(run_cfg, system, data_dir)
        if entry is None:
            print("[free_energy] no MD cache of this run on disk: MD reference skipped")
            return None
        traj, path = load_trajectory(entry), entry.traj_path
    else:
        path = Path(to_absolute_path(str(ref)))
        if not path.exists():
            raise FileNotFoundError(f"md_reference={ref}: no such file or folder ({path})")
        traj = load_trajectory(path)
    if traj.n_atoms != system.n_atoms:
        raise ValueError(
            f"MD reference {path} has {traj.n_atoms} atoms but system {system.name!r} has "
            f"{system.n_atoms}"
        )
    return traj.xyz.reshape(traj.n_frames, -1).astype(np.float64), str(path)


def _axis_label(name: str, spec: dict) -> str:
    greek = {"phi": r"$\phi$", "psi": r"$\psi$", "omega": r"$\omega$"}
    return f"{greek.get(name, name)} ({UNITS.get(spec.get('type'), '')})"


def _clean(d: dict) -> dict:
    return {k: (float(v) if isinstance(v, np.floating) else v) for k, v in d.items()}


def analyse(cfg: DictConfig, out: Path) -> dict:
    """The whole analysis; writes the outputs to ``out`` and returns the JSON dict."""
    if cfg.num_threads:
        torch.set_num_threads(int(cfg.num_threads))
    out.mkdir(parents=True, exist_ok=True)
    ss, system, an = get_samples(cfg, out)
    cvs = system.cvs
    values = fe.chunked_cvs(ss.chunks(), cvs, an.needed)
    keep = np.logical_and.reduce([np.isfinite(v) for v in values.values()])
    u_ok = np.isfinite(ss.u)
    lw = np.where(np.isfinite(ss.log_w), ss.log_w, -np.inf)
    sel = {"reweighted": keep, "unweighted": keep & u_ok}
    sample_cv = {src: {k: v[m] for k, v in values.items()} for src, m in sel.items()}
    weights = {"reweighted": lw[keep], "unweighted": None}

    md = load_md(cfg, ss.run_cfg, system)
    md_cv, md_u = None, None
    if md is not None:
        md_cv = cvmod.compute_cvs(md[0], cvs, an.needed)
        if cfg.md_energies:
            energy = make_energy(ss.run_cfg, system, energy_option(cfg.get("energy")))
            try:
                md_u = reduced_energies(energy, md[0])
            finally:
                close_energy(energy)

    nb, seed, n_blocks = int(cfg.n_bootstrap), int(cfg.seed), int(cfg.n_blocks)
    sources = {}
    if md_cv is not None:
        sources["md"] = md_cv
    if sel["unweighted"].any():
        sources["unweighted"] = sample_cv["unweighted"]
    if np.isfinite(weights["reweighted"]).any():
        sources["reweighted"] = sample_cv["reweighted"]
    else:
        print("[free_energy] no sample has a finite log weight: reweighted results skipped")
    ess = ess_or_zero(lw)
    labels = {
        "md": "MD",
        "unweighted": "generator",
        "reweighted": f"generator, reweighted (ESS {ess:.3g})",
    }

    # ΔF between the states
    dF = {}
    for src, vals in sources.items():
        if src == "md":
            dF[src] = fe.md_delta_f(
                vals, an.states, cvs, an.state_a, an.state_b, n_blocks, nb, seed
            )
        else:
            dF[src] = fe.state_delta_f(
                vals, an.states, cvs, an.state_a, an.state_b, weights[src], nb, seed
            )

    # 1-D and 2-D PMFs on bins shared by all sources
    pmfs, files = {}, []
    for names in [(n,) for n in an.cvs] + list(an.pairs):
        specs = [cvs[n] for n in names]
        edges = [
            fe.cv_edges(spec, [v[n] for v in sources.values()], int(cfg.bins))
            for n, spec in zip(names, specs)
        ]
        profiles = {}
        for src, vals in sources.items():
            x = [vals[n] for n in names]
            if src == "md":
                nbl = max(2, min(n_blocks, len(x[0])))
                profiles[src] = fe.block_pmf(x, specs, edges, nbl, nb, seed)
            elif len(names) == 1:
                profiles[src] = fe.pmf_1d(x[0], specs[0], edges[0], weights[src], nb, seed)[1:]
            else:
                profiles[src] = fe.pmf_2d(x, specs, edges, weights[src], nb, seed)[2:]
        centres = [0.5 * (e[1:] + e[:-1]) for e in edges]
        stem = "pmf_" + "_".join(names)
        if len(names) == 1:
            pmfs[names[0]] = (centres[0], profiles)
            fe_io.write_pmf_csv(out / f"{stem}.csv", names[0], centres[0], profiles)
        else:
            fe_io.write_pmf_2d_csv(out / f"{stem}.csv", names, centres, profiles)
        files.append(f"{stem}.csv")

    # reweighted (and unweighted) 1-D PMFs against MD where F_MD <= pmf_max_f kT
    agreement = {}
    if "md" in sources:
        for name, (_, prof) in pmfs.items():
            agreement[name] = {
                src: fe.pmf_agreement(
                    prof["md"][0], prof[src][0], prof["md"][1], prof[src][1], cfg.pmf_max_f
                )
                for src in ("reweighted", "unweighted")
                if src in prof
            }

    plots = []
    if cfg.plots:
        plots = make_plots(out, an, sources, weights, labels, pmfs, ss, md_u, ess, cfg)

    result = {
        "system": system.name,
        "samples": str(ss.folder),
        "md_reference": None if md is None else md[1],
        "n_samples": int(ss.n),
        "n_md_frames": 0 if md is None else int(len(md[0])),
        "ess": ess,
        "nonfinite_energy_fraction": float(1.0 - u_ok.mean()),
        "nonfinite_cv_fraction": float(1.0 - keep.mean()),
        "state_a": an.state_a,
        "state_b": an.state_b,
        "states": {k: an.states[k] for k in (an.state_a, an.state_b)},
        "dF": {src: _clean(d) for src, d in dF.items()},
        "dF_error_reweighted_vs_md": (
            dF["reweighted"]["dF"] - dF["md"]["dF"] if {"md", "reweighted"} <= set(dF) else None
        ),
        "pmf_agreement_vs_md": agreement,
        "cvs": an.cvs,
        "cvs_2d": [list(p) for p in an.pairs],
        "settings": {"bins": int(cfg.bins), "n_bootstrap": nb, "n_blocks": n_blocks, "seed": seed},
        "errors": "generator: i.i.d. bootstrap; MD: block bootstrap over n_blocks blocks",
        "files": files,
        "plots": plots,
    }
    (out / "free_energy.json").write_text(json.dumps(result, indent=2))
    table = fe_io.format_table(
        {labels[s]: dF[s] for s in SOURCES if s in dF}, an.state_a, an.state_b
    )
    for name, per_src in agreement.items():
        for src, a in per_src.items():
            table += (
                f"\nPMF({name}) {src} vs MD where F_MD <= {a['max_f_ref']:g} kT: "
                f"max |diff| {a['max_abs_diff']:.3f} kT, rms {a['rms_diff']:.3f} kT "
                f"({a['n_bins']} bins)"
            )
    print(f"[free_energy] {system.name}: results in {out}\n{table}")
    return result


def _resolved(f: np.ndarray, err: np.ndarray, max_err: float | None):
    """F with bins of stderr above ``max_err`` (kT) set to NaN (not drawn)."""
    if max_err is None:
        return f, err
    bad = np.asarray(err) > float(max_err)  # NaN (no bootstrap): drawn
    return np.where(bad, np.nan, f), np.where(bad, np.nan, err)


def make_plots(out, an, sources, weights, labels, pmfs, ss, md_u, ess, cfg) -> list[str]:
    """Ramachandran maps, PMFs with error bands, energy and log-weight histograms.

    PMF plots leave out bins whose stderr exceeds ``cfg.plot_max_stderr`` (kT), e.g.
    barrier bins carried by a few tiny weights; the CSV files keep every bin.
    """
    from bgflow_mini import plotting

    files = []
    if ("phi", "psi") in an.pairs:
        panels = {}
        for src in SOURCES:
            if src in sources:
                v = sources[src]
                w = weights.get(src) if src != "md" else None
                panels[labels[src]] = (v["phi"], v["psi"]) + ((w,) if w is not None else ())
        title = f"Ramachandran plot, {an.system.name} (reweighted ESS {ess:.3g})"
        files.append(plotting.plot_ramachandran(out / "ramachandran.png", panels, title=title))
    for name, (centres, profiles) in pmfs.items():
        spec = an.system.cvs[name]
        curves = {
            labels[s]: (centres, *_resolved(*profiles[s], cfg.get("plot_max_stderr")))
            for s in SOURCES
            if s in profiles
        }
        files.append(
            plotting.plot_pmfs(
                out / f"pmf_{name}.png",
                curves,
                xlabel=_axis_label(name, spec),
                title=f"Free-energy profile along {name} ({an.system.name}; bands: ±1 stderr)",
                max_f=cfg.get("plot_max_f"),
            )
        )
    energies = {}
    if md_u is not None:
        energies["MD"] = md_u
    energies["generator"] = ss.u
    files.append(
        plotting.plot_energy_histograms(
            out / "energies.png",
            energies,
            title=f"Reduced energies, {an.system.name}: MD frames vs generator samples",
        )
    )
    lw = ss.log_w
    if np.isfinite(lw).any():
        files.append(
            plotting.plot_log_weights(
                out / "log_weights.png",
                lw,
                title=f"Log importance weights (ESS {ess:.3g}, N = {len(lw)})",
            )
        )
    return [Path(f).name for f in files]


@hydra.main(config_path="../configs", config_name="free_energy", version_base="1.3")
def main(cfg: DictConfig) -> None:
    analyse(cfg, output_dir(cfg))


if __name__ == "__main__":
    main()
