"""Dense training: no pruning. The reference every method is compared with."""
from suite.pruning.base import Pruner


class Dense(Pruner):
    name = "dense"
