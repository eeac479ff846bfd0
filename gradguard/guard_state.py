"""The guard's own state: step counters, per-parameter totals and the history ring, owned by one
small class, on the gradients' device, updated in place by ``gradguard::guard_decide``.

``counters`` (int64 [5]): skipped steps, clipped steps, non-finite steps, the current streak of
skipped steps, and how many history rows were written (the op writes row ``count % size``). The
checkpoint keeps the format of version 1 (``totals`` [3], ``consecutive``), so older checkpoints
load and newer ones load into older code.
"""
from __future__ import annotations

import torch

from gradguard.report import History

_KEYS = ("steps", "totals", "consecutive", "layer_nonfinite", "layer_max_norm", "spike", "history")


class GuardState:
    def __init__(self, history_size: int):
        self.history = History(history_size)
        # steps = rows the history has recorded + this (a checkpoint's steps minus its count: 0
        # unless it was edited), so the step number follows the history when it catches up.
        self._steps_offset = 0
        self.counters: torch.Tensor | None = None         # int64 [5], see the module docstring
        self.layer_nonfinite: torch.Tensor | None = None  # int64 [P]: steps each grad was non-finite
        self.layer_max_norm: torch.Tensor | None = None   # float64 [P]: largest finite grad norm seen
        # The parameters those [P] totals are for, in order (None: not known, e.g. unpickled from
        # before this existed; then by position). Pickled with the guard, whose optimizer holds the
        # same tensors, so a copy's list is the copy's parameters.
        self.params: list | None = None

    def _set_counters(self, t: torch.Tensor | None) -> None:
        # The history reads the rows-written count from the same tensor (a tensor reference,
        # not a reference back to this object: no cycle keeping the ring alive). A plain
        # attribute, not a property: the step reads it several times.
        self.counters = self.history._counters = t

    @property
    def steps(self) -> int:
        return self.history._count + self._steps_offset  # callers catch the history up first

    def ensure(self, device, count: int) -> None:
        """Creates the tensors on first use, follows the gradients to another device and grows
        with add_param_group."""
        if self.counters is None:
            self._set_counters(torch.zeros(5, dtype=torch.int64, device=device))
            self.counters[4] = self.history._count
            self.layer_nonfinite = torch.zeros(count, dtype=torch.int64, device=device)
            self.layer_max_norm = torch.zeros(count, dtype=torch.float64, device=device)
            return
        if self.counters.device != device:
            counters, self.layer_nonfinite, self.layer_max_norm = (
                t.to(device) for t in (self.counters, self.layer_nonfinite, self.layer_max_norm))
            self._set_counters(counters)
        self.grow(count)

    def follow(self, params: list) -> None:
        """The per-parameter totals follow their parameters (by identity) into `params`, the
        optimizer's list now: kept ones keep theirs (moved with them), new ones start at 0,
        removed ones are dropped. By position alone, a group removed from param_groups left the
        totals too long, and every later step failed in guard_decide. One look at the list
        while it is the same object; a gather on the device when parameters were removed or
        reordered (rare: a host-to-device copy of the index)."""
        old = self.params
        if old is params:
            return
        self.params = params
        if self.layer_nonfinite is None:
            return
        n = self.layer_nonfinite.numel()
        if old is None or len(old) != n:  # the list they were kept for is not known: by position
            src = list(range(min(n, len(params)))) + [-1] * max(len(params) - n, 0)
        else:
            where = {id(q): i for i, q in enumerate(old)}
            src = [where.get(id(q), -1) for q in params]
        if src[:n] == list(range(n)) and all(i < 0 for i in src[n:]):
            self.grow(len(params))  # the same, or parameters appended (add_param_group)
            return
        dev = self.layer_nonfinite.device
        at = torch.tensor([max(i, 0) for i in src], dtype=torch.int64).to(dev)
        kept = torch.tensor([i >= 0 for i in src], dtype=torch.bool).to(dev)
        self.layer_nonfinite = torch.where(kept, self.layer_nonfinite[at], 0)
        self.layer_max_norm = torch.where(kept, self.layer_max_norm[at], 0.0)

    def grow(self, count: int) -> None:
        """Zero totals for parameters added since (add_param_group appends them last)."""
        grow = count - (0 if self.layer_nonfinite is None else self.layer_nonfinite.numel())
        if self.counters is not None and grow > 0:
            self.layer_nonfinite = torch.cat([self.layer_nonfinite, self.layer_nonfinite.new_zeros(grow)])
            self.layer_max_norm = torch.cat([self.layer_max_norm, self.layer_max_norm.new_zeros(grow)])

    def recorded(self, capturing: bool) -> int | None:
        """Host side of a step the op recorded; returns its number, or None where only the device
        knows it. A step captured in a CUDA graph runs once per replay with no Python, so from
        the first capture on the host numbers nothing: the step's report reads its number from the
        op's scalars when asked, and the history numbers the device's rows when it reads them
        (catch_up). Counting on the host there put an eager step taken after replays at the wrong
        number and ring slot, and left the host one step ahead after a capture that failed."""
        h = self.history
        if capturing:
            h._device_numbered = True
        if h._device_numbered:
            return None
        step = self.capture_time_step()
        h.note(step)
        return step

    def capture_time_step(self) -> int:
        """The next step's number as the host knows it: a host-numbered step's, and what a step
        captured now is numbered while the capture runs (a step hook reading ``report.step``
        cannot read the device then), which its first replay gets when no replay of another
        graph ran since the host last read."""
        return self.history._count + self._steps_offset + 1

    def mark_last_skipped(self, prev_streak: torch.Tensor, counted_nonfinite: bool) -> None:
        """The last step turned out skipped after all (an LBFGS step rolled back after its first
        evaluation, which the decision took): counted as skipped and non-finite (unless the
        decision already counted a non-finite first evaluation, "zero" mode), not clipped, and
        one more in the skip streak that stood before it (`prev_streak`)."""
        # history.count: the device's count once the guard was captured (a read; this path reads anyway).
        row = self.history._values[(self.history.count - 1) % self.history.size]
        was_clipped = ((row[1] < 1) & (row[2] == 0)).to(torch.int64)
        one = torch.ones_like(was_clipped)
        self.counters[:3] += torch.stack([one, -was_clipped, one * (0 if counted_nonfinite else 1)])
        self.counters[3] = prev_streak + 1
        row[1:] = 1.0

    def summary(self, names: list[str], k: int) -> dict:
        """See GradGuard.summary: one transfer of the counters packed with the peaks (float64 is
        exact for counts below 2**53)."""
        if self.counters is None:
            return {"steps": self.steps, "skipped": 0, "clipped": 0, "nonfinite_steps": 0,
                    "consecutive_skips": 0, "worst_layers": []}
        n = self.layer_nonfinite.numel()
        flat = torch.cat([self.counters.to(torch.float64), self.layer_nonfinite.to(torch.float64),
                          self.layer_max_norm]).tolist()
        skipped, clipped, nonfinite, streak, rows = (int(v) for v in flat[:5])
        self.history.catch_up(rows)
        bad, peak = [int(v) for v in flat[5:5 + n]], flat[5 + n:]
        order = sorted(range(len(bad)), key=lambda i: (-bad[i], -peak[i]))
        worst = [{"name": names[i], "nonfinite_steps": bad[i], "max_norm": peak[i]} for i in order[:k]]
        return {"steps": self.steps, "skipped": skipped, "clipped": clipped, "nonfinite_steps": nonfinite,
                "consecutive_skips": streak, "worst_layers": worst}

    def state_dict(self, spike) -> dict:
        c = self.counters
        if c is not None:
            # A read (a sync on a GPU): the steps a CUDA graph replayed since the host last looked.
            self.history.catch_up(int(c[4]))

        def clone(t):
            return None if t is None else t.clone()

        return {
            "version": 1,
            "steps": self.steps,
            "totals": None if c is None else c[:3].clone(),
            "consecutive": None if c is None else c[3].clone(),
            "layer_nonfinite": clone(self.layer_nonfinite),
            "layer_max_norm": clone(self.layer_max_norm),
            "spike": None if spike is None else spike.state_dict(),
            "history": self.history.state_dict(),
        }

    def load_state_dict(self, guard: dict) -> None:
        self.history.load_state_dict(guard["history"])
        self._steps_offset = int(guard["steps"]) - self.history._count
        if guard["totals"] is None:
            self._set_counters(None)
            self.layer_nonfinite = self.layer_max_norm = None
            return
        totals = guard["totals"].to(torch.int64)
        count = torch.full((1,), self.history._count, dtype=torch.int64, device=totals.device)
        self._set_counters(torch.cat([totals.reshape(3),
                                      guard["consecutive"].to(totals.device, torch.int64).reshape(1), count]))
        # In the dtypes the decision op updates in place (a checkpoint cast to float32 loaded, then
        # every step raised in guard_decide).
        self.layer_nonfinite = guard["layer_nonfinite"].to(torch.int64, copy=True)
        self.layer_max_norm = guard["layer_max_norm"].to(torch.float64, copy=True)
