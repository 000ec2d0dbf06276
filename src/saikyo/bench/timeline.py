"""Closed-loop load in which every request is kept with its times, for what happens over time (a node
lost, a version rolled out, replicas added and given back) rather than one steady-state number.

Each client thread sends `POST /v2/models/{model}/infer` (one encoded image) as soon as its last answer
came; `set_clients` changes how many are sending, for a ramp. An answer records when it was sent and
finished (seconds since start), its status, the replica that answered (`x-saikyo-replica`), the model
version and, for a failure, what the body or the exception said. Stdlib only, so that it runs wherever
saikyo does.
"""

from __future__ import annotations

import base64
import json
import statistics
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

REPLICA_HEADER = "x-saikyo-replica"


@dataclass(frozen=True)
class Answer:
    sent: float
    done: float
    status: int  # 0: no HTTP answer at all (connection refused or reset, timeout)
    replica: str = ""
    version: str = ""
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class ClosedLoop:
    def __init__(self, url: str, model: str, image: Path, max_clients: int, timeout_s: float = 30.0) -> None:
        encoded = base64.b64encode(image.read_bytes()).decode()
        doc = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": [encoded]}]}
        self.body = json.dumps(doc).encode()
        self.url = f"{url}/v2/models/{model}/infer"
        self.timeout_s = timeout_s
        self.answers: list[Answer] = []
        self.clients = 0
        self.start = time.monotonic()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(max_clients)]
        for t in self._threads:
            t.start()

    def now(self) -> float:
        return time.monotonic() - self.start

    def set_clients(self, n: int) -> None:
        self.clients = min(n, len(self._threads))

    def stop(self) -> list[Answer]:
        """Stop sending; returns every answer once the requests in flight have ended (each bounded)."""
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout_s + 5)
        with self._lock:
            return sorted(self.answers, key=lambda a: a.sent)

    def _client(self, index: int) -> None:
        while not self._stop.is_set():
            if index >= self.clients:
                time.sleep(0.05)
                continue
            answer = self._one()
            with self._lock:
                self.answers.append(answer)

    def _one(self) -> Answer:
        sent = self.now()
        request = urllib.request.Request(self.url, data=self.body, headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as r:
                doc = json.load(r)
                replica, version = _replica(r.headers.get(REPLICA_HEADER)), str(doc.get("model_version", ""))
                return Answer(sent, self.now(), r.status, replica, version)
        except urllib.error.HTTPError as e:
            text = e.read().decode(errors="replace")
            try:
                error = json.loads(text)["error"]
            except (ValueError, KeyError, TypeError):
                error = "not JSON: " + text[:200]
            return Answer(sent, self.now(), e.code, _replica(e.headers.get(REPLICA_HEADER)), error=error)
        except (OSError, ValueError) as e:  # refused, reset, timed out, a body that is not JSON
            return Answer(sent, self.now(), 0, error=f"{type(e).__name__}: {e}")


def _replica(header: str | None) -> str:
    return (header or "").split(" ", 1)[0]


def per_second(answers: list[Answer], until: float) -> list[dict[str, float]]:
    """Per whole second (by finish time): answers ok, failed, and the p99 latency of those ok, in ms."""
    rows = []
    for second in range(int(until) + 1):
        batch = [a for a in answers if second <= a.done < second + 1]
        latencies = sorted((a.done - a.sent) * 1000 for a in batch if a.ok)
        p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else float("nan")
        failed = float(len(batch) - len(latencies))
        rows.append({"t": float(second), "ok": float(len(latencies)), "failed": failed, "p99_ms": p99})
    return rows


def steady_rate(rows: list[dict[str, float]], start: float, end: float) -> float:
    """Median answers ok per second over [start, end)."""
    values = [r["ok"] for r in rows if start <= r["t"] < end]
    return statistics.median(values) if values else 0.0
