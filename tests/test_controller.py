"""SEFTController: schedule, window, optimizer state, NaN handling, state_dict."""
import copy
import math
import warnings

import pytest
import torch
from torch import nn

from seft_ext import CSRWeight, SEFTConfig, SEFTController, SEFTLinear
from seft_ext.prune import magnitude_mask


def tiny_model(method="seft", budget="layer", k=24, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    layers = []
    for out, inn in [(16, 12), (8, 16)]:
        w = torch.randn(out, inn, generator=g, dtype=torch.float64)
        base = CSRWeight.from_dense(w, magnitude_mask(w, 0.6, budget, (2, 4)), dtype=dtype)
        layers.append(SEFTLinear(base, k, budget=budget, method=method, seed=seed))
    return nn.Sequential(layers[0], nn.Tanh(), layers[1])


def snapshot(model):
    return {n: t.clone() for n, t in model.state_dict().items()}


def train(model, ctl, opt, steps, seed=0, poison=None):
    g = torch.Generator().manual_seed(seed)
    reports = {}
    collecting = []
    for t in range(1, steps + 1):
        collecting.append(model[0].window.collecting)
        x = torch.randn(6, 12, generator=g, dtype=torch.float64)
        target = torch.randn(6, 8, generator=g, dtype=torch.float64)
        if poison is not None and t == poison:
            x[0, 0] = float("nan")
        loss = ((model(x) - target) ** 2).mean()
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad()
        r = ctl.step()
        if r is not None:
            reports[t] = r
    return reports, collecting


def test_schedule_and_window():
    model = tiny_model()
    cfg = SEFTConfig(update_interval=4, grow_accumulation=2, evolve_until=0.75)
    opt = torch.optim.AdamW([m.delta for m in (model[0], model[2])], lr=1e-2)
    ctl = SEFTController(model, opt, cfg, total_steps=20)
    reports, collecting = train(model, ctl, opt, 20)
    assert sorted(reports) == [4, 8, 12]  # 16 > 0.75 * 20
    # at step 12, p_t * k = 0.019 * 24 rounds to 0: nothing to drop, no window gathered
    assert [t for t, c in enumerate(collecting, 1) if c] == [3, 4, 7, 8]
    assert all(r == {"skipped": "nothing to drop"} for r in reports[12].values())
    for t in (4, 8):
        r = reports[t]
        n = round(cfg.drop_fraction_at(t, 20) * 24)
        assert n > 0
        for counts in r.values():
            assert counts["dropped"] + counts["undropped"] == n and counts["grown"] == counts["dropped"]


def test_drop_fraction_schedules():
    for schedule, expect in [("cosine", lambda f: 0.2 * (1 + math.cos(math.pi * f)) / 2),
                             ("linear", lambda f: 0.2 * (1 - f)), ("constant", lambda f: 0.2)]:
        cfg = SEFTConfig(schedule=schedule)
        for t in (1, 10, 37, 75):
            assert cfg.drop_fraction_at(t, 100) == pytest.approx(expect(t / 75))
        assert cfg.drop_fraction_at(76, 100) == 0.0


@pytest.mark.parametrize("seed_optimizer", [True, False])
def test_optimizer_state_follows_slots_and_is_seeded(seed_optimizer):
    model = tiny_model()
    cfg = SEFTConfig(update_interval=5, grow_accumulation=3, seed_optimizer=seed_optimizer)
    opt = torch.optim.AdamW([model[0].delta, model[2].delta], lr=1e-2, betas=(0.8, 0.95))
    ctl = SEFTController(model, opt, cfg, total_steps=40)
    train(model, ctl, opt, 4)
    layer = model[0]
    state = opt.state[layer.delta]
    pos_before = set(layer.slot_positions().tolist())
    # step 5: the last window step, then the evolution
    g = torch.Generator().manual_seed(99)
    x = torch.randn(6, 12, generator=g, dtype=torch.float64)
    ((model(x)) ** 2).mean().backward()
    opt.step()
    opt.zero_grad()
    after_step = {k: dict(zip(layer.slot_positions().tolist(), state[k].tolist())) for k in ("exp_avg", "exp_avg_sq")}
    w = layer.window
    tracked, gsum, g2sum, steps = w.tracked.clone(), w.gsum.clone(), w.g2sum.clone(), w.steps + 1
    report = ctl.step()
    assert report is not None and report[next(iter(report))]["grown"] > 0
    step = float(state["step"])
    pos = layer.slot_positions().tolist()
    for s, p in enumerate(pos):
        if p in pos_before and p in after_step["exp_avg"]:
            if state["exp_avg"][s].item() != after_step["exp_avg"][p]:
                # a slot that was dropped and re-grown at once cannot happen: grown ones are outside the delta
                pytest.fail(f"state of kept position {p} changed")
        else:
            i = int(torch.searchsorted(tracked, torch.tensor(p)))
            assert tracked[i].item() == p
            if seed_optimizer:
                assert state["exp_avg"][s].item() == pytest.approx(gsum[i].item() / steps * (1 - 0.8 ** step))
                assert state["exp_avg_sq"][s].item() == pytest.approx(g2sum[i].item() / steps * (1 - 0.95 ** step))
            else:
                assert state["exp_avg"][s].item() == 0.0 and state["exp_avg_sq"][s].item() == 0.0
            assert layer.delta[s].item() == 0.0
    train(model, ctl, opt, 10, seed=1)  # the optimizer keeps working on the remapped state


def test_fixed_never_evolves():
    model = tiny_model(method="fixed")
    before = snapshot(model)
    cfg = SEFTConfig(method="fixed", update_interval=2, grow_accumulation=1)
    opt = torch.optim.AdamW([model[0].delta, model[2].delta], lr=1e-2)
    ctl = SEFTController(model, opt, cfg, total_steps=10)
    reports, collecting = train(model, ctl, opt, 10)
    assert reports == {} and not any(collecting)
    for name in ("0.crow", "0.col", "0.theta", "0.delta_slots", "2.delta_slots"):
        assert torch.equal(model.state_dict()[name], before[name])


def test_nan_window_is_skipped_with_one_warning():
    model = tiny_model()
    cfg = SEFTConfig(update_interval=3, grow_accumulation=2)
    ctl = SEFTController(model, None, cfg, total_steps=30)
    before = snapshot(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reports, _ = train(model, ctl, None, 3, poison=2)  # NaN in the scan step of window 1
        assert all(r == {"skipped": "non-finite statistics"} for r in reports[3].values())
        after = snapshot(model)
        for name in before:
            assert torch.equal(after[name], before[name]), name
        reports, _ = train(model, ctl, None, 3, poison=3)  # NaN in a tracking step of window 2
        assert all("skipped" in r for r in reports[3].values())
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 2 and all("NaN or Inf" in m for m in msgs)  # once per layer
    reports, _ = train(model, ctl, None, 3)  # healthy again: evolves
    assert all("dropped" in r for r in reports[3].values())


def test_decisions_in_batches_match_one_batch():
    """Layers decided in several host batches (a tiny SEFT_EVOLVE_HOST_BYTES) give the same
    topology, values, optimizer state and reports as all layers in one batch."""
    runs = []
    for batch_bytes in (2 << 30, 1):
        model = tiny_model()
        opt = torch.optim.AdamW([m.delta for m in (model[0], model[2])], lr=1e-2)
        ctl = SEFTController(model, opt, SEFTConfig(update_interval=3, grow_accumulation=2), total_steps=12)
        ctl.HOST_BATCH_BYTES = batch_bytes
        reports, _ = train(model, ctl, opt, 9)
        state = [v.clone() for p in (model[0].delta, model[2].delta) for v in opt.state[p].values()
                 if torch.is_tensor(v)]
        runs.append((reports, snapshot(model), state))
    assert runs[0][0] == runs[1][0] and any("dropped" in r for rep in runs[0][0].values() for r in rep.values())
    for name in runs[0][1]:
        assert torch.equal(runs[0][1][name], runs[1][1][name]), name
    for a, b in zip(runs[0][2], runs[1][2]):
        assert torch.equal(a, b)


def test_skip_warning_points_at_the_caller():
    model = tiny_model()
    ctl = SEFTController(model, None, SEFTConfig(update_interval=3, grow_accumulation=2), total_steps=30)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(model, ctl, None, 3, poison=2)
    files = {w.filename for w in caught if issubclass(w.category, RuntimeWarning)}
    assert files == {__file__}, files


def test_state_dict_resume_is_exact():
    cfg = SEFTConfig(update_interval=4, grow_accumulation=3)

    def fresh():
        model = tiny_model()
        opt = torch.optim.AdamW([model[0].delta, model[2].delta], lr=1e-2)
        return model, opt, SEFTController(model, opt, cfg, total_steps=24)

    m1, o1, c1 = fresh()
    train(m1, c1, o1, 6)  # stop in the middle of a window
    saved = copy.deepcopy((snapshot(m1), o1.state_dict(), c1.state_dict()))
    train(m1, c1, o1, 12, seed=5)

    m2, o2, c2 = fresh()
    m2.load_state_dict(saved[0])
    o2.load_state_dict(saved[1])
    c2.load_state_dict(saved[2])
    train(m2, c2, o2, 12, seed=5)
    for name, t in m1.state_dict().items():
        assert torch.equal(t, m2.state_dict()[name]), name


def test_controller_rejects_bad_setup():
    model = tiny_model()
    with pytest.raises(ValueError, match="no SEFTLinear"):
        SEFTController(nn.Linear(3, 3), None, SEFTConfig(), 10)
    with pytest.raises(ValueError, match="total_steps"):
        SEFTController(model, None, SEFTConfig(), 0)
    with pytest.raises(TypeError, match="SEFTConfig"):
        SEFTController(model, None, {"sparsity": 0.5}, 10)
    opt = torch.optim.AdamW([model[0].delta], lr=1e-2)
    with pytest.raises(ValueError, match="does not hold the delta"):
        SEFTController(model, opt, SEFTConfig(), 10)
    c = SEFTController(model, None, SEFTConfig(), 10)
    bad = c.state_dict()
    bad["config"]["update_interval"] = 3
    with pytest.raises(ValueError, match="config differs"):
        c.load_state_dict(bad)


def test_controller_names_a_missing_library(monkeypatch):
    """A source tree that was never built: the error says the library is missing (and how to
    install), not that the device lacks evolution kernels."""
    from seft_ext import _lib

    model = tiny_model()
    monkeypatch.setattr(_lib, "load_error", "the compiled library seft_ext/_seft.so is missing from X")
    with pytest.raises(RuntimeError, match="_seft.so is missing"):
        SEFTController(model, None, SEFTConfig(), 10)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_every_moment_follows_its_position(amsgrad):
    """exp_avg, exp_avg_sq and (amsgrad) max_exp_avg_sq of a kept position are exactly what they
    were before the remap; a grown position starts from the seeded moments, max = exp_avg_sq."""
    model = tiny_model()
    cfg = SEFTConfig(update_interval=5, grow_accumulation=3)
    opt = torch.optim.AdamW([model[0].delta, model[2].delta], lr=1e-2, betas=(0.8, 0.95), amsgrad=amsgrad)
    ctl = SEFTController(model, opt, cfg, total_steps=40)
    train(model, ctl, opt, 4)
    keys = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())
    g = torch.Generator().manual_seed(7)
    model(torch.randn(6, 12, generator=g, dtype=torch.float64)).square().mean().backward()
    opt.step()
    opt.zero_grad()
    before, windows = {}, {}
    for layer in (model[0], model[2]):
        st = opt.state[layer.delta]
        assert set(keys) <= set(st)
        before[layer] = {p: {k: st[k][s].item() for k in keys} for s, p in enumerate(layer.slot_positions().tolist())}
        w = layer.window
        windows[layer] = (w.tracked.tolist(), (w.gsum / (w.steps + 1)).tolist(), (w.g2sum / (w.steps + 1)).tolist())
    report = ctl.step()
    assert report is not None
    grown_total = 0
    for layer in (model[0], model[2]):
        st, t = opt.state[layer.delta], float(opt.state[layer.delta]["step"])
        tracked, mean_g, mean_g2 = windows[layer]
        for s, p in enumerate(layer.slot_positions().tolist()):
            now = {k: st[k][s].item() for k in keys}
            if p in before[layer]:
                assert now == before[layer][p], f"moments of kept position {p} moved"
                continue
            grown_total += 1
            i = tracked.index(p)
            assert now["exp_avg"] == pytest.approx(mean_g[i] * (1 - 0.8 ** t), rel=1e-12)
            assert now["exp_avg_sq"] == pytest.approx(mean_g2[i] * (1 - 0.95 ** t), rel=1e-12)
            if amsgrad:
                assert now["max_exp_avg_sq"] == now["exp_avg_sq"]
    assert grown_total > 0
    train(model, ctl, opt, 10, seed=1)  # the optimizer keeps working on the remapped state
