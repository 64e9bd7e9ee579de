"""The `seft` job as a pipeline of phases, callable from Python:

    prepare (or resume) -> prune -> train -> finish (evaluate) -> export

``run_job(options)`` runs the phases a command needs; the CLI (``cli.py``) only parses the
options. ``options(command, **overrides)`` builds an options object with the CLI's defaults,
e.g. ``run_job(options("run", model="path/to/hf_folder", steps=20, out="out"))``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from ._memory import cpu_cache_on, new_phase
from .config import SEFTConfig

PATTERNS = {"unstructured": ("layer", (2, 4)), "row": ("row", (2, 4)), "2:4": ("nm", (2, 4)), "4:8": ("nm", (4, 8))}
PATTERN_HELP = ("pruning pattern: unstructured (per layer), row (per output row), 2:4, 4:8, or block:RxC (whole "
                "R x C blocks kept per block row, for example block:8x8)")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# SEFTConfig fields the driver sets from --pattern rather than from options of their own.
PATTERN_FIELDS = ("nm_n", "nm_m", "block")
CONFIG_KEYS = tuple(f.name for f in dataclasses.fields(SEFTConfig) if f.name not in PATTERN_FIELDS)
# The options a resumed run must share with the run it continues: every SEFTConfig option and these;
# and the contents behind two of them.
RESUME_KEYS = ("model", "data", "val_items", "pattern", "prune", "steps", "seq_len", "batch_size", "lr",
               "calib_windows", "dtype") + CONFIG_KEYS
RESUME_DEFAULTS = {"val_items": 0}  # for checkpoints written before the option existed
CONTENT_KEYS = {"model_sha256": "--model weights", "data_sha256": "--data files"}


class UsageError(ValueError):
    """An option, or a combination of options, that cannot work; the message names it."""


class JobError(RuntimeError):
    """A failure during the job, explained in one line."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, taken after the training step ``step`` finished."""

    def __init__(self, step: int):
        super().__init__(step)
        self.step = step


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
    train_windows: Optional[torch.Tensor] = None  # windows of text: what pruning calibrates on
    train_data: object = None  # data.TextBatches or data.TaskBatches: what trains
    evals: object = None  # data.EvalSets: what each evaluation scores
    config: Optional[SEFTConfig] = None
    summary: dict = field(default_factory=dict)
    resume: Optional[tuple] = None  # resuming: (info, tensor file), then (info, tensors, tensor file)
    run_id: str = ""  # the run's identity (run_folder.py), kept in its checkpoints and DIR/run.json
    fingerprint: dict = field(default_factory=dict)  # sha256 of the model weights and data files
    masks: Optional[dict] = None  # the pruning masks, until the layers hold them (--method lora: to the end)
    peft: object = None  # --method lora: the PEFT model around ``model`` (whose linears carry the adapter)
    train_seconds: float = 0.0

    @property
    def main_rank(self) -> bool:
        return self.rank == 0

    @property
    def trains(self) -> bool:
        return self.opts.method != "none" and self.opts.steps > 0


def options(command: str = "run", **overrides):
    """The options of ``seft COMMAND`` with their CLI defaults, then ``overrides``."""
    from .cli import parser

    a = parser().parse_args([command] + (["--run", overrides["run"]] if command == "export" else []))
    for k, v in overrides.items():
        if not hasattr(a, k):
            raise ValueError(f"options: seft {command} has no option {k!r}")
        setattr(a, k, v)
    return a


def run_job(a) -> dict:
    """Runs the phases of ``a.command`` (run, prune or train); returns the summary."""
    check_options(a)
    with cpu_cache_on():  # a step's large tensors reuse the last step's pages (_memory)
        job = prepare(a)
        if job.resume is None:
            prune(job)
        if job.trains:
            train(job)
        finish(job)
        if job.main_rank:
            export(job)
    return job.summary


# ---------------------------------------------------------------------- options
def check_options(a) -> None:
    """Fill in the defaults that depend on the command and refuse what cannot work (UsageError,
    naming the option), before anything is loaded."""
    _check_common(a)
    if a.command in ("run", "prune", "train"):
        _resolve_defaults(a)
        _check_run(a)
    if a.command in ("run", "prune", "train", "export"):
        from .run_folder import check_writable

        check_writable(Path(a.out), "--out")


def pattern_spec(pattern: str) -> tuple[str, tuple[int, int], Optional[tuple[int, int]]]:
    """``--pattern`` as (pruning budget, N:M, block): block:RxC prunes whole blocks per block row."""
    if pattern in PATTERNS:
        budget, nm = PATTERNS[pattern]
        return budget, nm, None
    from .prune import parse_block_pattern

    try:
        return "row", (2, 4), parse_block_pattern(pattern)
    except ValueError:
        raise UsageError(f"--pattern must be one of {', '.join(PATTERNS)} or block:RxC (for example block:8x8), "
                         f"got {pattern!r}") from None


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise UsageError(msg)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_common(a) -> None:
    _need(_is_int(a.seq_len) and a.seq_len >= 8, f"--seq-len must be an int >= 8, got {a.seq_len}")
    _need(_is_int(a.batch_size) and a.batch_size >= 1, f"--batch-size must be an int >= 1, got {a.batch_size}")
    for opt in ("eval_windows", "task_items", "threads"):
        v = getattr(a, opt)
        _need(_is_int(v) and v >= 0, f"--{opt.replace('_', '-')} must be an int >= 0, got {v}")
    _need(_is_int(a.seed) and -(1 << 63) <= a.seed < (1 << 63), f"--seed must fit in int64, got {a.seed}")


def _resolve_defaults(a) -> None:
    if a.command == "prune":  # prune only: no training
        a.method, a.steps = "none", 0
    if a.prune is None:
        a.prune = "existing" if a.command == "train" else "wanda"
    if a.budget is None:
        a.budget = "nm" if pattern_spec(a.pattern)[0] == "nm" else "layer"


def _check_run(a) -> None:
    kind, (n, m), block = pattern_spec(a.pattern)
    _need(not (a.budget == "nm" and kind != "nm"), f"--budget nm needs an N:M --pattern (2:4 or 4:8), got {a.pattern}")
    _need(block is None or a.method != "masked-dense",
          f"--method masked-dense computes with dense weights and has no --pattern {a.pattern} form; use seft, spiel, "
          "fixed or none")
    _need(math.isfinite(a.sparsity) and 0.0 <= a.sparsity < 1.0, f"--sparsity must be in [0, 1), got {a.sparsity}")
    _need(kind != "nm" or a.prune == "existing" or a.sparsity == 1 - n / m,
          f"--pattern {a.pattern} keeps {n} of every {m} weights, a sparsity of {1 - n / m}; --sparsity "
          f"{a.sparsity} cannot apply (leave it out)")
    _need(_is_int(a.steps) and a.steps >= 0, f"--steps must be an int >= 0, got {a.steps}")
    _need(math.isfinite(a.lr) and a.lr > 0, f"--lr must be a finite number > 0, got {a.lr}")
    for opt in ("log_every", "update_interval", "lora_rank", "keep_checkpoints"):
        v = getattr(a, opt)
        _need(_is_int(v) and v >= 1, f"--{opt.replace('_', '-')} must be an int >= 1, got {v}")
    _need(_is_int(a.val_items) and a.val_items >= 0, f"--val-items must be an int >= 0, got {a.val_items}")
    _need(_is_int(a.checkpoint_every) and a.checkpoint_every >= 0,
          f"--checkpoint-every must be an int >= 0, got {a.checkpoint_every}")
    _need(_is_int(a.calib_windows) and (a.calib_windows >= 1 or a.prune not in ("wanda", "sparsegpt")),
          f"--calib-windows must be >= 1 for --prune {a.prune}, got {a.calib_windows}")
    _check_lora(a)
    if a.resume:
        _need(Path(a.resume, "checkpoints").is_dir(), f"--resume {a.resume}: no checkpoints folder there")
    try:
        seft_config(a)
    except (TypeError, ValueError) as e:  # named as the option it came from
        raise UsageError(re.sub(r"^SEFTConfig: (\w+)", lambda m: "--" + m[1].replace("_", "-"), str(e))) from None


def _check_lora(a) -> None:
    """--method lora: peft is installed; no checkpoints, so no --checkpoint-every or --resume."""
    if a.method != "lora":
        return
    _need(not a.checkpoint_every, "--checkpoint-every: --method lora writes no checkpoints (its adapter is saved "
          "at the end, in DIR/lora_adapter); leave it out")
    _need(not a.resume, f"--resume {a.resume}: --method lora writes no checkpoints, so it cannot resume a run")
    import importlib.util

    _need(importlib.util.find_spec("peft") is not None, "--method lora needs peft: pip install 'peft>=0.17'")


# ---------------------------------------------------------------------- prepare
def prepare(a) -> Job:
    """Distributed set-up, the data, the resume check, the output folder (claimed for this run),
    the model and the SEFT config: everything that can be refused is, before the model loads."""
    from ._memory import return_freed_memory
    from .data import load_data, train_batches
    from .models import load_model

    return_freed_memory()  # freed activations go back to the system (glibc keeps them otherwise)
    rank, world, device = init_distributed(a.device)
    progress = not a.no_progress and rank == 0
    say = (lambda *m: print("seft:", *m, flush=True)) if progress else (lambda *m: None)
    torch.manual_seed(a.seed)
    job = Job(a, rank, world, device, Path(a.out), say, progress, torch.Generator().manual_seed(a.seed))
    data = load_data(a.data, a.val_items)
    _check_tokenizer(a.model, progress)
    if a.resume:
        job.fingerprint = fingerprint(a, progress)
        job.resume = _checked_resume(a, world, job.fingerprint)
    if job.main_rank:  # the other ranks write nothing
        from .run_folder import claim, new_run_id

        job.run_id = job.resume[0]["meta"]["run_id"] if job.resume else new_run_id()
        claim(job.out, job.run_id, a.command, getattr(a, "overwrite", False))
    if a.checkpoint_every and not a.resume:
        job.fingerprint = fingerprint(a, progress)
    job.model, job.tok = load_model(a.model, DTYPES[a.dtype], progress, need_tokenizer=True)
    job.model.to(device)
    job.train_data, job.train_windows, val = train_batches(job.tok, data, a.seq_len)
    job.evals = evaluation_sets(job.model, job.tok, data, a, val)
    job.config = seft_config(a)
    if job.resume is not None:
        _restore_model(job)
    return job


def _check_tokenizer(spec: str, progress: bool) -> None:
    """The model folder exists and has a tokenizer (before anything is written)."""
    from .models import NO_TOKENIZER, load_tokenizer, model_folder

    if load_tokenizer(model_folder(spec, progress)) is None:
        raise ValueError(NO_TOKENIZER.format(spec=spec))


def fingerprint(a, progress: bool = False) -> dict:
    """sha256 of the model's weights and config and of the data files: a resume must see the same contents."""
    from .data import data_files
    from .models import model_folder

    folder = model_folder(a.model, progress)
    weights = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") or p.name == "config.json")
    return {"model_sha256": _hash_files(weights), "data_sha256": _hash_files(data_files(a.data))}


def _hash_files(paths) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).name.encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def seft_config(a) -> SEFTConfig:
    """The SEFTConfig the driver's options describe (the driver's methods none and
    masked-dense are fixed and seft to the layers; lora takes only its budget, for the rank)."""
    _, nm, block = pattern_spec(a.pattern)
    fields = {k: getattr(a, k) for k in CONFIG_KEYS}
    fields["method"] = {"none": "fixed", "masked-dense": "seft", "lora": "fixed"}.get(a.method, a.method)
    return SEFTConfig(**fields, nm_n=nm[0], nm_m=nm[1], block=block)


def run_args(a, world: int, fingerprint: Optional[dict] = None) -> dict:
    """The options recorded with each checkpoint (and compared on resume), with the contents' hashes."""
    return {**{k: getattr(a, k) for k in RESUME_KEYS}, "world_size": world, **(fingerprint or {})}


def _checked_resume(a, world: int, fingerprint: dict) -> tuple:
    """The newest intact checkpoint of --resume, refused when the options or the contents of the
    model and data differ from its run's, or when its step does not fit this run."""
    from . import checkpoint

    info, tensor_file = checkpoint.latest(Path(a.resume))
    saved, now = info["meta"]["args"], run_args(a, world, fingerprint)
    diff = [f"--{k.replace('_', '-')} was {saved.get(k, RESUME_DEFAULTS.get(k))!r}, now {now[k]!r}"
            for k in RESUME_KEYS if saved.get(k, RESUME_DEFAULTS.get(k)) != now[k]]
    diff += [f"the {what} changed (sha256 differs)" for k, what in CONTENT_KEYS.items() if saved.get(k) != now[k]]
    if saved.get("world_size", 1) != world:
        diff.append(f"world size was {saved.get('world_size', 1)}, now {world}")
    if diff:
        raise ValueError("--resume with a different configuration: " + "; ".join(diff))
    total = info["controller"]["total_steps"]
    if info["step"] > a.steps or total != a.steps:
        raise checkpoint.CheckpointError(f"checkpoint {tensor_file}: step {info['step']} of {total} does not fit "
                                         f"--steps {a.steps}")
    return info, tensor_file


def _restore_model(job: Job) -> None:
    from . import checkpoint

    info, tensor_file = job.resume
    job.summary = info["meta"]["summary"]
    from .training import EVOLUTION_COUNTS

    for key in EVOLUTION_COUNTS:  # a count the checkpoint's version did not keep is unknown
        job.summary.setdefault(key, None)
    job.say(f"resuming from step {info['step']} of {job.opts.resume}")
    job.resume = (info, checkpoint.restore(info, tensor_file, job.model), tensor_file)
    job.model.to(job.device)
    job.train_seconds = float(job.summary.get("train_seconds", 0.0))


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
EVAL_KEYS = ("ppl", "ppl_other", "acc", "val_loss", "acc_val")


def evaluation_sets(model, tok, data, a, val=None):
    """The data.EvalSets of ``data`` (a data.DataSet) for this model (Gemma needs BOS at every window)."""
    from .data import eval_sets

    bos = "gemma" in getattr(model.config, "model_type", "")
    return eval_sets(tok, data, a.seq_len, a.eval_windows, bos=bos, val=val)


def evaluate(model, tok, sets, a) -> dict:
    """Held-out perplexity (``ppl``: of the held-out text, or of the held-out items' completion
    tokens), perplexity on the other domain's held-out text (``ppl_other``), WordNet accuracy
    (``acc``, unless --task-items 0) and, with --val-items, the validation loss (``val_loss``: mean
    NLL per token) and WordNet validation accuracy (``acc_val``)."""
    from .data import exp_or_inf, load_wordnet, mean_nll, multiple_choice_accuracy

    res = {"ppl": exp_or_inf(mean_nll(model, sets.heldout, a.batch_size)),
           "ppl_other": exp_or_inf(mean_nll(model, sets.other, a.batch_size))}
    if a.task_items and tok is not None:
        res["acc"] = multiple_choice_accuracy(model, tok, load_wordnet("heldout"), limit=a.task_items)
    if sets.val is not None:
        res["val_loss"] = mean_nll(model, sets.val, a.batch_size)
    if sets.wordnet_val:
        res["acc_val"] = multiple_choice_accuracy(model, tok, sets.wordnet_val)
    return res


def _evaluate(job: Job, stage: str) -> None:
    """Evaluates the model (no autograd graph: the dense model's weights still require gradients)
    and records the results as ``{key}_{stage}`` in the summary."""
    with torch.no_grad():
        res = evaluate(job.model, job.tok, job.evals, job.opts)
    job.summary.update({f"{k}_{stage}": res.get(k) for k in EVAL_KEYS if k in res or k == "acc"})


def prune(job: Job) -> None:
    """Evaluate the dense model, prune it (or take its own zeros), evaluate the pruned one."""
    from .prune_llm import existing_masks, prune_model

    new_phase()
    a = job.opts
    job.summary = {"run_id": job.run_id, "model": a.model, "data": a.data, "method": a.method, "prune": a.prune,
                   "pattern": a.pattern, "budget": a.budget, "sparsity_target": a.sparsity, "steps": a.steps,
                   "seq_len": a.seq_len, "batch_size": a.batch_size, "lr": a.lr, "seed": a.seed,
                   "val_items": a.val_items, "other_data": job.evals.other_name,
                   "threads": torch.get_num_threads()}
    # drawn for every --prune: the data order after it does not depend on the pruning method
    calib = job.train_windows[torch.randperm(job.train_windows.shape[0], generator=job.data_rng)[:a.calib_windows]]
    evaluate_now = not a.no_eval_before
    if a.prune == "existing":  # the model as given is the pruned one: evaluated once, for both stages
        job.masks = existing_masks(job.model)
        _check_existing_blocks(job.masks, a.pattern)
        _complete_existing_nm(job.masks, a.pattern)
        job.summary["sparsity_target"] = _existing_sparsity(job)
        if evaluate_now:
            job.say("evaluating the pruned model")
            _evaluate(job, "pruned")
            job.summary.update({k.replace("_pruned", "_dense"): v for k, v in list(job.summary.items())
                                if k.endswith("_pruned")})
    else:
        if evaluate_now:
            job.say("evaluating the dense model")
            _evaluate(job, "dense")
        job.say(f"pruning with {a.prune} to {a.sparsity:.0%} ({a.pattern})")
        batches = [calib[i:i + a.batch_size].to(job.device) for i in range(0, calib.shape[0], a.batch_size)]
        budget, nm, block = pattern_spec(a.pattern)
        job.masks = prune_model(job.model, a.prune, a.sparsity, budget, nm, calibration=batches,
                                progress=job.progress, block=block)
        if evaluate_now:
            _evaluate(job, "pruned")
    from .training import EVOLUTION_COUNTS

    job.summary.update(dict.fromkeys(EVOLUTION_COUNTS, 0), train_seconds=0.0)


def _check_existing_blocks(masks: dict, pattern: str) -> None:
    """--prune existing with block:RxC: the model's zeros must fill whole blocks (BSRWeight's check)."""
    from .bsr import BSRWeight

    block = pattern_spec(pattern)[2]
    if block is None:
        return
    for name, mask in masks.items():
        try:
            BSRWeight._block_mask_of(mask, *block)
        except ValueError as e:
            raise UsageError(f"--prune existing --pattern {pattern}: the zeros of {name} are not constant on "
                             f"{block[0]}x{block[1]} blocks ({e}); prune the model with --pattern {pattern} first "
                             "(seft prune), or give --prune wanda | sparsegpt | magnitude") from None


def _complete_existing_nm(masks: dict, pattern: str) -> None:
    """--prune existing with N:M: a group whose kept weights include exact zeros gets positions
    back up to N (stored zeros); a group with more than N non-zeros is refused."""
    from .prune_llm import complete_nm

    kind, (n, m), _ = pattern_spec(pattern)
    if kind != "nm":
        return
    for name, mask in masks.items():
        try:
            masks[name] = complete_nm(mask, n, m)
        except ValueError as e:
            raise UsageError(f"--prune existing --pattern {pattern}: the zeros of {name} are not {n}:{m} ({e}); "
                             f"prune the model with --pattern {pattern} first (seft prune), or give --prune "
                             "wanda | sparsegpt | magnitude") from None


def _existing_sparsity(job: Job) -> float:
    """The sparsity of the model's own zeros (--prune existing); a model with none is refused."""
    kept = sum(int(m.sum()) for m in job.masks.values())
    total = sum(m.numel() for m in job.masks.values())
    sparsity = 1.0 - kept / total if total else 0.0
    if sparsity < 0.01:
        raise UsageError(f"--prune existing: --model {job.opts.model} has no pruned weights (sparsity "
                         f"{sparsity:.3f}); prune it first (seft prune), or give --prune wanda | sparsegpt | magnitude")
    if job.main_rank and not job.opts.no_progress:
        print(f"seft: --prune existing: the model's own zeros are the mask (sparsity {sparsity:.3f}); "
              "--sparsity does not apply", flush=True)
    return round(sparsity, 4)


# ---------------------------------------------------------------------- train
def train(job: Job) -> None:
    """Convert (unless resumed), then the training loop with evolution, logging and checkpoints."""
    from .training import TrainLoop

    new_phase()
    TrainLoop(job).run()


# ---------------------------------------------------------------------- finish / export
def finish(job: Job) -> None:
    """The final evaluation and the summary's closing fields."""
    from .convert import model_sparsity
    from .lora import masked_sparsity

    new_phase()
    pruned_only = not job.trains and "ppl_pruned" in job.summary  # nothing changed since
    if pruned_only:
        s = job.summary
        s.update({f"{k}_final": s[f"{k}_pruned"] for k in EVAL_KEYS if f"{k}_pruned" in s})
    else:
        if job.peft is not None:
            _merge_lora(job)
        _evaluate(job, "final")
    dev = job.device
    sparsity = model_sparsity(job.model) if job.peft is None else masked_sparsity(job.model, job.masks)
    job.summary.update(sparsity_final=sparsity,
                       train_seconds=round(job.train_seconds, 2), total_seconds=round(time.time() - job.t_start, 2),
                       peak_memory_bytes=torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else peak_rss(),
                       device=str(dev), world_size=job.world)


def _merge_lora(job: Job) -> None:
    """--method lora: evaluate the adapter unmerged (``*_final_unmerged``), then merge it into
    the weights and zero the pruned positions again; the final evaluation is of that model."""
    from .lora import merge_in_place

    job.say("evaluating the LoRA model unmerged")
    _evaluate(job, "final_unmerged")
    merge_in_place(job.peft, job.masks)


def export(job: Job) -> None:
    """DIR/sparse.safetensors, DIR/dense (a plain HF folder), with --method lora DIR/lora_adapter,
    and DIR/summary.json (rank 0), written aside and moved in together (run_folder.install): a
    failure leaves DIR as it was."""
    from . import run_folder

    new_phase()
    aside = run_folder.aside_folder(job.out, job.run_id)
    try:
        if not job.opts.no_export:
            _export_model(job, aside)
        write_json(aside / "summary.json", job.summary)
    except BaseException:
        run_folder.discard(aside)
        raise
    run_folder.install(job.out, job.run_id, aside)


def _export_model(job: Job, aside: Path) -> None:
    from .convert import seft_layers
    from .hf import export_dense, export_sparse
    from .lora import export_lora

    if job.peft is not None:
        export_lora(job.peft, job.masks, job.tok, aside, block=pattern_spec(job.opts.pattern)[2])
        return
    if seft_layers(job.model):
        export_sparse(job.model, aside / "sparse.safetensors")
    export_dense(job.model, job.tok, aside / "dense")


def write_json(path: Path, obj) -> None:
    """JSON with NaN / Inf written as null (they are not JSON)."""
    path.write_text(json.dumps(finite_json(obj), indent=2, allow_nan=False) + "\n")


def finite_json(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def peak_rss() -> int:
    try:
        import resource
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except (ImportError, OSError):  # pragma: no cover
        return -1
