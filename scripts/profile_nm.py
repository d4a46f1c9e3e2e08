"""Where a 2:4 model's forward spends its time on a GPU: PyTorch's profiler over one forward of
DeiT-S (or --model), pruned 2:4 and converted as `hfbench bench nm` does, at --batch; prints the
operators by host time and by GPU time, for the dense model and then the 2:4 one. CUDA only.

    python scripts/profile_nm.py [--model deit_small] [--batch 256]
"""

from __future__ import annotations

import argparse

import torch

from suite import models
from suite.bench_nm import prune_nm, to_matmul_sparse


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="deit_small")
    p.add_argument("--batch", type=int, default=256)
    a = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_nm: needs a CUDA device")
    spec = models.get(a.model)
    torch.manual_seed(0)
    net = spec.build(1000, 3).eval()
    names = prune_nm(net, [n for n, _ in spec.prunable(net)])
    net = net.cuda().half()
    sparse, _, _ = to_matmul_sparse(net, names)
    x = torch.randn(a.batch, 3, spec.input_size, spec.input_size, device="cuda", dtype=torch.half)
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    for label, model in (("dense", net), ("2:4", sparse)):
        with torch.no_grad():
            for _ in range(3):
                y = model(x)
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=acts) as prof:
                model(x)
                torch.cuda.synchronize()
        print(f"== {label} {a.model} batch {a.batch}: output {y.dtype}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=10))


if __name__ == "__main__":
    main()
