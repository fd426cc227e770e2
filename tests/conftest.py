import os
import pathlib

import pytest
import ray

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ray_local():
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=True, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(ROOT),
                                                                           str(ROOT / "tests")])}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()
