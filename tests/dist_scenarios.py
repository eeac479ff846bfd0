"""The distributed scenarios, run on every rank of one spawned gloo group (tests/dist_spawn.py),
and the single-process reference they are compared with (tests/test_distributed.py).

Every scenario trains the same float64 MLP for STEPS guarded steps with clipping, with a NaN in
one rank's gradient (or data, for DDP) at the steps in NAN_STEPS, and returns per step the
guard's total norm, clip coefficient and skip flag and the collectives the guard issued, then the
full parameters and the optimizer step counts."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

import gradguard

STEPS = 5
MAX_NORM = 0.05
NAN_STEPS = {1: 0, 3: 1}  # step -> the rank whose gradient gets a NaN
IN_F, HIDDEN, OUT_F, ROWS = 6, 8, 3, 8

COLLECTIVES = ("all_reduce", "all_gather_single", "all_gather_into_tensor", "all_gather", "broadcast", "reduce_scatter_tensor",
               "reduce", "gather", "scatter", "all_to_all_single", "all_to_all", "barrier", "all_gather_object",
               "broadcast_object_list", "reduce_scatter")


class CollectiveCounter:
    """Counts torch.distributed collectives issued inside guard.step() but outside the inner
    optimizer's step (ZeRO's step broadcasts by design): the ones the guard adds."""

    def __init__(self):
        self.in_guard = self.in_inner = False
        self.count = 0
        for name in COLLECTIVES:
            fn = getattr(dist, name, None)
            if fn is not None and not getattr(fn, "_counted", False):
                setattr(dist, name, self._wrap(fn))

    def _wrap(self, fn):
        def counted(*a, **k):
            if self.in_guard and not self.in_inner:
                self.count += 1
            return fn(*a, **k)

        counted._counted = True
        return counted

    def guarded_step(self, guard):
        inner = guard.optimizer
        step = type(inner).step.__get__(inner)

        def inner_step(*a, **k):
            self.in_inner = True
            try:
                return step(*a, **k)
            finally:
                self.in_inner = False

        inner.step = inner_step
        self.in_guard, before = True, self.count
        try:
            guard.step()
        finally:
            self.in_guard = False
            del inner.step
        return self.count - before


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(IN_F, HIDDEN), torch.nn.Tanh(),
                               torch.nn.Linear(HIDDEN, OUT_F)).double()


def batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return (torch.randn(ROWS, IN_F, generator=g, dtype=torch.float64),
            torch.randn(ROWS, OUT_F, generator=g, dtype=torch.float64))


def loss_of(model, x, y):
    return ((model(x) - y) ** 2).mean()


def local_of(t):
    return t.to_local() if gradguard.distributed.is_dtensor(t) else t


def plant_nan(params):
    """A NaN in the first element this rank holds of the first gradient it holds any of."""
    for p in params:
        if p.grad is not None and local_of(p.grad).numel():
            local_of(p.grad).view(-1)[0] = math.nan
            return
    raise AssertionError("this rank holds no gradient element")


def clean(name: str) -> str:
    for prefix in ("module.", "_fsdp_wrapped_module."):
        name = name.replace(prefix, "")
    return name


def reference() -> dict:
    """The single-process run on the concatenated data."""
    model = make_model()
    guard = gradguard.GradGuard(torch.optim.AdamW(model.parameters(), lr=0.05), max_norm=MAX_NORM, model=model)
    norms, taken = [], 0
    for step in range(STEPS):
        x, y = batch(step)
        guard.zero_grad()
        loss_of(model, x, y).backward()
        if step in NAN_STEPS:
            plant_nan(list(model.parameters()))
        norms.append(float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])))
        layer_norms = [float(p.grad.norm()) for p in model.parameters()]
        guard.step()
        taken += not bool(guard.last.skipped)
    return {"norms": norms, "taken": taken, "layer_norms": layer_norms, "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "names": [n for n, _ in model.named_parameters()]}


def _train(rank, world, counter, model, guard, params, *, shard_data=True, nan_in_data=False, after_backward=None,
           steps=range(STEPS)):
    out = {"norms": [], "coefs": [], "skipped": [], "collectives": []}
    rows = ROWS // world
    for step in steps:
        x, y = batch(step)
        if shard_data:
            x, y = x[rank * rows:(rank + 1) * rows], y[rank * rows:(rank + 1) * rows]
        if nan_in_data and NAN_STEPS.get(step) == rank:
            x = x.clone()
            x[0, 0] = math.nan
        guard.zero_grad()
        loss_of(model, x, y).backward()
        if after_backward is not None:
            after_backward()
        if not nan_in_data and NAN_STEPS.get(step) == rank:
            plant_nan(params)
        out["collectives"].append(counter.guarded_step(guard))
        rep = guard.last.as_dict()
        out["norms"].append(rep["total_norm"])
        out["coefs"].append(rep["clip_coef"])
        out["skipped"].append(rep["skipped"])
    out["names"] = list(guard.last.names)
    out["layer_norms"] = [v["norm"] for v in guard.last.as_dict(layers=True)["layers"].values()]
    return out


def _steps(state) -> list[int]:
    return [int(local_of(s["step"]).item()) for s in state.values() if "step" in s]


def direct_api(model, mesh_sharded: bool) -> dict:
    """grad_stats / all_finite / clip_grad_norm_ on this model's DTensor gradients, against
    torch's answers on the full gradients."""
    x, y = batch(0)
    model.zero_grad()
    loss_of(model, x, y).backward()
    grads = [p.grad for p in model.parameters()]
    full = [g.full_tensor().clone() for g in grads]  # a Replicate grad's full_tensor() is itself
    out = {}
    st = gradguard.grad_stats(grads)
    out["total"] = (float(st.total_norm), float(torch.nn.utils.get_total_norm(full)))
    out["norms"] = (st.norms.tolist(), [float(f.norm()) for f in full])
    out["amax"] = (st.amax.tolist(), [float(f.abs().max()) for f in full])
    st_inf = gradguard.grad_stats(grads, norm_type=math.inf)
    out["total_inf"] = (float(st_inf.total_norm), float(torch.nn.utils.get_total_norm(full, norm_type=math.inf)))
    out["finite"] = bool(gradguard.all_finite(grads))
    expected_coef = min(MAX_NORM / (out["total"][1] + 1e-6), 1.0)
    total = gradguard.clip_grad_norm_(list(model.parameters()), MAX_NORM)
    out["clip"] = (float(total), [(g.full_tensor() - f * expected_coef).abs().max().item() for g, f in zip(grads, full)])
    # torch's two-call form: get_total_norm of DTensor grads returns a DTensor, which
    # gradguard.clip_grads_with_norm_ takes as torch's does (it raised: mixed Tensor and DTensor).
    model.zero_grad()
    loss_of(model, x, y).backward()  # the same gradients again, unclipped
    grads = [p.grad for p in model.parameters()]
    torch_total = torch.nn.utils.get_total_norm(grads)
    gradguard.clip_grads_with_norm_(list(model.parameters()), MAX_NORM, torch_total)
    out["clip_with_norm"] = [(g.full_tensor() - f * expected_coef).abs().max().item() for g, f in zip(grads, full)]
    if dist.get_rank() == 0:
        local_of(grads[0]).view(-1)[0] = math.nan
    out["finite_after_nan"] = bool(gradguard.all_finite(grads))
    out["nan_counts"] = gradguard.grad_stats(grads).nan_count.tolist()
    return out


def scenario_ddp(rank, world, counter):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(make_model())
    guard = gradguard.GradGuard(torch.optim.AdamW(model.parameters(), lr=0.05), max_norm=MAX_NORM, model=model)
    out = _train(rank, world, counter, model, guard, list(model.parameters()), nan_in_data=True)
    out["params"] = {clean(n): p.detach().clone() for n, p in model.named_parameters()}
    out["steps"] = _steps(guard.state)
    return out


def scenario_fsdp2(rank, world, counter):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    model = make_model()
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    guard = gradguard.GradGuard(torch.optim.AdamW(model.parameters(), lr=0.05), max_norm=MAX_NORM, model=model)
    out = _train(rank, world, counter, model, guard, list(model.parameters()))
    out["params"] = {clean(n): p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    out["steps"] = _steps(guard.state)
    out["direct"] = direct_api(model, True)
    return out


def scenario_fsdp2_hygiene(rank, world):
    """FSDP2 with the hygiene check on, three steps each way of clearing: the HygieneWarnings.
    FSDP2 adds into a gradient's local shard without moving the DTensor's version, so an in-place
    zero_grad() cannot be told from none there: no warning either way (remembering the DTensors
    warned at zero_grad(set_to_none=False))."""
    import warnings

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    got = {}
    for clear in ("none", "in_place", "forgotten"):
        model = make_model()
        fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
        guard = gradguard.GradGuard(torch.optim.SGD(model.parameters(), lr=0.01), model=model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(3):
                if clear != "forgotten":
                    guard.zero_grad(set_to_none=clear == "none")
                x = torch.randn(4, IN_F, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
                model(x).sum().backward()
                guard.step()
        got[clear] = [str(w.message) for w in caught if issubclass(w.category, gradguard.HygieneWarning)]
    return got


def scenario_fsdp2_dcp_resume(rank, world, counter):
    """FSDP2 checkpointed halfway with torch.distributed.checkpoint (get_state_dict, dcp.save),
    resumed into fresh objects (get_state_dict, dcp.load, set_state_dict), against the same run
    uninterrupted. DCP keeps only the optimizer's state and param_groups, so the guard's own state
    goes beside it (guard_state_dict); DCP's get_state_dict on the fresh optimizer steps it once
    on zero gradients to create its state, which the guard must not count (it did: one phantom
    step, a 0.0 norm in the spike statistics)."""
    import os
    import shutil
    import tempfile

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))

    def build():
        model = make_model()
        fully_shard(model[0], mesh=mesh)
        fully_shard(model, mesh=mesh)
        guard = gradguard.GradGuard(torch.optim.AdamW(model.parameters(), lr=0.05), max_norm=MAX_NORM, model=model,
                                    spike=gradguard.ZScoreClip(warmup=1, z=1.0))
        return model, guard

    half = STEPS // 2 + 1
    whole, whole_guard = build()
    _train(rank, world, counter, whole, whole_guard, list(whole.parameters()))
    first, first_guard = build()
    _train(rank, world, counter, first, first_guard, list(first.parameters()), steps=range(half))
    where = [tempfile.mkdtemp(prefix="gradguard_dcp_") if rank == 0 else None]
    dist.broadcast_object_list(where)
    path = where[0]
    try:
        model_sd, optim_sd = get_state_dict(first, first_guard)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
        if rank == 0:
            torch.save(first_guard.guard_state_dict(), os.path.join(path, "guard.pt"))
        dist.barrier()
        model, guard = build()
        model_sd, optim_sd = get_state_dict(model, guard)
        init_steps = guard.summary()["steps"]
        dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
        set_state_dict(model, guard, model_state_dict=model_sd, optim_state_dict=optim_sd)
        guard.load_guard_state_dict(torch.load(os.path.join(path, "guard.pt"), weights_only=True))
        dist.barrier()
    finally:
        if rank == 0:
            shutil.rmtree(path, ignore_errors=True)
    _train(rank, world, counter, model, guard, list(model.parameters()), steps=range(half, STEPS))
    return {"init_steps": init_steps,
            "params": [(p.full_tensor(), q.full_tensor()) for p, q in zip(model.parameters(), whole.parameters())],
            "summary": (guard.summary(), whole_guard.summary()),
            "spike": (guard.spike._state.tolist(), whole_guard.spike._state.tolist()),
            "history": (guard.history.as_dict()["step"], whole_guard.history.as_dict()["step"])}


def scenario_fsdp1(rank, world, counter, use_orig_params):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    model = FSDP(make_model(), device_id=torch.device("cpu"), use_orig_params=use_orig_params)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    out = {}
    # Refused without model=/process_group=: the guard would see this rank's shard only.
    x, y = batch(0)
    loss_of(model, x[:1], y[:1]).backward()
    try:
        gradguard.GradGuard(opt, max_norm=MAX_NORM).step()
    except ValueError as e:
        out["refusal"] = str(e)
    try:
        gradguard.clip_grad_norm_(model.parameters(), MAX_NORM)
    except ValueError as e:
        out["clip_refusal"] = str(e)
    grads = [p.grad if p.grad is not None else p.new_empty(0) for p in model.parameters()]
    pg_total = gradguard.grad_stats(grads, process_group=model.process_group)
    # The full gradient's norm from every rank's shard (FSDP1's own clip_grad_norm_ refuses
    # float64, summon_full_params(with_grads=True) flat parameters).
    sq = torch.stack([(g.double() ** 2).sum() for g in grads]).sum()
    dist.all_reduce(sq)
    full_total = sq.sqrt()
    out["pg_total"] = (float(pg_total.total_norm), float(full_total))
    guard = gradguard.GradGuard(opt, max_norm=MAX_NORM, model=model)
    out.update(_train(rank, world, counter, model, guard, list(model.parameters())))
    with FSDP.summon_full_params(model):
        out["params"] = {clean(n): p.detach().clone() for n, p in model.named_parameters()}
    out["steps"] = _steps(guard.state)
    return out


def scenario_fsdp1_sharded_grad_scaler(rank, world):
    """FSDP1 + ShardedGradScaler, an Inf in rank 0's gradient shard only at step 1 (what an fp16
    overflow in the reduce-scatter looks like), guarded and not. The guard used to take the
    scaler's flag through the amp-scaling contract: that flag was rank 0's alone, so rank 1 kept
    its loss scale, the ranks' scales and clip coefficients drifted apart, and with
    max_consecutive_skips=1 rank 1 raised alone."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    out = {}
    # How the guard is told about the shards: model=, process_group= (which the refusal of
    # unreduced FSDP1 shards suggested; the ranks' scales drifted apart there, until 2026-12-06)
    # or both.
    for how in (None, "model", "process_group", "both"):
        model = FSDP(make_model().float(), device_id=torch.device("cpu"))
        inner = torch.optim.AdamW(model.parameters(), lr=0.01)
        kw = {"model": model} if how in ("model", "both") else {}
        if how in ("process_group", "both"):
            kw["process_group"] = model.process_group
        opt = gradguard.GradGuard(inner, max_norm=1e9, max_consecutive_skips=1, **kw) if how else inner
        scaler = ShardedGradScaler(device="cpu", init_scale=1024.0)
        scales = []
        for step in range(4):
            x, y = batch(step)
            opt.zero_grad()
            scaler.scale(loss_of(model, x.float()[rank::world], y.float()[rank::world])).backward()
            if step == 1 and rank == 0:
                next(p for p in model.parameters() if p.grad is not None and p.grad.numel()).grad.view(-1)[0] = math.inf
            scaler.step(opt)
            scaler.update()
            scales.append(float(scaler.get_scale()))
        with FSDP.summon_full_params(model):
            params = {clean(n): p.detach().clone() for n, p in model.named_parameters()}
        out[how or "plain"] = {"scales": scales, "params": params}
        if how:
            out[how]["summary"] = {k: v for k, v in opt.summary().items() if k != "worst_layers"}
    return out


def scenario_fsdp1_unsharded_units(rank, world, counter, everywhere):
    """FSDP1 units that do not shard: NO_SHARD for the whole model (`everywhere`), or a NO_SHARD
    unit inside a FULL_SHARD root. Their gradients are whole on every rank: refused as shards,
    or summed over the group with the shards (the norm counted them once per rank), before."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, ShardingStrategy

    kw = dict(device_id=torch.device("cpu"), use_orig_params=not everywhere)
    m = make_model()
    if everywhere:
        model = FSDP(m, sharding_strategy=ShardingStrategy.NO_SHARD, **kw)
    else:
        m[2] = FSDP(m[2], sharding_strategy=ShardingStrategy.NO_SHARD, **kw)
        model = FSDP(m, sharding_strategy=ShardingStrategy.FULL_SHARD, **kw)
    guard = gradguard.GradGuard(torch.optim.AdamW(model.parameters(), lr=0.05), max_norm=MAX_NORM, model=model)
    # NO_SHARD all-reduces whole gradients, as DDP does: the NaN goes in one rank's data.
    out = _train(rank, world, counter, model, guard, list(model.parameters()), nan_in_data=everywhere)
    with FSDP.summon_full_params(model):
        out["params"] = {clean(n): p.detach().clone() for n, p in model.named_parameters()}
    out["steps"] = _steps(guard.state)
    return out


def scenario_process_group_missing_grad(rank, world):
    """process_group= over hand-made shards, one of which has no gradient on rank 1 (an expert
    that got no tokens): every rank must pack the same entries. Before, the ranks' gathers
    differed in size (gloo aborted, or a finite step was skipped on an uninitialized norm)."""
    g = torch.Generator().manual_seed(10 + rank)
    params = [torch.nn.Parameter(torch.zeros(n, dtype=torch.float64)) for n in (3, 4, 5)]
    for k, p in enumerate(params):
        if not (rank == 1 and k == 2):
            p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
    sq = torch.stack([(p.grad ** 2).sum() for p in params if p.grad is not None]).sum()
    dist.all_reduce(sq)
    out = {"true": float(sq.sqrt())}
    grads = {k: p.grad.clone() for k, p in enumerate(params) if p.grad is not None}
    out["clip_total"] = float(gradguard.clip_grad_norm_(params, 1e9, process_group=dist.group.WORLD))
    guard = gradguard.GradGuard(torch.optim.SGD(params, lr=0.1), max_norm=1e9, process_group=dist.group.WORLD)
    guard.step()
    out["guard_total"], out["skipped"] = float(guard.last.total_norm), bool(guard.last.skipped)
    out["stepped"] = all(torch.equal(params[k].detach(), -0.1 * grads[k]) for k in grads)
    return out


def scenario_process_group_assigned_later(rank, world):
    """process_group assigned after a step: the plan made without it was kept, the statistics
    stayed rank-local, and a NaN in rank 1's shard made rank 1 skip while rank 0 stepped."""
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 2).double()  # each rank holds a shard (hand-rolled sharding)
    opt = gradguard.GradGuard(torch.optim.SGD(m.parameters(), lr=0.1))
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(rank), dtype=torch.float64)
    m(x).sum().backward()
    opt.step()
    opt.zero_grad()
    opt.process_group = dist.group.WORLD
    m(x).sum().backward()
    local = float(torch.stack([p.grad.square().sum() for p in m.parameters()]).sum())
    if rank == 1:
        m.weight.grad[0, 0] = math.nan
    before = [p.detach().clone() for p in m.parameters()]
    opt.step()
    out = {"skipped": bool(opt.last.skipped), "unchanged": all(torch.equal(p, b) for p, b in zip(m.parameters(), before))}
    opt.zero_grad()
    m(x).sum().backward()
    opt.step()
    total = torch.tensor(local, dtype=torch.float64)
    dist.all_reduce(total)
    out["global_norm"] = math.isclose(float(opt.last.total_norm), math.sqrt(float(total)), rel_tol=1e-12)
    return out


def scenario_process_group_uneven_params(rank, world):
    """process_group= with 3 experts over 2 ranks (2 on rank 0, 1 on rank 1): the statistics are
    gathered by position, and gloo aborted rank 1 while rank 0 read rows never sent (an inf
    norm). Refused with an error on every rank, before any gather of statistics."""
    out = {}
    for held in ((2, 1), (2, 0)):  # 0: a rank whose optimizer holds nothing returned alone, the other hung
        params = [torch.nn.Parameter(torch.zeros(4, dtype=torch.float64)) for _ in range(held[rank])]
        for p in params:
            p.grad = torch.ones(4, dtype=torch.float64)
        guard = gradguard.GradGuard(torch.optim.SGD([{"params": params}], lr=0.1), max_norm=1.0,
                                    process_group=dist.group.WORLD)
        try:
            guard.step()
            out[held] = {"error": None}
        except ValueError as e:
            out[held] = {"error": str(e), "untouched": all(
                torch.equal(p.detach(), torch.zeros(4, dtype=torch.float64)) for p in params)}
    return out


def scenario_misuse_refused_on_every_rank(rank, world):
    """What a reviewer found hanging, aborting or silently wrong (2026-12-06), each refused with a
    ValueError on every rank, the group still usable after it:
    - a group this rank is not in (dist.new_group's answer there; the message told the user to call
      new_group);
    - `model=` a DDP module with process_group= (whole gradients summed as shards: the norm
      sqrt(world) too large, every step clipped that much harder);
    - the functional API with process_group= and another number of tensors on one rank (none:
      that rank returned alone and the others hung; fewer: gloo aborted a rank)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    def error_of(fn):
        try:
            fn()
            return None
        except ValueError as e:
            return str(e)

    out = {}
    pg = dist.new_group([0])  # every rank calls new_group; rank 1 gets NON_GROUP_MEMBER
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    p.grad = torch.ones(3, dtype=torch.float64)
    out["non_member"] = error_of(lambda: gradguard.GradGuard(torch.optim.SGD([p], lr=0.1), process_group=pg))
    torch.manual_seed(0)
    m = DDP(torch.nn.Linear(3, 2).double())
    out["ddp_pg"] = error_of(lambda: gradguard.GradGuard(torch.optim.SGD(m.parameters(), lr=0.1), model=m,
                                                          process_group=dist.group.WORLD))
    # A group of its own: counts are checked at the first call with each count on a group, and
    # the scenarios before this one called the functional API on WORLD with counts of their own.
    W = dist.new_group(list(range(world)))
    mine = [p] if rank == 0 else []
    out["clip_empty_rank"] = error_of(lambda: gradguard.clip_grad_norm_(mine, 1.0, process_group=W))
    two = [torch.ones(2, dtype=torch.float64)] * (2 if rank == 0 else 1)
    out["stats_fewer"] = error_of(lambda: gradguard.grad_stats(two, process_group=W))
    out["finite_fewer"] = error_of(lambda: gradguard.all_finite(two, process_group=W))
    out["clip_all_empty"] = float(gradguard.clip_grad_norm_([], 1.0, process_group=W))
    # The group still works, and the same counts on every rank still reduce as shards.
    out["stats_same"] = float(gradguard.grad_stats([torch.full((2,), 3.0, dtype=torch.float64)],
                                                   process_group=W).total_norm)
    # The count is checked at the first call with it, not at every call (a host read per step was
    # a sync on a GPU), and not under torch.compile (fullgraph failed on that read).
    from gradguard import distributed as gd
    checks = []
    real = gd.check_same_count
    gd.check_same_count = lambda *a: (checks.append(a), real(*a))
    try:
        for _ in range(3):
            gradguard.grad_stats([torch.full((2,), 3.0, dtype=torch.float64)], process_group=W)
        q = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
        q.grad = torch.full((3,), 1.0, dtype=torch.float64)
        def clip():
            return gradguard.clip_grad_norm_([q], 1e9, process_group=W)

        # torch 2.11's dynamo cannot compile a process_group= call at all (id() of a ProcessGroup
        # in the group-ranks cache, then an IndexError of its own on the plan): that torch (CI's
        # CUDA variant) runs it eagerly here.
        if tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 13):
            clip = torch.compile(clip, backend="eager", fullgraph=True)
        out["compiled_clip"] = float(clip())
    finally:
        gd.check_same_count = real
    out["count_checks_repeated"] = len(checks)
    # DDP inside a container is found too; DDP over a group of one (tensor-parallel ranks
    # beside it, data parallel of 1) does not share process_group's ranks: accepted.
    torch.manual_seed(0)
    out["ddp_wrapped"] = error_of(lambda: gradguard.GradGuard(
        torch.optim.SGD(m.parameters(), lr=0.1), model=torch.nn.Sequential(m), process_group=dist.group.WORLD))
    alone = [dist.new_group([r]) for r in range(world)]  # every rank makes every group
    single = DDP(torch.nn.Linear(3, 2).double(), process_group=alone[rank])
    out["ddp_group_of_one"] = error_of(lambda: gradguard.GradGuard(
        torch.optim.SGD(single.parameters(), lr=0.1), model=single, process_group=dist.group.WORLD))
    return out


def scenario_process_group_plain_grad_scaler(rank, world):
    """process_group= shards with a plain GradScaler, an Inf in rank 0's gradient at step 1: the
    guard keeps GradScaler's contract there, so its global statistics skip the step on both ranks
    (without the contract GradScaler skipped rank 0 alone, and rank 1 waited in the guard's
    collective)."""
    torch.manual_seed(rank)
    ps = [torch.nn.Parameter(torch.randn(4, dtype=torch.float32)) for _ in range(2)]
    opt = gradguard.GradGuard(torch.optim.SGD(ps, lr=0.1), max_norm=1e9, process_group=dist.group.WORLD)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    skipped = []
    for step in range(4):
        opt.zero_grad()
        scaler.scale(sum((p * p).sum() for p in ps)).backward()
        if step == 1 and rank == 0:
            ps[0].grad[0] = math.inf
        scaler.step(opt)
        scaler.update()
        skipped.append(bool(opt.last.skipped))
    return {"skipped": skipped, "steps": opt.summary()["steps"], "contract": opt._step_supports_amp_scaling}


def scenario_zero_missing_grad(rank, world):
    """ZeroRedundancyOptimizer inside the guard without DDP, a branch used on rank 0 only: its
    parameters have no gradient on rank 1, and the ranks' combined statistics must still have
    the same entries (gloo aborted: "Received data size doesn't match expected size")."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    torch.manual_seed(0)
    trunk, branch = torch.nn.Linear(4, 4).double(), torch.nn.Linear(4, 4).double()
    params = list(trunk.parameters()) + list(branch.parameters())
    guard = gradguard.GradGuard(ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.SGD, lr=0.1),
                                max_norm=1e9)
    h = trunk(torch.randn(2, 4, generator=torch.Generator().manual_seed(rank), dtype=torch.float64))
    if rank == 0:
        h = branch(h)
    h.square().mean().backward()
    local = [float(p.grad.norm()) if p.grad is not None else 0.0 for p in params]
    guard.step()
    return {"local_norms": local, "norms": guard.last.norms.tolist(), "total": float(guard.last.total_norm),
            "skipped": bool(guard.last.skipped), "params": [p.detach().clone() for p in params]}


def scenario_zero(rank, world, counter, with_ddp):
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    base = make_model()
    model = DDP(base) if with_ddp else base
    zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, lr=0.05)
    guard = gradguard.GradGuard(zero, max_norm=MAX_NORM, model=model)

    def average_grads():  # what DDP would have done
        for p in model.parameters():
            dist.all_reduce(p.grad)
            p.grad.div_(world)

    out = _train(rank, world, counter, model, guard, list(model.parameters()),
                 after_backward=None if with_ddp else average_grads)
    out["params"] = {clean(n): p.detach().clone() for n, p in model.named_parameters()}
    out["steps"] = _steps(zero.optim.state)
    return out


def scenario_tp(rank, world, counter):
    """Tensor parallel: Shard(0) and Shard(1) weights, a Shard(0) and a Replicate() bias; every
    rank sees the whole batch."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (world,))
    model = parallelize_module(make_model(), mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    guard = gradguard.GradGuard(torch.optim.AdamW(model.parameters(), lr=0.05), max_norm=MAX_NORM, model=model)
    out = _train(rank, world, counter, model, guard, list(model.parameters()), shard_data=False)
    out["placements"] = [str(p.grad.placements) for p in model.parameters()]
    out["params"] = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    out["steps"] = _steps(guard.state)
    out["direct"] = direct_api(model, True)
    partial = DTensor.from_local(torch.ones(3, dtype=torch.float64), mesh, [Partial()])
    out["partial_stats"] = float(gradguard.grad_stats([partial]).total_norm)  # reduced: sum of 2 ones, 3 times
    return out


class _SPBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(8)
        self.up = torch.nn.Linear(8, 16)
        self.down = torch.nn.Linear(16, 8)

    def forward(self, x):
        return self.down(torch.tanh(self.up(self.norm(x))))


def scenario_tp_sequence_parallel(rank, world, counter):
    """Tensor parallel with SequenceParallel on the norm (the usual recipe): the norm's gradients
    come out Partial (pending sums), which the guard and the functional API refused. Now reduced
    (as the optimizer's first op would reduce them) and judged: a guarded AdamW equals the same
    model trained in one process (reference_sequence_parallel), with a NaN step skipped. (An
    unguarded twin left to torch's own handling of the Partial gradients is returned too: on
    torch 2.11 it drifted 6e-3 from that reference, on 2.13 it agrees.)"""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel, SequenceParallel,
                                                   parallelize_module)

    mesh = init_device_mesh("cpu", (world,))
    plan = {"norm": SequenceParallel(), "up": ColwiseParallel(input_layouts=Shard(1)),
            "down": RowwiseParallel(output_layouts=Shard(1))}
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(parallelize_module(_SPBlock().double(), mesh, plan))
    guarded, twin = models
    guard = gradguard.GradGuard(torch.optim.AdamW(guarded.parameters(), lr=0.05), max_norm=0.5, model=guarded)
    plain = torch.optim.AdamW(twin.parameters(), lr=0.05)
    out = {"placements": None, "skipped": [], "totals": []}
    for step in range(3):
        x = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(step), dtype=torch.float64)
        for m in models:
            y = m(x.chunk(world, dim=1)[rank])
            (y.to_local() if isinstance(y, DTensor) else y).square().sum().backward()
        if step == 1 and rank == 0:  # a NaN in one rank's partial sum: the sum is NaN everywhere
            guarded.norm.weight.grad.to_local()[0] = math.nan
        if step == 0:
            out["placements"] = {n: str(q.grad.placements) for n, q in guarded.named_parameters()}
            grads = [q.grad for q in guarded.parameters()]
            out["functional"] = (float(gradguard.grad_stats(grads).total_norm),
                                 float(torch.nn.utils.get_total_norm([q.grad for q in twin.parameters()]).full_tensor()))
        # The guard's own collectives: its statistics gather (counted by the counter) and one
        # DTensor reduction per Partial gradient (functional collectives: counted at the call).
        reduce_partial, reductions = gradguard.distributed.reduce_partial, []

        def counted(t):
            reductions.append(t)
            return reduce_partial(t)

        gradguard.distributed.reduce_partial = counted
        try:
            gathers = counter.guarded_step(guard)
        finally:
            gradguard.distributed.reduce_partial = reduce_partial
        out.setdefault("collectives", []).append((gathers, len(reductions)))
        out["skipped"].append(bool(guard.last.skipped))
        out["totals"].append(float(guard.last.total_norm))
        if step != 1:
            torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.5)
            plain.step()
        guard.zero_grad()
        plain.zero_grad()
    out["params"] = {n: q.full_tensor().detach().clone() for n, q in guarded.named_parameters()}
    out["twin"] = {n: q.full_tensor().detach().clone() for n, q in twin.named_parameters()}
    # The functional clip on Partial gradients: as torch's, and the reduced gradient is kept.
    for m in models:
        y = m(torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(9), dtype=torch.float64).chunk(world, 1)[rank])
        (y.to_local() if isinstance(y, DTensor) else y).square().sum().backward()
    out["clip_norm"] = float(gradguard.clip_grad_norm_(guarded.parameters(), 0.5))
    out["clip_grads"] = {n: q.grad.full_tensor().clone() for n, q in guarded.named_parameters()}
    out["clip_placements"] = [str(q.grad.placements) for q in guarded.norm.parameters()]
    return out


def reference_sequence_parallel() -> dict:
    """scenario_tp_sequence_parallel's run in one process without tensor parallelism (the full
    batch, the same initial weights): parameters after the three steps (the NaN step skipped),
    then torch's clip of the fourth batch's gradients."""
    torch.manual_seed(0)
    model = _SPBlock().double()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    for step in range(3):
        model(torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(step), dtype=torch.float64)).square().sum().backward()
        if step != 1:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()
        opt.zero_grad()
    out = {"params": {n: q.detach().clone() for n, q in model.named_parameters()}}
    model(torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(9), dtype=torch.float64)).square().sum().backward()
    out["clip_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5))
    out["clip_grads"] = {n: q.grad.clone() for n, q in model.named_parameters()}
    return out


def scenario_fsdp2_tp_2d(rank, world, counter, tp_first=False):
    """FSDP2 over mesh dimension "dp" beside tensor parallel over "tp" on one 2-D mesh: every
    parameter a 2-D DTensor. On a (world x 1) mesh: Shard on dp, Shard(0)/Shard(1)/Replicate on
    tp. On a (1 x world) mesh (`tp_first`), FSDP2 shards the dimension ColwiseParallel already
    shards, and the placement is (_StridedShard(0, sf=world), Shard(0)), as on any real
    dp x tp mesh."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (1, world) if tp_first else (world, 1), mesh_dim_names=("dp", "tp"))
    model = parallelize_module(make_model(), mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    fully_shard(model, mesh=mesh["dp"])
    guard = gradguard.GradGuard(torch.optim.AdamW(model.parameters(), lr=0.05), max_norm=MAX_NORM, model=model)
    out = _train(rank, world, counter, model, guard, list(model.parameters()), shard_data=not tp_first)
    out["placements"] = [str(p.grad.placements) for p in model.parameters()]
    out["params"] = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    out["steps"] = _steps(guard.state)
    return out


def scenario_module_caches(rank, world):
    """gradguard.distributed's caches, keyed by id(), across many process groups: bounded (a sweep
    making a group per run kept every one alive), and an entry whose group is not the one asked
    about (a freed group's id reused) is rebuilt, not returned."""
    from gradguard import distributed as gd

    grad = torch.full((3,), float(rank + 1), dtype=torch.float64)
    true = math.sqrt(sum(3 * (r + 1) ** 2 for r in range(world)))
    totals = []
    for _ in range(gd._CACHE_LIMIT + 6):
        g = dist.new_group(list(range(world)))
        totals.append(float(gradguard.grad_stats([grad], process_group=g).total_norm))
    sizes = {name: len(getattr(gd, name)) for name in ("_ranks_cache", "_counts_checked", "_mask_cache")}
    # A stale mask entry under this group's key, as if a freed group's id had been reused: the
    # masks of a group of other ranks would mis-sum the statistics.
    (key, hit), = [(k, v) for k, v in gd._mask_cache.items() if k[0] == id(g)]
    gd._mask_cache[key] = (object(), ~hit[1], hit[2])
    stale_total = float(gradguard.grad_stats([grad], process_group=g).total_norm)
    return {"true": true, "totals": totals, "sizes": sizes, "limit": gd._CACHE_LIMIT, "stale_total": stale_total}


def scenario_ddp_lbfgs_rank_local_loss(rank, world):
    """DDP + LBFGS, the closure's loss non-finite on rank 1 only (a non-differentiable term: the
    all-reduced gradients stay finite), at evaluation 1 or 2. The guard's loss check was
    rank-local: rank 1 rolled back and returned while rank 0 went on into the next evaluation's
    DDP forward, and waited there for ever."""
    out = {}
    for which in (1, 2):
        torch.manual_seed(0)
        m = torch.nn.Linear(3, 1).double()
        ddp = torch.nn.parallel.DistributedDataParallel(m)
        guard = gradguard.GradGuard(torch.optim.LBFGS(m.parameters(), lr=0.5, max_iter=3), model=ddp)
        g = torch.Generator().manual_seed(10 + rank)
        x, y = torch.randn(8, 3, generator=g, dtype=torch.float64), torch.randn(8, 1, generator=g, dtype=torch.float64)
        before = [p.detach().clone() for p in m.parameters()]
        calls = [0]

        def closure(ddp=ddp, x=x, y=y, calls=calls, which=which):
            guard.zero_grad()
            calls[0] += 1
            loss = torch.nn.functional.mse_loss(ddp(x), y)
            loss.backward()
            return loss + (math.inf if rank == 1 and calls[0] == which else 0.0)

        # The agreement's cost: one all_reduce of a flag per evaluation (DDP's own reductions run
        # in its C++ reducer, not through torch.distributed.all_reduce).
        reduces, all_reduce = [0], dist.all_reduce

        def counted(*a, **k):
            reduces[0] += 1
            return all_reduce(*a, **k)

        dist.all_reduce = counted
        try:
            guard.step(closure)
        finally:
            dist.all_reduce = all_reduce
        out[which] = {"calls": calls[0], "all_reduces": reduces[0], "skipped": guard.summary()["skipped"],
                      "unchanged": all(torch.equal(p.detach(), b) for p, b in zip(m.parameters(), before))}
    return out


def scenario_lbfgs_rank_local_loss(rank, world, kind, bad_rank=1):
    """LBFGS with the closure's loss non-finite on `bad_rank` only (a non-differentiable term: the
    gradients stay finite), at evaluation 1 or 2, under FSDP2 (kind "fsdp2"), tensor parallel
    ("tp") or FSDP1 HYBRID_SHARD ("hybrid", 2 replicas x 2 shards). The agreement on the loss
    check covered DDP, FSDP1's shard group and process_group= only: with DTensor parameters the
    bad rank rolled back alone while the others went on into the next evaluation's collectives
    (gloo: "Connection closed by peer", or later a collective mismatch), and under HYBRID_SHARD
    only the bad rank's replica rolled back."""
    from torch.distributed.device_mesh import init_device_mesh

    out = {}
    for which in (1, 2):
        # Every dimension even: LBFGS flattens the gradients, which DTensor refuses for an uneven shard.
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(IN_F, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, 4)).double()
        rows = ROWS // world
        x, y = batch(0)[0], torch.randn(ROWS, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        if kind == "fsdp2":
            from torch.distributed.fsdp import fully_shard

            fully_shard(m, mesh=init_device_mesh("cpu", (world,)))
            x, y = x[rank * rows:(rank + 1) * rows], y[rank * rows:(rank + 1) * rows]
        elif kind == "tp":
            from torch.distributed.tensor import Replicate
            from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

            # Column-wise both (Shard(0) weights): torch 2.11's DTensor refuses LBFGS's flattening
            # view of a Shard(1) weight (RowwiseParallel's).
            col = ColwiseParallel(output_layouts=Replicate())
            m = parallelize_module(m, init_device_mesh("cpu", (world,)), {"0": col, "2": col})
        else:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, ShardingStrategy

            mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
            m = FSDP(m, device_mesh=mesh, sharding_strategy=ShardingStrategy.HYBRID_SHARD,
                     device_id=torch.device("cpu"), use_orig_params=True)
            x, y = x[rank * rows:(rank + 1) * rows], y[rank * rows:(rank + 1) * rows]
        guard = gradguard.GradGuard(torch.optim.LBFGS(m.parameters(), lr=0.5, max_iter=3), model=m)
        before = [local_of(p).detach().clone() for p in m.parameters()]
        calls = [0]

        def closure(m=m, x=x, y=y, calls=calls, which=which):
            guard.zero_grad()
            calls[0] += 1
            loss = loss_of(m, x, y)
            loss.backward()
            return loss.detach() + (math.inf if rank == bad_rank and calls[0] == which else 0.0)

        guard.step(closure)
        out[which] = {"calls": calls[0], "skipped": guard.summary()["skipped"],
                      "unchanged": all(torch.equal(local_of(p).detach(), b) for p, b in zip(m.parameters(), before))}
    return out


def scenario_dtensor_missing_grad(rank, world):
    """DTensor parameters, two of which get a gradient on rank 0 only (an expert, an auxiliary
    head: unused on rank 1): C, Shard(0), and B, a plain tensor. Rank 1 packed fewer entries
    than rank 0 and gloo aborted the gather; and C's stand-in must be reduced as C is, so that a
    NaN in rank 0's shard of C makes rank 1 skip too."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    a = torch.nn.Parameter(distribute_tensor(torch.randn(4, 3, dtype=torch.float64), mesh, [Shard(0)]))
    c = torch.nn.Parameter(distribute_tensor(torch.randn(4, 2, dtype=torch.float64), mesh, [Shard(0)]))
    b = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    # Frozen: a gradient on no rank, so no stand-in (one per frozen parameter cost every step).
    f = torch.nn.Parameter(distribute_tensor(torch.randn(4, dtype=torch.float64), mesh, [Shard(0)]),
                           requires_grad=False)
    guard = gradguard.GradGuard(torch.optim.SGD([a, b, c, f], lr=0.1), max_norm=1e9, names=["a", "b", "c", "f"])
    out = {}
    for step, nan in enumerate((False, True)):
        guard.zero_grad()
        loss = a.to_local().square().sum()
        if rank == 0:
            loss = loss + c.to_local().square().sum() + b.sum()
        loss.backward()
        if nan and rank == 0:
            c.grad.to_local()[0, 0] = math.nan
        before = [t.detach().to_local().clone() if hasattr(t, "to_local") else t.detach().clone() for t in (a, b, c)]
        guard.step()
        rep = guard.last.as_dict(layers=True)
        out[step] = {"skipped": bool(guard.last.skipped), "a": rep["layers"]["a"]["norm"], "layers": sorted(rep["layers"]),
                     "c": rep["layers"]["c"]["norm"], "c_nan": rep["layers"]["c"]["nan"],
                     "unchanged": all(torch.equal(t.detach().to_local() if hasattr(t, "to_local") else t.detach(), s)
                                      for t, s in zip((a, b, c), before))}
    guard.zero_grad()
    loss = a.to_local().square().sum() + (c.to_local().square().sum() + b.sum() if rank == 0 else 0)
    loss.backward()
    out["clip_total"] = float(gradguard.clip_grad_norm_([a, c], 1e9))
    out["clip_with_plain"] = float(gradguard.clip_grad_norm_([a, b, c], 1e9))
    return out


def run_all(rank, world) -> dict:
    counter = CollectiveCounter()
    results = {
        "ddp": scenario_ddp(rank, world, counter),
        "fsdp2": scenario_fsdp2(rank, world, counter),
        "fsdp2_dcp_resume": scenario_fsdp2_dcp_resume(rank, world, counter),
        "fsdp2_hygiene": scenario_fsdp2_hygiene(rank, world),
        "fsdp1_flat": scenario_fsdp1(rank, world, counter, use_orig_params=False),
        "fsdp1_orig": scenario_fsdp1(rank, world, counter, use_orig_params=True),
        "fsdp1_no_shard": scenario_fsdp1_unsharded_units(rank, world, counter, everywhere=True),
        "fsdp1_no_shard_unit": scenario_fsdp1_unsharded_units(rank, world, counter, everywhere=False),
        "pg_missing_grad": scenario_process_group_missing_grad(rank, world),
        "fsdp1_sharded_scaler": scenario_fsdp1_sharded_grad_scaler(rank, world),
        "pg_uneven_params": scenario_process_group_uneven_params(rank, world),
        "pg_assigned_later": scenario_process_group_assigned_later(rank, world),
        "pg_plain_scaler": scenario_process_group_plain_grad_scaler(rank, world),
        "misuse": scenario_misuse_refused_on_every_rank(rank, world),
        "zero_ddp": scenario_zero(rank, world, counter, with_ddp=True),
        "zero_plain": scenario_zero(rank, world, counter, with_ddp=False),
        "zero_missing_grad": scenario_zero_missing_grad(rank, world),
        "tp": scenario_tp(rank, world, counter),
        "tp_sequence_parallel": scenario_tp_sequence_parallel(rank, world, counter),
        "fsdp2_tp_2d": scenario_fsdp2_tp_2d(rank, world, counter),
        "fsdp2_tp_2d_strided": scenario_fsdp2_tp_2d(rank, world, counter, tp_first=True),
        "module_caches": scenario_module_caches(rank, world),
        "ddp_lbfgs_loss": scenario_ddp_lbfgs_rank_local_loss(rank, world),
        "fsdp2_lbfgs_loss": scenario_lbfgs_rank_local_loss(rank, world, "fsdp2"),
        "tp_lbfgs_loss": scenario_lbfgs_rank_local_loss(rank, world, "tp"),
        "dtensor_missing_grad": scenario_dtensor_missing_grad(rank, world),
    }
    return results


def scenario_fsdp1_hybrid_process_group(rank, world):
    """FSDP1 with HYBRID_SHARD on a 2 x 2 mesh (2 replicas of 2 shards; 4 ranks): process_group=
    the whole world summed each shard once per replica, the norm sqrt(2) too large, silently."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, ShardingStrategy

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    model = FSDP(make_model(), device_mesh=mesh, sharding_strategy=ShardingStrategy.HYBRID_SHARD,
                 device_id=torch.device("cpu"), use_orig_params=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = {}
    try:
        gradguard.GradGuard(opt, max_norm=MAX_NORM, model=model, process_group=dist.group.WORLD)
    except ValueError as e:
        out["refusal"] = str(e)
    # Its own shard group is right, and so is model= alone (the guard finds that group).
    gradguard.GradGuard(opt, max_norm=MAX_NORM, model=model, process_group=mesh.get_group("shard"))
    guard = gradguard.GradGuard(opt, max_norm=MAX_NORM, model=model)
    x, y = batch(0)
    rows = ROWS // world
    loss_of(model, x[rank * rows:(rank + 1) * rows], y[rank * rows:(rank + 1) * rows]).backward()
    guard.step()
    out["total_norm"] = float(guard.last.total_norm)
    out["lbfgs_loss"] = scenario_lbfgs_rank_local_loss(rank, world, "hybrid", bad_rank=2)
    return out


def reference_first_norm() -> float:
    """The total norm of the first step's full-batch gradient, single process."""
    model = make_model()
    x, y = batch(0)
    loss_of(model, x, y).backward()
    return float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]))


def scenario_unfrozen_fused_process_group(rank, world):
    """Gradual unfreezing under process_group=, the skip decided on the device (emulated on the
    CPU by the class flag): every parameter is present there (an empty gradient where a rank has
    none), so a frozen one unfrozen later was never looked at again, and the skipped step made
    its Adam state."""
    gradguard.GradGuard._decide_on_host_on_cpu = False
    a = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    b = torch.nn.Parameter(torch.ones(4, dtype=torch.float64), requires_grad=False)
    opt = gradguard.GradGuard(torch.optim.AdamW([a, b], lr=0.1, fused=True), hygiene=False,
                              process_group=dist.group.WORLD)
    for _ in range(2):
        a.grad = torch.ones(4, dtype=torch.float64)
        opt.step()
    b.requires_grad_(True)
    a.grad = torch.ones(4, dtype=torch.float64)
    b.grad = torch.full((4,), math.nan if rank == 0 else 1.0, dtype=torch.float64)
    opt.step()
    out = {"skipped": bool(opt.last.skipped), "b_state": sorted(opt.optimizer.state.get(b, {}))}
    b.grad = torch.ones(4, dtype=torch.float64)
    opt.step()
    out["b_state_after"] = sorted(opt.optimizer.state.get(b, {}))
    return out
