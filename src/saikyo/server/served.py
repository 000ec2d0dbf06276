"""The models a server holds: each version's runner, batchers and state, from loading to closing.

Models load in the background so that liveness answers at once; readiness waits for every model
to load and pass a warm-up inference. What a request does with a model is in server/pipeline.py.

Versions (Triton's model repository extension, `model_control`): `load` brings a version in beside the
one that serves. Only once it has loaded and passed warm-up does it take the traffic; the old version is
then retired: no new request finds it, the requests holding it finish, its batchers close, its runner
closes and its memory goes back to the system. A version that fails to load leaves the serving one in
place and keeps its reason for the index. In `poll` mode the server does this by itself whenever the
repository's latest version of a served model changes, and tries a failed version again only once its
meta.json changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import enum
import functools
import gc
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from saikyo.inference.batching import DynamicBatcher
from saikyo.models.cache import default_cache_dir
from saikyo.models.errors import ModelNotExported, RepositoryError, UnknownModel
from saikyo.models.label_files import labels_for
from saikyo.models.location import is_remote, open_repository
from saikyo.models.repository import Entry, Repository, VersionMeta
from saikyo.models import tunings
from saikyo.runtime import Runner, RunnerError, auto_backend, create_runner
from saikyo.runtime.cpu import this_cpu
from saikyo.runtime.base import device_decoder
from saikyo.runtime.options import RunnerOptions, ServingConfig, resolve_serving
from saikyo.server.redact import redact_paths
from saikyo.server.repository_io import RepositoryIO
from saikyo.settings import Settings

log = logging.getLogger(__name__)


class ModelState(str, enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    UNLOADING = "unloading"  # replaced or unloaded: finishing the requests that hold it
    UNLOADED = "unloaded"


@dataclass(eq=False)
class ServedModel:
    name: str
    state: ModelState = ModelState.LOADING
    error: str | None = None
    runner: Runner | None = None
    image_batcher: DynamicBatcher | None = None  # images, decoded by the server or by the runner's device
    tensor_batcher: DynamicBatcher | None = None  # preprocessed FP32 tensors sent by clients
    executor: ThreadPoolExecutor | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    version: int | None = None  # None until the repository has said which
    digest: str = ""  # the version's meta.json sha256: a re-export under the same number differs
    entry: Entry | None = None  # its files, held against cache eviction while it is loaded
    config: ServingConfig | None = None  # what it serves with, and where each value came from
    labels: tuple[str, ...] | None = None  # class names by index; None: answers carry indices only
    users: int = 0  # requests using it now (pipeline.held)
    _idle: asyncio.Event | None = field(default=None, repr=False)

    @property
    def ready(self) -> bool:
        return self.state is ModelState.READY

    @contextlib.contextmanager
    def hold(self) -> Iterator[ServedModel]:
        """A request uses this version from the moment it picks it until it has its answer: a version
        being replaced closes only once no request holds it."""
        self.users += 1
        try:
            yield self
        finally:
            self.users -= 1
            if self.users == 0 and self._idle is not None:
                self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        if self.users == 0:
            return True
        self._idle = asyncio.Event()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False


RunnerFactory = Callable[[Entry, RunnerOptions], Runner]


def _batch_limit(meta: dict[str, Any], configured: int) -> int:
    """The batch size a version takes: the server's, or less where its meta.json says the graph cannot
    take more (an imported file whose batch stays fixed, models/onnx_import.py)."""
    limit = (meta.get("serving") or {}).get("max_batch_size")
    return min(configured, limit) if isinstance(limit, int) and limit >= 1 else configured


class ServedModels:
    def __init__(
        self,
        settings: Settings,
        runner_factory: RunnerFactory = create_runner,
        on_batch: Callable[[str, int, float], None] | None = None,
        repository: Repository | None = None,
    ) -> None:
        self.settings = settings
        self._runner_factory = runner_factory
        self._on_batch = on_batch
        self.repository = repository or open_repository(settings)
        # Listings and meta.json reads wait on the store: never on the threads that parse requests.
        self.repository_io = RepositoryIO(self.repository, settings.repository_threads)
        # The version each name serves: what a request that names no version gets.
        self.models: dict[str, ServedModel] = {name: ServedModel(name) for name in settings.models}
        # Every version held per name beside it: one loading, one that failed to load.
        self.versions: dict[str, dict[int, ServedModel]] = {}
        self.retiring: set[ServedModel] = set()
        self.unloaded: dict[str, ServedModel] = {}  # the index still lists what was unloaded
        self.decode_pool = ThreadPoolExecutor(settings.resolved_decode_threads(), thread_name_prefix="decode")
        self._load_task: asyncio.Task[None] | None = None
        self._poll_task: asyncio.Task[None] | None = None
        self._locks: dict[str, asyncio.Lock] = {}
        # Loading is CPU-bound and the cores are few: one at a time, whoever asks.
        self._loading = asyncio.Lock()
        self._attempted: dict[str, tuple[int, str]] = {}  # name -> (version, digest) last tried (poll)
        self._poll_errors: dict[str, str] = {}
        self.started = time.time()
        # Set on SIGTERM (server/shutdown.py): readiness goes false while in-flight requests drain.
        self.draining = False
        # Set when a model given at start could not load and exit_on_error is on: the server exits.
        self.startup_error: str | None = None
        # Under --workers with poll (scale/workers/control.py): whether this process decides for all,
        # and what to tell the others once it switched a version.
        self.poll_decides: Callable[[], bool] = lambda: True
        self.on_polled: Callable[[str, ServedModel], Awaitable[Any]] | None = None
        # Paths that error messages for clients must not show (the log keeps them).
        location = settings.repository
        local = Path(settings.model_cache_dir or default_cache_dir()) if is_remote(location) else Path(location)
        self._private_roots = (str(local.resolve()), str(local) if local.is_absolute() else "")

    # ---- lifecycle ----
    def start_loading(self) -> None:
        loop = asyncio.get_running_loop()
        self._load_task = loop.create_task(self._load_all(), name="load-models")
        if self.settings.model_control == "poll":
            self._poll_task = loop.create_task(self._poll(), name="poll-repository")

    async def wait_loaded(self) -> None:
        if self._load_task is not None:
            await self._load_task

    @property
    def ready(self) -> bool:
        """Every model the server serves is ready, and it serves at least one: a server whose models
        were all unloaded answers every request 404 and is not ready."""
        return not self.draining and bool(self.models) and all(m.ready for m in self.models.values())

    async def _load_all(self) -> None:
        failed: list[str] = []
        for name in list(self.models):
            if name not in self.models:
                continue  # unloaded before its turn
            try:
                model = await self.load(name)
            except (ModelNotExported, RepositoryError, UnknownModel) as exc:
                placeholder = self.models.get(name)
                if placeholder is not None and placeholder.state is ModelState.LOADING:
                    self._fail(placeholder, str(exc))
                failed.append(f"{name}: {exc}")
                continue
            if not model.ready:
                failed.append(f"{name}: {model.error}")
        if failed and self.settings.exit_on_error:
            self.startup_error = "; ".join(failed)

    # ---- model control ----
    def find(self, name: str, version: int | None = None) -> ServedModel | None:
        """The version a request asks for, in whatever state it is. No version: the one serving or, when
        none does, the one that last tried to load (so that its reason can be told)."""
        current = self.models.get(name)
        held = self.versions.get(name, {})
        if version is None:
            return current or (held[max(held)] if held else None)
        if current is not None and current.version in (version, None):
            return current
        return held.get(version)

    def loaded_versions(self, name: str) -> list[int]:
        held = [self.models.get(name), *self.versions.get(name, {}).values()]
        return sorted({m.version for m in held if m is not None and m.ready and m.version is not None})

    def held(self) -> list[ServedModel]:
        """Every version the server holds, is retiring, or last unloaded: the repository index's rows."""
        every = _distinct(*self.models.values(), *(v for d in self.versions.values() for v in d.values()),
                          *self.retiring, *self.unloaded.values())  # fmt: skip
        return sorted(every, key=lambda m: (m.name, m.version or 0))

    async def load(self, name: str, version: int | None = None) -> ServedModel:
        """Load `version` (default: the repository's latest) of `name`; it takes the traffic once warm.

        Raises ModelNotExported (VersionNotFound) or RepositoryError when there is nothing to load, and
        then nothing changes. Otherwise returns the version READY, or FAILED with its reason while the
        version that served before goes on serving.
        """
        ref = await self.repository_io.call(self.repository.resolve, name, version)
        return await self._switch(name, ref)

    async def _switch(self, name: str, ref: VersionMeta) -> ServedModel:
        async with self._lock(name):
            current = self.models.get(name)
            if current is not None and current.ready and (current.version, current.digest) == (ref.version, ref.digest):
                return current  # serving exactly this already
            starting = current is not None and current.state is ModelState.LOADING and current.version is None
            model = current if starting and current is not None else ServedModel(name)
            model.version, model.digest = ref.version, ref.digest
            before = [m for m in _distinct(current, *self.versions.get(name, {}).values()) if m is not model]
            self.versions.setdefault(name, {})[ref.version] = model
            self.unloaded.pop(name, None)
            self._attempted[name] = (ref.version, ref.digest)
            async with self._loading:
                await self._load(model, ref)
            if not model.ready:
                if current is not None and not current.ready and current is not model:
                    self.models[name] = model  # nothing served: the latest failure is the name's state
                    if current.version != model.version:
                        self.versions[name].pop(current.version, None)  # type: ignore[arg-type]
                return model
            self.models[name] = model  # new requests go to the new version from here on
            self.versions[name] = {ref.version: model}
            for old in before:
                await self._retire(old)
            return model

    async def unload(self, name: str) -> ServedModel:
        """Take every version of `name` out of service; returns the one that served. UnknownModel when
        the server holds none."""
        if name not in self.models and name not in self.versions:
            raise UnknownModel(name, list(self.models))  # before any state is kept for the name
        async with self._lock(name):
            current = self.models.pop(name, None)
            held = _distinct(current, *self.versions.pop(name, {}).values())
            if not held:
                raise UnknownModel(name, list(self.models))
            self._attempted.pop(name, None)
            shown = current or max(held, key=lambda m: m.version or 0)
            self.unloaded[name] = shown
            for m in held:
                await self._retire(m)
            return shown

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    # ---- poll ----
    async def _poll(self) -> None:
        if self._load_task is not None:
            await asyncio.shield(self._load_task)
        while True:
            await asyncio.sleep(self.settings.repository_poll_s)
            if not self.poll_decides():
                continue  # another worker looks for all of them
            for name in list(self.models):
                try:
                    await self._poll_one(name)
                except Exception:  # one bad look must not end polling
                    log.exception("poll: %s", name)

    async def _poll_one(self, name: str) -> None:
        try:
            ref = await self.repository_io.call(self.repository.resolve, name)
        except (ModelNotExported, RepositoryError) as exc:
            if self._poll_errors.get(name) != str(exc):  # say it once, not every poll
                log.warning("poll: %s: %s; still serving what is loaded", name, exc)
                self._poll_errors[name] = str(exc)
            return
        self._poll_errors.pop(name, None)
        current = self.models.get(name)
        if current is not None and (current.version, current.digest) == (ref.version, ref.digest):
            return
        if self._attempted.get(name) == (ref.version, ref.digest):
            return  # tried and failed: wait for a new version or a changed meta.json
        log.info("poll: %s version %d in %s is new; loading it", name, ref.version, self.repository.location)
        model = await self._switch(name, ref)
        if model.ready and self.on_polled is not None:
            await self.on_polled(name, model)
        if not model.ready:
            log.warning("poll: %s version %d failed to load; version %s keeps serving", name, ref.version,
                        current.version if current is not None and current.ready else "none")  # fmt: skip

    # ---- one version ----
    async def _load(self, model: ServedModel, ref: VersionMeta) -> None:
        loop = asyncio.get_running_loop()
        executor = ThreadPoolExecutor(1, thread_name_prefix=f"infer-{model.name}")
        entry: Entry | None = None
        runner: Runner | None = None
        try:
            tuning = await loop.run_in_executor(executor, self._tuning, model.name)
            # Checked before any download (off the loop: the block is as large as whoever wrote it made
            # it); a bad block fails this version with its reason.
            where = f"{model.name} version {ref.version}: meta.json serving"
            over = [("tuning", tuning.serving)] if tuning else []
            resolve = functools.partial(resolve_serving, ref.meta, self.settings, where=where, over=over)
            config = await loop.run_in_executor(executor, resolve)
            tuned = self._tuning_line(model.name, tuning, config)
            log.info("model %s: %s", model.name, tuned)
            entry = await loop.run_in_executor(executor, self.repository.fetch, ref)
            options = config.runner_options(self.settings)
            runner = await loop.run_in_executor(executor, self._runner_factory, entry, options)
            labels = await loop.run_in_executor(executor, labels_for, entry, runner.num_classes)
            await loop.run_in_executor(executor, self._warm_up, runner, _batch_limit(runner.meta, config.max_batch_size))
        except (ModelNotExported, RepositoryError, RunnerError, UnknownModel) as exc:
            self._fail(model, str(exc), executor, entry, runner)
            return
        except Exception as exc:  # a broken model must not take the server down
            log.exception("model %s failed to load", model.name)
            self._fail(model, f"{type(exc).__name__}: {exc}", executor, entry, runner)
            return
        runner.meta["tuning"] = tuned
        executor = self._start_batchers(model, runner, config, executor)
        model.runner = runner
        model.executor = executor
        model.entry = entry
        model.config = config
        model.meta = runner.meta
        model.labels = labels
        model.state = ModelState.READY
        if runner.meta.get("weights") == "random":
            log.warning("model %s has RANDOM weights: for benchmarking only, its predictions mean nothing", model.name)
        log.info("model %s version %d ready (%s)", model.name, ref.version, runner.meta.get("backend"))

    def _start_batchers(
        self, model: ServedModel, runner: Runner, config: ServingConfig, executor: ThreadPoolExecutor
    ) -> ThreadPoolExecutor:
        """Start `model`'s image and tensor batchers on `runner` with its own batch size and delay; returns
        the executor they run on (one thread per forward pass the runner runs at once)."""
        pp = runner.preprocessing
        s = self.settings
        in_flight = runner.capabilities.max_in_flight
        if in_flight > 1:
            # The runner runs that many forward passes at once: one executor thread for each.
            executor.shutdown(wait=False)
            executor = ThreadPoolExecutor(in_flight, thread_name_prefix=f"infer-{model.name}")

        def observer(size: int, seconds: float, name: str = model.name) -> None:
            if self._on_batch is not None:
                self._on_batch(name, size, seconds)

        def failed(reason: str, model: ServedModel = model) -> None:
            # Readiness and this model's ready route say so; its requests get 503 with the reason.
            model.state = ModelState.FAILED
            model.error = f"stopped serving: {reason}"

        common = dict(
            max_batch_size=_batch_limit(runner.meta, config.max_batch_size),
            max_delay_ms=config.max_delay_ms,
            max_queue_images=s.max_queue_images,
            max_in_flight=in_flight,
            batch_timeout_s=s.batch_timeout_s,
            on_batch=observer,
            on_failure=failed,
        )
        decoder = device_decoder(runner)
        if decoder is not None:
            # Items are images already decoded into device memory: the batch is a list, no host buffer.
            model.image_batcher = DynamicBatcher(decoder.infer_images, None, None, executor, name=model.name, **common)
        else:
            model.image_batcher = DynamicBatcher(
                runner.infer_pixels, (pp.input_size, pp.input_size, 3), np.uint8, executor, name=model.name, **common
            )
        model.tensor_batcher = DynamicBatcher(
            runner.infer_tensor,
            (3, pp.input_size, pp.input_size),
            np.float32,
            executor,
            name=f"{model.name}/tensor",
            **common,
        )
        model.image_batcher.start()
        model.tensor_batcher.start()
        return executor

    def redact(self, error: str) -> str:
        """An error as clients may read it (503 detail, model metadata, the index): the log keeps the
        paths, this does not."""
        return redact_paths(error, *self._private_roots)

    def _tuning(self, name: str) -> tunings.Tuning | None:
        """This CPU's tuning of `name` (models/tunings.py), when the repository has one and --tuning is
        on; tunings for other CPUs are never applied, and the log names them."""
        if not self.settings.tuning:
            return None
        cpu = this_cpu()
        found = tunings.find(self.repository, name, cpu.model, cpu.cores)
        if found.others:
            log.warning("model %s: tuning(s) for other CPUs ignored (%s): this is %s", name, ", ".join(found.others), cpu)
        if found.problem:
            log.warning("model %s: its tuning for this CPU is not used: %s", name, found.problem)
        return found.tuning

    def _tuning_line(self, name: str, tuning: tunings.Tuning | None, config: ServingConfig) -> str:
        """What the start-up log and /v2/models/{m} say of how the serving options were chosen."""
        if tuning is not None:
            return tuning.describe()
        line = "untuned: " if self.settings.tuning else "untuned (--no-tuning): "
        if config["backend"] == "auto":
            backend, why = auto_backend(name, config.runner_options(self.settings))
            return line + f"the static rule chose {backend} ({why}); `saikyo tune {name}` measures instead"
        return line + f"backend {config['backend']} from the {config.values['backend'].source}"

    def _warm_up(self, runner: Runner, max_batch_size: int) -> None:
        size = runner.preprocessing.input_size
        for n in sorted({1, max_batch_size}):
            probs = runner.infer_pixels(np.zeros((n, size, size, 3), np.uint8))
            if probs.shape[0] != n or not np.isfinite(probs).all():
                raise RunnerError(f"warm-up produced bad output of shape {probs.shape}")

    def _fail(
        self,
        model: ServedModel,
        error: str,
        executor: ThreadPoolExecutor | None = None,
        entry: Entry | None = None,
        runner: Runner | None = None,
    ) -> None:
        version = f" version {model.version}" if model.version is not None else ""
        log.error("model %s%s failed to load: %s", model.name, version, error)
        model.state = ModelState.FAILED
        model.error = self.redact(error)
        if runner is not None:
            runner.close()
        if executor is not None:
            executor.shutdown(wait=False)
        if entry is not None:
            entry.release()

    async def _retire(self, model: ServedModel) -> None:
        """Close a version that no new request can find (the caller took it out of `models` and
        `versions`) once the requests holding it have their answers."""
        if model.runner is None:  # it never loaded: nothing to close
            model.state = ModelState.UNLOADED
            return
        model.state = ModelState.UNLOADING
        self.retiring.add(model)
        try:
            if not await model.wait_idle(self.settings.drain_timeout_s):
                log.warning("model %s version %s: %d request(s) still hold it after %.0f s; closing it anyway",
                            model.name, model.version, model.users, self.settings.drain_timeout_s)  # fmt: skip
            await self._close_model(model)
        finally:
            self.retiring.discard(model)
        model.state = ModelState.UNLOADED
        await asyncio.to_thread(_give_memory_back)
        log.info("model %s version %s unloaded", model.name, model.version)

    async def _close_model(self, model: ServedModel) -> None:
        for batcher in (model.image_batcher, model.tensor_batcher):
            if batcher is not None:
                await batcher.close()
        hung = any(b is not None and b.failure for b in (model.image_batcher, model.tensor_batcher))
        if model.executor is not None:
            # A hung runner's thread would never be joined, and its runner is still in use.
            await asyncio.to_thread(model.executor.shutdown, not hung)
        if model.runner is not None and not hung:
            await asyncio.to_thread(model.runner.close)
        if model.entry is not None:
            model.entry.release()

    async def close(self) -> None:
        for task in (self._poll_task, self._load_task):
            if task is not None and not task.done():
                task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass
        for model in self.held():
            if model.state is not ModelState.UNLOADED:
                await self._close_model(model)
        self.decode_pool.shutdown(wait=False, cancel_futures=True)
        self.repository_io.close()


def _distinct(*models: ServedModel | None) -> list[ServedModel]:
    """Each model once (the serving one is also among its name's versions), in order, without None."""
    return list({id(m): m for m in models if m is not None}.values())


def _give_memory_back() -> None:
    """Collect the unloaded runner, then ask glibc to return freed heap pages to the system (without
    this, memory a model's weights held shows as resident until malloc happens to reuse it)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
