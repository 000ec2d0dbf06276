"""Ray Serve: the same app, served by replicas that each hold their own runner and batchers.

A request's path: client -> Serve's HTTP proxy actor -> one replica, which runs the whole app from
`saikyo.server.create_app` in its own process: multipart parsing, decoding, the DynamicBatcher,
inference and the JSON answer. That is one hop more than the plain server and the fewest Ray Serve
allows: every further Serve hop (a separate ingress deployment, a model deployment behind it) costs
milliseconds of CPU per request and splits batches.

Two ways in:
- `saikyo serve --engine ray` (`serve_on_ray`): starts a private single-node Ray whose sockets all stay
  on 127.0.0.1, deploys, waits for SIGTERM/SIGINT, drains, and stops exactly what it started.
- a Serve config file (`serve run`, `serve deploy`, KubeRay's RayService): Ray imports
  `saikyo.scale.ray:app_builder` and passes the config's `args` (Settings fields).

Ray is imported lazily: some of its switches are read once at import time (see `loopback_environment`).
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from saikyo.scale import processes
from saikyo.scale.ray_metrics import ReplicaMetrics
from saikyo.server.middlewares.response_header import ResponseHeader
from saikyo.server.errors import send_json
from saikyo.settings import Settings

if TYPE_CHECKING:
    from ray.serve import Application

log = logging.getLogger(__name__)

APP_NAME = "saikyo"
DEPLOYMENT_NAME = "saikyo"
# Every response from a replica names it: "<replica id> pid=<process id>".
REPLICA_HEADER = "x-saikyo-replica"
CONTROL_PATH = "/v2/repository/models/"
CONTROL_REFUSED = (
    "under --engine ray a load or unload would reach one replica: publish a new version "
    "(saikyo models push) and --model-control poll loads it on every replica"
)
PROXY_CALLBACK = "saikyo.scale.ray:proxy_middlewares"
LOST_REPLICA = "the replica stopped (its process or node died) before it answered; the request may or may not have run"
# Set in the environment of a private Ray started by `start_local_ray`; its processes inherit it.
LOOPBACK_FLAG = "SAIKYO_RAY_LOOPBACK"

# Autoscaling pace for `--replicas auto`. Ray's defaults (30 s up, 600 s down) suit long jobs; an
# inference service should add a replica within seconds of a sustained queue and give it back after
# a couple of quiet minutes. A Serve config file can override each of these.
AUTOSCALING_DEFAULTS: dict[str, float] = {
    "upscale_delay_s": 3.0,
    "downscale_delay_s": 120.0,
    "look_back_period_s": 10.0,
    # How often replicas and handles report load to the autoscaler (Ray's default: 10 s). Marked
    # deprecated, yet Serve 2.60 still schedules those reports by it.
    "metrics_interval_s": 2.0,
}

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


# ---- what a deployment asks Ray for ----
def deployment_options(settings: Settings) -> dict[str, Any]:
    """Serve deployment options from Settings; ValueError names the setting that is wrong."""
    s = settings
    if s.cpus_per_replica < 0 or s.gpus_per_replica < 0:
        raise ValueError("cpus_per_replica and gpus_per_replica must be >= 0")
    if s.gpus_per_replica > 1 and not float(s.gpus_per_replica).is_integer():
        raise ValueError(f"gpus_per_replica above 1 must be a whole number of GPUs, not {s.gpus_per_replica}")
    if s.gpus_per_replica > 0 and s.device == "cpu":
        raise ValueError("gpus_per_replica > 0 needs device cuda (or auto): the replicas would not use the GPU")
    if s.max_ongoing_requests < 1 or s.max_queued_requests < 1:
        raise ValueError("max_ongoing_requests and max_queued_requests must be >= 1")
    if s.model_control == "explicit":
        # A load request reaches one replica, and a replica added later starts from `models` alone.
        raise ValueError(
            "model_control explicit changes one process; each Ray replica is its own: use poll (every replica "
            "follows the repository's latest versions) or none"
        )
    actor: dict[str, Any] = {"num_cpus": s.cpus_per_replica}
    if s.gpus_per_replica:
        actor["num_gpus"] = s.gpus_per_replica
    options: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "ray_actor_options": actor,
        "max_ongoing_requests": s.max_ongoing_requests,
        # Ray's own queue in front of the replicas is bounded too: past it, 503 with Retry-After.
        "max_queued_requests": s.max_queued_requests,
        "backpressure_config": {"status_code": 503, "retry_after_s": 1},
        # A replica being stopped (scale-down, shutdown) finishes its requests, as the plain server does.
        "graceful_shutdown_timeout_s": max(s.drain_timeout_s, 1.0),
        "graceful_shutdown_wait_loop_s": 1.0,
    }
    if s.replicas == "auto":
        if not 0 < s.min_replicas <= s.max_replicas:
            raise ValueError(f"need 0 < min_replicas <= max_replicas, got {s.min_replicas} and {s.max_replicas}")
        if s.target_ongoing_requests <= 0:
            raise ValueError("target_ongoing_requests must be > 0")
        options["autoscaling_config"] = {
            "min_replicas": s.min_replicas,
            "max_replicas": s.max_replicas,
            "target_ongoing_requests": s.target_ongoing_requests,
            **AUTOSCALING_DEFAULTS,
        }
    else:
        try:
            count = int(s.replicas)
        except ValueError:
            raise ValueError(f"replicas must be a count or 'auto', not {s.replicas!r}") from None
        if count < 1:
            raise ValueError(f"replicas must be >= 1, not {count}")
        options["num_replicas"] = count
    return options


def check_fits(settings: Settings, resources: dict[str, float]) -> None:
    """Refuse replicas this Ray cannot place: Serve would otherwise wait for them forever."""
    count = settings.min_replicas if settings.replicas == "auto" else int(settings.replicas)
    for name, per_replica, flag in (
        ("CPU", settings.cpus_per_replica, "--cpus-per-replica"),
        ("GPU", settings.gpus_per_replica, "--gpus-per-replica"),
    ):
        need, have = count * per_replica, resources.get(name, 0.0)
        if need > have + 1e-9:
            raise ValueError(
                f"{count} replica(s) x {per_replica:g} {name} = {need:g} {name}s, but this machine offers {have:g}; "
                f"lower {flag} (fractions are fine) or the replica count"
            )


def replica_settings(settings: Settings) -> Settings:
    """What each replica runs with: threads sized to its CPU share, not to the whole machine.

    Two replicas of 0.5 CPU on two cores each default to one inference and one decode thread instead
    of each spawning one per core and fighting over them.
    """
    return settings.sized_to(max(1, math.ceil(settings.cpus_per_replica))).with_overrides(engine="plain")


# ---- the replica ----
class ReplicaMiddleware:
    """Wraps the app inside a replica's lifespan: reports startup complete only once every model has
    loaded and warmed up, so Serve routes nothing to a replica (a new one from autoscaling included)
    that would answer 503; from then until shutdown it publishes its metrics for the deployment-wide
    /metrics. It refuses model load/unload, which would change this replica alone (poll changes them all)."""

    def __init__(self, app: ASGIApp, metrics: ReplicaMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            served_app = scope.get("app")

            async def send_when_loaded(message: Message) -> None:
                if message["type"] == "lifespan.startup.complete" and served_app is not None:
                    await served_app.state.models.wait_loaded()
                    self.metrics.start()
                await send(message)

            try:
                await self.app(scope, receive, send_when_loaded)
            finally:
                await self.metrics.stop()
            return
        if scope["type"] == "http" and scope["path"].startswith(CONTROL_PATH):
            # A load or unload would reach this one replica: the others would go on serving what they had.
            await send_json(scope, receive, send, 400, CONTROL_REFUSED)
            return
        await self.app(scope, receive, send)


def _bind_replica_grpc_to_loopback() -> None:
    """Serve 2.60 binds each replica's inter-deployment gRPC server to every interface ("[::]:0").

    In a private loopback Ray nothing may listen beyond 127.0.0.1, so rebind it there. Ray dials the
    port at the node address, 127.0.0.1, so routing is unchanged.
    """
    from ray.serve._private import replica as replica_module

    original = getattr(replica_module, "add_port_to_grpc_server", None)
    if original is None or getattr(original, "saikyo_loopback", False):
        return

    def add_port_on_loopback(server: Any, address: str) -> int:
        if address.startswith("[::]:") or address.startswith("0.0.0.0:"):
            address = "127.0.0.1:" + address.rsplit(":", 1)[1]
        return original(server, address)

    add_port_on_loopback.saikyo_loopback = True  # type: ignore[attr-defined]
    replica_module.add_port_to_grpc_server = add_port_on_loopback


class SaikyoReplica:
    """One Serve replica: the whole saikyo app, built inside the replica's own process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        if os.environ.get(LOOPBACK_FLAG) == "1":
            _bind_replica_grpc_to_loopback()

    def __serve_build_asgi_app__(self) -> Any:
        from ray import serve

        from saikyo.server import create_app

        logging.getLogger("saikyo").setLevel(self.settings.log_level.upper())
        context = serve.get_replica_context()
        replica_id = context.replica_id.unique_id
        app = create_app(self.settings)
        metrics = ReplicaMetrics(context.app_name, replica_id, app.state.metrics)
        app.state.metrics_view = metrics.view
        # Every response names its replica, so load spreading is observable.
        app.add_middleware(ResponseHeader, name=REPLICA_HEADER, value=f"{replica_id} pid={os.getpid()}")
        app.add_middleware(ReplicaMiddleware, metrics=metrics)
        return app


def build_application(settings: Settings) -> Application:
    """The Serve application: one ingress deployment that is the whole app."""
    from ray import serve

    options = deployment_options(settings)
    deployment = serve.deployment(serve.ingress()(SaikyoReplica), **options)
    return deployment.bind(replica_settings(settings))


def app_builder(args: dict[str, Any] | None = None) -> Application:
    """Entry for Serve config files: `import_path: saikyo.scale.ray:app_builder`.

    `args` are Settings fields (models, repository, max_batch_size, ...); SAIKYO_* variables in the
    environment of the process that builds the app apply below them. The config's `deployments:`
    section overrides the Ray options (replicas, autoscaling, resources) of the deployment `saikyo`.
    """
    return build_application(Settings.from_env(**(args or {})))


# ---- Ray's proxy, answering in the app's error shape ----
class JsonProxyErrors:
    """Serve's proxy answers backpressure, timeouts and "no replica yet" itself, as text/plain, and
    answers nothing at all when the replica holding a request died (its node lost): the HTTP server
    then sends a bare text 500.

    Clients of saikyo expect {"error": ..., "detail": ...}: rewrite those few answers, and answer a
    JSON 502 where the proxy gave none (the app's own errors are JSON already and pass untouched; so
    does every other response, unbuffered).
    """

    STATUSES = (404, 408, 429, 500, 503, 504)

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        held: Message | None = None
        started = False
        body = bytearray()

        async def rewrite(message: Message) -> None:
            nonlocal held, started
            if message["type"] == "http.response.start":
                started = True
                headers = dict(message.get("headers", []))
                if message["status"] in self.STATUSES and headers.get(b"content-type", b"").startswith(b"text/plain"):
                    held = dict(message)
                    return
            elif message["type"] == "http.response.body" and held is not None:
                body.extend(message.get("body", b""))
                if message.get("more_body", False):
                    return
                await _send_json_error(send, held, body.decode(errors="replace"))
                return
            await send(message)

        try:
            await self.app(scope, receive, rewrite)
        except Exception as exc:
            if started:
                raise
            log.warning("Serve's proxy failed before answering: %r", exc)
        if not started:
            await _send_json_error(send, {"status": 502, "headers": []}, LOST_REPLICA)


async def _send_json_error(send: Send, start: Message, text: str) -> None:
    import json

    status = start["status"]
    extra: list[tuple[bytes, bytes]] = []
    if status == 404:
        # The app is mounted at "/" and answers its own 404s in JSON, so a 404 from the proxy means
        # no app is deployed at all: starting up or draining for shutdown. That is a 503.
        status = 503
        summary = "not serving: the application is starting or shutting down, retry later"
        extra = [(b"retry-after", b"1")]
    else:
        summary = {
            502: "the replica handling this request was lost, retry",
            503: "service unavailable, retry later",
            429: "too many requests, retry later",
        }.get(
            status, "request failed in the serving layer"
        )
    payload = json.dumps({"error": summary, "detail": text.strip()}).encode()
    drop = (b"content-type", b"content-length", b"retry-after") if extra else (b"content-type", b"content-length")
    keep = [(k, v) for k, v in start.get("headers", []) if k.lower() not in drop]
    headers = [*keep, *extra, (b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


def proxy_middlewares() -> list[Any]:
    """Ray calls this in its proxy process (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH)."""
    from starlette.middleware import Middleware

    return [Middleware(JsonProxyErrors)]


# ---- a private Ray on loopback ----
def loopback_environment() -> dict[str, str]:
    """Variables that keep a local Ray on 127.0.0.1 and out of the home directory.

    They must be in os.environ before `import ray` (some are read at import) and before ray.init,
    whose processes inherit them.
    """
    return {
        # Otherwise Ray swaps 127.0.0.1 for the machine's network address.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        # Without a token in the environment Ray 2.60 generates one and writes ~/.ray/auth_token.
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": PROXY_CALLBACK,
        LOOPBACK_FLAG: "1",
    }


@dataclass
class LocalRay:
    temp_dir: Path

    def stop(self) -> None:
        import ray

        ray.shutdown()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_local_ray() -> LocalRay:
    """A single-node Ray of our own: never joins a running cluster, binds only 127.0.0.1."""
    for key, value in loopback_environment().items():
        os.environ.setdefault(key, value)
    import ray
    from ray._private import ray_constants

    if ray_constants.ENABLE_RAY_CLUSTER:
        raise RuntimeError("ray was imported before saikyo could keep it on loopback; start from the CLI")
    temp_dir = Path(tempfile.mkdtemp(prefix="saikyo-ray-"))
    try:
        ray.init(
            address="local",  # a new Ray, even if RAY_ADDRESS or a stale cluster exists
            _node_ip_address="127.0.0.1",
            _temp_dir=str(temp_dir),
            include_dashboard=False,
            configure_logging=False,
        )
    except BaseException:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    log.info("private Ray on 127.0.0.1, temp dir %s (removed at exit)", temp_dir)
    return LocalRay(temp_dir)


def _check_port_free(host: str, port: int) -> None:
    # Serve's proxy retries a busy port forever; say so at once instead.
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise OSError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def serve_on_ray(settings: Settings) -> None:
    """`saikyo serve --engine ray`: deploy on a private local Ray, serve until SIGTERM/SIGINT.

    The first signal drains (Serve stops its replicas gracefully: requests in flight finish, up to
    drain_timeout_s); a second one skips the drain. Either way everything this call started stops.
    """
    deployment_options(settings)  # invalid settings fail before Ray starts
    _check_port_free(settings.host, settings.port)
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        log.info("signal %s: draining replicas", signal.Signals(signum).name)
        stop.set()

    # Before Ray starts: its processes, orphaned when a group-wide signal ends their raylet, stay ours.
    processes.become_subreaper()
    local = start_local_ray()
    # After ray.init, which installs a handler of its own that would end the process without a drain.
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    tracked: processes.Tracked = {}
    clean = True
    try:
        from ray import serve

        # Every Ray call runs in a thread the main thread waits on with a bound: once a signal to the
        # whole process group has ended Ray's GCS, its calls block for a minute and then end the process.
        deploy = _Step(lambda: _deploy(settings), "deploying")
        while not deploy.done.wait(0.5) and not stop.is_set():
            pass
        deploy.result()  # a deployment that failed (e.g. replicas that do not fit) raises here
        tracked = processes.descendants(os.getpid())
        while not stop.wait(0.5):
            tracked.update(processes.descendants(os.getpid()))  # replicas come and go with autoscaling
        tracked.update(processes.descendants(os.getpid()))
        # Deleting the app drains it: replicas finish their requests (up to drain_timeout_s) while the
        # proxy is still up to carry the answers back (serve.shutdown() may stop the proxy under
        # requests in flight, and takes ~5 s more). Then ray.shutdown() ends the rest.
        clean = deploy.done.is_set() and _Step(lambda: serve.delete(APP_NAME), "draining").wait(
            settings.drain_timeout_s + DRAIN_MARGIN_S
        )
    finally:
        # Every step bounded: the whole shutdown takes at most drain_timeout_s + a margin, whatever Ray does.
        clean = _Step(local.stop, "stopping Ray").wait(RAY_STOP_S) and clean
        leftovers = processes.kill_all(os.getpid(), tracked)
        if leftovers:
            log.warning("killed %d Ray process(es) that outlived the shutdown: %s", len(leftovers), leftovers)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not clean:
        # Ray's threads may still wait on processes that are gone: exit without waiting for them.
        log.error(
            "Ray could not drain (its own processes were signalled too? a signal to the whole process group "
            "reaches them): requests in flight may be lost; everything this server started is stopped"
        )
        logging.shutdown()
        os._exit(1)


def _deploy(settings: Settings) -> None:
    import ray
    from ray import serve

    check_fits(settings, ray.cluster_resources())
    serve.start(proxy_location="HeadOnly", http_options={"host": settings.host, "port": settings.port})
    serve.run(build_application(settings), name=APP_NAME, route_prefix="/")
    status = serve.status().applications[APP_NAME].deployments[DEPLOYMENT_NAME]
    log.info(
        "serving on http://%s:%s with Ray Serve: replicas %s (%s)",
        settings.host, settings.port, settings.replicas, dict(status.replica_states),
    )  # fmt: skip


class _Step:
    """One Ray call in a daemon thread, so that the main thread can stop waiting for it."""

    def __init__(self, step: Callable[[], object], what: str) -> None:
        self.what = what
        self.done = threading.Event()
        self.error: BaseException | None = None

        def run() -> None:
            try:
                step()
            except BaseException as exc:  # handed to the main thread by result()/wait()
                self.error = exc
            finally:
                self.done.set()

        threading.Thread(target=run, name=f"ray-{what}", daemon=True).start()

    def result(self) -> None:
        if self.done.is_set() and self.error is not None:
            raise self.error

    def wait(self, seconds: float) -> bool:
        """Whether it finished without error within `seconds`; a second signal stops the wait."""
        try:
            finished = self.done.wait(seconds)
        except KeyboardInterrupt:
            log.warning("second signal: %s skipped", self.what)
            return False
        if not finished:
            log.warning("%s did not finish within %.0f s", self.what, seconds)
        elif self.error is not None:
            log.warning("%s failed: %s", self.what, self.error)
        return finished and self.error is None


# Beyond drain_timeout_s: Serve's own bookkeeping after the last replica stopped.
DRAIN_MARGIN_S = 10.0
RAY_STOP_S = 15.0
