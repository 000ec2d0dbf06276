"""Losing the head of a Ray cluster with GCS fault tolerance on: an external Redis (Debian's
redis-server, on 127.0.0.1) keeps the GCS's state, so a head started again on the same address takes
the cluster back: the worker node and its replica live through the outage and Serve, its controller
recovered from Redis, runs the deployment again. Skipped where redis-server is not installed
(apt-get install redis-server). A cluster of its own (saikyo.bench.raycluster), so its own file."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from support.paths import CAT
from support.tinymodel import add_tiny_model

from saikyo.bench.localserver import free_port
from saikyo.models.repository import ModelRepository
from saikyo.scale import processes

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("ray") is None, reason="Ray Serve is not installed: pip install -e '.[ray]'"
    ),
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server (apt-get install redis-server)"),
]


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    log = (tmp_path / "redis.log").open("w")
    proc = subprocess.Popen(
        ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True, text=True).stdout.strip() != "PONG":
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "redis.log").read_text()
            time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        processes.kill_session(proc.pid)
        proc.wait(10)
        log.close()


def test_the_cluster_survives_a_head_restart_with_gcs_fault_tolerance(redis: str, tmp_path: Path) -> None:
    from saikyo.bench.raycluster import loopback_cluster, serve_config, write_config

    repo = ModelRepository(tmp_path / "repository")
    add_tiny_model(repo, "tiny", seed=0)
    port = free_port()
    # The worker's raylet waits this long for the GCS to come back (Ray's default: 60 s).
    env = {"RAY_REDIS_ADDRESS": redis, "RAY_gcs_rpc_server_reconnect_timeout_s": "180"}
    with loopback_cluster(tmp_path / "cluster", HOME=str(tmp_path), **env) as cluster:
        cluster.add_node("head", 1, {"saikyo_head": 1})
        worker = cluster.add_node("worker", 1, {"saikyo_worker": 1})
        args = {"models": "tiny", "repository": str(repo.root), "backend": "onnxruntime", "device": "cpu"}
        config = serve_config(port, args, {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.5}})
        cluster.serve("deploy", str(write_config(tmp_path / "serve-config.yaml", config)))
        deadline = time.monotonic() + 240
        while len(cluster.replicas()) < 2:
            assert time.monotonic() < deadline, "two replicas not running within 240 s"
            time.sleep(1)
        on_worker = next(r for r in cluster.replicas() if r["node_id"] == worker.node_id)

        cluster.nodes.pop("head").kill()  # GCS, dashboard, Serve controller and proxy, the head's replica
        killed_at = time.monotonic()
        time.sleep(5)
        assert on_worker["pid"] in worker.processes()  # the worker node lives on without its head
        cluster.add_node("head", 1, {"saikyo_head": 1}, head=True)  # same address and ports
        head_up = time.monotonic() - killed_at

        deadline = time.monotonic() + 180
        replicas: list[dict[str, object]] = []
        while len(replicas) < 2:
            assert time.monotonic() < deadline, f"two replicas not running again within 180 s: {replicas}"
            time.sleep(1)
            try:
                replicas = cluster.replicas()
            except OSError:  # the dashboard is still starting
                replicas = []
        back = time.monotonic() - killed_at
        # The replica on the worker lived through it: same replica, same process, still serving.
        assert (on_worker["replica_id"], on_worker["pid"]) in {(r["replica_id"], r["pid"]) for r in replicas}
        assert on_worker["pid"] in worker.processes()
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while _status(url + "/v2/health/ready") != 200:
            assert time.monotonic() < deadline, "not ready within 60 s of the replicas running again"
            time.sleep(0.5)
        files = [("images", ("cat.jpg", CAT.read_bytes(), "image/jpeg"))]
        answers = [httpx.post(f"{url}/classify", files=files, params={"model": "tiny"}, timeout=60) for _ in range(8)]
        assert [a.status_code for a in answers] == [200] * 8
        print(
            f"head restart with GCS FT: head up again {head_up:.1f} s after the kill, two replicas running "
            f"{back:.1f} s after; the worker's replica {on_worker['replica_id']} (pid {on_worker['pid']}) lived through it"
        )


def _status(url: str) -> int:
    try:
        return httpx.get(url, timeout=10).status_code
    except httpx.HTTPError:
        return 0
