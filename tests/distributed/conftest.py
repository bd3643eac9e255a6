"""A small local Ray cluster, started once for the `ray` tests and always shut down."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

ray = pytest.importorskip("ray", reason="the ray extra is not installed (make test-ray)")


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Any]:
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=500 * 1024 * 1024,
        log_to_driver=False,
    )
    try:
        yield ray
    finally:
        try:
            from ray import serve

            serve.shutdown()
        finally:
            ray.shutdown()
