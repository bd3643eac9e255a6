"""Schemathesis against the service's own OpenAPI document, the way its documentation runs a full
check: `schemathesis run URL --checks all --mode all` with the examples, coverage, fuzzing and
stateful phases, against a real uvicorn on loopback with an API key set. Zero failures allowed:
no 5xx, every status declared, every response matching its schema, schema-valid requests
accepted and schema-invalid ones refused, 405 with `Allow`, no use after delete.

`make test` gives it FUZZ_SECONDS (default 40); `make fuzz` runs the long version (240 s).
The repository's schemathesis.toml says what the document cannot (arbitrary bytes are no image).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.main import create_app
from models.encoder import Encoder
from tests.conftest import image_bytes, make_settings
from tests.e2e.server import InProcessServer

ROOT = Path(__file__).resolve().parents[2]
KEY = "fuzz-key"


@pytest.fixture(scope="module")
def fuzz_server(
    encoder: Encoder, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[InProcessServer]:
    data: Path = tmp_path_factory.mktemp("fuzz") / "data"
    with InProcessServer(create_app(make_settings(data, api_key=KEY), encoder=encoder)) as server:
        auth = {"Authorization": f"Bearer {KEY}"}
        with httpx.Client(base_url=server.url, headers=auth) as client:
            for seed in range(3):
                client.post(
                    "/v1/images", files={"files": ("s.png", image_bytes(seed), "image/png")}
                )
            client.post("/v1/texts", json={"items": [{"text": "a seeded text"}]})
        yield server


@pytest.mark.slow
def test_schemathesis_full_check_finds_nothing(
    fuzz_server: InProcessServer, tmp_path: Path
) -> None:
    seconds = int(os.environ.get("FUZZ_SECONDS", "40"))
    command = [
        sys.executable, "-m", "schemathesis.cli",
        "--config-file", str(ROOT / "schemathesis.toml"), "--no-color",
        "run", f"{fuzz_server.url}/openapi.json",
        "-H", f"Authorization: Bearer {KEY}",
        "--checks", "all", "--mode", "all", "--max-time", str(seconds),
        "--generation-database", "none",
        "--seed", os.environ.get("FUZZ_SEED", "15"),
    ]  # fmt: skip
    done = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, timeout=seconds + 240
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-12000:]
    # it ran every phase on every operation and really exercised the API
    for phase in ("Coverage", "Fuzzing", "Stateful"):
        assert f"✅ {phase}" in output, output[-3000:]
    selected = re.search(r"Selected: (\d+)/\d+\s+Tested: (\d+)", output)
    assert selected and selected[1] == selected[2] and int(selected[1]) >= 20, output[-3000:]
    cases = re.search(r"(\d+) generated, (\d+) passed", output)
    assert cases and cases[1] == cases[2] and int(cases[1]) >= 10 * seconds, output[-3000:]
