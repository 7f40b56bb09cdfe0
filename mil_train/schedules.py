"""Loss-weight schedules: a loss term's weight as a function of the optimizer step.

The Trainer weighs each loss term by name (`Trainer(loss_weights={"kl": ...})`); a weight is either a
number or a `LossWeightSchedule`, so an auxiliary term such as ProbSmoothABMIL's "kl" can be annealed
in, the way torchmil's Trainer takes an `annealing_scheduler_dict`. On the command line:

    mil-train ProbSmoothABMIL bags/ -o m.pt --loss-weight kl=linear:0:1:10     # 0 -> 1 over 10 steps
    mil-train ... --loss-weight kl=cyclical:0:1:100:0.5:20                    # min:max:cycle[:rise[:warmup]]
    mil-train ... --loss-weight kl=0.3                                        # a constant, as before

The unit is one optimizer step (one training batch), as in torchmil; the weight at step s is the one
torchmil's scheduler holds after s calls of `step()`. The same weight scores the validation loss of
the epoch, so a scheduled term moves `val_loss` as it moves the training loss. One difference: a
linear schedule holds its end value after `steps` (torchmil's keeps climbing past it).

A schedule is a pure function of the step, with no state of its own, so a resumed run gets the same
weights from the step count alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

KINDS = ("constant", "linear", "cyclical")


@dataclass(frozen=True)
class LossWeightSchedule:
    """The weight of one loss term at each optimizer step.

    kind "constant": `start` at every step.
    kind "linear": from `start` at step 0 to `end` at step `steps`, then `end`.
    kind "cyclical": `warmup` steps at `start`; then cycles of `steps`, each rising linearly from `start`
        to `end` over the first `rise` share of the cycle and holding `end` for the rest.
    """

    kind: str
    start: float
    end: float = 0.0
    steps: int = 1
    rise: float = 0.5
    warmup: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"schedule kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        for name in ("start", "end", "rise"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if self.steps < 1 or self.warmup < 0:
            raise ValueError(f"steps must be >= 1 and warmup >= 0, got {self.steps} and {self.warmup}")
        if self.kind == "cyclical" and not 0 < self.rise <= 1:
            raise ValueError(f"rise must be in (0, 1], got {self.rise}")

    def weight(self, step: int) -> float:
        """The weight after `step` optimizer steps (step 0: before the first one)."""
        if self.kind == "constant":
            return self.start
        if self.kind == "linear":
            return self.start + min(step, self.steps) * (self.end - self.start) / self.steps
        return self._cyclical(step)

    def _cyclical(self, step: int) -> float:
        if step <= self.warmup:
            return self.start
        rise_steps = int(self.steps * self.rise)  # torchmil truncates the rising part the same way
        position = (step - self.warmup - 1) % self.steps  # 0 at the first step of each cycle
        if position < rise_steps:
            return self.start + position * (self.end - self.start) / rise_steps
        return self.end

    def describe(self) -> str:
        """The command-line form, e.g. "linear:0:1:10" (what the checkpoint's provenance records)."""
        if self.kind == "constant":
            return f"{self.start:g}"
        if self.kind == "linear":
            return f"linear:{self.start:g}:{self.end:g}:{self.steps}"
        return f"cyclical:{self.start:g}:{self.end:g}:{self.steps}:{self.rise:g}:{self.warmup}"


def parse_schedule(text: str) -> LossWeightSchedule:
    """"0.3", "linear:START:END:STEPS" or "cyclical:MIN:MAX:CYCLE[:RISE[:WARMUP]]"; ValueError otherwise."""
    kind, _, rest = text.strip().partition(":")
    if not rest:
        return LossWeightSchedule("constant", _number(kind, text))
    fields = rest.split(":")
    if kind == "linear" and len(fields) == 3:
        return LossWeightSchedule("linear", _number(fields[0], text), _number(fields[1], text), _count(fields[2], text))
    if kind == "cyclical" and 3 <= len(fields) <= 5:
        rise = _number(fields[3], text) if len(fields) > 3 else 0.5
        warmup = _count(fields[4], text) if len(fields) > 4 else 0
        return LossWeightSchedule("cyclical", _number(fields[0], text), _number(fields[1], text),
                                  _count(fields[2], text), rise, warmup)
    raise ValueError(f"{text!r} is not a weight: write a number (0.3), linear:START:END:STEPS "
                     "or cyclical:MIN:MAX:CYCLE[:RISE[:WARMUP]]")


def _number(field: str, text: str) -> float:
    try:
        return float(field)
    except ValueError:
        raise ValueError(f"{text!r}: {field!r} is not a number") from None


def _count(field: str, text: str) -> int:
    try:
        return int(field)
    except ValueError:
        raise ValueError(f"{text!r}: {field!r} is not a whole number of steps") from None


def weight_at(weight: float | LossWeightSchedule, step: int) -> float:
    """A term's weight at `step`, whether it is a number or a schedule."""
    return weight.weight(step) if isinstance(weight, LossWeightSchedule) else float(weight)
