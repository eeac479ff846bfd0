"""Global gradient statistics across ranks: DTensor (FSDP2, tensor parallel), FSDP1 flat shards,
any hand-rolled sharding (``process_group=``), and the collective skip decision of ZeRO.

Each gradient entry is reduced in one of three ways:

- ``local``: nothing to reduce (a plain tensor, a ``Replicate`` DTensor, a DDP gradient);
  a ``Partial`` DTensor (tensor parallel with sequence parallelism leaves the norm layers'
  gradients so) is first reduced to ``Replicate`` (DTensor's all-reduce, as the optimizer's
  first op on it would do), and the caller may keep the reduced gradient;
- ``sum`` over the ranks that hold the other shards of the same tensor (the ``Shard`` mesh
  dimensions of a DTensor, the ranks of ``process_group``): p-sums and NaN/Inf counts add up,
  amax takes the max. ``Replicate`` mesh dimensions are not reduced (no double counting);
- ``max`` over a group whose ranks hold full but possibly different gradients (an inner
  ``ZeroRedundancyOptimizer``): every statistic takes the max, so that a NaN on one rank makes
  every rank skip (ZeRO's step broadcasts; a rank that skips alone pairs the broadcasts wrongly).

The collective: ONE ``all_gather_single`` (older torch: ``all_gather_into_tensor``) of a small
float64 tensor per rank (per gradient: p-sum, NaN count, Inf count, amax), followed by a local
masked sum/max. Why a gather and not an
``all_reduce``: the statistics need SUM (p-sums, counts) and MAX (amax, the inf-norm, ZeRO's
flag), which one ``all_reduce`` cannot do; and a model that mixes placements (FSDP2 + tensor
parallel on a 2-D mesh) needs each entry reduced over a different subgroup. Gathering once over a
group that covers every subgroup and combining locally does all of it in one call, without a host
sync (with NCCL the gather is queued on the device like any collective). The price is
world_size x 4 x n float64 values received per rank (n = number of gradients): 3 MB for 100 ranks
and 1000 gradients, small next to the gradients themselves, but it grows with the group size.
Counts travel as float64, exact up to 2**53 elements.
"""
from __future__ import annotations

import math
import sys
import weakref
from typing import NamedTuple, Sequence

import torch

LOCAL, SUM, MAX = "local", "sum", "max"


try:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed: nothing here is ever sharded
    dist = None
    DTensor = ()


def is_dtensor(t) -> bool:
    return isinstance(t, DTensor)


def check_process_group(group, where: str) -> None:
    """Refuses a `process_group=` that is not a ProcessGroup where it is given, not at the first
    collective (there an int or a name failed as a bare KeyError from torch)."""
    if group is None or (dist is not None and isinstance(group, dist.ProcessGroup)):
        return
    non_member = getattr(getattr(dist, "GroupMember", None), "NON_GROUP_MEMBER", None)
    if type(group) is type(non_member) and group == non_member:  # an int (-100), not a tensor or a bool
        # What dist.new_group(ranks) returns on a rank outside `ranks`: the message below told
        # the user to call new_group, which they had just done.
        raise ValueError(f"{where}: this rank (rank {dist.get_rank()}) is not a member of `process_group`: "
                         "dist.new_group(ranks) returns GroupMember.NON_GROUP_MEMBER on the ranks outside `ranks`. "
                         "Every rank that steps must belong to the group it reduces over: pass a group that "
                         "contains this rank")
    raise TypeError(f"{where}: `process_group` must be None or a torch.distributed.ProcessGroup (e.g. "
                    f"dist.new_group(ranks) or dist.group.WORLD), got {type(group).__name__} {group!r}")


def _local(t: torch.Tensor) -> torch.Tensor:
    # The local shard itself (the clip scales it in place); _local_tensor skips to_local()'s
    # autograd Function, which costs more than the statistics of a small tensor.
    local = getattr(t, "_local_tensor", None)
    return (local if local is not None else t.to_local()).detach()


class Plan(NamedTuple):
    """How to make the local statistics of each entry global: the group gathered over (None:
    nothing to reduce), and per entry its kind and the ranks (global) it is reduced over."""

    group: object
    entries: tuple


_NOTHING = Plan(None, ())


# The module's caches are keyed by id() with the object kept beside it (an id is reused once its
# object is freed) and emptied past _CACHE_LIMIT entries: a sweep that makes new groups or meshes
# per run must not keep every one alive.
_CACHE_LIMIT = 64
_ranks_cache: dict = {}


def _group_ranks(group) -> tuple[int, ...]:
    group = group if group is not None else dist.group.WORLD
    hit = _ranks_cache.get(id(group))
    if hit is None or hit[0] is not group:
        hit = (group, tuple(dist.get_process_group_ranks(group)))
        if len(_ranks_cache) >= _CACHE_LIMIT:
            _ranks_cache.clear()
        _ranks_cache[id(group)] = hit
    return hit[1]


def _all_gather(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    # all_gather_single where torch has it (2.13's all_gather_into_tensor warns that it is
    # deprecated); older torch has only all_gather_into_tensor.
    (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(out, inp, group=group)


def _count_device(group) -> torch.device:
    # One rule on every rank, whatever tensors it holds (a rank with none, CPU tensors beside a
    # CUDA group): a NCCL group (or a default one, "cpu:gloo,cuda:nccl") gathers on the current GPU.
    backend = str(dist.get_backend(group)).lower()
    if ("nccl" in backend or backend == "undefined") and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_same_count(n: int, group, where: str) -> None:
    """Refuses ranks of `group` that hold different numbers of parameters: the statistics are
    gathered by position, so a rank with fewer entries made gloo abort on another rank and the
    rest read rows never sent; a rank with none returned before any collective and the others
    hung. One small gather and one host read; every rank of the group must call it."""
    world = len(_group_ranks(group))
    mine = torch.tensor([n], dtype=torch.int64, device=_count_device(group))
    every = mine.new_empty(world)
    _all_gather(every, mine, group=group)
    counts = every.tolist()
    if len(set(counts)) > 1:
        raise ValueError(f"{where}: with process_group= every rank must hold the same parameters, in the same order "
                         f"(a shard of each; an empty gradient where it has none), but the ranks of the group hold "
                         f"{counts} parameters")


_counts_checked: dict = {}


def check_same_count_once(n: int, group, where: str) -> None:
    """check_same_count at the first call with each count on this group, not after (the
    functional API's process_group=: a host read on every call was a sync per step on a GPU, and
    broke torch.compile(fullgraph=True)). A rank whose count changes later, alone, is not caught
    (its check would meet the others' statistics gather). Not under torch.compile, which would
    trace the read."""
    if torch.compiler.is_compiling():
        return
    key = (id(group), n)
    if _counts_checked.get(key) is group:
        return
    check_same_count(n, group, where)
    if len(_counts_checked) >= _CACHE_LIMIT:
        _counts_checked.clear()
    _counts_checked[key] = group


def is_checkpoint_init_step(param_groups) -> bool:
    """Whether this step() is torch.distributed.checkpoint's ``_init_optim_state``: a fresh
    optimizer stepped once on zero gradients with every lr set to 0, to create its state before
    a get/set_state_dict. Looked for only then (every lr 0, before any state exists): a walk of a
    few frames."""
    for group in param_groups:
        lr = group.get("lr", 0.0)
        if isinstance(lr, torch.Tensor):
            if lr.numel() != 1 or lr.device.type != "cpu" or float(lr) != 0.0:
                return False
        elif lr != 0:
            return False
    frame = sys._getframe(1)
    for _ in range(8):
        if frame is None:
            return False
        if (frame.f_code.co_name == "_init_optim_state"
                and frame.f_globals.get("__name__", "").startswith("torch.distributed.checkpoint")):
            return True
        frame = frame.f_back
    return False


_mesh_cache: dict = {}


_PARTIAL = object()  # _dtensor_ranks' answer for a DTensor to reduce first


def _dtensor_ranks(t, where: str) -> tuple[tuple[int, ...] | None, list]:
    """The global ranks holding the other shards of DTensor `t` (None if it is replicated on
    every mesh dimension) and the mesh-dimension groups that cover them; (_PARTIAL, None) for
    a DTensor with a Partial placement (pending sums: reduce it first, see reduce_partial)."""
    mesh, placements = t.device_mesh, tuple(t.placements)
    key = (id(mesh), placements)
    hit = _mesh_cache.get(key)
    if hit is not None and hit[0] is mesh:
        return hit[1], hit[2]
    shard_dims = []
    partial = False
    for d, pl in enumerate(placements):
        # _StridedShard (FSDP2 over a dimension tensor parallel already shards: a 2-D mesh) holds
        # its elements in another order, but on this mesh dimension it is a shard all the same,
        # and torch 2.13's is_shard() says False for it.
        if pl.is_shard() or type(pl).__name__ == "_StridedShard":
            shard_dims.append(d)
        elif pl.is_partial():
            partial = True
        elif not pl.is_replicate():
            raise ValueError(f"{where} is a DTensor with placement {pl} on mesh dimension {d}, which gradguard does "
                             "not know how to make global; redistribute it to Shard or Replicate placements "
                             "(e.g. grad.redistribute(placements=[Replicate()]))")
    ranks = None
    groups = []
    if partial:
        ranks, groups = _PARTIAL, None
    elif shard_dims:
        coord = mesh.get_coordinate()
        if coord is None:
            raise ValueError(f"{where} is a DTensor on a mesh this rank is not part of")
        ranks = shard_ranks(mesh.mesh, coord, shard_dims)
        groups = [mesh.get_group(d) for d in shard_dims]
    if len(_mesh_cache) >= _CACHE_LIMIT:
        _mesh_cache.clear()
    _mesh_cache[key] = (mesh, ranks, groups)
    return ranks, groups


def reduce_partial(t):
    """DTensor `t` with its Partial placements reduced to Replicate (DTensor's all-reduce on
    those mesh dimensions; Shard and Replicate dimensions kept). Its statistics are then global
    by the usual rules, and the optimizer, handed it, reduces nothing again."""
    from torch.distributed.tensor import Replicate

    return t.redistribute(t.device_mesh, [Replicate() if pl.is_partial() else pl for pl in t.placements])


def shard_ranks(mesh_ranks: torch.Tensor, coord: Sequence[int], shard_dims: Sequence[int]) -> tuple[int, ...]:
    """The global ranks of `mesh_ranks` (a device mesh's rank array) that share this rank's
    coordinate on every dimension not in `shard_dims`: the holders of the other shards."""
    index = tuple(slice(None) if d in shard_dims else c for d, c in enumerate(coord))
    return tuple(int(r) for r in mesh_ranks[index].flatten().tolist())


def localize(tensors: list, *, groups: Sequence | None = None, decide_group=None, names: Sequence[str] | None = None,
             reduced: dict | None = None):
    """Splits `tensors` into their local parts and the Plan that makes their statistics global.

    `groups[i]` (optional) is the process group plain tensor i is sharded over (None: not
    sharded); DTensors carry their own. `decide_group`: entries that are otherwise local are
    max-reduced over it (ZeRO). A Partial DTensor is reduced first (reduce_partial), and the
    reduced DTensor put in `reduced[i]` when a dict is given: the local part returned is the
    reduced one's, so a caller that scales it must keep the reduced DTensor as the gradient.
    Returns (local tensors, Plan)."""
    if groups is None and decide_group is None and not any(isinstance(t, DTensor) for t in tensors):
        return list(tensors), _NOTHING  # the single-process case, without the per-tensor walk below
    local, entries, candidates = [], [], []
    needed = set()
    for i, t in enumerate(tensors):
        kind, ranks = LOCAL, None
        if is_dtensor(t):
            where = f"the gradient of {names[i]!r}" if names is not None else f"tensors[{i}]"
            ranks, mesh_groups = _dtensor_ranks(t, where)
            if ranks is _PARTIAL:
                t = reduce_partial(t)
                if reduced is not None:
                    reduced[i] = t
                ranks, mesh_groups = _dtensor_ranks(t, where)
            candidates += mesh_groups
            t = _local(t)
            if ranks is not None and len(ranks) > 1:
                kind = SUM
        elif groups is not None and groups[i] is not None:
            candidates.append(groups[i])
            ranks = _group_ranks(groups[i])
            kind = SUM if len(ranks) > 1 else LOCAL
        if kind == LOCAL and decide_group is not None:
            ranks = _group_ranks(decide_group)
            kind = MAX if len(ranks) > 1 else LOCAL
        if kind != LOCAL:
            needed.update(ranks)
        local.append(t)
        entries.append((kind, ranks if kind != LOCAL else None))
    if not needed:
        return local, _NOTHING
    if decide_group is not None:
        candidates.append(decide_group)
    return local, Plan(_covering_group(needed, candidates), tuple(entries))


def _covering_group(needed: set, candidates: list):
    """The smallest known group whose ranks include every rank some entry is reduced over."""
    best, best_size = None, None
    unique = {id(g): g for g in candidates + [dist.group.WORLD]}
    for g in unique.values():
        ranks = set(_group_ranks(g))
        if needed <= ranks and (best_size is None or len(ranks) < best_size):
            best, best_size = g, len(ranks)
    if best is None:
        raise ValueError(f"gradguard: the gradients are sharded over ranks {sorted(needed)}, which no single "
                         "process group covers; pass process_group= a group that spans them")
    return best


_mask_cache: dict = {}


def _masks(plan: Plan, device):
    """[W, n] bool (rank w's values enter entry j) and [n] bool (entry j is max-reduced), cached:
    built on the host and copied to the device once per layout."""
    key = (id(plan.group), plan.entries, device)
    hit = _mask_cache.get(key)
    if hit is not None and hit[0] is plan.group:
        return hit[1], hit[2]
    ranks = _group_ranks(plan.group)
    me = dist.get_rank()
    pos = {r: w for w, r in enumerate(ranks)}
    contrib = torch.zeros(len(ranks), len(plan.entries), dtype=torch.bool)
    is_max = torch.zeros(len(plan.entries), dtype=torch.bool)
    for j, (kind, entry_ranks) in enumerate(plan.entries):
        for r in (entry_ranks if kind != LOCAL else (me,)):
            contrib[pos[r], j] = True
        is_max[j] = kind == MAX
    hit = (plan.group, contrib.to(device), is_max.to(device))
    if len(_mask_cache) >= _CACHE_LIMIT:
        _mask_cache.clear()
    _mask_cache[key] = hit
    return hit[1], hit[2]


def combine(gathered: torch.Tensor, contrib: torch.Tensor, is_max: torch.Tensor, p: float):
    """The combine math, in one place: `gathered` [W, 4, n] float64 holds every rank's
    (acc, nan_count, inf_count, amax); returns the global (acc, nan, inf, amax).

    acc is normalized by the rank's amax (the multi_tensor_stats contract: the sum of
    (|x| / amax)^p over the finite elements, 1 or 0 for p = inf), so each rank's acc is rescaled
    to the global amax M by (amax_r / M)^p, a factor <= 1 that cannot overflow, then the shards
    add (stats.merge_shard_stats does the same for unmasked shards). Max-reduced entries (ZeRO:
    full but different gradients on each rank) take the largest rescaled acc, i.e. the largest
    rank's norm, and the largest counts, so a NaN on one rank is a NaN on all."""
    m = contrib.unsqueeze(1)  # [W, 1, n]
    masked = torch.where(m, gathered, gathered.new_zeros(()))  # every statistic is >= 0
    acc, nan, inf, amax = masked.unbind(1)  # each [W, n]
    top = amax.amax(0)  # [n]
    if math.isinf(p):
        scaled = (amax > 0).to(acc.dtype)
    else:
        w = amax / torch.where(top > 0, top, 1.0)
        scaled = acc * (w if p == 1.0 else w.pow(p))
    use_max = is_max  # [n]
    acc_g = torch.where(use_max, scaled.amax(0), scaled.sum(0))
    if math.isinf(p):
        acc_g = (top > 0).to(acc.dtype)
    nan_g = torch.where(use_max, nan.amax(0), nan.sum(0))
    inf_g = torch.where(use_max, inf.amax(0), inf.sum(0))
    return acc_g, nan_g, inf_g, top


def reduce_raw(raw, plan: Plan, p: float):
    """The local raw statistics (a ``stats._Raw``) made global by one collective, or `raw` itself
    when the plan needs no reduction. Every rank of ``plan.group`` must call it."""
    if plan.group is None:
        return raw
    packed = torch.stack([raw.acc.double(), raw.nan_count.double(), raw.inf_count.double(), raw.amax.double()])
    world = len(_group_ranks(plan.group))
    # Rank-major along dim 0 ([W * 4, n]), the shape every backend accepts (gloo refuses [W, 4, n]).
    gathered = packed.new_empty((world * packed.shape[0], packed.shape[1]))
    _all_gather(gathered, packed.contiguous(), group=plan.group)
    gathered = gathered.view(world, *packed.shape)
    contrib, is_max = _masks(plan, packed.device)
    acc, nan, inf, amax = combine(gathered, contrib, is_max, p)
    return raw._replace(acc=acc, nan_count=nan.to(torch.int64), inf_count=inf.to(torch.int64), amax=amax)


# ---- what a module or optimizer tells about its sharding ------------------------------------------

def is_fsdp1_sharded(p, whole: frozenset = frozenset()) -> bool:
    """True for FSDP1's flat parameters and the original parameters viewing into them
    (``use_orig_params=True``): each rank holds only a shard of their gradient. False for those
    whose id is in `whole` (see fsdp1_whole)."""
    if id(p) in whole:
        return False
    if getattr(p, "_fsdp_flattened", False):
        return True
    try:
        from torch.distributed.fsdp._flat_param import FlatParameter
    except ImportError:
        return False
    return isinstance(p, FlatParameter)


def fsdp1_group(model):
    """The process group an FSDP1 ``model`` shards over (None when `model` holds no FSDP1
    module, or shards nothing). Refuses nested FSDP1 modules sharding over different groups."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, ShardingStrategy
    except ImportError:
        return None
    modules = [m for m in FSDP.fsdp_modules(model) if m.sharding_strategy != ShardingStrategy.NO_SHARD]
    if not modules:
        return None
    found = {_group_ranks(m.process_group): m.process_group for m in modules}
    if len(found) > 1:
        raise ValueError(f"gradguard.GradGuard: the FSDP modules of `model` shard over different process groups "
                         f"(ranks {sorted(found)}); pass process_group= the group to sum the statistics over")
    return next(iter(found.values()))


def fsdp1_whole(model) -> frozenset:
    """ids of the parameters of the FSDP1 units in `model` that do not shard (``NO_SHARD``, or a
    world size of 1, which FSDP1 clamps to it): their FlatParameters and, with
    ``use_orig_params=True``, the original parameters viewing into them. Their gradients are
    whole on every rank (FSDP1 all-reduces them, as DDP does): summed over the group, as shards
    are, they would count once per rank. Read from each unit's handle, as FSDP1's own
    ``clip_grad_norm_`` tells sharded parameters from the rest."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    except ImportError:
        return frozenset()
    ids = set()
    for m in FSDP.fsdp_modules(model):
        handle = getattr(m, "_handle", None)
        if handle is None or handle.uses_sharded_strategy:
            continue
        flat = handle.flat_param
        ids.add(id(flat))
        ids.update(id(q) for q in (getattr(flat, "_params", None) or ()))
    return frozenset(ids)


_standins: dict = {}  # id(param) -> (weakref, layout, stand-in); cleared past _STANDIN_LIMIT
_STANDIN_LIMIT = 1 << 16


def empty_grad_of(p):
    """An empty stand-in for the missing gradient of DTensor `p`, on `p`'s mesh with `p`'s
    placements: other ranks may hold a gradient for `p` (an expert that got no tokens here), and
    their entry is reduced over the ranks `p`'s placements name, so this rank's must be too
    (``new_empty(0)`` gave a Replicate DTensor, reduced over nothing: their NaN went unseen here).
    Kept per parameter (``DTensor.from_local`` costs ~50 us), made anew when `p`'s layout changes.
    A Partial gradient on another rank is not covered: its reduction there waits for this rank."""
    key = id(p)
    hit = _standins.get(key)
    layout = (p.device_mesh, p.placements, p.shape, p.dtype, p.device)
    if hit is not None and hit[0]() is p and hit[1] == layout:
        return hit[2]
    local = torch.empty(0, dtype=p.dtype, device=p.to_local().device)
    made = DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
    if len(_standins) >= _STANDIN_LIMIT:
        _standins.clear()
    _standins[key] = (weakref.ref(p), layout, made)
    return made


def agreement_group(models, params):
    """The process group of every rank that steps `params` together, for a check whose inputs
    are rank-local (all_agree), or None for a single process: the ranks of the DTensor
    parameters' meshes and, in the `models` (modules or None), of DDP's group and of FSDP1's
    groups (HYBRID_SHARD's replicas too: its shard group alone left the other replica going on,
    and the ranks' next collectives mismatched). The group must hold exactly those ranks (a
    larger one would wait for ranks that never join): one of the meshes' or modules' groups, or
    the world."""
    needed, candidates, meshes = set(), [], set()
    for q in params:
        if is_dtensor(q) and id(q.device_mesh) not in meshes:
            mesh = q.device_mesh
            meshes.add(id(mesh))
            needed.update(int(r) for r in mesh.mesh.flatten().tolist())
            candidates += [mesh.get_group(d) for d in range(mesh.ndim)]
    modules = [m for model in models if isinstance(model, torch.nn.Module) for m in model.modules()]
    if modules:
        try:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
            from torch.nn.parallel import DistributedDataParallel as DDP
        except ImportError:
            FSDP = DDP = ()
        for m in modules:
            if not isinstance(m, (DDP, FSDP)):
                continue
            needed.update(_group_ranks(m.process_group))
            candidates.append(m.process_group)
            replicas = getattr(m, "_inter_node_pg", None)
            if replicas is None:
                continue
            # HYBRID_SHARD: this rank's shard group and replica group are a row and a column of a
            # grid of ranks; the whole grid steps together: its mesh, or the world it fills.
            mesh = getattr(m, "_device_mesh", None)
            if mesh is not None:
                needed.update(int(r) for r in mesh.mesh.flatten().tolist())
                candidates += [mesh.get_group(d) for d in range(mesh.ndim)]
            elif len(_group_ranks(m.process_group)) * len(_group_ranks(replicas)) == dist.get_world_size():
                needed.update(range(dist.get_world_size()))
            else:
                needed.update(_group_ranks(replicas))  # no group holds the grid: refused below
    if len(needed) <= 1:
        return None
    for g in {id(g): g for g in candidates + [dist.group.WORLD]}.values():
        if set(_group_ranks(g)) == needed:
            return g
    raise ValueError(f"gradguard.GradGuard: the ranks {sorted(needed)} step this model together, and no process "
                     "group of its meshes or modules holds exactly them, to agree on a check of the closure's loss "
                     "(LBFGS); pass process_group= such a group")


def all_agree(ok: bool, group, device) -> bool:
    """Whether `ok` holds on every rank of `group`: one all_reduce (MIN) of a flag on `device`,
    and a host read. For checks whose inputs are rank-local (a closure's loss), where a rank
    that decided alone would leave the others waiting in their next collective."""
    flag = torch.full((1,), 1.0 if ok else 0.0, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())


def zero_group(optimizer):
    """The process group of a ``ZeroRedundancyOptimizer`` (None for any other optimizer)."""
    # Not imported here: where it was never imported nothing can be one, and importing
    # torch.distributed.optim made every GradGuard() emit 67 DeprecationWarnings of torch.jit on
    # torch 2.13 (an error under -W error / pytest's filterwarnings = error).
    zero = getattr(sys.modules.get("torch.distributed.optim.zero_redundancy_optimizer"), "ZeroRedundancyOptimizer", None)
    if zero is not None and isinstance(optimizer, zero):
        return optimizer.process_group
    return None


def fsdp1_replicas_overlap(model, group) -> bool:
    """Whether `model` holds an FSDP1 module with hybrid sharding (``HYBRID_SHARD``,
    ``_HYBRID_SHARD_ZERO2``) whose replica group (the ranks holding this rank's shard, one per
    replica) shares more than this rank with `group`: the same shard summed over `group` would
    count once per replica (the norm sqrt(replicas) too large, every step clipped that much
    harder)."""
    if not isinstance(model, torch.nn.Module) or "torch.distributed.fsdp" not in sys.modules:
        return False
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, ShardingStrategy
    except ImportError:
        return False
    hybrid = {ShardingStrategy.HYBRID_SHARD, ShardingStrategy._HYBRID_SHARD_ZERO2}
    mine = set(_group_ranks(group))
    for m in FSDP.fsdp_modules(model):
        replicas = getattr(m, "_inter_node_pg", None)
        if m.sharding_strategy in hybrid and replicas is not None and len(mine & set(_group_ranks(replicas))) > 1:
            return True
    return False


def ddp_overlaps(model, group) -> bool:
    """Whether `model` holds a DistributedDataParallel module (itself, inside a container, or under
    torch.compile) whose ranks share more than this one with `group`: those ranks hold the same
    whole gradient, which summed over `group` as shards would count once per rank. (DDP over a
    data-parallel group of one beside tensor-parallel shards does not overlap.)"""
    try:
        from torch.nn.parallel import DistributedDataParallel
    except ImportError:
        return False
    if not isinstance(model, torch.nn.Module):
        return False
    mine = set(_group_ranks(group))
    return any(isinstance(m, DistributedDataParallel) and len(mine & set(_group_ranks(m.process_group))) > 1
               for m in model.modules())
