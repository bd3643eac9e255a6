"""Faults of the disk and of the operator, each against real processes: a corrupt SQLite file, the
data dir removed or read-only under a running server, a WAL torn mid-frame after a kill,
SIGTERM half-way through `xmodal index`, and a second server on the same data dir.
RELIABILITY.md states the behaviour each test holds.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from app.library import Library
from models.encoder import Encoder
from tests.conftest import image_bytes, make_settings
from tests.e2e.server import ServerProcess, free_port

DB = "xmodal.sqlite3"
MODEL = ["--model", "xmodal-tiny", "--pretrained", "none", "--device", "cpu"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def _serve(data_dir: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`xmodal serve` expected to refuse: run it to its exit."""
    args = [
        sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1",
        "--port", str(free_port()), "--data-dir", str(data_dir), *MODEL,
    ]  # fmt: skip
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=ENV)


def _rows(db: Path, sql: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def _count(db: Path) -> int:
    """Items stored so far; 0 while the store is still being created."""
    try:
        return int(_rows(db, "SELECT COUNT(*) FROM items")[0][0])  # type: ignore[call-overload]
    except sqlite3.OperationalError:
        return 0


@pytest.mark.slow
def test_corrupt_sqlite_is_refused_naming_the_file_and_the_way_out(
    encoder: Encoder, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    Library.open(make_settings(data), encoder).close()
    db = data / DB
    with open(db, "r+b") as f:  # the 100-byte header, overwritten
        f.write(b"\x00garbage" * 12 + b"junk")
    before = db.read_bytes()
    done = _serve(data)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output[-3000:]
    assert str(db) in output and "not a readable SQLite database" in output, output[-3000:]
    assert "backup" in output and "new one" in output  # the way out
    assert db.read_bytes() == before  # refused, not "repaired" or overwritten


@pytest.mark.slow
def test_data_dir_removed_while_serving(tmp_path: Path) -> None:
    data = tmp_path / "data"
    server = ServerProcess(data).start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            image = client.post(
                "/v1/images", files={"files": ("a.png", image_bytes(1), "image/png")}
            ).json()["items"][0]
            text = client.post("/v1/texts", json={"items": [{"text": "a red boat"}]}).json()
            text_id = text["items"][0]["id"]
            assert client.get("/readyz").status_code == 200

            shutil.rmtree(data)

            ready = client.get("/readyz")
            assert ready.status_code == 503 and ready.json()["status"] == "degraded"
            assert "gone" in ready.json()["detail"] and "507" in ready.json()["detail"]
            assert client.get("/healthz").status_code == 200  # alive, not ready
            started = time.monotonic()
            writes = [
                client.post("/v1/images", files={"files": ("b.png", image_bytes(2), "image/png")}),
                client.post("/v1/texts", json={"items": [{"text": "a blue car"}]}),
                client.delete(f"/v1/texts/{text_id}"),
                client.delete(f"/v1/images/{image['id']}"),
            ]
            for r in writes:
                assert r.status_code == 507, r.text
                assert r.json()["error"]["code"] == "storage_unavailable"
                assert "Retry-After" in r.headers
            assert time.monotonic() - started < 10  # at once, no hang
            # reads keep working where the files allow: rows from the open SQLite file,
            # search from memory; the image's bytes are gone with the folder
            assert client.get(f"/v1/texts/{text_id}").json()["text"] == "a red boat"
            found = client.post("/v1/search/text", json={"query": "a red boat", "k": 1})
            assert found.status_code == 200 and found.json()["results"][0]["id"] == image["id"]
            assert client.get(f"/v1/images/{image['id']}/content").status_code == 404
    finally:
        server.stop()


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through read-only permissions")
def test_read_only_data_dir_refuses_writes_and_says_so(tmp_path: Path) -> None:
    data = tmp_path / "data"
    server = ServerProcess(data).start()
    folders = [data, data / "media", data / "tmp", data / "thumbs"]
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            for folder in folders:
                folder.chmod(0o555)
            (data / DB).chmod(0o444)
            ready = client.get("/readyz")
            assert ready.status_code == 503 and "read-only" in ready.json()["detail"]
            r = client.post("/v1/images", files={"files": ("b.png", image_bytes(2), "image/png")})
            assert r.status_code == 507, r.text
            assert client.get("/v1/images").status_code == 200
    finally:
        for folder in folders:
            folder.chmod(0o755)
        (data / DB).chmod(0o644)
        server.stop()


def _mount(*args: str) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@pytest.mark.slow
def test_read_only_mount_refuses_writes_and_says_so(tmp_path: Path) -> None:
    """The data dir turns read-only under a running server (a volume remounted `ro`): this
    holds for root too. A read-only bind mount over the data dir stands in for it."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount")
    data = tmp_path / "data"
    server = ServerProcess(data).start()
    mounted = False
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            files = {"files": ("a.png", image_bytes(1), "image/png")}
            first = client.post("/v1/images", files=files)
            assert first.status_code == 201, first.text
            if not _mount("--bind", str(data), str(data)):
                pytest.skip("bind mounts are not allowed here")
            mounted = True
            assert _mount("-o", "remount,bind,ro", str(data))
            ready = client.get("/readyz")
            assert ready.status_code == 503 and "read-only" in ready.json()["detail"]
            r = client.post("/v1/images", files={"files": ("b.png", image_bytes(2), "image/png")})
            assert r.status_code == 507, r.text
            assert r.json()["error"]["code"] == "storage_unavailable"
            listed = client.get("/v1/images").json()
            assert [item["id"] for item in listed["items"]] == [first.json()["items"][0]["id"]]
            found = client.post("/v1/search/text", json={"query": "anything", "k": 1})
            assert found.status_code == 200 and len(found.json()["results"]) == 1
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(data)], capture_output=True)
        server.stop()


@pytest.mark.slow
def test_wal_torn_mid_frame_after_a_kill(tmp_path: Path) -> None:
    """The kill came while the WAL frames of a transaction were being written: start-up recovers
    to the last committed write, and the FAISS caches (saved after every change here, so they
    had seen the lost transaction) are rebuilt, never trusted ahead of SQLite."""
    data = tmp_path / "data"
    env = {
        "XMODAL_INDEX__SAVE_EVERY_CHANGES": "1",
        "XMODAL_INDEX__SAVE_EVERY_S": "0.1",
        "XMODAL_INDEX__SAVE_PACE": "0",
    }
    server = ServerProcess(data, env=env).start()
    wal = data / f"{DB}-wal"
    committed = [f"committed text {i}" for i in range(8)]
    torn = [f"torn text {i}" for i in range(8)]
    with httpx.Client(base_url=server.url, timeout=30) as client:
        r = client.post("/v1/texts", json={"items": [{"text": t} for t in committed]})
        kept = {item["text"]: item["id"] for item in r.json()["items"]}
        image = client.post(
            "/v1/images", files={"files": ("a.png", image_bytes(1), "image/png")}
        ).json()["items"][0]
        time.sleep(1.0)  # the indexes are saved
        size_committed = wal.stat().st_size
        client.post("/v1/texts", json={"items": [{"text": t} for t in torn]})
        time.sleep(1.0)  # saved again: the text index has seen the transaction about to be torn
        size_torn = wal.stat().st_size
    server.kill()
    assert size_torn > size_committed, "the WAL was checkpointed meanwhile; nothing to tear"
    with open(wal, "r+b") as f:  # cut inside the last transaction's frames, not on a boundary
        f.truncate(size_committed + (size_torn - size_committed) // 2 + 13)

    server.start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            for text, item_id in kept.items():
                assert client.get(f"/v1/texts/{item_id}").json()["text"] == text
            assert client.get(f"/v1/images/{image['id']}").status_code == 200
            listed = client.get("/v1/texts", params={"limit": 100}).json()
            assert sorted(t["text"] for t in listed["items"]) == sorted(committed)  # none torn
            info = client.get("/v1/info").json()
            assert info["index"]["texts"]["size"] == info["counts"]["texts"] == len(committed)
            assert info["index"]["texts"]["loaded_from"] == "rebuilt"
            # ids the lost transaction had used are handed out again: the index must not
            # still hold the torn texts' vectors under them
            new = client.post("/v1/texts", json={"items": [{"text": "a brand new text"}]})
            new_id = new.json()["items"][0]["id"]
            info = client.get("/v1/info").json()
            assert info["index"]["texts"]["size"] == info["counts"]["texts"] == len(committed) + 1
            # every stored text once, under its own id, and nothing else
            hits = client.post(
                "/v1/search/image-to-text", data={"image_id": str(image["id"]), "k": 100}
            ).json()["results"]
            ids = [h["id"] for h in hits]
            assert len(ids) == len(set(ids)) and set(ids) == {*kept.values(), new_id}
    finally:
        server.stop()


@pytest.mark.slow
def test_sigterm_during_index_then_rerun_indexes_every_file_once(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    count = 60
    for i in range(count):
        (folder / f"{i:03d}.png").write_bytes(image_bytes(500 + i, size=(64, 48)))
    data = tmp_path / "data"
    args = [
        sys.executable, "-m", "app.cli", "index", str(folder), "--data-dir", str(data),
        "--batch-size", "2", "--workers", "0", "--quiet", *MODEL,
    ]  # fmt: skip
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=ENV)
    db = data / DB
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # until the first batches are committed
        if db.exists() and _count(db) >= 4:
            break
        assert first.poll() is None, first.communicate()[0]
        time.sleep(0.05)
    first.send_signal(signal.SIGTERM)
    output = first.communicate(timeout=60)[0].decode()
    assert first.returncode == 128 + signal.SIGTERM, output
    assert "interrupted" in output and "run the same command again" in output
    stored = _count(db)
    assert 0 < stored < count, "SIGTERM did not land mid-way"

    second = subprocess.run(args, capture_output=True, text=True, timeout=300, env=ENV)
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"{count - stored} added, {stored} already stored" in second.stdout
    shas = _rows(db, "SELECT sha256 FROM items WHERE kind = 'image'")
    assert len(shas) == count and len(set(shas)) == count  # every file, once
    adds = _rows(db, "SELECT COUNT(*), COUNT(DISTINCT item_id) FROM changes WHERE op = 'add'")
    assert adds[0] == (count, count)
    assert len(list((data / "media").rglob("*.*"))) == count  # no orphan copies either


@pytest.mark.slow
def test_second_server_on_the_same_data_dir_names_the_holder(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = ServerProcess(data).start()
    try:
        assert first.proc is not None
        done = _serve(data)
        output = done.stdout + done.stderr
        assert done.returncode == 2, output[-3000:]
        assert f"in use by process {first.proc.pid}" in output, output[-3000:]
        assert str(data / "LOCK") in output
        # the first one is untouched
        assert httpx.get(f"{first.url}/readyz").status_code == 200
    finally:
        first.stop()
