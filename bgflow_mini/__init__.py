"""bgflow_mini: Boltzmann generators with normalizing flows, OpenMM energies and reweighting."""

__version__ = "0.1.0"
