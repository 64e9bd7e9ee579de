"""The driver's training phase: convert, optimizer, controller, DDP, then the loop with
logging, checkpoints and a progress bar (see ``pipeline.train``)."""
from __future__ import annotations

import json
import os
import time

import torch

from .pipeline import run_args


class TrainLoop:
    """One training phase of a ``pipeline.Job``."""

    def __init__(self, job):
        from .convert import convert_to_seft
        from .evolve import SEFTController

        self.job, a = job, job.opts
        if job.resume is None:
            convert_to_seft(job.model, job.config, masks=job.masks, dense_compute=a.method == "masked-dense")
        params = [p for p in job.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
        self.ctl = SEFTController(job.model, self.opt, job.config, a.steps,
                                  process_group="auto" if job.world > 1 else None)
        self.net = self._wrap_ddp()
        self.start = 1
        if job.resume is not None:
            from . import checkpoint

            info, tensors = job.resume
            checkpoint.restore_training(info, tensors, self.opt, self.ctl, job.data_rng)
            self.start = info["step"] + 1
        self.run_args = run_args(a, job.world)

    def _wrap_ddp(self):
        """DDP over the deltas; the buffers (topology) stay in step through the controller."""
        job = self.job
        if job.world <= 1:
            return job.model
        from .persist import keep_sparse_buffers_out_of_ddp

        keep_sparse_buffers_out_of_ddp(job.model)  # the pattern buffers are never broadcast
        ids = [job.device.index] if job.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(job.model, device_ids=ids)

    def run(self) -> None:
        job, a = self.job, self.job.opts
        job.model.train()
        bar = _progress_bar(a.steps, self.start - 1, f"train {a.method}", job.progress)
        self.t0 = time.time() - job.train_seconds
        delay = float(os.environ.get("SEFT_DEBUG_STEP_DELAY", "0"))  # slows the loop, for kill tests
        with self._open_log() as log:
            for step in range(self.start, a.steps + 1):
                loss = self.step()
                self._log(log, step, loss)
                self._maybe_checkpoint(step)
                if delay:
                    time.sleep(delay)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss.item():.3f}")
        if bar is not None:
            bar.close()
        job.train_seconds = time.time() - self.t0

    def step(self) -> torch.Tensor:
        """One optimizer step on this rank's share of the global batch, then the controller."""
        job, a = self.job, self.job.opts
        # the global batch is batch_size x world windows; each rank takes its share
        n = job.train_windows.shape[0]
        idx = torch.randint(0, n, (a.batch_size * job.world,), generator=job.data_rng)[job.rank::job.world]
        batch = job.train_windows[idx].to(job.device)
        loss = self.net(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        report = self.ctl.step()
        if report:
            job.summary["topology_changes"] += sum(r.get("grown", 0) for r in report.values())
        return loss

    def _open_log(self):
        job = self.job
        if not job.main_rank:
            return open(os.devnull, "w")
        return open(job.out / "log.jsonl", "a" if job.resume else "w")

    def _log(self, log, step: int, loss: torch.Tensor) -> None:
        a = self.job.opts
        if step % a.log_every == 0 or step == a.steps:
            log.write(json.dumps({"step": step, "loss": round(loss.item(), 5),
                                  "seconds": round(time.time() - self.t0, 2),
                                  "topology_changes": self.job.summary["topology_changes"]}) + "\n")
            log.flush()

    def _maybe_checkpoint(self, step: int) -> None:
        from . import checkpoint

        job, a = self.job, self.job.opts
        if a.checkpoint_every and (step % a.checkpoint_every == 0 or step == a.steps) and job.main_rank:
            job.summary["train_seconds"] = round(time.time() - self.t0, 2)
            checkpoint.save(job.out, step, job.model, self.opt, self.ctl, job.data_rng,
                            {"args": self.run_args, "summary": job.summary}, keep=a.keep_checkpoints)


def _progress_bar(total: int, initial: int, desc: str, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, initial=initial, desc=desc, unit="step", disable=not enabled)
