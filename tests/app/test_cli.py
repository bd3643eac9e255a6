"""The CLI: `xmodal index` (folders, CSV, resume, bad files), `xmodal search`, `xmodal serve` errors."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.cli import freeze_what_is_loaded, main
from app.main import create_app
from models.encoder import Encoder
from tests.conftest import image_bytes, make_settings


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


TINY = ["--model", "xmodal-tiny", "--pretrained", "none", "--device", "cpu"]


def test_index_folder_csv_resume_and_search(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    photos = tmp_path / "photos" / "nested"
    photos.mkdir(parents=True)
    for i in range(6):
        (photos / f"p{i}.png").write_bytes(image_bytes(i))
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (photos / "notes.txt").write_text("ignored: not an image suffix")
    dataset = tmp_path / "ds"
    dataset.mkdir()
    rows = ["filepath,caption"]
    for i in range(4):
        (dataset / f"c{i}.png").write_bytes(image_bytes(100 + i))
        rows.append(f"c{i}.png,caption number {i}")
    (dataset / "data.csv").write_text("\n".join(rows) + "\n")
    data = tmp_path / "data"

    code = main(["index", str(tmp_path / "photos"), str(dataset / "data.csv"), "--data-dir", str(data),
                 "--workers", "0", "--quiet", *TINY])  # fmt: skip
    out = capsys.readouterr()
    assert code == 0
    assert "10 added, 0 already stored, 1 failed, 4 captions added" in out.out
    assert "broken.jpg" in out.err

    # Re-running resumes: everything already stored is skipped.
    code = main(["index", str(tmp_path / "photos"), "--data-dir", str(data), "--workers", "0",
                 "--quiet", *TINY])  # fmt: skip
    assert code == 0
    assert "0 added, 6 already stored" in capsys.readouterr().out

    code = main(
        ["search", "caption number 1", "--k", "3", "--json", "--data-dir", str(data), *TINY]
    )
    results = json.loads(capsys.readouterr().out)
    assert code == 0 and len(results) == 3 and all(Path(r["path"]).is_file() for r in results)


def test_index_with_worker_processes(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(5):
        (photos / f"p{i}.jpg").write_bytes(image_bytes(i, "JPEG", (640, 360)))
    result = _run("index", str(photos), "--data-dir", str(tmp_path / "d"), "--workers", "2",
                  "--batch-size", "2", *TINY)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "5 added" in result.stdout
    assert "img/s" in result.stderr  # the progress bar


def test_serve_refuses_missing_weights_quickly(tmp_path: Path) -> None:
    result = _run("serve", "--data-dir", str(tmp_path / "d"), "--model", "ViT-B-32",
                  "--pretrained", "laion2b_s34b_b79k", "--port", "0")  # fmt: skip
    assert result.returncode == 2
    assert "--pretrained /path" in result.stderr and "HF_HOME" in result.stderr


@pytest.mark.parametrize("command", ["serve", "index", "search", "train", "eval", "synth"])
def test_help_shows_real_defaults_only(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert "(default: None)" not in text and "(default: False)" not in text
    flat = " ".join(text.split())
    if command == "train":
        assert "--epochs EPOCHS passes over the CSV (default: 20)" in flat
        assert "--seed SEED same seed, same checkpoint (default: 0)" in flat


def test_data_dir_remembers_its_model(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from fastapi.testclient import TestClient

    from app.config import Settings
    from app.main import create_app
    from tests.conftest import wait_ready

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        (photos / f"p{i}.png").write_bytes(image_bytes(i))
    data = str(tmp_path / "data")
    assert main(["index", str(photos), "--data-dir", data, "--workers", "0", "--quiet", *TINY]) == 0
    capsys.readouterr()

    # No model options: the model the data dir was built with, not the default ViT-B-32.
    assert main(["search", "a photo", "--json", "--data-dir", data, "--device", "cpu"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 3
    assert main(["index", str(photos), "--data-dir", data, "--workers", "0", "--quiet"]) == 0
    assert "0 added, 3 already stored" in capsys.readouterr().out
    # Options that agree are fine; options that disagree fail before loading any weights.
    assert main(["search", "q", "--data-dir", data, "--model", "xmodal-tiny"]) == 0
    capsys.readouterr()
    assert main(["search", "q", "--data-dir", data, "--model", "ViT-B-32"]) == 2
    err = capsys.readouterr().err
    assert "the data dir was embedded with model xmodal-tiny (pretrained none, fingerprint " in err
    assert "the options ask for ViT-B-32" in err

    # A server started without model options loads it too.
    with TestClient(create_app(Settings(data_dir=Path(data)))) as client:
        wait_ready(client)
        assert client.get("/v1/info").json()["model"]["name"] == "xmodal-tiny"


@pytest.mark.anyio
async def test_serve_freezes_what_it_loaded_before_it_turns_ready(
    encoder: Encoder, tmp_path: Path
) -> None:
    """`xmodal serve` hands `freeze_what_is_loaded` to its app: it runs once everything is
    loaded and before the service says ready, and leaves what was loaded out of the garbage
    collector's sight (a full collection over it stalled every request for ~300 ms)."""
    seen: list[bool] = []

    def loaded() -> None:
        seen.append(app.state.runtime.ready)
        freeze_what_is_loaded()

    app = create_app(make_settings(tmp_path / "d"), encoder=encoder, on_loaded=loaded)
    try:
        async with app.router.lifespan_context(app):
            await app.state.runtime.wait_ready()
            assert seen == [False] and app.state.runtime.ready
            assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()  # this test process starts many more apps
