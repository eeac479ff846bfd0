"""The README's "Distributed" example runs as written on two processes (env:// rendezvous, the
way torchrun starts it) and reports the same global norm on both ranks."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

README = Path(__file__).resolve().parents[1] / "README.md"


# gloo's exit abort (the README's comment above `gc.collect()`): a rank that printed its report can
# still be killed by SIGABRT at interpreter exit, a std::thread of gloo's destroyed while joinable
# (torch 2.13 CPU; seen once in a full no-extension suite run on 2026-12-07, then not in 6 reruns).
# That run is retried once; any other failure, or the abort twice, fails the test.
EXIT_ABORT = "terminate called without an active exception"


def _run_two_ranks(script):
    # The parent holds the rendezvous store on a free port; the ranks join it as torchrun's
    # workers join the agent's store, so no port is ever guessed.
    store = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port), "WORLD_SIZE": "2",
           "TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RESTART_COUNT": "0", "GLOO_SOCKET_IFNAME": "lo"}
    procs = [subprocess.Popen([sys.executable, str(script)], env={**env, "RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=180)
            results.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return results


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_readme_distributed_example_runs_on_two_ranks(tmp_path):
    section = README.read_text().split("## Distributed", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    script = tmp_path / "example.py"
    script.write_text(code)
    results = _run_two_ranks(script)
    if any(rc == -6 and EXIT_ABORT in err and out.strip() for rc, out, err in results):
        results = _run_two_ranks(script)
    for rc, _, err in results:
        assert rc == 0, err[-3000:]
    outs = [out.split() for _, out, _ in results]
    assert [o[0] for o in outs] == ["0", "1"]
    assert outs[0][1:] == outs[1][1:]  # total norm, skipped, worst layer: identical on both ranks
    assert float(outs[0][1]) > 0 and outs[0][2] == "False"
