"""Opacus's DP optimizer as DP-SGD on a node uses it (``client.dp.DpSgd``), in a module of its own: it subclasses an
Opacus class, so importing it imports Opacus, which only a node that trains with DP-SGD should pay for."""

from __future__ import annotations

from typing import Any

import torch
from opacus.optimizers import DPOptimizer


class PoissonDPOptimizer(DPOptimizer):
    """Opacus's DPOptimizer taking a step on an empty batch too, which Poisson sampling draws now and then:
    the step adds noise only, as the accountant assumes every step does."""

    def pre_step(self, closure: Any = None) -> bool | None:
        """Give every parameter an empty per-example gradient when the batch is empty, then Opacus's step."""
        for p in self.params:
            if getattr(p, "grad_sample", None) is None:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        return super().pre_step(closure)  # type: ignore[no-any-return]
