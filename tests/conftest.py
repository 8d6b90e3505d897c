"""Shared fixtures. Ray is started once per test session (starting it costs seconds on 2 cores)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "30")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Genuine RefCOCO/+/g records, kept in the project (provenance and licence: the folder's README.md).
FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "refer_real_annotations")


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """``L2L_CACHE`` (the default priors cache, ``Config.priors_cache_dir``) in a session temp folder, so no test
    writes to the real ``~/.cache/l2l-ray``. Autouse and session-scoped: set before Ray starts and before any CLI
    subprocess, which inherit it."""
    old = os.environ.get("L2L_CACHE")
    os.environ["L2L_CACHE"] = str(tmp_path_factory.mktemp("l2l-cache"))
    yield os.environ["L2L_CACHE"]
    if old is None:
        os.environ.pop("L2L_CACHE", None)
    else:
        os.environ["L2L_CACHE"] = old


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray cluster with 2 CPUs shared by every Ray test."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False,
                 object_store_memory=512 * 1024**2, ignore_reinit_error=True)
    yield ray
    ray.shutdown()


@pytest.fixture()
def by_value(ray_session, request):
    """Ray workers cannot import test modules: ship the requesting module's classes by value."""
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(request.module)
    yield ray_session
    cloudpickle.unregister_pickle_by_value(request.module)


@pytest.fixture(scope="session")
def refer_fixture_root() -> str:
    """The genuine RefCOCO/RefCOCO+/RefCOCOg records in tests/fixtures (REFER layout, no images).

    L2L_REFER_FIXTURES points the tests at another REFER-layout folder instead.
    """
    root = os.environ.get("L2L_REFER_FIXTURES", FIXTURES)
    if not os.path.isdir(root):
        pytest.skip(f"REFER fixtures not found at {root}: L2L_REFER_FIXTURES must name a REFER-layout folder "
                    "(unset, the tests use tests/fixtures/refer_real_annotations)")
    return os.path.abspath(root)
