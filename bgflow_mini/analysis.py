"""Free-energy analysis of a sample set against a reference (used by ``bgflow-free-energy``).

Sources: (a) generator samples reweighted to the Boltzmann distribution (ESS beside),
(b) the same samples unweighted (those with a finite energy), (c) reference
configurations in time order (MD frames), when given. Generator errors are i.i.d.
bootstrap errors, reference errors block-bootstrap errors over ``n_blocks`` contiguous
blocks, for ΔF and for the PMFs. Outputs: ``free_energy.json``, ``pmf_<cv>.csv``,
``pmf_<cv1>_<cv2>.csv``, plots, and a printable table.

Besides ΔF between ``state_a`` and ``state_b``, the ΔF of every pair of states named
``<cv>_negative`` / ``<cv>_positive`` (e.g. each residue's phi > 0 state of a peptide
with ``phi_1_negative``, ``phi_1_positive``, ...) is computed for every source and
written under ``state_delta_f`` in the JSON and as a second table. Every backbone pair
``phi<suffix>`` / ``psi<suffix>`` (:func:`bgflow_mini.cv.ramachandran_pairs`) among the
analysed CVs is drawn in ``ramachandran.png``: one row of panels (MD, generator,
reweighted) per residue when there are several.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import cv as cvmod
from . import free_energy as fe
from . import free_energy_io as fe_io
from .fileio import save_json
from .md_reference import MDReference
from .pareto import pareto_k
from .reweighting import effective_sample_size

__all__ = ["AnalysisSettings", "MDReference", "resolve_analysis", "analyse"]

SOURCES = ("md", "unweighted", "reweighted")
TARGET_ONLY = "md_target_temperature"  # ΔF of the target-temperature frames beside MBAR ones
UNITS = {"torsion": "rad", "angle": "rad", "distance": "nm"}


@dataclass
class AnalysisSettings:
    """What to compute. ``None`` for ``cvs`` / ``cvs_2d`` / states means the target's
    defaults: every CV; every backbone pair ``phi<suffix>`` / ``psi<suffix>`` (else the
    first two CVs) as 2-D surfaces; its default states."""

    cvs: Sequence[str] | None = None
    cvs_2d: Sequence[Sequence[str]] | None = None
    states: Mapping[str, Mapping] = field(default_factory=dict)
    state_a: str | None = None
    state_b: str | None = None
    bins: int = 60
    n_bootstrap: int = 200
    n_blocks: int = 20
    seed: int = 0
    pmf_max_f: float = 5.0
    plots: bool = True
    plot_max_f: float | None = 15.0
    plot_max_stderr: float | None = 5.0


@dataclass
class _Resolved:
    cvs: list[str]
    pairs: list[tuple[str, str]]
    states: dict[str, dict[str, list[float]]]
    state_a: str
    state_b: str
    sign_pairs: dict[str, tuple[str, str]] = field(default_factory=dict)
    rama: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def needed(self) -> list[str]:
        names = set(self.cvs) | {n for p in self.pairs for n in p}
        used = {self.state_a, self.state_b} | {s for p in self.sign_pairs.values() for s in p}
        names |= {n for s in used for n in self.states[s]}
        return sorted(names)


def resolve_analysis(settings: AnalysisSettings, target: Any) -> _Resolved:
    """CV, pair and state names checked against ``target`` (before any expensive work)."""
    cvs = fe.check_cv_names(list(target.cvs if settings.cvs is None else settings.cvs), target.cvs)
    rama_all = cvmod.ramachandran_pairs(target.cvs)
    if settings.cvs_2d is None and rama_all:
        raw_pairs = [[phi, psi] for _, phi, psi in rama_all]
    elif settings.cvs_2d is None:
        raw_pairs = [list(target.cvs)[:2]] if len(target.cvs) >= 2 else []
    else:
        raw_pairs = [list(p) for p in settings.cvs_2d]
    pairs = []
    for pair in raw_pairs:
        names = fe.check_cv_names(pair, target.cvs)
        if len(names) != 2:
            raise ValueError(f"cvs_2d entries must be pairs of CV names, got {names}")
        pairs.append((names[0], names[1]))
    states = fe.merge_states(target.states, dict(settings.states or {}), target.cvs)
    default_a, default_b = target.default_states
    a, b = settings.state_a or default_a, settings.state_b or default_b
    fe.check_state_names([a, b], states)
    if a == b:
        raise ValueError(f"state_a and state_b are both {a!r}")
    analysed = set(cvs) | {n for p in pairs for n in p}
    rama = [p for p in rama_all if {p[1], p[2]} <= analysed]
    return _Resolved(cvs, pairs, states, a, b, fe.sign_state_pairs(states), rama)


def analyse(
    samples: Any,
    target: Any,
    out: str | Path,
    settings: AnalysisSettings,
    md: MDReference | tuple[np.ndarray, str] | None = None,
    md_energies: np.ndarray | None = None,
) -> tuple[dict, str]:
    """Run the analysis of a :class:`~bgflow_mini.samples.SampleSet` for ``target``.

    ``md``: an :class:`MDReference` (or ``(positions (n, dim) in time order, path)``);
    with several MBAR-weighted series, the MD ΔF and PMFs are the weighted ones and the
    target temperature's frames alone give ``md_target_temperature`` beside them.
    ``md_energies`` (kT) feed the energy histogram. Writes the outputs to ``out`` and
    returns ``(result dict, printable table)``.
    """
    if isinstance(md, tuple):
        md = MDReference(*md)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    an = resolve_analysis(settings, target)
    cvs, st = target.cvs, settings
    values = fe.chunked_cvs(samples.chunks(), cvs, an.needed)
    keep = np.logical_and.reduce([np.isfinite(v) for v in values.values()])
    u_ok = np.isfinite(samples.u)
    lw = np.where(np.isfinite(samples.log_w), samples.log_w, -np.inf)
    sel = {"reweighted": keep, "unweighted": keep & u_ok}
    weights = {"reweighted": lw[keep], "unweighted": None}
    sources: dict[str, dict[str, np.ndarray]] = {}
    if md is not None:
        sources["md"] = cvmod.compute_cvs(md.positions, cvs, an.needed)
        weights["md"] = md.log_w
    if sel["unweighted"].any():
        sources["unweighted"] = {k: v[sel["unweighted"]] for k, v in values.items()}
    if np.isfinite(weights["reweighted"]).any():
        sources["reweighted"] = {k: v[keep] for k, v in values.items()}
    ess = effective_sample_size(lw)
    labels = {
        "md": "MD" if md is None else md.label,
        "unweighted": "generator",
        "reweighted": f"generator, reweighted (ESS {ess:.3g})",
    }
    nb, seed = int(st.n_bootstrap), int(st.seed)
    dF = _delta_f(sources, weights, md, an.states, cvs, an.state_a, an.state_b, st)
    exact = target.reference_delta_f(an.state_a, an.state_b)
    pair_dF = {}
    for name, (a, b) in an.sign_pairs.items():
        try:
            per_src = _delta_f(sources, weights, md, an.states, cvs, a, b, st)
        except ValueError as err:  # overlapping states: no ΔF, the rest goes on
            pair_dF[name] = {"state_a": a, "state_b": b, "skipped": str(err)}
            continue
        pair_dF[name] = _pair_entry(a, b, per_src, target.reference_delta_f(a, b))

    pmfs, files = {}, []
    for names in [(n,) for n in an.cvs] + list(an.pairs):
        specs = [cvs[n] for n in names]
        edges = [
            fe.cv_edges(spec, [v[n] for v in sources.values()], int(st.bins))
            for n, spec in zip(names, specs)
        ]
        profiles = {}
        for src, vals in sources.items():
            x = [vals[n] for n in names]
            if src == "md":
                nbl = max(2, min(int(st.n_blocks), len(md.positions) // md.n_series))
                profiles[src] = fe.block_pmf(x, specs, edges, nbl, nb, seed, md.log_w, md.n_series)
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

    agreement = {}
    if "md" in sources:
        for name, (_, prof) in pmfs.items():
            agreement[name] = {
                src: fe.pmf_agreement(
                    prof["md"][0], prof[src][0], prof["md"][1], prof[src][1], st.pmf_max_f
                )
                for src in ("reweighted", "unweighted")
                if src in prof
            }
    plots = []
    if st.plots:
        plots = _plots(out, an, target, sources, weights, labels, pmfs, samples, md_energies, st)
    result = {
        "system": target.name,
        "samples": str(samples.folder),
        "md_reference": None if md is None else md.path,
        "md_reference_kind": None if md is None else md.kind,
        "md_temperatures": None
        if md is None or md.temperatures is None
        else list(map(float, md.temperatures)),
        "n_samples": int(samples.n),
        "n_md_frames": 0 if md is None else int(len(md.positions)),
        "n_md_series": 0 if md is None else int(md.n_series),
        "n_md_runs": 0 if md is None else int(md.n_runs),
        "ess": ess,
        "pareto_k": pareto_k(lw)["k"],  # > 0.7: this set's ESS and reweighted dF unreliable
        "nonfinite_energy_fraction": float(1.0 - u_ok.mean()),
        "nonfinite_cv_fraction": float(1.0 - keep.mean()),
        "state_a": an.state_a,
        "state_b": an.state_b,
        "states": {k: an.states[k] for k in (an.state_a, an.state_b)},
        "dF": {src: {k: _num(v) for k, v in d.items()} for src, d in dF.items()},
        "dF_exact": exact,
        "dF_error_reweighted_vs_md": (
            dF["reweighted"]["dF"] - dF["md"]["dF"] if {"md", "reweighted"} <= set(dF) else None
        ),
        "dF_error_reweighted_vs_exact": (
            dF["reweighted"]["dF"] - exact if exact is not None and "reweighted" in dF else None
        ),
        "state_delta_f": pair_dF,
        "pmf_agreement_vs_md": agreement,
        "cvs": an.cvs,
        "cvs_2d": [list(p) for p in an.pairs],
        "settings": {"bins": int(st.bins), "n_bootstrap": nb, "n_blocks": int(st.n_blocks)},
        "errors": "generator: i.i.d. bootstrap; MD: block bootstrap over n_blocks blocks"
        + ("" if md is None or md.n_series == 1 else " of time, in every series at once"),
        "files": files,
        "plots": plots,
    }
    save_json(result, out / "free_energy.json")
    columns = {s: labels[s] for s in SOURCES}
    if TARGET_ONLY in dF:
        columns = {"md": labels["md"], TARGET_ONLY: "MD, target temperature only", **columns}
    rows = {label: dF[s] for s, label in columns.items() if s in dF}
    table = fe_io.format_table(rows, an.state_a, an.state_b)
    if exact is not None:
        table += f"\nexact ΔF (quadrature): {exact:.3f} kT"
    main = (an.state_a, an.state_b)
    others = {k: p for k, p in pair_dF.items() if (p["state_a"], p["state_b"]) != main}
    if others:  # the main pair is the table above
        table += "\n\n" + fe_io.format_pairs_table(others, columns)
    for name, per_src in agreement.items():
        for src, a in per_src.items():
            table += (
                f"\nPMF({name}) {src} vs MD where F_MD <= {a['max_f_ref']:g} kT: "
                f"max |diff| {a['max_abs_diff']:.3f} kT, rms {a['rms_diff']:.3f} kT "
                f"({a['n_bins']} bins)"
            )
    return result, table


def _num(v: Any) -> Any:
    return float(v) if isinstance(v, np.floating) else v


def _delta_f(sources, weights, md, states, cvs, a: str, b: str, st) -> dict[str, dict]:
    """ΔF = F_b - F_a per source: block bootstrap for MD, i.i.d. bootstrap otherwise; with
    MBAR-weighted replicas also that of the target temperature's frames alone (every run's)
    as ``TARGET_ONLY``."""
    nb, seed, nbl, out = int(st.n_bootstrap), int(st.seed), int(st.n_blocks), {}
    for src, vals in sources.items():
        if src == "md":
            out[src] = fe.md_delta_f(vals, states, cvs, a, b, nbl, nb, seed, md.log_w, md.n_series)
            if md.n_replicas > 1:  # every run's target-temperature series
                first = {k: v[: md.n_target] for k, v in vals.items()}
                out[TARGET_ONLY] = fe.md_delta_f(
                    first, states, cvs, a, b, nbl, nb, seed, n_series=md.n_runs
                )
        else:
            out[src] = fe.state_delta_f(vals, states, cvs, a, b, weights[src], nb, seed)
    return out


def _pair_entry(a: str, b: str, per_src: Mapping, exact: float | None) -> dict:
    """JSON entry of one ``<cv>_negative`` / ``<cv>_positive`` pair (see module docstring)."""
    entry: dict[str, Any] = {"state_a": a, "state_b": b}
    for src, d in per_src.items():
        entry[src] = {k: _num(v) for k, v in d.items()}
    rw, md = per_src.get("reweighted"), per_src.get("md")
    entry["exact"] = exact
    entry["error_reweighted_vs_md"] = rw["dF"] - md["dF"] if rw and md else None
    entry["error_reweighted_vs_exact"] = rw["dF"] - exact if rw and exact is not None else None
    return entry


def _resolved(f: np.ndarray, err: np.ndarray, max_err: float | None):
    """F with bins of stderr above ``max_err`` (kT) set to NaN (not drawn)."""
    if max_err is None:
        return f, err
    bad = np.asarray(err) > float(max_err)  # NaN (no bootstrap): drawn
    return np.where(bad, np.nan, f), np.where(bad, np.nan, err)


def _axis_label(name: str, spec: Mapping) -> str:
    from .plotting import cv_label

    unit = UNITS.get(spec.get("type"), "")
    return cv_label(name) + (f" ({unit})" if unit else "")


def _plots(out, an, target, sources, weights, labels, pmfs, samples, md_u, st) -> list[str]:
    """Ramachandran maps, PMFs with error bands, energy and log-weight histograms.

    PMF plots leave out bins whose stderr exceeds ``plot_max_stderr`` (kT), e.g. barrier
    bins carried by a few tiny weights; the CSV files keep every bin.
    """
    from . import plotting

    files = []
    if an.rama:
        columns = {
            labels[src]: (sources[src], weights.get(src)) for src in SOURCES if src in sources
        }
        ess = effective_sample_size(samples.log_w)
        title = f"Ramachandran plot, {target.name} (reweighted ESS {ess:.3g})"
        path = out / "ramachandran.png"
        files.append(plotting.plot_ramachandran_pairs(path, an.rama, columns, title=title))
    for name, (centres, profiles) in pmfs.items():
        curves = {
            labels[s]: (centres, *_resolved(*profiles[s], st.plot_max_stderr))
            for s in SOURCES
            if s in profiles
        }
        files.append(
            plotting.plot_pmfs(
                out / f"pmf_{name}.png",
                curves,
                xlabel=_axis_label(name, target.cvs[name]),
                title=f"Free-energy profile along {name} ({target.name}; bands: ±1 stderr)",
                max_f=st.plot_max_f,
            )
        )
    energies = {} if md_u is None else {"MD": md_u}
    energies["generator"] = samples.u
    files.append(
        plotting.plot_energy_histograms(
            out / "energies.png",
            energies,
            title=f"Reduced energies, {target.name}: MD frames vs generator samples",
        )
    )
    if np.isfinite(samples.log_w).any():
        ess = effective_sample_size(samples.log_w)
        files.append(
            plotting.plot_log_weights(
                out / "log_weights.png",
                samples.log_w,
                title=f"Log importance weights (ESS {ess:.3g}, N = {samples.n})",
            )
        )
    return [Path(f).name for f in files]
