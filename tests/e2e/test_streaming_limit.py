"""A body streamed without Content-Length is cut at the limit on a real server, not read whole."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx

from app.main import create_app
from models.encoder import Encoder
from tests.conftest import make_settings
from tests.e2e.server import InProcessServer


def test_streamed_body_is_cut_at_the_limit(encoder: Encoder, tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "d", limits={"max_request_bytes": 64 * 1024})
    sent = 0

    def body() -> Iterator[bytes]:
        nonlocal sent
        yield b'--b\r\nContent-Disposition: form-data; name="files"; filename="x.png"\r\n\r\n'
        for _ in range(1024):  # 16 MiB if nobody stops it
            sent += 16 * 1024
            yield b"\0" * (16 * 1024)

    with InProcessServer(create_app(settings, encoder=encoder)) as server:
        try:
            r = httpx.post(
                f"{server.url}/v1/images",
                content=body(),
                headers={"content-type": "multipart/form-data; boundary=b"},
                timeout=30,
            )
            assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
        except (httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadError):
            pass  # the server answered 413 and closed while we were still sending
        assert sent < 4 * 1024 * 1024, f"{sent} bytes were sent past a 64 KiB limit"
        info = httpx.get(f"{server.url}/v1/info").json()
        assert info["counts"]["images"] == 0
        assert not list((tmp_path / "d" / "tmp").iterdir())
