"""Run `xmodal serve` as a real process on a free loopback port, for end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import httpx
import uvicorn


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(url: str, timeout: float, check: Callable[[], None], *, pause: float) -> bool:
    """Poll /readyz until 200 (True) or `timeout` (False); `check` may raise to give up early."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        check()
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(pause)
    return False


class ServerProcess:
    def __init__(self, data_dir: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.extra = list(extra)
        self.env = env or {}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / f"server-{self.port}.log"
        self._log: IO[bytes] | None = None

    def start(self, timeout: float = 90.0) -> ServerProcess:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", **self.env}
        args = [
            sys.executable, "-m", "app.cli", "serve",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--data-dir", str(self.data_dir),
            "--model", "xmodal-tiny", "--pretrained", "none", "--device", "cpu",
            *self.extra,
        ]  # fmt: skip
        self._log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        proc = self.proc

        def still_running() -> None:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited {proc.returncode}: {self.log_tail()}")

        if not wait_ready(self.url, timeout, still_running, pause=0.1):
            raise RuntimeError(f"server not ready in {timeout}s: {self.log_tail()}")
        return self

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        if self._log is not None:
            self._log.close()
        return code

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


class InProcessServer:
    """uvicorn serving our app on loopback from a thread, so the test can reach its state."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> InProcessServer:
        self.thread.start()
        if not wait_ready(self.url, 60, lambda: None, pause=0.05):
            raise RuntimeError("in-process server did not become ready")
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)
