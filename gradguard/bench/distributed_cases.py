"""Benchmark: clipping FSDP2 gradients, gradguard vs torch.nn.utils.clip_grad_norm_ (issue 9's
target: within 1.2x), on 2 CPU ranks over gloo (127.0.0.1, a store on a free port).

Both ranks hold the same GPT-2-shaped parameter list, sharded by ``fully_shard`` (FSDP2), with
random DTensor gradients of FSDP2's own placements. Each round runs every case once on both
ranks (a barrier before each, so both start together), in a new seeded order each round (the
same on both ranks: timing.round_orders); rank 0's
times are reported, medians over rounds, and the target is checked on the median of per-round
ratios. Both clips issue one collective (torch: one all_reduce of the DTensor norm; gradguard:
one all_gather of the per-tensor statistics). Every call clips (``ShrinkingMaxNorm``).
"""
from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import statistics
import time
import traceback

import torch

from gradguard.bench.shapes import GPT2_SIZES, gpt2_shapes
from gradguard.bench.timing import Row, Table, round_orders

WORLD = 2
TORCH_CLIP = "torch clip_grad_norm_ on DTensor grads, clipping"
GUARD_CLIP = "gradguard.clip_grad_norm_ on DTensor grads, clipping"
GUARD_STATS = "gradguard.grad_stats on DTensor grads (one all_gather)"
TORCH_NORM = "torch get_total_norm on DTensor grads"


def _measure(rank: int, port: int, size: str, repeats: int) -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    import gradguard
    from gradguard.bench.stats_cases import ShrinkingMaxNorm

    torch.set_num_threads(1)  # one core per rank on a 2-core machine
    store = dist.TCPStore("127.0.0.1", port, WORLD, is_master=False, timeout=datetime.timedelta(seconds=120))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=300))
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        torch.manual_seed(0)
        holder = torch.nn.ParameterList([torch.nn.Parameter(torch.empty(s).normal_(0, 0.02))
                                         for s in gpt2_shapes(**GPT2_SIZES[size])])
        fully_shard(holder, mesh=mesh)
        params = list(holder.parameters())
        torch.manual_seed(1 + rank)
        for p in params:
            local = p.to_local()
            p.grad = DTensor.from_local(torch.randn_like(local) * 1e-3, mesh, p.placements,
                                        shape=p.shape, stride=p.stride())
        grads = [p.grad for p in params]
        norm = float(gradguard.grad_stats(grads).total_norm)
        # One limit sequence for both clips, which take turns on the same gradients: with one each,
        # the second clip of a round asked for the limit the first had just clipped to, and wrote
        # only where torch's float32 clip had missed it (each call must ask below the last one).
        limit = ShrinkingMaxNorm(norm)
        cases = {
            TORCH_CLIP: lambda: torch.nn.utils.clip_grad_norm_(params, limit()),
            GUARD_CLIP: lambda: gradguard.clip_grad_norm_(params, limit()),
            GUARD_STATS: lambda: gradguard.grad_stats(grads).total_norm,
            TORCH_NORM: lambda: torch.nn.utils.get_total_norm(grads).full_tensor(),
        }
        names = list(cases)
        times = {n: [] for n in names}
        for r, order in enumerate([names] + round_orders(names, repeats)):
            for n in order:
                dist.barrier()
                t0 = time.perf_counter()
                cases[n]()
                if r:  # round 0 warms up
                    times[n].append((time.perf_counter() - t0) * 1e3)
        numel = sum(p.numel() for p in params)
        local_bytes = sum(p.to_local().numel() * 4 for p in params)
        return {"times": times, "tensors": len(params), "numel": numel, "local_bytes": local_bytes}
    finally:
        dist.destroy_process_group()


def _child(rank, port, size, repeats, out):
    try:
        out.put((rank, pickle.dumps(_measure(rank, port, size, repeats)), None))
    except BaseException:  # noqa: BLE001  (reported by the parent)
        out.put((rank, None, traceback.format_exc()))


def _run(size: str, repeats: int, timeout: float = 900.0) -> dict:
    import torch.distributed as dist

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    store = dist.TCPStore("127.0.0.1", 0, WORLD, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=120))
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_child, args=(r, store.port, size, repeats, out), daemon=True) for r in range(WORLD)]
    for p in procs:
        p.start()
    try:
        results = {}
        for _ in range(WORLD):
            rank, data, err = out.get(timeout=timeout)
            if err:
                raise RuntimeError(f"distributed bench, rank {rank}:\n{err}")
            results[rank] = pickle.loads(data)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return results[0]


def tables(device: str = "cpu", quick: bool = False) -> list[Table]:
    if device != "cpu":
        raise ValueError("gradguard.bench distributed: only the CPU (gloo) variant exists; NCCL is not benched here")
    size = "10M"
    res = _run(size, repeats=5 if quick else 25)
    times = res["times"]
    # Bytes each case must move at least on this rank: a clip reads the grads twice and writes once.
    moved = {TORCH_CLIP: 3, GUARD_CLIP: 3, GUARD_STATS: 1, TORCH_NORM: 1}
    rows = [Row(n, statistics.median(v), moved[n] * res["local_bytes"]) for n, v in times.items()]
    title = (f"FSDP2 (fully_shard), {WORLD} CPU ranks over gloo, GPT-2 {size}-shaped: {res['tensors']} tensors, "
             f"{res['numel'] / 1e6:.1f}M fp32 params ({res['local_bytes'] / 1e6:.0f} MB of grads per rank); "
             f"rank 0, 1 thread per rank")
    t = Table(title, rows)
    ratio = statistics.median(a / b for a, b in zip(times[GUARD_CLIP], times[TORCH_CLIP]))
    t.check("gradguard.clip_grad_norm_ / torch clip_grad_norm_ (median of per-round ratios)", ratio, "<=", 1.2)
    return [t]
