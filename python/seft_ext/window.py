"""The evolution window of one layer: what it gathers between two evolution steps.

The controller opens a window (:meth:`EvolutionWindow.open`) with a :class:`ScanPlan` for the
optimizer steps whose backward passes feed the next evolution step. In each such backward
the layer hands ``(X, dY)`` to :meth:`EvolutionWindow.accumulate`: the first pass scans the
streamed gradient for candidates (``ops.csr_grow_scan``), every pass adds G at them with one
``csr_sddmm`` that also yields the delta's gradient. With a process group, the ranks agree on
finiteness and track the union of their candidates (see ``distributed.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from . import ops


@dataclass(frozen=True)
class ScanPlan:
    """How the window's first pass scans (see ``ops.csr_grow_scan``)."""

    num_grow: int  # grow candidates to track
    num_prune: int  # prune candidates to track (0 when nothing inactive can grow)
    sketch: int  # CountSketch rows for the scan's GEMM (0: exact)
    seed: int  # the sketch's seed


class EvolutionWindow:
    """The statistics one layer gathers over an evolution window, and whether it gathers.

    ``tracked``: sorted flat positions outside the delta; ``crow`` / ``col``: the CSR pattern
    of the delta positions and the tracked ones together, so that one ``csr_sddmm`` per
    backward gives the delta's gradient and the window's statistics (``at_delta`` /
    ``at_tracked``: where each lands in it); ``gsum`` / ``g2sum``: sums of g and g^2 at the
    tracked positions over backward passes (``count``); ``steps``: optimizer steps covered;
    ``scan_bytes``: the scan's engine-reported peak workspace. ``plan`` is None while the
    window is closed; ``group`` is the process group the statistics are shared over.
    """

    FIELDS = ("tracked", "crow", "col", "at_delta", "at_tracked", "gsum", "g2sum")

    def __init__(self) -> None:
        self.plan: Optional[ScanPlan] = None
        self.group = None
        self.reset()

    def reset(self) -> None:
        """Forget the statistics (the plan and group stay)."""
        self.tracked: Optional[Tensor] = None
        self.crow = self.col = self.at_delta = self.at_tracked = self.gsum = self.g2sum = None
        self.count = 0
        self.steps = 0
        self.finite = True
        self.scan_bytes = 0

    # ------------------------------------------------------------------ the controller's side
    def open(self, plan: ScanPlan) -> None:
        self.plan = plan

    def close(self) -> None:
        self.plan = None

    @property
    def collecting(self) -> bool:
        """True while the backward passes feed this window."""
        return self.plan is not None

    @property
    def started(self) -> bool:
        return self.tracked is not None or not self.finite

    def count_step(self) -> None:
        """One more optimizer step covered (called after each optimizer step)."""
        if self.collecting and self.started:
            self.steps += 1

    # ------------------------------------------------------------------ the layer's side
    def accumulate(self, layer, x2: Tensor, dy2: Tensor) -> Tensor:
        """Add one backward pass (X (T, in), dY (T, out)) of ``layer``; returns the delta's
        gradient. The first pass of a window scans for the tracked positions."""
        if self.tracked is None and not self._scan(layer, x2, dy2):
            return self._sddmm(layer, dy2, x2, layer.crow, layer.col, layer.delta_slots)
        g = self._sddmm(layer, dy2, x2, self.crow, self.col, None)
        gt = g[self.at_tracked]
        self.gsum += gt
        self.g2sum += gt * gt
        self.count += 1
        return g[self.at_delta]

    # The three steps a block layer's window (seft_block.py) does its own way.
    @staticmethod
    def _sddmm(layer, dy2: Tensor, x2: Tensor, crow: Tensor, col: Tensor, slots: Optional[Tensor]) -> Tensor:
        return ops.csr_sddmm(dy2, x2, crow, col, slots)

    def _candidates(self, layer, x2: Tensor, dy2: Tensor) -> tuple[Tensor, int, bool]:
        """(tracked positions, the scan's peak bytes, finite) of the first pass."""
        p = self.plan
        tracked, _, nbytes, finite = ops.csr_grow_scan(
            dy2, x2, layer.crow, layer.col, layer.theta, layer.delta_slots, p.num_grow, p.num_prune, layer.budget,
            layer.nm_n, layer.nm_m, layer.grow_inactive, p.sketch, p.seed)
        return tracked, int(nbytes), bool(finite)

    @staticmethod
    def _width(layer) -> int:
        """Columns of the grid positions live on (position = row * width + column)."""
        return layer.in_features

    def _scan(self, layer, x2: Tensor, dy2: Tensor) -> bool:
        """Pick the tracked positions; False (and the window marked non-finite) on NaN / Inf."""
        tracked, nbytes, finite = self._candidates(layer, x2, dy2)
        self.scan_bytes = max(self.scan_bytes, nbytes)
        if self.group is not None:  # every rank tracks the same positions
            from . import distributed

            finite = distributed.all_agree(finite, self.group)
            if finite:
                tracked = distributed.union_positions(tracked, self.group)
        if not finite:
            self.finite = False
            return False
        self.crow, self.col, self.at_delta, self.at_tracked = ops.csr_slot_union(
            layer.crow, layer.col, layer.delta_slots, tracked, self._width(layer))
        self.tracked = tracked
        # one sum per tracked position (per tracked block: r x c, the delta's entry shape)
        self.gsum = torch.zeros((tracked.numel(), *layer.delta.shape[1:]), dtype=layer.delta.dtype,
                                device=tracked.device)
        self.g2sum = torch.zeros_like(self.gsum)
        return True

    # ------------------------------------------------------------------ reporting / state
    def nbytes(self) -> int:
        """Bytes held between backward passes."""
        return sum(t.numel() * t.element_size() for t in (getattr(self, f) for f in self.FIELDS) if t is not None)

    def state_dict(self) -> dict:
        d = {f: None if getattr(self, f) is None else getattr(self, f).clone() for f in self.FIELDS}
        d.update(count=self.count, steps=self.steps, finite=self.finite, scan_bytes=self.scan_bytes)
        return d

    def load_state_dict(self, d: dict) -> None:
        self.reset()
        for f in self.FIELDS:
            setattr(self, f, None if d[f] is None else d[f].clone())
        self.count, self.steps, self.finite, self.scan_bytes = d["count"], d["steps"], d["finite"], d["scan_bytes"]
