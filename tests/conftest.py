"""Shared fixtures: the real Fashion-MNIST (Debian package dataset-fashion-mnist), prepared once per session;
a tiny model; a free loopback port; a working directory next to an embedded Ray."""
import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from bvit.data.fashion_mnist import DEBIAN_FASHION_MNIST, prepare_fashion_mnist

# Launches in tests never attach to a persistent local Ray of the person running them (`bvit-sweep ray up`).
os.environ["BVIT_SWEEP_RAY_HEAD"] = os.path.join(tempfile.gettempdir(), f"bvit-tests-ray-head-{os.getpid()}.json")

TINY_WIDTH, TINY_STEPS, TINY_HEADS = 32, 3, 2  # the `tiny` model: 28x28 grey, patch 4, 10 classes


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


@pytest.fixture
def cpu_only(monkeypatch):
    """CUDA hidden, here and in the processes a test spawns: determinism tests expect bit-identical runs,
    which CUDA's attention and conv backward do not give (`train()` would pick a visible GPU)."""
    import torch

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray for the launcher and tracking tests (start-up costs seconds; trials reuse workers)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def ray_running(ray_local):
    """`ray_local`, started again if an earlier test shut Ray down (a launch, or test_local_ray's own clusters)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)


@pytest.fixture(scope="session")
def tiny() -> Callable[..., "torch.nn.Module"]:  # noqa: F821
    """`tiny(arch="bvit", **kw)`: a seeded width-32, 3-step (or depth-3) model for 28x28 grey images, eval mode."""
    import torch

    from bvit.models.factory import build_model

    def make(arch: str = "bvit", **kw) -> torch.nn.Module:
        torch.manual_seed(0)
        return build_model(arch=arch, width=TINY_WIDTH, steps=TINY_STEPS, heads=TINY_HEADS, patch_size=4,
                           img_size=28, in_chans=1, num_classes=10, **kw).eval()

    return make


@pytest.fixture
def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for gloo rendezvous, an MLflow server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def workdir(tmp_path, monkeypatch, ray_local) -> Path:
    """A fresh working directory (the cwd for the test) with the session's embedded Ray running."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session", autouse=True)
def _signing_key(tmp_path_factory):
    """Tests sign sweep state with a key of their own, never the user's (~/.config/bvit-sweep/state.key)."""
    import os

    from orchestrator.signing import KEY_ENV

    before = os.environ.get(KEY_ENV)
    os.environ[KEY_ENV] = str(tmp_path_factory.mktemp("key") / "state.key")
    yield
    if before is None:
        os.environ.pop(KEY_ENV, None)
    else:
        os.environ[KEY_ENV] = before
