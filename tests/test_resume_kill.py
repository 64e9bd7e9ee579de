"""Exact resume after real SIGKILLs of a `seft run` child process, and a 2-rank torchrun."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402


def run_cmd(d, data, out, steps, every, *extra):
    return [sys.executable, "-m", "seft_ext.cli", "run", "--model", str(d), "--data", str(data), "--sparsity", "0.5",
            "--pattern", "row", "--prune", "wanda", "--method", "seft", "--steps", str(steps), "--seq-len", "16",
            "--batch-size", "4", "--lr", "1e-2", "--update-interval", "4", "--lora-rank", "1", "--calib-windows",
            "8", "--eval-windows", "4", "--task-items", "0", "--no-progress", "--checkpoint-every", str(every),
            "--out", str(out), *extra]


def straight_run(d, data, out, steps, every):
    subprocess.run(run_cmd(d, data, out, steps, every), check=True, capture_output=True)
    return out


def same_weights(a, b):
    x, y = load_file(str(a / "dense" / "model.safetensors")), load_file(str(b / "dense" / "model.safetensors"))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_sigkill_then_resume_is_bit_identical(tiny_model_dir, tmp_path):
    d, data = tiny_model_dir
    straight = straight_run(d, data, tmp_path / "straight", 20, 10)
    killed = tmp_path / "killed"
    env = dict(os.environ, SEFT_DEBUG_STEP_DELAY="0.3")
    proc = subprocess.Popen(run_cmd(d, data, killed, 20, 10), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    marker = killed / "checkpoints" / "step-10.json"
    deadline = time.time() + 120
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert marker.exists(), "the run never wrote its step-10 checkpoint"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (killed / "summary.json").exists()  # killed before the end
    subprocess.run(run_cmd(d, data, killed, 20, 10, "--resume", str(killed)), check=True, capture_output=True)
    assert same_weights(straight, killed)
    a = json.loads((straight / "summary.json").read_text())
    b = json.loads((killed / "summary.json").read_text())
    assert a["ppl_final"] == b["ppl_final"] and a["topology_changes"] == b["topology_changes"]


def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(tiny_model_dir, tmp_path):
    d, data = tiny_model_dir
    straight = straight_run(d, data, tmp_path / "straight", 10, 5)
    crashed = tmp_path / "crashed"
    env = dict(os.environ, SEFT_DEBUG_KILL_IN_SAVE="10")
    proc = subprocess.run(run_cmd(d, data, crashed, 10, 5), env=env, capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    names = sorted(p.name for p in (crashed / "checkpoints").iterdir())
    assert names == ["step-10.safetensors.tmp", "step-5.json", "step-5.safetensors"]
    subprocess.run(run_cmd(d, data, crashed, 10, 5, "--resume", str(crashed)), check=True, capture_output=True)
    assert same_weights(straight, crashed)


def test_torchrun_two_ranks(tiny_model_dir, tmp_path):
    d, data = tiny_model_dir
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "seft_ext.cli"] + run_cmd(d, data, out, 16, 8)[3:]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["world_size"] == 2 and s["sparsity_final"] == pytest.approx(0.5) and s["topology_changes"] > 0
    # the evolution steps (4 and 8; at 12 = 0.75 * 16 the cosine is 0) ran on both ranks with
    # equal topology hashes, or the controller would have raised; only rank 0 wrote
    assert len((out / "log.jsonl").read_text().splitlines()) == 2  # steps 10 and 16 (--log-every 10)
