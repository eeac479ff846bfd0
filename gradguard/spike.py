"""Adaptive spike clipping: a clip threshold learned from the recent gradient norms.

Everything is computed on the device with branch-free tensor math (no `.item()`), so a policy adds
a handful of tiny kernels per step and no host sync. A policy sees only finite steps: a step
with NaN/Inf gradients says nothing about the norm distribution and leaves its state unchanged.

The guard calls ``threshold(norm)`` to get this step's limit (``inf``: the norm is within it, do not
clip), clips to
``min(max_norm, threshold)``, then calls ``update(norm, clipped_norm, finite)``.
"""
from __future__ import annotations

import math
import numbers

import torch


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"gradguard: `{name}` must be an int >= {low}, got {value!r}")
    return int(value)


def _check_real(name: str, value, low: float, high: float, low_open: bool, high_open: bool) -> float:
    bad = isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value)
    if not bad:
        v = float(value)
        bad = (v <= low if low_open else v < low) or (v >= high if high_open else v > high)
    if bad:
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"gradguard: `{name}` must be a number in {lo}{low}, {high}{hi}, got {value!r}")
    return float(value)


class SpikePolicy:
    """Base class: state lives in device tensors created on first use."""

    def threshold(self, norm: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def update(self, norm: torch.Tensor, clipped_norm: torch.Tensor, finite: torch.Tensor) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, sd: dict) -> None:
        raise NotImplementedError


class ZScoreClip(SpikePolicy):
    """Clip the total norm to ``mean + z * std`` when its z-score exceeds ``z`` (ZClip).

    The mean and variance of the norm are exact running statistics over the first ``warmup``
    finite steps (no clipping then), and exponential moving averages with factor ``alpha``
    afterwards, updated with the clipped norm so that a spike does not inflate them.
    """

    def __init__(self, z: float = 2.5, alpha: float = 0.97, warmup: int = 25):
        self.z = _check_real("z", z, 0.0, math.inf, True, True)
        self.alpha = _check_real("alpha", alpha, 0.0, 1.0, True, True)
        self.warmup = _check_int("warmup", warmup, 1)
        self._mean = self._var = self._count = None

    def _ensure(self, device) -> None:
        if self._mean is None:
            self._mean = torch.zeros((), dtype=torch.float64, device=device)
            self._var = torch.zeros((), dtype=torch.float64, device=device)
            self._count = torch.zeros((), dtype=torch.int64, device=device)
        elif self._mean.device != device:
            self._mean, self._var, self._count = (t.to(device) for t in (self._mean, self._var, self._count))

    def threshold(self, norm: torch.Tensor) -> torch.Tensor:
        self._ensure(norm.device)
        limit = self._mean + self.z * self._var.sqrt()
        # Only a norm above the limit is clipped: a norm on it (e.g. std 0) is left alone.
        return torch.where((self._count >= self.warmup) & (norm > limit), limit, math.inf)

    def update(self, norm, clipped_norm, finite) -> None:
        self._ensure(norm.device)
        x = clipped_norm.double()
        warm = self._count < self.warmup
        # Welford's update during warm-up (weight 1/(n+1)), an EMA after (weight 1 - alpha).
        w = torch.where(warm, 1.0 / (self._count + 1).double(), 1.0 - self.alpha)
        mean = self._mean + w * (x - self._mean)
        term = torch.where(warm, (x - self._mean) * (x - mean), (x - mean) ** 2)
        var = self._var + w * (term - self._var)
        self._mean.copy_(torch.where(finite, mean, self._mean))
        self._var.copy_(torch.where(finite, var, self._var))
        self._count.add_(finite.to(torch.int64))

    def state_dict(self) -> dict:
        return {"kind": "ZScoreClip", "z": self.z, "alpha": self.alpha, "warmup": self.warmup,
                "mean": None if self._mean is None else self._mean.clone(),
                "var": None if self._var is None else self._var.clone(),
                "count": None if self._count is None else self._count.clone()}

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("kind") != "ZScoreClip":
            raise ValueError(f"gradguard: the checkpoint holds {sd.get('kind')} spike state, not ZScoreClip")
        self.z, self.alpha, self.warmup = sd["z"], sd["alpha"], sd["warmup"]
        self._mean, self._var, self._count = (None if sd[k] is None else sd[k].clone()
                                              for k in ("mean", "var", "count"))

    def __repr__(self) -> str:
        return f"ZScoreClip(z={self.z}, alpha={self.alpha}, warmup={self.warmup})"


class PercentileClip(SpikePolicy):
    """Clip the total norm to the ``q`` quantile of the last ``window`` finite norms (AutoClip).

    No clipping until ``warmup`` finite norms have been seen. The raw (unclipped) norms are
    recorded, as AutoClip does.
    """

    def __init__(self, q: float = 0.9, window: int = 1000, warmup: int = 25):
        self.q = _check_real("q", q, 0.0, 1.0, True, False)
        self.window = _check_int("window", window, 1)
        self.warmup = _check_int("warmup", warmup, 1)
        self._buf = self._count = self._slots = None

    def _ensure(self, device) -> None:
        if self._buf is None:
            self._buf = torch.full((self.window,), math.nan, dtype=torch.float64, device=device)
            self._count = torch.zeros((), dtype=torch.int64, device=device)
        elif self._buf.device != device:
            self._buf, self._count = self._buf.to(device), self._count.to(device)
        if self._slots is None or self._slots.device != self._buf.device:
            self._slots = torch.arange(self.window, device=self._buf.device)

    def threshold(self, norm: torch.Tensor) -> torch.Tensor:
        self._ensure(norm.device)
        # Unfilled slots are NaN, so nanquantile sees exactly the recorded norms.
        limit = torch.nanquantile(self._buf, self.q)
        return torch.where((self._count >= self.warmup) & (norm > limit), limit, math.inf)

    def update(self, norm, clipped_norm, finite) -> None:
        self._ensure(norm.device)
        slot = self._count % self.window
        self._buf.copy_(torch.where((self._slots == slot) & finite, norm.double(), self._buf))
        self._count.add_(finite.to(torch.int64))

    def state_dict(self) -> dict:
        return {"kind": "PercentileClip", "q": self.q, "window": self.window, "warmup": self.warmup,
                "buf": None if self._buf is None else self._buf.clone(),
                "count": None if self._count is None else self._count.clone()}

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("kind") != "PercentileClip":
            raise ValueError(f"gradguard: the checkpoint holds {sd.get('kind')} spike state, not PercentileClip")
        self.q, self.window, self.warmup = sd["q"], sd["window"], sd["warmup"]
        self._buf = None if sd["buf"] is None else sd["buf"].clone()
        self._count = None if sd["count"] is None else sd["count"].clone()
        self._slots = None

    def __repr__(self) -> str:
        return f"PercentileClip(q={self.q}, window={self.window}, warmup={self.warmup})"
