"""The `seft` driver: prune a Hugging Face causal LM and repair it with sparse fine-tuning.

    seft run  [options]   load -> evaluate dense -> prune -> evaluate -> fine-tune -> evaluate
                          -> export; DIR/log.jsonl, DIR/summary.json, DIR/dense (HF folder)
    seft eval --model DIR evaluate a model folder (held-out perplexity, task accuracy)
    seft generate --model DIR --prompt TEXT
                          greedy text from a run's sparse model (SparseLinear layers, KV cache)

`python -m seft_ext.cli ...` works too. Run `seft run --help` for the options.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from pathlib import Path

import torch

from .config import BUDGETS, DRIVER_METHODS, METHODS, SCHEDULES, SEFTConfig
from .pipeline import DTYPES, PATTERN_HELP


# SEFTConfig fields the driver sets itself: nm_n / nm_m (and block) come from --pattern.
NOT_OPTIONS = ("nm_n", "nm_m", "block")
_TYPES = {"int": int, "float": float, "str": str, "Optional[int]": int, "Optional[float]": float}
_CHOICES = {"schedule": SCHEDULES, "budget": BUDGETS, "method": METHODS}
# Where the driver's option differs from the plain field (one definition still serves both).
DRIVER_OVERRIDES = {
    "method": dict(choices=list(DRIVER_METHODS),
                   help="seft, spiel or fixed (see SEFTConfig.method); masked-dense: the SEFT steps with dense "
                        "weights x mask and dense gradients (the paper's own way; a speed and memory reference); "
                        "lora: PEFT LoRA on every decoder linear of the pruned model stored dense, its rank matching "
                        "the SEFT budget (--lora-rank, or --k / --density), evaluated unmerged and merged then "
                        "re-masked to the pruning mask (exported; no checkpoints); none: no fine-tuning"),
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


def parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="seft", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"seft_ext {__version__} (torch {torch.__version__})")
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default="default", help="local Hugging Face folder, a model id in the local "
                        "Hugging Face cache, or 'default' (SmolLM2-135M-Instruct)")
    common.add_argument("--data", default="default",
                        help="default (= kjv: the King James text), general (Jane Austen), wordnet (the WordNet "
                             "training items, loss on the answers), or local .txt / .jsonl files (comma-separated; "
                             ".jsonl: 'text' lines, or 'prompt' and 'completion' lines)")
    common.add_argument("--seq-len", type=int, default=256,
                        help="tokens per training / evaluation window (task data: the longest prompt + completion; "
                             "longer prompts are cut from the left)")
    common.add_argument("--batch-size", type=int, default=4, help="windows (task data: items) per optimizer step "
                        "(per rank)")
    common.add_argument("--eval-windows", type=int, default=32, help="held-out windows for perplexity (0: all)")
    common.add_argument("--task-items", type=int, default=100, help="held-out WordNet items scored (0: skip the task)")
    common.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    config_option(common, _field("seed"), help="seed of the data order, calibration sample, initial delta "
                  "positions and the scan's sketch")
    common.add_argument("--out", default="seft_out", help="output folder")
    common.add_argument("--no-progress", action="store_true", help="no progress bars or messages")
    owned = argparse.ArgumentParser(add_help=False)  # the output folder's ownership
    owned.add_argument("--overwrite", action="store_true", help="replace the results and checkpoints of another "
                       "run in --out (only files seft wrote are deleted)")

    run = argparse.ArgumentParser(add_help=False)
    run.add_argument("--pattern", default="row", help=PATTERN_HELP)
    run.add_argument("--prune", choices=["magnitude", "wanda", "sparsegpt", "existing"], default=None,
                     help="default wanda (train: existing); existing keeps the model's own zeros as the "
                          "pruning mask (a model pruned before)")
    run.add_argument("--steps", type=int, default=60, help="optimizer steps of fine-tuning")
    run.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate of the deltas")
    run.add_argument("--calib-windows", type=int, default=32, help="training windows Wanda / SparseGPT calibrate on")
    run.add_argument("--val-items", type=int, default=0,
                     help="take the last N training items (task data) or windows (text) out of training as a "
                          "validation part, scored at every evaluation (val_loss; WordNet: acc_val too), for "
                          "choosing a learning rate")
    run.add_argument("--no-eval-before", action="store_true",
                     help="skip evaluating the model before training (the summary's dense and pruned stages), "
                          "for many runs from one pruned model")
    sft = run.add_argument_group("SEFT (the fields of seft_ext.SEFTConfig)")
    for f in config_fields():
        if f.name != "seed":
            config_option(sft, f, **DRIVER_OVERRIDES.get(f.name, {}))
    run.add_argument("--log-every", type=int, default=10)
    run.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    run.add_argument("--gradient-checkpointing", action="store_true",
                     help="recompute each decoder layer's forward in backward instead of keeping its "
                          "activations (less memory, about one more forward per step; results unchanged)")
    run.add_argument("--device", default="cpu",
                     help="cpu, cuda or cuda:N (a CUDA build of seft_ext; under torchrun each rank takes "
                          "cuda:LOCAL_RANK and the ranks talk over NCCL)")
    run.add_argument("--no-export", action="store_true", help="skip writing the dense HF folder")
    run.add_argument("--checkpoint-every", type=int, default=0,
                     help="write DIR/checkpoints/step-N.{safetensors,json} every N steps (0: never)")
    run.add_argument("--keep-checkpoints", type=int, default=2, help="how many of the newest checkpoints to keep")
    run.add_argument("--resume", metavar="DIR", help="continue the run whose checkpoints are in DIR/checkpoints")

    fmt = {"formatter_class": argparse.ArgumentDefaultsHelpFormatter}
    sub.add_parser("run", parents=[common, owned, run], help="the whole job", **fmt)
    sub.add_parser("prune", parents=[common, owned, run], **fmt,
                   help="load, evaluate, prune, evaluate, export the pruned model to DIR/dense (no training)")
    sub.add_parser("train", parents=[common, owned, run], **fmt,
                   help="fine-tune a model pruned before (--prune existing unless given), evaluate, export")
    sub.add_parser("eval", parents=[common], help="evaluate a model folder", **fmt)
    ex = sub.add_parser("export", parents=[common, owned], help="export the newest checkpoint of a run", **fmt)
    ex.add_argument("--run", required=True, metavar="DIR", help="the run folder holding checkpoints/")
    ex.add_argument("--format", choices=["hf", "peft"], default="hf",
                    help="hf: DIR/dense (a plain Hugging Face folder, sparsity kept) and DIR/sparse.safetensors; "
                         "peft: DIR/peft/base (the final theta) and DIR/peft/adapter (a PEFT SHiRA adapter holding "
                         "the delta)")
    _generate_parser(sub)
    return p


def _generate_parser(sub) -> None:
    g = sub.add_parser("generate", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       help="generate text with a run's sparse model (its decoder linears as SparseLinear layers)")
    g.add_argument("--model", required=True, metavar="RUN_DIR",
                   help="the --out folder of `seft run` / `seft train` / `seft export` (DIR/dense and "
                        "DIR/sparse.safetensors)")
    g.add_argument("--prompt", required=True, help="the text to continue (inside the chat template when the "
                   "tokenizer has one)")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (greedy)")
    g.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="dtype of the weights and activations")
    g.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    g.add_argument("--no-chat-template", action="store_true", help="feed the prompt as it is")
    g.add_argument("--no-stream", action="store_true", help="print the text at the end, not token by token")
    g.add_argument("--no-progress", action="store_true", help="no messages on stderr (loading, speed)")


def _field(name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(SEFTConfig) if f.name == name)


def _check_args(a) -> None:
    """The options' checks (pipeline.check_options), and --device."""
    from .pipeline import check_options

    if a.command == "generate":
        _check_generate(a)
        return
    check_options(a)
    if a.command in ("run", "prune", "train"):
        _check_device(a.device)


def _check_generate(a) -> None:
    """`seft generate`'s checks: the numbers, the prompt, and that --model is a run's output
    folder (its sparse export's header is read; no weight is loaded)."""
    from .generate import check_run_folder
    from .pipeline import UsageError

    if a.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be an int >= 1, got {a.max_new_tokens}")
    if a.threads < 0:
        raise UsageError(f"--threads must be an int >= 0, got {a.threads}")
    if not a.prompt.strip():
        raise UsageError("--prompt is empty")
    try:
        check_run_folder(a.model)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"--model {e}") from None


def _check_device(spec: str) -> None:
    from ._lib import has_kernels
    from .pipeline import UsageError

    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise UsageError(f"--device must be cpu, cuda or cuda:N, got {spec!r}") from None
    if dev.type == "cpu":
        return
    if dev.type != "cuda":
        raise UsageError(f"--device must be cpu, cuda or cuda:N, got {spec!r}")
    if not torch.cuda.is_available():
        raise UsageError(f"--device {spec}: torch sees no CUDA device (torch {torch.__version__})")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s)")
    if not has_kernels("csr_spmm", "cuda"):
        raise UsageError(f"--device {spec}: this build of seft_ext has no CUDA kernels; rebuild it with a "
                         "CUDA torch and nvcc on PATH (see README, Install)")


def _print_summary(s: dict) -> None:
    def f(v, pct=False):
        return "-" if v is None else (f"{v:.1%}" if pct else f"{v:.2f}")

    other = f"ppl {s.get('other_data', 'other')}"
    print(f"\n{'':10}{'perplexity':>12}{other:>14}{'accuracy':>10}")
    stages = ("dense", "pruned", "final") + (("final_unmerged",) if "ppl_final_unmerged" in s else ())
    for stage in stages:
        print(f"{stage.replace('final_', ''):10}{f(s.get('ppl_' + stage)):>12}{f(s.get('ppl_other_' + stage)):>14}"
              f"{f(s.get('acc_' + stage), True):>10}")
    lora = (f" (LoRA rank {s['lora_rank']}; final: merged and re-masked to the pruning mask, unmerged: the adapter "
            "beside the sparse base)") if "lora_rank" in s else ""
    print(f"method {s['method']}{lora}, prune {s['prune']} {s['pattern']}, sparsity {s['sparsity_final']:.3f} "
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
    """The newest intact checkpoint of --run as DIR/dense (HF folder) and DIR/sparse.safetensors,
    written aside and moved in together."""
    from . import checkpoint, run_folder
    from .convert import model_sparsity
    from .hf import export_dense, export_sparse
    from .models import load_model

    info, tensor_file = checkpoint.latest(Path(a.run), "--run")
    saved, run_id = info["meta"]["args"], info["meta"]["run_id"]
    out = Path(a.out)
    run_folder.claim(out, run_id, "export", a.overwrite)
    model, tok = load_model(saved["model"], DTYPES[saved.get("dtype", "fp32")], not a.no_progress)
    checkpoint.restore(info, tensor_file, model)
    aside = run_folder.aside_folder(out, run_id)
    try:
        if a.format == "peft":
            from .peft_export import export_peft

            export_peft(model, tok, aside / "peft")
        else:
            export_sparse(model, aside / "sparse.safetensors")
            sparsity = model_sparsity(model)
            export_dense(model, tok, aside / "dense")
    except BaseException:
        run_folder.discard(aside)
        raise
    run_folder.install(out, run_id, aside)
    if a.format == "peft":
        base, adapter = out / "peft" / "base", out / "peft" / "adapter"
        print(f"seft: exported step {info['step']} of {a.run} as {base} (the final theta) and {adapter} "
              "(PEFT SHiRA adapter); load with PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), "
              "adapter)")
        return 0
    print(f"seft: exported step {info['step']} of {a.run} to {out}/dense and {out}/sparse.safetensors "
          f"(sparsity {sparsity:.4f})")
    return 0


def cmd_eval(a) -> int:
    from .convert import model_sparsity
    from .data import load_data
    from .models import load_model
    from .pipeline import evaluate, evaluation_sets

    data = load_data(a.data)
    model, tok = load_model(a.model, progress=not a.no_progress, need_tokenizer=True)
    sets = evaluation_sets(model, tok, data, a)
    res = evaluate(model, tok, sets, a)
    res["other_data"] = sets.other_name
    res["sparsity"] = model_sparsity(model)
    print(json.dumps(res, indent=2))
    return 0


def cmd_generate(a) -> int:
    """seft generate: load the run's sparse model, then greedy generation (streamed to stdout)."""
    import time

    from .generate import generate_text, load_sparse_model

    say = (lambda msg: None) if a.no_progress else (lambda msg: print(f"seft: {msg}", file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    model, tok = load_sparse_model(a.model, DTYPES[a.dtype])
    say(f"loaded {a.model} ({_sparse_summary(model)}) in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    text, n = generate_text(model, tok, a.prompt, a.max_new_tokens, stream=not a.no_stream,
                            chat_template=not a.no_chat_template)
    dt = time.perf_counter() - t0
    if a.no_stream:
        print(text, flush=True)
    say(f"{n} tokens in {dt:.2f} s ({n / dt:.1f} tokens/s, prefill included)")
    return 0


def _sparse_summary(model) -> str:
    from .layer import SparseLinear

    layers = [m for m in model.modules() if isinstance(m, SparseLinear)]
    nnz, total = sum(m.nnz for m in layers), sum(m.in_features * m.out_features for m in layers)
    return f"{len(layers)} sparse layers, sparsity {1 - nnz / max(total, 1):.3f}, {next(model.parameters()).dtype}"


def main(argv=None) -> int:
    """``seft``: 0 on success, 2 for an error explained in one line (bad options or input, a
    failed write), 130 after Ctrl-C."""
    from .pipeline import JobError

    argv = sys.argv[1:] if argv is None else [str(x) for x in argv]
    a = parser().parse_args(argv)
    try:
        _check_args(a)
    except ValueError as e:  # UsageError, run_folder.RunFolderError
        print(f"seft: error: {e}", file=sys.stderr)
        return 2
    if a.threads:
        torch.set_num_threads(a.threads)
    ok = False
    try:
        rc = {"run": cmd_run, "prune": cmd_run, "train": cmd_run, "eval": cmd_eval, "export": cmd_export,
              "generate": cmd_generate}[a.command](a)
        ok = True
        return rc
    except KeyboardInterrupt as e:
        print(_interrupted(a, argv, getattr(e, "step", None)), file=sys.stderr, flush=True)
        return 130
    except (FileNotFoundError, ModuleNotFoundError, ValueError, TypeError, OSError, JobError, *_io_errors()) as e:
        print(f"seft: error{_rank_tag()}: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        _leave_process_group(ok)


def _io_errors() -> tuple:
    """safetensors' own error type (a full disk while writing one, say)."""
    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover
        return ()
    return (SafetensorError,)


def _rank_tag() -> str:
    import torch.distributed as dist

    return f" (rank {dist.get_rank()})" if dist.is_available() and dist.is_initialized() else ""


def _leave_process_group(ok: bool) -> None:
    """Under torchrun: after a success the ranks leave together; after a failure this rank leaves
    at once (waiting in a barrier would hang the job: the others may be inside a collective)."""
    import torch.distributed as dist

    if ok and dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _interrupted(a, argv: list, step) -> str:
    """One line: where the run stopped, its newest checkpoint and the command that resumes it."""
    from . import checkpoint

    at = f" after step {step}" if step is not None else ""
    if a.command not in ("run", "train"):
        return f"seft: interrupted{at}"
    if a.method == "lora":
        return f"seft: interrupted{at}; --method lora writes no checkpoints, so the run cannot be resumed"
    newest = checkpoint.newest_step(Path(a.out))
    if newest is None:
        return f"seft: interrupted{at}; no checkpoint to resume from (--checkpoint-every N writes them)"
    return (f"seft: interrupted{at}; newest checkpoint: step {newest}; resume with: "
            f"{shlex.join(['seft', *_resume_argv(argv, a.out)])}")


def _resume_argv(argv: list, out: str) -> list:
    """``argv`` without --resume / --overwrite, then --resume OUT."""
    args, skip = [], False
    for x in argv:
        if skip:
            skip = False
        elif x == "--resume":
            skip = True
        elif not (x.startswith("--resume=") or x == "--overwrite"):
            args.append(x)
    return args + ["--resume", str(out)]


if __name__ == "__main__":
    sys.exit(main())
