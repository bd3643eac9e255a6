"""Crash consistency: SIGKILL a real server mid-write, restart it, and check every id.

Every upload or delete that got a 2xx must have survived; nothing may be half-present (a row
without its index vector or file, or an index vector without its row).
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.conftest import image_bytes
from tests.e2e.server import ServerProcess

ROUNDS = 4


@dataclass
class Ledger:
    """What the server acknowledged, across rounds."""

    images: dict[int, int] = field(default_factory=dict)  # id -> seed of its bytes
    texts: dict[int, str] = field(default_factory=dict)
    deleted_images: set[int] = field(default_factory=set)
    deleted_texts: set[int] = field(default_factory=set)
    # deletes sent but never answered: the server may have committed them before it died
    unanswered_deletes: set[int] = field(default_factory=set)
    missing_on_delete: set[int] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    next_seed: int = 1000

    def seed(self) -> int:
        with self.lock:
            self.next_seed += 1
            return self.next_seed


def _writer(url: str, ledger: Ledger, stop: threading.Event, worker: int) -> None:
    rng = random.Random(worker)
    with httpx.Client(base_url=url, timeout=10) as client:
        while not stop.is_set():
            try:
                roll = rng.random()
                if roll < 0.6:
                    seed = ledger.seed()
                    r = client.post(
                        "/v1/images",
                        files={"files": (f"{seed}.png", image_bytes(seed), "image/png")},
                        data={"metadata": f'{{"seed": {seed}}}'},
                    )
                    if r.status_code == 201:
                        with ledger.lock:
                            ledger.images[r.json()["items"][0]["id"]] = seed
                elif roll < 0.85:
                    text = f"text {ledger.seed()} from worker {worker}"
                    r = client.post("/v1/texts", json={"items": [{"text": text}]})
                    if r.status_code == 201:
                        with ledger.lock:
                            ledger.texts[r.json()["items"][0]["id"]] = text
                else:
                    with ledger.lock:
                        live = sorted(
                            set(ledger.images) - ledger.deleted_images - ledger.unanswered_deletes
                        )
                        victim = rng.choice(live) if live else None
                        if victim is not None:
                            ledger.unanswered_deletes.add(victim)
                    if victim is not None:
                        status = client.delete(f"/v1/images/{victim}").status_code
                        with ledger.lock:
                            ledger.unanswered_deletes.discard(victim)
                            if status == 204:
                                ledger.deleted_images.add(victim)
                            elif status == 404:
                                # no other writer deletes an unanswered victim, so the
                                # server has lost an image it acknowledged
                                ledger.missing_on_delete.add(victim)
            except httpx.HTTPError:
                time.sleep(0.05)  # the server is down: the request was not acknowledged


def _settle_unanswered_deletes(client: httpx.Client, ledger: Ledger) -> None:
    """A delete that was never answered may or may not have happened; after the restart the
    server says which, and from then on it is a known fact to hold the server to."""
    for image_id in sorted(ledger.unanswered_deletes):
        status = client.get(f"/v1/images/{image_id}").status_code
        assert status in (200, 404), (image_id, status)
        if status == 404:
            ledger.deleted_images.add(image_id)
    ledger.unanswered_deletes.clear()


def _files_by_sha(folder: Path) -> set[str]:
    return {entry.name.split(".", 1)[0] for entry in folder.glob("*/*")}


def _verify(url: str, ledger: Ledger, data_dir: Path) -> None:
    with httpx.Client(base_url=url, timeout=30) as client:
        assert not ledger.missing_on_delete, "acknowledged images answered 404 to a delete"
        _settle_unanswered_deletes(client, ledger)
        info = client.get("/v1/info").json()
        stored: list[dict] = []
        after = 0
        while True:
            page = client.get("/v1/images", params={"limit": 1000, "after": after}).json()
            stored += page["items"]
            if page["next_after"] is None:
                break
            after = page["next_after"]
        stored_ids = {item["id"] for item in stored}
        # nothing half-present: the index holds exactly the rows
        assert info["index"]["images"]["size"] == len(stored_ids) == info["counts"]["images"]
        texts_total = client.get("/v1/texts").json()["total"]
        assert info["index"]["texts"]["size"] == texts_total
        for image_id, seed in ledger.images.items():
            if image_id in ledger.deleted_images:
                assert client.get(f"/v1/images/{image_id}").status_code == 404, image_id
                continue
            assert image_id in stored_ids, f"acknowledged image {image_id} was lost"
            r = client.post(
                "/v1/search/image",
                files={"file": ("q.png", image_bytes(seed), "image/png")},
                data={"k": "1"},
            )
            assert r.json()["results"][0]["id"] == image_id
        for text_id, text in ledger.texts.items():
            r = client.get(f"/v1/texts/{text_id}")
            assert r.status_code == 200 and r.json()["text"] == text, f"text {text_id} lost"
        # no file without its row either: a crash between writing a file and committing its
        # row (or between a delete's commit and the file's removal) is swept at start-up
        stored_shas = {item["sha256"] for item in stored}
        assert _files_by_sha(data_dir / "media") == stored_shas
        assert _files_by_sha(data_dir / "thumbs") == stored_shas
        for item in stored:  # every row has its file and its vector
            assert client.get(item["url"]).status_code == 200
            r = client.post("/v1/search/image", data={"image_id": str(item["id"]), "k": "1"})
            assert r.json()["results"][0]["id"] == item["id"]


@pytest.mark.slow
def test_sigkill_during_writes_loses_nothing_acknowledged(tmp_path: Path) -> None:
    rng = random.Random(7)
    ledger = Ledger()
    # save often, so kills land before, during and after index saves
    env = {"XMODAL_INDEX__SAVE_EVERY_CHANGES": "7", "XMODAL_INDEX__SAVE_PACE": "0"}
    server = ServerProcess(tmp_path / "data", env=env)
    for round_no in range(ROUNDS):
        server.start()
        if round_no:
            _verify(server.url, ledger, server.data_dir)
        stop = threading.Event()
        writers = [
            threading.Thread(target=_writer, args=(server.url, ledger, stop, w + 10 * round_no))
            for w in range(3)
        ]
        for thread in writers:
            thread.start()
        time.sleep(rng.uniform(0.8, 2.5))
        server.kill()
        stop.set()
        for thread in writers:
            thread.join(30)
    server.start()
    try:
        _verify(server.url, ledger, server.data_dir)
        assert len(ledger.images) >= 10, "too few acknowledged writes to mean anything"
    finally:
        server.stop()
