"""NanTracer under DistributedDataParallel: two gloo processes on 127.0.0.1 (a free port, a
timeout); rank 1's batch holds NaN. Rank 1 names its input rows; rank 0, whose own forward and
backward were finite, names the parameter gradient the all-reduce brought."""
from __future__ import annotations

import socket
import subprocess
import sys
import textwrap

WORKER = textwrap.dedent("""
    import math, os, sys, torch, torch.distributed as dist
    from torch import nn
    import gradguard
    rank, port = int(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=__import__("datetime").timedelta(seconds=60))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    ddp = nn.parallel.DistributedDataParallel(model)
    tracer = gradguard.NanTracer(ddp.module)
    x = torch.randn(6, 4)
    if rank == 1:
        x[2, 0] = math.nan
    ddp(x).sum().backward()
    print(f"rank{rank}: {tracer.first_nonfinite()}", flush=True)
    # Tear down in order: both ranks past their last collective, DDP's reducer (which holds the
    # group and its pending work) freed, then the group. Left to interpreter finalization, gloo's
    # threads can free that work without the GIL and abort the process (SIGABRT, "terminate
    # called without an active exception"; pytorch/pytorch#179291), which a CI run once hit.
    dist.barrier()
    tracer.remove()
    del tracer, ddp
    __import__("gc").collect()
    dist.destroy_process_group()
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_ranks(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, str(script), str(r), port], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=300)
            assert p.returncode == 0, err[-3000:]
            outs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert "rank1: the input batch already held NaN (input [0]); 1 of 6 rows: batch rows [2]" in outs[1]
    assert outs[0].startswith("rank0: forward finite and every gradient between modules finite; the parameter "
                              "gradients are not (the first, in module order: `0.weight`")
    assert "or received from another process by the gradient all-reduce" in outs[0]
