"""What GradGuard tells you about a step: the StepReport of one step and the History of the last N.

Both hold device tensors only. Nothing here reads a value back to the host until a host view
(``nonfinite_layers``, ``worst_layers``, ``as_dict``) is asked for; that read is the only sync.
"""
from __future__ import annotations

import math

import torch

from gradguard._numbers import check_int


class StepReport:
    """One guarded step (``opt.last``).

    Device tensors: ``skipped`` (0-dim bool), ``found_inf`` (0-dim float32, exactly 0 or 1),
    ``total_norm`` and ``clip_coef`` (0-dim), and per gradient, in parameter order, ``norms``,
    ``nan_count``, ``inf_count``, ``amax``. Norms are those of the gradients as they came in
    (divided by the loss scale under a GradScaler). ``clip_coef`` is the factor the step applied
    (1 when it did not clip or was skipped). ``names`` are the parameters' names (``param[i]``
    without ``model=``/``names=``); ``step`` counts guarded steps from 1 (a host int; on a guard
    that was ever captured in a CUDA graph the host cannot count the replays, and ``step`` is read
    from the device at each look).
    ``amp_overflow`` (0-dim bool): GradScaler reported a loss-scale overflow; the step was
    skipped, and it does not count toward ``max_consecutive_skips``.

    The 0-dim values live in one packed float64 tensor (``scalars``, as ``guard_decide`` returns
    it: total_norm, clip_coef, found_inf, skipped, amp_overflow, ..., rows written); the
    properties view it on access, so building a report dispatches nothing.
    """

    def __init__(self, *, step: int | None, names: list[str], norms, nan_count, inf_count, amax, scalars,
                 found_inf, mode: str, amp: bool, total_dtype: torch.dtype, coef_dtype: torch.dtype,
                 step_offset: int = 0, capture_step: int | None = None):
        # None: numbered on the device (scalars[8] + step_offset), see GuardState.recorded; while
        # the capture that made it runs, capture_step (GuardState.capture_time_step).
        self._step = step
        self._step_offset = step_offset
        self._capture_step = capture_step
        self.names = names
        self.norms = norms
        self.nan_count = nan_count
        self.inf_count = inf_count
        self.amax = amax
        self.scalars = scalars
        self.found_inf = found_inf
        self.mode = mode
        self.amp = amp
        self._dtypes = (total_dtype, coef_dtype)
        self._host = None
        # Whether the step was skipped, when the guard read its decision anyway (a step that is
        # not decided on the device); None otherwise. See skipped_if_known().
        self._skipped_read = None

    @property
    def step(self) -> int:
        if self._step is not None:
            return self._step
        if self._capture_step is not None:
            from gradguard import optim  # noqa: PLC0415  (optim imports this module)
            if optim._capturing(self.scalars.device):
                return self._capture_step
        # Read afresh (one value, not the cached host views): a captured step's report holds the
        # latest replay's number (and, before its first replay, memory the capture never wrote).
        return int(self.scalars[8]) + self._step_offset

    @property
    def total_norm(self) -> torch.Tensor:
        return self.scalars[0].to(self._dtypes[0])

    @property
    def clip_coef(self) -> torch.Tensor:
        return self.scalars[1].to(self._dtypes[1])

    @property
    def skipped(self) -> torch.Tensor:
        return self.scalars[3] != 0

    @property
    def amp_overflow(self) -> torch.Tensor:
        return self.scalars[4] != 0

    def _mark_skipped(self) -> None:
        """The step turned out skipped after all (an LBFGS step rolled back): no clip, non-finite."""
        self.scalars[1:4] = 1.0
        self.found_inf.fill_(1.0)
        self._host = None
        self._skipped_read = True

    def skipped_if_known(self) -> bool | None:
        """Whether the step was skipped, as a host bool where knowing it costs no sync: the guard
        read its decision (a non-fused inner optimizer, ``on_nonfinite="raise"``,
        ``max_consecutive_skips``), or the decision lives in CPU memory. ``None`` for a step
        decided on an accelerator (a fused optimizer on a GPU): read ``skipped`` for that (a sync)."""
        if self._skipped_read is not None:
            return self._skipped_read
        if self.scalars.device.type == "cpu":
            return bool(self.scalars[3])
        return None

    def _fetch(self) -> dict:
        # One device-to-host copy of one packed float64 tensor for every host view, once per
        # report (a sync on an accelerator). float64 holds the int64 counts exactly below 2**53
        # and every float32/float16 norm exactly.
        if self._host is None:
            n = self.norms.numel()
            packed = torch.cat([self.norms.to(torch.float64), self.nan_count.to(torch.float64),
                                self.inf_count.to(torch.float64), self.amax.to(torch.float64), self.scalars[:5]])
            flat = packed.tolist()
            nan = [int(v) for v in flat[n:2 * n]]
            inf = [int(v) for v in flat[2 * n:3 * n]]
            self._host = {
                "norms": flat[:n],
                "bad": [a + b for a, b in zip(nan, inf)],
                "nan": nan,
                "inf": inf,
                "amax": flat[3 * n:4 * n],
                "scalars": flat[4 * n:4 * n + 5],
            }
        return self._host

    @property
    def nonfinite_layers(self) -> list[str]:
        """Names of the parameters whose gradient held a NaN or an Inf (reads the counts)."""
        bad = self._fetch()["bad"]
        return [n for n, b in zip(self.names, bad) if b]

    def worst_layers(self, k: int = 5) -> list[tuple[str, float]]:
        """The k parameters with the largest gradient norm, non-finite ones first, as
        (name, norm) pairs (reads the norms)."""
        k = check_int(k, "gradguard.StepReport.worst_layers: `k`", 0)
        norms = self._fetch()["norms"]
        order = sorted(range(len(norms)),
                       key=lambda i: (0, 0.0) if not math.isfinite(norms[i]) else (1, -norms[i]))
        return [(self.names[i], norms[i]) for i in order[:k]]

    def as_dict(self, layers: bool = False) -> dict:
        """Plain Python values, for logs. ``layers=True`` adds every parameter's norm, NaN and Inf
        counts and finite amax under ``"layers"``."""
        h = self._fetch()
        total, coef, found, skipped, overflow = h["scalars"]
        out = {
            "step": self.step,
            "skipped": bool(skipped),
            "found_inf": bool(found),
            "total_norm": total,
            "clip_coef": coef,
            "clipped": bool(coef < 1.0 and not skipped),
            "nonfinite_layers": self.nonfinite_layers,
            "worst_layers": self.worst_layers(5),
            "on_nonfinite": self.mode,
            "amp": self.amp,
            "amp_overflow": bool(overflow),
        }
        if layers:
            out["layers"] = {n: {"norm": a, "nan": b, "inf": c, "amax": d}
                             for n, a, b, c, d in zip(self.names, h["norms"], h["nan"], h["inf"], h["amax"])}
        return out

    def __repr__(self) -> str:
        return f"StepReport(step={self.step}, {len(self.names)} tensors; read .as_dict() for values)"


MAX_HISTORY = 10_000_000  # 240 MB of device memory


class History:
    """The last ``size`` steps' total norm, clip coefficient and skip flag, in a ring buffer on
    the gradients' device (``opt.history``). ``as_dict()`` reads the buffer back (a sync),
    oldest step first. The decision op of each guarded step writes the row (no op of its own);
    the host keeps the step numbers, and catches up with rows the device wrote alone (the replays
    of a CUDA graph that captured a guarded step) whenever it reads."""

    _COLUMNS = ("total_norm", "clip_coef", "skipped")

    def __init__(self, size: int):
        self.size = check_int(size, "gradguard: `history_size`", 1, MAX_HISTORY,
                              " (the ring buffer takes 24 bytes per step on the device)")
        self._values: torch.Tensor | None = None  # [size, 3] float64 on the device
        self._steps: list[int] = []               # host-side step numbers, same ring order
        self._count = 0
        self._counters = None  # the guard's int64 counters on the device: [4] = rows written
        # From the guard's first CUDA graph capture on, the host notes no step (GuardState.recorded):
        # the count is the device's, read (a sync) where len() or count is asked for.
        self._device_numbered = False

    def _sync_count(self) -> None:
        if self._device_numbered and self._counters is not None:
            self.catch_up(int(self._counters[4]))

    def __len__(self) -> int:
        self._sync_count()
        return min(self._count, self.size)

    def values(self, device) -> torch.Tensor:
        """The [size, 3] ring on `device` (created on first use): ``guard_decide`` writes row
        ``count % size`` of it on the device."""
        if self._values is None:
            self._values = torch.full((self.size, 3), math.nan, dtype=torch.float64, device=device)
        elif self._values.device != device:
            self._values = self._values.to(device)
        return self._values

    def note(self, step: int) -> None:
        """The host side of a recorded step: its number, in the slot the op just wrote."""
        slot = self._count % self.size
        if slot < len(self._steps):
            self._steps[slot] = step
        else:
            self._steps.append(step)
        self._count += 1

    def catch_up(self, device_count: int) -> None:
        """Numbers the rows the device wrote that the host did not note: every step from a guard's
        first CUDA graph capture on (replays run no Python; see GuardState.recorded).
        `device_count` is the counters' rows-written as read back."""
        missing = device_count - self._count
        if missing <= 0:
            return
        first_step = (self._steps[(self._count - 1) % self.size] + 1) if self._count else 1
        n = missing
        if n > self.size:  # only the last `size` rows are still in the ring
            if len(self._steps) < self.size:
                self._steps += [0] * (self.size - len(self._steps))
            self._count += n - self.size
            first_step += n - self.size
            n = self.size
        for i in range(n):
            self.note(first_step + i)

    @property
    def count(self) -> int:
        """Steps recorded so far (also kept on the device, in the guard's counters)."""
        self._sync_count()
        return self._count

    def _order(self) -> list[int]:
        n = min(self._count, self.size)  # the caller caught up
        start = self._count % self.size if self._count > self.size else 0
        return [(start + i) % self.size for i in range(n)]

    def as_dict(self) -> dict[str, list]:
        """``{"step": [...], "total_norm": [...], "clip_coef": [...], "skipped": [...]}``,
        oldest first (one read of the buffer)."""
        counters = self._counters
        if self._values is not None and counters is not None:
            # One read: the ring and the device's count of rows written.
            packed = torch.cat([self._values.reshape(-1), counters[4:5].to(self._values.device, torch.float64)])
            flat = packed.tolist()
            self.catch_up(int(flat[-1]))
            rows = [flat[3 * i:3 * i + 3] for i in range(self.size)]
        elif self._values is not None:
            rows = self._values.cpu().tolist()
        order = self._order()
        if not order:
            return {"step": [], **{c: [] for c in self._COLUMNS}}
        return {
            "step": [self._steps[i] for i in order],
            "total_norm": [rows[i][0] for i in order],
            "clip_coef": [rows[i][1] for i in order],
            "skipped": [bool(rows[i][2]) for i in order],
        }

    def state_dict(self) -> dict:
        return {"size": self.size, "count": self._count, "steps": list(self._steps),
                "values": None if self._values is None else self._values.clone()}

    def load_state_dict(self, sd: dict) -> None:
        if sd["size"] != self.size:
            raise ValueError(f"gradguard: the checkpoint's history holds {sd['size']} steps but this "
                             f"GradGuard was built with history_size={self.size}")
        self._count = int(sd["count"])
        self._steps = list(sd["steps"])
        self._values = None if sd["values"] is None else sd["values"].to(torch.float64, copy=True)
