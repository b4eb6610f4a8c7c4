"""Device-to-host copies: storages that live on an accelerator, copied into the host buffer."""

from __future__ import annotations

from typing import Any

import torch

from .plan import StatePlan

__all__ = ["start_device_copies"]


def start_device_copies(plan: StatePlan, buffer: Any, non_blocking: bool) -> list:
    """Starts copying every non-CPU storage of ``plan`` into ``buffer``; returns objects with a
    ``synchronize()`` method to wait on (empty when the copies are already complete)."""
    for storage in plan.device_storages:
        if not storage.nbytes:
            continue
        target = torch.frombuffer(buffer, dtype=torch.uint8, count=storage.nbytes, offset=storage.offset)
        source = torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage.storage)
        target.copy_(source, non_blocking=False)
    return []
