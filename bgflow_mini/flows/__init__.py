"""Invertible flows: ``flow(z) -> (x, logdet)``, ``flow.inverse(x) -> (z, logdet)``."""

from .base import Flow, Inverse, Sequential, check_batch

__all__ = ["Flow", "Sequential", "Inverse", "check_batch"]
