"""Shared test settings: one torch thread (the CI machine has 2 cores and OpenMM workers)."""

from __future__ import annotations

import torch

torch.set_num_threads(1)
