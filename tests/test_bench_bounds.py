"""The fused-optimizer tables' bound rows (gradguard.bench.optim_cases): the bare step plus the
grads read at the floor, and the step handed grad_scale plus that read, computed per round; and
the lines that say when a target is below them."""
from __future__ import annotations

import pytest
import torch

from gradguard.bench import optim_cases as oc
from gradguard.bench import stats_cases as sc


def _times(bare, scaled, floors, guarded, torch_way):
    t = {oc.BARE_FUSED: bare, oc.SCALED_FUSED: scaled, oc.GUARD_FUSED: guarded, oc.TORCH_ERR: torch_way,
         oc.TORCH_SKIP: [x + 1.0 for x in torch_way]}
    parts = []
    for k, v in zip(sc.STREAMS, floors):
        name = f"{oc.FLOOR_PART}{k} stream(s) per thread"
        t[name] = v
        parts.append(name)
    return t, parts


def test_bounds_are_per_round_sums_with_the_best_floor():
    t, parts = _times(bare=[10.0, 20.0], scaled=[12.0, 23.0], floors=([3.0, 5.0], [2.0, 6.0], [4.0, 4.5]),
                      guarded=[13.0, 26.0], torch_way=[15.0, 30.0])
    oc._add_bounds(t, parts, clip=True)
    assert t[oc.GRADS_FLOOR] == [2.0, 4.5]
    assert t[oc.BOUND_BARE] == [12.0, 24.5]
    assert t[oc.BOUND_SCALED] == [14.0, 27.5]
    assert not any(p in t for p in parts)  # the best replaces its parts' rows
    t, parts = _times([10.0], [12.0], ([3.0], [2.0], [4.0]), [13.0], [15.0])
    del t[oc.SCALED_FUSED]
    oc._add_bounds(t, parts, clip=False)
    assert oc.BOUND_SCALED not in t and t[oc.BOUND_BARE] == [12.0]


def _checks(clip, bare_target, readonly=False, **kw):
    t, parts = _times(**kw)
    oc._add_bounds(t, parts, clip=clip)
    tab = oc.Table("t", [])
    oc._bound_checks(tab, t, clip, bare_target, 1.2, readonly)
    return tab.checks


def test_a_target_below_the_bound_is_called_out_of_reach():
    # bound = (10 + 2) / 10 = 1.2x > 1.10x
    checks = _checks(True, 1.10, bare=[10.0], scaled=[11.0], floors=([2.0], [2.5], [3.0]), guarded=[13.2],
                     torch_way=[13.0])
    assert "bound: (bare step + the grads read at the floor) / bare = 1.20x" in checks
    assert any(c.startswith("bound through PyTorch's fused kernel") and c.endswith("= 1.30x") for c in checks)
    assert "guarded / that bound = 1.02x" in checks
    assert any("<= 1.1x is below the bound (1.20x): out of reach" in c for c in checks), checks
    # PyTorch's way (13) / bound (12) = 1.08x < 1.2x
    assert any(">= 1.2x is above PyTorch way / bound (1.08x)" in c for c in checks), checks


def test_a_target_only_below_the_grad_scale_bound_names_the_write_back():
    # bare bound 1.2x <= 1.25x; through PyTorch's kernel (12 + 2) / 10 = 1.4x > 1.25x
    checks = _checks(True, 1.25, bare=[10.0], scaled=[12.0], floors=([2.0], [2.5], [3.0]), guarded=[14.0],
                     torch_way=[16.0])
    assert not any("out of reach" in c for c in checks), checks
    assert any("below the bound through PyTorch's fused kernel (1.40x): reachable only by a kernel that clips "
               "without writing the grads back" in c for c in checks), checks


def test_a_guard_clipping_without_write_back_is_held_to_the_bare_bound():
    # Clipping through gradguard's read-only-grads kernel: the bound is the bare step + one read
    # (1.2x), the write-back bound (1.4x) no excuse and no verdict.
    checks = _checks(True, 1.25, readonly=True, bare=[10.0], scaled=[12.0], floors=([2.0], [2.5], [3.0]),
                     guarded=[12.6], torch_way=[16.0])
    assert "guarded / that bound = 1.05x" in checks, checks
    assert not any("reachable only by" in c or "out of reach" in c for c in checks), checks


def test_reachable_targets_add_no_verdict():
    checks = _checks(False, 1.25, bare=[10.0], scaled=[12.0], floors=([2.0], [2.5], [3.0]), guarded=[12.1],
                     torch_way=[16.0])
    assert len(checks) == 2 and checks[0].startswith("bound: ") and checks[1].startswith("guarded / that bound")


@pytest.mark.skipif(not sc.have_floor(), reason="the bench's read floor (compiled extension) is not built")
@pytest.mark.parametrize("clip", [True, False])
def test_fused_table_measures_its_bounds(clip):
    g = torch.Generator().manual_seed(0)
    params = sc._params_with([torch.randn(s, generator=g) * 1e-3 for s in ((64, 48), (48,), (300,))])
    tab = oc.fused_table(params, "t", "cpu", 2, clip=clip)
    names = {r.name for r in tab.rows}
    assert {oc.GRADS_FLOOR, oc.BOUND_BARE} <= names
    assert (oc.BOUND_SCALED in names) == clip and (oc.SCALED_FUSED in names) == clip
    assert not any(n.startswith(oc.FLOOR_PART) for n in names - {oc.GRADS_FLOOR})
    by = {r.name: r for r in tab.rows}
    assert by[oc.GRADS_FLOOR].bytes == by[oc.STATS_ONLY].bytes == 4 * sum(p.numel() for p in params)
    assert any(c.startswith("bound: (bare step") for c in tab.checks)


def test_the_foreach_bound_adds_the_best_read_and_rewrite_per_round():
    reads = [f"{oc.FLOOR_PART}{k} stream(s) per thread" for k in (1, 4)]
    rewrites = [f"in-place rewrite floor, {k} stream(s) per thread" for k in (1, 4)]
    t = {oc.BARE_FOREACH: [100.0, 200.0], oc.GUARD_FOREACH: [115.0, 226.0],
         reads[0]: [5.0, 9.0], reads[1]: [4.0, 10.0], rewrites[0]: [7.0, 8.0], rewrites[1]: [6.0, 12.0]}
    oc._add_foreach_bound(t, reads, rewrites)
    assert t[oc.GRADS_FLOOR] == [4.0, 9.0] and t[oc.REWRITE_FLOOR] == [6.0, 8.0]
    assert t[oc.BOUND_FOREACH] == [110.0, 217.0]
    assert not any(p in t for p in reads + rewrites)
    tab = oc.Table("t", [])
    oc._foreach_bound_checks(tab, t, 1.10)  # bound: median of 1.10x and 1.085x
    assert tab.checks[0].startswith("bound: (bare step + the grads read at the floor + rewritten in place")
    assert not any("out of reach" in c for c in tab.checks)
    tab = oc.Table("t", [])
    oc._foreach_bound_checks(tab, t, 1.05)
    assert any("<= 1.05x is below the bound" in c and "out of reach" in c for c in tab.checks), tab.checks


@pytest.mark.skipif(not sc.have_floor(), reason="the bench's floors (compiled extension) are not built")
def test_rewrite_floor_writes_back_what_it_read():
    x = torch.randn(4099, dtype=torch.float64)
    before = x.clone()
    for streams in (1, 4):
        torch.ops.gradguard_bench.rewrite_floor(x, 0, streams)
        assert torch.equal(x.view(torch.int64), before.view(torch.int64))
    torch.ops.gradguard_bench.rewrite_floor(x, 1, 4)  # it does write: every word's lowest bit flips
    assert torch.equal(x.view(torch.int64), before.view(torch.int64) ^ 1)
    with pytest.raises(RuntimeError, match="streams"):
        torch.ops.gradguard_bench.rewrite_floor(x, 0, 0)
    # With a prefetch: the same walk (every word, once), and the tail of a length that is not a
    # multiple of the 8-word line.
    for streams, ahead in ((1, 2048), (4, 64), (3, 1 << 20)):
        y = before.clone()
        torch.ops.gradguard_bench.rewrite_floor(y, 5, streams, ahead)
        assert torch.equal(y.view(torch.int64), before.view(torch.int64) ^ 5)
    with pytest.raises(RuntimeError, match="prefetch"):
        torch.ops.gradguard_bench.rewrite_floor(x, 0, 1, -1)


@pytest.mark.skipif(not sc.have_floor(), reason="the bench's floors (compiled extension) are not built")
def test_read_floor_sums_every_word_with_and_without_a_prefetch():
    x = torch.randint(0, 1 << 40, (4099,), dtype=torch.int64)
    want = int(x.sum())
    for streams, ahead in ((1, 0), (4, 0), (8, 0), (1, 2048), (4, 2048), (3, 64)):
        assert int(torch.ops.gradguard_bench.read_floor(x, streams, ahead)) == want & (2**63 - 1)


@pytest.mark.skipif(not sc.have_floor(), reason="the bench's floors (compiled extension) are not built")
def test_foreach_table_measures_its_bound():
    g = torch.Generator().manual_seed(0)
    params = sc._params_with([torch.randn(s, generator=g) * 1e-3 for s in ((64, 48), (48,), (300,))])
    tab = oc.foreach_table(params, "t", "cpu", 2)
    by = {r.name: r for r in tab.rows}
    assert {oc.GRADS_FLOOR, oc.REWRITE_FLOOR, oc.BOUND_FOREACH} <= set(by)
    assert by[oc.REWRITE_FLOOR].bytes == 2 * by[oc.GRADS_FLOOR].bytes == 8 * sum(p.numel() for p in params)
    assert any(c.startswith("bound: (bare step + the grads read at the floor + rewritten") for c in tab.checks)


@pytest.mark.skipif(not sc.have_floor(), reason="the bench's read floor (compiled extension) is not built")
def test_the_read_floors_include_torch_sum():
    # torch.sum read the bytes faster than every C++ walk on some days (1 thread: 25 against 27 ms
    # over 498 MB): a floor that left it out judged the kernels against a slower read.
    flat = torch.ones(1024)
    cases = sc.read_floor_cases(flat)
    assert sc.TORCH_SUM in cases and float(cases[sc.TORCH_SUM]()) == 1024.0
    assert f"{oc.FLOOR_PART}torch.sum" in oc._floor_cases([flat], "cpu")
    times = {name: [2.0, 3.0] for name in cases}
    times[sc.TORCH_SUM] = [1.0, 4.0]
    sc.add_best(times, sc.READ_FLOOR, list(cases))
    assert times[sc.READ_FLOOR] == [1.0, 3.0]
