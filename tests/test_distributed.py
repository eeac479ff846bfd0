"""Distributed guarding: one spawned 2-process gloo group on 127.0.0.1 runs every scenario
(tests/dist_scenarios.py) once; each test below checks one property of its results against the
single-process reference run on the concatenated data (float64, so tolerances are tight).
The in-process tests check the rank arithmetic and the combine math on their own."""
from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

import dist_scenarios
import dist_spawn
from gradguard import distributed as gd

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

SCENARIOS = ["ddp", "fsdp2", "fsdp1_flat", "fsdp1_orig", "fsdp1_no_shard", "fsdp1_no_shard_unit", "zero_ddp",
             "zero_plain", "tp", "fsdp2_tp_2d", "fsdp2_tp_2d_strided"]
TOL = dict(rtol=1e-12, atol=1e-14)


@pytest.fixture(scope="module")
def runs():
    ranks = dist_spawn.run(dist_scenarios.run_all, world_size=2, timeout=240)
    return ranks, dist_scenarios.reference()


def _same(a: list[float], b: list[float]) -> None:
    torch.testing.assert_close(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64),
                               equal_nan=True, **TOL)


@pytest.mark.parametrize("name", SCENARIOS)
def test_total_norm_is_torchs_norm_of_the_full_gradients(runs, name):
    ranks, ref = runs
    for r in ranks:
        _same(r[name]["norms"], ref["norms"])  # ref: torch.nn.utils.get_total_norm, one process


@pytest.mark.parametrize("name", SCENARIOS)
def test_one_decision_on_every_rank(runs, name):
    ranks, _ = runs
    a, b = (r[name] for r in ranks)
    assert a["skipped"] == b["skipped"] == [s in dist_scenarios.NAN_STEPS for s in range(dist_scenarios.STEPS)]
    _same(a["coefs"], b["coefs"])
    assert all(c < 1.0 for c, s in zip(a["coefs"], a["skipped"]) if not s)  # every finite step clipped


@pytest.mark.parametrize("name", SCENARIOS)
def test_full_params_and_step_counts_match_the_single_process_run(runs, name):
    ranks, ref = runs
    for r in ranks:
        got = r[name]["params"]
        assert sorted(got) == sorted(ref["params"])
        for k, v in ref["params"].items():
            torch.testing.assert_close(got[k], v, **TOL)
        assert r[name]["steps"] and all(s == ref["taken"] for s in r[name]["steps"]), r[name]["steps"]


@pytest.mark.parametrize("name,expected", [("ddp", 0), ("fsdp2", 1), ("fsdp1_flat", 1), ("fsdp1_orig", 1),
                                           ("fsdp1_no_shard", 0), ("fsdp1_no_shard_unit", 1),
                                           ("zero_ddp", 1), ("zero_plain", 1), ("tp", 1), ("fsdp2_tp_2d", 1),
                                           ("fsdp2_tp_2d_strided", 1)])
def test_collectives_added_per_step(runs, name, expected):
    for r in runs[0]:
        assert r[name]["collectives"] == [expected] * dist_scenarios.STEPS


@pytest.mark.parametrize("name", SCENARIOS)
def test_report_layer_norms_are_the_full_gradients_norms(runs, name):
    ranks, ref = runs
    for r in ranks:
        got = r[name]["layer_norms"]
        if name in ("fsdp1_flat", "fsdp1_no_shard"):  # one flat parameter holds every gradient
            _same([math.hypot(*got)], [math.hypot(*ref["layer_norms"])])
        else:
            _same(got, ref["layer_norms"])


def test_names(runs):
    ranks, ref = runs
    for r in ranks:
        assert (r["fsdp2"]["names"] == ref["names"] == r["tp"]["names"] == r["fsdp1_orig"]["names"]
                == r["fsdp2_tp_2d"]["names"])
        assert r["fsdp1_flat"]["names"] == ["_flat_param"]
        # DDP's `module.` is a wrapper's part, as FSDP1's and torch.compile's are (it was kept).
        assert r["ddp"]["names"] == ref["names"]


def test_tp_mixes_shard_and_replicate(runs):
    assert runs[0][0]["tp"]["placements"] == ["(Shard(dim=0),)", "(Shard(dim=0),)", "(Shard(dim=1),)",
                                              "(Replicate(),)"]
    # FSDP2 on mesh dimension "dp" beside tensor parallel on "tp", one 2-D mesh
    assert runs[0][0]["fsdp2_tp_2d"]["placements"] == [
        "(Shard(dim=0), Shard(dim=0))", "(Shard(dim=0), Shard(dim=0))", "(Shard(dim=0), Shard(dim=1))",
        "(Shard(dim=0), Replicate())"]
    # FSDP2 over a dimension tensor parallel already shards: _StridedShard (refused before)
    assert runs[0][0]["fsdp2_tp_2d_strided"]["placements"][:2] == ["(_StridedShard(dim=0, sf=2), Shard(dim=0))"] * 2


@pytest.mark.parametrize("name", ["fsdp2", "tp"])
def test_functional_api_on_dtensor_grads(runs, name):
    for r in runs[0]:
        d = r[name]["direct"]
        for key in ("total", "total_inf"):
            _same([d[key][0]], [d[key][1]])
        _same(*d["norms"])
        _same(*d["amax"])
        assert d["finite"] is True
        _same([d["clip"][0]], [d["total"][1]])
        assert max(d["clip"][1]) < 1e-14  # every full grad scaled by torch's clip coefficient
        assert max(d["clip_with_norm"]) < 1e-14  # and with torch's get_total_norm (a DTensor) handed in
        assert d["finite_after_nan"] is False  # a NaN in rank 0's shard, seen by both ranks
        assert d["nan_counts"] == [1, 0, 0, 0]


def test_zero_without_ddp_with_a_gradient_missing_on_one_rank(runs):
    ranks, _ = runs
    a, b = (r["zero_missing_grad"] for r in ranks)
    assert not a["skipped"] and not b["skipped"]
    # ZeRO's ranks combine their statistics by max: the branch's come from rank 0 alone.
    want = [max(x, y) for x, y in zip(a["local_norms"], b["local_norms"])]
    _same(a["norms"], want)
    _same(b["norms"], want)
    _same([a["total"]], [math.sqrt(sum(v * v for v in want))])
    for p, q in zip(a["params"], b["params"]):  # ZeRO broadcast every partition after the step
        assert torch.equal(p, q)


def test_fsdp2_hygiene_gives_no_false_warning(runs):
    for r in runs[0]:
        assert r["fsdp2_hygiene"] == {"none": [], "in_place": [], "forgotten": []}


def test_fsdp2_resumed_through_distributed_checkpoint_equals_the_uninterrupted_run(runs):
    for r in runs[0]:
        d = r["fsdp2_dcp_resume"]
        assert d["init_steps"] == 0  # DCP's state-creating step on the fresh guard is not a step
        for resumed, whole in d["params"]:
            assert torch.equal(resumed, whole)
        assert d["summary"][0] == d["summary"][1] and d["summary"][0]["steps"] == dist_scenarios.STEPS
        assert d["spike"][0] == d["spike"][1]
        assert d["history"][0] == d["history"][1]


def test_fsdp1_refusals_and_process_group(runs):
    for r in runs[0]:
        for key in ("fsdp1_flat", "fsdp1_orig"):
            d = r[key]
            # GradGuard's refusal points to model= (process_group= over FSDP1 shards is taken too,
            # but model= also tells the units that do not shard).
            assert "FSDP1" in d["refusal"] and "pass model=<the FSDP module>" in d["refusal"]
            assert "gradguard.clip_grad_norm_" in d["clip_refusal"] and "process_group=" in d["clip_refusal"]
            _same([d["pg_total"][0]], [d["pg_total"][1]])


def test_partial_dtensor_is_reduced_then_judged(runs):
    # Refused before (sequence parallelism leaves the norm layers' gradients Partial).
    for r in runs[0]:
        assert r["tp"]["partial_stats"] == pytest.approx(math.sqrt(3 * 2.0 ** 2), rel=1e-15)


def test_tensor_parallel_with_sequence_parallel_equals_torchs_clip(runs):
    r0, r1 = (r["tp_sequence_parallel"] for r in runs[0])
    assert "Partial(sum)" in r0["placements"]["norm.weight"] and "Partial(sum)" in r0["placements"]["norm.bias"]
    for r in (r0, r1):
        assert r["skipped"] == [False, True, False]
        assert r["collectives"] == [(1, 2)] * 3  # one gather; norm.weight's and norm.bias's reductions
        _same(r["totals"], r0["totals"])
        assert math.isnan(r["totals"][1])
        mine, ref = r["functional"]
        assert mine == pytest.approx(ref, rel=1e-13)
        ref = dist_scenarios.reference_sequence_parallel()
        for n, t in r["params"].items():
            assert torch.equal(t, r0["params"][n])  # one decision, the same parameters on every rank
            torch.testing.assert_close(t, ref["params"][n], **TOL)
        assert r["clip_norm"] == pytest.approx(ref["clip_norm"], rel=1e-13)
        for n, g in r["clip_grads"].items():
            torch.testing.assert_close(g, ref["clip_grads"][n], **TOL)
        assert r["clip_placements"] == ["(Replicate(),)", "(Replicate(),)"]  # the reduced gradients are kept


# ---- in-process: the rank arithmetic and the combine math ----------------------------------------

def test_shard_ranks_on_a_2x2_mesh():
    mesh = torch.tensor([[0, 1], [2, 3]])
    # rank 3 sits at (1, 1): sharded on dim 0 -> the column {1, 3}; on dim 1 -> the row {2, 3}
    assert gd.shard_ranks(mesh, (1, 1), [0]) == (1, 3)
    assert gd.shard_ranks(mesh, (1, 1), [1]) == (2, 3)
    assert gd.shard_ranks(mesh, (1, 1), [0, 1]) == (0, 1, 2, 3)
    assert gd.shard_ranks(mesh, (0, 1), [1]) == (0, 1)


@pytest.mark.parametrize("p", [2.0, 1.0, 3.0, math.inf])
def test_combine_sums_shards_maxes_amax_and_zero_entries(p):
    # 3 ranks, 3 entries: entry 0 sharded over ranks {0, 2}, entry 1 local (rank 1's own),
    # entry 2 max-reduced over all (ZeRO). Each rank's stats come from real data through the op,
    # so acc has the op's meaning (normalized by amax); huge values check that nothing overflows.
    gen = torch.Generator().manual_seed(0)
    data = [[torch.randn(5, generator=gen, dtype=torch.float64) * scale for scale in (1e200, 1.0, 3.0)]
            for _ in range(3)]
    data[1][2][0] = math.nan
    g = torch.stack([torch.stack(list(torch.ops.gradguard.multi_tensor_stats(d, p))).double() for d in data])
    contrib = torch.tensor([[True, False, True], [False, True, True], [True, False, True]])
    is_max = torch.tensor([False, False, True])
    acc, nan, inf, amax = gd.combine(g, contrib, is_max, p)
    norm = amax * (acc if math.isinf(p) else acc.pow(1.0 / p))

    def ref(t):
        t = t[torch.isfinite(t)]
        return torch.linalg.vector_norm(t / 1e200, p) * 1e200 if t.abs().max() > 1e100 else torch.linalg.vector_norm(t, p)

    torch.testing.assert_close(norm[0] / 1e200, ref(torch.cat([data[0][0], data[2][0]])) / 1e200, rtol=1e-12, atol=0)
    torch.testing.assert_close(norm[1], ref(data[1][1]), rtol=1e-12, atol=0)
    torch.testing.assert_close(norm[2], max(ref(d[2]) for d in data), rtol=1e-12, atol=0)
    assert nan.tolist() == [0.0, 0.0, 1.0] and inf.tolist() == [0.0, 0.0, 0.0]
    assert amax[0] == max(data[0][0].abs().max(), data[2][0].abs().max())


def test_no_reduction_without_sharding():
    local, plan = gd.localize([torch.ones(3), torch.ones(2)])
    assert plan.group is None and len(local) == 2


def test_process_group_shards_missing_a_grad_on_one_rank(runs):
    ranks, _ = runs
    for r in ranks:
        d = r["pg_missing_grad"]
        assert not d["skipped"] and d["stepped"], d
        for k in ("guard_total", "clip_total"):
            assert math.isclose(d[k], d["true"], rel_tol=1e-12), d


def test_a_process_group_assigned_after_a_step_takes_effect(runs):
    ranks, _ = runs
    for r in ranks:
        assert r["pg_assigned_later"] == {"skipped": True, "unchanged": True, "global_norm": True}, r


def test_lbfgs_under_ddp_rolls_back_on_every_rank_for_one_ranks_loss(runs):
    ranks, _ = runs
    for which in (1, 2):
        got = [r["ddp_lbfgs_loss"][which] for r in ranks]
        assert all(d == {"calls": which, "all_reduces": which, "skipped": 1, "unchanged": True} for d in got), \
            (which, got)


@pytest.mark.parametrize("kind", ["fsdp2", "tp"])
def test_lbfgs_with_dtensor_parameters_rolls_back_on_every_rank_for_one_ranks_loss(runs, kind):
    ranks, _ = runs
    for which in (1, 2):
        got = [r[f"{kind}_lbfgs_loss"][which] for r in ranks]
        assert all(d == {"calls": which, "skipped": 1, "unchanged": True} for d in got), (which, got)


def test_dtensor_parameters_without_a_gradient_on_one_rank(runs):
    ranks, _ = runs
    d0, d1 = (r["dtensor_missing_grad"] for r in ranks)
    for step in (0, 1):  # one decision, and C's norm (its shards on rank 0 only) seen on both ranks
        assert d0[step]["skipped"] == d1[step]["skipped"] == (step == 1), (d0, d1)
        _same([d0[step]["a"], d0[step]["c"], d0[step]["c_nan"]], [d1[step]["a"], d1[step]["c"], d1[step]["c_nan"]])
    assert d0[0]["c"] > 0 and d1[1]["c_nan"] == 1 and d0[1]["unchanged"] and d1[1]["unchanged"]
    assert d0[0]["layers"] == d1[0]["layers"] == ["a", "b", "c"]  # the frozen "f" left out
    assert d0["clip_total"] == d1["clip_total"] and d0["clip_with_plain"] > d1["clip_with_plain"]


def test_fsdp1_with_sharded_grad_scaler_keeps_one_scale_and_one_decision(runs):
    # An overflow in one rank's shard: every rank backs off its loss scale and skips the step,
    # as without the guard, and no rank raises alone for max_consecutive_skips.
    # Told by model=, by process_group= or by both.
    ranks, _ = runs
    want = ranks[0]["fsdp1_sharded_scaler"]["plain"]
    assert want["scales"] == [1024.0, 512.0, 512.0, 512.0]
    for r in ranks:
        d = r["fsdp1_sharded_scaler"]
        assert d["plain"]["scales"] == want["scales"]
        for how in ("model", "process_group", "both"):
            assert d[how]["scales"] == want["scales"], how
            for k, v in want["params"].items():
                assert torch.equal(d[how]["params"][k], v), (how, k)
            # GradScaler skipped the overflowed step itself: the guard took and counted the other three.
            assert d[how]["summary"]["steps"] == 3 and d[how]["summary"]["skipped"] == 0, (how, d[how]["summary"])


def test_misuse_is_refused_on_every_rank_and_the_group_still_works(runs):
    ranks, _ = runs
    for rank, r in enumerate(ranks):
        d = r["misuse"]
        if rank == 0:
            assert d["non_member"] is None, d
        else:
            assert "is not a member of `process_group`" in d["non_member"], d
        assert "DistributedDataParallel" in d["ddp_pg"] and "drop process_group=" in d["ddp_pg"], d
        assert "hold [1, 0] parameters" in d["clip_empty_rank"], d
        assert "hold [2, 1] parameters" in d["stats_fewer"] and "hold [2, 1] parameters" in d["finite_fewer"], d
        assert d["clip_all_empty"] == 0.0
        assert math.isclose(d["stats_same"], math.sqrt(4 * 9.0), rel_tol=1e-15), d
        assert d["count_checks_repeated"] == 0 and math.isclose(d["compiled_clip"], math.sqrt(6.0), rel_tol=1e-15), d
        assert "DistributedDataParallel" in d["ddp_wrapped"] and d["ddp_group_of_one"] is None, d


def test_process_group_ranks_holding_different_parameter_counts_are_refused_on_every_rank(runs):
    ranks, _ = runs
    for r in ranks:
        for held, d in r["pg_uneven_params"].items():
            want = f"hold {list(held)} parameters"
            assert d["error"] is not None and want in d["error"] and d["untouched"], (held, d)


def test_process_group_with_a_plain_grad_scaler_skips_on_every_rank(runs):
    ranks, _ = runs
    for r in ranks:
        d = r["pg_plain_scaler"]
        assert d["contract"] and d["steps"] == 4 and d["skipped"] == [False, True, False, False], d


def test_fsdp1_hybrid_shard_refuses_a_process_group_over_its_replicas():
    # 4 ranks: FSDP1 HYBRID_SHARD, 2 replicas x 2 shards. process_group= the world summed each
    # shard once per replica (norm sqrt(2) too large, every step clipped harder) without a word.
    ranks = dist_spawn.run(dist_scenarios.scenario_fsdp1_hybrid_process_group, world_size=4, timeout=240)
    want = dist_scenarios.reference_first_norm()
    for r in ranks:
        assert "hybrid sharding whose replicas share `process_group`" in r["refusal"]
        assert math.isclose(r["total_norm"], want, rel_tol=1e-12)
        # LBFGS, the loss non-finite on rank 2 only: both replicas roll back, not rank 2's alone.
        for which in (1, 2):
            assert r["lbfgs_loss"][which] == {"calls": which, "skipped": 1, "unchanged": True}, r["lbfgs_loss"]


def test_a_parameter_unfrozen_under_process_group_gets_no_state_on_a_skipped_step():
    for r in dist_spawn.run(dist_scenarios.scenario_unfrozen_fused_process_group, world_size=2, timeout=120):
        assert r["skipped"] and r["b_state"] == []
        assert r["b_state_after"] == ["exp_avg", "exp_avg_sq", "step"]


def test_module_caches_stay_bounded_and_ignore_a_reused_id(runs):
    ranks, _ = runs
    for r in ranks:
        out = r["module_caches"]
        _same(out["totals"], [out["true"]] * len(out["totals"]))
        assert all(n <= out["limit"] for n in out["sizes"].values()), out["sizes"]
        _same([out["stale_total"]], [out["true"]])
