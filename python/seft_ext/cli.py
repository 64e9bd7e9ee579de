"""The `seft` driver: prune a Hugging Face causal LM and repair it with sparse fine-tuning.

    seft run  [options]   load -> evaluate dense -> prune -> evaluate -> fine-tune -> evaluate
                          -> export; DIR/log.jsonl, DIR/summary.json, DIR/dense (HF folder)
    seft eval --model DIR evaluate a model folder (held-out perplexity, task accuracy)

`python -m seft_ext.cli ...` works too. Run `seft run --help` for the options.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

PATTERNS = {"unstructured": ("layer", (2, 4)), "row": ("row", (2, 4)), "2:4": ("nm", (2, 4)), "4:8": ("nm", (4, 8))}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="seft", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default="default", help="local Hugging Face folder, or 'default' (SmolLM2-135M-Instruct)")
    common.add_argument("--data", default="default", help="local .txt / .jsonl files (comma-separated), or 'default'")
    common.add_argument("--seq-len", type=int, default=256)
    common.add_argument("--batch-size", type=int, default=4)
    common.add_argument("--eval-windows", type=int, default=32, help="held-out windows for perplexity (0: all)")
    common.add_argument("--task-items", type=int, default=100, help="held-out WordNet items scored (0: skip the task)")
    common.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--out", default="seft_out", help="output folder")
    common.add_argument("--no-progress", action="store_true")

    run_opts = argparse.ArgumentParser(add_help=False)
    run = run_opts
    run.add_argument("--sparsity", type=float, default=0.5)
    run.add_argument("--pattern", choices=list(PATTERNS), default="row")
    run.add_argument("--budget", choices=["layer", "row", "nm"], default=None,
                     help="the unit whose non-zero count evolution keeps: layer, row or nm (N:M group); "
                          "default: nm for 2:4 / 4:8, else layer (see README: re-activation under a row budget)")
    run.add_argument("--prune", choices=["magnitude", "wanda", "sparsegpt", "existing"], default=None,
                     help="default wanda (train: existing); existing keeps the model's own zeros as the "
                          "pruning mask (a model pruned before)")
    run.add_argument("--method", choices=["seft", "spiel", "fixed", "masked-dense", "none"], default="seft",
                     help="masked-dense: the SEFT steps with dense weights x mask and dense gradients (the "
                          "paper's own way; a speed and memory reference)")
    run.add_argument("--steps", type=int, default=60)
    run.add_argument("--lr", type=float, default=2e-4)
    run.add_argument("--calib-windows", type=int, default=32)
    run.add_argument("--update-interval", type=int, default=10)
    run.add_argument("--lora-rank", type=int, default=8, help="trainable budget k = rank (in + out) per layer")
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

    sub.add_parser("run", parents=[common, run_opts], help="the whole job")
    sub.add_parser("prune", parents=[common, run_opts],
                   help="load, evaluate, prune, evaluate, export the pruned model to DIR/dense (no training)")
    sub.add_parser("train", parents=[common, run_opts],
                   help="fine-tune a model pruned before (--prune existing unless given), evaluate, export")
    sub.add_parser("eval", parents=[common], help="evaluate a model folder")
    ex = sub.add_parser("export", parents=[common], help="export the newest checkpoint of a run")
    ex.add_argument("--run", required=True, metavar="DIR", help="the run folder holding checkpoints/")
    return p


RESUME_KEYS = ("model", "data", "sparsity", "pattern", "budget", "prune", "method", "steps", "seq_len", "batch_size",
               "lr", "seed", "update_interval", "lora_rank", "calib_windows", "dtype")


def _check_args(a) -> None:
    if a.seq_len < 8 or a.batch_size < 1:
        raise SystemExit("seft: --seq-len must be >= 8 and --batch-size >= 1")
    if a.command in ("run", "prune", "train"):
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


def _evaluate(model, tok, heldout, a, progress) -> dict:
    from .data import load_wordnet, multiple_choice_accuracy, perplexity, token_windows

    bos = "gemma" in getattr(model.config, "model_type", "")  # Gemma needs BOS at every window
    w = token_windows(tok, heldout, a.seq_len, bos=bos)
    if a.eval_windows:
        w = w[:a.eval_windows]
    res = {"ppl": perplexity(model, w, a.batch_size)}
    if a.task_items and tok is not None:
        res["acc"] = multiple_choice_accuracy(model, tok, load_wordnet("heldout"), limit=a.task_items)
    return res


def _sparsity(model) -> float:
    from .convert import seft_layers

    layers = seft_layers(model)
    if layers:
        nnz = sum(l.nnz for l in layers.values())
        return 1.0 - nnz / sum(l.out_features * l.in_features for l in layers.values())
    from .prune_llm import decoder_layers

    ws = [m.weight for m in decoder_layers(model).modules() if isinstance(m, torch.nn.Linear)]
    return 1.0 - sum(int((w != 0).sum()) for w in ws) / sum(w.numel() for w in ws)


def export_dense(model, tokenizer, folder: Path) -> None:
    """Replace every SEFTLinear by an nn.Linear holding theta + delta and save a plain HF folder."""
    from .convert import seft_layers

    for name, layer in seft_layers(model).items():
        parent, _, attr = name.rpartition(".")
        lin = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                              dtype=layer.theta.dtype)
        with torch.no_grad():
            lin.weight.copy_(layer.to_dense())
            if layer.bias is not None:
                lin.bias.copy_(layer.bias)
        setattr(model.get_submodule(parent) if parent else model, attr, lin)
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if folder.exists():
        import shutil
        shutil.rmtree(folder)
    tmp.rename(folder)


def cmd_run(a) -> int:
    from . import checkpoint
    from .config import SEFTConfig
    from .convert import convert_to_seft
    from .data import load_text, token_windows
    from .evolve import SEFTController
    from .models import load_model
    from .prune_llm import prune_model

    rank, world, device = _init_distributed(a.device)
    main_rank = rank == 0
    progress = not a.no_progress and main_rank
    out = Path(a.out)
    torch.manual_seed(a.seed)
    t_start = time.time()
    say = (lambda *m: print("seft:", *m, flush=True)) if progress else (lambda *m: None)
    run_args = {k: getattr(a, k) for k in RESUME_KEYS}
    run_args["world_size"] = world
    resume = None
    if a.resume:
        info, tensor_file = checkpoint.latest(Path(a.resume))
        saved = info["meta"]["args"]
        diff = [f"--{k.replace('_', '-')} was {saved.get(k)!r}, now {run_args[k]!r}" for k in RESUME_KEYS
                if saved.get(k) != run_args[k]]
        if saved.get("world_size", 1) != world:
            diff.append(f"world size was {saved.get('world_size', 1)}, now {world}")
        if diff:
            raise ValueError("--resume with a different configuration: " + "; ".join(diff))
        resume = (info, tensor_file)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = load_model(a.model, DTYPES[a.dtype], progress)
    model.to(device)
    if tok is None:
        raise SystemExit(f"seft: --model {a.model} has no tokenizer")
    train_text, heldout = load_text(a.data)
    train = token_windows(tok, train_text, a.seq_len)
    scope, nm = PATTERNS[a.pattern]
    g = torch.Generator().manual_seed(a.seed)
    cfg = SEFTConfig(sparsity=a.sparsity, budget=a.budget, nm_n=nm[0], nm_m=nm[1],
                     method={"none": "fixed", "masked-dense": "seft"}.get(a.method, a.method),
                     update_interval=a.update_interval,
                     lora_rank=a.lora_rank, seed=a.seed)
    if resume is None:
        summary = {"model": a.model, "data": a.data, "method": a.method, "prune": a.prune, "pattern": a.pattern,
                   "budget": a.budget,
                   "sparsity_target": a.sparsity, "steps": a.steps, "seq_len": a.seq_len,
                   "batch_size": a.batch_size, "lr": a.lr, "seed": a.seed, "threads": torch.get_num_threads()}
        say("evaluating the dense model")
        dense = _evaluate(model, tok, heldout, a, progress)
        summary.update(ppl_dense=dense["ppl"], acc_dense=dense.get("acc"))
        calib = train[torch.randperm(train.shape[0], generator=g)[:a.calib_windows]]
        if a.prune == "existing":
            from .prune_llm import existing_masks

            masks = existing_masks(model)
        else:
            say(f"pruning with {a.prune} to {a.sparsity:.0%} ({a.pattern})")
            masks = prune_model(model, a.prune, a.sparsity, scope, nm,
                                calibration=[calib[i:i + a.batch_size].to(device)
                                             for i in range(0, calib.shape[0], a.batch_size)],
                                progress=progress)
        pruned = _evaluate(model, tok, heldout, a, progress)
        summary.update(ppl_pruned=pruned["ppl"], acc_pruned=pruned.get("acc"), topology_changes=0,
                       train_seconds=0.0)
        start = 1
    else:
        info, tensor_file = resume
        summary = info["meta"]["summary"]
        say(f"resuming from step {info['step']} of {a.resume}")
        tensors = checkpoint.restore(info, tensor_file, model)
        model.to(device)
        start = info["step"] + 1
    train_seconds = summary["train_seconds"]
    if a.method != "none" and a.steps > 0:
        if resume is None:
            convert_to_seft(model, cfg, masks=masks, dense_compute=a.method == "masked-dense")
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=a.lr, weight_decay=0.0)
        ctl = SEFTController(model, opt, cfg, a.steps, process_group="auto" if world > 1 else None)
        # DDP over the deltas; the buffers (topology) stay in step through the controller
        net = model
        if world > 1:
            ids = [device.index] if device.type == "cuda" else None
            net = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
        if resume is not None:
            checkpoint.restore_training(info, tensors, opt, ctl, g)
        model.train()
        try:
            from tqdm.auto import tqdm
            bar = tqdm(total=a.steps, initial=start - 1, desc=f"train {a.method}", unit="step",
                       disable=not progress)
        except ImportError:  # pragma: no cover
            bar = None
        t0 = time.time() - train_seconds
        delay = float(os.environ.get("SEFT_DEBUG_STEP_DELAY", "0"))  # slows the loop, for kill tests
        with open(out / "log.jsonl", "a" if resume else "w") if main_rank else open(os.devnull, "w") as log:
            for step in range(start, a.steps + 1):
                # the global batch is batch_size x world windows; each rank takes its share
                idx = torch.randint(0, train.shape[0], (a.batch_size * world,), generator=g)[rank::world]
                batch = train[idx].to(device)
                loss = net(input_ids=batch, labels=batch, use_cache=False).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                report = ctl.step()
                if report:
                    summary["topology_changes"] += sum(r.get("grown", 0) for r in report.values())
                if step % a.log_every == 0 or step == a.steps:
                    log.write(json.dumps({"step": step, "loss": round(loss.item(), 5),
                                          "seconds": round(time.time() - t0, 2),
                                          "topology_changes": summary["topology_changes"]}) + "\n")
                    log.flush()
                if a.checkpoint_every and (step % a.checkpoint_every == 0 or step == a.steps) and main_rank:
                    summary["train_seconds"] = round(time.time() - t0, 2)
                    checkpoint.save(out, step, model, opt, ctl, g, {"args": run_args, "summary": summary},
                                    keep=a.keep_checkpoints)
                if delay:
                    time.sleep(delay)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss.item():.3f}")
        if bar is not None:
            bar.close()
        train_seconds = time.time() - t0
    final = _evaluate(model, tok, heldout, a, progress)
    summary.update(ppl_final=final["ppl"], acc_final=final.get("acc"), sparsity_final=_sparsity(model),
                   train_seconds=round(train_seconds, 2), total_seconds=round(time.time() - t_start, 2),
                   peak_memory_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _peak_rss(),
                   device=str(device))
    if not main_rank:  # only rank 0 writes
        return 0
    if not a.no_export:
        from .convert import seft_layers
        from .hf import export_sparse

        if seft_layers(model):
            export_sparse(model, out / "sparse.safetensors")
        export_dense(model, tok, out / "dense")
    summary["world_size"] = world
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, out / "summary.json")
    _print_summary(summary)
    return 0


def _init_distributed(device: str) -> tuple[int, int, torch.device]:
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


def _peak_rss() -> int:
    try:
        import resource
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except (ImportError, OSError):  # pragma: no cover
        return -1


def _print_summary(s: dict) -> None:
    def f(v, pct=False):
        return "-" if v is None else (f"{v:.1%}" if pct else f"{v:.2f}")

    print(f"\n{'':10}{'perplexity':>12}{'accuracy':>10}")
    for stage in ("dense", "pruned", "final"):
        print(f"{stage:10}{f(s.get('ppl_' + stage)):>12}{f(s.get('acc_' + stage), True):>10}")
    print(f"method {s['method']}, prune {s['prune']} {s['pattern']}, sparsity {s['sparsity_final']:.3f} "
          f"(target {s['sparsity_target']}), {s['steps']} steps in {s['train_seconds']} s, "
          f"{s['topology_changes']} grown entries, {s['total_seconds']} s in all", flush=True)


def cmd_prune(a) -> int:
    a.method, a.steps = "none", 0
    return cmd_run(a)


def cmd_train(a) -> int:
    return cmd_run(a)


def cmd_export(a) -> int:
    """The newest intact checkpoint of --run as DIR/dense (HF folder) and DIR/sparse.safetensors."""
    from . import checkpoint
    from .hf import export_sparse
    from .models import load_model

    info, tensor_file = checkpoint.latest(Path(a.run))
    saved = info["meta"]["args"]
    model, tok = load_model(saved["model"], DTYPES[saved.get("dtype", "fp32")], not a.no_progress)
    checkpoint.restore(info, tensor_file, model)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    export_sparse(model, out / "sparse.safetensors")
    sparsity = _sparsity(model)
    export_dense(model, tok, out / "dense")
    print(f"seft: exported step {info['step']} of {a.run} to {out}/dense and {out}/sparse.safetensors "
          f"(sparsity {sparsity:.4f})")
    return 0


def cmd_eval(a) -> int:
    from .data import load_text
    from .models import load_model

    model, tok = load_model(a.model, progress=not a.no_progress)
    _, heldout = load_text(a.data)
    res = _evaluate(model, tok, heldout, a, not a.no_progress)
    res["sparsity"] = _sparsity(model)
    print(json.dumps(res, indent=2))
    return 0


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    _check_args(a)
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        return {"run": cmd_run, "prune": cmd_prune, "train": cmd_train, "eval": cmd_eval,
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
