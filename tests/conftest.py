"""Shared fixtures: the real Fashion-MNIST (Debian package dataset-fashion-mnist), prepared once per session;
one embedded Ray; a working directory per test; free loopback ports."""
import socket
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


@pytest.fixture
def workdir(tmp_path, monkeypatch, ray_local):
    """A fresh working directory (runs/, results/, data/ land here) with the session's Ray running."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (for a server or a process group the test starts)."""
    return _free_port()
