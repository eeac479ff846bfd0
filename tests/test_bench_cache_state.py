"""The bench's cache-state table (gradguard.bench.stats_cases.cache_state_table): every case in
both cache states, and checks for each; a few small tensors, a few seconds."""
from __future__ import annotations

import json

import pytest
import torch

from gradguard.bench import stats_cases as sc


def _small_grads():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g) for s in ((64, 48), (48,), (300,), (16, 16, 3))]


def _assert_both_states(tab, cases):
    names = {r.name for r in tab.rows}
    for case in cases:
        for state in sc.STATES:
            assert f"{state}: {case}" in names, (state, case, sorted(names))
    assert all(r.ms > 0 for r in tab.rows)
    text = tab.format()
    assert "cold" in text and "warm" in text
    json.dumps(tab.as_dict())


@pytest.mark.skipif(not sc.have_floor(), reason="the bench's read floor (compiled extension) is not built")
def test_cache_state_table_with_read_floor():
    tab = sc.cache_state_table(_small_grads(), "t", "cpu", 3, evict=8 << 20)
    assert tab.title.startswith("grad_stats in equal cache states (cold: 8 MB read before each call;"), tab.title
    _assert_both_states(tab, [sc.READ_FLOOR, sc.KERNEL_ALONE, sc.KERNEL_FLAT, sc.GRAD_STATS, sc.FOREACH_NORM,
                              sc.TORCH_SUM] + [f"read floor, {sc.walk_label(k, p)}" for k, p in sc.READ_WALKS])
    assert tab.state_floor == sc.READ_FLOOR and tab.floor is None
    checks = tab.checks
    for what in ("kernel alone", "grad_stats"):
        for state in sc.STATES:
            assert any(c.startswith(f"{state}: {what} / read floor = ") and "(target <= 1.25x)" in c
                       for c in checks), checks
    assert any(c.startswith("cold: _foreach_norm / grad_stats (speed-up)") for c in checks)
    assert all(c.endswith(": met") or c.endswith(": NOT met") for c in checks)


def test_cache_state_table_without_read_floor(monkeypatch):
    # What a build without the floor (or GRADGUARD_DISABLE_EXT=1) runs: torch.sum is the floor,
    # and the eviction reads its buffer with torch.sum.
    monkeypatch.setattr(sc, "have_floor", lambda: False)
    tab = sc.cache_state_table(_small_grads(), "t", "cpu", 3, evict=8 << 20)
    _assert_both_states(tab, [sc.KERNEL_ALONE, sc.KERNEL_FLAT, sc.GRAD_STATS, sc.FOREACH_NORM, sc.TORCH_SUM])
    assert tab.state_floor == sc.TORCH_SUM
    assert not any(r.name.endswith(sc.READ_FLOOR) for r in tab.rows)
    assert sum("torch.sum (no read floor built)" in c for c in tab.checks) == 4
    assert any(c.startswith("cold: ") for c in tab.checks) and any(c.startswith("warm: ") for c in tab.checks)


def test_cold_state_reads_twice_the_largest_cache(monkeypatch):
    # A fixed 128 MB left the 30.5 MB list partly in a 480 MB L3 (2026-12-07): "cold" compared an L3
    # read with a DRAM read.
    assert sc.evict_bytes() == max(sc.EVICT_MIN_BYTES, min(sc.EVICT_MAX_BYTES, 2 * sc.largest_cache_bytes()))
    monkeypatch.setattr(sc, "largest_cache_bytes", lambda: 480 << 20)
    assert sc.evict_bytes() == 960 << 20
    monkeypatch.setattr(sc, "largest_cache_bytes", lambda: 32 << 20)
    assert sc.evict_bytes() == 128 << 20
    monkeypatch.setattr(sc, "largest_cache_bytes", lambda: 0)
    assert sc.evict_bytes() == 128 << 20
    monkeypatch.setattr(sc, "largest_cache_bytes", lambda: 8 << 30)
    assert sc.evict_bytes() == 4 << 30


def test_largest_cache_reads_this_machine():
    # Linux reports its caches in sysfs; the VMs of this project report an L3 of 32-480 MB.
    import os
    if not os.path.exists("/sys/devices/system/cpu/cpu0/cache/index0/size"):
        pytest.skip("no cache sizes in sysfs")
    assert sc.largest_cache_bytes() >= 1 << 20
