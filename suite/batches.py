"""The training data as the engine takes it: the three loaders of a run's dataset, and an
endless stream of training batches whose position a checkpoint carries."""

from __future__ import annotations

from suite import datasets
from suite.config import RunConfig


class Stream:
    """Batches from a loader without end; an 'epoch' is `steps` batches (a full pass unless
    max_steps_per_epoch caps it, in which case the next epoch continues where it stopped).

    Its position (loader pass, batches taken from it) is part of a checkpoint, so a resumed run
    sees exactly the batches the uninterrupted run would have seen."""

    def __init__(self, loader):
        self.loader = loader
        self.it = None
        self.pass_no = 0
        self.pos = 0

    def next(self):
        while True:
            if self.it is None:
                self.pass_no = self.loader.epoch
                self.it = iter(self.loader)
                self.pos = 0
            try:
                batch = next(self.it)
            except StopIteration:
                self.it = None
                continue
            self.pos += 1
            return batch

    def state(self) -> dict[str, int]:
        if self.it is None:
            return {"pass": int(self.loader.epoch), "pos": 0}
        return {"pass": int(self.pass_no), "pos": int(self.pos)}

    def restore(self, st: dict[str, int]) -> None:
        self.loader.set_epoch(st["pass"])
        self.it, self.pass_no, self.pos = None, st["pass"], 0
        if st["pos"]:
            self.it = iter(self.loader)
            for _ in range(st["pos"]):
                next(self.it)
            self.pos = st["pos"]


def make_loaders(cfg: RunConfig, world: int):
    from suite.data import make_loader

    spec = datasets.get(cfg.dataset)
    paths = spec.paths(cfg.data_dir)
    missing = spec.missing(cfg.data_dir)
    if missing:
        raise FileNotFoundError(
            f"dataset {cfg.dataset}: missing {', '.join(map(str, missing))}; make them with: "
            + spec.make_command.format(data_dir=cfg.data_dir)
        )
    spec.validate(cfg.data_dir)  # a truncated or mismatched file fails here, naming it, before training
    make_loader = spec.loader or make_loader  # the dataset's recipe (RGB datasets); Fashion-MNIST's otherwise
    nw = cfg.engine.loader_workers
    from suite.data import loader_thread_limit

    if nw > loader_thread_limit():  # the sweep checks it too, for the local executor, before submitting
        raise ValueError(
            f"engine.loader_workers is {nw}, more than the {loader_thread_limit()} loader "
            f"threads this node allows (its CPU count, or NUMBA_NUM_THREADS): lower it"
        )
    train = make_loader(
        paths["train"], cfg.batch_size, train=True, seed=cfg.seed, num_workers=nw, distributed=world > 1
    )
    val = make_loader(paths["val"], 500, train=False, num_workers=nw)
    test = make_loader(paths["test"], 500, train=False, num_workers=nw)
    return spec, train, val, test
