"""GET /metrics, scraped with prometheus_client's own parser: the counts move with the traffic sent."""

from __future__ import annotations

import asyncio
import base64

import httpx
from support.paths import CAT, DATA
from prometheus_client.parser import text_string_to_metric_families

from saikyo.server import create_app
from saikyo.server.metrics import Metrics, merge_expositions
from saikyo.settings import Settings

COFFEE = DATA / "coffee.jpg"
INFER = "/v2/models/{model_name}/infer"


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    response = httpx.get(f"{url}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: dict[tuple[str, frozenset], float] = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_counts_follow_the_traffic(tiny_server) -> None:
    url = tiny_server.url
    before = scrape(url)

    files = [("images", ("cat.jpg", CAT.read_bytes())), ("images", ("coffee.jpg", COFFEE.read_bytes()))]
    for _ in range(3):
        assert httpx.post(f"{url}/classify", params={"model": "tiny"}, files=files, timeout=60).status_code == 200
    doc = {
        "inputs": [
            {"name": "images", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(CAT.read_bytes()).decode()]}
        ]
    }
    assert httpx.post(f"{url}/v2/models/tiny2/infer", json=doc, timeout=60).status_code == 200
    assert httpx.post(f"{url}/classify", params={"model": "nope"}, files=files, timeout=60).status_code == 404
    assert (
        httpx.post(f"{url}/classify", params={"model": "tiny"}, files=[("other", ("x", b"x"))], timeout=60).status_code
        == 400
    )
    assert httpx.get(f"{url}/no/such/page", timeout=10).status_code == 404

    after = scrape(url)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    requests = "saikyo_http_requests_total"
    assert delta(requests, route="/classify", method="POST", model="tiny", status="200") == 3
    assert delta(requests, route="/classify", method="POST", model="tiny", status="400") == 1
    # An unknown model is not a label value: label sets stay bounded whatever clients send.
    assert delta(requests, route="/classify", method="POST", model="", status="404") == 1
    assert delta(requests, route=INFER, method="POST", model="tiny2", status="200") == 1
    assert delta(requests, route="unmatched", method="GET", model="", status="404") == 1
    latency = "saikyo_http_request_duration_seconds"
    assert delta(f"{latency}_count", route="/classify", method="POST", model="tiny") == 4
    assert delta(f"{latency}_sum", route="/classify", method="POST", model="tiny") > 0
    assert delta(f"{latency}_bucket", route="/classify", method="POST", model="tiny", le="+Inf") == 4

    # Images, batches and inference time come from the batchers: /classify and v2 share them.
    assert delta("saikyo_images_total", model="tiny") == 6
    assert delta("saikyo_images_total", model="tiny2") == 1
    assert delta("saikyo_batch_size_sum", model="tiny") == 6
    assert 3 <= delta("saikyo_batch_size_count", model="tiny") <= 6
    assert delta("saikyo_batch_size_count", model="tiny2") == 1
    assert delta("saikyo_inference_duration_seconds_count", model="tiny") == delta(
        "saikyo_batch_size_count", model="tiny"
    )
    assert delta("saikyo_inference_duration_seconds_sum", model="tiny") > 0

    # Read at scrape time: idle queues, loaded models.
    for model in ("tiny", "tiny2"):
        assert value(after, "saikyo_queue_images", model=model) == 0
        assert value(after, "saikyo_running_images", model=model) == 0
        assert value(after, "saikyo_model_state", model=model, state="ready") == 1
        assert value(after, "saikyo_model_state", model=model, state="loading") == 0
    assert ("process_cpu_seconds_total", frozenset()) in after


def test_each_app_has_its_own_registry() -> None:
    """Two apps in one process: no duplicate-metric clash, and each counts only its own traffic."""
    first, second = create_app(Settings(models=("a",))), create_app(Settings(models=("b",)))
    assert first.state.metrics.registry is not second.state.metrics.registry

    async def hit(app, path: str) -> int:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as c:
            return (await c.get(path)).status_code

    assert asyncio.run(hit(first, "/nowhere")) == 404
    assert asyncio.run(hit(first, "/v2")) == 200

    def count(app, **labels: str) -> float:
        samples = {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(app.state.metrics.exposition().decode())
            for s in family.samples
        }
        return value(samples, "saikyo_http_requests_total", **labels)

    assert count(first, route="unmatched", method="GET", model="", status="404") == 1
    assert count(first, route="/v2", method="GET", model="", status="200") == 1
    assert count(second, route="unmatched", method="GET", model="", status="404") == 0


def test_merged_expositions_keep_each_source_apart() -> None:
    """What /metrics answers under Ray: every replica's samples, labelled, each family declared once."""
    a, b = Metrics(), Metrics()
    a.observe_request("/classify", "POST", "tiny", 200, 0.01)
    a.observe_batch("tiny", 3, 0.02)
    b.observe_request("/classify", "POST", "tiny", 200, 0.2)
    b.observe_request("/classify", "POST", "tiny", 400, 0.2)
    text = merge_expositions({"r1": a.exposition(), "r2": b.exposition()}).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {(s.name, frozenset(s.labels.items())): s.value for f in families.values() for s in f.samples}
    ok = {"route": "/classify", "method": "POST", "model": "tiny", "status": "200"}
    assert value(samples, "saikyo_http_requests_total", **ok, replica="r1") == 1
    assert value(samples, "saikyo_http_requests_total", **ok, replica="r2") == 1
    assert value(samples, "saikyo_http_requests_total", **{**ok, "status": "400"}, replica="r2") == 1
    assert value(samples, "saikyo_images_total", model="tiny", replica="r1") == 3
    assert value(samples, "saikyo_images_total", model="tiny", replica="r2") == 0
    latency = {"route": "/classify", "method": "POST", "model": "tiny"}
    assert value(samples, "saikyo_http_request_duration_seconds_bucket", **latency, le="0.1", replica="r2") == 0
    assert value(samples, "saikyo_http_request_duration_seconds_count", **latency, replica="r2") == 2
    assert families["saikyo_http_request_duration_seconds"].type == "histogram"
    assert text.count("# TYPE saikyo_http_requests_total counter") == 1
    # Process metrics come from both processes, told apart by the label.
    assert {s.labels["replica"] for s in families["process_cpu_seconds"].samples} == {"r1", "r2"}
    assert merge_expositions({}) == b""


def test_a_replica_answers_with_its_own_metrics_when_the_board_is_gone(monkeypatch) -> None:
    """Under Ray: the board actor may die with the replica that created it; a scrape still answers,
    and the next call looks the board up (or creates it) again."""
    from saikyo.scale import ray_metrics

    class Method:
        def __init__(self, fn):
            self.fn = fn

        def remote(self, *args):
            async def call():
                return self.fn(*args)

            return call()

    class FakeBoard:
        def __init__(self, alive: bool) -> None:
            self.board, self.alive = ray_metrics.MetricsBoard(), alive

        def __getattr__(self, name):
            def method(*args):
                if not self.alive:
                    from ray.exceptions import ActorDiedError

                    raise ActorDiedError()
                return getattr(self.board, name)(*args)

            return Method(method)

    boards = [FakeBoard(alive=False), FakeBoard(alive=True)]
    monkeypatch.setattr(ray_metrics, "board_for", lambda app: boards.pop(0))
    mine, other = Metrics(), Metrics()
    mine.observe_batch("tiny", 2, 0.01)
    other.observe_batch("tiny", 5, 0.01)
    replica = ray_metrics.ReplicaMetrics("saikyo", "r1", mine)

    def images(text: bytes) -> dict[str, float]:
        return {
            s.labels["replica"]: s.value
            for f in text_string_to_metric_families(text.decode())
            for s in f.samples
            if s.name == "saikyo_images_total"
        }

    async def go() -> None:
        assert images(await replica.view(mine.exposition())) == {"r1": 2}  # dead board: own metrics only
        live = boards[0]
        live.board.publish("r2", other.exposition())
        assert images(await replica.view(mine.exposition())) == {"r1": 2, "r2": 5}  # the new board
        await asyncio.sleep(0.02)
        assert live.board.snapshot(0.01) == {}  # entries older than max_age_s drop out

    asyncio.run(go())
