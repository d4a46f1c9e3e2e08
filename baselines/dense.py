"""Dense training: no pruning. The reference every method is compared with."""

from suite.pruning import registry
from suite.pruning.base import Pruner


@registry.register
class Dense(Pruner):
    name = "dense"
