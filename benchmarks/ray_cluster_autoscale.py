"""Autoscaling on a two-node Ray cluster, measured: replicas and p99 over a load ramp low -> high -> zero.

Starts a loopback cluster (saikyo.bench.raycluster: a head and a worker node, each its own raylet on
127.0.0.1), deploys deploy/ray/serve-config.yaml with `serve deploy` and `num_replicas: auto`, then
drives closed-loop v2 requests (saikyo.bench.timeline): `--low` clients, then `--high`, then none,
sampling the running replicas (the dashboard's REST API) every second. Writes one JSON line per second
(t, phase, clients, replicas, ok, failed, p99_ms) and a last line with the summary, and draws replicas
and p99 against time.

    python benchmarks/ray_cluster_autoscale.py                     # the tiny test model
    python benchmarks/ray_cluster_autoscale.py --out benchmarks/results/ray-autoscale-amd-epyc-2core

Last line printed: up_s=<seconds from the high load to the first added replica> peak=<replicas>
down_s=<seconds from the end of the load to min_replicas again> failed=<requests>.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

from saikyo.bench.localserver import free_port
from saikyo.bench.raycluster import loopback_cluster, serve_config, write_config
from saikyo.bench.timeline import ClosedLoop, per_second
from saikyo.models.repository import ModelRepository

ROOT = Path(__file__).resolve().parent.parent
CAT = ROOT / "tests" / "data" / "cat.jpg"
sys.path.insert(0, str(ROOT / "tests"))
from tinymodel import add_tiny_model  # noqa: E402


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--low", type=int, default=1, help="clients in the low phase")
    ap.add_argument("--high", type=int, default=8, help="clients in the high phase")
    ap.add_argument("--low-s", type=float, default=20.0)
    ap.add_argument("--high-s", type=float, default=60.0)
    ap.add_argument("--quiet-s", type=float, default=90.0, help="at most this long without load (for min_replicas)")
    ap.add_argument("--max-replicas", type=int, default=3)
    ap.add_argument("--target-ongoing-requests", type=float, default=2.0)
    ap.add_argument("--upscale-delay-s", type=float, default=3.0)
    ap.add_argument("--downscale-delay-s", type=float, default=20.0, help="the config's default is 120")
    ap.add_argument("--out", type=Path, default=None, help="path stem for .jsonl and .png (default: a temp dir)")
    a = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="saikyo-autoscale-"))
    repo = ModelRepository(work / "repository")
    add_tiny_model(repo, "tiny", seed=0)
    port = free_port()
    autoscaling = {
        "min_replicas": 1, "max_replicas": a.max_replicas, "target_ongoing_requests": a.target_ongoing_requests,
        "upscale_delay_s": a.upscale_delay_s, "downscale_delay_s": a.downscale_delay_s,
    }  # fmt: skip
    args = {
        "models": "tiny", "repository": str(repo.root), "backend": "onnxruntime", "device": "cpu", "max_batch_size": 8,
    }  # fmt: skip
    with loopback_cluster(work / "cluster", HOME=str(work)) as cluster:
        cluster.add_node("head", 1, {"saikyo_head": 1})
        cluster.add_node("worker", 1, {"saikyo_worker": 1})
        config = serve_config(port, args, {"autoscaling_config": autoscaling, "ray_actor_options": {"num_cpus": 0.5}})
        cluster.serve("deploy", str(write_config(work / "serve-config.yaml", config)))
        deadline = time.monotonic() + 240
        while len(cluster.replicas()) < 1:
            if time.monotonic() > deadline:
                raise SystemExit("no replica running after 240 s")
            time.sleep(1)
        load = ClosedLoop(f"http://127.0.0.1:{port}", "tiny", CAT, max_clients=max(a.low, a.high))
        replicas: list[tuple[float, int]] = []
        phases: list[tuple[float, str, int]] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                try:
                    replicas.append((load.now(), len(cluster.replicas())))
                except OSError:
                    pass
                stop.wait(1.0)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()

        def phase(name: str, clients: int) -> None:
            phases.append((load.now(), name, clients))
            load.set_clients(clients)
            print(f"{load.now():6.1f} s  {name}: {clients} clients", flush=True)

        phase("low", a.low)
        time.sleep(a.low_s)
        phase("high", a.high)
        time.sleep(a.high_s)
        phase("zero", 0)
        quiet_until = load.now() + a.quiet_s
        time.sleep(2)
        while load.now() < quiet_until and not (replicas and replicas[-1][1] == 1):
            time.sleep(1)
        time.sleep(3)
        answers = load.stop()
        stop.set()
        sampler.join(5)

    end = replicas[-1][0] if replicas else load.now()
    rows = per_second(answers, end)
    high_at, zero_at = phases[1][0], phases[2][0]
    up = next((t for t, n in replicas if t >= high_at and n > 1), math.nan)
    down = next((t for t, n in replicas if t >= zero_at and n == 1), math.nan)
    peak = max(n for _, n in replicas)
    failed = sum(not x.ok for x in answers)

    def at(t: float) -> tuple[str, int, int]:
        name, clients = next(((p, c) for s, p, c in reversed(phases) if s <= t), ("low", a.low))
        count = next((n for s, n in reversed(replicas) if s <= t + 0.5), replicas[0][1])
        return name, clients, count

    records = []
    for r in rows:
        name, clients, count = at(r["t"])
        p99 = None if math.isnan(r["p99_ms"]) else round(r["p99_ms"], 1)
        records.append({
            "t": r["t"], "phase": name, "clients": clients, "replicas": count, "ok": r["ok"], "failed": r["failed"],
            "p99_ms": p99,
        })  # fmt: skip
    summary = {
        "kind": "summary", "model": "tiny (tests/tinymodel.py)", "nodes": 2, "cpus_per_node": 1,
        "cpus_per_replica": 0.5,
        "cpu_model": cpu_model(), "cores": os.cpu_count(), "autoscaling_config": autoscaling,
        "clients": {"low": a.low, "high": a.high}, "phases_s": {p: round(s, 1) for s, p, _ in phases},
        "requests": len(answers), "failed": failed, "peak_replicas": peak,
        "first_added_replica_after_s": round(up - high_at, 1), "back_to_min_after_s": round(down - zero_at, 1),
    }  # fmt: skip
    stem = a.out or work / "ray-autoscale"
    stem.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{stem}.jsonl", "w") as f:
        for rec in [*records, summary]:
            f.write(json.dumps(rec) + "\n")
    draw(records, phases, summary, Path(f"{stem}.png"))
    print(f"wrote {stem}.jsonl and {stem}.png")
    print(f"up_s={up - high_at:.1f} peak={peak} down_s={down - zero_at:.1f} failed={failed} requests={len(answers)}")


def draw(records: list[dict], phases: list[tuple[float, str, int]], summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["t"] for r in records]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(9, 5.5), height_ratios=[1, 1.2])
    top.step(t, [r["replicas"] for r in records], where="post", color="tab:blue", label="replicas running")
    clients = [r["clients"] for r in records]
    top.step(t, clients, where="post", color="tab:gray", linestyle=":", label="clients (closed loop)")
    top.set_ylabel("count")
    top.set_ylim(0, max(max(r["clients"] for r in records), summary["peak_replicas"]) + 1)
    top.legend(loc="upper right", fontsize=8)
    p99 = [r["p99_ms"] if r["p99_ms"] is not None else math.nan for r in records]
    bottom.plot(t, p99, color="tab:red", label="p99 per second")
    bottom.set_ylabel("p99 latency (ms)")
    bottom.set_xlabel("seconds")
    for start, name, _ in phases:
        for ax in (top, bottom):
            ax.axvline(start, color="black", linewidth=0.6, alpha=0.4)
        top.annotate(name, (start, top.get_ylim()[1]), xytext=(3, -12), textcoords="offset points", fontsize=8)
    cfg = summary["autoscaling_config"]
    fig.suptitle(
        f"Ray Serve autoscaling on 2 nodes ({summary['cores']} cores, {summary['cpu_model']}): "
        f"target {cfg['target_ongoing_requests']:g} in flight/replica, up after {cfg['upscale_delay_s']:g} s, "
        f"down after {cfg['downscale_delay_s']:g} s",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
