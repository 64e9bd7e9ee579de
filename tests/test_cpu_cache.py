"""The caching CPU allocator (ops.cpu_cache): reuse, no aliasing of live tensors, limits, off
again, results unchanged, bad input."""
import threading

import pytest
import torch

from seft_ext import ops
from seft_ext._memory import cpu_cache_on

BIG = 1 << 18  # floats: 1 MiB, above the cache's 256 KiB floor


@pytest.fixture
def cache():
    """The cache on and empty for the test, then as it was (off, unless a caller left it on)."""
    before = ops.cpu_cache()
    ops.cpu_cache(True, limit_bytes=4 << 30, empty=True)
    yield
    ops.cpu_cache(before["enabled"], limit_bytes=before["limit_bytes"], empty=True)


def test_a_freed_block_is_reused(cache):
    x = torch.empty(BIG)
    p = x.data_ptr()
    del x
    s = ops.cpu_cache()
    assert s["cached_bytes"] >= BIG * 4 and s["cached_blocks"] == 1
    y = torch.empty(BIG)
    assert y.data_ptr() == p
    t = ops.cpu_cache()
    assert t["hits"] == s["hits"] + 1 and t["cached_bytes"] == 0


def test_size_classes_reuse_only_close_sizes(cache):
    big = torch.empty(8 * BIG)  # raises the high-water mark: the misses below evict nothing
    del big
    x = torch.empty(BIG)
    p = x.data_ptr()
    del x
    assert torch.empty(BIG // 4).data_ptr() != p  # 4x smaller: not handed a 1 MiB block
    assert torch.empty(BIG + 1000).data_ptr() != p  # larger than the block
    z = torch.empty(BIG - 1000)  # within the block's size class
    assert z.data_ptr() == p


def test_small_tensors_bypass_the_cache(cache):
    s = ops.cpu_cache()
    for _ in range(20):
        torch.empty(1000)
    t = ops.cpu_cache()
    assert (t["hits"], t["misses"], t["cached_blocks"]) == (s["hits"], s["misses"], s["cached_blocks"])


def _check_live(tensors):
    for v, t in tensors.items():
        assert bool((t == v).all()), f"tensor {v} was overwritten: a live block was handed out twice"


def test_live_tensors_are_never_handed_out(cache):
    g = torch.Generator().manual_seed(0)
    live = {}
    for i in range(400):
        n = int(torch.randint(BIG // 4, 2 * BIG, (1,), generator=g))
        live[float(i)] = torch.full((n,), float(i))
        if len(live) > 24:  # free a random one
            keys = list(live)
            del live[keys[int(torch.randint(len(keys), (1,), generator=g))]]
        if i % 50 == 0:
            _check_live(live)
    _check_live(live)
    assert ops.cpu_cache()["hits"] > 0


def test_threads_share_the_cache_safely(cache):
    errors = []

    def work(tid):
        try:
            for i in range(200):
                v = float(tid * 1000 + i)
                a = torch.full((BIG + 64 * tid,), v)
                b = torch.full((BIG // 2,), -v)
                assert bool((a == v).all()) and bool((b == -v).all())
        except AssertionError as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_never_more_than_the_peak_in_use(cache):
    """What is kept plus what is in use never exceeds the most in use at once: a miss drops the
    least recently freed blocks."""
    xs = [torch.empty(BIG) for _ in range(4)]  # 4 MiB in use at once
    ptrs = [x.data_ptr() for x in xs]
    while xs:  # freed in order: xs[0] first
        del xs[0]
    s = ops.cpu_cache()
    assert s["cached_blocks"] == 4 and s["peak_in_use_bytes"] == 4 * BIG * 4 and s["in_use_bytes"] == 0
    y = torch.empty(2 * BIG)  # a miss of 2 MiB: the two least recently freed blocks go
    s = ops.cpu_cache()
    assert s["cached_blocks"] == 2 and s["in_use_bytes"] + s["cached_bytes"] <= s["peak_in_use_bytes"]
    a, b = torch.empty(BIG), torch.empty(BIG)
    assert {a.data_ptr(), b.data_ptr()} == set(ptrs[2:])  # the two most recently freed remain
    del y, a, b
    s = ops.cpu_cache(empty=True)
    assert s["peak_in_use_bytes"] == 0  # restarted


def test_limit_and_empty(cache):
    ops.cpu_cache(limit_bytes=0)
    x = torch.empty(BIG)
    del x
    assert ops.cpu_cache()["cached_bytes"] == 0  # over the limit: given back
    ops.cpu_cache(limit_bytes=4 << 30)
    xs = [torch.empty(BIG) for _ in range(3)]
    del xs
    assert ops.cpu_cache()["cached_blocks"] == 3
    s = ops.cpu_cache(empty=True)
    assert s["cached_bytes"] == 0 and s["cached_blocks"] == 0 and s["enabled"]


def test_off_frees_and_passes_through(cache):
    x = torch.empty(BIG)
    del x
    s = ops.cpu_cache(False)
    assert not s["enabled"] and s["cached_bytes"] == 0
    y = torch.empty(BIG)
    del y
    t = ops.cpu_cache()
    assert t["cached_bytes"] == 0 and t["hits"] == s["hits"] and t["misses"] == s["misses"]


def test_block_allocated_on_freed_off(cache):
    x = torch.empty(BIG)  # from the cache
    ops.cpu_cache(False)
    del x  # given back to the system, not cached
    assert ops.cpu_cache()["cached_bytes"] == 0
    ops.cpu_cache(True)
    y = torch.empty(BIG)  # from the cache, freed while on: cached
    del y
    assert ops.cpu_cache()["cached_blocks"] == 1


def _train(seed):
    """A few AdamW steps of a small MLP whose activations are above the cache's floor."""
    g = torch.Generator().manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.05)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    for _ in range(4):
        x = torch.randn(1024, 256, generator=g, dtype=torch.float64)
        loss = (net(x) - x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return [p.detach().clone() for p in net.parameters()]


def test_training_is_bitwise_the_same(cache):
    on = _train(0)
    assert ops.cpu_cache()["hits"] > 0  # the steps did reuse blocks
    ops.cpu_cache(False)
    off = _train(0)
    for a, b in zip(on, off):
        assert torch.equal(a, b)


def test_the_kernels_scratch_buffers_use_it(cache):
    from seft_ext import CSRWeight

    w = torch.randn(512, 512)
    csr = CSRWeight.from_dense(w, torch.rand(512, 512) < 0.3)
    x = torch.randn(512, 512)
    ref = x.double() @ csr.to_dense().double().T
    s = ops.cpu_cache()
    for _ in range(3):
        y = ops.csr_spmm(x, csr.crow, csr.col, csr.values)
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-4)
    assert ops.cpu_cache()["hits"] > s["hits"]


def test_cpu_cache_on_restores_the_state():
    before = ops.cpu_cache(False)
    with cpu_cache_on():
        assert ops.cpu_cache()["enabled"]
        x = torch.empty(BIG)
        del x
    after = ops.cpu_cache()
    assert not after["enabled"] and after["cached_bytes"] == 0
    ops.cpu_cache(before["enabled"])


def test_cpu_cache_on_leaves_it_off_when_asked(monkeypatch):
    monkeypatch.setenv("SEFT_CPU_CACHE", "0")
    ops.cpu_cache(False)
    with cpu_cache_on():
        assert not ops.cpu_cache()["enabled"]


@pytest.mark.parametrize("kwargs, err, match", [
    ({"enable": "yes"}, TypeError, "enable must be True, False or None"),
    ({"enable": 1}, TypeError, "enable must be True, False or None"),
    ({"limit_bytes": -1}, ValueError, "limit_bytes must be an int >= 0"),
    ({"limit_bytes": 1.5}, ValueError, "limit_bytes must be an int >= 0"),
    ({"limit_bytes": True}, ValueError, "limit_bytes must be an int >= 0"),
])
def test_rejects_bad_input(kwargs, err, match):
    before = ops.cpu_cache()
    with pytest.raises(err, match=match):
        ops.cpu_cache(**kwargs)
    assert ops.cpu_cache() == before  # nothing changed


def test_the_op_rejects_bad_codes():
    with pytest.raises(RuntimeError, match="enable must be -1"):
        torch.ops.seft.cpu_cache(2, -1, False)
    with pytest.raises(RuntimeError, match="limit must be >= 0"):
        torch.ops.seft.cpu_cache(-1, -5, False)


def _child_sum(q):
    torch.set_num_threads(1)  # GNU OpenMP's pool does not survive fork(); torch's own limit
    x = torch.full((BIG,), 2.0)
    q.put(float(x.sum()))


def test_a_forked_child_allocates(cache):
    import multiprocessing as mp

    keep = [torch.empty(BIG) for _ in range(2)]  # blocks cached and live at the fork
    del keep[0]
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child_sum, args=(q,))
    p.start()
    p.join(timeout=60)
    assert p.exitcode == 0
    assert q.get(timeout=5) == 2.0 * BIG


def test_libraries_that_free_through_the_allocator(cache):
    """oneDNN (bf16 matmuls) takes raw blocks from torch's CPU allocator and gives them back
    through its raw deleter: every block the cache hands out must go back the same way."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 512, generator=g)
    w = torch.randn(640, 512, generator=g)
    ref = x.double() @ w.double().T
    for _ in range(3):
        y = torch.nn.functional.linear(x.bfloat16(), w.bfloat16())
        torch.testing.assert_close(y.double(), ref, rtol=0.05, atol=0.5)
