"""Two gloo processes under DDP keep the same topology over several evolution steps, and
stay close to one process on the same global batch."""
import gc
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from seft_ext import CSRWeight, SEFTConfig, SEFTController, SEFTLinear
from seft_ext.distributed import topology_hash
from seft_ext.prune import magnitude_mask

STEPS, GLOBAL_BATCH = 16, 8


def make_model():
    g = torch.Generator().manual_seed(0)
    layers = []
    for out, inn in [(24, 16), (8, 24)]:
        w = torch.randn(out, inn, generator=g, dtype=torch.float64)
        layers.append(SEFTLinear(CSRWeight.from_dense(w, magnitude_mask(w, 0.6)), 30, seed=1))
    return nn.Sequential(layers[0], nn.Tanh(), layers[1])


def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(GLOBAL_BATCH, 16, generator=g, dtype=torch.float64),
             torch.randn(GLOBAL_BATCH, 8, generator=g, dtype=torch.float64)) for _ in range(STEPS)]


def train(rank, world, group_kw):
    model = make_model()
    seft_layers = [model[0], model[2]]
    net = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False) if world > 1 else model
    opt = torch.optim.AdamW([m.delta for m in seft_layers], lr=2e-2)
    cfg = SEFTConfig(update_interval=3, grow_accumulation=2, scan_sketch=0)
    ctl = SEFTController(model, opt, cfg, STEPS, **group_kw)
    first_window = record_first_window(ctl)
    losses, evolutions = [], 0
    for x, y in batches():
        xs, ys = x[rank::world], y[rank::world]
        loss = ((net(xs) - ys) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        if ctl.step():
            evolutions += 1
        if world > 1:
            loss = loss.detach().clone()
            dist.all_reduce(loss)
            loss = loss / world
        losses.append(loss.item())
    return {"losses": losses, "hash": topology_hash(seft_layers), "evolutions": evolutions, "window": first_window,
            "history": [(t, {n: r.get("grown", 0) for n, r in rep.items()}) for t, rep in ctl.history]}


def record_first_window(ctl):
    """{layer: {tracked position: summed g}} as the first evolution decides on it (after the
    ranks' all-reduce, when there is one)."""
    seen, evolve_all = {}, ctl._evolve_all

    def recording(t):
        if not seen:
            for name, layer in ctl.layers.items():
                w = layer.window
                seen[name] = dict(zip(map(str, w.tracked.tolist()), w.gsum.tolist()))
        return evolve_all(t)
    ctl._evolve_all = recording
    return seen


def worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        res = train(rank, world, {"process_group": "auto"})
        gc.collect()  # DDP's reducer (kept by reference cycles) goes before its process group
        dist.barrier()
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_ranks_keep_one_topology(tmp_path):
    mp.start_processes(worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="spawn")
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["evolutions"] == r1["evolutions"] == 3  # steps 3, 6, 9 (at 12 = 0.75 * 16 the cosine is 0)
    assert r0["hash"] == r1["hash"]
    assert r0["history"] == r1["history"]
    assert sum(v for _, rep in r0["history"] for v in rep.values()) > 0
    single = train(0, 1, {})
    # Before the first evolution the runs are the same computation (DDP averages the halves'
    # gradients). After it the topologies may differ: the ranks track the union of their own
    # candidates, one process those of the global batch. The losses stay close.
    for a, b in zip(r0["losses"][:3], single["losses"][:3]):
        assert abs(a - b) <= 1e-9 * abs(b)
    # The window sums the decision and the optimizer seeding use: over the 2 ranks they are the
    # sums of the whole global batch's gradients, as one process gathers them (at the positions
    # both track; the ranks track the union of their own candidates).
    common = 0
    for name, sums in single["window"].items():
        for pos, g in sums.items():
            if pos in r0["window"][name]:
                common += 1
                assert abs(r0["window"][name][pos] - g) <= 1e-9 * abs(g) + 1e-15, (name, pos)
    assert common > 0
    assert r0["window"] == r1["window"]
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    print("2 ranks:", r0["losses"], "\n1 process:", single["losses"])
    assert abs(mean(r0["losses"]) - mean(single["losses"])) <= 0.05 * mean(single["losses"])
