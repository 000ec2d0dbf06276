"""A multi-node Ray cluster on one host, all on 127.0.0.1: for the tests and the benchmarks that prove
saikyo on a cluster (node loss, rolling upgrades, autoscaling) without a second machine.

Each node is a process of its own (`python -m saikyo.bench.raycluster node ...`) in a session of its
own: it starts one raylet with its own resources (the head also the GCS and the dashboard, whose REST
API `serve deploy` talks to), the way `ray start` does, and waits. Every process of a node (raylet,
agents, the Serve replicas its raylet starts) inherits that session, so "kill the node" is a SIGKILL to
every process of the session, and stopping the cluster leaves nothing behind.

Why not `ray start`: on one host every node must have address 127.0.0.1, and Ray keeps its sockets
there only with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (see saikyo.scale.ray.loopback_environment), under
which `ray start --address` refuses to join. Ray's own test clusters (ray.cluster_utils.Cluster) start
nodes the same way as here; on real machines a user types `ray start` (deploy/README.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saikyo.bench.localserver import free_port
from saikyo.scale import processes
from saikyo.scale.ray import APP_NAME, DEPLOYMENT_NAME, loopback_environment

ROOT = Path(__file__).resolve().parents[3]
SERVE_CONFIG = ROOT / "deploy" / "ray" / "serve-config.yaml"
START_TIMEOUT_S = 240.0
# The GCS declares a node dead after `failure_threshold` missed health checks `period` apart (Ray's
# defaults, 3 s x 5, take ~15 s); a cluster that should fail over fast lowers them (deploy/README.md).
HEALTH_CHECK = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}
# Serve's proxy prefers replicas on its own node until they are full: right with a proxy on every node
# behind a load balancer, but here the one proxy (on the head) would leave the worker's replicas idle.
ROUTING = {"RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0"}


@dataclass
class RayNode:
    name: str
    proc: subprocess.Popen[bytes]
    info: dict[str, Any]

    @property
    def sid(self) -> int:
        return self.proc.pid  # started with start_new_session: its pid is its session's id

    @property
    def node_id(self) -> str:
        return str(self.info["node_id"])

    def processes(self) -> processes.Tracked:
        return processes.in_session(self.sid)

    def kill(self) -> list[int]:
        """SIGKILL every process of this node at once: a machine that lost power."""
        killed = processes.kill_session(self.sid)
        self.proc.wait(10)
        return killed


@dataclass
class LoopbackCluster:
    root: Path  # node logs, ready files, configs
    ray_dir: Path  # Ray's temp dir: short, for the Unix socket paths in it (at most 107 bytes)
    env: dict[str, str]
    dashboard_port: int = 0
    gcs_port: int = 0
    nodes: dict[str, RayNode] = field(default_factory=dict)

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def add_node(
        self, name: str, num_cpus: int, resources: dict[str, float] | None = None, head: bool | None = None
    ) -> RayNode:
        """Start a node (the first one is the head) and wait until it has joined. A head started again
        (after its loss) takes the ports of the first one, where the other nodes look for it."""
        head = not self.nodes if head is None else head
        ready = self.root / f"{name}.json"
        ready.unlink(missing_ok=True)
        cmd = [
            sys.executable, "-m", "saikyo.bench.raycluster", "node", "--name", name,
            "--num-cpus", str(num_cpus), "--resources", json.dumps(resources or {}),
            "--temp-dir", str(self.ray_dir), "--ready-file", str(ready),
        ]  # fmt: skip
        if head:
            self.gcs_port = self.gcs_port or free_port()
            self.dashboard_port = self.dashboard_port or free_port()
            cmd += ["--head", "--port", str(self.gcs_port), "--dashboard-port", str(self.dashboard_port)]
        else:
            cmd += ["--address", self.gcs_address]
        log = (self.root / f"{name}.log").open("ab")
        proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                processes.kill_session(proc.pid)
                tail = (self.root / f"{name}.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"Ray node {name} did not start (exit {proc.poll()}):\n{tail}")
            time.sleep(0.2)
        node = RayNode(name, proc, json.loads(ready.read_text()))
        self.nodes[name] = node
        return node

    def serve(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """The `serve` CLI against this cluster's dashboard, as a user runs it (`serve deploy ...`)."""
        cmd = [sys.executable, "-m", "ray.serve.scripts", *args, "--address", self.dashboard]
        out = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            raise RuntimeError(f"serve {' '.join(args)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
        return out

    def applications(self) -> dict[str, Any]:
        """Serve's view (the dashboard's REST API): applications, deployments, replicas with node ids."""
        request = urllib.request.Request(f"{self.dashboard}/api/serve/applications/", headers=self._auth())
        with urllib.request.urlopen(request, timeout=10) as answer:
            body: dict[str, Any] = json.load(answer)
        return body

    def replicas(self, states: tuple[str, ...] = ("RUNNING",)) -> list[dict[str, Any]]:
        """The saikyo deployment's replicas in `states` (each with replica_id, node_id, pid, state)."""
        apps = self.applications().get("applications") or {}
        deployment = (apps.get(APP_NAME) or {}).get("deployments", {}).get(DEPLOYMENT_NAME) or {}
        return [r for r in deployment.get("replicas", []) if r.get("state") in states]

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"}

    def stop(self) -> list[int]:
        """SIGKILL every process of every node (workers first): nothing of the cluster outlives this."""
        killed: list[int] = []
        for node in reversed(list(self.nodes.values())):
            killed += processes.kill_session(node.sid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.proc.wait(10)
        return killed


@contextlib.contextmanager
def loopback_cluster(root: Path | None = None, **env: str) -> Iterator[LoopbackCluster]:
    """A cluster with no nodes yet (add_node: the first is the head); `env`: extra variables for every
    node and the serve CLI. Everything it started is killed on exit; a temporary root is removed."""
    own_root = root is None
    root = Path(tempfile.mkdtemp(prefix="saikyo-raycluster-")) if root is None else root
    root.mkdir(parents=True, exist_ok=True)
    ray_dir = Path(tempfile.mkdtemp(prefix="saikyo-rc-"))
    cluster = LoopbackCluster(root, ray_dir, {**os.environ, **loopback_environment(), **HEALTH_CHECK, **ROUTING, **env})
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(ray_dir, ignore_errors=True)
        if own_root:
            shutil.rmtree(root, ignore_errors=True)


def serve_config(
    port: int, args: dict[str, Any], deployment: dict[str, Any], template: Path = SERVE_CONFIG
) -> dict[str, Any]:
    """deploy/ray/serve-config.yaml with what a user edits for this cluster: the proxy on 127.0.0.1:`port`
    on the head only (every node here shares one address, so one proxy per node would collide on the
    port), the app's `args`, and the deployment's options (`num_replicas` drops the template's
    autoscaling_config and vice versa)."""
    import yaml

    config: dict[str, Any] = yaml.safe_load(template.read_text())
    config["proxy_location"] = "HeadOnly"
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    app = config["applications"][0]
    app["args"] = {**app["args"], **args}
    options = app["deployments"][0]
    if "num_replicas" in deployment:
        options.pop("autoscaling_config", None)
    elif "autoscaling_config" in deployment:
        options.pop("num_replicas", None)
        merged = {**options.get("autoscaling_config", {}), **deployment["autoscaling_config"]}
        deployment = {**deployment, "autoscaling_config": merged}
    options.update(deployment)
    return config


def write_config(path: Path, config: dict[str, Any]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# ---- one node: what `ray start` does, kept on 127.0.0.1 ----
def run_node(a: argparse.Namespace) -> None:
    from ray._private.node import Node
    from ray._private.parameter import RayParams

    params = RayParams(
        node_ip_address="127.0.0.1",
        num_cpus=a.num_cpus,
        num_gpus=0,
        resources=json.loads(a.resources),
        object_store_memory=a.object_store_mib * 1024 * 1024,
        min_worker_port=0,
        max_worker_port=0,
        temp_dir=a.temp_dir,
        # Every node on this host has the same address: each agent needs ports of its own.
        dashboard_agent_listen_port=free_port(),
        metrics_export_port=free_port(),
        include_log_monitor=a.head,
    )
    if a.head:
        params.update(
            gcs_server_port=a.port, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=a.dashboard_port
        )
    else:
        params.update(gcs_address=a.address, include_dashboard=False)
    node = Node(params, head=a.head, shutdown_at_exit=False, spawn_reaper=False)
    info = {"name": a.name, "node_id": node.node_id, "gcs_address": node.gcs_address, "pid": os.getpid()}
    scratch = Path(a.ready_file).with_suffix(".tmp")
    scratch.write_text(json.dumps(info))
    scratch.rename(a.ready_file)  # whole or absent
    print(f"node {a.name} up: {info}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        signal.pause()


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m saikyo.bench.raycluster")
    sub = ap.add_subparsers(dest="command", required=True)
    n = sub.add_parser("node", help="start one node of a loopback cluster and wait")
    n.add_argument("--name", required=True)
    n.add_argument("--head", action="store_true")
    n.add_argument("--port", type=int, help="head: the GCS port")
    n.add_argument("--dashboard-port", type=int)
    n.add_argument("--address", help="worker: the head's GCS address")
    n.add_argument("--num-cpus", type=int, required=True)
    n.add_argument("--resources", default="{}")
    n.add_argument("--object-store-mib", type=int, default=100)
    n.add_argument("--temp-dir", required=True)
    n.add_argument("--ready-file", required=True)
    run_node(ap.parse_args())


if __name__ == "__main__":
    main()
