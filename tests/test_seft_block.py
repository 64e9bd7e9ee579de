"""SEFTBlockLinear: SEFT with r x c blocks. Forward / backward against a masked-dense fp64
reference, one evolution step against a plain-Python reference on the block grid, budget and
optimizer properties under the controller, state_dict and save / load round trips, a tiny LLaMA."""
import copy
import math

import pytest
import torch
from torch import nn

import seft_ext
from seft_ext import BSRWeight, SEFTBlockLinear, SEFTConfig, SEFTController, SparseLinear, convert_to_seft
from seft_ext.seft_block import _SEFTBlockFn, evolve_blocks_


def cdiv(a, b):
    return -(-a // b)


def random_block_layer(out, inn, block, density=0.5, k=3, seed=0, dtype=torch.float64, empty_row=None,
                       budget="layer", method="seft"):
    g = torch.Generator().manual_seed(seed)
    nbr, nbc = cdiv(out, block[0]), cdiv(inn, block[1])
    bmask = torch.rand(nbr, nbc, generator=g) < density
    bmask[0, 0] = True
    if empty_row is not None:
        bmask[empty_row] = False
    w = torch.randn(out, inn, generator=g, dtype=torch.float64)
    base = BSRWeight.from_dense(w, block, bmask, dtype=dtype)
    layer = SEFTBlockLinear(base, min(k, base.nnz_blocks), torch.randn(out, generator=g, dtype=torch.float64).to(dtype),
                            budget=budget, method=method, seed=seed)
    with torch.no_grad():  # a non-zero delta, zero in the padding like every trained one
        d = torch.randn(layer.delta.shape, generator=g, dtype=torch.float64)
        layer.delta.copy_(d * pad_mask(layer)[layer.slot_positions()])
    return layer


def pad_mask(layer):
    """[grid blocks, r, c]: 1 inside out x in, 0 in the padding."""
    (r, c), (nbr, nbc) = layer.block, layer.grid_shape
    m = torch.zeros(nbr * r, nbc * c, dtype=torch.float64)
    m[:layer.out_features, :layer.in_features] = 1
    return m.view(nbr, r, nbc, c).permute(0, 2, 1, 3).reshape(nbr * nbc, r, c)


def dense_of_blocks(layer, blocks_by_pos):
    """A dense (out, in) fp64 matrix from {grid position: r x c block}."""
    (r, c), (nbr, nbc) = layer.block, layer.grid_shape
    full = torch.zeros(nbr * r, nbc * c, dtype=torch.float64)
    for p, b in blocks_by_pos.items():
        i, j = divmod(p, nbc)
        full[i * r:(i + 1) * r, j * c:(j + 1) * c] = b.double()
    return full[:layer.out_features, :layer.in_features]


def layer_state(layer):
    """(theta by grid position, delta by grid position): the layer as plain dicts."""
    nbc = layer.grid_shape[1]
    rows = torch.repeat_interleave(torch.arange(layer.crow.numel() - 1), (layer.crow[1:] - layer.crow[:-1]).long())
    pos = (rows * nbc + layer.col.long()).tolist()
    theta = {p: layer.theta[i].detach().double().clone() for i, p in enumerate(pos)}
    delta = {pos[s]: layer.delta[i].detach().double().clone() for i, s in enumerate(layer.delta_slots.tolist())}
    return theta, delta


def reference_weight(layer):
    theta, delta = layer_state(layer)
    w = {p: t + delta.get(p, 0) for p, t in theta.items()}
    return dense_of_blocks(layer, w)


# ---------------------------------------------------------------------- forward / backward
@pytest.mark.parametrize("shape, block", [((13, 10), (4, 3)), ((16, 24), (8, 8)), ((7, 5), (1, 1)), ((9, 17), (2, 16))])
@pytest.mark.parametrize("tokens", [0, 1, 7, 130])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_backward_match_masked_dense(shape, block, tokens, dtype):
    out, inn = shape
    layer = random_block_layer(out, inn, block, k=4, dtype=dtype, empty_row=cdiv(out, block[0]) - 1)
    x = torch.randn(tokens, inn, dtype=torch.float64)
    dy = torch.randn(tokens, out, dtype=torch.float64)
    w = reference_weight(layer)
    xl = x.to(dtype).requires_grad_()
    y = layer(xl)
    y.backward(dy.to(dtype))
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(y.double(), x @ w.T + layer.bias.double(), **tol)
    torch.testing.assert_close(xl.grad.double(), dy @ w, **tol)
    g = dy.T @ x  # the dense gradient; the delta's is its blocks at the slots (0 in the padding)
    (r, c), (nbr, nbc) = layer.block, layer.grid_shape
    gp = torch.zeros(nbr * r, nbc * c, dtype=torch.float64)
    gp[:out, :inn] = g
    blocks = gp.view(nbr, r, nbc, c).permute(0, 2, 1, 3).reshape(nbr * nbc, r, c)
    torch.testing.assert_close(layer.delta.grad.double(), blocks[layer.slot_positions()], **tol)
    assert layer.delta.grad.dtype == layer.delta.dtype


def test_gradcheck_fp64():
    layer = random_block_layer(11, 9, (4, 2), k=3, empty_row=1)
    x = torch.randn(5, 9, dtype=torch.float64, requires_grad=True)
    d = layer.delta.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, d, b: _SEFTBlockFn.apply(x, d, b, layer), (x, d, b))


def test_autocast_bf16_and_dtypes():
    layer = random_block_layer(12, 20, (4, 4), k=3, dtype=torch.float32)
    x = torch.randn(3, 20)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), x.double() @ reference_weight(layer).T + layer.bias.double(),
                               rtol=3e-2, atol=3e-2)
    y.float().sum().backward()
    assert layer.delta.grad.dtype == torch.float32
    with pytest.raises(ValueError, match="dtype"):
        layer(x.double())
    with pytest.raises(ValueError, match="in_features"):
        layer(torch.randn(3, 19))
    half = random_block_layer(12, 20, (4, 4), dtype=torch.float32).to(torch.bfloat16)
    assert half.theta.dtype == torch.bfloat16 and half.delta.dtype == torch.float32


# ---------------------------------------------------------------------- one evolution step
def reference_step(theta, delta, tracked, gsum, n, budget, width, grow_inactive):
    """SEFT's drop / grow / adapt with a block as the unit, in plain Python (the rules of
    docs/algorithm.md): theta and delta map grid positions to blocks; returns them after the
    step and the counts."""
    theta, delta = dict(theta), dict(delta)
    unit = (lambda p: 0) if budget == "layer" else (lambda p: p // width)
    dnorm = {p: float(v.norm()) for p, v in delta.items()}
    zero_base = {p for p in delta if bool((theta[p] == 0).all())}
    dropped = set(sorted(delta, key=lambda p: (dnorm[p], p))[:n])
    free = [p for p in tracked if p not in delta]
    grow = {p: float(gsum[p].norm()) for p in free}
    sens = {p: float((theta[p] * gsum[p]).abs().sum()) for p in free if p in theta}
    status = {p: "free" for p in free}
    counts = dict(dropped=0, grown=0, reactivated=0, pruned=0, undropped=0)
    vacated = [p for p in dropped if p in zero_base]
    for u in sorted({unit(p) for p in vacated}):  # 1. vacancies: refilled in their unit, or kept
        need = sorted([p for p in vacated if unit(p) == u], key=lambda p: (-dnorm[p], p))
        cands = sorted([p for p in free if p not in theta and unit(p) == u], key=lambda p: (-grow[p], p))
        take = min(len(need), len(cands)) if grow_inactive else 0
        for p in cands[:take]:
            status[p] = "grown"
        for p in need[:len(need) - take]:
            dropped.discard(p)
        counts["grown"] += take
        counts["reactivated"] += take
        counts["undropped"] += len(need) - take
    others = [p for p in dropped if p not in zero_base]
    got = 0
    for p in sorted([p for p in free if p in theta or grow_inactive], key=lambda p: (-grow[p], p)):  # 2. grow
        if got == len(others):
            break
        if status[p] != "free":
            continue
        if p not in theta:  # re-activation: its unit gives up its least sensitive free stored block
            give = [q for q in free if q in theta and status[q] == "free" and unit(q) == unit(p)]
            if not give:
                continue
            status[min(give, key=lambda q: (sens[q], q))] = "pruned"
            counts["reactivated"] += 1
            counts["pruned"] += 1
        status[p] = "grown"
        got += 1
    counts["grown"] += got
    for p in sorted(others, key=lambda p: (-dnorm[p], p))[:len(others) - got]:
        dropped.discard(p)
        counts["undropped"] += 1
    for p in dropped:  # apply
        del delta[p]
        counts["dropped"] += 1
        if p in zero_base:
            del theta[p]
    for p, s in status.items():
        if s == "pruned":
            del theta[p]
        elif s == "grown":
            delta[p] = torch.zeros_like(gsum[p])
            theta.setdefault(p, torch.zeros_like(gsum[p]))
    return theta, delta, counts


def random_step_case(seed, budget, grow_inactive):
    g = torch.Generator().manual_seed(seed)
    shape = [(10, 14), (16, 9), (5, 31), (24, 30)][seed % 4]
    block = [(2, 3), (4, 4), (1, 8), (4, 3)][seed % 4]
    layer = random_block_layer(*shape, block, density=0.55, k=2 + seed % 11, seed=seed, budget=budget,
                               dtype=torch.float32)
    with torch.no_grad():  # a few delta blocks sit on blocks pruned in the base (zero theta)
        zero = layer.delta_slots[torch.rand(layer.k, generator=g) < 0.3]
        layer.theta[zero] = 0
    nblocks = layer.grid_shape[0] * layer.grid_shape[1]
    outside = sorted(set(range(nblocks)) - set(layer.slot_positions().tolist()))
    pick = torch.rand(len(outside), generator=g) < 0.6
    tracked = torch.tensor([p for p, keep in zip(outside, pick.tolist()) if keep], dtype=torch.int64)
    gsum = torch.randn((tracked.numel(), *layer.block), generator=g) * pad_mask(layer)[tracked].float()
    n = int(torch.randint(layer.k // 3, layer.k + 1, (), generator=g))
    return layer, tracked, gsum, n


@pytest.mark.parametrize("budget", ["layer", "row"])
@pytest.mark.parametrize("grow_inactive", [True, False])
@pytest.mark.parametrize("seed", range(20))
def test_one_step_matches_the_python_reference(seed, budget, grow_inactive):
    layer, tracked, gsum, n = random_step_case(seed, budget, grow_inactive)
    layer.method = "seft" if grow_inactive else "spiel"
    theta0, delta0 = layer_state(layer)
    want_theta, want_delta, want_counts = reference_step(
        theta0, delta0, tracked.tolist(), {p: gsum[i].double() for i, p in enumerate(tracked.tolist())}, n, budget,
        layer.grid_shape[1], grow_inactive)
    _, counts = evolve_blocks_(layer, n, tracked, gsum)
    theta, delta = layer_state(layer)
    assert dict(zip(seft_ext.evolve.COUNT_NAMES, counts.tolist())) == want_counts
    assert sorted(theta) == sorted(want_theta) and sorted(delta) == sorted(want_delta)
    for p in want_theta:
        assert torch.equal(theta[p], want_theta[p].float().double()), p
    for p in want_delta:
        assert torch.equal(delta[p], want_delta[p]), p
    layer.merged().validate()


@pytest.mark.parametrize("budget", ["layer", "row"])
def test_adapt_prunes_the_least_sensitive_block_not_the_smallest_gradient(budget):
    # one block row of 4 blocks: block 0 holds the delta, block 3 is pruned, blocks 1 (large theta)
    # and 2 (tiny theta, larger gradient) are stored
    with torch.no_grad():
        keep = torch.tensor([True, True, True, False])
        base = BSRWeight.from_dense(torch.ones(4, 16, dtype=torch.float64), (4, 4), keep.view(1, 4))
        layer = SEFTBlockLinear(base, 1, budget=budget)
        layer.delta_slots.fill_(0)
        layer.theta[1] = 10.0
        layer.theta[2] = 0.01
        layer.delta.fill_(0.5)
    tracked = torch.tensor([1, 2, 3])
    gsum = torch.stack([torch.full((4, 4), 1.0), torch.full((4, 4), 2.0), torch.full((4, 4), 100.0)])
    theta0, delta0 = layer_state(layer)
    want = reference_step(theta0, delta0, [1, 2, 3], dict(zip([1, 2, 3], gsum.double())), 1, budget, 4, True)
    _, counts = evolve_blocks_(layer, 1, tracked, gsum)
    theta, delta = layer_state(layer)
    assert sorted(theta) == sorted(want[0]) == [0, 1, 3]  # block 2 (least sensitive) gave way
    assert sorted(delta) == sorted(want[1]) == [3]
    assert counts.tolist() == [1, 1, 1, 1, 0]


def reference_scan(layer, x, dy, num_grow, num_prune):
    """The tracked blocks of a window's first pass, from the dense fp64 gradient (plain Python)."""
    (r, c), (nbr, nbc) = layer.block, layer.grid_shape
    g = torch.zeros(nbr * r, nbc * c, dtype=torch.float64)
    g[:layer.out_features, :layer.in_features] = dy.double().T @ x.double()
    blocks = g.view(nbr, r, nbc, c).permute(0, 2, 1, 3).reshape(nbr * nbc, r, c)
    theta, delta = layer_state(layer)
    outside = [p for p in range(nbr * nbc) if p not in delta]
    grow = sorted([p for p in outside if p in theta or layer.grow_inactive],
                  key=lambda p: (-float(blocks[p].norm()), p))[:num_grow]
    sens = {p: float((theta[p] * blocks[p]).abs().sum()) for p in outside if p in theta}
    if num_prune == 0:
        prune = []
    elif layer.budget == "layer":
        prune = sorted(sens, key=lambda p: (sens[p], p))[:num_prune]
    else:
        per_row = math.ceil(num_prune / nbr)
        prune = [p for i in range(nbr) for p in sorted([q for q in sens if q // nbc == i],
                                                       key=lambda q: (sens[q], q))[:per_row]]
    return sorted(set(grow) | set(prune))


@pytest.mark.parametrize("budget, method", [("layer", "seft"), ("row", "seft"), ("layer", "spiel")])
@pytest.mark.parametrize("seed", range(4))
def test_scan_tracks_the_reference_blocks(seed, budget, method):
    from seft_ext.seft_block import scan_blocks
    from seft_ext.window import ScanPlan

    layer = random_block_layer(*[(13, 22), (24, 16)][seed % 2], [(4, 3), (8, 4)][seed % 2], density=0.5, k=3,
                               seed=seed, budget=budget, method=method, empty_row=1)
    x, dy = torch.randn(9, layer.in_features, dtype=torch.float64), torch.randn(9, layer.out_features,
                                                                               dtype=torch.float64)
    num_prune = 4 if method == "seft" else 0
    tracked, nbytes, finite = scan_blocks(layer, x, dy, ScanPlan(4, num_prune, 0, 0))
    assert finite and nbytes > 0
    assert tracked.tolist() == reference_scan(layer, x, dy, 4, num_prune)


# ---------------------------------------------------------------------- under the controller
def block_model(budget="layer", method="seft", k=6, seed=0, dtype=torch.float64):
    layers = [random_block_layer(out, inn, (4, 4), density=0.5, k=k, seed=seed + i, dtype=dtype, budget=budget,
                                 method=method) for i, (out, inn) in enumerate([(18, 12), (8, 18)])]
    for m in layers:
        with torch.no_grad():
            m.delta.zero_()
        m.bias.requires_grad_(False)
    return nn.Sequential(layers[0], nn.Tanh(), layers[1])


def train(model, ctl, opt, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    reports = {}
    for t in range(steps):
        x = torch.randn(6, 12, generator=g, dtype=torch.float64)
        target = torch.randn(6, 8, generator=g, dtype=torch.float64)
        ((model(x) - target) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
        r = ctl.step()
        if r is not None:
            reports[t + 1] = r
    return reports


@pytest.mark.parametrize("budget", ["layer", "row"])
def test_block_budget_is_exact_and_blocks_move(budget):
    model = block_model(budget)
    cfg = SEFTConfig(update_interval=2, grow_accumulation=2, drop_fraction=0.5, block=(4, 4), budget=budget)
    opt = torch.optim.AdamW([model[0].delta, model[2].delta], lr=5e-2)
    ctl = SEFTController(model, opt, cfg, total_steps=40)
    layers = [model[0], model[2]]
    start = [(m.nnz_blocks, m.crow.clone(), m.slot_positions().clone()) for m in layers]
    g = torch.Generator().manual_seed(3)
    moved = 0
    for t in range(30):
        x = torch.randn(6, 12, generator=g, dtype=torch.float64)
        ((model(x) - torch.randn(6, 8, generator=g, dtype=torch.float64)) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
        report = ctl.step()
        for m, (nb, crow, _) in zip(layers, start):
            assert m.nnz_blocks == nb and m.k == 6
            if budget == "row":
                assert torch.equal(m.crow, crow)
            assert bool((m.delta_slots[1:] > m.delta_slots[:-1]).all())
            m.merged().validate()
        if report:
            moved += sum(r.get("grown", 0) for r in report.values())
    assert moved > 0
    assert any(not torch.equal(m.slot_positions(), s) for m, (_, _, s) in zip(layers, start))


def test_pruned_block_with_a_large_gradient_is_reactivated():
    layer = random_block_layer(16, 16, (4, 4), density=0.5, k=4, seed=1)
    with torch.no_grad():
        layer.delta.zero_()
    active = set(layer_state(layer)[0])
    target = next(p for p in range(16) if p not in active)  # a pruned block: (block row i, block column j)
    i, j = divmod(target, 4)
    cfg = SEFTConfig(update_interval=1, grow_accumulation=1, drop_fraction=0.25, block=(4, 4), scan_sketch=0)
    opt = torch.optim.AdamW([layer.delta], lr=1e-3)
    ctl = SEFTController(layer, opt, cfg, total_steps=4)
    x = torch.full((8, 16), 1e-3, dtype=torch.float64)
    x[:, j * 4:(j + 1) * 4] = 10.0  # G = dY^T X is large only on block (i, j)
    y = layer(x)
    y[:, i * 4:(i + 1) * 4].sum().backward()
    opt.step()
    report = ctl.step()
    assert report[""]["reactivated"] == 1 and report[""]["pruned"] == 1
    assert target in layer.slot_positions().tolist()
    assert target in layer_state(layer)[0]


def test_nan_in_the_window_skips_the_step_and_changes_nothing():
    model = block_model()
    cfg = SEFTConfig(update_interval=2, grow_accumulation=2, drop_fraction=0.5, block=(4, 4))
    opt = torch.optim.SGD([model[0].delta, model[2].delta], lr=0.0)
    ctl = SEFTController(model, opt, cfg, total_steps=8)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    x = torch.randn(6, 12, dtype=torch.float64)
    x[0, 0] = float("nan")
    model(x).sum().backward()
    opt.zero_grad()
    ctl.step()
    model(x).sum().backward()
    opt.zero_grad()
    with pytest.warns(RuntimeWarning, match="NaN or Inf"):
        report = ctl.step()
    assert report == {"0": {"skipped": "non-finite statistics"}, "2": {"skipped": "non-finite statistics"}}
    for n, t in model.state_dict().items():
        assert torch.equal(t, before[n]), n


@pytest.mark.parametrize("seed_optimizer", [True, False])
def test_optimizer_state_follows_the_blocks(seed_optimizer):
    layer = random_block_layer(12, 16, (4, 4), density=0.5, k=4, seed=2)
    cfg = SEFTConfig(update_interval=3, grow_accumulation=1, drop_fraction=0.5, block=(4, 4), scan_sketch=0,
                     seed_optimizer=seed_optimizer)
    opt = torch.optim.AdamW([layer.delta], lr=1e-2, amsgrad=True, betas=(0.8, 0.9))
    ctl = SEFTController(layer, opt, cfg, total_steps=12)
    g = torch.Generator().manual_seed(0)
    for t in range(3):
        x = torch.randn(5, 16, generator=g, dtype=torch.float64)
        w = reference_weight(layer).requires_grad_()
        (x @ w.T + layer.bias).pow(2).sum().backward()  # the dense reference gradient of this step
        layer(x).pow(2).sum().backward()
        opt.step()
        before = {key: {p: v[s].clone() for s, p in enumerate(layer.slot_positions().tolist())}
                  for key, v in opt.state[layer.delta].items() if key != "step"}
        report = ctl.step()
    assert report[""]["grown"] > 0
    nbc = layer.grid_shape[1]
    step = float(opt.state[layer.delta]["step"])
    for s, p in enumerate(layer.slot_positions().tolist()):
        i, j = divmod(p, nbc)
        gb = torch.zeros(4, 4, dtype=torch.float64)
        blk = w.grad[i * 4:(i + 1) * 4, j * 4:(j + 1) * 4]
        gb[:blk.shape[0], :blk.shape[1]] = blk
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            got = opt.state[layer.delta][key][s]
            if p in before[key]:
                assert torch.equal(got, before[key][p]), (key, p)
            elif not seed_optimizer:
                assert bool((got == 0).all()), (key, p)
            else:
                want = gb * (1 - 0.8 ** step) if key == "exp_avg" else gb * gb * (1 - 0.9 ** step)
                torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_state_dict_resume_is_exact():
    cfg = SEFTConfig(update_interval=4, grow_accumulation=3, block=(4, 4), drop_fraction=0.5)

    def fresh():
        model = block_model()
        opt = torch.optim.AdamW([model[0].delta, model[2].delta], lr=1e-2, amsgrad=True)
        return model, opt, SEFTController(model, opt, cfg, total_steps=24)

    m1, o1, c1 = fresh()
    train(m1, c1, o1, 6)  # stops inside a window
    assert m1[0].window.tracked is not None
    saved = copy.deepcopy(({n: t.clone() for n, t in m1.state_dict().items()}, o1.state_dict(), c1.state_dict()))
    reports = train(m1, c1, o1, 12, seed=5)
    assert any(r.get("grown", 0) for rep in reports.values() for r in rep.values())
    m2, o2, c2 = fresh()
    m2.load_state_dict(saved[0])
    o2.load_state_dict(saved[1])
    c2.load_state_dict(saved[2])
    train(m2, c2, o2, 12, seed=5)
    for name, t in m1.state_dict().items():
        assert torch.equal(t, m2.state_dict()[name]), name


# ---------------------------------------------------------------------- conversion and persistence
class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 16)
        self.up = nn.Linear(16, 30)
        self.down = nn.Linear(30, 16)
        self.lm_head = nn.Linear(16, 20, bias=False)

    def forward(self, ids):
        return self.lm_head(self.down(torch.relu(self.up(self.emb(ids)))))


def trained_tiny(block=(4, 4), budget="layer"):
    model = Tiny()
    cfg = SEFTConfig(sparsity=0.5, block=block, budget=budget, k=64, update_interval=2, grow_accumulation=2)
    names = convert_to_seft(model, cfg)
    assert names == ["up", "down"] and all(isinstance(model.get_submodule(n), SEFTBlockLinear) for n in names)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ctl = SEFTController(model, opt, cfg, total_steps=10)
    ids = torch.randint(0, 20, (4, 7), generator=torch.Generator().manual_seed(0))
    for _ in range(6):
        nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
        opt.step()
        opt.zero_grad()
        ctl.step()
    return model, cfg, ids


def test_save_load_and_merge_round_trip(tmp_path):
    model, cfg, ids = trained_tiny()
    with torch.no_grad():
        ref = model(ids)
    seft_ext.save_pretrained(model, tmp_path)
    loaded = seft_ext.from_pretrained(Tiny(), tmp_path)
    assert loaded.seft_config == cfg and loaded.seft_config.block == (4, 4)
    assert isinstance(loaded.up, SEFTBlockLinear) and loaded.up.block == (4, 4)
    with torch.no_grad():
        assert torch.equal(loaded(ids), ref)
    for name in ("up", "down"):
        a, b = model.get_submodule(name), loaded.get_submodule(name)
        for f in ("crow", "col", "theta", "delta_slots", "delta"):
            assert torch.equal(getattr(a, f), getattr(b, f)), (name, f)
    dense = seft_ext.merge_and_unload(copy.deepcopy(model))
    sparse = seft_ext.merge_and_unload(copy.deepcopy(model), sparse=True)
    assert type(dense.up) is nn.Linear and isinstance(sparse.up, SparseLinear) and sparse.up.block == (4, 4)
    assert torch.equal(dense.up.weight, reference_weight(model.up).float())
    with torch.no_grad():
        torch.testing.assert_close(dense(ids), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sparse(ids), ref, rtol=1e-5, atol=1e-5)
    trainable, _ = seft_ext.trainable_parameters(model)
    assert trainable == model.up.delta.numel() + model.down.delta.numel() == (4 + 4) * 16


def test_convert_masks_and_budgets():
    model = Tiny()
    up_mask = torch.zeros(30, 16, dtype=torch.bool)
    up_mask[:8, :4] = True
    up_mask[12:16, 8:16] = True
    cfg = SEFTConfig(block=(4, 4), k=16)
    convert_to_seft(model, cfg, target=["up"], masks={"up": up_mask})
    assert model.up.nnz_blocks == 4 and model.up.k == 1 and model.up.nnz == 64
    assert torch.equal(model.up.dense_weight() != 0, up_mask)
    bad = torch.zeros(30, 16, dtype=torch.bool)
    bad[0, 0] = True
    with pytest.raises(ValueError, match="convert_to_seft: layer 'up'.*not constant on block"):
        convert_to_seft(Tiny(), cfg, target=["up"], masks={"up": bad})
    with pytest.raises(ValueError, match="dense_compute.*block"):
        convert_to_seft(Tiny(), cfg, dense_compute=True)
    row = Tiny()
    convert_to_seft(row, SEFTConfig(block=(4, 4), sparsity=0.5, budget="row", k=16))
    counts = row.up.crow[1:] - row.up.crow[:-1]
    assert bool((counts == 2).all())  # 4 block columns, half of each block row kept


@pytest.mark.parametrize("block, err, match", [
    ((0, 4), ValueError, "block must be"), ((4,), TypeError, "block must be"), ((4, 2.0), TypeError, "block must be"),
    ("4x4", TypeError, "block must be"), ((True, 4), TypeError, "block must be")])
def test_config_block_is_validated(block, err, match):
    with pytest.raises(err, match=match):
        SEFTConfig(block=block)


def test_config_block_round_trips_and_refuses_nm():
    cfg = SEFTConfig(block=[8, 4])
    assert cfg.block == (8, 4) and cfg.to_dict()["block"] == [8, 4]
    assert SEFTConfig(**cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="block.*N:M"):
        SEFTConfig(block=(4, 4), budget="nm")
    assert SEFTConfig(block=(2, 2), lora_rank=1).trainable_blocks_for(6, 10) == 4


def test_layer_rejects_bad_input():
    base = BSRWeight.from_dense(torch.randn(8, 8), (4, 4))
    with pytest.raises(TypeError, match="BSRWeight"):
        SEFTBlockLinear(object(), 1)
    with pytest.raises(ValueError, match="exceeds the layer's 4 blocks"):
        SEFTBlockLinear(base, 5)
    with pytest.raises(ValueError, match="budget.*N:M"):
        SEFTBlockLinear(base, 1, budget="nm")
    with pytest.raises(ValueError, match="method"):
        SEFTBlockLinear(base, 1, method="x")
    with pytest.raises(ValueError, match="bias"):
        SEFTBlockLinear(base, 1, bias=torch.zeros(7))
    layer = SEFTBlockLinear(base, 2)
    with pytest.raises(ValueError, match="gsum must be floating \\[1, 4, 4\\]"):
        layer.evolve_(1, torch.tensor([3]), torch.zeros(1, 4))
    with pytest.raises(ValueError, match="tracked must be 1-D int64"):
        layer.evolve_(1, torch.tensor([3.0]), torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match="num_drop"):
        layer.evolve_(3, torch.tensor([3]), torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match="out of range"):
        layer.evolve_(1, torch.tensor([4]), torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match="config must be a SEFTConfig with block"):
        SEFTBlockLinear.from_linear(nn.Linear(8, 8), SEFTConfig())


# ---------------------------------------------------------------------- a tiny LLaMA
def test_tiny_llama_trains_with_4x4_blocks():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    vocab = 48
    cfg_m = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg_m)
    cfg = SEFTConfig(sparsity=0.5, block=(4, 4), update_interval=4, grow_accumulation=2, lora_rank=2)
    convert_to_seft(model, cfg)
    layers = seft_ext.seft_layers(model)
    assert len(layers) == 14 and all(isinstance(m, SEFTBlockLinear) for m in layers.values())
    start = {n: (m.nnz_blocks, m.slot_positions().clone()) for n, m in layers.items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    total = 40
    ctl = SEFTController(model, opt, cfg, total)
    gen = torch.Generator().manual_seed(1)
    perm = torch.randperm(vocab, generator=gen)
    losses = []
    for _ in range(total):
        x = torch.empty(8, 16, dtype=torch.long)
        x[:, 0] = torch.randint(0, vocab, (8,), generator=gen)
        for i in range(1, 16):
            x[:, i] = perm[x[:, i - 1]]
        loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        ctl.step()
        losses.append(loss.item())
        for n, m in layers.items():
            assert m.nnz_blocks == start[n][0]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.2, losses
    moved = sum(not torch.equal(m.slot_positions(), start[n][1]) for n, m in layers.items())
    assert moved > 0 and len(ctl.history) > 0
    assert math.isfinite(losses[-1])


def test_training_checkpoint_resume_is_exact(tmp_path):
    """seft_ext.checkpoint (the driver's checkpoints) saves and restores block layers and their
    in-flight window: the resumed run continues bit for bit."""
    pytest.importorskip("safetensors")
    from seft_ext import checkpoint

    cfg = SEFTConfig(sparsity=0.5, block=(4, 4), k=48, update_interval=3, grow_accumulation=2, scan_sketch=0,
                     drop_fraction=1.0)

    def dense():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(12, 18, dtype=torch.float64), nn.Tanh(), nn.Linear(18, 8, dtype=torch.float64))

    def run(model, opt, ctl, steps, seed):
        g = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            model(torch.randn(4, 12, generator=g, dtype=torch.float64)).square().mean().backward()
            opt.step()
            opt.zero_grad()
            ctl.step()

    model = dense()
    convert_to_seft(model, cfg, exclude=())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, amsgrad=True)
    ctl = SEFTController(model, opt, cfg, total_steps=24)
    run(model, opt, ctl, 5, 0)  # inside the window of the evolution step at 6
    assert model[0].window.tracked is not None
    data_rng = torch.Generator().manual_seed(5)
    checkpoint.save(tmp_path, 5, model, opt, ctl, data_rng, {"run_id": "r", "args": {}, "summary": {}})
    run(model, opt, ctl, 6, 1)

    info, st = checkpoint.latest(tmp_path)
    resumed = dense()
    tensors = checkpoint.restore(info, st, resumed)
    assert isinstance(resumed[0], SEFTBlockLinear) and resumed[0].block == (4, 4)
    opt2 = torch.optim.AdamW([p for p in resumed.parameters() if p.requires_grad], lr=1e-2, amsgrad=True)
    ctl2 = SEFTController(resumed, opt2, cfg, total_steps=24)
    checkpoint.restore_training(info, tensors, opt2, ctl2, torch.Generator(), st)
    run(resumed, opt2, ctl2, 6, 1)
    assert len(ctl.history) == 3 and len(ctl2.history) == 2
    for name, t in model.state_dict().items():
        assert torch.equal(t, resumed.state_dict()[name]), name


def test_sparse_export_round_trip(tmp_path):
    """hf.export_sparse writes block layers as BSR; load_sparse reads them back as SparseLinear(block)."""
    pytest.importorskip("safetensors")
    from seft_ext import hf

    model, _, ids = trained_tiny()
    with torch.no_grad():
        ref = model(ids)
    hf.export_sparse(model, tmp_path / "sparse.safetensors")
    fresh = Tiny()
    assert hf.load_sparse(fresh, tmp_path / "sparse.safetensors") == ["up", "down"]
    assert fresh.up.block == (4, 4) and torch.equal(fresh.up.to_dense(), model.up.to_dense())
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids), ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- two ranks
def ddp_train(rank, world, group_kw):
    """16 steps of block_model on a global batch of 8 split over the ranks; the first window's
    sums as the first decision sees them, the topology hash and the evolution history."""
    from seft_ext.distributed import topology_hash

    model = block_model()
    layers = [model[0], model[2]]
    net = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False) if world > 1 else model
    opt = torch.optim.AdamW([m.delta for m in layers], lr=2e-2)
    cfg = SEFTConfig(update_interval=3, grow_accumulation=2, scan_sketch=0, drop_fraction=0.5, block=(4, 4))
    ctl = SEFTController(model, opt, cfg, 16, **group_kw)
    seen, evolve_all = {}, ctl._evolve_all

    def recording(t):
        if not seen:
            seen.update({n: dict(zip(map(str, m.window.tracked.tolist()), m.window.gsum.tolist()))
                         for n, m in ctl.layers.items()})
        return evolve_all(t)
    ctl._evolve_all = recording
    g = torch.Generator().manual_seed(1)
    for _ in range(16):
        x, y = torch.randn(8, 12, generator=g, dtype=torch.float64), torch.randn(8, 8, generator=g, dtype=torch.float64)
        ((net(x[rank::world]) - y[rank::world]) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
        ctl.step()
    return {"hash": topology_hash(layers), "window": seen,
            "history": [(t, {n: r.get("grown", 0) for n, r in rep.items()}) for t, rep in ctl.history]}


def ddp_worker(rank, world, init_file, out_dir):
    import json
    import os

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    import gc

    try:
        res = ddp_train(rank, world, {"process_group": "auto"})
        gc.collect()  # DDP's reducer (kept by reference cycles) goes before its process group
        dist.barrier()
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_two_ranks_share_block_statistics_and_topology(tmp_path):
    import json

    import torch.multiprocessing as mp

    mp.start_processes(ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="spawn")
    r0, r1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2))
    assert r0["hash"] == r1["hash"] and r0["history"] == r1["history"] and r0["window"] == r1["window"]
    assert len(r0["history"]) == 3 and sum(v for _, rep in r0["history"] for v in rep.values()) > 0
    single = ddp_train(0, 1, {})
    common = 0  # the summed blocks over 2 ranks are those of the global batch, where both track
    for name, sums in single["window"].items():
        for pos, blk in sums.items():
            if pos in r0["window"][name]:
                common += 1
                torch.testing.assert_close(torch.tensor(r0["window"][name][pos]), torch.tensor(blk),
                                           rtol=1e-9, atol=1e-15)
    assert common > 0


def test_peft_export_refuses_block_layers(tmp_path):
    from seft_ext.peft_export import export_peft

    model, _, _ = trained_tiny()
    pytest.importorskip("peft")
    with pytest.raises(ValueError, match="export_peft: layer 'up' is in \\(4, 4\\) blocks"):
        export_peft(model, None, tmp_path)
    assert not any(tmp_path.iterdir())
