"""`xmodal serve --engine ray`: the same answers as the single process, 503s under overload, and
an encoder replica killed mid-request costs no request."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest

from app.errors import Overloaded
from tests.conftest import AppFactory, image_bytes, make_settings

pytestmark = pytest.mark.ray

QUERIES = ["a red dog", "blue sky over a city", "small boat", "an old tree", "night street"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _seed(post: Any) -> None:
    """The same writes, in the same order, to either server."""
    for start in (0, 6):
        files = [
            ("files", (f"{i}.png", image_bytes(i), "image/png")) for i in range(start, start + 6)
        ]
        assert post("/v1/images", files=files).status_code == 201
    texts = {"items": [{"text": f"caption number {i}"} for i in range(5)]}
    assert post("/v1/texts", json=texts).status_code == 201


@pytest.fixture(scope="module")
def ray_server(ray_cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from ray import serve

    from app.distributed.serve import APP_NAME, Scaling, build_application

    port = _free_port()
    settings = make_settings(tmp_path_factory.mktemp("ray") / "data")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    application = build_application(settings, Scaling(replicas=2, replica_cpus=0.25))
    serve.run(application, name=APP_NAME, route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while httpx.get(f"{url}/readyz").status_code != 200:
        assert time.monotonic() < deadline, "the Ray Serve app never became ready"
        time.sleep(0.2)
    with httpx.Client(base_url=url, timeout=60) as client:
        _seed(client.post)
    try:
        yield url
    finally:
        serve.delete(APP_NAME)


def _answers(post: Any) -> list[Any]:
    out: list[Any] = []
    for q in QUERIES:
        r = post("/v1/search/text", json={"query": q, "k": 5})
        assert r.status_code == 200, r.text
        out.append([(h["id"], h["score"]) for h in r.json()["results"]])
    r = post("/v1/embed/text", json={"texts": QUERIES})
    out.append(r.json()["embeddings"])
    files = {"file": ("q.png", image_bytes(3), "image/png")}
    r = post("/v1/search/image-to-text", files=files, data={"k": "3"})
    assert r.status_code == 200, r.text
    out.append([(h["id"], h["score"]) for h in r.json()["results"]])
    return out


def _assert_same(got: list[Any], want: list[Any]) -> None:
    for g, w in zip(got[:-2], want[:-2], strict=True):  # text searches: same ids, same scores
        assert [i for i, _ in g] == [i for i, _ in w]
        np.testing.assert_allclose([s for _, s in g], [s for _, s in w], atol=1e-4)
    np.testing.assert_allclose(np.array(got[-2]), np.array(want[-2]), atol=1e-5)
    assert [i for i, _ in got[-1]] == [i for i, _ in want[-1]]


def test_search_answers_equal_the_single_process_server(
    ray_server: str, make_client: AppFactory
) -> None:
    local = make_client()
    _seed(local.post)
    want = _answers(local.post)
    with httpx.Client(base_url=ray_server, timeout=60) as client:
        got = _answers(client.post)
        info = client.get("/v1/info").json()
    _assert_same(got, want)
    assert info == local.get("/v1/info").json()


def _replica_actors(deployment: str) -> list[Any]:
    import ray

    return [
        ray.get_actor(a["name"], namespace=a["namespace"])
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(f"SERVE_REPLICA::xmodal#{deployment}#")
    ]


def test_a_killed_encoder_replica_costs_no_request(
    ray_server: str, make_client: AppFactory
) -> None:
    import ray

    local = make_client()
    _seed(local.post)
    want = _answers(local.post)[0]
    replicas = _replica_actors("TextEncoder")
    assert len(replicas) == 2

    def search(_: int) -> tuple[int, Any]:
        with httpx.Client(base_url=ray_server, timeout=90) as client:
            r = client.post("/v1/search/text", json={"query": QUERIES[0], "k": 5})
            return r.status_code, r.json()

    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(search, i) for i in range(64)]
        time.sleep(0.05)
        ray.kill(replicas[0], no_restart=True)  # mid-traffic: Serve replaces it
        results = [f.result() for f in futures]
    for status, body in results:
        assert status == 200, body
        assert [h["id"] for h in body["results"]] == [i for i, _ in want]
    # ...and the service keeps answering (and writing) afterwards.
    with httpx.Client(base_url=ray_server, timeout=90) as client:
        files = [("files", ("new.png", image_bytes(40), "image/png"))]
        assert client.post("/v1/images", files=files).status_code == 201
        assert client.post("/v1/search/text", json={"query": "x", "k": 1}).status_code == 200


# -- the ingress's model-call client, without a cluster ------------------------------------
class _Response:
    def __init__(self, outcome: Any, delay: float = 0.0) -> None:
        self.outcome, self.delay, self.cancelled = outcome, delay, False

    def __await__(self) -> Any:
        return self._run().__await__()

    async def _run(self) -> Any:
        await asyncio.sleep(self.delay)
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome

    def cancel(self) -> None:
        self.cancelled = True


class _Handle:
    def __init__(self, *outcomes: Any, delay: float = 0.0) -> None:
        self.outcomes, self.delay, self.calls = list(outcomes), delay, 0

    def remote(self, item: Any) -> _Response:
        self.calls += 1
        outcome = self.outcomes.pop(0) if len(self.outcomes) > 1 else self.outcomes[0]
        return _Response(outcome, self.delay)


@pytest.mark.anyio
async def test_remote_call_retries_a_lost_replica_once() -> None:
    from ray.exceptions import ActorDiedError

    from app.distributed.serve import RemoteModelCall

    handle = _Handle(ActorDiedError(), "vector")
    call = RemoteModelCall("text_encode", handle, max_queue=4, request_timeout_s=5)
    assert await call.submit("q") == "vector"
    assert (handle.calls, call.retries) == (2, 1)
    dead = RemoteModelCall(
        "text_encode", _Handle(ActorDiedError()), max_queue=4, request_timeout_s=5
    )
    with pytest.raises(Overloaded) as raised:
        await dead.submit("q")
    assert raised.value.retry_after_s


@pytest.mark.anyio
async def test_remote_call_answers_overload_with_retry_after() -> None:
    from ray.serve.exceptions import BackPressureError

    from app.distributed.serve import RemoteModelCall

    slow = RemoteModelCall("text_encode", _Handle("v", delay=0.3), max_queue=2, request_timeout_s=5)
    results = await asyncio.gather(*(slow.submit(i) for i in range(3)), return_exceptions=True)
    assert results[:2] == ["v", "v"] and isinstance(results[2], Overloaded)
    full = RemoteModelCall(
        "text_encode", _Handle(BackPressureError(num_queued_requests=9, max_queued_requests=8)),
        max_queue=2, request_timeout_s=5,
    )  # fmt: skip
    with pytest.raises(Overloaded):
        await full.submit("q")
    late = RemoteModelCall("text_encode", _Handle("v", delay=2), max_queue=2, request_timeout_s=0.1)
    with pytest.raises(Overloaded):
        await late.submit("q")


def test_app_builder_reads_a_serve_config(ray_cluster: Any, tmp_path: Any) -> None:
    """The KubeRay / Serve-config entry point builds the same application from plain args."""
    from app.distributed.serve import app_builder

    application = app_builder(
        {"data_dir": str(tmp_path), "model": {"name": "xmodal-tiny", "pretrained": "none"},
         "min_replicas": 1, "max_replicas": 3, "ingress_resource": "xmodal_data"}
    )  # fmt: skip
    assert type(application).__name__ == "Application"


@pytest.mark.anyio
async def test_a_replicas_own_overload_reaches_the_client_as_503() -> None:
    from ray.exceptions import RayTaskError

    from app.distributed.serve import RemoteModelCall

    inner = Overloaded("the text_encoder queue is full", retry_after_s=1.0)
    wrapped = RayTaskError("__call__", "traceback", inner)
    call = RemoteModelCall("text_encode", _Handle(wrapped), max_queue=2, request_timeout_s=5)
    with pytest.raises(Overloaded) as raised:
        await call.submit("q")
    assert raised.value.retry_after_s == 1.0


class _BatchHandle:
    """`run_batch`: one call per batch; the first call can die like a killed replica."""

    def __init__(self, die_first: bool = False) -> None:
        self.batches: list[list[Any]] = []
        self.die_first = die_first

    def remote(self, items: list[Any]) -> _Response:
        from ray.exceptions import ActorDiedError

        if self.die_first:
            self.die_first = False
            return _Response(ActorDiedError())
        self.batches.append(list(items))
        return _Response([f"v{i}" for i in items], delay=0.01)


@pytest.mark.anyio
async def test_ingress_batching_sends_one_call_per_batch_and_retries_it() -> None:
    from app.distributed.serve import IngressBatching, RemoteModelCall

    plan = IngressBatching(max_batch_size=4, max_wait_s=0.02, batches_in_flight=2)
    handle = _BatchHandle(die_first=True)
    call = RemoteModelCall("text_encode", handle, max_queue=64, request_timeout_s=5, batching=plan)
    results = await asyncio.gather(*(call.submit(i) for i in range(10)))
    assert results == [f"v{i}" for i in range(10)]
    assert sorted(len(b) for b in handle.batches) == [2, 4, 4] and call.retries == 1
    full = RemoteModelCall("text_encode", handle, max_queue=1, request_timeout_s=5, batching=plan)
    outcomes = await asyncio.gather(full.submit(0), full.submit(1), return_exceptions=True)
    assert outcomes[0] == "v0" and isinstance(outcomes[1], Overloaded)
