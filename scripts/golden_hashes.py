"""Write tests/golden_hashes.json: the run hash of every run of every committed config, and of
each method's default run. tests/test_config.py compares against it, so a change that alters
run identity (and would make every finished run train again) cannot pass unnoticed.

    python scripts/golden_hashes.py          # print what changed against the file
    python scripts/golden_hashes.py --write  # accept the new hashes (say why in the commit)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden_hashes.json"


def current() -> dict[str, dict[str, str]]:
    sys.path.insert(0, str(ROOT))
    from suite.config import RunConfig
    from suite.pruning import registry
    from suite.sweeps import load_sweep

    out: dict[str, dict[str, str]] = {"defaults": {}}
    for m in registry.names():
        cfg = RunConfig(method=m, sparsity=0.0 if m == "dense" else 0.9, seed=0)
        out["defaults"][cfg.run_name()] = cfg.run_hash()
    for f in sorted((ROOT / "configs").rglob("*.yaml")):
        runs = load_sweep(str(f)).expand()
        out[str(f.relative_to(ROOT))] = {r.run_name(): r.run_hash() for r in runs}
    return out


def diff(old: dict, new: dict) -> list[str]:
    lines = []
    for group in sorted(set(old) | set(new)):
        a, b = old.get(group, {}), new.get(group, {})
        for name in sorted(set(a) | set(b)):
            if a.get(name) != b.get(name):
                lines.append(f"{group}: {name}: {a.get(name, '(absent)')} -> {b.get(name, '(absent)')}")
    return lines


if __name__ == "__main__":
    new = current()
    if "--write" in sys.argv:
        GOLDEN.write_text(json.dumps(new, indent=1, sort_keys=True) + "\n")
        print(f"wrote {GOLDEN} ({sum(len(v) for v in new.values())} runs)")
    else:
        old = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}
        changed = diff(old, new)
        print("\n".join(changed) or "no run hash changed")
        sys.exit(1 if changed else 0)
