"""``bgflow-system``: build a system folder (PDB + ``system.yaml``) from a sequence or a PDB.

    bgflow-system sequence=AAA solvent=obc out=my_ala3     # ACE-ALA-ALA-ALA-NME
    bgflow-system sequence=ALA-PRO termini=zwitterion out=ap
    bgflow-system pdb=input.pdb forcefield=amber14 out=my_peptide

The folder loads with ``load_system("path/to/folder")`` (or by name with the folder's parent
in ``$BGFLOW_MINI_SYSTEMS``) and works as ``system=...`` in the other commands via a
``configs/system/<name>.yaml``; see :func:`bgflow_mini.system_builder.build_system`.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import to_absolute_path
from omegaconf import DictConfig

from bgflow_mini.system_builder import SystemBuildError, build_system
from bgflow_mini.systems import load_system

from ._common import CONFIG_PATH, run_app

__all__ = ["main", "build"]


def build(cfg: DictConfig, command: str | None = None) -> Path:
    """Build the folder ``cfg.out`` from ``cfg``; prints the folder and what it holds."""
    if not cfg.out:
        raise SystemBuildError("out=...: give the folder to write (e.g. out=my_system)")
    try:
        folder = build_system(
            to_absolute_path(str(cfg.out)),
            sequence=None if cfg.sequence is None else str(cfg.sequence),
            pdb=None if cfg.pdb is None else to_absolute_path(str(cfg.pdb)),
            name=cfg.name,
            forcefield=cfg.forcefield,
            solvent=cfg.solvent,
            termini=cfg.termini,
            temperature=cfg.temperature,
            minimize=cfg.minimize,
            ph=cfg.ph,
            overwrite=cfg.overwrite,
            command=command,
        )
    except ImportError as err:  # an optional dependency (PeptideBuilder, pdbfixer) is missing
        raise SystemBuildError(str(err)) from err
    system = load_system(folder)
    print(folder)
    print(f"  {system.name}: {system.n_atoms} atoms, force field {system.forcefield}")
    print(f"  CVs: {', '.join(system.cvs) or '-'}")
    print(f"  states: {', '.join(system.states) or '-'}", flush=True)
    return folder


@hydra.main(config_path=CONFIG_PATH, config_name="build_system", version_base="1.3")
def main(cfg: DictConfig) -> None:
    overrides = HydraConfig.get().overrides.task
    command = " ".join(["bgflow-system", *(shlex.quote(o) for o in overrides)])
    run_app(lambda: build(cfg, command))


if __name__ == "__main__":
    main()
