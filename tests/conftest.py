"""Shared fixtures: the real Fashion-MNIST (Debian package dataset-fashion-mnist), prepared once per session."""
from pathlib import Path

import pytest

from bvit.datasets import DEBIAN_FASHION_MNIST, prepare_fashion_mnist


@pytest.fixture(scope="session")
def fmnist_dir(tmp_path_factory) -> Path:
    """A prepared Fashion-MNIST directory (train.beton, test.beton, meta.json); read-only for tests."""
    if not DEBIAN_FASHION_MNIST.is_dir():
        pytest.fail(f"{DEBIAN_FASHION_MNIST} missing: apt-get install dataset-fashion-mnist (scripts/setup.sh does)")
    out = tmp_path_factory.mktemp("fashion-mnist")
    prepare_fashion_mnist(out=out)
    return out


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """One torch thread in the test process: on a busy 2-core machine two threads thrash (~8x slower steps)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray for the launcher and tracking tests (start-up costs seconds; trials reuse workers)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
