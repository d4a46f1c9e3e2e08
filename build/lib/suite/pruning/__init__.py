"""Pruning core: the one Pruner interface, the mask/gate machinery, the single sparsity
ruler, Hyperflux, and the registry that maps method names to implementations
(Hyperflux here, every other method in the top-level `baselines` package)."""
