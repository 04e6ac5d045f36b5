"""Shared fixtures: the tiny preset pipeline and an installed plugin distribution."""

from __future__ import annotations

import sys
from pathlib import Path as _P

sys.path.insert(0, str(_P(__file__).parent))  # tests/golden.py

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    """Under pytest-xdist each of the two workers gets one core: one intra-op thread per process
    (and per subprocess it starts), else the workers' thread pools fight over the cores."""
    import os

    # ndopt's on-disk plan caches stay out of tests (a test that patches a module must not be answered
    # from a cache); the tests of the caches turn them on in a temporary directory
    os.environ["NDOPT_CACHE"] = "0"
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        import torch

        torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-tensor tests (also under `-n 0`): on 2 shared cores a
    second thread only spins (measured 2x slower). Modules opt in with `usefixtures("one_thread")`."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny():
    """The bundled tiny Pyramid-Flow pipeline (shared: passes never mutate their input)."""
    from ndopt.frontends import load_model

    return load_model("pyramid-flow-tiny")


@pytest.fixture(scope="session")
def plugin_site(tmp_path_factory) -> Path:
    """A real distribution (tests/fixtures/plugin) built and installed into a private site dir."""
    site = tmp_path_factory.mktemp("plugin-site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(site), str(ROOT / "tests" / "fixtures" / "plugin")],
                   check=True, capture_output=True)
    return site


@pytest.fixture
def with_plugin(plugin_site, monkeypatch):
    """Make the installed plugin visible to this process's entry-point registry."""
    import ndopt.passmanager as pm

    monkeypatch.syspath_prepend(str(plugin_site))
    importlib.invalidate_caches()
    monkeypatch.setattr(pm, "_ENTRY_POINTS_LOADED", False)
    yield plugin_site
    for name in ("demo_mark", "demo_needs_mark"):
        pm._REGISTRY.pop(name, None)
    pm._ENTRY_POINTS_LOADED = False
