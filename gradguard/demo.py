"""`python -m gradguard.demo`: a training run that dies of NaN/Inf, and the same run saved.

A small transformer learns a synthetic sequence-classification task twice, with the same seed and
the same faults injected at the same steps:

- a batch containing NaN (bad data);
- an exp overflow in the loss (logits blown up by a temperature bug, softmax written with exp);
- a log(0) in the loss (a probability that underflows to 0);
- a learning-rate spike that explodes the gradients;
- a stretch of steps where the loop forgets ``zero_grad()``.

The unguarded run uses plain ``torch.exp``/``torch.log`` and a bare fused ``SGD`` (momentum 0.9); the guarded run uses
``gradguard.safe_exp``/``gradguard.safe_log`` and wraps the same optimizer in ``GradGuard`` (clip,
skip non-finite steps, spike clipping, hygiene warnings). A third run answers "where did the NaN
come from?": plain ``torch.exp``/``torch.log`` again, the guard only skipping bad steps (no clip),
and a ``NanTracer(model, mode="always")`` attached; on every step the guard skipped, the tracer
names the first non-finite value's origin and replays the step for the op. The script prints what
happened at each fault, a summary table, each fault's traced origin, the guard's measured overhead
per step, and saves a picture of the loss curves (with the traced origins marked) and a
per-layer gradient-norm heatmap.

Exit code 0 only when the guarded run ends finite and the unguarded run shows the failure.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

import gradguard
from gradguard._cli import check_device_arg

N_FEATURES, N_CLASSES, SEQ_LEN, BATCH = 8, 4, 16, 64
LR_SPIKE = 20.0


class TinyTransformer(nn.Module):
    """Two pre-norm transformer layers over a sequence of feature vectors, mean-pooled."""

    def __init__(self, d_model: int = 64, n_layers: int = 2, n_heads: int = 4):
        super().__init__()
        self.embed = nn.Linear(N_FEATURES, d_model)
        layer = nn.TransformerEncoderLayer(d_model, n_heads, 4 * d_model, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, N_CLASSES)

    def forward(self, x):
        return self.head(self.norm(self.encoder(self.embed(x)).mean(dim=1)))


def make_batch(gen: torch.Generator, device):
    """Label: which of the first N_CLASSES features has the largest sum over the sequence."""
    x = torch.randn(BATCH, SEQ_LEN, N_FEATURES, generator=gen)
    y = x[:, :, :N_CLASSES].sum(dim=1).argmax(dim=1)
    return x.to(device), y.to(device)


@dataclass
class Fault:
    name: str
    start: int
    stop: int  # exclusive
    what: str
    after: int = 0  # steps after the fault whose reports count too (its effect shows later)

    def active(self, step: int) -> bool:
        return self.start <= step < self.stop


# Enough steps for every fault of fault_schedule to run whole (80% of the run + 10 steps: from 41).
MIN_STEPS = 50


def fault_schedule(steps: int) -> list[Fault]:
    at = lambda frac: max(1, int(steps * frac))  # noqa: E731
    return [
        Fault("nan_batch", at(0.20), at(0.20) + 1, "a batch containing NaN"),
        Fault("exp_overflow", at(0.35), at(0.35) + 1, "exp overflow in the loss (logits x 1000)"),
        Fault("log_zero", at(0.50), at(0.50) + 1, "log(0) in the loss (a probability underflows to 0)"),
        Fault("lr_spike", at(0.65), at(0.65) + 3, f"learning rate x {LR_SPIKE:g} for 3 steps", after=3),
        Fault("no_zero_grad", at(0.80), at(0.80) + 10, "the loop forgets zero_grad() for 10 steps"),
    ]


def start_step(step, faults, gen, device, inner, base_lr, opt):
    """The batch of `step`, with the faults that act before the forward applied: NaN in the
    batch, the learning-rate spike (set on the inner optimizer), the forgotten zero_grad()."""
    x, y = make_batch(gen, device)
    if any(f.name == "nan_batch" and f.active(step) for f in faults):
        x[5, 3, 2] = math.nan
    spike = any(f.name == "lr_spike" and f.active(step) for f in faults)
    for group in inner.param_groups:
        group["lr"] = base_lr * (LR_SPIKE if spike else 1.0)
    if not any(f.name == "no_zero_grad" and f.active(step) for f in faults):
        opt.zero_grad()
    return x, y


def loss_fn(logits, y, step, faults, exp, log):
    """Cross-entropy written the way it often is by hand: softmax with exp, then log of the
    probability. `exp`/`log` are torch's or gradguard's safe versions."""
    if any(f.name == "exp_overflow" and f.active(step) for f in faults):
        logits = logits * 1000.0  # a temperature bug: exp(z) overflows float32 above z ~ 88.7
    e = exp(logits)
    probs = e / e.sum(dim=1, keepdim=True)
    if any(f.name == "log_zero" and f.active(step) for f in faults):
        probs = probs * (torch.arange(BATCH, device=probs.device) != 0).unsqueeze(1)  # p = 0 for sample 0
    return -log(probs.gather(1, y.unsqueeze(1))).mean()


@dataclass
class RunResult:
    guarded: bool
    losses: list = field(default_factory=list)
    step_ms: list = field(default_factory=list)
    events: dict = field(default_factory=dict)  # fault name -> what the run saw
    layer_norms: torch.Tensor | None = None  # [steps, layers], guarded run only
    skipped: list = field(default_factory=list)
    layer_names: list = field(default_factory=list)
    n_params: int = 0
    params_finite: bool = True
    summary: dict | None = None
    warnings: list = field(default_factory=list)


def progress(run: str, step: int, steps: int, loss: float) -> None:
    if not sys.stdout.isatty() and step % max(1, steps // 10) and step != steps:
        return
    width = 30
    done = int(width * step / steps)
    end = "\n" if step == steps else ("\r" if sys.stdout.isatty() else "\n")
    print(f"  {run:<9} [{'#' * done}{'.' * (width - done)}] step {step:4d}/{steps}  loss {loss:10.4g}", end=end,
          flush=True)


def train(guarded: bool, steps: int, device, seed: int = 0) -> RunResult:
    torch.manual_seed(seed)
    model = TinyTransformer().to(device)
    # Fused SGD with momentum: the guard then skips through found_inf and clips through
    # grad_scale inside the optimizer's own kernel (no host sync on a GPU), and clipping bounds
    # the size of an update, which is what saves a run from a learning-rate spike.
    inner = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9,
                            fused=torch.device(device).type in ("cpu", "cuda"))
    base_lr = inner.param_groups[0]["lr"]
    faults = fault_schedule(steps)
    res = RunResult(guarded=guarded, layer_names=[n for n, _ in model.named_parameters()],
                    n_params=sum(p.numel() for p in model.parameters()))
    if guarded:
        opt = gradguard.GradGuard(inner, max_norm=2.0, on_nonfinite="skip", spike=gradguard.ZScoreClip(),
                                  model=model, history_size=steps)
        exp, log = gradguard.safe_exp, gradguard.safe_log
    else:
        opt, exp, log = inner, torch.exp, torch.log
    gen = torch.Generator().manual_seed(seed + 1)
    norms_per_step, skipped_per_step = [], []
    run = "guarded" if guarded else "unguarded"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        for step in range(1, steps + 1):
            x, y = start_step(step, faults, gen, device, inner, base_lr, opt)
            model.train()
            loss = loss_fn(model(x), y, step, faults, exp, log)
            loss.backward()
            t0 = time.perf_counter()
            opt.step()
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize()
            res.step_ms.append((time.perf_counter() - t0) * 1e3)
            res.losses.append(float(loss))
            if guarded:
                norms_per_step.append(opt.last.norms.detach().clone())
                skipped_per_step.append(opt.last.skipped.clone())
            for f in faults:
                if f.start <= step < f.stop + f.after:
                    res.events.setdefault(f.name, []).append(describe_step(step, loss, model, opt if guarded else None))
            progress(run, step, steps, res.losses[-1])
    res.warnings = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    res.params_finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    if guarded:
        res.layer_norms = torch.stack(norms_per_step).double().cpu()
        res.skipped = torch.stack(skipped_per_step).cpu().tolist()
        res.summary = opt.summary()
    return res


@dataclass
class TraceResult:
    origins: dict = field(default_factory=dict)  # fault name -> (step, str(origin), short label) of its first NaN/Inf
    skipped: list = field(default_factory=list)
    max_abs_param: list = field(default_factory=list)  # per step, after the update
    clip_free_norms: list = field(default_factory=list)


def trace_run(steps: int, device, seed: int = 0) -> TraceResult:
    """The faults again, unprotected math, the guard only skipping (no clipping, so the LR spike
    is unbounded): the tracer says where each first NaN/Inf appeared."""
    torch.manual_seed(seed)
    model = TinyTransformer().to(device)
    inner = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9,
                            fused=torch.device(device).type in ("cpu", "cuda"))
    base_lr = inner.param_groups[0]["lr"]
    faults = fault_schedule(steps)
    tracer = gradguard.NanTracer(model, mode="always")
    opt = gradguard.GradGuard(inner, on_nonfinite="skip", model=model, history_size=steps, hygiene=False,
                              tracer=tracer)
    res = TraceResult()
    gen = torch.Generator().manual_seed(seed + 1)
    for step in range(1, steps + 1):
        x, y = start_step(step, faults, gen, device, inner, base_lr, opt)
        model.train()

        def fwd_bwd(batch, step=step):
            loss = loss_fn(model(batch[0]), batch[1], step, faults, torch.exp, torch.log)
            loss.backward()
            return loss

        tracer.begin_step()  # the RNG state this step starts from (exact replays)
        loss = fwd_bwd((x, y))
        opt.step()
        skipped = bool(opt.last.skipped)
        res.skipped.append(skipped)
        res.max_abs_param.append(max(float(p.detach().abs().max()) for p in model.parameters()))
        if skipped:
            # The guard skipped: params are as before the step, so a replay is exact.
            origin = tracer.first_nonfinite(loss=loss)
            if origin.op is None:
                origin = tracer.replay(fwd_bwd, (x, y))
            for f in faults:
                window = f.stop + f.after + (10 if f.name in ("lr_spike", "no_zero_grad") else 0)
                if f.start <= step < window and f.name not in res.origins:
                    res.origins[f.name] = (step, str(origin), short_origin(origin))
                    break
    tracer.remove()
    return res


def describe_step(step, loss, model, guard) -> tuple[float, str]:
    """(severity, sentence) for one step: what the loss, the params and the guard did."""
    finite_params = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    text = f"step {step}: loss {float(loss):.4g}, params {'finite' if finite_params else 'NOT finite'}"
    severity = 0.0 if math.isfinite(float(loss)) and finite_params else 3.0
    if guard is not None:
        rep = guard.last.as_dict()
        if rep["skipped"]:
            bad = rep["nonfinite_layers"]
            severity = 3.0
            text += f"; SKIPPED, non-finite grads in {len(bad)} layers ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})"
        elif rep["clipped"]:
            severity = 2.0 - rep["clip_coef"]
            worst = ", ".join(f"{n} ({v:.3g})" for n, v in rep["worst_layers"][:2])
            text += f"; clipped x{rep['clip_coef']:.3g} (norm {rep['total_norm']:.3g}; largest: {worst})"
        else:
            text += f"; grad norm {rep['total_norm']:.3g}, stepped normally"
    return severity, text


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def first_nonfinite(losses) -> int | None:
    return next((i + 1 for i, v in enumerate(losses) if not math.isfinite(v)), None)


def nonfinite_steps(losses) -> str:
    bad = [i + 1 for i, v in enumerate(losses) if not math.isfinite(v)]
    if not bad:
        return "none"
    return f"{len(bad)} (first: step {bad[0]})"


def short_origin(origin) -> str:
    """A few words for the picture."""
    op = f" ({origin.op})" if origin.op else ""
    if origin.phase == "input":
        return f"input batch, rows {origin.rows}"
    if origin.phase == "loss":
        return f"the loss{op}"
    if origin.phase == "forward":
        return f"forward of {origin.module}{op}"
    return f"backward of {origin.module or 'the loss'}{op}"


def trace_report(trace: TraceResult, steps: int) -> str:
    out = ["", "Where did the NaN come from? (third run: torch.exp/log, the guard only skips, NanTracer attached)"]
    for f in fault_schedule(steps):
        when = f"step {f.start}" if f.stop - f.start == 1 else f"steps {f.start}-{f.stop - 1}"
        if f.name in trace.origins:
            step, text, _ = trace.origins[f.name]
            later = "" if step < f.stop else " (after the fault: the grown parameters made it)"
            out.append(f"  {f.name} ({when}): first NaN/Inf at step {step}{later}: {text}")
        else:
            lo, hi = max(1, f.start - 1), min(steps, f.stop + f.after + 10)
            grow = max(trace.max_abs_param[lo - 1:hi]) / max(trace.max_abs_param[lo - 1], 1e-30)
            out.append(f"  {f.name} ({when}): no NaN/Inf in steps {f.start}-{hi}, nothing for the tracer to "
                       f"trace: the origin is the update itself (largest |parameter| grew x{grow:.3g} in those steps; "
                       f"the guarded run's clipping bounds it)")
    return "\n".join(out)


def report(plain: RunResult, guard: RunResult, steps: int) -> str:
    faults = fault_schedule(steps)
    out = ["", "What each fault did (the most severe of its steps; for the LR spike, of the 3 after it too):"]
    for f in faults:
        out.append(f"  {f.name} ({f.what}), step{'s' if f.stop - f.start > 1 else ''} "
                   f"{f.start}{f'-{f.stop - 1}' if f.stop - f.start > 1 else ''}:")
        for r, label in ((plain, "unguarded"), (guard, "guarded")):
            ev = r.events.get(f.name, [])
            worst = max(ev, key=lambda e: e[0])[1] if ev else "-"  # max() keeps the first of ties
            out.append(f"    {label:<9}: {worst}")
    zero_grad_warnings = [w for w in guard.warnings if "zero_grad" in w]
    out.append(f"  hygiene warning from the guard: {zero_grad_warnings[0] if zero_grad_warnings else 'none'}")

    # Overhead: the guard's step minus the bare fused SGD step, medians over the healthy steps.
    ok = [i for i in range(steps) if not any(f.active(i + 1) for f in faults)]
    plain_ms = statistics.median(plain.step_ms[i] for i in ok)
    guard_ms = statistics.median(guard.step_ms[i] for i in ok)
    s = guard.summary
    rows = [["run", "final loss", "params finite", "steps with NaN/Inf loss", "steps skipped", "steps clipped",
             "median opt.step()"],
            ["unguarded", f"{plain.losses[-1]:.4g}", str(plain.params_finite), nonfinite_steps(plain.losses),
             "-", "-", f"{plain_ms:.3f} ms"],
            ["guarded", f"{guard.losses[-1]:.4g}", str(guard.params_finite), nonfinite_steps(guard.losses),
             str(s["skipped"]), str(s["clipped"]), f"{guard_ms:.3f} ms"]]
    out += ["", table(rows), "",
            f"Guard overhead per step: {guard_ms - plain_ms:+.3f} ms on opt.step() ({guard_ms / plain_ms:.2f}x the bare "
            f"fused SGD step, {len(guard.layer_names)} parameter tensors, {guard.n_params / 1e3:.0f}K parameters)."]
    worst = ", ".join(f"{w['name']} (non-finite in {w['nonfinite_steps']} step{'s' * (w['nonfinite_steps'] != 1)}, "
                      f"largest finite grad norm {w['max_norm']:.3g})" for w in s["worst_layers"][:3])
    out.append(f"Layers the guard ranks worst over the run: {worst}")
    return "\n".join(out)


def plot(plain: RunResult, guard: RunResult, steps: int, path: str, trace: TraceResult | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    faults = fault_schedule(steps)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 8), gridspec_kw={"height_ratios": [1, 1.3]})
    xs = list(range(1, steps + 1))
    clean = lambda v: v if math.isfinite(v) else float("nan")  # noqa: E731
    ax1.plot(xs, [clean(v) for v in plain.losses], label="unguarded (torch.exp/log, bare SGD)", color="tab:red")
    ax1.plot(xs, [clean(v) for v in guard.losses], label="guarded (safe_exp/log + GradGuard)", color="tab:green")
    dead = first_nonfinite(plain.losses)
    if dead:
        ax1.axvline(dead, color="tab:red", ls=":", lw=1)
        ax1.text(dead, ax1.get_ylim()[1] if ax1.get_ylim()[1] > 0 else 1, " unguarded loss is NaN/Inf from here",
                 color="tab:red", fontsize=8, va="top")
    for f in faults:
        ax1.axvspan(f.start - 0.5, f.stop - 0.5, color="orange", alpha=0.3)
        ax1.text(f.start, 0.03, f" {f.name}", transform=ax1.get_xaxis_transform(), rotation=90, fontsize=7,
                 va="bottom", ha="right")
    if trace is not None:  # mark each traced origin where it happened
        for name, (step, _, short) in trace.origins.items():
            ax1.plot([step], [1.0], marker="*", ms=10, color="tab:purple", transform=ax1.get_xaxis_transform(),
                     clip_on=False)
            ax1.text(step + 0.3, 0.96, f"NaN from: {short}", transform=ax1.get_xaxis_transform(), rotation=90,
                     fontsize=6, va="top", ha="left", color="tab:purple")
    ax1.set_yscale("log")
    ax1.set_ylabel("training loss")
    ax1.set_title("Same seed, same faults: unguarded run vs gradguard (purple stars: where NanTracer found each "
                  "first NaN/Inf)", fontsize=10)
    ax1.legend(loc="upper right", fontsize=8)

    norms = guard.layer_norms.clone()
    norms[~torch.isfinite(norms)] = float("nan")
    img = torch.log10(norms.clamp_min(1e-12)).T
    finite = img[torch.isfinite(img)]
    # Colour range from the bulk of the run: one step whose gradient vanished (all clamped by
    # safe_exp) would otherwise squash every other step into one colour.
    lo = float(finite.quantile(0.01)) if finite.numel() else -12.0
    hi = float(finite.max()) if finite.numel() else 0.0
    im = ax2.imshow(img.numpy(), aspect="auto", interpolation="nearest", cmap="viridis", vmin=lo, vmax=hi,
                    extent=(0.5, steps + 0.5, len(guard.layer_names) - 0.5, -0.5))
    ax2.set_yticks(range(len(guard.layer_names)))
    ax2.set_yticklabels(guard.layer_names, fontsize=6)
    skipped = [i + 1 for i, s in enumerate(guard.skipped) if s]
    ax2.scatter(skipped, [-0.5] * len(skipped), marker="v", color="red", s=40, clip_on=False,
                label="skipped step (non-finite grads; NaN cells in white)")
    ax2.set_facecolor("white")
    ax2.set_xlabel("step")
    ax2.set_title("guarded run: per-layer gradient norm (log10), as the guard measured it", fontsize=10)
    ax2.legend(loc="lower right", fontsize=8)
    fig.colorbar(im, ax=ax2, label="log10 grad norm")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gradguard.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300, help="training steps per run (default 300)")
    ap.add_argument("--out", default=".", help="folder for gradguard_demo.png (default: current folder)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--no-plot", action="store_true", help="skip the picture")
    args = ap.parse_args(argv)
    if args.steps < MIN_STEPS:
        ap.error(f"--steps must be at least {MIN_STEPS} (the faults are spread over the run, and the last one, "
                 "10 steps without zero_grad() from 80% of it, must fit)")
    # Checked before the three runs (a bad one failed after them, or as a traceback).
    check_device_arg(ap, args.device, "demo")
    if not args.no_plot and os.path.exists(args.out) and not os.path.isdir(args.out):
        ap.error(f"--out: {args.out} is a file; give a folder for gradguard_demo.png")
    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
    b = gradguard.backend()
    print(f"gradguard demo: {args.steps} steps per run on {args.device}; kernels: cpu={b['cpu']}, cuda={b['cuda']}")
    print("Faults injected in both runs: " + "; ".join(f"{f.what} at step {f.start}" for f in fault_schedule(args.steps)))
    plain = train(False, args.steps, args.device)
    guard = train(True, args.steps, args.device)
    trace = trace_run(args.steps, args.device)
    print(report(plain, guard, args.steps))
    print(trace_report(trace, args.steps))
    if not args.no_plot:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "gradguard_demo.png")
        plot(plain, guard, args.steps, path, trace)
        print(f"\nSaved {path}")
    saved = guard.params_finite and math.isfinite(guard.losses[-1])
    failed = (not plain.params_finite) or not math.isfinite(plain.losses[-1])
    print(f"\nResult: guarded run {'ends finite' if saved else 'did NOT end finite'}; unguarded run "
          f"{'shows the failure' if failed else 'did NOT fail'}.")
    return 0 if saved and failed else 1


if __name__ == "__main__":
    sys.exit(main())
