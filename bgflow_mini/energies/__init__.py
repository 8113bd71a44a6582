"""Energies returning reduced energies u/kT of shape ``(batch,)``."""

from .base import Energy

__all__ = ["Energy"]
