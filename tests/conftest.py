"""Shared fixtures. The services (SLURM cluster, MLflow server) are started by the test
command (scripts/test.sh) and found through the environment it exports; a test that needs
one and does not find it fails with the command that starts it."""
from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def betons(tmp_path_factory):
    """Fashion-MNIST .beton files (train/val/test), written once per session."""
    from suite import data as D

    out = tmp_path_factory.mktemp("fashion_mnist")
    return D.write_fashion_mnist(out, val_size=5000, split_seed=0, progress=False)


@pytest.fixture(scope="session")
def mlflow_server() -> str:
    uri = os.environ.get("HFBENCH_MLFLOW_URI", "")
    if not uri.startswith("http"):
        pytest.fail("no MLflow server: run the tests through scripts/test.sh (make test), or "
                    "`scripts/services.sh start` and source the env.sh it prints")
    return uri


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    from launchers.sweep import slurm_reachable

    if not slurm_reachable():
        pytest.fail("no SLURM controller answers: run the tests through scripts/test.sh (make test), or "
                    "`scripts/services.sh start` and source the env.sh it prints")
