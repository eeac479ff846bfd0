"""Adaptive spike clipping: a clip threshold learned from the recent gradient norms.

A policy is a configuration plus one packed float64 state tensor on the gradients' device; the
threshold and the update are computed by ``gradguard::guard_decide``, inside the one decision op
of each guarded step (see gradguard/reference/decide.py for the math), so a policy adds no op
and no host sync. A policy sees only finite steps with a nonzero norm: a step with NaN/Inf
gradients, or with no gradient at all (norm 0), says nothing about the norm distribution and
leaves its state unchanged; so does, for ``ZScoreClip``, a norm whose square or squared deviation
from the mean passes float64's range (float64 gradients, norms near 1e154 and beyond), which no
variance can hold.

The guard clips to ``min(max_norm, threshold)``, where the threshold is ``inf`` (do not clip)
until the warm-up is over and whenever the norm is within the policy's limit.
"""
from __future__ import annotations

import math

import torch

from gradguard._numbers import check_int, float_or_inf, real_number
from gradguard.errors import ArgumentTypeError


def _check_int(name: str, value, low: int, high: int | None = None, why: str = "") -> int:
    return check_int(value, f"gradguard: `{name}`", low, high, why)


# The window is ranked in full on every step (on a GPU, O(window**2 / 512) comparisons in one
# block): 100k is already milliseconds there, and a window of 2**40 failed in the allocator
# without naming the argument.
MAX_WINDOW = 100_000
# Counted in float64 in the policy's state: beyond 2^53 a count no longer moves.
MAX_WARMUP = 2 ** 53


def _check_real(name: str, value, low: float, high: float, low_open: bool, high_open: bool) -> float:
    lo, hi = "(" if low_open else "[", ")" if high_open else "]"
    want = f"gradguard: `{name}` must be a number in {lo}{low}, {high}{hi}"
    number = real_number(value)
    if number is None:
        raise ArgumentTypeError(f"{want}, got {type(value).__name__} {value!r}")
    v = float_or_inf(number)
    if math.isnan(v) or (v <= low if low_open else v < low) or (v >= high if high_open else v > high):
        raise ValueError(f"{want}, got {value!r}")
    return v


class _Setting:
    """A policy's number, checked as its constructor checks it whenever it is assigned (a plain
    attribute took `policy.z = -1`, or an `alpha` of 2, without a word, and the decision then
    used them)."""

    def __init__(self, check):
        self.check = check

    def __set_name__(self, owner, name):
        self.slot = "_" + name

    def __get__(self, obj, objtype=None):
        return self if obj is None else obj.__dict__[self.slot]

    def __set__(self, obj, value):
        obj.__dict__[self.slot] = self.check(obj, value)


_SETTINGS = ("z", "alpha", "warmup", "q", "window")


class SpikePolicy:
    """Base class of the built-in policies (``ZScoreClip``, ``PercentileClip``): ``kind`` names
    the policy for the decision op, ``args`` are its three numbers, ``_state`` its packed state."""

    kind = "none"

    def __init__(self):
        self._state: torch.Tensor | None = None
        self._owner = None  # weakref to the GradGuard using it: one guard's norms per policy

    def _guard(self):
        """The live GradGuard this policy belongs to, or None."""
        owner = getattr(self, "_owner", None)  # pickled before it existed
        return None if owner is None else owner()

    def __getstate__(self) -> dict:
        # A copy (deepcopy, pickle) belongs to no guard: the guard that copies it with itself
        # takes it (GradGuard.__setstate__), and a policy copied alone may go to a new guard.
        state = self.__dict__.copy()
        state["_owner"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        for name in _SETTINGS:  # pickled while the settings were plain attributes
            if name in state:
                state["_" + name] = state.pop(name)
        self.__dict__.update(state)

    @property
    def args(self) -> list[float]:
        raise NotImplementedError

    def _state_size(self) -> int:
        raise NotImplementedError

    def _initial_state(self, device) -> torch.Tensor:
        return torch.zeros(self._state_size(), dtype=torch.float64, device=device)

    def state_tensor(self, device) -> torch.Tensor:
        """The packed state on `device`, created on first use (the op updates it in place)."""
        if self._state is None:
            self._state = self._initial_state(device)
        elif self._state.device != device:
            self._state = self._state.to(device)
        return self._state


class ZScoreClip(SpikePolicy):
    """Clip the total norm to ``mean + z * std`` when its z-score exceeds ``z`` (ZClip).

    The mean and variance of the norm are exact running statistics over the first ``warmup``
    finite steps (no clipping then), and exponential moving averages with factor ``alpha``
    afterwards, updated with the clipped norm so that a spike does not inflate them.
    State: float64 [mean, var, count].
    """

    kind = "zscore"
    z = _Setting(lambda self, v: _check_real("z", v, 0.0, math.inf, True, True))
    alpha = _Setting(lambda self, v: _check_real("alpha", v, 0.0, 1.0, True, True))
    warmup = _Setting(lambda self, v: _check_int("warmup", v, 1, MAX_WARMUP, " (the step count is kept in float64)"))

    def __init__(self, z: float = 2.5, alpha: float = 0.97, warmup: int = 25):
        super().__init__()
        self.z, self.alpha, self.warmup = z, alpha, warmup  # checked by the settings

    @property
    def args(self) -> list[float]:
        return [self.z, self.alpha, float(self.warmup)]

    def _state_size(self) -> int:
        return 3

    def state_dict(self) -> dict:
        st = self._state
        return {"kind": "ZScoreClip", "z": self.z, "alpha": self.alpha, "warmup": self.warmup,
                "mean": None if st is None else st[0].clone(),
                "var": None if st is None else st[1].clone(),
                "count": None if st is None else st[2].to(torch.int64)}

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("kind") != "ZScoreClip":
            raise ValueError(f"gradguard: the checkpoint holds {sd.get('kind')} spike state, not ZScoreClip")
        # The constructor's checks (a checkpoint is input too), before anything here changes.
        checked = ZScoreClip(sd["z"], sd["alpha"], sd["warmup"])
        self._z, self._alpha, self._warmup = checked.z, checked.alpha, checked.warmup
        if sd["mean"] is None:
            self._state = None
        else:
            self._state = torch.stack([sd["mean"].to(torch.float64).reshape(()), sd["var"].to(torch.float64).reshape(()),
                                       sd["count"].to(sd["mean"].device, torch.float64).reshape(())])

    def __repr__(self) -> str:
        return f"ZScoreClip(z={self.z}, alpha={self.alpha}, warmup={self.warmup})"


class PercentileClip(SpikePolicy):
    """Clip the total norm to the ``q`` quantile of the last ``window`` finite norms (AutoClip).

    No clipping until ``warmup`` finite norms have been seen. The raw (unclipped) norms are
    recorded, as AutoClip does. State: float64 [count, window values (NaN: not filled yet)].
    """

    kind = "percentile"
    q = _Setting(lambda self, v: _check_real("q", v, 0.0, 1.0, True, False))
    window = _Setting(lambda self, v: self._check_window(v))
    warmup = ZScoreClip.warmup

    def __init__(self, q: float = 0.9, window: int = 1000, warmup: int = 25):
        super().__init__()
        self.q, self.window, self.warmup = q, window, warmup  # checked by the settings

    def _check_window(self, value) -> int:
        w = _check_int("window", value, 1, MAX_WINDOW,
                       " (every step ranks the whole window; its state is 8 bytes a slot on the device)")
        if self.__dict__.get("_state") is not None and w != self.__dict__["_window"]:
            raise ValueError(f"gradguard: PercentileClip's `window` cannot change from {self.__dict__['_window']} to "
                             f"{w} once it holds norms; give the guard a new PercentileClip(window={w}) instead")
        return w

    @property
    def args(self) -> list[float]:
        return [self.q, float(self.window), float(self.warmup)]

    def _state_size(self) -> int:
        return 1 + self.window

    def _initial_state(self, device) -> torch.Tensor:
        st = torch.full((1 + self.window,), math.nan, dtype=torch.float64, device=device)
        st[0] = 0.0
        return st

    def state_dict(self) -> dict:
        st = self._state
        return {"kind": "PercentileClip", "q": self.q, "window": self.window, "warmup": self.warmup,
                "buf": None if st is None else st[1:].clone(),
                "count": None if st is None else st[0].to(torch.int64)}

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("kind") != "PercentileClip":
            raise ValueError(f"gradguard: the checkpoint holds {sd.get('kind')} spike state, not PercentileClip")
        # The constructor's checks (a window beyond MAX_WINDOW included; a checkpoint is input
        # too), before anything here changes.
        checked = PercentileClip(sd["q"], sd["window"], sd["warmup"])
        state = None
        if sd["buf"] is not None:
            buf = sd["buf"].to(torch.float64).reshape(-1)
            if buf.numel() != checked.window:
                raise ValueError(f"gradguard: the checkpoint's PercentileClip state holds {buf.numel()} norms "
                                 f"but its `window` is {checked.window}")
            state = torch.cat([sd["count"].to(buf.device, torch.float64).reshape(1), buf])
        self._q, self._window, self._warmup = checked.q, checked.window, checked.warmup
        self._state = state

    def __repr__(self) -> str:
        return f"PercentileClip(q={self.q}, window={self.window}, warmup={self.warmup})"
