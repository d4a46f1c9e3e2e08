"""What a pruned network saves at inference, measured: `hfbench bench deploy`.

A pruned run's final weights (final_weights.pt, masks baked in) are run two ways in one
process, interleaved: the dense PyTorch model holding the zeros, and the same weights in a
sparse format that PyTorch's own kernels run:
- a Linear layer as a CSR matrix times the input (torch.sparse.mm);
- a Conv2d layer (groups 1) as a CSR matrix times the unfolded input (F.unfold, im2col), the
  weight seen as W.reshape(out, in * kh * kw);
- the GPU's 2:4 kernels (torch.sparse.to_sparse_semi_structured) are suite/bench_nm.py's.
Every sparse model's output is checked against the dense one's before it is timed.

Timing: per batch size, dense and sparse calls alternate (dense, sparse, dense, ...) for
`repeats` rounds of `inner` calls each after `warmup` untimed calls, so drift hits both
alike; the speed-up of a round is dense time / sparse time and the result is the median over
rounds with its interquartile range. Memory: the bytes of the prunable weights, dense
(numel x 4) against CSR (values, column indices and row pointers).

`break_even` times one layer shape alone, dense against CSR, at a ladder of sparsities
(random masks), and gives the lowest sparsity from which CSR is faster on this machine.
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from suite.bench import quartiles


def _csr(w: torch.Tensor) -> torch.Tensor:
    """W.reshape(out, -1) as a CSR tensor (without torch's "CSR support is in beta" warning)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return w.detach().reshape(w.shape[0], -1).to_sparse_csr()


class CSRLinear(nn.Module):
    """y = x W^T + b with W held as a CSR matrix."""

    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        self.weight = _csr(lin.weight)
        self.bias = None if lin.bias is None else lin.bias.detach()
        self.out_features = lin.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        y = torch.sparse.mm(self.weight, flat.t()).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def csr_convertible(mod: nn.Module) -> bool:
    """A Linear, or a Conv2d that unfold can stand in for: groups 1, numeric zero padding."""
    if isinstance(mod, nn.Linear):
        return True
    return (
        isinstance(mod, nn.Conv2d)
        and mod.groups == 1
        and not isinstance(mod.padding, str)
        and mod.padding_mode == "zeros"
    )


class CSRConv2d(nn.Module):
    """A convolution (groups 1) as CSR W.reshape(out, -1) times the unfolded input."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if not csr_convertible(conv):
            raise ValueError("CSRConv2d needs groups 1 and numeric zero padding")
        self.weight = _csr(conv.weight)
        self.bias = None if conv.bias is None else conv.bias.detach()
        self.out_channels, self.kernel_size = conv.out_channels, conv.kernel_size
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        kh, kw = self.kernel_size
        oh = (h + 2 * self.padding[0] - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        ow = (w + 2 * self.padding[1] - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        cols = F.unfold(x, self.kernel_size, dilation=self.dilation, padding=self.padding, stride=self.stride)
        cols = cols.transpose(0, 1).reshape(cols.shape[1], -1)  # (in*kh*kw, b*oh*ow)
        y = torch.sparse.mm(self.weight, cols).reshape(self.out_channels, b, oh * ow).transpose(0, 1)
        if self.bias is not None:
            y = y + self.bias[None, :, None]
        return y.reshape(b, self.out_channels, oh, ow)


def csr_bytes(w: torch.Tensor) -> int:
    """Bytes of W.reshape(out, -1) in CSR: values, column indices, row pointers."""
    m = _csr(w)
    return sum(t.numel() * t.element_size() for t in (m.values(), m.col_indices(), m.crow_indices()))


def sparsify(model: nn.Module, layer_names: list[str]) -> nn.Module:
    """A copy of `model` whose named Linear / Conv2d layers run in CSR."""
    out = copy.deepcopy(model)
    for name in layer_names:
        parent_name, _, child = name.rpartition(".")
        parent = out.get_submodule(parent_name) if parent_name else out
        mod = getattr(parent, child)
        if isinstance(mod, nn.Linear):
            setattr(parent, child, CSRLinear(mod))
        elif csr_convertible(mod):  # other layers stay dense
            setattr(parent, child, CSRConv2d(mod))
    return out


@dataclass
class Timing:
    batch: int
    dense_ms: float
    sparse_ms: float
    speedup: float  # median over rounds of dense / sparse
    speedup_q1: float
    speedup_q3: float
    rounds: list[float] = field(default_factory=list)


def interleaved(
    a: Callable[[], object], b: Callable[[], object], repeats: int, inner: int, warmup: int
) -> tuple[float, float, tuple[float, float, float]]:
    """(median ms per call of a, of b, quartiles of the per-round ratio a / b), a and b
    alternating in blocks of `inner` calls."""
    for _ in range(warmup):
        a()
        b()
    ta, tb, ratios = [], [], []
    for _ in range(repeats):
        times = []
        for fn in (a, b):
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times.append((time.perf_counter() - t0) / inner * 1e3)
        ta.append(times[0])
        tb.append(times[1])
        ratios.append(times[0] / times[1])
    return statistics.median(ta), statistics.median(tb), quartiles(ratios)


@torch.no_grad()
def time_models(
    dense: nn.Module, sparse: nn.Module, input_shape: tuple[int, ...], batch: int, repeats: int, inner: int, warmup: int
) -> Timing:
    """Dense against sparse on one random batch, after checking they compute the same thing."""
    dense.eval()
    sparse.eval()
    x = torch.randn(batch, *input_shape)
    ref, got = dense(x), sparse(x)
    if not torch.allclose(ref, got, rtol=1e-4, atol=1e-4):
        raise AssertionError(
            f"the sparse model's output differs from the dense one's by {float((ref - got).abs().max()):.3g}"
        )
    d, s, (q1, med, q3) = interleaved(lambda: dense(x), lambda: sparse(x), repeats, inner, warmup)
    return Timing(batch, d, s, med, q1, q3)


@torch.no_grad()
def break_even(
    layer: nn.Module,
    in_shape: tuple[int, ...],
    batch: int,
    sparsities: tuple[float, ...] = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99),
    repeats: int = 5,
    inner: int = 3,
) -> tuple[float | None, list[tuple[float, float]]]:
    """For one layer (a Linear, or a Conv2d with groups 1; its shape, stride and padding are
    kept, its weights replaced by random ones) on inputs of `in_shape` (without the batch):
    (lowest sparsity of the ladder from which CSR is faster than dense, [(sparsity, speed-up)])."""
    g = torch.Generator().manual_seed(0)
    layer = copy.deepcopy(layer).eval()
    x = torch.randn(batch, *in_shape, generator=g)
    w0 = torch.randn(layer.weight.shape, generator=g)
    curve = []
    for s in sparsities:
        layer.weight.copy_(w0 * (torch.rand(w0.shape, generator=g) >= s))
        sp = CSRLinear(layer) if isinstance(layer, nn.Linear) else CSRConv2d(layer)  # type: ignore[arg-type]
        _, _, (_, ratio, _) = interleaved(lambda: layer(x), lambda sp=sp: sp(x), repeats, inner, 1)
        curve.append((s, ratio))
    return first_win(curve), curve


def first_win(curve: list[tuple[float, float]]) -> float | None:
    """The lowest sparsity of a (sparsity, speed-up) ladder from which every higher one is
    faster than dense (speed-up > 1); None when even the sparsest point does not win."""
    out = None
    for s, r in sorted(curve, reverse=True):
        if r <= 1.0:
            break
        out = s
    return out


@dataclass
class DeployRow:
    run_id: str
    name: str
    method: str
    model: str
    sparsity: float  # achieved, over the prunable layers
    theoretical: float | None  # dense MACs / remaining MACs (the report's speed-up)
    dense_mb: float  # prunable weights, dense fp32
    csr_mb: float  # the same in CSR
    timings: list[Timing]


def _input_sizes(net: nn.Module, names: list[str], input_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """The input shape (without the batch) that each named layer sees, from one forward pass."""
    seen: dict[str, tuple[int, ...]] = {}

    def hook(name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
        def record(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:  # None: the input stays as it is
            seen.setdefault(name, tuple(args[0].shape[1:]))

        return record

    hooks = [net.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            net.eval()(torch.zeros(1, *input_shape))
    finally:
        for h in hooks:
            h.remove()
    return seen


def deploy_run(
    net: nn.Module,
    names: list[str],
    input_shape: tuple[int, ...],
    batches: tuple[int, ...],
    repeats: int,
    inner: int,
    warmup: int,
) -> tuple[float, float, float, list[Timing]]:
    """(achieved sparsity of the named layers, dense MB, CSR MB, timings per batch) of one
    pruned model (its weights loaded, zeros in place)."""
    weights = [net.get_submodule(n).weight.detach() for n in names]
    numel = sum(w.numel() for w in weights)
    zeros = sum(int((w == 0).sum()) for w in weights)
    dense_mb = sum(w.numel() * w.element_size() for w in weights) / 1e6
    csr_mb = sum(csr_bytes(w) for w in weights) / 1e6
    sparse = sparsify(net, names)
    timings = [time_models(net, sparse, input_shape, b, repeats, inner, warmup) for b in batches]
    return zeros / max(numel, 1), dense_mb, csr_mb, timings


def layer_break_even(
    net: nn.Module, names: list[str], input_shape: tuple[int, ...], batch: int, repeats: int = 5, inner: int = 3
) -> list[tuple[str, str, float | None, list[tuple[float, float]]]]:
    """(layer, shape text, break-even sparsity, curve) for each distinct prunable layer shape."""
    sizes = _input_sizes(net, names, input_shape)
    out, done = [], set()
    for n in names:
        mod = net.get_submodule(n)
        if not csr_convertible(mod):
            continue
        key = (repr(mod), sizes[n])  # the layer's shape and options, and its input's
        if key in done:
            continue
        done.add(key)
        first, curve = break_even(mod, sizes[n], batch, repeats=repeats, inner=inner)
        text = "x".join(map(str, mod.weight.shape))
        if isinstance(mod, nn.Conv2d):
            text += f" stride {mod.stride[0]} on {sizes[n][1]}x{sizes[n][2]}"
        out.append((n, text, first, curve))
    return out
