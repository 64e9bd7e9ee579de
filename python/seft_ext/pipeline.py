"""The `seft` job as a pipeline of phases, callable from Python:

    prepare (or resume) -> prune -> train -> finish (evaluate) -> export

``run_job(options)`` runs the phases a command needs; the CLI (``cli.py``) only parses the
options. ``options(command, **overrides)`` builds an options object with the CLI's defaults,
e.g. ``run_job(options("run", model="path/to/hf_folder", steps=20, out="out"))``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from .config import SEFTConfig

PATTERNS = {"unstructured": ("layer", (2, 4)), "row": ("row", (2, 4)), "2:4": ("nm", (2, 4)), "4:8": ("nm", (4, 8))}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# SEFTConfig fields the driver sets from --pattern rather than from options of their own.
PATTERN_FIELDS = ("nm_n", "nm_m")
CONFIG_KEYS = tuple(f.name for f in dataclasses.fields(SEFTConfig) if f.name not in PATTERN_FIELDS)
# The options a resumed run must share with the run it continues: every SEFTConfig option and these.
RESUME_KEYS = ("model", "data", "pattern", "prune", "steps", "seq_len", "batch_size", "lr", "calib_windows",
               "dtype") + CONFIG_KEYS


@dataclass
class Job:
    """The state one run carries from phase to phase."""

    opts: object  # the parsed options (argparse.Namespace or the like)
    rank: int
    world: int
    device: torch.device
    out: Path
    say: Callable
    progress: bool
    data_rng: torch.Generator
    t_start: float = field(default_factory=time.time)
    model: object = None
    tok: object = None
    train_windows: Optional[torch.Tensor] = None
    heldout: str = ""
    config: Optional[SEFTConfig] = None
    summary: dict = field(default_factory=dict)
    resume: Optional[tuple] = None  # (checkpoint info, tensor file) when resuming
    masks: Optional[dict] = None
    train_seconds: float = 0.0

    @property
    def main_rank(self) -> bool:
        return self.rank == 0

    @property
    def trains(self) -> bool:
        return self.opts.method != "none" and self.opts.steps > 0


def options(command: str = "run", **overrides):
    """The options of ``seft COMMAND`` with their CLI defaults, then ``overrides``."""
    from .cli import _parser

    a = _parser().parse_args([command] + (["--run", overrides["run"]] if command == "export" else []))
    for k, v in overrides.items():
        if not hasattr(a, k):
            raise ValueError(f"options: seft {command} has no option {k!r}")
        setattr(a, k, v)
    return a


def run_job(a) -> dict:
    """Runs the phases of ``a.command`` (run, prune or train); returns the summary."""
    job = prepare(a)
    if job.resume is None:
        prune(job)
    if job.trains:
        train(job)
    finish(job)
    if job.main_rank:
        export(job)
    return job.summary


# ---------------------------------------------------------------------- prepare
def prepare(a) -> Job:
    """Distributed set-up, the resume check, the model, the data and the SEFT config."""
    from .data import load_text, token_windows
    from .models import load_model

    rank, world, device = init_distributed(a.device)
    progress = not a.no_progress and rank == 0
    say = (lambda *m: print("seft:", *m, flush=True)) if progress else (lambda *m: None)
    torch.manual_seed(a.seed)
    job = Job(a, rank, world, device, Path(a.out), say, progress, torch.Generator().manual_seed(a.seed))
    job.config = seft_config(a)  # refuses bad SEFT options before any work
    if a.resume:
        job.resume = _checked_resume(a, world)
    job.out.mkdir(parents=True, exist_ok=True)
    job.model, job.tok = load_model(a.model, DTYPES[a.dtype], progress)
    job.model.to(device)
    if job.tok is None:
        raise SystemExit(f"seft: --model {a.model} has no tokenizer")
    train_text, job.heldout = load_text(a.data)
    job.train_windows = token_windows(job.tok, train_text, a.seq_len)
    if job.resume is not None:
        _restore_model(job)
    return job


def seft_config(a) -> SEFTConfig:
    """The SEFTConfig the driver's options describe (the driver's methods none and
    masked-dense are fixed and seft to the layers)."""
    _, nm = PATTERNS[a.pattern]
    fields = {k: getattr(a, k) for k in CONFIG_KEYS}
    fields["method"] = {"none": "fixed", "masked-dense": "seft"}.get(a.method, a.method)
    return SEFTConfig(**fields, nm_n=nm[0], nm_m=nm[1])


def run_args(a, world: int) -> dict:
    """The options recorded with each checkpoint (and compared on resume)."""
    return {**{k: getattr(a, k) for k in RESUME_KEYS}, "world_size": world}


def _checked_resume(a, world: int) -> tuple:
    """The newest intact checkpoint of --resume, refused when the options differ from its run's."""
    from . import checkpoint

    info, tensor_file = checkpoint.latest(Path(a.resume))
    saved, now = info["meta"]["args"], run_args(a, world)
    diff = [f"--{k.replace('_', '-')} was {saved.get(k)!r}, now {now[k]!r}" for k in RESUME_KEYS
            if saved.get(k) != now[k]]
    if saved.get("world_size", 1) != world:
        diff.append(f"world size was {saved.get('world_size', 1)}, now {world}")
    if diff:
        raise ValueError("--resume with a different configuration: " + "; ".join(diff))
    return info, tensor_file


def _restore_model(job: Job) -> None:
    from . import checkpoint

    info, tensor_file = job.resume
    job.summary = info["meta"]["summary"]
    job.say(f"resuming from step {info['step']} of {job.opts.resume}")
    job.resume = (info, checkpoint.restore(info, tensor_file, job.model))
    job.model.to(job.device)
    job.train_seconds = job.summary["train_seconds"]


def init_distributed(device: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun (WORLD_SIZE > 1): a gloo process group on
    the CPU, or NCCL with each rank on cuda:LOCAL_RANK (modulo the device count).
    SEFT_DIST_BACKEND=gloo overrides the backend (gloo lets several ranks share one GPU: a test
    of the multi-rank CUDA path on one device)."""
    dev = torch.device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if dev.type == "cuda":
        if world > 1:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    if world <= 1:
        return 0, 1, dev
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = os.environ.get("SEFT_DIST_BACKEND") or ("nccl" if dev.type == "cuda" else "gloo")
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size(), dev


# ---------------------------------------------------------------------- evaluate / prune
def evaluate(model, tok, heldout: str, a) -> dict:
    """Held-out perplexity on ``heldout`` and, unless --task-items 0, WordNet accuracy."""
    from .data import load_wordnet, multiple_choice_accuracy, perplexity, token_windows

    bos = "gemma" in getattr(model.config, "model_type", "")  # Gemma needs BOS at every window
    w = token_windows(tok, heldout, a.seq_len, bos=bos)
    if a.eval_windows:
        w = w[:a.eval_windows]
    res = {"ppl": perplexity(model, w, a.batch_size)}
    if a.task_items and tok is not None:
        res["acc"] = multiple_choice_accuracy(model, tok, load_wordnet("heldout"), limit=a.task_items)
    return res


def _evaluate(job: Job) -> dict:
    return evaluate(job.model, job.tok, job.heldout, job.opts)


def prune(job: Job) -> None:
    """Evaluate the dense model, prune it (or take its own zeros), evaluate the pruned one."""
    from .prune_llm import existing_masks, prune_model

    a = job.opts
    job.summary = {"model": a.model, "data": a.data, "method": a.method, "prune": a.prune, "pattern": a.pattern,
                   "budget": a.budget, "sparsity_target": a.sparsity, "steps": a.steps, "seq_len": a.seq_len,
                   "batch_size": a.batch_size, "lr": a.lr, "seed": a.seed, "threads": torch.get_num_threads()}
    job.say("evaluating the dense model")
    dense = _evaluate(job)
    job.summary.update(ppl_dense=dense["ppl"], acc_dense=dense.get("acc"))
    calib = job.train_windows[torch.randperm(job.train_windows.shape[0], generator=job.data_rng)[:a.calib_windows]]
    if a.prune == "existing":
        job.masks = existing_masks(job.model)
    else:
        job.say(f"pruning with {a.prune} to {a.sparsity:.0%} ({a.pattern})")
        batches = [calib[i:i + a.batch_size].to(job.device) for i in range(0, calib.shape[0], a.batch_size)]
        budget, nm = PATTERNS[a.pattern]
        job.masks = prune_model(job.model, a.prune, a.sparsity, budget, nm, calibration=batches,
                                progress=job.progress)
    pruned = _evaluate(job)
    job.summary.update(ppl_pruned=pruned["ppl"], acc_pruned=pruned.get("acc"), topology_changes=0,
                       train_seconds=0.0)


# ---------------------------------------------------------------------- train
def train(job: Job) -> None:
    """Convert (unless resumed), then the training loop with evolution, logging and checkpoints."""
    from .training import TrainLoop

    TrainLoop(job).run()


# ---------------------------------------------------------------------- finish / export
def finish(job: Job) -> None:
    """The final evaluation and the summary's closing fields."""
    from .convert import model_sparsity

    pruned_only = not job.trains and "ppl_pruned" in job.summary  # nothing changed since
    final = {"ppl": job.summary["ppl_pruned"], "acc": job.summary.get("acc_pruned")} if pruned_only else _evaluate(job)
    dev = job.device
    job.summary.update(ppl_final=final["ppl"], acc_final=final.get("acc"), sparsity_final=model_sparsity(job.model),
                       train_seconds=round(job.train_seconds, 2), total_seconds=round(time.time() - job.t_start, 2),
                       peak_memory_bytes=torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else peak_rss(),
                       device=str(dev), world_size=job.world)


def export(job: Job) -> None:
    """DIR/sparse.safetensors, DIR/dense (a plain HF folder) and DIR/summary.json (rank 0)."""
    from .convert import seft_layers
    from .hf import export_dense, export_sparse

    if not job.opts.no_export:
        if seft_layers(job.model):
            export_sparse(job.model, job.out / "sparse.safetensors")
        export_dense(job.model, job.tok, job.out / "dense")
    tmp = job.out / "summary.json.tmp"
    tmp.write_text(json.dumps(job.summary, indent=2) + "\n")
    os.replace(tmp, job.out / "summary.json")


def peak_rss() -> int:
    try:
        import resource
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except (ImportError, OSError):  # pragma: no cover
        return -1
