"""GPU-hours of each paper recipe: the images every run of the sweep trains on (exact, from the
expanded config: epochs x training images, evaluation not counted) divided by a measured
training throughput in images/s per GPU.

    python scripts/gpu_hours.py                                  # image-epochs only
    python scripts/gpu_hours.py --img-per-s resnet50=2400 --img-per-s cifar_resnet50=9000

Throughput: `scripts/gpu_bench.sh` (or `hfbench bench overhead --device cuda --dtype bf16
--channels-last --size 224 --batch 128`) prints img/s of dense training per GPU and each method's
step-time ratio; a method's hours are its images / (dense img/s / its ratio). Without
--step-ratio the dense rate is used for every method (a lower bound).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TRAIN_IMAGES = {"cifar10": 45_000, "cifar100": 45_000, "imagenet": 1_281_167}  # after the val hold-out


def _pairs(items: list[str], what: str) -> dict[str, float]:
    out = {}
    for it in items or []:
        k, sep, v = it.partition("=")
        try:
            out[k.strip()] = float(v)
        except ValueError:
            sep = ""
        if not sep or out.get(k.strip(), 0) <= 0:
            raise SystemExit(f"gpu_hours: {what} expects NAME=POSITIVE_NUMBER, got {it!r}")
    return out


def main(argv: list[str] | None = None) -> int:
    from suite.sweeps import load_sweep

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("configs", nargs="*", help="sweep configs (default: configs/paper/*.yaml)")
    ap.add_argument("--img-per-s", action="append", metavar="MODEL=N", help="dense training img/s per GPU")
    ap.add_argument("--step-ratio", action="append", metavar="METHOD=R", help="step-time ratio to dense")
    a = ap.parse_args(argv)
    rate, ratio = _pairs(a.img_per_s, "--img-per-s"), _pairs(a.step_ratio, "--step-ratio")
    paths = [Path(p) for p in a.configs] or sorted((ROOT / "configs" / "paper").glob("*.yaml"))
    print("| recipe | runs | epochs (all runs) | images trained | GPU-hours |")
    print("|---|---:|---:|---:|---:|")
    for p in paths:
        runs = load_sweep(p).expand()
        images: dict[str, float] = defaultdict(float)
        for r in runs:
            images[r.method] += r.epochs * TRAIN_IMAGES.get(r.dataset, 0)
        model = runs[0].model
        hours = "-"
        if model in rate:
            hours = f"{sum(n * ratio.get(m, 1.0) for m, n in images.items()) / rate[model] / 3600:,.0f}"
        print(
            f"| {p.stem} | {len(runs)} | {sum(r.epochs for r in runs):,} | {sum(images.values()) / 1e6:,.0f} M "
            f"| {hours} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
