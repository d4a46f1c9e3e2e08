"""The training augmentations of the CIFAR and ImageNet loaders that FFCV ships as
``ffcv.transforms.RandomHorizontalFlip`` and ``RandomTranslate``, written again as loops over
pixels. They draw the same random numbers in the same order and write the same pixels, so
every batch is identical to FFCV's (tests/test_imagefolder.py compares them image for
image, single-threaded), but numba compiles them in a fraction of the time, and with several
loader threads their draws stay in the thread suite.data seeds (FFCV's Translate draws inside
its parallel loop, from unseeded worker threads). FFCV's versions assign array
slices; numba compiles, for every such assignment, an error path that formats the shapes
when they differ: ~9 s of the first training step of every CIFAR process (flip 6.0 s and
translate 3.4 s, timed around numba's Dispatcher.compile on a 2-core machine; the first step of
a CIFAR smoke run went from 13.2 s to 4.1 s): every SLURM task paid it.

Both are FFCV pipeline operations (``ffcv.pipeline.operation.Operation``); ``flip_and_translate()``
returns the two classes, importing FFCV on first use as :mod:`suite.data` does."""

from __future__ import annotations

from typing import Any

_CLASSES: dict[str, Any] = {}


def flip_and_translate() -> tuple[Any, Any]:
    """(HorizontalFlip, Translate): drop-in replacements for FFCV's RandomHorizontalFlip(flip_prob)
    and RandomTranslate(padding, fill)."""
    if _CLASSES:
        return _CLASSES["flip"], _CLASSES["translate"]
    from dataclasses import replace

    import numpy as np

    from suite.data import _import_ffcv

    _import_ffcv()
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.compiler import Compiler
    from ffcv.pipeline.operation import Operation
    from numpy.random import rand, randint

    class HorizontalFlip(Operation):  # type: ignore[misc]
        """Each image of the batch mirrored left-right with probability ``flip_prob``: one
        uniform draw per image, for the whole batch first (as FFCV draws them)."""

        def __init__(self, flip_prob: float = 0.5):
            super().__init__()
            self.flip_prob = flip_prob

        def generate_code(self):
            rows = Compiler.get_iterator()
            flip_prob = self.flip_prob

            def flip(images, dst):
                n, h, w, c = images.shape
                # one draw per image, in this thread, in a plain loop: with several loader threads
                # numba would run an array expression such as rand(n) on its (unseeded) workers
                should_flip = np.empty(n, np.bool_)
                for i in range(n):
                    should_flip[i] = rand() < flip_prob
                for i in rows(n):
                    last = w - 1 if should_flip[i] else 0
                    step = -1 if should_flip[i] else 1
                    for y in range(h):
                        for x in range(w):
                            for k in range(c):
                                dst[i, y, x, k] = images[i, y, last + step * x, k]
                return dst

            flip.is_parallel = True
            return flip

        def declare_state_and_memory(self, previous_state):
            return replace(previous_state, jit_mode=True), AllocationQuery(previous_state.shape, previous_state.dtype)

    class Translate(Operation):  # type: ignore[misc]
        """Each image shifted by up to ``padding`` pixels in each direction, the uncovered
        border filled with ``fill``: the image placed in a padded canvas, then a window of the
        image's size cut at a random offset (two draws per image, row then column, all drawn
        before the loop over images)."""

        def __init__(self, padding: int, fill: tuple[int, int, int] = (0, 0, 0)):
            super().__init__()
            self.padding = padding
            self.fill = np.array(fill)

        def generate_code(self):
            rows = Compiler.get_iterator()
            pad = self.padding
            fill = self.fill

            def translate(images, dst):
                n, h, w, c = images.shape
                # the shifts first, in this thread and in FFCV's order (row then column, image by
                # image): the same draws whether the loop below runs on one thread or several
                shifts = np.empty((n, 2), np.int64)
                for i in range(n):
                    shifts[i, 0] = randint(low=0, high=2 * pad + 1)
                    shifts[i, 1] = randint(low=0, high=2 * pad + 1)
                for i in rows(n):
                    for y in range(h + 2 * pad):
                        for x in range(w + 2 * pad):
                            inside = pad <= y < pad + h and pad <= x < pad + w
                            for k in range(c):
                                if inside:
                                    dst[i, y, x, k] = images[i, y - pad, x - pad, k]
                                else:
                                    dst[i, y, x, k] = fill[k]
                    top, left = shifts[i, 0], shifts[i, 1]
                    for y in range(h):
                        for x in range(w):
                            for k in range(c):
                                images[i, y, x, k] = dst[i, top + y, left + x, k]
                return images

            translate.is_parallel = True
            return translate

        def declare_state_and_memory(self, previous_state):
            h, w, c = previous_state.shape
            canvas = (h + 2 * self.padding, w + 2 * self.padding, c)
            return replace(previous_state, jit_mode=True), AllocationQuery(canvas, previous_state.dtype)

    _CLASSES.update(flip=HorizontalFlip, translate=Translate)
    return HorizontalFlip, Translate
