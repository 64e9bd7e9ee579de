"""The driver's training phase: convert (or, with --method lora, put the LoRA on), optimizer,
controller, DDP, then the loop with logging, checkpoints and a progress bar (see ``pipeline.train``)."""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import torch

from .pipeline import Interrupted, JobError, run_args


class TrainLoop:
    """One training phase of a ``pipeline.Job``."""

    def __init__(self, job):
        from .convert import convert_to_seft
        from .evolve import SEFTController

        self.job, a = job, job.opts
        if a.method == "lora":
            add_driver_lora(job)
        elif job.resume is None:
            convert_to_seft(job.model, job.config, masks=job.masks, dense_compute=a.method == "masked-dense")
            job.masks = None  # in the layers' patterns now (one bool per weight of every decoder linear)
        if getattr(a, "gradient_checkpointing", False):
            enable_checkpointing(job.model)
        params = [p for p in job.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
        self.ctl = NoEvolution() if a.method == "lora" else \
            SEFTController(job.model, self.opt, job.config, a.steps, process_group="auto" if job.world > 1 else None)
        self.net = self._wrap_ddp()
        self.start = 1
        if job.resume is not None:
            from . import checkpoint

            info, tensors, tensor_file = job.resume
            checkpoint.restore_training(info, tensors, self.opt, self.ctl, job.data_rng, tensor_file)
            self.start = info["step"] + 1
        self.run_args = run_args(a, job.world, job.fingerprint)
        self.saved_step = 0  # the step of the last checkpoint written

    def _wrap_ddp(self):
        """DDP over the deltas; the buffers (topology) stay in step through the controller."""
        from .loss import CausalLMLoss

        job = self.job
        net = CausalLMLoss(job.model)  # the lm_head and loss per chunk of tokens
        if job.world <= 1:
            return net
        from .persist import keep_sparse_buffers_out_of_ddp

        keep_sparse_buffers_out_of_ddp(net)  # the pattern buffers are never broadcast
        ids = [job.device.index] if job.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(net, device_ids=ids)

    def run(self) -> None:
        job, a = self.job, self.job.opts
        job.model.train()
        bar = _progress_bar(a.steps, self.start - 1, f"train {a.method}", job.progress)
        self.t0 = time.time() - job.train_seconds
        delay = float(os.environ.get("SEFT_DEBUG_STEP_DELAY", "0"))  # slows the loop, for kill tests
        try:
            with self._open_log() as log, _DeferredInterrupt(job.world == 1) as interrupt:
                for step in range(self.start, a.steps + 1):
                    loss = self.step(step)
                    self._log(log, step, loss)
                    self._maybe_checkpoint(step)
                    if interrupt.requested:
                        self._stop(step)
                    if delay:
                        time.sleep(delay)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{loss.item():.3f}")
        finally:
            if bar is not None:
                bar.close()
        job.train_seconds = time.time() - self.t0

    def step(self, step: int) -> torch.Tensor:
        """One optimizer step on this rank's share of the global batch, then the controller."""
        job, a = self.job, self.job.opts
        # the global batch is batch_size x world windows; each rank takes its share
        n = len(job.train_data)
        idx = torch.randint(0, n, (a.batch_size * job.world,), generator=job.data_rng)[job.rank::job.world]
        ids, labels = job.train_data.batch(idx)  # labels: None (text), or -100 outside the completions (task)
        loss = self.net(ids.to(job.device), None if labels is None else labels.to(job.device))
        loss.backward()
        self._check_finite(step, loss)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        report = self.ctl.step()
        if report:
            _count_evolution(job.summary, report)
        return loss

    def _agree(self, ok: bool) -> bool:
        """True when ``ok`` holds on every rank."""
        if self.job.world <= 1:
            return ok
        from .distributed import all_agree

        return all_agree(ok, self.ctl.group)

    def _check_finite(self, step: int, loss: torch.Tensor) -> None:
        """A non-finite loss on any rank stops the run on every rank, before the optimizer step."""
        if not self._agree(bool(torch.isfinite(loss.detach()))):
            raise JobError(f"the loss at step {step} is {loss.item()} on rank {self.job.rank} (or NaN / Inf on "
                           f"another rank); the run stops there (lower --lr, or check the data){self._resume_hint()}")

    def _resume_hint(self) -> str:
        return f"; the newest checkpoint is of step {self.saved_step}" if self.saved_step else ""

    def _stop(self, step: int) -> None:
        """Ctrl-C: a checkpoint of this step (with --checkpoint-every), then stop."""
        if self.job.opts.checkpoint_every and self.saved_step != step:
            self._maybe_checkpoint(step, force=True)
        raise Interrupted(step)

    def _open_log(self):
        job = self.job
        if not job.main_rank:
            return open(os.devnull, "w")
        path = job.out / "log.jsonl"
        if job.resume:
            _cut_log(path, self.start - 1)
        return open(path, "a" if job.resume else "w")

    def _log(self, log, step: int, loss: torch.Tensor) -> None:
        a = self.job.opts
        if step % a.log_every == 0 or step == a.steps:
            log.write(json.dumps({"step": step, "loss": round(loss.item(), 5),
                                  "seconds": round(time.time() - self.t0, 2),
                                  "topology_changes": self.job.summary["topology_changes"]}, allow_nan=False) + "\n")
            log.flush()

    def _maybe_checkpoint(self, step: int, force: bool = False) -> None:
        """Rank 0 writes the checkpoint; every rank learns whether it could, and all stop if not."""
        from . import checkpoint

        job, a = self.job, self.job.opts
        if not (a.checkpoint_every and (force or step % a.checkpoint_every == 0 or step == a.steps)):
            return
        error = None
        if job.main_rank:
            job.summary["train_seconds"] = round(time.time() - self.t0, 2)
            try:
                checkpoint.save(job.out, step, job.model, self.opt, self.ctl, job.data_rng,
                                {"run_id": job.run_id, "args": self.run_args, "summary": job.summary},
                                keep=a.keep_checkpoints)
            except Exception as e:  # noqa: BLE001 - reported to every rank below
                error = e
        if not self._agree(error is None):
            why = f"{type(error).__name__}: {error}" if error is not None else "rank 0 failed to write it"
            raise JobError(f"could not write the checkpoint of step {step} ({why}){self._resume_hint()}") from error
        self.saved_step = step


def add_driver_lora(job) -> None:
    """--method lora: a PEFT LoRA on every decoder linear of the pruned model (stored dense), its
    rank matching SEFT's trainable budget (``lora.lora_rank_for``); ``job.model`` keeps the
    adapter layers, ``job.peft`` is the PEFT model around it."""
    from .lora import add_lora, lora_rank_for

    rank = lora_rank_for(job.model, job.config)
    job.peft = add_lora(job.model, rank)
    job.summary["lora_rank"] = rank
    job.say(f"LoRA of rank {rank} on every decoder linear")


class NoEvolution:
    """The controller of a method without evolution (lora): no topology, nothing to step."""

    group = None  # the ranks agree over the default process group

    def step(self):
        return None


def enable_checkpointing(model) -> None:
    """Activation checkpointing of the decoder layers (Hugging Face's, non-reentrant: the frozen
    embeddings need not require gradients). The recomputed forward does not feed the evolution
    window: only backward does (``SEFTLinear.feed_window``), once per layer and backward pass."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise JobError(f"--gradient-checkpointing: {type(model).__name__} does not support it")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name for it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _cut_log(path, step: int) -> None:
    """Keep the lines of DIR/log.jsonl up to ``step`` (a resumed run writes the later ones again)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            pass  # a line cut short by a kill
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


class _DeferredInterrupt:
    """In a single process, the first Ctrl-C lets the current step finish (the loop then stops
    cleanly); a second one interrupts at once. Under torchrun Ctrl-C interrupts at once."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested = False
        self.previous = None

    def __enter__(self):
        if self.enabled:
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, self.previous)

    def __exit__(self, *exc):
        if self.enabled:
            signal.signal(signal.SIGINT, self.previous)
        return False


def _progress_bar(total: int, initial: int, desc: str, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, initial=initial, desc=desc, unit="step", disable=not enabled)


# summary field <- the evolution report's count it sums over layers and steps
EVOLUTION_COUNTS = {"topology_changes": "grown", "reactivated": "reactivated", "adapt_pruned": "pruned"}


def _count_evolution(summary: dict, report: dict) -> None:
    """Adds an evolution step's counts over layers to the summary (grown entries, re-activated
    positions of pruned base weights, base weights pruned by adapt)."""
    for key, count in EVOLUTION_COUNTS.items():
        if summary.get(key, 0) is not None:  # None: resumed from a checkpoint that did not count it
            summary[key] = summary.get(key, 0) + sum(r.get(count, 0) for r in report.values())
