"""The `seft` driver: prune a Hugging Face causal LM and repair it with sparse fine-tuning.

    seft run  [options]   load -> evaluate dense -> prune -> evaluate -> fine-tune -> evaluate
                          -> export; DIR/log.jsonl, DIR/summary.json, DIR/dense (HF folder)
    seft eval --model DIR evaluate a model folder (held-out perplexity, task accuracy)

`python -m seft_ext.cli ...` works too. Run `seft run --help` for the options.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from .config import BUDGETS, DRIVER_METHODS, METHODS, SCHEDULES, SEFTConfig
from .pipeline import DTYPES, PATTERNS


# SEFTConfig fields the driver sets itself: nm_n / nm_m come from --pattern.
NOT_OPTIONS = ("nm_n", "nm_m")
_TYPES = {"int": int, "float": float, "str": str, "Optional[int]": int, "Optional[float]": float}
_CHOICES = {"schedule": SCHEDULES, "budget": BUDGETS, "method": METHODS}
# Where the driver's option differs from the plain field (one definition still serves both).
DRIVER_OVERRIDES = {
    "method": dict(choices=list(DRIVER_METHODS),
                   help="seft, spiel or fixed (see SEFTConfig.method); masked-dense: the SEFT steps with dense "
                        "weights x mask and dense gradients (the paper's own way; a speed and memory reference); "
                        "none: no fine-tuning"),
    "budget": dict(default=None, help="the unit whose non-zero count evolution keeps: layer, row or nm (N:M group); "
                                      "default: nm for 2:4 / 4:8, else layer"),
}


def config_option(parser, f: dataclasses.Field, **override) -> None:
    """Adds --NAME for the SEFTConfig field f: type, default and help from the dataclass."""
    kw = {"default": f.default, "help": f.metadata["help"] + " (default: %(default)s)"}
    if f.type == "bool":
        kw["action"] = argparse.BooleanOptionalAction
    else:
        kw["type"] = _TYPES[str(f.type)]
        if f.name in _CHOICES:
            kw["choices"] = list(_CHOICES[f.name])
    kw.update(override)
    if "help" in override:
        kw["help"] = override["help"] + " (default: %(default)s)"
    parser.add_argument("--" + f.name.replace("_", "-"), **kw)


def config_fields() -> list:
    """The SEFTConfig fields that are driver options."""
    return [f for f in dataclasses.fields(SEFTConfig) if f.name not in NOT_OPTIONS]


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="seft", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"seft_ext {__version__} (torch {torch.__version__})")
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default="default", help="local Hugging Face folder, a model id in the local "
                        "Hugging Face cache, or 'default' (SmolLM2-135M-Instruct)")
    common.add_argument("--data", default="default", help="local .txt / .jsonl files (comma-separated), or 'default'")
    common.add_argument("--seq-len", type=int, default=256, help="tokens per training / evaluation window")
    common.add_argument("--batch-size", type=int, default=4, help="windows per optimizer step (per rank)")
    common.add_argument("--eval-windows", type=int, default=32, help="held-out windows for perplexity (0: all)")
    common.add_argument("--task-items", type=int, default=100, help="held-out WordNet items scored (0: skip the task)")
    common.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    config_option(common, _field("seed"), help="seed of the data order, calibration sample, initial delta "
                  "positions and the scan's sketch")
    common.add_argument("--out", default="seft_out", help="output folder")
    common.add_argument("--no-progress", action="store_true", help="no progress bars or messages")

    run = argparse.ArgumentParser(add_help=False)
    run.add_argument("--pattern", choices=list(PATTERNS), default="row",
                     help="pruning pattern: unstructured (per layer), row (per output row), 2:4 or 4:8")
    run.add_argument("--prune", choices=["magnitude", "wanda", "sparsegpt", "existing"], default=None,
                     help="default wanda (train: existing); existing keeps the model's own zeros as the "
                          "pruning mask (a model pruned before)")
    run.add_argument("--steps", type=int, default=60, help="optimizer steps of fine-tuning")
    run.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate of the deltas")
    run.add_argument("--calib-windows", type=int, default=32, help="training windows Wanda / SparseGPT calibrate on")
    sft = run.add_argument_group("SEFT (the fields of seft_ext.SEFTConfig)")
    for f in config_fields():
        if f.name != "seed":
            config_option(sft, f, **DRIVER_OVERRIDES.get(f.name, {}))
    run.add_argument("--log-every", type=int, default=10)
    run.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    run.add_argument("--device", default="cpu",
                     help="cpu, cuda or cuda:N (a CUDA build of seft_ext; under torchrun each rank takes "
                          "cuda:LOCAL_RANK and the ranks talk over NCCL)")
    run.add_argument("--no-export", action="store_true", help="skip writing the dense HF folder")
    run.add_argument("--checkpoint-every", type=int, default=0,
                     help="write DIR/checkpoints/step-N.{safetensors,json} every N steps (0: never)")
    run.add_argument("--keep-checkpoints", type=int, default=2, help="how many of the newest checkpoints to keep")
    run.add_argument("--resume", metavar="DIR", help="continue the run whose checkpoints are in DIR/checkpoints")

    fmt = {"formatter_class": argparse.ArgumentDefaultsHelpFormatter}
    sub.add_parser("run", parents=[common, run], help="the whole job", **fmt)
    sub.add_parser("prune", parents=[common, run], **fmt,
                   help="load, evaluate, prune, evaluate, export the pruned model to DIR/dense (no training)")
    sub.add_parser("train", parents=[common, run], **fmt,
                   help="fine-tune a model pruned before (--prune existing unless given), evaluate, export")
    sub.add_parser("eval", parents=[common], help="evaluate a model folder", **fmt)
    ex = sub.add_parser("export", parents=[common], help="export the newest checkpoint of a run", **fmt)
    ex.add_argument("--run", required=True, metavar="DIR", help="the run folder holding checkpoints/")
    ex.add_argument("--format", choices=["hf", "peft"], default="hf",
                    help="hf: DIR/dense (a plain Hugging Face folder, sparsity kept) and DIR/sparse.safetensors; "
                         "peft: DIR/peft/base (the final theta) and DIR/peft/adapter (a PEFT SHiRA adapter holding "
                         "the delta)")
    return p


def _field(name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(SEFTConfig) if f.name == name)


def _check_args(a) -> None:
    if a.seq_len < 8 or a.batch_size < 1:
        raise SystemExit("seft: --seq-len must be >= 8 and --batch-size >= 1")
    if a.command in ("run", "prune", "train"):
        if a.command == "prune":  # prune only: no training
            a.method, a.steps = "none", 0
        if a.prune is None:
            a.prune = "existing" if a.command == "train" else "wanda"
        if a.budget is None:
            a.budget = "nm" if PATTERNS[a.pattern][0] == "nm" else "layer"
        if a.budget == "nm" and PATTERNS[a.pattern][0] != "nm":
            raise SystemExit(f"seft: --budget nm needs an N:M --pattern (2:4 or 4:8), got {a.pattern}")
        if not (0.0 <= a.sparsity < 1.0):
            raise SystemExit(f"seft: --sparsity must be in [0, 1), got {a.sparsity}")
        if a.steps < 0 or a.lr <= 0:
            raise SystemExit("seft: --steps must be >= 0 and --lr > 0")
        if a.checkpoint_every < 0 or a.keep_checkpoints < 1:
            raise SystemExit("seft: --checkpoint-every must be >= 0 and --keep-checkpoints >= 1")
        _check_device(a.device)


def _check_device(spec: str) -> None:
    from ._lib import has_kernels

    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise SystemExit(f"seft: --device must be cpu, cuda or cuda:N, got {spec!r}") from None
    if dev.type == "cpu":
        return
    if dev.type != "cuda":
        raise SystemExit(f"seft: --device must be cpu, cuda or cuda:N, got {spec!r}")
    if not torch.cuda.is_available():
        raise SystemExit(f"seft: --device {spec}: torch sees no CUDA device (torch {torch.__version__})")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise SystemExit(f"seft: --device {spec}: only {torch.cuda.device_count()} CUDA device(s)")
    if not has_kernels("csr_spmm", "cuda"):
        raise SystemExit(f"seft: --device {spec}: this build of seft_ext has no CUDA kernels; rebuild it with a "
                         "CUDA torch and nvcc on PATH (see README, Install)")


def _print_summary(s: dict) -> None:
    def f(v, pct=False):
        return "-" if v is None else (f"{v:.1%}" if pct else f"{v:.2f}")

    print(f"\n{'':10}{'perplexity':>12}{'accuracy':>10}")
    for stage in ("dense", "pruned", "final"):
        print(f"{stage:10}{f(s.get('ppl_' + stage)):>12}{f(s.get('acc_' + stage), True):>10}")
    print(f"method {s['method']}, prune {s['prune']} {s['pattern']}, sparsity {s['sparsity_final']:.3f} "
          f"(target {s['sparsity_target']}), {s['steps']} steps in {s['train_seconds']} s, "
          f"{s['topology_changes']} grown entries, {s['total_seconds']} s in all", flush=True)


def cmd_run(a) -> int:
    """seft run / prune / train: the phases of pipeline.run_job."""
    from .pipeline import run_job

    summary = run_job(a)
    if "sparsity_final" in summary and _is_main_rank():
        _print_summary(summary)
    return 0


def _is_main_rank() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def cmd_export(a) -> int:
    """The newest intact checkpoint of --run as DIR/dense (HF folder) and DIR/sparse.safetensors."""
    from . import checkpoint
    from .convert import model_sparsity
    from .hf import export_dense, export_sparse
    from .models import load_model

    info, tensor_file = checkpoint.latest(Path(a.run))
    saved = info["meta"]["args"]
    model, tok = load_model(saved["model"], DTYPES[saved.get("dtype", "fp32")], not a.no_progress)
    checkpoint.restore(info, tensor_file, model)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.format == "peft":
        from .peft_export import export_peft

        base, adapter = export_peft(model, tok, out / "peft")
        print(f"seft: exported step {info['step']} of {a.run} as {base} (the final theta) and {adapter} "
              "(PEFT SHiRA adapter); load with PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), "
              "adapter)")
        return 0
    export_sparse(model, out / "sparse.safetensors")
    sparsity = model_sparsity(model)
    export_dense(model, tok, out / "dense")
    print(f"seft: exported step {info['step']} of {a.run} to {out}/dense and {out}/sparse.safetensors "
          f"(sparsity {sparsity:.4f})")
    return 0


def cmd_eval(a) -> int:
    from .convert import model_sparsity
    from .data import load_text
    from .models import load_model
    from .pipeline import evaluate

    model, tok = load_model(a.model, progress=not a.no_progress)
    _, heldout = load_text(a.data)
    res = evaluate(model, tok, heldout, a)
    res["sparsity"] = model_sparsity(model)
    print(json.dumps(res, indent=2))
    return 0


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    _check_args(a)
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        return {"run": cmd_run, "prune": cmd_run, "train": cmd_run, "eval": cmd_eval,
                "export": cmd_export}[a.command](a)
    except (FileNotFoundError, ModuleNotFoundError, ValueError, TypeError) as e:
        print(f"seft: error: {e}", file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():  # under torchrun: leave together
            dist.barrier()
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
