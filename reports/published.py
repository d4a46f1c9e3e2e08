"""Published numbers next to the suite's own, from reports/published.csv.

reports/published.csv is a copy of the facts in the shared reference table (one row per
published point: dataset, model, method, sparsity, top-1 %, the paper's dense top-1 %, its
training budget, and the source). A suite result is matched to a published row when

* the dataset maps (DATASETS), the model maps (MODELS) and the suite variant maps to the
  published method (`methods()`: each registered method's `published`, explicit, one suite
  variant to the published names it reproduces);
* the run's target sparsity is within SPARSITY_TOL of the published sparsity (published
  sparsities such as STR's 81.27 % are achieved values, not round targets), and that published
  row is the nearest one of its method: a target halfway between two published points (96.5 %
  between 95 and 98) matches neither;
* the run starts where the published method starts (START, read from reports/published_start.csv:
  from scratch, or from a trained network for the methods that fine-tune one); a run that starts
  elsewhere is not comparable
  (IMP rewinding to pretrained weights is not Frankle et al.'s ticket from scratch).

Only matches are shown; unmatched published rows and suite rows without a published
counterpart are left out (the report says when nothing matches).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

PUBLISHED_CSV = Path(__file__).with_name("published.csv")
START_CSV = Path(__file__).with_name("published_start.csv")
SPARSITY_TOL = 0.02


def methods() -> dict[str, tuple[str, ...]]:
    """Suite variant -> the published method names it is compared with: each registered method's
    `published` (explicit, one variant to the published names it reproduces), read from the
    registry when called, so that methods registered by plugins are included."""
    from suite.pruning import registry

    out: dict[str, tuple[str, ...]] = {}
    for name in registry.names():
        out.update(registry.get(name).published)
    return out


def unmatched() -> dict[str, str]:
    """Method -> why its own runs are deliberately not matched with a published row (its
    `published_note`; the report lists them apart)."""
    from suite.pruning import registry

    return {name: registry.get(name).published_note for name in registry.names() if registry.get(name).published_note}


def _load_start(path: Path) -> dict[str, str]:
    with Path(path).open(newline="", encoding="utf-8") as fh:
        return {row["method"]: row["start"] for row in csv.DictReader(fh)}


# where each published method starts: "scratch" (a random initialisation) or "trained" (it prunes
# a trained network and fine-tunes it); a suite run is compared only with rows of its own start.
# Keyed by published method name (reports/published_start.csv), not by suite method.
START: dict[str, str] = _load_start(START_CSV)

# suite model name -> published model name
MODELS: dict[str, str] = {
    "resnet50": "resnet50",
    "timm_resnet50": "resnet50",
    "deit_tiny": "deit_tiny",
    "deit_small": "deit_small",
    "vit_b16": "vit_b16",
}
# suite dataset name -> published dataset name
DATASETS: dict[str, str] = {
    "imagenet": "imagenet",
    "imagenet1k": "imagenet",
    "imagenet-1k": "imagenet",
    "cifar10": "cifar10",
    "cifar100": "cifar100",
    "cifar10_full": "cifar10",
    "cifar100_full": "cifar100",
}  # all 50k train images


@dataclass(frozen=True)
class Published:
    dataset: str
    model: str
    method: str
    sparsity: float
    top1: float  # percent
    dense_top1: float | None  # percent
    training: str
    source: str


def load(path: Path = PUBLISHED_CSV) -> list[Published]:
    out = []
    with Path(path).open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            out.append(
                Published(
                    row["dataset"],
                    row["model"],
                    row["method"],
                    float(row["sparsity"]),
                    float(row["top1"]),
                    float(row["dense_top1"]) if row["dense_top1"] else None,
                    row["training"],
                    row["source"],
                )
            )
    return out


def start_of(init: str | None) -> str | None:
    """A run's `init` as a published start: scratch -> "scratch", dense/pretrained -> "trained"."""
    return None if init is None else "scratch" if init == "scratch" else "trained"


def matches(
    dataset: str, model: str, method: str, target: float | None, table: list[Published], init: str | None = None
) -> list[Published]:
    """Published rows comparable with a suite result (see the module docstring). `init` is the
    runs' start (None: not known, the start is not checked)."""
    ds, mo, names = DATASETS.get(dataset), MODELS.get(model), methods().get(method, ())
    if ds is None or mo is None or not names or target is None:
        return []
    start = start_of(init)
    out = []
    for name in names:
        if start is not None and START.get(name, start) != start:
            continue
        near = [
            p
            for p in table
            if p.dataset == ds and p.model == mo and p.method == name and abs(p.sparsity - target) <= SPARSITY_TOL
        ]
        if not near:
            continue
        d = min(abs(p.sparsity - target) for p in near)
        best = [p for p in near if abs(abs(p.sparsity - target) - d) < 1e-9]
        if len({p.sparsity for p in best}) == 1:  # a tie between two published points: neither
            out += best
    return out


def mapping_note() -> str:
    m = "; ".join(f"{k} ↔ {'/'.join(v)}" for k, v in methods().items())
    return (
        f"Published numbers (labelled published) come from reports/published.csv with their sources. "
        f"Matched on dataset, model, method ({m}) and target sparsity within "
        f"{100 * SPARSITY_TOL:g} pp of the published sparsity (the nearest published point; none on a "
        f"tie), and on the start: a run from scratch only with methods published from scratch, a run "
        f"from trained weights only with methods that fine-tune. Published training budgets differ "
        f"(column training); compare with care."
    )


def unmatched_note(labels) -> str:
    """Why these suite variants are never shown beside a published row (empty if none is here)."""
    notes = unmatched()
    why = [f"{m}: {notes[m]}" for m in sorted(set(labels)) if m in notes]
    return (" Not compared, by design: " + "; ".join(why) + ".") if why else ""
