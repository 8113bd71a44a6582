"""Human-readable summaries of a training run's metrics."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

__all__ = ["summary_table", "peak_memory_mb"]

_ROWS = (
    ("ESS (normalised)", "ess", "{:.4f}"),
    ("Pareto k of the largest weights (> 0.7: ESS, dF unreliable)", "pareto_k", "{:.2f}"),
    ("test NLL", "test_nll", "{:.3f}"),
    ("dF reweighted (kT)", "dF_reweighted", "{:.3f}"),
    ("dF unweighted (kT)", "dF_unweighted", "{:.3f}"),
    ("dF reference (kT)", "dF_reference", "{:.3f}"),
    ("dF error (kT)", "dF_error", "{:+.3f}"),
    ("Ramachandran KL", "ramachandran_kl", "{:.4f}"),
    ("Ramachandran KL, MD train (floor)", "ramachandran_kl_md_train", "{:.4f}"),
    ("chirality kept, all alpha carbons", "chirality_kept_fraction", "{:.4f}"),
    ("chirality kept, weight share", "chirality_kept_fraction_reweighted", "{:.4f}"),
    ("finite energies (evaluation)", "finite_energy_fraction", "{:.4f}"),
    ("energies above the cap (evaluation)", "n_energies_above_cap", "{:d}"),
    ("non-finite energies (training)", "training_nonfinite_energies", "{:d}"),
    ("capped energies (training)", "training_capped_energies", "{:d}"),
    ("ICs out of domain (evaluation)", "ic_out_of_domain_fraction", "{:.2e}"),
    ("wall time (s)", "wall_time_s", "{:.0f}"),
    ("steps/s", "steps_per_s", "{:.2f}"),
)

_NO_REFERENCE = "the MD frames do not visit both states (a plain MD that stays in one basin)"


def _md_runs_row(metrics: Mapping) -> list[str]:
    """A row naming the independent MD runs pooled into the reference (more than one)."""
    ref = (metrics.get("data_info") or {}).get("md_reference") or {}
    runs = ref.get("runs") or []
    if len(runs) < 2:
        return []
    seeds = ", ".join(str(r["md_seed"]) for r in runs)
    return [f"| MD reference | {ref['label']}: md.seed {seeds} (each run: dF_reference_*_run<i>) |"]


def _replica_pool_rows(pool: Mapping) -> list[str]:
    """Rows giving the ML draws' share of each pooled temperature, for the run's weighting
    and for any phase's own (``phase_weightings``)."""
    if not pool:
        return []
    temps = "/".join(f"{t:.0f}" for t in pool["temperatures"])
    rows = [(pool["weighting"], pool)]
    rows += sorted((pool.get("phase_weightings") or {}).items())
    return [
        f"| ML draws, {temps} K pool, {name} weights: share per temperature | "
        + " / ".join(f"{x:.3f}" for x in r["weight_share"])
        + f" (Kish effective {r['kish_frames']:.0f} of {pool['n_frames']} frames) |"
        for name, r in rows
    ]


def _state_floor_rows(floor: Mapping) -> list[str]:
    """Rows naming the states whose share of the ML draws a state floor raised."""
    if not floor:
        return []
    raised = [
        f"{name} {r['before']:.4f} -> {r['after']:.4f}"
        for name, r in (floor.get("states") or {}).items()
        if r.get("raised", r["after"] > r["before"] + 1e-4)  # (metrics before the flag)
    ]
    text = ", ".join(raised) if raised else "no state was below it"
    return [f"| ML draws, state floor {floor['floor']}: share before -> after | {text} |"]


def _state_feedback_rows(fb: Mapping) -> list[str]:
    """The factors state feedback put on the ML draw weights (those not at 1)."""
    if not fb:
        return []
    moved = [f"{k} {v:.2f}" for k, v in (fb.get("factors") or {}).items() if abs(v - 1) > 5e-3]
    text = ", ".join(moved) + " (others 1)" if moved else "every factor 1"
    return [f"| ML draws, state feedback after {fb['updates']} updates: factors | {text} |"]


def _ais_rows(ais: Mapping, main: tuple) -> list[str]:
    """Rows of the evaluation on annealed importance samples (``metrics["ais"]``)."""
    if not ais:
        return []
    sm = ais.get("sampler") or {}
    acc = sm.get("acceptance") or [math.nan]
    head = f"AIS ({sm.get('steps')} steps, acceptance {min(acc):.2f}-{max(acc):.2f})"
    lines = [f"| {head}: ESS / Pareto k | {ais['ess']:.4f} / {ais['pareto_k']:.2f} |"]
    if ais.get("dF_reweighted") is not None:
        err = ais.get("dF_error")
        tail = f" (error {err:+.3f})" if err is not None and math.isfinite(err) else ""
        dF = _pm(ais["dF_reweighted"], ais.get("dF_reweighted_stderr") or 0.0)
        lines.append(f"| AIS: dF reweighted (kT) | {dF}{tail} |")
    for d in (ais.get("state_delta_f") or {}).values():
        if "skipped" in d or (d["state_a"], d["state_b"]) == main:
            continue
        tail = f" (error {d['error']:+.3f})" if math.isfinite(d.get("error", math.nan)) else ""
        lines.append(
            f"| AIS: dF {d['state_a']} -> {d['state_b']} (kT) | "
            f"{_pm(d['dF_reweighted'], d['stderr'])}{tail} |"
        )
    return lines


def summary_table(metrics: Mapping) -> str:
    """A Markdown table of the headline metrics present in ``metrics`` (with errors)."""
    lines = ["| metric | value |", "| --- | --- |"]
    for label, key, fmt in _ROWS:
        if key in metrics and metrics[key] is not None:
            err = metrics.get(key + "_stderr")
            text = fmt.format(metrics[key]) + (f" ± {err:.3f}" if err else "")
            if key in ("dF_reference", "dF_error") and not math.isfinite(metrics[key]):
                lines.append(f"| {label} | none: {_NO_REFERENCE} |")
                lines += _md_runs_row(metrics) if key == "dF_reference" else []
                continue
            if key == "dF_reference":
                text += f" ({metrics.get('dF_reference_kind', '')})"
            kind = metrics.get("ramachandran_kl_kind", "phi, psi")
            if key.startswith("ramachandran_kl") and kind != "phi, psi":
                label += f" ({kind})"
            lines.append(f"| {label} | {text} |")
            if key == "dF_reference":
                lines += _md_runs_row(metrics)
            blocks = metrics.get("ess_blocks") if key == "ess" else None
            if blocks:
                lines.append(
                    f"| ESS of {blocks['n_blocks']} blocks of {blocks['block_size']:,} samples: "
                    f"min / median / max | {blocks['min']:.4f} / {blocks['median']:.4f} / "
                    f"{blocks['max']:.4f} |"
                )
            if key == "ess":
                lines += _largest_weight_rows(metrics.get("largest_weights") or [])
                lines += _energy_slope_rows(metrics.get("energy_slope") or {})
    for res in metrics.get("ramachandran_residues") or []:
        kl, floor = (metrics.get(f"ramachandran_kl{k}_{res}") for k in ("", "_md_train"))
        if kl is not None:
            text = f"{kl:.4f}" + (f" (floor {floor:.4f})" if floor is not None else "")
            lines.append(f"| Ramachandran KL, residue {res} | {text} |")
    main = (metrics.get("state_a"), metrics.get("state_b"))
    for d in (metrics.get("state_delta_f") or {}).values():
        if (d["state_a"], d["state_b"]) == main:
            continue  # the headline dF rows above
        label = f"dF {d['state_a']} -> {d['state_b']} (kT)"
        if "skipped" in d:
            lines.append(f"| {label} | skipped: {d['skipped']} |")
            continue
        if not math.isfinite(d["dF_reference"]):
            lines.append(
                f"| {label}: reweighted / reference | {_pm(d['dF_reweighted'], d['stderr'])}"
                f" / none: {_NO_REFERENCE} |"
            )
            continue
        lines.append(
            f"| {label}: reweighted / reference ({d['reference_kind']}) | "
            f"{_pm(d['dF_reweighted'], d['stderr'])} / "
            f"{_pm(d['dF_reference'], d['reference_stderr'])} (error {d['error']:+.3f}) |"
        )
    per_centre = metrics.get("chirality_kept_fraction_per_centre") or {}
    if len(per_centre) > 1:
        text = ", ".join(f"{k} {v:.4f}" for k, v in per_centre.items())
        lines.append(f"| chirality kept per alpha carbon | {text} |")
    rings = metrics.get("ring_bonds")
    if rings:
        lines.append(
            f"| ring bonds ({rings['n_ring_bonds']}): std / MD std, max mean error | "
            f"{rings['min_std_ratio']:.2f}..{rings['max_std_ratio']:.2f}, "
            f"{100 * rings['max_mean_rel_error']:.2f} % |"
        )
    lines += _ais_rows(metrics.get("ais") or {}, main)
    pops = metrics.get("state_populations") or {}
    for name, p in pops.items():
        lines.append(_population_row(name, p))
    info = metrics.get("data_info") or {}
    lines += _replica_pool_rows(info.get("replica_pool") or {})
    lines += _state_floor_rows(info.get("state_floor") or {})
    lines += _state_feedback_rows(metrics.get("state_feedback") or {})
    lines += _driver_rows(metrics.get("weight_drivers") or {})
    ev = metrics.get("energy_evaluations")
    if ev:
        counts = f"{ev['training']:,} / {ev['evaluation']:,}"
        lines.append(f"| energy evaluations: training / evaluation | {counts} |")
    sel = metrics.get("selected_model")
    if sel:
        est = f", ESS estimate {sel['ess']:.3f}" if "ess" in sel else ""
        lines.append(f"| evaluated weights | {sel['kind']} (step {sel['step']}{est}) |")
    for line in metrics.get("collapse_warnings") or []:
        lines.append(f"| MODE COLLAPSE | {line} |")
    for line in metrics.get("overfill_warnings") or []:
        lines.append(f"| OVER-FILLED STATE | {line} |")
    for line in metrics.get("overfit_warnings") or []:
        lines.append(f"| OVERFITTING | {line} |")
    return "\n".join(lines)


def _population_row(name: str, p: dict) -> str:
    """A state's raw / reweighted population, with its share of the squared weights and
    the ESS/n inside it where the metrics have them (runs before they were added lack them)."""
    if "weight2_share" not in p:
        return f"| population {name}: raw / reweighted | {p['raw']:.4f} / {p['reweighted']:.4f} |"
    return (
        f"| population {name}: raw / reweighted; share of w^2, ESS/n inside | "
        f"{p['raw']:.4f} / {p['reweighted']:.4f}; {p['weight2_share']:.3f}, "
        f"{p['ess_within']:.3f} |"
    )


def _largest_weight_rows(heavy: list, n: int = 3) -> list[str]:
    """Rows for the ``n`` largest importance weights: share, energy, CV values."""
    rows = []
    for rank, h in enumerate(heavy[:n], 1):
        where = ", ".join(f"{k} {v:.3g}" for k, v in h["cvs"].items())
        rows.append(
            f"| largest weight {rank}: share, u - median u, CVs (degrees, nm) | "
            f"{100 * h['share']:.2f} %, {h['u_above_median']:+.1f} kT"
            + (f", {where}" if where else "")
            + " |"
        )
    return rows


def _pm(value: float, err: float | None) -> str:
    return f"{value:.3f}" + (f" ± {err:.3f}" if err else "")


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process in MiB: CUDA allocations on a GPU, else max RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _energy_slope_rows(fit: Mapping) -> list[str]:
    """How hot the generator is: the line of log w on the energy."""
    if not fit or not math.isfinite(fit.get("slope", math.nan)):
        return []
    return [
        f"| generator temperature / target's (log w on u: slope, R^2) | "
        f"{fit['temperature_ratio']:.3f} ({fit['slope']:+.3f}, {fit['r2']:.2f}) |"
    ]


def _driver_rows(drivers: Mapping) -> list[str]:
    """The three coordinates ``log w`` follows most, over all samples and per state."""

    def listed(entries: list) -> str:
        return ", ".join(f"{d['coordinate']} {d['r2']:.2f}" for d in entries[:3])

    if not drivers.get("all"):
        return []
    rows = [f"| log w follows (binned R^2) | {listed(drivers['all'])} |"]
    for name, entries in (drivers.get("states") or {}).items():
        rows.append(f"| log w inside {name} follows | {listed(entries)} |")
    return rows
