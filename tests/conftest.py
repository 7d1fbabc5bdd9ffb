"""Test set-up: on a machine without CUDA the Triton kernels run under the CPU
interpreter, which must be switched on before anything imports triton
(torch.compile imports it too); under pytest-xdist, compile caches per worker."""
import dataclasses
import os
import sys
import tempfile

# Under pytest-xdist each worker compiles into caches of its own: a cache directory shared by processes
# is a write-write interaction between them that nothing here controls (concurrent Triton cache writes
# have crashed compiles elsewhere, triton-lang/triton#11512), and the GPU suite failed under 8 workers.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _caches = os.path.join(tempfile.gettempdir(), "recycore_test_caches", os.environ["PYTEST_XDIST_WORKER"])
    os.environ["TRITON_CACHE_DIR"] = os.path.join(_caches, "triton")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(_caches, "inductor")
    # and a share of the cores: each worker's torch (and its subprocesses) would start one CPU thread per
    # core, and the CPU-bound tests (quantiser, artifacts, tracing) crawled on the GPU host's 10 workers
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    _threads = max(1, _cores // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    os.environ["OMP_NUM_THREADS"] = str(_threads)

import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(_threads)

if not torch.cuda.is_available():
    assert "triton" not in sys.modules, "triton was imported before TRITON_INTERPRET was set"
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def demo_data():
    """The embedded demo corpus (built once into ./data, reused by `make demo`)."""
    from recycore.demo import ensure_demo_data

    root = os.environ.get("RECYCORE_DATA_ROOT", os.path.join(os.path.dirname(__file__), "..", "data"))
    return ensure_demo_data(root)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny ops on a shared 2-core machine run ~4x faster on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def no_config_env(monkeypatch):
    """The environment's own RUN_ID, DATA_PATH, NUM_LAYERS, ... (the config reads them, as the seed does)
    must not leak into the tests' runs: a benchmark script's RUN_ID renamed a resumed run once."""
    from recycore.config import Config

    for f in dataclasses.fields(Config):
        monkeypatch.delenv(f.name.upper(), raising=False)
    monkeypatch.delenv("RECYCORE_DEBUG", raising=False)


@pytest.fixture(autouse=True)
def release_cached_gpu_memory():
    """Tests share the GPU between pytest-xdist workers: memory a finished test's process keeps cached
    would be missing from the others'."""
    yield
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
