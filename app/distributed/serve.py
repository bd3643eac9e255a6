"""`xmodal serve --engine ray`: the same FastAPI app as a Ray Serve ingress, the model calls as
deployments with replicas.

Deployments of one Serve application (`xmodal`):

- `XmodalIngress` (exactly one replica, never autoscaled): the FastAPI app of `create_app`,
  unchanged. It owns the data dir -- its flock, SQLite, media and FAISS -- so every write takes
  the single-process path and keeps every guarantee of RELIABILITY.md. It is placed on the node
  where `xmodal serve` runs (where the data dir is). It loads the encoder on its CPU too: for
  the fingerprint check of the data dir, preprocessing, and re-embedding on a model change.
- `TextEncoder`, `ImageEncoder` and (for a model with a caption decoder) `Reranker`: N replicas
  each (`--replicas`, or autoscaling between `--min-replicas` and `--max-replicas`), one GPU per
  replica where the cluster has GPUs. They run the batch functions of
  `app/services/forward_passes.py` -- the same ones the single process runs. Where batches are
  cut (`--replica-batching`): `serve` (default), each replica batches the items it receives with
  `@serve.batch`; `xmodal`, each replica runs xmodal's `DynamicBatcher` instead; `ingress`, the
  ingress cuts the batches as the single process does and sends one remote call per batch
  (`run_batch`), two batches in flight per replica.

The ingress's `Backend` gets `RemoteModelCall`s instead of local batchers (the `backend_factory`
of `create_app`): each request item goes to a replica through a deployment handle. Before it
reports ready, the ingress checks that every deployment serves the data dir's model (same
fingerprint), so a replica of another model can never answer.

Overload: more than `batch.max_queue` items in flight to one deployment, a deployment's own
queue full (`max_queued_requests`), or a wait over `batch.request_timeout_s` answer 503 with
Retry-After, as the single process does. A replica that dies mid-request (its process killed,
its node lost): the encoding is retried once on another (or the restarted) replica -- encoding
is idempotent; writes never leave the ingress, so none is retried or lost.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import ray
import torch
from ray import serve
from ray.exceptions import RayActorError, RayTaskError, WorkerCrashedError
from ray.serve.exceptions import BackPressureError

from app.batching import DynamicBatcher, wait_for_result
from app.config import Settings
from app.errors import Overloaded, XmodalError
from app.library import Library
from app.main import create_app
from app.runtime import Backend, encoder_spec
from app.services import forward_passes
from models.factory import EncoderSpec, has_caption_decoder, load_encoder

log = logging.getLogger(__name__)

APP_NAME = "xmodal"
# Backend field -> Serve deployment name.
DEPLOYMENTS = {
    "text_encoder": "TextEncoder",
    "image_encoder": "ImageEncoder",
    "reranker": "Reranker",
}
_BATCH_FUNCTIONS: dict[str, Callable[..., list[Any]]] = {
    "text_encoder": forward_passes.encode_texts_batch,
    "image_encoder": forward_passes.encode_images_batch,
    "reranker": forward_passes.rerank_batch,
}
# A dead replica: its process exited or its node is gone. Worth one retry on another replica.
_REPLICA_LOST = (RayActorError, WorkerCrashedError)


# -- the model replicas ---------------------------------------------------------------------
class ModelReplica:
    """One replica of a model-call deployment: the encoder, and a batcher in front of it."""

    def __init__(
        self, spec: dict[str, Any], role: str, batch: dict[str, Any], threads: int, batching: str
    ) -> None:
        torch.set_num_threads(max(1, threads))
        self.encoder = load_encoder(EncoderSpec(**spec))
        self.role = role
        self._fn = partial(_BATCH_FUNCTIONS[role], self.encoder)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"replica-{role}")
        self._batcher: DynamicBatcher[Any, Any] | None = None
        if batching == "xmodal":
            self._batcher = DynamicBatcher(
                role,
                self._fn,
                max_batch_size=batch["max_batch_size"],
                max_wait_ms=batch["max_wait_ms"],
                max_queue=batch["max_queue"],
                request_timeout_s=batch["request_timeout_s"],
                executor=self._executor,
            )
        else:
            # @serve.batch adds these setters at run time; typed Any so that mypy reads the
            # same with and without the ray extra installed.
            batched: Any = self._batched
            batched.set_max_batch_size(batch["max_batch_size"])
            batched.set_batch_wait_timeout_s(batch["max_wait_ms"] / 1000.0)
        self._warm_up(batch["max_batch_size"])

    def _warm_up(self, size: int) -> None:
        if self.role == "text_encoder":
            self._fn(["a photo of a dog"] * size)
        elif self.role == "image_encoder":
            self._fn([torch.zeros(3, self.encoder.image_size, self.encoder.image_size)] * size)

    async def fingerprint(self) -> str:
        return self.encoder.fingerprint

    async def has_reranker(self) -> bool:
        return self.encoder.has_reranker

    async def run_batch(self, items: list[Any]) -> list[Any]:
        """A batch cut by the ingress (`--replica-batching ingress`): one forward pass."""
        loop = asyncio.get_running_loop()
        return list(await loop.run_in_executor(self._executor, self._fn, items))

    async def __call__(self, item: Any) -> Any:
        if self._batcher is not None:
            self._batcher.start()  # needs the replica's event loop; idempotent
            return await self._batcher.submit(item)
        return await self._batched(item)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _batched(self, items: list[Any]) -> list[Any]:
        # The forward pass runs on a thread, so the replica keeps taking requests meanwhile.
        loop = asyncio.get_running_loop()
        return list(await loop.run_in_executor(self._executor, self._fn, items))


# -- the ingress side -----------------------------------------------------------------------
@dataclass(frozen=True)
class IngressBatching:
    """`--replica-batching ingress`: the ingress cuts the batches (as the single process does)
    and sends one remote call per batch, `batches_in_flight` at a time, to `run_batch`."""

    max_batch_size: int
    max_wait_s: float
    batches_in_flight: int


class RemoteModelCall:
    """A `Batcher` whose items go to a deployment's replicas: one call per item, batched by
    the replica, or (with `batching`) one call per batch cut here."""

    def __init__(
        self,
        name: str,
        target: Any,
        *,
        max_queue: int,
        request_timeout_s: float,
        batching: IngressBatching | None = None,
    ):
        self.name = name
        self._target = target  # a deployment handle, or its run_batch method with `batching`
        self.max_queue = max_queue
        self.request_timeout_s = request_timeout_s
        self.batching = batching
        self.in_flight = 0
        self.retries = 0
        self._pending: list[tuple[Any, asyncio.Future[Any]]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._slots: asyncio.Semaphore | None = None
        self._sending: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        pass

    async def stop(self) -> None:
        for task in list(self._sending):
            task.cancel()

    async def submit(self, item: Any) -> Any:
        if self.in_flight >= self.max_queue:
            raise Overloaded(
                f"the {self.name} queue is full ({self.max_queue} waiting); retry shortly",
                retry_after_s=1.0,
            )
        self.in_flight += 1
        try:
            if self.batching is None:
                return await self._with_retry(item)
            return await self._submit_to_batch(item)
        finally:
            self.in_flight -= 1

    async def submit_many(
        self, items: Sequence[Any], *, deadline_s: float | None = None
    ) -> list[Any]:
        # Deadlines are a local batcher's: the replicas batch on their own side.
        return list(await asyncio.gather(*(self.submit(item) for item in items)))

    # -- one remote call, retried once if its replica died ----------------------------------
    async def _with_retry(self, payload: Any) -> Any:
        try:
            return await self._call(payload)
        except _REPLICA_LOST as exc:
            # Encoding is idempotent: one more try, on a live (or restarted) replica.
            self.retries += 1
            log.warning("%s replica lost mid-request (%s); retrying once", self.name, exc)
            try:
                return await self._call(payload)
            except _REPLICA_LOST:
                raise Overloaded(
                    f"no {self.name} replica answered; retry shortly", retry_after_s=2.0
                ) from None

    async def _call(self, payload: Any) -> Any:
        response = self._target.remote(payload)
        try:
            return await asyncio.wait_for(_wait(response), self.request_timeout_s)
        except asyncio.TimeoutError:
            response.cancel()
            raise Overloaded(
                f"the {self.name} request waited over {self.request_timeout_s:.0f}s; retry shortly",
                retry_after_s=2.0,
            ) from None
        except BackPressureError:
            raise Overloaded(
                f"every {self.name} replica's queue is full; retry shortly", retry_after_s=1.0
            ) from None
        except RayTaskError as exc:
            # A domain error inside the replica (its own batcher's 503): answer it as such.
            if isinstance(exc.cause, XmodalError):
                raise exc.cause from None
            raise

    # -- batches cut in the ingress ---------------------------------------------------------
    async def _submit_to_batch(self, item: Any) -> Any:
        assert self.batching is not None
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append((item, future))
        if len(self._pending) >= self.batching.max_batch_size:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self.batching.max_wait_s, self._flush)
        # The remote call has its own timeout; this one also covers the wait for a slot.
        return await wait_for_result(future, self.name, self.request_timeout_s)

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._pending = self._pending, []
        if batch:
            task = asyncio.get_running_loop().create_task(self._send(batch))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[tuple[Any, asyncio.Future[Any]]]) -> None:
        assert self.batching is not None
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.batching.batches_in_flight)
        async with self._slots:
            live = [(item, future) for item, future in batch if not future.done()]
            if not live:
                return
            try:
                outputs = await self._with_retry([item for item, _ in live])
                if len(outputs) != len(live):
                    raise RuntimeError(f"{self.name}: {len(outputs)} results for {len(live)} items")
            except Exception as exc:  # a failed batch fails every request in it
                for _, future in live:
                    if not future.done():
                        future.set_exception(exc)
                return
            for (_, future), output in zip(live, outputs, strict=True):
                if not future.done():
                    future.set_result(output)


async def _wait(response: Any) -> Any:
    return await response


@dataclass
class RemoteModels:
    """The ingress's `backend_factory`: a Backend whose model calls are deployment handles."""

    handles: dict[str, Any]  # Backend field -> DeploymentHandle (the reranker may be absent)
    batching: IngressBatching | None = None
    calls: dict[str, RemoteModelCall] = field(default_factory=dict)

    async def __call__(self, library: Library) -> Backend:
        settings = library.settings
        expected = library.encoder.fingerprint
        for role, handle in self.handles.items():
            name = DEPLOYMENTS[role]
            found = await handle.fingerprint.remote()
            if found != expected:
                raise RuntimeError(
                    f"deployment {name} serves model {found}, the data dir's is {expected}"
                )
            self.calls[role] = RemoteModelCall(
                name,
                handle if self.batching is None else handle.run_batch,
                max_queue=settings.batch.max_queue,
                request_timeout_s=settings.batch.request_timeout_s,
                batching=self.batching,
            )
        reranker = self.calls.get("reranker") if library.encoder.has_reranker else None
        return Backend(
            library=library,
            text_encoder=self.calls["text_encoder"],
            image_encoder=self.calls["image_encoder"],
            reranker=reranker,
        )


@serve.ingress()
class XmodalIngress:
    """The FastAPI app of the single process; its model calls go to the model deployments."""

    def __init__(
        self, settings: Settings, models: dict[str, Any], batching: IngressBatching | None
    ) -> None:
        # This process only decodes, preprocesses, searches and writes: one torch thread.
        torch.set_num_threads(1)
        self.settings = settings
        self.models = RemoteModels(models, batching)

    def __serve_build_asgi_app__(self) -> Any:
        return create_app(self.settings, backend_factory=self.models)


# -- building and running the application ---------------------------------------------------
@dataclass
class Scaling:
    replicas: int | None = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    replica_cpus: float = 1.0
    replica_gpus: float | None = None  # None: 1 if the cluster has GPUs
    batching: str = "serve"

    def deployment_options(self, settings: Settings, gpus_in_cluster: float) -> dict[str, Any]:
        gpus = (
            self.replica_gpus
            if self.replica_gpus is not None
            else (1.0 if gpus_in_cluster else 0.0)
        )
        options: dict[str, Any] = {
            "ray_actor_options": {"num_cpus": 0 if gpus else self.replica_cpus, "num_gpus": gpus},
            # Enough requests per replica to fill two batches; Serve queues the rest.
            "max_ongoing_requests": 2 * settings.batch.max_batch_size,
            "max_queued_requests": settings.batch.max_queue,
            # A log line per call in every replica costs CPU on the hot path; xmodal's own
            # metrics (/metrics on the ingress) count requests and latencies.
            "logging_config": {"enable_access_log": False},
        }
        if self.min_replicas is not None or self.max_replicas is not None:
            low = self.min_replicas if self.min_replicas is not None else 1
            options["autoscaling_config"] = {
                "min_replicas": low,
                "max_replicas": max(low, self.max_replicas or low),
                "target_ongoing_requests": settings.batch.max_batch_size,
            }
        else:
            options["num_replicas"] = self.replicas or 1
        return options


def _deployment(cls: type) -> Any:
    return serve.deployment(cls)


def build_application(
    settings: Settings,
    scaling: Scaling,
    *,
    with_reranker: bool | None = None,
    ingress_resources: dict[str, float] | None = None,
) -> Any:
    """The Serve application (bound deployments). `with_reranker` None: deploy the Reranker
    when the model has a caption decoder to re-rank with (a CoCa, or a checkpoint of one)."""
    spec: EncoderSpec = encoder_spec(settings)
    if with_reranker is None:
        with_reranker = has_caption_decoder(spec)
    spec_dict = dict(spec.__dict__)
    batch = settings.batch.model_dump()
    gpus = float(ray.cluster_resources().get("GPU", 0))
    options = scaling.deployment_options(settings, gpus)
    threads = max(1, int(options["ray_actor_options"]["num_cpus"] or 1))
    roles = [r for r in DEPLOYMENTS if r != "reranker" or with_reranker]
    bound: dict[str, Any] = {}
    for role in roles:
        deployment = _deployment(ModelReplica).options(name=DEPLOYMENTS[role], **options)
        bound[role] = deployment.bind(spec_dict, role, batch, threads, scaling.batching)
    ingress_actor: dict[str, Any] = {"num_cpus": 0}
    if ingress_resources:  # only the node with the data dir offers these
        ingress_actor["resources"] = ingress_resources
    ingress_settings = settings.model_copy(
        update={"model": settings.model.model_copy(update={"device": "cpu"})}
    )
    ingress = _deployment(XmodalIngress).options(
        name="XmodalIngress",
        num_replicas=1,  # the single writer of the data dir
        max_ongoing_requests=settings.batch.max_queue * 4,
        ray_actor_options=ingress_actor,
        logging_config={"enable_access_log": False},
        # A restart (the old process gone) may take the data dir's lock and sweep.
        health_check_period_s=10,
    )
    # Bound as an argument, the model deployments are deployed with the app and reach the
    # ingress as deployment handles.
    batching = None
    if scaling.batching == "ingress":
        replicas = max(scaling.replicas or 1, scaling.max_replicas or 1)
        batching = IngressBatching(
            max_batch_size=settings.batch.max_batch_size,
            max_wait_s=settings.batch.max_wait_ms / 1000.0,
            batches_in_flight=2 * replicas,  # one computing, one on its way, per replica
        )
    return ingress.bind(ingress_settings, bound, batching)


def run_serve(args: Any, settings: Settings) -> int:
    """`xmodal serve --engine ray`: deploy, then serve until interrupted."""
    import time

    from app.distributed.embed import connect

    if args.replicas is not None and (args.min_replicas or args.max_replicas):
        print("xmodal: give --replicas or --min/--max-replicas, not both", file=sys.stderr)
        return 2
    started = connect(args.address)
    settings = settings.model_copy(update={"data_dir": settings.data_dir.resolve()})
    scaling = Scaling(
        replicas=args.replicas,
        min_replicas=args.min_replicas,
        max_replicas=args.max_replicas,
        replica_cpus=args.replica_cpus,
        replica_gpus=args.replica_gpus,
        batching=args.replica_batching,
    )
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        # The data dir is on this node: pin the ingress here.
        here = {f"node:{ray.util.get_node_ip_address()}": 0.001}
        application = build_application(settings, scaling, ingress_resources=here)
        serve.run(application, name=APP_NAME, route_prefix="/")
        print(
            f"xmodal on Ray Serve at http://{settings.host}:{settings.port} "
            f"(data dir {settings.data_dir}); Ctrl-C stops it",
            file=sys.stderr,
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        try:
            serve.delete(APP_NAME)
            if started:
                serve.shutdown()
        finally:
            if started:
                ray.shutdown()
    return 0


def app_builder(args: dict[str, Any]) -> Any:
    """The application for a Serve config file or a KubeRay `RayService`
    (`import_path: app.distributed.serve:app_builder`). `args`: any Settings field (the rest
    comes from XMODAL_* variables as usual), plus `replicas` or `min_replicas`/`max_replicas`,
    `replica_cpus`, `replica_gpus`, `replica_batching`, and `ingress_resource`: a custom
    resource that only the node holding the data dir offers (e.g. `xmodal_data`)."""
    args = dict(args)
    scaling = Scaling(
        replicas=args.pop("replicas", None),
        min_replicas=args.pop("min_replicas", None),
        max_replicas=args.pop("max_replicas", None),
        replica_cpus=float(args.pop("replica_cpus", 1.0)),
        replica_gpus=args.pop("replica_gpus", None),
        batching=args.pop("replica_batching", "serve"),
    )
    if scaling.min_replicas is None and scaling.max_replicas is None:
        scaling.replicas = scaling.replicas or 1
    resource = args.pop("ingress_resource", None)
    settings = Settings(**args)
    return build_application(
        settings, scaling, ingress_resources={resource: 0.001} if resource else None
    )
