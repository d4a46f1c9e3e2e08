"""2:4 inference speed-up: a model pruned 2:4 by weight magnitude, run dense (zeros kept) against
the same weights in a sparse format a real kernel runs, in one process, interleaved.

- With CUDA: the 2:4 layers go to torch.sparse.to_sparse_semi_structured (the GPU's sparse
  tensor cores, cuSPARSELt or CUTLASS), both models in fp16 or bf16. Linear layers take the
  sparse weight directly; a 1x1 convolution (groups 1, no padding) is the same matrix product
  over the channels (`MatmulConv1x1`); other convolutions stay dense (their unfolded product
  would cost more than it saves), so a ResNet's 3x3 convolutions are not accelerated.
- Without CUDA: the CPU path, CSR through suite.bench_deploy.sparsify (fp32).

Before timing, the sparse model's output is checked against the dense one's (a relative
tolerance that fits the dtype). Timing: suite.bench_deploy.interleaved, with a CUDA
synchronisation after every call so each call's time is its own.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from suite.bench_deploy import interleaved, sparsify
from suite.pruning.masks import nm_eligible, nm_keep, nm_violations

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def matmul_layer(mod: nn.Module) -> bool:
    """A Linear, or a Conv2d that is a plain matrix product over the channels (1x1 kernel,
    groups 1, no padding; any stride)."""
    if isinstance(mod, nn.Linear):
        return True
    return (
        isinstance(mod, nn.Conv2d)
        and mod.kernel_size == (1, 1)
        and mod.groups == 1
        and mod.padding in ((0, 0), 0)
        and mod.dilation == (1, 1)
    )


def _as_input_dtype(y: torch.Tensor, x: torch.Tensor, mod: nn.Module) -> torch.Tensor:
    """y row-major and in x's dtype, as a dense layer's output would be. torch's semi-structured
    products return their (rows, out) result column-major (a transposed view), and the layers
    after them then see odd strides. In an H200 profile of a 2:4 DeiT-S (before this function
    made outputs row-major) attention ran as fp32 bmm and copies, 14.7 of a 34.8 ms forward,
    where the dense model used cuDNN attention (1.0 ms): column-major q, k, v, which the fused
    kernels refuse, are the likely reason (not re-measured since). Some builds may also return
    fp32 from fp16. What the first call returned is kept in `mod.out_dtype` and
    `mod.out_contiguous`."""
    if mod.out_dtype is None:
        mod.out_dtype, mod.out_contiguous = y.dtype, y.is_contiguous()
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    return y.contiguous()


class MatmulLinear(nn.Module):
    """A Linear whose weight is anything F.linear takes (a dense tensor, or torch's
    semi-structured sparse one), its output in the input's dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.out_dtype: torch.dtype | None = None
        self.out_contiguous: bool | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _as_input_dtype(F.linear(x, self.weight, self.bias), x, self)


class MatmulConv1x1(nn.Module):
    """A 1x1 convolution as F.linear over the channels: y[n, :, i, j] = W x[n, :, i*s, j*s] + b.
    `weight` is anything F.linear takes as a (out, in) weight: a dense tensor, or torch's
    semi-structured sparse tensor. On channels_last input the permutes are free views."""

    def __init__(self, conv: nn.Conv2d, weight: torch.Tensor) -> None:
        super().__init__()
        if not matmul_layer(conv) or isinstance(conv, nn.Linear):
            raise ValueError("MatmulConv1x1 needs a 1x1 Conv2d with groups 1 and no padding")
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach(), requires_grad=False)
        self.stride = conv.stride
        self.out_dtype: torch.dtype | None = None
        self.out_contiguous: bool | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != (1, 1):
            x = x[:, :, :: self.stride[0], :: self.stride[1]]
        n, c, h, w = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(-1, c)
        y = _as_input_dtype(F.linear(rows, self.weight, self.bias), rows, self)
        return y.reshape(n, h, w, -1).permute(0, 3, 1, 2)


@torch.no_grad()
def prune_nm(model: nn.Module, names: list[str], n: int = 2, m: int = 4) -> list[str]:
    """Keep the n largest-magnitude weights of every group of m (along each output row of
    weight.reshape(out, -1)) in the named layers, in place; returns the layers pruned (those
    whose rows divide into groups of m)."""
    done = []
    for name in names:
        w = model.get_submodule(name).weight
        if nm_eligible(w.shape, m):
            w.mul_(nm_keep(w.abs(), n, m))
            done.append(name)
    return done


@torch.no_grad()
def output_vectors(net: nn.Module, x: torch.Tensor, names: list[str] | None = None) -> dict[str, int]:
    """The vectors each named layer (default: every Conv2d and Linear) puts out on input x, one
    forward pass with hooks: N*OH*OW for a convolution, every leading index for a Linear."""
    if names is None:
        names = [n for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    out: dict[str, int] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(mod: nn.Module, _args: object, y: torch.Tensor) -> None:
            out[name] = y.numel() // (y.shape[1] if isinstance(mod, nn.Conv2d) else y.shape[-1])

        return record

    hooks = [net.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        net(x)
    finally:
        for h in hooks:
            h.remove()
    return out


def weight_macs(net: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """Multiply-accumulates per image of every Conv2d and Linear layer on input x: output
    vectors per image x the weight's size (reports/flops.py's rule)."""
    return {n: v // x.shape[0] * net.get_submodule(n).weight.numel() for n, v in output_vectors(net, x).items()}


def _semi(w: torch.Tensor) -> torch.Tensor:
    from torch.sparse import to_sparse_semi_structured

    return to_sparse_semi_structured(w.contiguous())


def to_matmul_sparse(
    model: nn.Module, names: list[str], convert: Callable[[torch.Tensor], torch.Tensor] = _semi
) -> tuple[nn.Module, list[str], dict[str, str]]:
    """A copy of `model` whose named matmul layers (Linear, 1x1 Conv2d) hold `convert`(weight as
    (out, in)); returns (copy, converted layer names, {layer: why it was left dense})."""
    out = copy.deepcopy(model)
    done: list[str] = []
    left: dict[str, str] = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = out.get_submodule(parent_name) if parent_name else out
        mod = getattr(parent, child)
        if not matmul_layer(mod):
            left[name] = f"{type(mod).__name__} {tuple(mod.weight.shape)} is not a matrix product"
            continue
        w2 = mod.weight.detach().reshape(mod.weight.shape[0], -1)
        try:
            sw = convert(w2)
        except (RuntimeError, ValueError) as e:  # a shape or dtype the kernels refuse
            left[name] = f"{tuple(w2.shape)}: {str(e).splitlines()[0][:120]}"
            continue
        setattr(parent, child, MatmulLinear(sw, mod.bias) if isinstance(mod, nn.Linear) else MatmulConv1x1(mod, sw))
        done.append(name)
    return out, done, left


@dataclass
class NMTiming:
    batch: int
    dense_ms: float
    sparse_ms: float
    speedup: float  # median over rounds of dense / sparse
    speedup_q1: float
    speedup_q3: float
    dense_img_s: float
    sparse_img_s: float
    max_rel_err: float  # max |sparse - dense| / max |dense| of the checked outputs


def _close(ref: torch.Tensor, got: torch.Tensor, dtype: torch.dtype) -> float:
    if got.dtype != ref.dtype:
        raise AssertionError(f"the sparse model returns {got.dtype}, the dense one {ref.dtype}")
    err = float((ref.float() - got.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12))
    tol = {torch.float16: 2e-2, torch.bfloat16: 5e-2}.get(dtype, 1e-4)
    if not err <= tol:
        raise AssertionError(f"the sparse model's output differs from the dense one's: relative error {err:.3g}")
    return err


def _graphed(model: nn.Module, x: torch.Tensor) -> tuple[Callable[[], object], torch.Tensor]:
    """(replay, its output tensor): model(x) captured once in a CUDA graph, so that a call is
    the GPU's work alone, without the host's per-operator cost."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires
        for _ in range(2):
            model(x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = model(x)

    def run() -> object:
        graph.replay()
        torch.cuda.synchronize()
        return y

    return run, y


@torch.no_grad()
def time_pair(
    dense: nn.Module,
    sparse: nn.Module,
    x: torch.Tensor,
    repeats: int,
    inner: int,
    warmup: int,
    graphs: bool = False,
) -> NMTiming:
    """Interleaved timing of dense and sparse on x after checking their outputs agree; with
    `graphs` (CUDA), each model's call is the replay of a CUDA graph."""
    cuda = x.is_cuda

    def call(model: nn.Module) -> Callable[[], object]:
        def run() -> object:
            y = model(x)
            if cuda:
                torch.cuda.synchronize()
            return y

        return run

    if graphs and cuda:
        (fd, yd), (fs, ys) = _graphed(dense, x), _graphed(sparse, x)
        fd(), fs()
        err = _close(yd, ys, x.dtype)
    else:
        fd, fs = call(dense), call(sparse)
        err = _close(dense(x), sparse(x), x.dtype)
    d, s, (q1, med, q3) = interleaved(fd, fs, repeats, inner, warmup)
    b = x.shape[0]
    return NMTiming(b, d, s, med, q1, q3, b / (d / 1e3), b / (s / 1e3), err)


def _semi_structured_model(
    net: nn.Module, names: list[str], probe: torch.Tensor, say: Callable[[str], None], backend: str = "auto"
) -> tuple[nn.Module, list[str], dict[str, str], str]:
    """(sparse copy, converted, left dense, backend used). backend "auto": torch's default
    semi-structured backend (cuSPARSELt where torch has it), or CUTLASS when the default fails
    to convert or to run; "cutlass" or "cusparselt": that one only."""
    from torch.sparse import SparseSemiStructuredTensor

    default = SparseSemiStructuredTensor._FORCE_CUTLASS
    start = {"auto": bool(default), "cutlass": True, "cusparselt": False}[backend]
    try:
        for cutlass in (start, True) if backend == "auto" else (start,):
            SparseSemiStructuredTensor._FORCE_CUTLASS = cutlass
            used = "semi-structured, " + ("CUTLASS" if cutlass else "cuSPARSELt")
            try:
                sparse, done, left = to_matmul_sparse(net, names)
                if not done:
                    raise RuntimeError("no layer converted: " + "; ".join(list(left.values())[:3]))
                with torch.no_grad():
                    _close(net(probe), sparse(probe), probe.dtype)
                return sparse, done, left, used
            except (RuntimeError, AssertionError, NotImplementedError) as e:
                say(f"[nm] {used} failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
                if cutlass or backend != "auto":
                    raise
        raise AssertionError("unreachable")
    finally:  # the class is chosen at conversion: later conversions in this process see torch's default
        SparseSemiStructuredTensor._FORCE_CUTLASS = default


@torch.no_grad()
def layer_speedups(
    dense: nn.Module,
    sparse: nn.Module,
    names: list[str],
    x: torch.Tensor,
    repeats: int,
    inner: int,
    warmup: int,
    graphs: bool = False,
) -> list[dict[str, Any]]:
    """Per distinct (rows, out, in) matrix product of the converted layers as the model runs it on
    x (rows: the output vectors, in: the weight's row length), that product alone: the dense
    (out, in) weight against the sparse one, F.linear on a random (rows, in) input."""
    rows_of = output_vectors(dense, x, names)
    out, seen = [], set()
    for n in names:
        w = dense.get_submodule(n).weight
        key = (rows_of[n], w.shape[0], w[0].numel())
        if key in seen:
            continue
        seen.add(key)
        sw = sparse.get_submodule(n).weight
        a = torch.randn(key[0], key[2], device=x.device, dtype=x.dtype)
        w2 = w.reshape(w.shape[0], -1).contiguous()
        t = time_pair(MatmulLinear(w2), MatmulLinear(sw), a, repeats, inner, warmup, graphs)
        out.append({"layer": n, "rows": key[0], "out": key[1], "in": key[2], **asdict(t)})
    return out


def run_nm_inference(
    model: str,
    batches: tuple[int, ...] = (1, 256),
    size: int | None = None,
    dtype: str = "fp16",
    device: str = "auto",
    channels_last: bool = True,
    repeats: int = 7,
    inner: int = 3,
    warmup: int = 3,
    backend: str = "auto",
    layers: bool = False,
    graphs: bool = False,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """A registry model (random init, 1000 classes), pruned 2:4 by magnitude, dense against
    sparse at each batch size. Returns {"params", "pruned", "converted", "left_dense",
    "sparse_mac_share", "theoretical_speedup", "timings", "layers"}."""
    from suite import models

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    spec = models.get(model)
    side = size or spec.input_size
    torch.manual_seed(0)
    net = spec.build(1000, 3).eval()
    names = [n for n, _ in spec.prunable(net)]
    pruned = prune_nm(net, names)
    bad = sum(nm_violations(net.get_submodule(n).weight, 2, 4) for n in pruned)
    if bad:
        raise AssertionError(f"{bad} groups of 4 hold more than 2 non-zeros after 2:4 pruning")
    macs = weight_macs(net, torch.zeros(1, 3, side, side))
    fmt = torch.channels_last if channels_last and device == "cuda" else torch.contiguous_format
    if device == "cuda":
        dt = DTYPES[dtype]
        net = net.to(device=device, dtype=dt, memory_format=fmt)  # before the copy: the sparse model keeps it
        probe = torch.randn(2, 3, side, side).to(device=device, dtype=dt, memory_format=fmt)
        sparse, done, left, backend = _semi_structured_model(net, pruned, probe, say, backend)
    else:  # the CPU path: CSR, fp32
        dt = torch.float32
        dtype = "fp32"
        sparse = sparsify(net, pruned)
        done = [n for n in pruned if not isinstance(sparse.get_submodule(n), type(net.get_submodule(n)))]
        left = {n: "not CSR-convertible" for n in pruned if n not in done}
        backend = "CSR (CPU)"
    # the MACs a 2:4 kernel halves, over all weight-layer MACs: the speed-up if nothing else cost time
    share = sum(macs[n] for n in done) / sum(macs.values())
    theoretical = 1 / (1 - share / 2)
    out_dtypes = {m.out_dtype for m in sparse.modules() if isinstance(m, (MatmulLinear, MatmulConv1x1))}
    if out_dtypes - {None, dt}:
        say(f"[nm] the sparse products return {sorted(map(str, out_dtypes - {None}))}: cast back to {dt}")
    say(
        f"[nm] {model} {side}px {dtype} on {device}: {len(pruned)}/{len(names)} prunable layers pruned 2:4, "
        f"{len(done)} run sparse ({backend}), {len(left)} dense"
    )
    timings = []
    per_layer: list[dict[str, Any]] = []
    g = torch.Generator().manual_seed(1)
    for b in batches:
        x = torch.randn(b, 3, side, side, generator=g).to(device=device, dtype=dt, memory_format=fmt)
        t = time_pair(net, sparse, x, repeats, inner, warmup, graphs)
        say(
            f"[nm] batch {b}: dense {t.dense_ms:.2f} ms, 2:4 {t.sparse_ms:.2f} ms -> x{t.speedup:.3f} "
            f"[{t.speedup_q1:.3f}, {t.speedup_q3:.3f}]  ({t.dense_img_s:.0f} vs {t.sparse_img_s:.0f} img/s)"
        )
        timings.append(t)
        if layers and b == max(batches):
            per_layer = layer_speedups(net, sparse, done, x, repeats, inner, warmup, graphs)
            for r in per_layer:
                say(
                    f"[nm]   {r['rows']}x{r['in']} @ ({r['out']}x{r['in']})^T: dense {r['dense_ms']:.3f} ms, "
                    f"2:4 {r['sparse_ms']:.3f} ms -> x{r['speedup']:.3f}"
                )
        del x
    mm = [m for m in sparse.modules() if isinstance(m, (MatmulLinear, MatmulConv1x1))]
    seen = {str(m.out_dtype) for m in mm}
    params = {
        "model": model,
        "size": side,
        "sparse_product_dtypes": ",".join(sorted(seen)),
        # False: the products returned column-major results, made row-major before the next layer
        "sparse_products_row_major": all(m.out_contiguous for m in mm) if mm else None,
        "dtype": dtype,
        "device": device,
        "backend": backend,
        "cuda_graphs": graphs and device == "cuda",
        "channels_last": fmt is torch.channels_last,
        "repeats": repeats,
        "inner": inner,
        "warmup": warmup,
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else "",
    }
    return {
        "params": params,
        "pruned": pruned,
        "converted": done,
        "left_dense": left,
        "sparse_mac_share": share,
        "theoretical_speedup": theoretical,
        "timings": [asdict(t) for t in timings],
        "layers": per_layer,
    }
