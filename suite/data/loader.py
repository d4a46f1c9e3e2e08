"""Reading FFCV ``.beton`` files in batches: :class:`BetonLoader` (the FFCV-backed loader every
dataset uses; RGB datasets give it their own pipelines, suite/images.py) and :func:`make_loader`
(Fashion-MNIST's: float32 ``(B, 1, 28, 28)`` normalised with the train mean/std, int64 ``(B,)``).
"""

from __future__ import annotations

import math
import os
import queue
import threading
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from suite.data.files import FASHION_MNIST_MEAN, FASHION_MNIST_STD, DataError, _import_ffcv, _keep_torch_threads

# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------

_FFCV_CLASSES: dict[str, Any] = {}
# float32((v / 255 - mean) / std) for every uint8 value v (computed in float64)
_NORMALISE_LUT = ((np.arange(256) / 255.0 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD).astype(np.float32)
# ffcv.types.HeaderType (format version 2), copied so that reading a header is import-free
_HEADER_TYPE = np.dtype(
    [
        ("version", "<u2"),
        ("num_fields", "<u2"),
        ("page_size", "<u4"),
        ("num_samples", "<u8"),
        ("alloc_table_ptr", "<u8"),
    ],
    align=True,
)


def _ffcv_classes() -> dict[str, Any]:
    """Build (once) the Loader/EpochIterator subclasses; imports FFCV."""
    if _FFCV_CLASSES:
        return _FFCV_CLASSES
    _import_ffcv()
    from ffcv.loader import Loader
    from ffcv.loader.epoch_iterator import EpochIterator

    class _EpochIterator(EpochIterator):
        """Seeds the augmentations' random draws, then runs FFCV's pipeline. Keeps the
        exception that killed the worker thread; the consumer re-raises it (chained, with its
        traceback) instead of waiting forever on the output queue."""

        error: BaseException | None = None

        def __init__(self, loader, order, augment_seed: int):
            import torch

            self.augment_seed = augment_seed  # before FFCV's __init__ starts the thread
            # FFCV allocates its batch buffers here, every pass, with torch.empty; under
            # torch.use_deterministic_algorithms torch fills new memory with NaN, which cost
            # ~1 s per pass of a 224 px evaluation loader (1.5 GB of buffers). FFCV writes every
            # element it hands out, so the fill is skipped for these buffers
            fill = torch.utils.deterministic.fill_uninitialized_memory
            torch.utils.deterministic.fill_uninitialized_memory = False
            try:
                super().__init__(loader, order)
            finally:
                torch.utils.deterministic.fill_uninitialized_memory = fill

        def run(self):
            try:
                # FFCV's random augmentations (crops, flips, shifts) draw from numba's generator,
                # which is per thread and seeded from the OS unless seeded in compiled code: seeded
                # here, in the thread that runs the pipeline, the draws of a pass depend only on
                # (seed, pass, rank), and a resumed run replays them (suite/batches.py). Not so
                # for ImageNet with several loader threads: FFCV's random-resized-crop decoder
                # draws inside its parallel loop, on whichever threads run its parts
                _seed_numba(self.augment_seed)
                super().run()
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                self.error = e

    class _Loader(Loader):
        def __iter__(self):  # ffcv 1.0.2 Loader.__iter__ with our iterator class
            from ffcv.pipeline.compiler import Compiler

            Compiler.set_num_threads(self.num_workers)
            order = self.next_traversal_order()
            selected_order = order[: len(self) * self.batch_size]
            seed = augment_seed(self.augment_base, self.next_epoch, self.augment_rank)
            self.next_epoch += 1
            if self.code is None or self.recompile:
                self.generate_code()
            return _EpochIterator(self, selected_order, seed)

    _FFCV_CLASSES.update(Loader=_Loader, EpochIterator=_EpochIterator)
    return _FFCV_CLASSES


def augment_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of numba's generator for one pass of a loader: a function of the run's seed,
    the pass and the rank only (ranks draw differently, as they see different images)."""
    return int(np.random.SeedSequence([seed, epoch, rank, 0xA06]).generate_state(1)[0])


_NUMBA_SEED: list[Any] = []


def _seed_numba(seed: int) -> None:
    """Seed numba's random generator of the calling thread (a numpy call from Python would
    seed numpy's, not numba's)."""
    if not _NUMBA_SEED:
        from numba import njit

        @njit
        def seed_(s):
            np.random.seed(s)

        _NUMBA_SEED.append(seed_)
    _NUMBA_SEED[0](seed)


class BetonLoader:
    """Iterable over ``(x, y)`` batches of a Fashion-MNIST beton (see :func:`make_loader`).

    The FFCV Loader is built on first use (``.ffcv``), so creating this object is cheap.
    Each ``iter()`` is one epoch; RANDOM order reshuffles per epoch with seed
    ``seed + epoch`` (``set_epoch`` to resume); random augmentations (RGB datasets) draw from
    numba's generator seeded with :func:`augment_seed` (seed, epoch, rank): the same pixels
    for every number of loader threads, except ImageNet's crops with more than one. Batches
    are fresh tensors (not views of FFCV's reused buffers), so they may be kept. Abandoning an epoch half way (``break``)
    stops and joins FFCV's worker thread; so does starting the next epoch or ``close()``.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        batch_size: int,
        train: bool,
        seed: int = 0,
        num_workers: int = 1,
        distributed: bool = False,
        drop_last: bool | None = None,
        indices: Sequence[int] | np.ndarray | None = None,
        raw: bool = False,
        batches_ahead: int = 3,
        os_cache: bool = True,
    ):
        self.path = Path(path)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.batch_size = int(batch_size)
        self.train = bool(train)
        self.seed = int(seed)
        self.num_workers = int(num_workers)
        self.distributed = bool(distributed)
        self.drop_last = self.train if drop_last is None else bool(drop_last)
        self.raw = bool(raw)
        self.batches_ahead = int(batches_ahead)
        self.os_cache = bool(os_cache)
        self._num_samples = self._read_num_samples()
        if indices is not None:
            indices = np.asarray(indices, dtype=np.int64).reshape(-1)
            if indices.size and (indices.min() < 0 or indices.max() >= self._num_samples):
                raise IndexError(f"{self.path}: indices must lie in 0..{self._num_samples - 1}")
        self.indices = indices
        if self.distributed:
            import torch.distributed as dist

            if not (dist.is_available() and dist.is_initialized()):
                raise RuntimeError(
                    "distributed=True needs an initialised torch.distributed "
                    "process group (e.g. init_process_group('gloo'))"
                )
            self._world, self._rank = dist.get_world_size(), dist.get_rank()
        else:
            self._world, self._rank = 1, 0
        self._epoch = 0
        self._ffcv = None
        self._active: weakref.ref | None = None

    def _read_num_samples(self) -> int:
        # header only, without importing FFCV (~10 s: torch, numba, cv2); see check_beton()
        if not self.path.is_file():
            raise DataError(f"{self.path}: beton file missing")
        if self.path.stat().st_size < _HEADER_TYPE.itemsize:
            raise DataError(f"{self.path}: truncated (smaller than the FFCV header)")
        header = np.fromfile(self.path, dtype=_HEADER_TYPE, count=1)[0]
        if int(header["version"]) != 2:
            raise DataError(f"{self.path}: not an FFCV v2 beton")
        return int(header["num_samples"])

    # --- size ------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        """Samples this process visits per epoch (before drop_last)."""
        n = self._num_samples if self.indices is None else int(self.indices.shape[0])
        if self.distributed:  # DistributedSampler(drop_last=False) pads to a multiple
            n = math.ceil(n / self._world)
        return n

    def __len__(self) -> int:
        n = self.num_samples
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    # --- FFCV ------------------------------------------------------------------------
    @property
    def ffcv(self):
        """The underlying ffcv.loader.Loader (built on first access)."""
        if self._ffcv is None:
            _import_ffcv()
            from ffcv.loader import OrderOption

            Loader = _ffcv_classes()["Loader"]
            # an evaluation pass over fewer samples than a batch is one batch of all of them:
            # FFCV sizes its buffers (batches_ahead + 2 batches) by the batch size it is given
            ffcv_batch = self.batch_size if self.drop_last else max(1, min(self.batch_size, self.num_samples))
            with _keep_torch_threads():
                self._ffcv = Loader(
                    str(self.path),
                    batch_size=ffcv_batch,
                    num_workers=self.num_workers,
                    os_cache=self.os_cache,
                    order=OrderOption.RANDOM if self.train else OrderOption.SEQUENTIAL,
                    distributed=self.distributed,
                    seed=self.seed,
                    indices=self.indices,
                    pipelines=self._pipelines(),
                    drop_last=self.drop_last,
                    batches_ahead=self.batches_ahead,
                )
            self._ffcv.next_epoch = self._epoch
            self._ffcv.augment_base, self._ffcv.augment_rank = self.seed, self._rank
            if len(self._ffcv) != len(self):
                raise RuntimeError(f"internal: FFCV says {len(self._ffcv)} batches, expected {len(self)}")
        return self._ffcv

    def _pipelines(self) -> dict[str, Any]:
        """FFCV pipelines per field (subclasses: other datasets/augmentations)."""
        from ffcv.fields.basics import IntDecoder
        from ffcv.fields.ndarray import NDArrayDecoder
        from ffcv.transforms import ToTensor

        return {"image": [NDArrayDecoder(), ToTensor()], "label": [IntDecoder(), ToTensor()], "index": None}

    def _convert(self, img, lab) -> tuple[Any, Any]:
        """FFCV's batch -> fresh ``(x, y)`` tensors (FFCV reuses its output buffers)."""
        import torch

        # numpy, single-threaded, into fresh arrays: FFCV reuses its output buffers
        # a few batches later, and torch ops here would use torch's intra-op pool
        # (which competes with FFCV's numba threads: measured 5-7x slower)
        y = torch.from_numpy(lab.numpy().reshape(-1).astype(np.int64))
        u8 = img.numpy()
        x = torch.from_numpy(u8.copy() if self.raw else np.take(_NORMALISE_LUT, u8))
        return x, y

    def set_epoch(self, epoch: int) -> None:
        """Epoch number used for the next iteration's RANDOM order (seed + epoch)."""
        self._epoch = int(epoch)
        if self._ffcv is not None:
            self._ffcv.next_epoch = self._epoch

    @property
    def epoch(self) -> int:
        """Epoch number the next ``iter()`` will use."""
        return self._ffcv.next_epoch if self._ffcv is not None else self._epoch

    # --- iteration -------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        self.close()  # an epoch left half way keeps FFCV's thread (and its buffers) busy
        gen = self._epoch_gen()
        # weak: dropping the caller's iterator (``break``, ``del``) must finalise it
        self._active = weakref.ref(gen)
        return gen

    def close(self) -> None:
        """Stop a running epoch (if any) and join FFCV's worker thread."""
        ref, self._active = self._active, None
        gen = ref() if ref is not None else None
        if gen is not None:
            gen.close()

    def _epoch_gen(self):
        import torch

        loader = self.ffcv
        n_threads = torch.get_num_threads()
        with _keep_torch_threads():
            it = iter(loader)
        self._epoch = loader.next_epoch
        try:
            while True:
                batch = _next_batch(it, self.path)
                # FFCV's thread calls torch.set_num_threads(num_workers) when it starts,
                # which is process-wide: give the caller its setting back
                if torch.get_num_threads() != n_threads:
                    torch.set_num_threads(n_threads)
                if batch is None:
                    return
                yield self._convert(*batch)
        finally:
            it.close()  # the thread notices within ~0.5 s (FFCV polls its queue)
            if it is not threading.current_thread():
                it.join(timeout=10.0)
            if torch.get_num_threads() != n_threads:
                torch.set_num_threads(n_threads)

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __enter__(self) -> BetonLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({str(self.path)!r}, batch_size={self.batch_size}, "
            f"train={self.train}, seed={self.seed}, num_workers={self.num_workers}, "
            f"distributed={self.distributed}, drop_last={self.drop_last}, raw={self.raw}, "
            f"batches={len(self)})"
        )


def _next_batch(it, path: Path, poll: float = 0.5):
    """EpochIterator.__next__ that raises if FFCV's worker thread died (instead of
    blocking forever on its output queue)."""
    while True:
        try:
            item = it.output_queue.get(timeout=poll)
            break
        except queue.Empty:
            if not it.is_alive():
                try:
                    item = it.output_queue.get_nowait()
                    break
                except queue.Empty:
                    err = getattr(it, "error", None)
                    raise RuntimeError(
                        f"{path}: FFCV loader thread died mid-epoch: {type(err).__name__ if err else 'unknown'}: {err}"
                    ) from err
    if item is None:
        return None
    slot, result = item
    if getattr(it, "current_stream", None) is not None:  # FFCV's CUDA stream handshake
        it.current_stream.wait_stream(it.cuda_streams[slot])
    return result


def make_loader(
    path: str | os.PathLike,
    batch_size: int,
    train: bool,
    seed: int = 0,
    num_workers: int = 1,
    distributed: bool = False,
    drop_last: bool | None = None,
    indices: Sequence[int] | np.ndarray | None = None,
    *,
    raw: bool = False,
    batches_ahead: int = 3,
    os_cache: bool = True,
) -> BetonLoader:
    """Loader over a Fashion-MNIST beton, CPU only.

    Yields ``(x, y)``: ``x`` float32 ``(B, 1, 28, 28)`` = ``(pixel / 255 - 0.2860) / 0.3530``
    (or the uint8 pixels when ``raw=True``), ``y`` int64 ``(B,)``. ``train=True``: RANDOM
    order (seed + epoch), ``drop_last`` defaults to True; ``train=False``: SEQUENTIAL,
    ``drop_last`` defaults to False. ``distributed=True`` shards like PyTorch's
    DistributedSampler (needs an initialised process group; pads with repeated samples
    to a multiple of the world size). ``indices`` restricts to a subset of rows.
    ``num_workers`` is FFCV's numba thread count. The first epoch in a process pays a
    few seconds of numba compilation.
    """
    return BetonLoader(
        path,
        batch_size,
        train,
        seed=seed,
        num_workers=num_workers,
        distributed=distributed,
        drop_last=drop_last,
        indices=indices,
        raw=raw,
        batches_ahead=batches_ahead,
        os_cache=os_cache,
    )
