"""Steering a method that has no sparsity knob to the requested sparsity.

STR, Continuous Sparsification and hard-concrete L0 reach a sparsity that depends on a
regularisation strength (their "knob"), not on a target. The suite calibrates the knob
online, in the same run, instead of a search over many short runs:

- a target density trajectory runs from 1 (epoch 0) to the requested density d_f at the end
  of the search phase, along Zhu & Gupta's cubic d*(e) = d_f + (1 - d_f)(1 - e / E)^3;
- after each search epoch the knob is multiplied by exp(gain * ln(d / d*(e))), limited to a
  factor `max_factor` either way: too dense -> stronger regularisation, too sparse -> weaker;
- with `lookahead` k > 0 the controller compares a prediction instead, d_pred = d (d / d_prev)^k
  (the last epoch's trend, d_prev the previous measurement) against d*(e + k): the methods'
  masks follow their knob with a lag of an epoch or more (Adam momentum on gates, a threshold
  that integrates its weight decay), and without the trend term the knob keeps pushing until
  the target is already overshot. k = 0 is the plain controller above;
- after the search phase the knob is left where it is and the method freezes its mask.
- `hold(density)` records a measurement without moving the knob: anti-windup for epochs in which
  the method's mask cannot respond (CS late in each round, where an integrating controller wound
  the knob up 30-90x and the next round collapsed, measured).

The sparsity the run reaches is measured by the suite's one ruler, logged and reported as
reached; the controller only makes reaching the target likely. `calibration.mode: off`
uses the configured knob unchanged (for a manual search, or to reproduce a paper's value).

The last step of the search is a snap (`calibration.snap_pp`, 0: off): when the knob has left
the run within `snap_pp` percentage points of the target, one scalar of the method's own
decision rule (L0: a shift of every log_alpha; STR: one factor on every layer's threshold; CS:
the cut on s that binarises the mask) is set by bisection so that the ruler reads the target.
The method's own scores still decide which weights survive and how the layers share the budget.
For CS and Hyperflux only the cut moves; L0's shift also changes the value of every surviving
gate (z = clamp(1.2 sigmoid(log_alpha - x) - 0.1)) and STR's factor the shrinkage of every
surviving weight, which the epochs after the snap train with. Logged: where the knob left the run
(`knob_sparsity`), the gap to the target (`snap_gap_pp`) and the move made (`snap_pp`), so the
report can say how far the knob got. A run further away than `snap_pp` is not moved (the report
lists it as missed); a rule that cannot reach the target (ties) moves to the closest density it
can. STR's sparsity can still creep up after its freeze (weights shrinking under the frozen
threshold), so its final sparsity is measured, not assumed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field

from suite.schema import Strict

if TYPE_CHECKING:
    from suite.config import RunConfig


class CalibrationConfig(Strict):
    """How a method without a sparsity knob is steered to the requested sparsity.

    controller: after each search epoch, knob *= exp(gain * ln(density / target(epoch))) (with the trend term of `lookahead`, see suite/pruning/calibration.py), where
    target(epoch) follows Zhu & Gupta's cubic from 100 % to the requested density at the end
    of the search phase; the knob then stays where it is. off: the knob is used as given."""

    mode: Literal["controller", "off"] = "controller"
    gain: float = Field(default=1.0, gt=0, le=100, description="log-space gain of the controller")
    max_factor: float = Field(default=2.0, gt=1, le=1e6, description="largest change of the knob in one epoch")
    lookahead: float = Field(
        default=1.0,
        ge=0,
        le=10,
        description="k: compare the trend prediction d (d / d_prev)^k "
        "with target(epoch + k) (0: the measured density with target(epoch))",
    )
    snap_pp: float = Field(
        default=10.0,
        ge=0,
        le=100,
        description="end of the search: when the knob left the sparsity "
        "within this many points of the target, one global scalar of the method's own mask rule "
        "is moved so the target is met exactly (the size of the move is logged as snap_pp; "
        "0: off)",
    )

    def snap_limit(self) -> float:
        """The snap's reach: snap_pp while the controller steers the knob; none with mode off (the
        configured knob is used as given, as a paper would)."""
        return self.snap_pp if self.mode == "controller" else 0.0


class _OrUnknown(dict[str, str]):
    def __missing__(self, key: str) -> str:  # a run logged before the param existed
        return "?"


class Calibrated:
    """What the calibrated family (L0, STR, CS) shares on the config side: a `mode` (calibrated, or
    the reference code's recipe as the variant <name>-ref), a search phase that must fit in the run,
    and the report's sentence on how the sparsity was reached. Mixed into their Pruner classes,
    which set `section` and `reference_recipe` (a template filled from the section's params)."""

    name: ClassVar[str]
    section: ClassVar[str]
    summary: ClassVar[str]
    reference_recipe: ClassVar[str] = ""

    @classmethod
    def search_epochs(cls, run: RunConfig) -> int:
        """Epochs of the search phase as configured (the check below)."""
        end: int = getattr(run, cls.section).search_end or 1
        return end

    @classmethod
    def check(cls, run: RunConfig) -> None:
        end = cls.search_epochs(run)
        if end > run.epochs:
            raise ValueError(f"{cls.name}: the search phase ({end} epochs) must fit in epochs ({run.epochs})")

    @classmethod
    def scale(cls, f: dict[str, Any], k: float, full: int) -> None:
        sec = f.get(cls.section)
        if k != 1.0 and isinstance(sec, dict) and sec.get("search_end") is not None:
            sec["search_end"] = min(
                max(1, round(sec["search_end"] * k))
                if isinstance(sec["search_end"], int) and not isinstance(sec["search_end"], bool)
                else sec["search_end"],
                f["epochs"],
            )

    @classmethod
    def hash_options(cls, d: dict[str, Any], run: RunConfig) -> None:
        if d.get("mode") == "calibrated":
            d.pop("mode")  # added later: calibrated runs keep their hashes

    @classmethod
    def variant(cls, run: RunConfig) -> str:
        return f"{cls.name}-ref" if getattr(run, cls.section).mode == "reference" else cls.name

    @classmethod
    def recipe(cls, params: dict[str, str], variant: str) -> str:
        how, sec = cls.summary, cls.section
        if params.get(f"{sec}.mode") == "reference":
            own = {k.split(".")[-1]: v for k, v in params.items() if k.startswith(sec + ".")}
            return (
                how
                + "; reference mode: "
                + cls.reference_recipe.format_map(_OrUnknown(own))
                + "; the sparsity is what the fixed knob gave (no steering, no snap)"
            )
        snap = params.get(f"{sec}.calibration.snap_pp")
        return how + (
            "; calibrated mode: knob steered online along a cubic density path, then the end-of-search "
            f"snap (at most {snap} pp) — not the paper's fixed knob"
        )


def cubic_target_density(epoch: float, end: int, final_density: float) -> float:
    """d*(epoch): 1 at epoch 0, `final_density` from epoch `end` on (cubic in between)."""
    frac = min(1.0, max(0.0, epoch / max(1, end)))
    return final_density + (1.0 - final_density) * (1.0 - frac) ** 3


class KnobController:
    def __init__(
        self,
        knob: float,
        final_density: float,
        search_end: int,
        mode: str = "controller",
        gain: float = 2.0,
        max_factor: float = 4.0,
        lookahead: float = 0.0,
    ) -> None:
        if knob <= 0:
            raise ValueError(f"the calibrated knob must be > 0, got {knob}")
        self.knob = float(knob)
        self.final_density = final_density
        self.search_end = search_end
        self.mode = mode
        self.gain = gain
        self.max_factor = max_factor
        self.lookahead = lookahead
        self.prev_density: float | None = None

    def target(self, epoch: float) -> float:
        return cubic_target_density(epoch, self.search_end, self.final_density)

    def update(self, epoch: int, density: float) -> float:
        """The knob for the next epoch, given the density measured after `epoch`."""
        if self.mode == "controller" and epoch < self.search_end:
            d, k = max(density, 1e-9), self.lookahead
            err = math.log(d / self.target(epoch))
            if k > 0 and self.prev_density is not None:
                err = math.log(d / self.target(epoch + k)) + k * math.log(d / max(self.prev_density, 1e-9))
            step = max(-math.log(self.max_factor), min(math.log(self.max_factor), self.gain * err))
            self.knob *= math.exp(step)
        self.prev_density = density
        return self.knob

    def hold(self, density: float) -> float:
        """Record the measurement but leave the knob where it is: for epochs in which the method's
        mask cannot respond to the knob (anti-windup; e.g. CS late in a round)."""
        self.prev_density = density
        return self.knob

    def metrics(self, epoch: int) -> dict[str, float]:
        return {"knob": self.knob, "target_density": self.target(epoch)}

    def state_dict(self) -> dict[str, float | None]:
        return {"knob": self.knob, "prev_density": self.prev_density}

    def load_state_dict(self, st: Mapping[str, Any]) -> None:
        self.knob = st["knob"]
        self.prev_density = st.get("prev_density")


def bisect_density(
    apply: Callable[[float], None], measure: Callable[[], float], target: float, lo: float, hi: float, iters: int = 60
) -> tuple[float, float]:
    """The x in [lo, hi] whose density, after apply(x), is closest to `target`, for a rule whose
    density does not increase with x (a threshold). Returns (x, density) and leaves apply(x) in
    force. Bisection measures the real density each time, so it holds for any rule and for ties
    (the closest reachable density is kept)."""
    best: tuple[float, float] | None = None
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        apply(mid)
        d = measure()
        if best is None or abs(d - target) < abs(best[1] - target):
            best = (mid, d)
        if d > target:
            lo = mid
        elif d < target:
            hi = mid
        else:
            break
    assert best is not None
    apply(best[0])
    return best


def snap_to(
    target_density: float,
    max_pp: float,
    density_now: float,
    apply: Callable[[float], None],
    measure: Callable[[], float],
    lo: float,
    hi: float,
) -> dict[str, float]:
    """The end-of-search snap: when the knob left the density within `max_pp` points of the
    target (and max_pp > 0), move the rule's scalar so the ruler reads the target. Returns the
    metrics to log: knob_sparsity (before), snap_pp (the move, in sparsity points; 0 when not
    moved)."""
    out = {
        "knob_sparsity": 1.0 - density_now,
        "snap_pp": 0.0,
        "snap_gap_pp": 100.0 * (density_now - target_density),
    }  # what was left to close, moved or not
    gap_pp = 100.0 * abs(density_now - target_density)
    if max_pp <= 0 or gap_pp > max_pp + 1e-9 or gap_pp == 0.0:  # 1e-9: a gap of exactly max_pp is closed
        return out
    _, d = bisect_density(apply, measure, target_density, lo, hi)
    out["snap_pp"] = 100.0 * (density_now - d)
    return out
