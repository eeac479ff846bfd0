"""Spawns a gloo process group on 127.0.0.1 for the distributed tests: the parent hosts a
TCPStore on a free port (port 0, so concurrent test runs never collide), each child joins it,
runs `fn(rank, world_size, *args)` and sends back its (picklable) result. A child that fails
sends its traceback; one that hangs is killed at `timeout` seconds."""
from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import queue
import traceback


def _child(fn, rank, world_size, port, args, out):
    try:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False,
                              timeout=datetime.timedelta(seconds=60))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=60))
        try:
            result = fn(rank, world_size, *args)
        finally:
            # Free what fn left in cycles (DDP/FSDP state holding the group's pending work)
            # while the interpreter is whole; gloo freeing it at finalization can abort the process.
            import gc
            gc.collect()
            dist.destroy_process_group()
        # Plain pickle copies tensor data; the queue's own pickler would share it through file
        # descriptors that die with this process.
        out.put((rank, "ok", pickle.dumps(result)))
    except BaseException:  # noqa: BLE001  (the parent reports it)
        out.put((rank, "error", traceback.format_exc()))


def run(fn, world_size: int = 2, args=(), timeout: float = 240.0) -> list:
    """The results of `fn` on ranks 0..world_size-1, or RuntimeError with the first failure."""
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=60))
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_child, args=(fn, r, world_size, store.port, args, out), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
        while len(results) + len(errors) < world_size:
            left = (deadline - datetime.datetime.now()).total_seconds()
            if left <= 0:
                raise RuntimeError(f"distributed test timed out after {timeout:.0f} s "
                                   f"(ranks done: {sorted(results)}, failed: {len(errors)})")
            try:
                rank, status, value = out.get(timeout=min(left, 5.0))
            except queue.Empty:
                if errors or any(p.exitcode not in (None, 0) for p in procs):
                    dead = [p.exitcode for p in procs]
                    if not errors:
                        raise RuntimeError(f"a rank died without a result (exit codes {dead})")
                continue
            if status == "ok":
                results[rank] = pickle.loads(value)
            else:
                errors.append(f"rank {rank}:\n{value}")
                break  # the other rank is likely blocked in a collective; do not wait for it
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world_size)]
