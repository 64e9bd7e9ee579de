"""SEFTConfig: every knob of sparsity evolution fine-tuning, with its help text."""
from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field, fields
from typing import Optional

SCHEDULES = ("cosine", "linear", "constant")
BUDGETS = ("layer", "row", "nm")
METHODS = ("seft", "spiel", "fixed")
# The driver's --method adds three: masked-dense (the SEFT steps with dense compute), lora (the
# PEFT LoRA baseline of the same trainable budget) and none.
DRIVER_METHODS = METHODS + ("masked-dense", "lora", "none")
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
_KIND_NAMES = {"int": "an int", "float": "a real number", "str": "a string", "bool": "a bool"}


def _help(text: str, default):
    return field(default=default, metadata={"help": text})


@dataclass
class SEFTConfig:
    """Configuration of SEFT (see ``SEFTConfig.help()`` for every field)."""

    sparsity: float = _help("Target fraction of zero weights in each converted layer, in [0, 1).", 0.5)
    k: Optional[int] = _help("Trainable delta entries per layer. None: use `density`, or else the "
                             "LoRA-equivalent budget lora_rank * (in + out).", None)
    density: Optional[float] = _help("Trainable delta entries as a fraction of out * in (used when k is None).",
                                     None)
    lora_rank: int = _help("Rank of the LoRA whose parameter count sets the default k.", 8)
    update_interval: int = _help("Optimizer steps between two evolution steps.", 10)
    grow_accumulation: int = _help("Optimizer steps whose gradients form the window statistics "
                                   "before each evolution step (capped at update_interval).", 5)
    drop_fraction: float = _help("p0: fraction of the delta dropped and regrown at the first evolution step.",
                                 0.2)
    schedule: str = _help("How the drop fraction decays: cosine, linear or constant.", "cosine")
    evolve_until: float = _help("Fraction of total_steps after which the topology is frozen.", 0.75)
    budget: str = _help("Non-zero budget scope: layer (default), row (each output row) or nm "
                        "(each group of nm_m inputs keeps nm_n non-zeros).", "layer")
    nm_n: int = _help("N of N:M (budget='nm').", 2)
    nm_m: int = _help("M of N:M (budget='nm').", 4)
    seed_optimizer: bool = _help("Seed AdamW moments of grown slots from the window's mean g and mean g^2 "
                                 "(bias-corrected); False: zero them.", True)
    method: str = _help("seft: grow anywhere, pruned positions may come back; spiel: grow only on active "
                        "positions; fixed: never evolve.", "seft")
    candidate_factor: float = _help("Tracked grow (and prune) candidates per dropped entry during a window.",
                                    2.0)
    scan_sketch: int = _help("Tokens the window's candidate scan sketches X and dY down to (CountSketch) "
                             "before its dense-gradient GEMM; 0: the exact gradient. Candidates' statistics are "
                             "always exact.", 64)
    seed: int = _help("Seed for the initial delta positions and the scan's sketch.", 0)
    block: Optional[tuple] = _help("(r, c): weights in r x c blocks (BSR) and SEFT with a block as the unit "
                                   "(k, density and lora_rank still count entries: the delta holds "
                                   "max(1, round(k / (r c))) whole blocks); budget layer or row (per block row). "
                                   "None: unstructured (CSR).", None)

    def __post_init__(self) -> None:
        self._check_types()

        def bad(msg):
            raise ValueError(f"SEFTConfig: {msg}")

        if not (0.0 <= self.sparsity < 1.0):
            bad(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.k is not None and self.k < 1:
            bad(f"k must be a positive int or None, got {self.k}")
        if self.density is not None and not (0.0 < self.density <= 1.0):
            bad(f"density must be in (0, 1] or None, got {self.density}")
        for name in ("lora_rank", "update_interval", "grow_accumulation", "nm_n", "nm_m"):
            if getattr(self, name) < 1:
                bad(f"{name} must be a positive int, got {getattr(self, name)}")
        if not (0.0 <= self.drop_fraction <= 1.0):
            bad(f"drop_fraction must be in [0, 1], got {self.drop_fraction}")
        if self.schedule not in SCHEDULES:
            bad(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not (0.0 <= self.evolve_until <= 1.0):
            bad(f"evolve_until must be in [0, 1], got {self.evolve_until}")
        if self.budget not in BUDGETS:
            bad(f"budget must be one of {BUDGETS}, got {self.budget!r}")
        if self.budget == "nm" and not (1 <= self.nm_n <= self.nm_m):
            bad(f"N:M needs 1 <= nm_n <= nm_m, got {self.nm_n}:{self.nm_m}")
        if self.method not in METHODS:
            bad(f"method must be one of {METHODS}, got {self.method!r}")
        if self.scan_sketch < 0:
            bad(f"scan_sketch must be an int >= 0, got {self.scan_sketch}")
        if not (self.candidate_factor >= 1.0):
            bad(f"candidate_factor must be >= 1, got {self.candidate_factor}")
        if not (INT64_MIN <= self.seed <= INT64_MAX):
            bad(f"seed must fit in int64, got {self.seed}")
        self._check_block(bad)

    def _check_block(self, bad) -> None:
        """block: None or two ints >= 1 (a list, as read back from JSON, becomes a tuple)."""
        if self.block is None:
            return
        b = self.block
        if not (isinstance(b, (tuple, list)) and len(b) == 2
                and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in b)):
            raise TypeError(f"SEFTConfig: block must be None or a (r, c) tuple of two ints, got {b!r}")
        if b[0] < 1 or b[1] < 1:
            bad(f"block must be (r, c) with r, c >= 1, got {tuple(b)}")
        self.block = (int(b[0]), int(b[1]))
        if self.budget == "nm":
            bad("block: the N:M budget ('nm') does not apply to blocks; use budget 'layer' or 'row' (per block row)")

    def _check_types(self) -> None:
        """Each field holds its annotated kind: ints (never bools), finite reals, strings, bools;
        ``Optional[...]`` fields may also be None."""
        for f in fields(self):
            v, kind = getattr(self, f.name), str(f.type)
            if kind.startswith("Optional["):
                if v is None:
                    continue
                kind = kind[len("Optional["):-1]
            ok = {"int": isinstance(v, numbers.Integral) and not isinstance(v, bool),
                  "float": isinstance(v, numbers.Real) and not isinstance(v, bool),
                  "str": isinstance(v, str), "bool": isinstance(v, bool)}.get(kind, True)
            if not ok:
                raise TypeError(f"SEFTConfig: {f.name} must be {_KIND_NAMES[kind]}, got {type(v).__name__} {v!r}")
            if kind == "float" and not math.isfinite(v):
                raise ValueError(f"SEFTConfig: {f.name} must be finite, got {v}")
            if kind in ("int", "float") and type(v) not in (int, float):  # e.g. numpy scalars
                setattr(self, f.name, int(v) if kind == "int" else float(v))

    @property
    def window_steps(self) -> int:
        """Optimizer steps of statistics before each evolution step."""
        return min(self.grow_accumulation, self.update_interval)

    def trainable_for(self, out_features: int, in_features: int) -> int:
        """k for a layer of shape (out, in)."""
        if self.k is not None:
            return self.k
        if self.density is not None:
            return max(1, round(self.density * out_features * in_features))
        return self.lora_rank * (in_features + out_features)

    def drop_fraction_at(self, step: int, total_steps: int) -> float:
        """p_t of the schedule at optimizer step `step` (1-based)."""
        end = self.evolve_until * total_steps
        if end <= 0 or step > end:
            return 0.0
        frac = step / end
        if self.schedule == "cosine":
            return self.drop_fraction * (1.0 + math.cos(math.pi * frac)) / 2.0
        if self.schedule == "linear":
            return self.drop_fraction * (1.0 - frac)
        return self.drop_fraction

    def trainable_blocks_for(self, out_features: int, in_features: int) -> int:
        """The delta's block count for a layer of shape (out, in) when ``block`` is set."""
        r, c = self.block
        return max(1, round(self.trainable_for(out_features, in_features) / (r * c)))

    def to_dict(self) -> dict:
        """The fields as plain JSON values (block as a list), equal to their JSON round trip."""
        d = asdict(self)
        if d["block"] is not None:
            d["block"] = list(d["block"])
        return d

    @classmethod
    def help(cls) -> str:
        """One line per field: name, default, help."""
        return "\n".join(f"{f.name} (default {f.default!r}): {f.metadata['help']}" for f in fields(cls))
