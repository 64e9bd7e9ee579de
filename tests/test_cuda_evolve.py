"""The evolution ops on CUDA tensors against the CPU ops on the same inputs, a SEFT layer
evolving on CUDA against the same layer on the CPU, and `seft run --device cuda` end to end.

Skipped without a CUDA device (and without a library built with CUDA kernels).
"""
from __future__ import annotations

import json
import warnings

import pytest
import torch

from cuda_env import require_cuda_build

require_cuda_build()

from seft_ext import CSRWeight, SEFTConfig, SEFTController, SEFTLinear  # noqa: E402
from seft_ext.prune import magnitude_mask  # noqa: E402

ops = torch.ops.seft


def make_layer(out, inn, scope, dtype, seed, method="seft"):
    torch.manual_seed(seed)
    w = torch.randn(out, inn, dtype=torch.float64)
    return SEFTLinear(CSRWeight.from_dense(w, magnitude_mask(w, 0.6, scope, (2, 4)), dtype=dtype),
                      k=max(2, out * inn // 25), budget=scope, method=method, seed=seed)


def scan_args(layer, dy, x, scope):
    return (dy, x, layer.crow, layer.col, layer.theta, layer.delta_slots, 40, 30, scope, 2, 4, True, 0, 0)


def to_cuda(args):
    return tuple(a.cuda() if torch.is_tensor(a) else a for a in args)


@pytest.mark.parametrize("scope", ["layer", "row", "nm"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_grow_scan_matches_cpu(scope, dtype):
    layer = make_layer(48, 64, scope, dtype, 1)
    dy, x = torch.randn(17, 48, dtype=dtype), torch.randn(17, 64, dtype=dtype)
    pos_c, g_c, _, fin_c = ops.csr_grow_scan(*scan_args(layer, dy, x, scope))
    pos_g, g_g, nbytes, fin_g = ops.csr_grow_scan(*to_cuda(scan_args(layer, dy, x, scope)))
    assert fin_c and fin_g and nbytes > 0 and pos_g.is_cuda
    if dtype == torch.float64:
        assert torch.equal(pos_g.cpu(), pos_c)
        torch.testing.assert_close(g_g.cpu(), g_c, rtol=1e-12, atol=1e-12)
    else:  # cuBLAS and the CPU GEMM round differently: the sets agree up to near-ties
        common = set(pos_c.tolist()) & set(pos_g.tolist())
        assert len(common) >= 0.95 * pos_c.numel()
        G = (dy.double().T @ x.double()).flatten()
        torch.testing.assert_close(g_g.cpu().double(), G[pos_g.cpu()], rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("scope", ["layer", "row", "nm"])
@pytest.mark.parametrize("method", ["seft", "spiel"])
def test_drop_grow_adapt_matches_cpu(scope, method):
    layer = make_layer(24, 32, scope, torch.float32, 2, method)
    dy, x = torch.randn(9, 24), torch.randn(9, 32)
    tracked, g, _, _ = ops.csr_grow_scan(*scan_args(layer, dy, x, scope))
    delta = torch.randn(layer.k)
    cpu = [layer.crow.clone(), layer.col.clone(), layer.theta.clone(), layer.delta_slots.clone(), delta.clone()]
    gpu = [t.cuda() for t in cpu]
    rest = (tracked, g, layer.k // 3, 32, scope, 2, 4, method == "seft")
    remap_c, counts_c = ops.csr_drop_grow_adapt_(*cpu, *rest)
    remap_g, counts_g = ops.csr_drop_grow_adapt_(*gpu, *to_cuda(rest))
    assert remap_g.is_cuda and torch.equal(remap_g.cpu(), remap_c) and torch.equal(counts_g.cpu(), counts_c)
    for a, b in zip(cpu, gpu):
        assert torch.equal(a, b.cpu())


def test_slot_union_matches_cpu():
    layer = make_layer(16, 32, "layer", torch.float32, 3)
    taken = set(layer.slot_positions().tolist())
    free = torch.tensor([p for p in range(0, 16 * 32, 7) if p not in taken])
    args = (layer.crow, layer.col, layer.delta_slots, free, 32)
    for a, b in zip(ops.csr_slot_union(*args), ops.csr_slot_union(*to_cuda(args))):
        assert b.is_cuda and torch.equal(a, b.cpu())


@pytest.mark.parametrize("scope", ["layer", "row"])
def test_layer_evolves_like_on_cpu(scope):
    """Training steps with evolution, fp64: the same topology and values on both devices."""
    cfg = SEFTConfig(sparsity=0.6, budget=scope, update_interval=3, grow_accumulation=2, scan_sketch=0)
    runs = []
    for dev in ("cpu", "cuda"):
        layer = make_layer(24, 40, scope, torch.float64, 4).to(dev)
        opt = torch.optim.AdamW([layer.delta], lr=1e-2)
        ctl = SEFTController(torch.nn.Sequential(layer), opt, cfg, total_steps=12)
        g = torch.Generator().manual_seed(0)
        for _ in range(12):
            x = torch.randn(10, 40, dtype=torch.float64, generator=g).to(dev)
            layer(x).pow(2).sum().backward()
            opt.step()
            opt.zero_grad()
            ctl.step()
        runs.append([t.detach().cpu() for t in (layer.crow, layer.col, layer.theta, layer.delta_slots, layer.delta)])
    assert ctl.history  # something evolved
    for a, b in zip(runs[0], runs[1]):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
        else:
            assert torch.equal(a, b)


def test_seft_run_on_cuda(tiny_model_dir, tmp_path):
    from seft_ext.cli import main

    d, data = tiny_model_dir
    out = tmp_path / "run"
    rc = main(["run", "--model", str(d), "--data", str(data), "--device", "cuda", "--sparsity", "0.5",
               "--method", "seft", "--steps", "12", "--seq-len", "16", "--batch-size", "4", "--lr", "1e-2",
               "--update-interval", "4", "--lora-rank", "1", "--calib-windows", "8", "--eval-windows", "4",
               "--task-items", "0", "--checkpoint-every", "6", "--out", str(out), "--no-progress"])
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["device"].startswith("cuda") and s["topology_changes"] > 0
    assert s["sparsity_final"] == pytest.approx(0.5)
    assert s["ppl_final"] < s["ppl_pruned"]


def test_torchrun_two_ranks_on_cuda(tiny_model_dir, tmp_path):
    """Two ranks with the model on CUDA: DDP over CUDA deltas, the window statistics shared and
    the topology hashes compared (the run raises if they differ). With one GPU both ranks share
    it through gloo (NCCL refuses two ranks on one device), whose collectives then go through
    the CPU; with two GPUs this is the NCCL path."""
    import os
    import subprocess
    import sys

    d, data = tiny_model_dir
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "seft_ext.cli",
           "run", "--model", str(d), "--data", str(data), "--device", "cuda", "--sparsity", "0.5", "--method", "seft",
           "--steps", "12", "--seq-len", "16", "--batch-size", "2", "--lr", "1e-2", "--update-interval", "4",
           "--lora-rank", "1", "--calib-windows", "8", "--eval-windows", "4", "--task-items", "0", "--out", str(out),
           "--no-progress", "--no-export"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if torch.cuda.device_count() < 2:
        env["SEFT_DIST_BACKEND"] = "gloo"
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["world_size"] == 2 and s["device"].startswith("cuda") and s["topology_changes"] > 0


def bf16_stack(n_layers, update_interval):
    """n bf16 SEFT layers (48 x 64) on CUDA, AdamW, a controller over 8 steps, 80 tokens of input."""
    cfg = SEFTConfig(sparsity=0.6, budget="layer", update_interval=update_interval, grow_accumulation=1,
                     scan_sketch=0)
    layers = [make_layer(48, 64, "layer", torch.bfloat16, s).cuda() for s in range(n_layers)]
    model = torch.nn.Sequential(*layers)
    opt = torch.optim.AdamW([m.delta for m in layers], lr=1e-2)
    ctl = SEFTController(model, opt, cfg, total_steps=8)
    return model, opt, ctl, torch.randn(80, 64, device="cuda", dtype=torch.bfloat16)


def test_evolution_step_synchronises_once():
    """All layers' decisions share one device -> host wait (the controller's stream sync); the
    ops themselves read nothing back once their patterns are checked."""
    model, opt, ctl, x = bf16_stack(4, update_interval=2)
    syncs = []
    for t in range(1, 7):
        model(x).float().pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
        if ctl.is_evolution_step(t) and t > 2:  # the first evolution checks the new patterns
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
            with warnings.catch_warnings(record=True) as rec:
                warnings.simplefilter("always")
                report = ctl.step()
            torch.cuda.set_sync_debug_mode(0)
            syncs.append(sum("synchroniz" in str(r.message) for r in rec))
            assert all("skipped" not in v for v in report.values()), report
        else:
            ctl.step()
    assert syncs and all(n <= 1 for n in syncs), syncs


def test_training_step_after_evolution_does_not_synchronise():
    """The controller adopts each new pattern after checking it on the host, so the forward and
    backward after an evolution step (outside an evolution window) read nothing back."""
    model, opt, ctl, x = bf16_stack(3, update_interval=4)
    for t in range(1, 6):
        if t == 5:  # the step after the evolution at t = 4; the next window starts at t = 8
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            model(x).float().pow(2).sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        opt.step()
        opt.zero_grad()
        report = ctl.step()
        if t == 4:
            assert report and all("skipped" not in v for v in report.values()), report
