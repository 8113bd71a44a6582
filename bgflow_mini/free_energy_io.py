"""Writing free-energy results: PMF tables as CSV and a ΔF summary table (markdown)."""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .fileio import atomic_path

__all__ = ["write_pmf_csv", "write_pmf_2d_csv", "format_table", "format_pairs_table"]


def write_pmf_csv(
    path: str | os.PathLike,
    cv_name: str,
    centres: np.ndarray,
    profiles: Mapping[str, tuple[np.ndarray, np.ndarray]],
) -> Path:
    """CSV with columns ``<cv_name>, F_<source>, stderr_<source>, ...`` (kT).

    ``profiles`` maps a source name to ``(F, stderr)`` of shape ``(n_bins,)``.
    """
    path = Path(path)
    header = [cv_name] + [f"{k}_{src}" for src in profiles for k in ("F", "stderr")]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for i, c in enumerate(np.asarray(centres)):
            row = [repr(float(c))]
            for f, e in profiles.values():
                row += [repr(float(f[i])), repr(float(e[i]))]
            writer.writerow(row)
    return path


def write_pmf_2d_csv(
    path: str | os.PathLike,
    names: tuple[str, str],
    centres: tuple[np.ndarray, np.ndarray],
    surfaces: Mapping[str, tuple[np.ndarray, np.ndarray]],
) -> Path:
    """Long-format CSV ``<cv1>, <cv2>, F_<source>, stderr_<source>, ...`` (one row per bin)."""
    c1, c2 = (np.asarray(c) for c in centres)
    g1, g2 = np.meshgrid(c1, c2, indexing="ij")
    flat = {src: (np.asarray(f).ravel(), np.asarray(e).ravel()) for src, (f, e) in surfaces.items()}
    return _write_long(path, names, g1.ravel(), g2.ravel(), flat)


def _write_long(path, names, x1, x2, flat) -> Path:
    path = Path(path)
    header = list(names) + [f"{k}_{src}" for src in flat for k in ("F", "stderr")]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for i in range(len(x1)):
            row = [repr(float(x1[i])), repr(float(x2[i]))]
            for f, e in flat.values():
                row += [repr(float(f[i])), repr(float(e[i]))]
            writer.writerow(row)
    return path


def _fmt(value: float, err: float | None = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    s = f"{value:.3f}" if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if err is not None and not math.isnan(err):
        s += f" ± {err:.3f}" if math.isfinite(err) else " ± inf"
    return s


def format_table(results: Mapping[str, Mapping], state_a: str, state_b: str) -> str:
    """Markdown table of ΔF (kT), ESS and state counts per source.

    ``results`` maps a source label to a :func:`state_delta_f`-like dict.
    """
    labels = list(results)
    lines = [
        "| quantity | " + " | ".join(labels) + " |",
        "| --- |" + " --- |" * len(labels),
        f"| ΔF = F({state_b}) - F({state_a}) (kT) | "
        + " | ".join(_fmt(r["dF"], r["stderr"]) for r in results.values())
        + " |",
        "| ESS (normalised) | " + " | ".join(f"{r['ess']:.4f}" for r in results.values()) + " |",
        f"| population {state_b} | "
        + " | ".join(_fmt(r["population_b"]) for r in results.values())
        + " |",
        "| samples in a / b | "
        + " | ".join(f"{r['n_a']} / {r['n_b']}" for r in results.values())
        + " |",
    ]
    return "\n".join(lines)


def format_pairs_table(pairs: Mapping[str, Mapping], labels: Mapping[str, str]) -> str:
    """Markdown table of ΔF (kT) of several state pairs, one row per pair.

    ``pairs`` maps a name (e.g. ``"phi_2"``) to ``{"state_a", "state_b", <source>: a
    state_delta_f-like dict, ..., "error_reweighted_vs_md"}`` or, for a pair without ΔF,
    ``{"state_a", "state_b", "skipped": reason}``; ``labels`` maps source names to column
    titles, in column order (sources no pair has are left out).
    """
    cols = [s for s in labels if any(s in p for p in pairs.values())]
    has_err = any(p.get("error_reweighted_vs_md") is not None for p in pairs.values())
    head = ["ΔF = F(b) - F(a) (kT)", *(labels[s] for s in cols)]
    head += ["reweighted - MD"] if has_err else []
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for p in pairs.values():
        row = [f"F({p['state_b']}) - F({p['state_a']})"]
        if "skipped" in p:
            reason = "states overlap" if "overlap" in p["skipped"] else "see the JSON"
            row += [f"skipped ({reason})"] + [""] * (len(head) - 2)
        else:
            row += [_fmt(p[s]["dF"], p[s]["stderr"]) if s in p else "n/a" for s in cols]
            if has_err:
                err = p.get("error_reweighted_vs_md")
                row.append("n/a" if err is None else _fmt(err))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)
