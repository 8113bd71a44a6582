"""Checks of the composed Hydra configs, run before any MD, training or sampling starts.

Each ``validate_*_config`` collects every problem and raises one :class:`ConfigError`
listing them, one per line: dotted key, bad value, what is allowed. Per-key rules are
tables of ``(key, Rule)`` rows (add a row to check a key); cross-key checks are functions.
"""

from __future__ import annotations

import importlib.util
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from bgflow_mini.checkpoint import WEIGHTS
from bgflow_mini.flows.nets import ACTIVATIONS
from bgflow_mini.replica_pool import WEIGHTINGS
from bgflow_mini.training import Phase

__all__ = [
    "ConfigError",
    "validate_train_config",
    "validate_sample_config",
    "validate_free_energy_config",
    "validate_run_md_config",
    "md_replica_problems",
]

_ABSENT: Any = object()  # a key not in the config (or left at ``???``)


class ConfigError(ValueError):
    """An invalid config; ``problems`` holds one line per problem (key, value, allowed)."""

    def __init__(self, problems: str | Sequence[str]) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        n = len(self.problems)
        head = "invalid config" + (f" ({n} problems)" if n > 1 else "")
        super().__init__(head + ":\n" + "\n".join(f"  {p}" for p in self.problems))


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass(frozen=True)
class Rule:
    """A check of one value: ``ok(value)`` and the ``allowed`` values in words."""

    allowed: str
    ok: Callable[[Any], bool]
    nullable: bool = False

    def problem(self, key: str, value: Any, absent_ok: bool = False) -> str | None:
        """``None`` if ``value`` is fine, else ``key=value: must be ...``."""
        if value is _ABSENT:
            return None if absent_ok or self.nullable else f"{key}: missing; must be {self.allowed}"
        if (value is None and self.nullable) or (value is not None and self.ok(value)):
            return None
        return f"{key}={_show(value)}: must be {self.allowed}"


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def integer(lo: int | None = None) -> Rule:
    """An int (not a bool, float or string), ``>= lo`` if given."""
    text = "an integer" + ("" if lo is None else f" >= {lo}")
    ok = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    return Rule(text, lambda v: ok(v) and (lo is None or v >= lo))


def number(gt: float | None = None, ge: float | None = None) -> Rule:
    """A finite int or float, ``> gt`` / ``>= ge`` if given."""
    text = "a number" + ("" if gt is None else f" > {gt}") + ("" if ge is None else f" >= {ge}")
    return Rule(text, lambda v: _is_num(v) and (gt is None or v > gt) and (ge is None or v >= ge))


def one_of(options: Iterable[str]) -> Rule:
    """A string in ``options``."""
    opts = sorted(options)
    return Rule(f"one of {opts}", lambda v: isinstance(v, str) and v in opts)


def optional(rule: Rule) -> Rule:
    """``rule`` or null."""
    return Rule(f"null or {rule.allowed}", rule.ok, nullable=True)


def list_of(rule: Rule, min_len: int = 0, length: int | None = None) -> Rule:
    """A list of values passing ``rule`` (``length`` items, or at least ``min_len``)."""
    size = f"a {length}-item" if length else ("a non-empty" if min_len else "a")
    text = f"{size} list, each {rule.allowed}"
    ok_len = (lambda n: n == length) if length else (lambda n: n >= min_len)
    return Rule(
        text, lambda v: isinstance(v, list) and ok_len(len(v)) and all(rule.ok(x) for x in v)
    )


BOOL = Rule("true or false", lambda v: isinstance(v, bool))
TEXT = Rule("a non-empty string", lambda v: isinstance(v, str) and bool(v.strip()))
DTYPES = ("float32", "float64")
FLOW_KINDS = ("rnvp", "nice", "spline")
FORMATS = ("h5", "dcd", "pdb")
_CUDA = re.compile(r"cuda(:\d+)?")
DEVICE = Rule(
    "one of ['auto', 'cpu', 'cuda', 'cuda:N']",
    lambda v: isinstance(v, str) and (v in ("auto", "cpu") or bool(_CUDA.fullmatch(v))),
)

FRACTIONS = Rule(
    "[train, val, test]: 3 numbers > 0 (validation NLL and test metrics need frames)",
    lambda v: isinstance(v, list) and len(v) == 3 and all(_is_num(x) and x > 0 for x in v),
)
STATE = optional(TEXT)  # null: the target's default state
ACTIVATION = Rule(
    f"one of {sorted(ACTIVATIONS)} or a {{_target_: ...}} mapping",
    lambda v: (
        (isinstance(v, str) and v.lower() in ACTIVATIONS)
        or (isinstance(v, dict) and "_target_" in v)
    ),
)
Rules = Sequence[tuple[str, Rule]]


def rows(rule: Rule, *keys: str) -> list[tuple[str, Rule]]:
    """Table rows checking every key of ``keys`` with ``rule``."""
    return [(key, rule) for key in keys]


POS_INT, NAT, POS = integer(1), integer(0), number(gt=0)
RUNTIME: Rules = [  # every app
    *rows(integer(), "seed"),
    *rows(DEVICE, "device"),
    *rows(optional(POS_INT), "num_threads"),
    *rows(BOOL, "progress"),
]
MD: Rules = [  # absent keys take bgflow_mini.md.MD_DEFAULTS
    *rows(POS_INT, "n_frames", "save_every", "n_replicas", "swap_every", "keep_replicas"),
    *rows(POS, "timestep", "t_max"),
    *rows(number(ge=0), "friction"),
    *rows(optional(POS), "temperature", "hydrogen_mass"),
    *rows(optional(list_of(POS, min_len=1)), "temperatures"),
    *rows(NAT, "equilibration_steps"),
    *rows(BOOL, "minimize"),
    *rows(integer(), "seed"),
    *rows(TEXT, "platform"),
]
AIS: Rules = [  # configs/sample.yaml's ais block (absent or null: plain flow samples)
    ("ais.steps", optional(integer(0))),
    ("ais.leapfrog", optional(integer(1))),
    ("ais.target_acceptance", Rule("a number in (0, 1)", lambda v: _is_num(v) and 0 < v < 1, True)),
]
PHASE: Rules = [  # steps first: the only key without a default
    *rows(POS_INT, "steps"),
    *rows(number(ge=0), "w_ml", "w_kl", "w_iw"),
    *rows(POS, "temperature"),
    *rows(optional(POS), "lr"),
    *rows(optional(POS_INT), "batch_size", "kl_batch_size", "resample_every"),
    *rows(Rule("a string", lambda v: isinstance(v, str)), "name"),
    *rows(optional(one_of(WEIGHTINGS)), "replica_weights"),
]
TRAIN: Rules = [
    *RUNTIME,
    *rows(one_of(DTYPES), "dtype"),
    *rows(optional(TEXT), "resume"),
    *rows(TEXT, "system.name"),
    *rows(STATE, "evaluation.state_a", "evaluation.state_b"),
    *rows(POS, "training.lr", "data.toy.step_size", "data.toy.init_scale"),
    *rows(optional(POS), "training.clip_grad_norm"),
    *rows(number(ge=0), "training.weight_decay"),
    *rows(NAT, "training.ess_every", "training.eval_every", "data.toy.burn_in"),
    *rows(POS_INT, "training.batch_size", "training.kl_batch_size", "training.ess_samples"),
    *rows(POS_INT, "training.metrics_every", "training.checkpoint_every"),
    *rows(POS_INT, *(f"evaluation.{k}" for k in ("n_samples", "batch_size", "bins"))),
    *rows(POS_INT, "evaluation.n_bootstrap", "data.stride", "flow.n_blocks"),
    *rows(POS_INT, "data.toy.n_chains", "data.toy.n_steps", "data.toy.thin"),
    *rows(BOOL, "evaluation.save_samples"),
    *rows(FRACTIONS, "data.fractions"),
    *rows(optional(POS_INT), "data.n_workers"),
]
OPTIONAL_TRAIN: Rules = [  # only checked when present (a custom flow may not have them)
    *rows(
        optional(Rule("a number in (0, 1)", lambda v: _is_num(v) and 0 < v < 1)),
        "training.ema_decay",
    ),
    *rows(one_of(("best_ess", "ema", "last")), "training.select"),
    *rows(POS_INT, "training.buffer_size", "training.resample_every"),
    *rows(optional(POS_INT), "training.sync_every"),
    *rows(POS_INT, "training.stall_window"),
    *rows(Rule("a number in (0, 1]", lambda v: _is_num(v) and 0 < v <= 1), "training.max_skipped"),
    *rows(BOOL, "training.iw_truncate", "training.compile"),
    *rows(Rule("true, false or box", lambda v: isinstance(v, bool) or v == "box"), "bounded_ics"),
    *rows(one_of(("cartesian", "internal")), "ring_coordinates"),
    *rows(BOOL, "symmetrize"),
    *rows(one_of(FLOW_KINDS), "flow.kind"),
    *rows(list_of(POS_INT, min_len=1), "flow.hidden"),
    *rows(integer(2), "flow.n_bins"),
    *rows(POS, "flow.tail_bound"),
    *rows(ACTIVATION, "flow.activation"),
    *rows(POS_INT, "data.replicas"),
    *rows(one_of(WEIGHTINGS), "data.replica_weights"),
    *rows(
        optional(Rule("a number in (0, 0.5)", lambda v: _is_num(v) and 0 < v < 0.5)),
        "data.state_floor",
    ),
    *rows(optional(list_of(integer(0))), "evaluation.md_reference_seeds"),
    *[("evaluation." + key, rule) for key, rule in AIS],
]
SAMPLE: Rules = [
    *RUNTIME,
    *AIS,
    *rows(TEXT, "checkpoint"),
    *rows(optional(one_of(WEIGHTS)), "weights"),  # null: saved
    *rows(optional(TEXT), "config", "out"),
    *rows(POS_INT, "n_samples", "batch_size"),
    *rows(list_of(one_of(FORMATS)), "formats"),
    *rows(optional(one_of(DTYPES)), "dtype"),
    *rows(BOOL, "regularize"),
]
FREE_ENERGY: Rules = [
    *RUNTIME,
    *AIS,
    *rows(optional(TEXT), "samples", "checkpoint", "config", "out", "data_dir"),
    *rows(optional(one_of(WEIGHTS)), "weights"),  # null: saved
    *rows(
        Rule(
            "null, auto, a path, or a non-empty list of paths (independent MD runs, pooled;"
            " auto stands alone)",
            lambda v: TEXT.ok(v) or (list_of(TEXT, min_len=1).ok(v) and "auto" not in v),
            nullable=True,
        ),
        "md_reference",
    ),
    *rows(POS_INT, "n_samples", "batch_size", "n_bootstrap"),
    *rows(integer(2), "bins", "n_blocks"),
    *rows(optional(one_of(DTYPES)), "dtype"),
    *rows(STATE, "state_a", "state_b"),
    *rows(optional(list_of(TEXT)), "cvs"),  # null: every CV of the target
    # null: every phi<k>/psi<k> pair of the target, else its first two CVs
    *rows(optional(list_of(list_of(TEXT, length=2))), "cvs_2d"),
    *rows(Rule("a mapping {state: {cv: [lo, hi]}}", lambda v: isinstance(v, dict)), "states"),
    *rows(BOOL, "md_energies", "plots"),
    *rows(
        Rule("auto or an integer >= 1", lambda v: v == "auto" or integer(1).ok(v)),
        "md_replicas",
    ),
    *rows(POS, "pmf_max_f"),
    *rows(optional(POS), "plot_max_f", "plot_max_stderr"),
]
RUN_MD: Rules = [
    *rows(TEXT, "system.name", "data_dir"),
    *rows(optional(POS_INT), "n_workers"),
    *rows(BOOL, "progress"),
]


def _get(d: Any, key: str) -> Any:
    """The value at dotted ``key`` of nested dicts / lists, or ``_ABSENT``."""
    for part in key.split("."):
        if isinstance(d, Mapping) and part in d:
            d = d[part]
        elif isinstance(d, list) and part.isdigit() and int(part) < len(d):
            d = d[int(part)]
        else:
            return _ABSENT
    return _ABSENT if d == "???" else d


def _apply(d: Any, rules: Rules, prefix: str = "", absent_ok: bool = False) -> list[str]:
    """Problems of the values of ``d`` (keys of ``rules``, reported as ``prefix + key``)."""
    lines = (rule.problem(prefix + key, _get(d, key), absent_ok) for key, rule in rules)
    return [line for line in lines if line]


def _unknown(d: Mapping, known: Iterable[str], where: str) -> list[str]:
    bad = sorted(set(d) - set(known), key=str)
    return [f"{where}.{k}: unknown key; known keys: {sorted(known)}" for k in bad]


def _plain(cfg: DictConfig | Mapping) -> dict:
    """``cfg`` as plain dicts (interpolations resolved); resolution errors as ConfigError."""
    if not isinstance(cfg, DictConfig):
        return dict(cfg)
    try:
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "config"
        msg = str(getattr(err, "msg", None) or err).splitlines()[0]
        raise ConfigError(f"{key}: cannot resolve the value: {msg}") from err


def _cuda(d: Mapping) -> list[str]:
    """``device=cuda[:N]`` needs a visible CUDA device."""
    dev = d.get("device")
    if not (isinstance(dev, str) and _CUDA.fullmatch(dev)):
        return []
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(dev.partition(":")[2] or 0)
    if n == 0:
        return [f"device={dev!r}: no CUDA device is visible; use device=cpu or device=auto"]
    if index >= n:
        return [f"device={dev!r}: only {n} CUDA device(s) visible (cuda:0 to cuda:{n - 1})"]
    return []


def _phases(d: Mapping) -> list[str]:
    phases = _get(d, "training.phases")
    if not (isinstance(phases, list) and phases):
        return [f"training.phases={_show(phases)}: must be a non-empty list of phases"]
    lines: list[str] = []
    for i, p in enumerate(phases):
        where = f"training.phases.{i}"
        if not isinstance(p, Mapping):
            lines.append(f"{where}={_show(p)}: must be a mapping with steps, w_ml, w_kl, ...")
            continue
        lines += _unknown(p, [f.name for f in fields(Phase)], where)
        lines += _apply(p, PHASE[:1], where + ".")  # steps has no default
        lines += _apply(p, PHASE[1:], where + ".", absent_ok=True)
        w = (p.get("w_ml", 1.0), p.get("w_kl", 0.0), p.get("w_iw", 0.0))
        if all(_is_num(x) for x in w) and not any(w):
            lines.append(f"{where}: w_ml, w_kl and w_iw are all 0; at least one must be > 0")
        k = _get(d, "data.replicas")
        k = 1 if k is _ABSENT or k is None else k
        if p.get("replica_weights") is not None and not (isinstance(k, int) and k > 1):
            lines.append(
                f"{where}.replica_weights={_show(p['replica_weights'])}: weights a replica "
                f"pool, but data.replicas={_show(k)} pools none; set data.replicas > 1 "
                "(and md.keep_replicas to match) or drop the key"
            )
    return lines


def _md(d: Mapping) -> list[str]:
    md = d.get("md")
    if md is None:
        return []
    if not isinstance(md, Mapping):
        return [f"md={_show(md)}: must be a mapping of MD settings"]
    from bgflow_mini.md import MD_DEFAULTS  # imports OpenMM: only when there is an md section

    lines = _unknown(md, MD_DEFAULTS, "md") + _apply(md, MD, "md.", absent_ok=True)
    return lines + _replicas(d, md, MD_DEFAULTS)


def _replicas(d: Mapping, md: Mapping, defaults: Mapping) -> list[str]:
    """``data.replicas`` pools saved replicas: at most ``md.keep_replicas`` of the ladder."""
    k = _get(d, "data.replicas")
    keep = md.get("keep_replicas", defaults["keep_replicas"])
    temps = md.get("temperatures")
    n_rep = len(temps) if isinstance(temps, list) else md.get("n_replicas", 1)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (keep, n_rep)):
        return []  # reported by the rules above
    lines = []
    if keep > n_rep:
        lines.append(f"md.keep_replicas={keep}: at most the {n_rep} replicas the MD runs")
    if isinstance(k, int) and not isinstance(k, bool) and k > keep:
        lines.append(
            f"data.replicas={k}: pools the frames of {k} replicas, but md.keep_replicas={keep} "
            f"saves {keep}; set md.keep_replicas={k} (the MD keeps the {k} lowest temperatures)"
        )
    if isinstance(k, int) and k > 1 and importlib.util.find_spec("pymbar") is None:
        lines.append(
            f"data.replicas={k}: the MBAR weights of pooled replicas (training weights and the "
            "evaluation's MD reference) need pymbar: pip install 'bgflow_mini[mbar]'"
        )
    return lines


def _state_problems(states: Mapping, cvs: Mapping | None, where: str) -> list[str]:
    """Each state must map known CV names to ``[lo, hi]`` with ``lo < hi``; a torsion range
    may have ``lo > hi``: it crosses the ±pi cut (see :func:`bgflow_mini.cv.in_range`)."""
    lines: list[str] = []
    known = sorted(cvs) if cvs is not None else None
    for name, ranges in states.items():
        if not isinstance(ranges, Mapping) or not ranges:
            lines.append(f"{where}.{name}={_show(ranges)}: must map CV names to [lo, hi]")
            continue
        for cv, r in ranges.items():
            key = f"{where}.{name}.{cv}"
            if known is not None and cv not in known:
                lines.append(f"{key}: unknown CV {cv!r}; known CVs: {known}")
            ok = isinstance(r, (list, tuple)) and len(r) == 2 and all(_is_num(x) for x in r)
            spec = (cvs or {}).get(cv) or {}
            periodic = isinstance(spec, Mapping) and spec.get("type") == "torsion"
            if not ok or r[0] == r[1] or (r[0] > r[1] and not periodic):
                lines.append(
                    f"{key}={_show(r)}: must be [lo, hi] with numbers lo < hi "
                    "(lo > hi only for torsions: a range across the ±pi cut)"
                )
    return lines


def _state_choice(d: Mapping, keys: tuple[str, str], target: Any, extra: Mapping) -> list[str]:
    """``state_a``/``state_b`` differ and name states of the target (or of ``extra``);
    null (or absent) is the target's ``default_states``."""
    lines = []
    given = [_get(d, k) for k in keys]
    try:
        defaults = tuple(target.default_states)[:2]
    except (AttributeError, TypeError):
        defaults = ()
    except ValueError as err:  # a target with fewer than two states
        defaults = ()
        if any(v in (None, _ABSENT) for v in given):
            lines.append(f"{keys[0]}, {keys[1]}: no default states: {err}; name two states")
    a, b = (
        v if v not in (None, _ABSENT) else (defaults + (None, None))[i] for i, v in enumerate(given)
    )
    if isinstance(a, str) and a == b:
        lines.append(f"{keys[0]}, {keys[1]}: both are {a!r}; they must name different states")
    states, cvs = getattr(target, "states", None), getattr(target, "cvs", None)
    if states is None or cvs is None:
        return lines
    lines += _state_problems(states, cvs, "system.states")
    every = {**dict(states), **dict(extra)}
    known = sorted(every)
    name = getattr(target, "name", "?")
    for key, v in zip(keys, (a, b), strict=True):
        if isinstance(v, str) and v not in known:
            lines.append(f"{key}={v!r}: unknown state of system {name!r}; known states: {known}")
    if not lines and isinstance(a, str) and isinstance(b, str):
        lines += _overlap(keys, a, b, every, cvs)
    return lines


def _overlap(keys: tuple[str, str], a: str, b: str, states: Mapping, cvs: Mapping) -> list[str]:
    """ΔF between two states needs them disjoint: refuse states that share no CV on which
    their ranges are disjoint (they would fail the ΔF after training)."""
    from bgflow_mini.cv import states_disjoint

    sa, sb = states[a], states[b]
    if not (isinstance(sa, Mapping) and isinstance(sb, Mapping)):
        return []
    try:
        if states_disjoint(sa, sb, cvs):
            return []
    except (TypeError, ValueError, IndexError):  # malformed ranges: reported elsewhere
        return []
    return [
        f"{keys[0]}={a!r}, {keys[1]}={b!r}: the states {dict(sa)} and {dict(sb)} can overlap "
        "(no CV on which both have disjoint ranges); ΔF needs disjoint states"
    ]


def _as_list(v: Any) -> list:
    return v if isinstance(v, list) else []


def _raise(lines: list[str]) -> None:
    if lines:
        raise ConfigError(lines)


def _sync_every(d: Mapping) -> list[str]:
    """Checkpoints are written from the records: their period must be a multiple."""
    tc = d.get("training") if isinstance(d.get("training"), Mapping) else {}
    k, ckpt = tc.get("sync_every"), tc.get("checkpoint_every")
    if all(isinstance(v, int) and v > 0 for v in (k, ckpt)) and ckpt % k:
        return [
            f"training.checkpoint_every={ckpt}: must be a multiple of training.sync_every={k} "
            "(checkpoints are written when the step records are read back)"
        ]
    return []


def _reference_seeds(d: Mapping, target: Any) -> list[str]:
    """``evaluation.md_reference_seeds``: distinct MD seeds other than ``md.seed``, for
    molecules (toys have exact references and no MD)."""
    seeds = _get(d, "evaluation.md_reference_seeds")
    if not seeds or not list_of(integer(0)).ok(seeds):
        return []  # empty, or reported by the rules
    key = f"evaluation.md_reference_seeds={_show(seeds)}"
    md = d.get("md")
    if getattr(target, "kind", "molecular") != "molecular" or not isinstance(md, Mapping):
        return [f"{key}: further MD runs are pooled for molecules with md settings; set []"]
    own = md.get("seed", 0)
    if own in seeds or len(set(seeds)) < len(seeds):
        return [
            f"{key}: the seeds must differ from each other and from md.seed={own} (a run "
            "pooled with itself would understate the reference's error)"
        ]
    return []


def _symmetrize(d: Mapping, target: Any) -> list[str]:
    """``symmetrize=true`` on a molecule: its side-chain flips are valid and few enough
    (toys and molecules without symmetric side chains have nothing to symmetrise)."""
    topology = getattr(target, "topology", None)
    if d.get("symmetrize") is not True or topology is None:
        return []
    from ..symmetry import MAX_FLIPS, flip_permutations

    try:
        n = len(flip_permutations(topology))
    except ValueError as err:
        return [f"symmetrize=true: {err}; set symmetrize=false"]
    if n > MAX_FLIPS:
        return [
            f"symmetrize=true: {n} symmetric side chains would need 2^{n} flow passes per "
            f"density (at most {MAX_FLIPS} flips); set symmetrize=false"
        ]
    return []


def _state_floor(d: Mapping, target: Any) -> list[str]:
    """``data.state_floor``: the target must define states that can all hold it."""
    data = d.get("data") if isinstance(d.get("data"), Mapping) else {}
    floor = data.get("state_floor")
    if target is None or not (_is_num(floor) and 0 < floor < 0.5):
        return []  # absent, or already reported by the range rule
    from bgflow_mini.pipeline import check_state_floor

    try:
        check_state_floor(floor, target.states or {}, target.name, target.cvs)
    except ValueError as err:
        return [f"data.state_floor={floor}: {err}"]
    return []


def _state_feedback(d: Mapping, target: Any) -> list[str]:
    """``training.state_feedback``: a ``_target_`` mapping with sensible numbers, periodic
    ESS estimates to feed it, and a target with named states."""
    tc = d.get("training") if isinstance(d.get("training"), Mapping) else {}
    fb = tc.get("state_feedback")
    if fb is None:
        return []
    if not isinstance(fb, Mapping) or "_target_" not in fb:
        return [f"training.state_feedback={_show(fb)}: expected null or a mapping with _target_"]
    lines = []
    bounds = {"gain": 0.0, "max_factor": 1.0, "step_max": 0.0}
    for key, low in bounds.items():
        v = fb.get(key)
        if v is not None and not (_is_num(v) and math.isfinite(v) and v > low):
            lines.append(f"training.state_feedback.{key}={_show(v)}: expected a number > {low:g}")
    for key in ("min_ess", "tolerance"):
        v = fb.get(key)
        if v is not None and not (_is_num(v) and v >= 0):
            lines.append(f"training.state_feedback.{key}={_show(v)}: expected a number >= 0")
    if not (_is_num(tc.get("ess_every")) and tc.get("ess_every") > 0):
        lines.append(
            "training.state_feedback updates at the periodic ESS estimates: set "
            "training.ess_every > 0"
        )
    if target is not None and not (getattr(target, "states", None) or {}):
        lines.append(
            f"training.state_feedback steers the flow's share of named states, but "
            f"{target.name} defines none (system.yaml: states); set it to null"
        )
    return lines


def validate_train_config(cfg: DictConfig | Mapping, target: Any = None) -> None:
    """Check a composed ``configs/train.yaml``; ``target`` (the loaded system, with
    ``name``, ``cvs`` and ``states``) also checks the evaluation states.

    Raises:
        ConfigError: every problem found, one per line.
    """
    d = _plain(cfg)
    lines = _apply(d, TRAIN) + _apply(d, OPTIONAL_TRAIN, absent_ok=True)
    lines += _cuda(d) + _phases(d) + _md(d)
    lines += _state_choice(d, ("evaluation.state_a", "evaluation.state_b"), target, {})
    lines += _symmetrize(d, target) + _reference_seeds(d, target) + _state_floor(d, target)
    if getattr(target, "kind", None) == "molecular" and not isinstance(d.get("md"), Mapping):
        lines.append(f"md={_show(d.get('md'))}: a molecule needs MD settings (md=remd or md=plain)")
    lines += _sync_every(d) + _state_feedback(d, target)
    toy = d.get("data", {}).get("toy") if isinstance(d.get("data"), Mapping) else None
    if isinstance(toy, Mapping) and all(isinstance(toy.get(k), int) for k in ("n_steps", "thin")):
        if toy["n_steps"] < toy["thin"]:
            lines.append(
                f"data.toy.n_steps={toy['n_steps']}: must be >= data.toy.thin={toy['thin']} "
                "(no sample would be kept)"
            )
    _raise(lines)


def validate_sample_config(cfg: DictConfig | Mapping) -> None:
    """Check a composed ``configs/sample.yaml``; raises :class:`ConfigError`."""
    d = _plain(cfg)
    _raise(_apply(d, SAMPLE) + _cuda(d))


def validate_free_energy_config(cfg: DictConfig | Mapping, target: Any = None) -> None:
    """Check a composed ``configs/free_energy.yaml``; ``target`` (the system) also checks
    CV and state names. Raises :class:`ConfigError`."""
    d = _plain(cfg)
    lines = _apply(d, FREE_ENERGY) + _cuda(d)
    if (d.get("samples") is None) == (d.get("checkpoint") is None):
        given = "both" if d.get("samples") is not None else "neither"
        lines.append(
            f"samples, checkpoint: {given} given; set exactly one "
            "(samples=<sample.py folder> or checkpoint=<run folder>)"
        )
    cvs = getattr(target, "cvs", None)
    if target is not None and not (cvs and getattr(target, "states", None) is not None):
        name = getattr(target, "name", "?")
        lines.append(f"system {name!r} defines no CVs or states: nothing to analyse")
        cvs = None
    extra = d.get("states") if isinstance(d.get("states"), dict) else {}
    lines += _state_problems(extra, cvs, "states")
    if cvs is not None:
        known = sorted(cvs)
        used = [(f"cvs.{i}", n) for i, n in enumerate(_as_list(d.get("cvs")))]
        pairs = enumerate(_as_list(d.get("cvs_2d")))
        used += [(f"cvs_2d.{i}.{j}", n) for i, p in pairs for j, n in enumerate(_as_list(p))]
        bad = [(k, n) for k, n in used if isinstance(n, str) and n not in cvs]
        lines += [f"{k}={n!r}: unknown CV; known CVs: {known}" for k, n in bad]
    lines += _state_choice(d, ("state_a", "state_b"), target if cvs else None, extra)
    lines += md_replica_problems(d.get("md_replicas", "auto"), "md_replicas")
    if d.get("samples") is not None and integer(1).ok(_get(d, "ais.steps")):
        lines.append("ais.steps: applies when sampling here (checkpoint=), not to samples=")
    _raise(lines)


def md_replica_problems(k: Any, key: str) -> list[str]:
    """An MD reference pooled from ``k > 1`` replicas needs pymbar (its MBAR weights)."""
    if integer(2).ok(k) and importlib.util.find_spec("pymbar") is None:
        return [
            f"{key}={k}: the MBAR weights of pooled replica frames need pymbar: "
            "pip install 'bgflow_mini[mbar]'"
        ]
    return []


def validate_run_md_config(cfg: DictConfig | Mapping) -> None:
    """Check a composed ``configs/run_md.yaml``; raises :class:`ConfigError`."""
    d = _plain(cfg)
    _raise(_apply(d, RUN_MD) + _md(d))
