"""`saikyo serve --engine ray`: real Ray Serve on 127.0.0.1, tiny generated models, real HTTP.

Three private Ray instances, one after the other (~15 s each to start on two cores): two fixed
replicas (spread, same routes, loopback only, drain and clean shutdown), one autoscaling from one
replica (scale-up under load), one small replica (Ray's own backpressure as a JSON 503).
"""

from __future__ import annotations

import contextlib
import importlib.util
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.paths import CAT, DATA
from support.serverproc import ServerProcess, running_server

from saikyo.models.repository import ModelRepository

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray Serve is not installed: pip install -e '.[ray]'"),
]

REPLICA_HEADER = "x-saikyo-replica"
CAT_BYTES = CAT.read_bytes()


def classify(url: str, images: int = 1, model: str = "tiny", timeout: float = 60) -> httpx.Response:
    files = [("images", (f"cat{i}.jpg", CAT_BYTES, "image/jpeg")) for i in range(images)]
    return httpx.post(f"{url}/classify", files=files, params={"model": model}, timeout=timeout)


def replica_of(response: httpx.Response) -> tuple[str, int]:
    """(replica id, process id) from the header every replica stamps on its answers."""
    match = re.fullmatch(r"(\S+) pid=(\d+)", response.headers[REPLICA_HEADER])
    assert match, response.headers[REPLICA_HEADER]
    return match.group(1), int(match.group(2))


def session_pids(sid: int) -> set[int]:
    """Every live process in session `sid`: the server was started in a session of its own, and Ray's
    processes (GCS, raylet, agents, controller, proxy, replicas) inherit it."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[3]) == sid and fields[0] != "Z":  # fields[3] is the session id
            pids.add(int(entry.name))
    return pids


@pytest.fixture(scope="module")
def ray_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # A HOME of its own shows that nothing is written to ~/.ray.
    return tmp_path_factory.mktemp("home")


@contextlib.contextmanager
def ray_server(
    repository: ModelRepository, models: str, logs: Path, home: Path, *flags: str, **env: str
) -> Iterator[ServerProcess]:
    """`saikyo serve --engine ray` with `flags`, half a CPU per replica; `env`: SAIKYO_* extras."""
    with running_server(
        repository.root, models, logs, "--engine", "ray", *flags, "--cpus-per-replica", "0.5",
        env={"HOME": str(home), **env}, timeout=240,
    ) as server:  # fmt: skip
        yield server


@pytest.fixture(scope="module")
def two_replicas(
    tiny_repository: ModelRepository, tmp_path_factory: pytest.TempPathFactory, ray_home: Path
) -> Iterator[ServerProcess]:
    logs = tmp_path_factory.mktemp("ray-logs")
    with ray_server(tiny_repository, "tiny,tiny2", logs, ray_home, "--replicas", "2") as server:
        yield server


@pytest.fixture
def autoscaling(
    tiny_repository: ModelRepository, tmp_path_factory: pytest.TempPathFactory, ray_home: Path
) -> Iterator[ServerProcess]:
    with ray_server(
        tiny_repository, "tiny", tmp_path_factory.mktemp("ray-logs"), ray_home,
        "--replicas", "auto", "--min-replicas", "1", "--max-replicas", "2", "--target-ongoing-requests", "1",
        SAIKYO_MAX_ONGOING_REQUESTS="2", SAIKYO_MAX_QUEUED_REQUESTS="2",
    ) as server:  # fmt: skip
        yield server


@pytest.fixture
def one_small_replica(
    tiny_repository: ModelRepository, tmp_path_factory: pytest.TempPathFactory, ray_home: Path
) -> Iterator[ServerProcess]:
    # Room for exactly four requests: two in flight on the replica, two in Ray's queue.
    with ray_server(
        tiny_repository, "tiny", tmp_path_factory.mktemp("ray-logs"), ray_home, "--replicas", "1",
        SAIKYO_MAX_ONGOING_REQUESTS="2", SAIKYO_MAX_QUEUED_REQUESTS="2",
    ) as server:  # fmt: skip
        yield server


# ---- two fixed replicas ----
def test_requests_spread_over_both_replicas_each_with_its_own_runner(two_replicas: ServerProcess) -> None:
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: classify(two_replicas.url, images=2), range(48)))
    assert [r.status_code for r in responses] == [200] * 48
    seen = {replica_of(r) for r in responses}
    replica_ids = {rid for rid, _ in seen}
    pids = {pid for _, pid in seen}
    assert len(replica_ids) == 2 and len(pids) == 2, seen
    assert two_replicas.proc.pid not in pids  # replicas are processes of their own, not the CLI's
    # Same model, same image: every replica answers the same top 5.
    bodies = {json.dumps(r.json(), sort_keys=True) for r in responses}
    assert len(bodies) == 1
    assert len(responses[0].json()) == 2 and len(responses[0].json()[0]) == 5


def test_the_whole_app_comes_along(two_replicas: ServerProcess) -> None:
    url = two_replicas.url
    assert httpx.get(f"{url}/v2/health/live", timeout=10).status_code == 200
    assert httpx.get(f"{url}/v2/health/ready", timeout=10).status_code == 200
    paths = httpx.get(f"{url}/openapi.json", timeout=10).json()["paths"]
    assert "/classify" in paths and "/v2/health/ready" in paths
    # Second model, labels option, and the app's own JSON errors, all through Ray's proxy.
    r = httpx.post(
        f"{url}/classify",
        params={"model": "tiny2", "labels": "true", "topk": 3},
        files=[("images", ("c.jpg", (DATA / "coffee.jpg").read_bytes(), "image/jpeg"))],
        timeout=30,
    )
    assert r.status_code == 200 and len(r.json()[0]) == 3 and all(":" in k for k in r.json()[0])
    r = httpx.post(f"{url}/classify", files=[("pictures", ("c.jpg", CAT_BYTES, "image/jpeg"))], timeout=30)
    assert r.status_code == 400 and "images" in r.json()["error"]
    r = classify(url, model="nope")
    assert r.status_code == 404 and r.json()["error"] == "unknown model 'nope'"
    r = httpx.post(
        f"{url}/classify", files=[("images", ("t.txt", b"not an image", "text/plain"))], timeout=30
    )
    assert r.status_code == 400 and "t.txt" in r.json()["error"]
    assert REPLICA_HEADER in r.headers


def _is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]").split("%")[0]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:  # "*": every interface
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs `ss` (iproute2) to list sockets")
def test_every_socket_stays_on_loopback_and_home_is_untouched(two_replicas: ServerProcess, ray_home: Path) -> None:
    with ThreadPoolExecutor(4) as pool:  # traffic first, so proxy-replica connections are open
        assert {r.status_code for r in pool.map(lambda _: classify(two_replicas.url), range(16))} == {200}
    pids = session_pids(two_replicas.proc.pid)
    assert len(pids) >= 6, pids  # CLI, GCS, raylet, controller, proxy, 2 replicas, agents
    checked = 0
    problems = []
    for proto in ("-t", "-u"):
        out = subprocess.run(["ss", proto, "-a", "-n", "-p", "-H"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            owners = {int(p) for p in re.findall(r"pid=(\d+)", line)}
            if not owners & pids:
                continue
            local, peer = line.split()[3:5]
            checked += 1
            # Listening or unconnected sockets have a wildcard peer; everything else must be loopback.
            if not _is_loopback(local) or (peer.rsplit(":", 1)[0] not in ("*", "0.0.0.0", "[::]") and not _is_loopback(peer)):
                problems.append(line)
    assert checked >= 10, f"only {checked} sockets found for {sorted(pids)}"
    assert problems == [], "\n".join(problems)
    assert not (ray_home / ".ray").exists()


def metadata_requests_by_replica(text: str) -> dict[str, float]:
    """GET /v2/models/tiny2 answered with 200, per replica label, from a /metrics exposition."""
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if (
                s.name == "saikyo_http_requests_total"
                and s.labels.get("route") == "/v2/models/{model_name}"
                and s.labels.get("model") == "tiny2"
                and s.labels.get("status") == "200"
            ):
                counts[s.labels["replica"]] = counts.get(s.labels["replica"], 0.0) + s.value
    return counts


def test_metrics_cover_every_replica_whichever_answers_the_scrape(two_replicas: ServerProcess) -> None:
    url = two_replicas.url
    # A route and model no other test here uses, so these are the only requests counted under them.
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: httpx.get(f"{url}/v2/models/tiny2", timeout=30), range(40)))
    assert {r.status_code for r in answers} == {200}
    served: dict[str, float] = {}
    for r in answers:
        rid = replica_of(r)[0]
        served[rid] = served.get(rid, 0.0) + 1
    assert len(served) == 2, served
    # Replicas publish every 2 s: within a few seconds every scrape, whichever replica answers it,
    # shows both replicas' counts, each labelled with its replica.
    deadline = time.monotonic() + 30
    agreeing: set[str] = set()
    while len(agreeing) < 2:
        r = httpx.get(f"{url}/metrics", timeout=10)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        if metadata_requests_by_replica(r.text) == served:
            agreeing.add(replica_of(r)[0])  # the replica that answered this scrape
        assert time.monotonic() < deadline, f"{metadata_requests_by_replica(r.text)} != {served}"
        time.sleep(0.2)


def slow_upload(url: str, release: threading.Event, sent: threading.Event | None = None) -> httpx.Response:
    """A /classify request whose body stops half way until `release`: in flight for as long as we like.
    `sent` is set once the first half has been written to the socket."""
    boundary = "saikyo-drain-test"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="cat.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    def body() -> Iterator[bytes]:
        yield head + CAT_BYTES[:1000]
        if sent is not None:  # httpx asks for the next chunk only after writing this one
            sent.set()
        release.wait(60)
        yield CAT_BYTES[1000:] + tail

    return httpx.post(
        f"{url}/classify",
        params={"model": "tiny"},
        content=body(),
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
        timeout=120,
    )


def wait_all(events: list[threading.Event], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for event in events:
        assert event.wait(max(0.0, deadline - time.monotonic())), "a held upload never got its first half out"


def test_sigterm_drains_in_flight_requests_and_stops_everything_it_started(two_replicas: ServerProcess) -> None:
    """Last test on this server: it stops it."""
    temp_dirs = re.findall(r"temp dir (\S+) \(removed at exit\)", two_replicas.log())
    assert len(temp_dirs) == 1 and Path(temp_dirs[0]).is_dir()
    sid = two_replicas.proc.pid
    assert len(session_pids(sid)) >= 6
    release = threading.Event()
    sent = [threading.Event() for _ in range(6)]
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(slow_upload, two_replicas.url, release, e) for e in sent]
        wait_all(sent, 30)
        time.sleep(2.0)  # half of each body is at the proxy; give it time to route each to a replica
        two_replicas.proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)  # the drain is under way: the app is being deleted
        assert two_replicas.proc.poll() is None
        release.set()
        responses = [f.result() for f in futures]
    assert [r.status_code for r in responses] == [200] * 6, [r.text for r in responses]
    assert two_replicas.proc.wait(60) == 0
    deadline = time.monotonic() + 20
    while session_pids(sid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert session_pids(sid) == set()
    assert not Path(temp_dirs[0]).exists()
    assert "draining replicas" in two_replicas.log()


# ---- autoscaling ----
def test_autoscales_from_one_to_two_replicas_under_load(autoscaling: ServerProcess) -> None:
    url = autoscaling.url
    idle = {replica_of(classify(url))[0] for _ in range(6)}
    assert len(idle) == 1, idle  # min_replicas = 1
    seen: set[str] = set(idle)
    start = time.monotonic()
    deadline = start + 120
    statuses: list[int] = []
    # Closed loop, 4 clients: 2 in flight + 2 queued on a replica whose target is 1 -> scale up.
    with ThreadPoolExecutor(4) as pool:
        while len(seen) < 2 and time.monotonic() < deadline:
            for r in pool.map(lambda _: classify(url, images=4), range(8)):
                statuses.append(r.status_code)
                if r.status_code == 200:
                    seen.add(replica_of(r)[0])
    elapsed = time.monotonic() - start
    assert len(seen) == 2, f"still one replica after {elapsed:.0f}s: {seen}\n{autoscaling.log()[-3000:]}"
    assert set(statuses) <= {200, 503}
    print(f"scaled 1 -> 2 replicas after {elapsed:.1f}s of load ({len(statuses)} requests)")


def test_ray_backpressure_is_a_json_503_with_retry_after(one_small_replica: ServerProcess) -> None:
    """Room for four (two on the replica, two queued): of seven requests, four are answered and three
    are refused by Ray's proxy as our JSON 503.

    Four held uploads go first and three quick probes after; the proxy admits in the order it gets to
    them, which on a busy machine need not be the order they were sent, so the test checks the
    capacity (who got in), not the order. A probe that got in waits for the release like the rest."""
    url = one_small_replica.url
    release = threading.Event()
    sent = [threading.Event() for _ in range(4)]
    with ThreadPoolExecutor(7) as pool:
        held = [pool.submit(slow_upload, url, release, e) for e in sent]
        try:
            wait_all(sent, 30)
            time.sleep(1.0)  # the proxy has read each held request's head and queued or routed it
            probes = [pool.submit(classify, url) for _ in range(3)]
            deadline = time.monotonic() + 15
            while sum(p.done() for p in probes) < 3 and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            release.set()
        responses = [f.result() for f in held + probes]
    statuses = [r.status_code for r in responses]
    assert sorted(statuses) == [200] * 4 + [503] * 3, statuses  # everything admitted is answered
    for r in responses:
        if r.status_code != 503:
            continue
        body = r.json()
        assert body["error"] == "service unavailable, retry later"
        assert "backpressure" in body["detail"] and "max_queued_requests=2" in body["detail"]
        assert r.headers["retry-after"] == "1"
        assert REPLICA_HEADER not in r.headers  # Ray's proxy answered, no replica saw it
    assert classify(url).status_code == 200


# ---- flags: refused before serving ----
def run_cli(args: list[str], timeout: float = 120) -> tuple[subprocess.CompletedProcess[str], int]:
    """Run `saikyo serve` in a session of its own (returned: its id); on a timeout it gets SIGTERM, so
    it stops its Ray."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "saikyo", "serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), proc.pid


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--replicas", "zero"], "replicas must be a count or 'auto'"),
        (["--replicas", "auto", "--min-replicas", "3", "--max-replicas", "2"], "min_replicas <= max_replicas"),
        (["--gpus-per-replica", "0.5", "--device", "cpu"], "needs device cuda"),
        (["--gpus-per-replica", "1.5", "--device", "cuda"], "whole number of GPUs"),
        (["--engine", "spark"], "unknown engine 'spark'"),
    ],
)
def test_bad_scale_flags_exit_2_before_starting_anything(
    tiny_repository: ModelRepository, args: list[str], message: str
) -> None:
    engine = [] if "--engine" in args else ["--engine", "ray"]
    out, _ = run_cli(["--repository", str(tiny_repository.root), "--models", "tiny", *engine, *args], timeout=60)
    assert out.returncode == 2, out.stderr
    assert message in " ".join(out.stderr.split())
    assert "private Ray" not in out.stderr  # refused before Ray started


def test_replicas_that_do_not_fit_are_refused_and_ray_is_stopped(tiny_repository: ModelRepository) -> None:
    # 64 GPUs per replica: no machine offers them, so Serve would wait forever; saikyo says so.
    out, sid = run_cli(
        ["--repository", str(tiny_repository.root), "--models", "tiny", "--port", "0",
         "--engine", "ray", "--device", "cuda", "--gpus-per-replica", "64"]
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    text = " ".join(out.stderr.split())
    assert "1 replica(s) x 64 GPU = 64 GPUs, but this machine offers" in text
    assert "private Ray" in text  # it did start Ray to ask, and stopped it:
    temp_dir = re.search(r"temp dir (\S+) \(removed at exit\)", text)
    assert temp_dir and not Path(temp_dir.group(1)).exists()
    deadline = time.monotonic() + 20
    while session_pids(sid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert session_pids(sid) == set()


def test_check_fits_counts_min_replicas_when_autoscaling() -> None:
    from saikyo.scale.ray import check_fits
    from saikyo.settings import Settings

    two_cores = {"CPU": 2.0}
    check_fits(Settings(replicas="4", cpus_per_replica=0.5), two_cores)
    check_fits(Settings(replicas="auto", min_replicas=2, max_replicas=8, cpus_per_replica=1), two_cores)
    with pytest.raises(ValueError, match="3 replica\\(s\\) x 1 CPU = 3 CPUs, but this machine offers 2"):
        check_fits(Settings(replicas="3", cpus_per_replica=1), two_cores)
    with pytest.raises(ValueError, match="GPU"):
        check_fits(Settings(replicas="auto", min_replicas=1, gpus_per_replica=0.25, device="cuda"), two_cores)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_a_signal_to_the_whole_process_group_stops_everything_in_bounded_time(
    tiny_repository: ModelRepository, tmp_path: Path, ray_home: Path, sig: signal.Signals
) -> None:
    """What systemd's KillMode=control-group, `timeout` or Ctrl-C do: the signal reaches Ray's GCS and
    raylet too. The server still ends every process it started and exits within drain_timeout_s + margin."""
    drain = 5
    with ray_server(tiny_repository, "tiny", tmp_path, ray_home, "--replicas", "1",
                    "--drain-timeout-s", str(drain)) as server:  # fmt: skip
        assert classify(server.url).status_code == 200
        sid = server.proc.pid  # started in a session (and process group) of its own
        assert len(session_pids(sid)) > 3  # the server and Ray's processes
        os.killpg(sid, sig)
        started = time.monotonic()
        server.proc.wait(timeout=drain + 40)
        took = time.monotonic() - started
        deadline = time.monotonic() + 10
        while session_pids(sid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert session_pids(sid) == set(), server.log_tail(40)
        assert took < drain + 30, (took, server.log_tail(40))
        assert server.proc.returncode in (0, 1), server.log_tail(40)
