"""OpenVINO runner: the CPU path where OpenVINO is installed (bf16 and int8 kernels, several batches at once).

It reads the repository's model.onnx itself (no second model format). For images, OpenVINO's own
PrePostProcessor puts the layout change, the cast and the mean/std normalisation into the compiled graph,
as the ONNX Runtime runner does with prepended nodes: uint8 NHWC pixels go in.

Streams: the compiled model runs `streams` infer requests at once, each on its share of the cores; the
runner declares that many in `capabilities.max_in_flight`, and the batcher keeps that many batches running.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
from typing import Any

import numpy as np

from saikyo.inference.predictions import softmax
from saikyo.inference.preprocessing import Preprocessing
from saikyo.models import zoo
from saikyo.models.repository import Entry
from saikyo.runtime.base import Capabilities, RunnerError
from saikyo.runtime.options import RunnerOptions
from saikyo.settings import available_cores

# `import openvino` runs openvino.tools.ovc's __init__, which reports the import to Google Analytics through
# openvino-telemetry unless the user opted out beforehand (opt-out, not opt-in: no consent file counts as
# consent). A server never reports anything: with the package hidden, OpenVINO uses its own no-op stub.
# The stub only stands in for the telemetry; inference does not use it.
sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[arg-type]

import openvino as ov  # noqa: E402
from openvino.preprocess import PrePostProcessor  # noqa: E402

log = logging.getLogger(__name__)

DEVICE = "CPU"
_HINTS = {"fp32": "f32", "bf16": "bf16"}  # our names -> OpenVINO's INFERENCE_PRECISION_HINT values
_NAMES = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}


def cpu_has_native_bf16(core: ov.Core | None = None) -> bool:
    """The CPU computes bf16 natively (AVX512_BF16 or AMX): where OpenVINO itself defaults to bf16."""
    return "BF16" in (core or ov.Core()).get_property(DEVICE, "OPTIMIZATION_CAPABILITIES")


def resolve_precision(requested: str, core: ov.Core) -> str:
    """auto -> bf16 where the CPU has native bf16, else fp32; an explicit bf16 the CPU lacks is refused
    (OpenVINO would quietly run fp32 instead)."""
    has_bf16 = cpu_has_native_bf16(core)
    if requested == "auto":
        return "bf16" if has_bf16 else "fp32"
    if requested == "bf16" and not has_bf16:
        raise RunnerError("precision bf16 asked for, but this CPU has no native bf16 (AVX512_BF16 or AMX)")
    return requested


def with_pixel_front(model: ov.Model, pp: Preprocessing) -> ov.Model:
    """`model` (float32 NCHW, normalised) taking uint8 [N, H, W, 3] RGB pixels instead."""
    ppp = PrePostProcessor(model)
    inp = ppp.input()
    inp.tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC"))
    inp.model().set_layout(ov.Layout("NCHW"))
    # x * scale + shift (Preprocessing.pixel_affine) as OpenVINO's (x - m) / s: s = 1 / scale, m = -shift / scale
    scale, shift = pp.pixel_affine()
    inp.preprocess().convert_element_type(ov.Type.f32).mean((-shift / scale).tolist()).scale((1.0 / scale).tolist())
    return ppp.build()


class OpenVinoRunner:
    def __init__(self, name: str, model: ov.Model, meta: dict[str, Any], options: RunnerOptions, core: ov.Core) -> None:
        if options.device not in ("cpu", "auto"):
            raise RunnerError(f"the openvino backend runs on the CPU, not device {options.device!r}")
        if len(model.inputs) != 1 or len(model.outputs) != 1:
            raise RunnerError(f"expected one input and one output, found {len(model.inputs)} and {len(model.outputs)}")
        self.name = name
        self.preprocessing = Preprocessing.from_dict(meta["preprocessing"])
        self._core = core
        self._tensor_model = model
        self.precision = resolve_precision(options.precision, core)
        threads = options.threads
        # Streams share the threads; more streams than threads would only queue.
        self.streams = min(options.streams, threads)
        self._config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": _HINTS[self.precision],
            "NUM_STREAMS": self.streams,
            "INFERENCE_NUM_THREADS": threads,
            # Pinning helps a process that owns every core; several processes on a share each (--workers)
            # would all pin to the same first cores, so there the scheduler places the threads.
            "ENABLE_CPU_PINNING": threads >= available_cores(),
        }
        try:
            pixels = with_pixel_front(model.clone(), self.preprocessing)
            self._pixels = core.compile_model(pixels, DEVICE, self._config)
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses of its own for bad graphs
            raise RunnerError(f"OpenVINO could not load model {name!r}: {exc}") from exc
        self._requests = _RequestPool(self._pixels, self.streams)
        self._tensor_requests: _RequestPool | None = None
        self._tensor_lock = threading.Lock()
        classes = self._pixels.outputs[0].get_partial_shape()[-1]
        self.num_classes = classes.get_length() if classes.is_static else int(meta.get("num_classes", 1000))
        self.capabilities = Capabilities(max_in_flight=self.streams)
        self.stats = None
        hint = self._pixels.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        ran_at = _NAMES.get(hint, hint)  # what OpenVINO took, not what we asked for
        # A quantised file runs its quantised layers in int8 whatever the hint; the hint covers the rest.
        served = "int8" if (meta.get("precision") or zoo.precision_of(name)) == "int8" else ran_at
        self.meta = dict(meta)
        self.meta.update(
            backend="openvino",
            device="cpu",
            precision=served,
            inference_precision=ran_at,
            streams=self.streams,
            threads=threads,
            openvino_version=ov.get_version(),
        )
        log.info("model %s on OpenVINO: %s (inference precision %s), %d stream(s), %d thread(s)",
                 name, served, ran_at, self.streams, threads)  # fmt: skip

    @classmethod
    def load(cls, entry: Entry, options: RunnerOptions) -> "OpenVinoRunner":
        core = ov.Core()
        try:
            graph = core.read_model(str(entry.path))
        except Exception as exc:
            raise RunnerError(f"model file for {entry.name!r} is unreadable: {exc}") from exc
        return cls(entry.name, graph, entry.meta, options, core)

    def infer_pixels(self, pixels: np.ndarray) -> np.ndarray:
        return softmax(self._requests.run(pixels))

    def infer_tensor(self, tensor: np.ndarray) -> np.ndarray:
        # Compiled on first use: most deployments never receive preprocessed tensors.
        with self._tensor_lock:
            if self._tensor_requests is None:
                compiled = self._core.compile_model(self._tensor_model, DEVICE, self._config)
                self._tensor_requests = _RequestPool(compiled, self.streams)
        return softmax(self._tensor_requests.run(tensor))

    def close(self) -> None:
        self._requests = None  # type: ignore[assignment]
        self._tensor_requests = None
        self._pixels = None  # type: ignore[assignment]


class _RequestPool:
    """One infer request per stream; a call takes a free one, so `size` calls run at once in OpenVINO."""

    def __init__(self, compiled: ov.CompiledModel, size: int) -> None:
        self._free: queue.SimpleQueue[ov.InferRequest] = queue.SimpleQueue()
        for _ in range(size):
            self._free.put(compiled.create_infer_request())

    def run(self, batch: np.ndarray) -> np.ndarray:
        request = self._free.get()
        try:
            # The batch goes in without a copy; the output comes out as a copy (share_outputs=False), so
            # the request can take the next batch while this one is being distributed.
            return request.infer({0: batch}, share_inputs=True, share_outputs=False)[0]
        finally:
            self._free.put(request)
