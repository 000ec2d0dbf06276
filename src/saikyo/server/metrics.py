"""Prometheus metrics: one CollectorRegistry per app (several apps can share a process, e.g. in tests or
under Ray), an ASGI middleware that counts requests, and GET /metrics.

What is measured where:
- requests and their latency: the middleware, labelled by route template (never the raw path, so that
  label values stay bounded), method, model and status;
- images, batch sizes and inference time: the batchers' on_batch hook, once per forward pass;
- queue depth and model load state: read from the served models at scrape time;
- for a runner that pipelines batches on a GPU (torch): batches, device seconds (CUDA events, staging
  copy to copy back) and host seconds (staging, launching, copying out) summed, and batches in flight
  now, read from its running totals at scrape time. Per batch, device ms = rate(device) / rate(batches)
  beside host ms the same way: whichever is larger is the limit.

Under Ray Serve each replica, and under --workers each worker process, has its own registry;
`app.state.metrics_view` then turns the answering process's exposition into the whole server's (see
saikyo.scale.workers.shared_metrics and merge_expositions).
"""

from __future__ import annotations

import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from saikyo.server.served import ServedModels, ModelState

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
UNMATCHED = "unmatched"  # the route label of requests no route matched (404s for random paths)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.served: ServedModels | None = None  # set when the app starts
        r = self.registry
        self.requests = Counter(
            "saikyo_http_requests", "HTTP requests answered", ["route", "method", "model", "status"], registry=r
        )
        self.latency = Histogram(
            "saikyo_http_request_duration_seconds",
            "Time from request to the end of the response",
            ["route", "method", "model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.client_disconnects = Counter(
            "saikyo_client_disconnects",
            "Requests whose client closed the connection before the answer (mid-upload or while waiting)",
            ["route"],
            registry=r,
        )
        self.images = Counter("saikyo_images", "Images (or client tensors) run through a model", ["model"], registry=r)
        self.batch_size = Histogram(
            "saikyo_batch_size", "Images per forward pass", ["model"], buckets=BATCH_BUCKETS, registry=r
        )
        self.inference = Histogram(
            "saikyo_inference_duration_seconds",
            "Time one forward pass spends in the runtime",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        r.register(_ModelCollector(self))
        ProcessCollector(registry=r)

    def observe_batch(self, model: str, size: int, seconds: float) -> None:
        """The ServedModels's on_batch hook."""
        self.images.labels(model).inc(size)
        self.batch_size.labels(model).observe(size)
        self.inference.labels(model).observe(seconds)

    def observe_request(self, route: str, method: str, model: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, model, str(status)).inc()
        self.latency.labels(route, method, model).observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _ModelCollector(Collector):
    """Gauges read at scrape time, so they are never stale."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        queue = GaugeMetricFamily("saikyo_queue_images", "Images waiting for a batch", labels=["model"])
        running = GaugeMetricFamily("saikyo_running_images", "Images in the forward pass now running", labels=["model"])
        state = GaugeMetricFamily(
            "saikyo_model_state", f"1 for the state each model is in ({', '.join(s.value for s in ModelState)})", labels=["model", "state"]
        )
        batches = CounterMetricFamily(
            "saikyo_runner_batches", "Batches a pipelined runner completed", labels=["model"]
        )
        device = CounterMetricFamily(
            "saikyo_runner_device_seconds",
            "Device time of completed batches (CUDA events: staging copy, forward pass, copy back)",
            labels=["model"],
        )
        host = CounterMetricFamily(
            "saikyo_runner_host_seconds",
            "Host time of completed batches (staging and launching them, copying results out)",
            labels=["model"],
        )
        in_flight = GaugeMetricFamily(
            "saikyo_runner_in_flight_batches", "Batches launched on the device and not yet complete", labels=["model"]
        )
        served = self._metrics.served
        for name, model in (served.models if served is not None else {}).items():
            batchers = [b for b in (model.image_batcher, model.tensor_batcher) if b is not None]
            queue.add_metric([name], sum(b.queued_images for b in batchers))
            running.add_metric([name], sum(b.running_images for b in batchers))
            for s in ModelState:
                state.add_metric([name, s.value], 1.0 if model.state is s else 0.0)
            stats = model.runner.stats if model.runner is not None else None
            if stats is not None:
                batches.add_metric([name], stats.batches)
                device.add_metric([name], stats.device_seconds)
                host.add_metric([name], stats.host_seconds)
                in_flight.add_metric([name], stats.in_flight)
        return [queue, running, state, batches, device, host, in_flight]

    def describe(self) -> Iterable[Metric]:
        return []


class MetricsMiddleware:
    """Counts every HTTP request. Pure ASGI: it never buffers a response body."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets if the app raises before answering

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            route, path_params = _route_of(scope)
            self.metrics.observe_request(
                route, scope["method"], self._model(route, path_params, scope), status, time.perf_counter() - started
            )

    def _model(self, route: str, path_params: dict[str, Any], scope: Scope) -> str:
        """The model a request addressed, if the server holds it; "" otherwise (bounded label values)."""
        served = self.metrics.served
        if served is None:
            return ""
        name: Any = path_params.get("model_name")
        if name is None and route == "/classify":
            query = urllib.parse.parse_qs(scope.get("query_string", b"").decode("latin-1"))
            name = query.get("model", [served.settings.default_model])[0]
        return name if isinstance(name, str) and name in served.models else ""


def _route_of(scope: Scope) -> tuple[str, dict[str, Any]]:
    """The route template and path parameters. The router records them in the scope; a request that a
    middleware refused before routing (401, 503) is matched here instead."""
    route = scope.get("route")
    if route is not None:
        return getattr(route, "path", UNMATCHED), scope.get("path_params", {})
    app = scope.get("app")
    for candidate in getattr(getattr(app, "router", None), "routes", ()):
        match, child = candidate.matches(scope)
        if match is not Match.NONE:
            return getattr(candidate, "path", UNMATCHED), child.get("path_params", {})
    return UNMATCHED, {}


router = APIRouter()


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    description="Prometheus text exposition format 0.0.4.",
    response_class=Response,
    responses={200: {"description": "the metrics", "content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def metrics_endpoint(request: Request) -> Response:
    metrics: Metrics = request.app.state.metrics
    body = metrics.exposition()
    view: Callable[[bytes], Awaitable[bytes]] | None = request.app.state.metrics_view
    if view is not None:
        body = await view(body)
    return Response(body, media_type=CONTENT_TYPE_PLAIN_0_0_4)


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


def merge_expositions(texts: Mapping[str, bytes], label: str = "replica", unlabelled: bytes = b"") -> bytes:
    """Several processes' expositions as one: each sample gains `label`="<its source>", each family is
    declared once. The series stay apart, so sums and rates over them are the querier's choice.
    `unlabelled` holds what is one value for all of them (e.g. how many were replaced): kept as it is."""
    families: dict[str, Metric] = {}
    sources = [(None, unlabelled), *sorted(texts.items())]
    for source, text in sources:
        for family in text_string_to_metric_families(text.decode()):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            for sample in family.samples:
                labels = sample.labels if source is None else {**sample.labels, label: source}
                merged.add_sample(sample.name, labels, sample.value, sample.timestamp)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families.values())))
    return generate_latest(registry)
