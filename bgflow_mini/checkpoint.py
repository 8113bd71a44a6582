"""Self-describing checkpoints: everything needed to rebuild a generator, no config file.

A generator built by :meth:`~bgflow_mini.targets.Target.generator` carries a ``spec``
(plain data): the Z-matrix and torsion masks of its internal coordinates, the flow's
constructor (a dotted path and keyword arguments), the target (name, folder,
fingerprint, or a toy's class and arguments), the dtype and the package version. The
normalisation constants are buffers of the model, so ``spec`` + ``state_dict`` are the
whole model. Files are written atomically and read with ``weights_only=True``.

    >>> save_generator(generator, "model.pt")
    >>> g = load_generator("model.pt")            # no Hydra, no config.yaml
    >>> g = load_generator("RUN", weights="ema")  # the training checkpoint's final average

A training checkpoint (``checkpoints/latest.pt``) also holds the weights a run did not
select: ``weights="ema"`` (the final exponential moving average), ``"best_ess"`` (the
snapshot with the best periodic ESS estimate) or ``"last"`` (the last step's), so the
choice of ``training.select`` can be compared or changed after training.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .fileio import load_torch, save_torch
from .generator import BoltzmannGenerator

__all__ = [
    "FORMAT",
    "flow_spec",
    "full_spec",
    "build_generator",
    "generator_state",
    "save_generator",
    "find_checkpoint",
    "read_checkpoint",
    "load_generator",
    "WEIGHTS",
    "resolve_device",
    "resolve_dtype",
]

FORMAT = 1
WEIGHTS = ("saved", "ema", "best_ess", "last")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; otherwise ``torch.device(name)``."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name} requested but no CUDA device is visible")
    return dev


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    """``float32`` / ``float64`` (or a torch dtype) as a torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def _plain(value: Any) -> Any:
    """Containers (also omegaconf's) as lists/dicts of plain values; else ValueError."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence):
        return [_plain(v) for v in value]
    raise ValueError(f"{value!r} is not plain data")


def flow_spec(factory: Callable) -> dict[str, Any] | None:
    """``{"target": dotted path, "kwargs": {...}}`` of a flow factory, or None.

    Works for ``functools.partial`` of an importable function with plain keyword
    arguments (what ``hydra.utils.instantiate`` of ``configs/flow/*.yaml`` gives);
    anything else cannot be rebuilt from a checkpoint and gives None.
    """
    func, kwargs = factory, {}
    if isinstance(factory, functools.partial):
        if factory.args:
            return None
        func, kwargs = factory.func, dict(factory.keywords)
    module, name = getattr(func, "__module__", None), getattr(func, "__qualname__", "")
    if module is None or "<" in name:
        return None
    try:
        return {"target": f"{module}.{name}", "kwargs": _plain(kwargs)}
    except ValueError:
        return None


def _flow_factory(spec: Mapping[str, Any]) -> Callable:
    from .targets import import_object

    flow = spec.get("flow")
    if not flow:
        raise ValueError(
            "this checkpoint's flow was built by a factory that cannot be serialised (not a "
            "functools.partial of an importable function with plain arguments); rebuild the "
            "generator in code and load its 'model' state dict"
        )
    return functools.partial(import_object(flow["target"]), **flow["kwargs"])


def build_generator(spec: Mapping[str, Any]) -> BoltzmannGenerator:
    """An untrained generator with the architecture described by ``spec`` (float64)."""
    from .coordinates import CircularShift, InternalCoordinates, Standardize
    from .coordinates.normalization import ICTransform
    from .distributions import DiagonalNormal, NormalUniform
    from .flows import Sequential

    factory = _flow_factory(spec)
    dim = int(spec["dim"])
    if spec["kind"] == "molecular":
        circular = torch.as_tensor(spec["circular"], dtype=torch.bool)
        internal = InternalCoordinates(spec["zmatrix"], spec.get("cartesian"))
        zeros = torch.zeros(dim, dtype=torch.float64)
        whiten = None
        if internal.cartesian.any():
            from .coordinates.whitening import Whiten, cartesian_blocks

            idx = [i for b in cartesian_blocks(internal) for i in b]
            whiten = Whiten(dim, idx, torch.eye(len(idx), dtype=torch.float64))  # from state
        standardize = Standardize(zeros, torch.ones_like(zeros), ~circular)
        shift = CircularShift(zeros, internal.circular)
        domain = None
        if spec.get("bounded_ics"):
            from .coordinates.domain import DomainMap
            from .coordinates.normalization import angle_mask, bond_mask

            domain = DomainMap(dim, bond_mask(internal), angle_mask(internal))
        box = None
        if spec.get("bounded_ics") == "box":
            from .coordinates.domain import SoftBox

            idx = (~circular).nonzero().squeeze(1)
            box = SoftBox(dim, idx, torch.ones(len(idx), dtype=torch.float64))  # from state
        ic = ICTransform(standardize, shift, internal, domain, whiten, box)
        flow = Sequential(factory(dim=dim, circular=circular), ic)
        gen = BoltzmannGenerator(NormalUniform(dim, circular), flow)
    elif spec["kind"] == "toy":
        zeros = torch.zeros(dim, dtype=torch.float64)
        prior = DiagonalNormal(dim, loc=zeros, scale=torch.ones_like(zeros), learnable=True)
        gen = BoltzmannGenerator(prior, factory(dim=dim))
    else:
        raise ValueError(f"unknown generator kind {spec['kind']!r}")
    gen.spec = dict(spec)
    if spec.get("symmetries"):
        from .symmetry import SymmetrizedGenerator

        gen = SymmetrizedGenerator(gen, spec["symmetries"])
    return gen.double()


def full_spec(generator: BoltzmannGenerator) -> dict[str, Any]:
    """The generator's ``spec`` with its dtype and the package version (``{}`` if the
    generator was not built by a target or the pipeline)."""
    import bgflow_mini

    spec = getattr(generator, "spec", None)
    if not spec:
        return {}
    p = next(generator.parameters())
    dtype = str(p.dtype).replace("torch.", "")
    return {**spec, "dtype": dtype, "version": bgflow_mini.__version__, "format": FORMAT}


def generator_state(generator: BoltzmannGenerator) -> dict[str, Any]:
    """``{"format", "spec", "model"}`` of a generator (``spec`` with its dtype)."""
    spec = full_spec(generator)
    if not spec:
        raise ValueError(
            "this generator has no .spec (it was not built by a Target or the pipeline); "
            "save its state_dict() instead"
        )
    return {"format": FORMAT, "spec": spec, "model": generator.state_dict()}


def save_generator(
    generator: BoltzmannGenerator, path: str | os.PathLike, extra: Mapping | None = None
) -> Path:
    """Write ``model.pt`` (spec + weights + ``extra``) atomically."""
    state = generator_state(generator)
    state["extra"] = _plain(dict(extra or {}))
    return save_torch(state, path)


def find_checkpoint(path: str | os.PathLike, weights: str = "saved") -> Path:
    """The weights file of a run folder or ``path`` itself when it is a file.

    ``weights="saved"``: the folder's ``model.pt``, else ``checkpoints/latest.pt``, else
    ``checkpoints/best.pt``. Any other choice of :data:`WEIGHTS` needs the training
    checkpoint: the folder's ``checkpoints/latest.pt``.
    """
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {list(WEIGHTS)}, got {weights!r}")
    p = Path(path).expanduser().resolve()
    if p.is_dir():
        names = ("model.pt", "checkpoints/latest.pt", "checkpoints/best.pt")
        if weights != "saved":
            names = ("checkpoints/latest.pt",)
        for name in names:
            if (p / name).is_file():
                return p / name
        if weights != "saved":
            raise FileNotFoundError(
                f"weights={weights!r} reads the training checkpoint {p / names[0]}, which "
                "does not exist (a run folder keeps it unless it was deleted)"
            )
        raise FileNotFoundError(f"{p} holds no model.pt or checkpoints/*.pt: not a run folder")
    if not p.is_file():
        raise FileNotFoundError(f"no run folder or checkpoint at {p}")
    return p


def _alternative(path: Path) -> Path | None:
    """The file to suggest when ``path`` is unreadable: ``best.pt`` beside ``latest.pt``,
    ``checkpoints/best.pt`` beside ``model.pt``; None otherwise."""
    if path.name == "latest.pt":
        return path.with_name("best.pt")
    if path.name == "model.pt":
        return path.parent / "checkpoints" / "best.pt"
    return None


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A ``model.pt`` or training checkpoint as ``{"spec", "model", "extra", ...}``.

    Raises ``ValueError`` naming the file for unreadable files (offering ``best.pt``
    beside a broken ``latest.pt``) and for files without a ``spec`` (older formats).
    """
    path = find_checkpoint(path)
    state = load_torch(path, alternative=_alternative(path))
    if not isinstance(state, Mapping) or "model" not in state:
        raise ValueError(f"{path} is not a bgflow_mini model or training checkpoint")
    if not state.get("spec"):
        raise ValueError(
            f"{path} has no generator spec: it was written by bgflow_mini < 0.2 and cannot "
            "be rebuilt without its code; retrain, or rebuild the generator by hand and "
            "load_state_dict(state['model'])"
        )
    return dict(state)


def load_generator(
    path: str | os.PathLike,
    target: Any = None,
    energy: Callable | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    weights: str = "saved",
) -> BoltzmannGenerator:
    """Rebuild a trained generator from a checkpoint alone (eval mode).

    Arguments:
        path: ``model.pt``, a training checkpoint, or a run folder.
        target: optional :class:`~bgflow_mini.targets.Target` (or system / toy energy)
            the model is meant for; its fingerprint must match the checkpoint's.
        energy: attached as the generator's target energy (None: no energy).
        device, dtype: where the model lives (``dtype=None``: the dtype it was saved in).
        weights: ``"saved"`` (the file's weights: a ``model.pt`` holds those the run
            selected, a training checkpoint its last step's), or from a training checkpoint
            ``"ema"`` (the final average), ``"best_ess"`` (the best-estimate snapshot) or
            ``"last"``; with a run folder these read ``checkpoints/latest.pt``.
    """
    path = find_checkpoint(path, weights)
    state = read_checkpoint(path)
    source = _training_weights(state, weights, path)
    spec = state["spec"]
    if target is not None:
        from .targets import as_target

        target = as_target(target)
        want = (spec.get("target") or {}).get("fingerprint")
        if want and target.fingerprint() != want:
            raise ValueError(
                f"checkpoint {path} was trained on {spec['target'].get('name')!r} (fingerprint "
                f"{want}), not on this {target.name!r} ({target.fingerprint()})"
            )
    gen = build_generator(spec)
    try:
        gen.load_state_dict(state["model"])
    except RuntimeError as err:
        raise ValueError(
            f"checkpoint {path} does not match the generator its spec describes: "
            f"{str(err).splitlines()[0]}"
        ) from err
    if source is not None:
        _copy_parameters(gen, source, path, weights)
    gen.energy = energy  # before .to(): a torch energy moves with the model
    gen = gen.to(device=resolve_device(device), dtype=resolve_dtype(dtype or spec["dtype"]))
    return gen.eval()


def _training_weights(state: Mapping, weights: str, path: Path) -> list | None:
    """The parameter list that ``weights`` names in a training checkpoint's ``state``
    (None: the state's own ``model`` weights). Raises ``ValueError`` saying why not."""
    if weights == "saved":
        return None
    if "optimizer" not in state:
        raise ValueError(
            f"{path} is a model file with the weights the run selected only; "
            f"weights={weights!r} needs the training checkpoint (the run folder or its "
            "checkpoints/latest.pt)"
        )
    if weights == "last":
        return None
    if weights == "ema":
        if state.get("ema") is None:
            raise ValueError(f"{path} holds no EMA: the run trained with ema_decay=null")
        return list(state["ema"])
    best = state.get("best") or {}
    if best.get("params") is None:
        raise ValueError(
            f"{path} holds no best-ESS snapshot: no periodic ESS estimate ran "
            "(training.ess_every=0, or the run stopped before the first one)"
        )
    return list(best["params"])


@torch.no_grad()
def _copy_parameters(gen: torch.nn.Module, source: list, path: Path, weights: str) -> None:
    """Copy ``source`` (one tensor per parameter, in ``parameters()`` order) into ``gen``."""
    params = list(gen.parameters())
    shapes = [tuple(p.shape) for p in params] == [tuple(t.shape) for t in source]
    if len(params) != len(source) or not shapes:
        raise ValueError(
            f"{path}: the {weights!r} weights ({len(source)} tensors) do not match the "
            f"generator's {len(params)} parameters"
        )
    for p, t in zip(params, source, strict=True):
        p.copy_(t)
