"""Training records that stay on the device until they are read back together.

Reading a number from a CUDA tensor (``float(t)``, ``.item()``, ``bool(t)``) waits for
every queued kernel: one such read per step keeps the GPU idle while the host prepares
the next step. The :class:`~bgflow_mini.training.Trainer` therefore keeps a step's
losses, counts and flags as 0-d tensors in its record and converts the records of many
steps at once with :func:`read_back`: one transfer per device for all of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["read_back"]


def read_back(records: Sequence[dict]) -> None:
    """Replace every 0-d tensor value in ``records`` (in place) by a Python number.

    Boolean tensors become ``bool``, integer ones ``int``, floating ones ``float``. The
    values of one device are stacked (as float64, exact for integers below 2^53) and read
    in one transfer. Non-tensor values are left as they are.

    Raises:
        ValueError: a tensor value is not 0-d (a record holds scalars only).
    """
    by_device: dict[torch.device, list[tuple[dict, str, Tensor]]] = {}
    for rec in records:
        for key, val in rec.items():
            if isinstance(val, Tensor):
                if val.ndim != 0:
                    raise ValueError(f"record value {key!r} has shape {tuple(val.shape)}, not ()")
                by_device.setdefault(val.device, []).append((rec, key, val))
    for entries in by_device.values():
        stacked = torch.stack([v.detach().to(torch.float64) for _, _, v in entries])
        for (rec, key, val), num in zip(entries, stacked.tolist(), strict=True):
            if val.dtype == torch.bool:
                rec[key] = bool(num)
            elif val.dtype.is_floating_point:
                rec[key] = float(num)
            else:
                rec[key] = int(num)
