"""The NanTracer's answer: where the first NaN/Inf of a step appeared, and its one-sentence form."""
from __future__ import annotations

from dataclasses import dataclass, field


def _shown(name: str) -> str:
    """A module's name as the sentences show it: "" is the root module's own code."""
    return f"`{name}`" if name else "the model itself"


@dataclass
class Origin:
    """Where the first non-finite value of a step appeared (see ``NanTracer.first_nonfinite``).

    phase: ``"input"`` (the batch), ``"forward"``, ``"loss"`` (the model's outputs were finite,
    the loss was not) or ``"backward"``. module: qualified module name (``""``: the model's own
    input, or the loss). rows: batch rows that hold NaN/Inf, when known. op: the first aten op
    whose output went non-finite, when it was found (a mask's -inf not counted: see
    ``FirstNonfiniteOp``). loss_too: the tensor was also a model output, so the loss is among the
    candidates. call: the module call number in the forward (1-based, all modules counted in
    execution order).
    """

    phase: str
    module: str
    where: str                 # "output", "input", "gradient", "code", "code gradient", "loss",
                               # "parameter gradient"
    call: int | None = None
    module_call: int | None = None
    kind: str = "NaN"          # "NaN", "Inf" or "NaN and Inf"
    tensor: str | None = None  # which input/output leaf, e.g. "[0]" or "['logits']"
    rows: list | None = None
    batch_size: int | None = None
    op: str | None = None
    op_inputs_finite: bool | None = None
    op_module: str | None = None
    inputs_finite: bool = True
    submodule: str | None = None      # "code": the submodule whose input it was; "code gradient": whose output
    consumers: list = field(default_factory=list)
    candidates: list = field(default_factory=list)  # sibling modules that each took the tensor: any may be it
    loss_too: bool = False  # the tensor was also a model output: the loss's backward added to its gradient
    bad_params: list = field(default_factory=list)  # own parameters that hold NaN/Inf
    max_param: float | None = None     # largest finite |parameter| of the module
    distributed: bool = False          # several processes: a gradient may come from another rank

    def __str__(self) -> str:
        m = _shown(self.module)
        if self.phase == "input":
            s = f"the input batch already held {self.kind}"
            if self.tensor:
                s += f" (input {self.tensor})"
        elif self.phase == "loss":
            s = (f"the model's forward was finite; the loss itself is {self.kind}: the loss computation "
                 "produced it")
        elif self.phase == "forward" and self.where == "output":
            s = (f"the first non-finite value ({self.kind}) appeared in the output of {m} (call {self.call} of "
                 f"the forward{self._nth()})")
            if self.bad_params:
                s += f"; its parameter{'s' * (len(self.bad_params) > 1)} {', '.join(self.bad_params)} already held NaN/Inf"
            else:
                s += ", its inputs were finite"
                if self.max_param is not None:
                    s += f" (largest |parameter| {self.max_param:.3g})"
        elif self.phase == "forward":
            where = f"the forward of {m}" if self.module else "the code around the traced modules"
            s = (f"the first non-finite value ({self.kind}) appeared in {where}, outside its submodules: the input "
                 f"of `{self.submodule}` (call {self.call} of the forward) was already non-finite")
        elif self.where == "parameter gradient":
            s = (f"forward finite and every gradient between modules finite; the parameter gradients are not "
                 f"(the first, in module order: `{self.tensor}`, produced in the backward of {m}")
            if self.distributed:
                s += " or received from another process by the gradient all-reduce"
            s += ")"
        elif self.where == "code gradient":
            s = (f"forward finite; the first non-finite gradient ({self.kind}) appeared in the backward of the code "
                 f"around the traced modules, outside its submodules: the gradient of the output of "
                 f"`{self.submodule}`")
        elif self.module == "":
            s = ("forward finite; the gradient of the model's output was already non-finite: it came from the "
                 "backward of the loss")
        elif len(self.candidates) + self.loss_too > 1:
            takers = [_shown(c) for c in self.candidates] + (["the loss"] if self.loss_too else [])
            output = ": a model output" if self.loss_too else ""
            s = (f"forward finite; the first non-finite gradient ({self.kind}) appeared in the backward of one of "
                 f"{', '.join(takers)} (each took the same tensor{output}, whose gradient is the sum of theirs)")
        else:
            s = f"forward finite; the first non-finite gradient ({self.kind}) appeared in the backward of {m}"
            others = [c for c in self.consumers if c != self.module]  # the named one need not be first
            if others:
                s += f" (the tensor also went to {', '.join(_shown(c) for c in others)})"
        if self.rows is not None:
            shown = self.rows if len(self.rows) <= 10 else self.rows[:10] + ["..."]
            s += f"; {len(self.rows)} of {self.batch_size} rows: batch rows {shown}".replace("'...'", "...")
        if self.op is not None:
            where = f" in `{self.op_module}`" if self.op_module and self.op_module != self.module else ""
            how = "from finite inputs" if self.op_inputs_finite else "an input was already non-finite"
            s += f"; first non-finite op: {self.op}{where} ({how})"
        return s

    def _nth(self) -> str:
        return f"; call {self.module_call} of this module" if self.module_call and self.module_call > 1 else ""
