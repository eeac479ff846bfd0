"""What the framework callbacks share: the optional import, the guard's arguments, the guard's
state as JSON (Hugging Face keeps callback state in trainer_state.json), and the deferred check
for bad steps (a host read once per logged step, not once per step)."""
from __future__ import annotations

import copy
import importlib
import logging
import math

import torch

from gradguard.optim import GradGuard

log = logging.getLogger("gradguard.integrations")

# GradGuard arguments the callbacks fill in themselves.
_OWNED = ("optimizer", "model", "names")


def require(module: str, package: str, integration: str):
    """Imports ``module`` or raises an ImportError saying what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"gradguard.integrations.{integration} needs the `{package}` package, which is not installed "
            f"({e}); install it with `pip install {package}` (pinned versions: "
            f"`pip install -r requirements-integrations.txt`)") from e


def check_guard_kwargs(where: str, kwargs: dict) -> dict:
    """Refuses the arguments the callback supplies, and bad values now rather than when fit starts
    (by building a throwaway guard with them)."""
    owned = [k for k in _OWNED if k in kwargs]
    if owned:
        raise TypeError(f"{where}: do not pass {', '.join(map(repr, owned))}; the callback wraps the "
                        "framework's optimizer and takes the parameter names from the model")
    probe = torch.nn.Parameter(torch.zeros(1))
    GradGuard(torch.optim.SGD([probe], lr=0.0), **guard_kwargs_copy(kwargs))
    return dict(kwargs)


def guard_kwargs_copy(kwargs: dict) -> dict:
    """`kwargs` for one more guard: a spike policy belongs to one guard (its statistics are that
    guard's norms), so each guard the callback builds gets a copy of the one it was given."""
    own = dict(kwargs)
    if own.get("spike") is not None:
        own["spike"] = copy.deepcopy(own["spike"])
    return own


def _encode(value):
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu()
        return {"__tensor__": [_float(v) for v in t.reshape(-1).tolist()], "dtype": str(t.dtype).split(".")[-1],
                "shape": list(t.shape)}
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if isinstance(value, float):
        return _float(value)
    return value


def _float(v):
    # JSON has no NaN/Inf literal that every reader takes: strings round-trip exactly.
    if isinstance(v, float) and not math.isfinite(v):
        return repr(v)
    return v


def _decode(value, device):
    if isinstance(value, dict) and "__tensor__" in value:
        data = [float(v) if isinstance(v, str) else v for v in value["__tensor__"]]
        return torch.tensor(data, dtype=getattr(torch, value["dtype"])).reshape(value["shape"]).to(device)
    if isinstance(value, dict):
        return {k: _decode(v, device) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, device) for v in value]
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return float(value)
    return value


def guard_state_json(guard: GradGuard) -> dict:
    """The guard's own state (counters, per-layer totals, spike statistics, history) as JSON
    values; the inner optimizer's state is the framework's to save."""
    return _encode(guard.guard_state_dict())


def load_guard_state_json(guard: GradGuard, saved: dict, device) -> None:
    guard.load_guard_state_dict(_decode(saved, device))


def skipped_total(guard) -> torch.Tensor:
    """The guard's own count of skipped steps, as a float32 0-dim device tensor (one op, no sync):
    restored with the guard's state, so the logged curve carries on across a resume (a count kept
    by the callback started again from 0)."""
    return guard._state.counters[0].to(torch.float32)


class BadStepLog:
    """Reports of steps not yet checked for NaN/Inf. ``flush()`` reads all their flags in one
    transfer and returns the bad ones with their non-finite layer names.

    A step whose report says ``amp_overflow`` (GradScaler's found-inf flag was set) is a bad step
    too, also listed in ``overflow_steps``, and its warning says so: GradScaler skips such a step
    and lowers the scale, routinely while it calibrates, but its flag cannot tell an fp16
    overflow from a NaN in the data, so it is not hidden (filed as a routine overflow at INFO, a
    NaN in every batch went unreported for hundreds of steps: GradScaler's flag stays set, and
    the report's ``amp_overflow`` with it, however far the scale falls)."""

    # Reports hold per-layer tensors (device memory on a GPU): a run that never logs
    # (logging_strategy="no", one long epoch) kept every step's, ~6 KB a step for 100 layers.
    # Past this many the pending steps are checked in add() (one read per 1,024 steps), and what
    # that finds is returned by the next flush().
    MAX_PENDING = 1024

    def __init__(self):
        self.pending = []   # (framework step, StepReport, optimizer index)
        self.bad_steps = []  # dicts: step, guard_step, layers, skipped, optimizer
        self.overflow_steps = []  # those of bad_steps that were GradScaler overflows
        self._found_early = ([], [])  # found by add()'s checks since the last flush()

    def add(self, step: int, report, optimizer: int = 0) -> None:
        self.pending.append((step, report, optimizer))
        if len(self.pending) >= self.MAX_PENDING:
            self.check_now()

    def check_now(self) -> None:
        """Checks the pending steps now (warned about and listed in ``bad_steps`` now); what it
        finds is also returned by the next flush(), for its metrics."""
        found, overflows = self._check()
        self._found_early[0].extend(found)
        self._found_early[1].extend(overflows)

    def discard_unreported(self) -> None:
        """Forgets the steps not yet returned by flush() (a run that raised left them)."""
        self.pending = []
        self._found_early = ([], [])

    def flush(self) -> tuple[list[dict], list[dict]]:
        """Checks the pending steps; returns the bad steps found since the last flush, and those
        of them that were GradScaler overflows."""
        found, overflows = self._check()
        early, self._found_early = self._found_early, ([], [])
        return early[0] + found, early[1] + overflows

    def _check(self) -> tuple[list[dict], list[dict]]:
        if not self.pending:
            return [], []
        pending, self.pending = self.pending, []
        device = pending[0][1].found_inf.device
        # Both flags of every pending step in the one transfer.
        flags = torch.stack([torch.stack([r.found_inf.to(device=device, dtype=torch.float64),
                                          r.amp_overflow.to(device=device, dtype=torch.float64)])
                             for _, r, _ in pending]).tolist()
        found, overflows = [], []
        for (step, report, optimizer), (flag, overflow) in zip(pending, flags):
            if not flag:
                continue
            entry = {"step": step, "guard_step": report.step, "layers": report.nonfinite_layers,
                     "skipped": bool(report.skipped), "optimizer": optimizer}
            found.append(entry)
            if overflow:
                overflows.append(entry)
                names = entry["layers"]  # an fp16 overflow often reaches every layer: the first few
                shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
                log.warning("gradguard: step %d: GradScaler overflow, non-finite scaled gradients in %s (skipped; "
                            "GradScaler lowers the scale, routinely while it calibrates; a NaN or Inf in the data "
                            "looks the same, and then recurs)", step, shown or "(none named)")
                continue
            log.warning("gradguard: step %d had non-finite gradients in %s (%s)", step,
                        ", ".join(entry["layers"]) or "(none named)",
                        "skipped" if entry["skipped"] else f"on_nonfinite={report.mode!r}")
        self.bad_steps += found
        self.overflow_steps += overflows
        return found, overflows
