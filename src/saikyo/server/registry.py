"""The models a server holds, and the pipeline each request runs through:

    bytes --decode pool--> uint8 pixels --DynamicBatcher--> runner thread --> probabilities

Models load in the background so that liveness answers at once; readiness waits for every model
to load and pass a warm-up inference.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from saikyo import imaging, zoo
from saikyo.batching import DynamicBatcher
from saikyo.repository import ModelNotExported
from saikyo.runtime import Runner, RunnerError, create_runner
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
    pixels: DynamicBatcher | None = None  # images decoded by the server
    tensors: DynamicBatcher | None = None  # preprocessed FP32 tensors sent by clients
    executor: ThreadPoolExecutor | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return self.state is ModelState.READY


class ModelRegistry:
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
        except (ModelNotExported, RunnerError, zoo.UnknownModel) as exc:
            self._fail(model, executor, str(exc))
            return
        except Exception as exc:  # a broken model must not take the server down
            log.exception("model %s failed to load", model.name)
            self._fail(model, executor, f"{type(exc).__name__}: {exc}")
            return
        pp = runner.preprocessing
        s = self.settings

        def observer(size: int, seconds: float, name: str = model.name) -> None:
            if self._on_batch is not None:
                self._on_batch(name, size, seconds)

        common = dict(
            max_batch_size=s.max_batch_size,
            max_delay_ms=s.max_delay_ms,
            max_queue_images=s.max_queue_images,
            on_batch=observer,
        )
        if _decodes_on_device(runner):
            # Items are images already decoded into device memory: the batch is a list, no host buffer.
            model.pixels = DynamicBatcher(runner.infer_images, None, None, executor, name=model.name, **common)  # type: ignore[attr-defined]
        else:
            model.pixels = DynamicBatcher(
                runner.infer_pixels, (pp.input_size, pp.input_size, 3), np.uint8, executor, name=model.name, **common
            )
        model.tensors = DynamicBatcher(
            runner.infer_tensor,
            (3, pp.input_size, pp.input_size),
            np.float32,
            executor,
            name=f"{model.name}/tensor",
            **common,
        )
        model.pixels.start()
        model.tensors.start()
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
            for batcher in (model.pixels, model.tensors):
                if batcher is not None:
                    await batcher.close()
            if model.executor is not None:
                model.executor.shutdown(wait=True)
            if model.runner is not None:
                model.runner.close()
        self.decode_pool.shutdown(wait=False, cancel_futures=True)

    # ---- the pipeline ----
    async def decode(self, model: ServedModel, blobs: Sequence[bytes]) -> list[Any]:
        """Decode every blob into an item for `model.pixels`; a failure is returned in place (an
        ImageError) so the caller can name the file.

        Items are uint8 HWC arrays, or -- for a runner that decodes on its device -- whatever its
        decode_images returns: one call per request, so that nvJPEG decodes the request's images as a batch.
        """
        assert model.runner is not None
        pp = model.runner.preprocessing
        limit = self.settings.max_image_pixels
        loop = asyncio.get_running_loop()
        if _decodes_on_device(model.runner):
            return await loop.run_in_executor(self.decode_pool, model.runner.decode_images, blobs, limit)  # type: ignore[attr-defined]

        def one(data: bytes) -> np.ndarray | imaging.ImageError:
            try:
                return imaging.decode(data, pp, limit)
            except imaging.ImageError as exc:
                return exc

        return list(await asyncio.gather(*(loop.run_in_executor(self.decode_pool, one, b) for b in blobs)))


def _decodes_on_device(runner: Runner) -> bool:
    """Runners that decode JPEGs on their device (the torch runner on CUDA) say so with this attribute."""
    return bool(getattr(runner, "decodes_on_device", False))
