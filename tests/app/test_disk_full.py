"""A full disk during an upload: the client gets an error, the store stays consistent."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import AppFactory, image_bytes, upload


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(folder: Path, leave_bytes: int) -> Path:
    filler = folder / "filler"
    stat = os.statvfs(folder)
    free = stat.f_bavail * stat.f_frsize
    with open(filler, "wb") as fh:
        fh.write(b"\0" * max(0, free - leave_bytes))
    return filler


def test_full_disk_upload_is_refused_and_store_stays_consistent(
    make_client: AppFactory, small_disk: Path
) -> None:
    client = make_client(small_disk / "data")
    first = upload(client, image_bytes(1)).json()["items"][0]["id"]
    filler = _fill(small_disk, leave_bytes=8 * 1024)
    big = image_bytes(2, "PNG", (600, 600))
    assert len(big) > 16 * 1024
    failures = [upload(client, big) for _ in range(3)]
    for r in failures:
        assert r.status_code == 507, r.text
        assert r.json()["error"]["code"] == "storage_unavailable"
        assert "Retry-After" in r.headers
    info = client.get("/v1/info").json()
    assert info["counts"]["images"] == 1 and info["index"]["images"]["size"] == 1
    assert client.get(f"/v1/images/{first}/content").status_code == 200
    filler.unlink()
    again = upload(client, big)
    assert again.status_code == 201
    second = again.json()["items"][0]["id"]
    r = client.post("/v1/search/image", files={"file": ("q", big, "image/png")}, data={"k": "1"})
    assert r.json()["results"][0]["id"] == second
