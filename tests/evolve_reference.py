"""A dense-with-mask reference of the SEFT evolution step, in plain PyTorch / Python.

State of one layer as dense (out, in) tensors: ``theta`` (0 off the base), ``active``
(bool: the pattern of W = theta + delta) and the delta as a dict {flat position: value}.
Written from the rules in SEFT.md and cpp/cpu/csr_drop_grow_adapt_cpu.cpp, on dense
gradients G_t = dY_t^T X_t in float64, with no CSR and no candidate streaming.
"""
import math

import torch


def unit_of(pos, inn, scope, m):
    if scope == "layer":
        return 0
    if scope == "row":
        return pos // inn
    return (pos // inn) * (inn // m) + (pos % inn) // m


def ref_scan(G1, theta, active, delta, num_grow, num_prune, scope, m, grow_inactive):
    """Tracked positions chosen from the window's first dense gradient G1."""
    out, inn = G1.shape
    g = G1.flatten().tolist()
    th = theta.flatten().tolist()
    act = active.flatten().tolist()
    outside = [p for p in range(out * inn) if p not in delta]
    eligible = [p for p in outside if act[p] or grow_inactive]
    grow = sorted(eligible, key=lambda p: (-abs(g[p]), p))[:num_grow]
    tracked = set(grow)
    base_only = [p for p in outside if act[p]]
    sens = {p: abs(th[p] * g[p]) for p in base_only}
    if scope == "layer":
        tracked |= set(sorted(base_only, key=lambda p: (sens[p], p))[:num_prune])
    elif scope == "row" and num_prune > 0:
        c = math.ceil(num_prune / out)
        for r in range(out):
            tracked |= set(sorted([p for p in base_only if p // inn == r], key=lambda p: (sens[p], p))[:c])
    elif scope == "nm" and grow_inactive:
        for p in grow:
            if not act[p]:
                grp = [b for b in base_only if unit_of(b, inn, "nm", m) == unit_of(p, inn, "nm", m)]
                if grp:
                    tracked.add(min(grp, key=lambda b: (sens[b], b)))
    return sorted(tracked)


def ref_decide(theta, active, delta, tracked, gsum, n, scope, m, grow_inactive):
    """One drop / grow / adapt step. Returns new (theta, active, delta) and the counts."""
    out, inn = theta.shape
    th = theta.flatten().clone()
    act = active.flatten().clone()
    unit = lambda p: unit_of(p, inn, scope, m)  # noqa: E731
    order = sorted(delta, key=lambda p: (abs(delta[p]), p))
    dropped = set(order[:n])
    vac = [p for p in dropped if th[p] == 0]
    oth = [p for p in dropped if th[p] != 0]
    T = [p for p in tracked if p not in delta]
    status = {p: "free" for p in T}
    sens = {p: abs(float(th[p]) * gsum[p]) for p in T if act[p]}
    by_grow = lambda p: (-abs(gsum[p]), p)  # noqa: E731
    by_delta = lambda p: (-abs(delta[p]), p)  # noqa: E731
    grown, react, pruned, undropped = 0, 0, 0, 0
    for u in sorted({unit(p) for p in vac}):
        vs = sorted([p for p in vac if unit(p) == u], key=by_delta)
        cands = sorted([p for p in T if not act[p] and unit(p) == u], key=by_grow) if grow_inactive else []
        fill = cands[:len(vs)]
        for p in fill:
            status[p] = "grown"
        for p in vs[:len(vs) - len(fill)]:
            dropped.discard(p)
        grown += len(fill)
        react += len(fill)
        undropped += len(vs) - len(fill)
    got = 0
    for p in sorted([p for p in T if status[p] == "free" and (act[p] or grow_inactive)], key=by_grow):
        if got == len(oth):
            break
        if status[p] != "free":
            continue
        if not act[p]:
            give = sorted([b for b in T if act[b] and status[b] == "free" and unit(b) == unit(p)],
                          key=lambda b: (sens[b], b))
            if not give:
                continue
            status[give[0]] = "pruned"
            react += 1
            pruned += 1
        status[p] = "grown"
        got += 1
    grown += got
    for p in sorted(oth, key=by_delta)[:len(oth) - got]:
        dropped.discard(p)
    undropped += len(oth) - got
    new_delta = {p: v for p, v in delta.items() if p not in dropped}
    for p in dropped:
        if th[p] == 0:
            act[p] = False
    for p, s in status.items():
        if s == "grown":
            new_delta[p] = 0.0
            act[p] = True
        elif s == "pruned":
            act[p] = False
            th[p] = 0
    counts = [len(dropped), grown, react, pruned, undropped]
    return th.view(out, inn), act.view(out, inn), new_delta, counts


def layer_state(layer):
    """(theta, active, delta dict) of a SEFTLinear, densified in float64."""
    out, inn = layer.out_features, layer.in_features
    rows = torch.searchsorted(layer.crow, torch.arange(layer.nnz, dtype=torch.int32), right=True) - 1
    pos = rows.long() * inn + layer.col.long()
    theta = torch.zeros(out * inn, dtype=torch.float64)
    theta[pos] = layer.theta.double()
    active = torch.zeros(out * inn, dtype=torch.bool)
    active[pos] = True
    delta = dict(zip(layer.slot_positions().tolist(), layer.delta.detach().double().tolist()))
    return theta.view(out, inn), active.view(out, inn), delta
