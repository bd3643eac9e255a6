"""Schemathesis against the service's own OpenAPI schema: no 5xx, responses match the schema."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
)

from app.main import create_app
from models.encoder import Encoder
from tests.conftest import image_bytes, make_settings
from tests.e2e.server import InProcessServer


@pytest.fixture(scope="module")
def fuzz_server(
    encoder: Encoder, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[InProcessServer]:
    data: Path = tmp_path_factory.mktemp("fuzz") / "data"
    with InProcessServer(create_app(make_settings(data), encoder=encoder)) as server:
        with httpx.Client(base_url=server.url) as client:
            for seed in range(3):
                client.post(
                    "/v1/images", files={"files": ("s.png", image_bytes(seed), "image/png")}
                )
            client.post("/v1/texts", json={"items": [{"text": "a seeded text"}]})
        yield server


CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance]


@pytest.mark.slow
def test_api_never_fails_and_matches_its_schema(fuzz_server: InProcessServer) -> None:
    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15
    statuses: list[int] = []
    modes = (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)
    for operation, mode in [(op, mode) for op in operations for mode in modes]:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=12,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case: schemathesis.Case) -> None:
            response = case.call_and_validate(checks=CHECKS, timeout=60)
            statuses.append(response.status_code)

        try:
            check()
        except Unsatisfiable:
            # operations without inputs (GET /healthz) have no negative examples
            assert mode is schemathesis.GenerationMode.NEGATIVE, operation.label
    # it really exercised the API, good and bad requests both
    assert len(statuses) >= 10 * len(operations)
    assert any(code < 300 for code in statuses) and any(400 <= code < 500 for code in statuses)
