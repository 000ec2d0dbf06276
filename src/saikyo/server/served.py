"""The models a server holds: each one's runner, batchers and state, from loading to closing.

Models load in the background so that liveness answers at once; readiness waits for every model
to load and pass a warm-up inference. What a request does with a model is in server/pipeline.py.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from saikyo.inference.batching import DynamicBatcher
from saikyo.models.errors import ModelNotExported, UnknownModel
from saikyo.runtime import Runner, RunnerError, create_runner
from saikyo.runtime.base import device_decoder
from saikyo.server.redact import redact_paths
from saikyo.settings import Settings

log = logging.getLogger(__name__)


class ModelState(str, enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


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

    @property
    def ready(self) -> bool:
        return self.state is ModelState.READY


class ServedModels:
    def __init__(
        self,
        settings: Settings,
        runner_factory: Callable[[str, Settings], Runner] = create_runner,
        on_batch: Callable[[str, int, float], None] | None = None,
    ) -> None:
        self.settings = settings
        self._runner_factory = runner_factory
        self._on_batch = on_batch
        self.models: dict[str, ServedModel] = {name: ServedModel(name) for name in settings.models}
        self.decode_pool = ThreadPoolExecutor(settings.resolved_decode_threads(), thread_name_prefix="decode")
        self._load_task: asyncio.Task[None] | None = None
        self.started = time.time()
        # Set on SIGTERM (server/shutdown.py): readiness goes false while in-flight requests drain.
        self.draining = False

    # ---- lifecycle ----
    def start_loading(self) -> None:
        self._load_task = asyncio.get_running_loop().create_task(self._load_all(), name="load-models")

    async def wait_loaded(self) -> None:
        if self._load_task is not None:
            await self._load_task

    @property
    def ready(self) -> bool:
        return not self.draining and all(m.ready for m in self.models.values())

    async def _load_all(self) -> None:
        # One at a time: loading is CPU-bound and the cores are few.
        for model in self.models.values():
            await self._load(model)

    async def _load(self, model: ServedModel) -> None:
        loop = asyncio.get_running_loop()
        executor = ThreadPoolExecutor(1, thread_name_prefix=f"infer-{model.name}")
        try:
            runner = await loop.run_in_executor(executor, self._runner_factory, model.name, self.settings)
            await loop.run_in_executor(executor, self._warm_up, runner)
        except (ModelNotExported, RunnerError, UnknownModel) as exc:
            self._fail(model, executor, str(exc))
            return
        except Exception as exc:  # a broken model must not take the server down
            log.exception("model %s failed to load", model.name)
            self._fail(model, executor, f"{type(exc).__name__}: {exc}")
            return
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
            max_batch_size=s.max_batch_size,
            max_delay_ms=s.max_delay_ms,
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
        model.runner = runner
        model.executor = executor
        model.meta = runner.meta
        model.state = ModelState.READY
        if runner.meta.get("weights") == "random":
            log.warning("model %s has RANDOM weights: for benchmarking only, its predictions mean nothing", model.name)
        log.info("model %s ready (%s)", model.name, runner.meta.get("backend"))

    def _warm_up(self, runner: Runner) -> None:
        size = runner.preprocessing.input_size
        for n in sorted({1, self.settings.max_batch_size}):
            probs = runner.infer_pixels(np.zeros((n, size, size, 3), np.uint8))
            if probs.shape[0] != n or not np.isfinite(probs).all():
                raise RunnerError(f"warm-up produced bad output of shape {probs.shape}")

    def _fail(self, model: ServedModel, executor: ThreadPoolExecutor, error: str) -> None:
        log.error("model %s failed to load: %s", model.name, error)
        model.state = ModelState.FAILED
        # Clients read this (503 detail, model metadata): the log above keeps the paths, it does not.
        repo = self.settings.repository
        model.error = redact_paths(error, str(repo.resolve()), str(repo) if repo.is_absolute() else "")
        executor.shutdown(wait=False)

    async def close(self) -> None:
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
            try:
                await self._load_task
            except (asyncio.CancelledError, Exception):
                pass
        for model in self.models.values():
            for batcher in (model.image_batcher, model.tensor_batcher):
                if batcher is not None:
                    await batcher.close()
            hung = any(b is not None and b.failure for b in (model.image_batcher, model.tensor_batcher))
            if model.executor is not None:
                model.executor.shutdown(wait=not hung)  # a hung runner's thread would never be joined
            if model.runner is not None and not hung:
                model.runner.close()
        self.decode_pool.shutdown(wait=False, cancel_futures=True)
