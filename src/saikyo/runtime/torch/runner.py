"""PyTorch runner: the accelerator path (and, without one, the same code on the CPU).

Loads the zoo network from its builder plus the repository entry's `weights.pt` -- exactly the weights
that went into model.onnx -- so the ONNX file stays the CPU artefact. On CUDA:
- fp16 (or bf16) weights, channels_last, inference mode, cudnn autotuning;
- fixed batch buckets: a batch pads up to the next bucket, so every size the server can form is one of
  a few static shapes, each warmed up and captured once as a CUDA graph at load. A replay is one launch
  for the whole network: no Python or kernel-launch overhead per layer, no recompiling per batch size;
- uint8 NHWC pixels cross the bus (a quarter of float32's bytes) from pinned host memory with
  non-blocking copies; the cast and normalisation run inside the graph. uint8 NHWC viewed as NCHW is
  exactly the channels_last layout, so no transpose is ever materialised;
- optionally, JPEGs decoded on the GPU (`saikyo.runtime.torch.imaging`): the batch then arrives as device tensors;
- several batches in flight (`saikyo.runtime.torch.pipelining`): each slot has its own input, graphs, stream and
  pinned output, so the host stages the next batch and copies the last one out while the GPU runs.
On the CPU: fp32, eager, no padding (padding only buys fixed shapes, which eager mode does not need).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from saikyo.inference import imaging
from saikyo.inference.preprocessing import Preprocessing
from saikyo.models import zoo
from saikyo.models.errors import UnknownModel, WeightsUnavailable
from saikyo.models.repository import WEIGHTS_FILE, Entry
from saikyo.runtime.torch import imaging as torch_imaging
from saikyo.runtime.base import Capabilities, RunnerError
from saikyo.runtime.torch.decode_queue import DecodeQueue
from saikyo.runtime.options import RunnerOptions
from saikyo.runtime.torch.pipelining import SlotPipeline
from saikyo.runtime.torch.imaging import host_tensor, to_device

log = logging.getLogger(__name__)
T = TypeVar("T")

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# Images one call of the decode queue takes from the requests waiting (each nvJPEG call within it is
# bounded by torch_imaging.DECODE_CHUNK_PIXELS).
DECODE_GATHER_IMAGES = 256
# Forward passes before capture: cudnn autotuning and lazy initialisation must not land in the graph.
WARMUP_RUNS = 2


def resolve_device(requested: str) -> torch.device:
    """"cuda" | "cpu" | "auto" (CUDA when present) -> a torch device; asking for absent CUDA is an error."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RunnerError(f"device {requested!r} asked for, but torch {torch.__version__} sees no CUDA device")
        return torch.device(requested)
    if requested == "cpu":
        return torch.device("cpu")
    raise RunnerError(f"unknown device {requested!r}; choose cpu, cuda or auto")


def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    """fp16 by default on CUDA; always fp32 on the CPU, where half precision is slower, not faster."""
    if requested not in ("auto", *DTYPES):
        raise RunnerError(f"unknown dtype {requested!r}; choose auto, fp16, bf16 or fp32")
    if device.type != "cuda":
        return torch.float32
    return torch.float16 if requested == "auto" else DTYPES[requested]


def bucket_sizes(buckets: Sequence[int], max_batch_size: int) -> tuple[int, ...]:
    """The batch sizes a forward pass runs at: the buckets up to max_batch_size, and max_batch_size."""
    if max_batch_size < 1:
        raise ValueError("max_batch_size must be >= 1")
    return tuple(sorted({b for b in buckets if 1 <= b < max_batch_size} | {max_batch_size}))


def bucket_for(n: int, sizes: Sequence[int]) -> int:
    """The smallest bucket that holds n images (n must not exceed the largest)."""
    for size in sizes:
        if size >= n:
            return size
    raise ValueError(f"{n} images exceed the largest bucket {sizes[-1]}")


@dataclass(eq=False)
class _Slot:
    """The buffers of one batch in flight: graphs read from and write to fixed addresses, so each slot
    has its own static input, its own graphs (sharing one memory pool: a slot runs one batch at a time),
    its own stream and its own pinned output."""

    pixels_dev: torch.Tensor  # uint8 [top, S, S, 3]: the graphs' input
    pixels_host: torch.Tensor | None  # pinned staging for it (CUDA)
    out_host: torch.Tensor  # float32 [top, classes], pinned on CUDA
    stream: torch.cuda.Stream | None = None
    start: torch.cuda.Event | None = None  # recorded before the staging copy ...
    end: torch.cuda.Event | None = None  # ... and after the copy back: the batch's device time
    pool: Any = None  # CUDA graph memory pool
    graphs: dict[tuple[str, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = field(default_factory=dict)
    tensor_dev: torch.Tensor | None = None  # built on first use: v2 FP32 clients are rare
    tensor_host: torch.Tensor | None = None


Job = tuple[str, Any, int]  # ("pixels" | "images" | "tensor", the batch, its size)


class TorchRunner:
    def __init__(
        self,
        name: str,
        model: nn.Module,
        preprocessing: Preprocessing,
        meta: dict[str, Any],
        *,
        device: str = "auto",
        dtype: str = "auto",
        max_batch_size: int = 16,
        buckets: Sequence[int] = (1, 2, 4, 8, 16, 32, 64, 96, 128, 160, 192, 224, 256),
        cuda_graphs: bool = True,
        compile: bool = False,
        device_decode: str = "auto",
        pad: bool | None = None,
        in_flight: int = 2,
    ) -> None:
        self.name = name
        self.preprocessing = preprocessing
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.num_classes = int(meta.get("num_classes", 1000))
        self.buckets = bucket_sizes(buckets, max_batch_size)
        self.max_batch_size = self.buckets[-1]
        on_cuda = self._on_cuda = self.device.type == "cuda"
        # Fixed shapes matter to CUDA graphs and to compiled code; eager CPU runs the exact batch.
        self.pad = (on_cuda or compile) if pad is None else pad
        self._static = on_cuda or self.pad
        self.cuda_graphs = on_cuda and cuda_graphs and self.pad
        if device_decode not in ("auto", "on", "off"):
            raise RunnerError(f"unknown device_decode {device_decode!r}; choose auto, on or off")
        if in_flight < 1:
            raise RunnerError(f"in_flight must be at least 1, not {in_flight}")
        # Static batches go through a pipeline of `in_flight` slots; the direct CPU path runs one at a time.
        self.in_flight = in_flight if self._static else 1
        # Read by the server: encoded JPEGs come to decode_images instead of the CPU pool, and the batcher
        # keeps as many batches coming as the pipeline has slots.
        self.capabilities = Capabilities(
            device_decode=device_decode == "on" or (device_decode == "auto" and on_cuda),
            max_in_flight=self.in_flight,
        )
        self._decode_streams = threading.local()  # one CUDA stream per thread that decodes (_on_thread_stream)
        # One thread gathers the JPEGs of every request waiting for decode into one nvJPEG call.
        self._decode_queue: DecodeQueue[torch_imaging.DecodeJob] | None = (
            DecodeQueue(self._decode_jobs, max_images=DECODE_GATHER_IMAGES, name=name)
            if self.capabilities.device_decode
            else None
        )
        self._lock = threading.Lock()  # the direct path, and forward_resident
        self._loaded = False  # set after warm-up: no graph captures after that

        if on_cuda:
            torch.backends.cudnn.benchmark = True  # autotune conv algorithms per (fixed) shape
        model = model.eval().to(self.device, self.dtype).to(memory_format=torch.channels_last)
        for p in model.parameters():
            p.requires_grad_(False)
        self._model: nn.Module = model
        if compile:
            self._model = torch.compile(model, dynamic=False)  # type: ignore[assignment]

        # x * scale + shift, in float32 before the cast.
        scale, shift = preprocessing.pixel_affine()
        self._scale = torch.from_numpy(scale).view(1, 3, 1, 1).to(self.device)
        self._shift = torch.from_numpy(shift).view(1, 3, 1, 1).to(self.device)
        self._slots = [self._new_slot() for _ in range(self.in_flight)]
        self._pipeline: SlotPipeline[int] | None = (
            SlotPipeline(_SlotDevice(self), self.in_flight, name=name) if self._static else None
        )
        # Running totals for /metrics (device ms vs host ms per batch, batches in flight): static path only.
        self.stats = self._pipeline.stats if self._pipeline is not None else None

        self.meta = dict(meta)
        self.meta.update(
            backend="torch",
            device=str(self.device),
            dtype=str(self.dtype).removeprefix("torch."),
            precision=next(k for k, v in DTYPES.items() if v == self.dtype),  # what records call it: "fp16"
            batch_buckets=list(self.buckets) if self.pad else None,
            cuda_graphs=self.cuda_graphs,
            torch_compile=compile,
            device_decode=self.capabilities.device_decode,
            in_flight=self.in_flight,
            torch_version=torch.__version__,
        )
        if on_cuda:
            self.meta["gpu"] = torch.cuda.get_device_name(self.device)
            self.meta["cuda_mps"] = cuda_mps_running()
        try:
            self._warm_up()
        except BaseException:
            self.close()
            raise

    def _new_slot(self) -> _Slot:
        size, top = self.preprocessing.input_size, self.max_batch_size
        pin = self._on_cuda
        slot = _Slot(
            pixels_dev=torch.zeros((top, size, size, 3), dtype=torch.uint8, device=self.device),
            pixels_host=torch.zeros((top, size, size, 3), dtype=torch.uint8, pin_memory=True) if pin else None,
            out_host=torch.zeros((top, self.num_classes), dtype=torch.float32, pin_memory=pin),
        )
        if pin:
            slot.stream = torch.cuda.Stream(self.device)
            slot.start = torch.cuda.Event(enable_timing=True)
            slot.end = torch.cuda.Event(enable_timing=True)
            slot.pool = torch.cuda.graph_pool_handle()
        return slot

    # ---- construction ----
    @classmethod
    def load(cls, entry: Entry, options: RunnerOptions) -> "TorchRunner":
        name, meta = entry.name, entry.meta
        base = str(meta.get("base_model") or zoo.base_name(name))
        if zoo.precision_of(name) != "fp32" or meta.get("precision", "fp32") != "fp32":
            raise RunnerError(
                f"model {name!r} is a quantised ONNX variant, which ONNX Runtime and OpenVINO run: "
                f"serve it with --backend onnxruntime or openvino, or serve {base!r} with --backend torch"
            )
        try:
            spec = zoo.get(base)
        except UnknownModel:
            raise RunnerError(f"model {name!r} is not a zoo network, so the torch runner cannot build it") from None
        model = build_model(spec, meta, entry.path.parent / WEIGHTS_FILE)
        return cls(
            name,
            model,
            Preprocessing.from_dict(meta["preprocessing"]),
            meta,
            device=options.device,
            dtype=options.torch_dtype,
            max_batch_size=options.max_batch_size,
            buckets=options.batch_buckets,
            cuda_graphs=options.cuda_graphs,
            compile=options.torch_compile,
            device_decode=options.device_decode,
            in_flight=options.in_flight,
        )

    # ---- the Runner protocol ----
    def infer_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, 3] -> float32 probabilities [N, classes]; N above the top bucket runs in chunks."""
        return self._chunked("pixels", pixels)

    def infer_tensor(self, tensor: np.ndarray) -> np.ndarray:
        """float32 [N, 3, H, W], normalised -> float32 probabilities [N, classes]."""
        return self._chunked("tensor", tensor.astype(np.float32, copy=False))

    def infer_images(self, images: Sequence[torch.Tensor | np.ndarray]) -> np.ndarray:
        """uint8 [H, W, 3] images from decode_images (device tensors) -> probabilities [N, classes]."""
        return self._chunked("images", images)

    def decode_images(
        self, blobs: Sequence[bytes], max_pixels: int | None = None, budget: imaging.RequestBudget | None = None
    ) -> list[torch.Tensor | imaging.ImageError]:
        """Encoded images -> uint8 [H, W, 3] tensors on this runner's device, or an ImageError each.

        Called from the server's decode threads, one request each: its JPEGs join those of every other
        request waiting, in one nvJPEG call on the decode queue's thread (its own CUDA stream, waited
        for before the images are handed back, so they are complete when they reach a batch). What
        nvJPEG does not take is decoded here on the CPU. The images are released only after the batch
        that used them has completed, so the caching allocator cannot hand their memory out early.
        """
        pp, device = self.preprocessing, self.device
        if self._decode_queue is None:  # device decode off, called directly (benchmarks, tests)
            return self._on_thread_stream(lambda: torch_imaging.decode(blobs, pp, device, max_pixels, budget))
        part = self._decode_queue.decode(torch_imaging.DecodeJob(blobs, max_pixels, budget))
        if all(isinstance(item, torch.Tensor) for item in part):
            return part  # type: ignore[no-any-return]
        return self._on_thread_stream(lambda: torch_imaging.finish_on_cpu(blobs, part, pp, device, max_pixels, budget))

    def _decode_jobs(self, jobs: list[torch_imaging.DecodeJob]) -> list[Any]:
        """The decode queue's call, on its thread: every waiting request's JPEGs at once."""
        return self._on_thread_stream(lambda: torch_imaging.decode_jpegs_of(jobs, self.preprocessing, self.device))

    def _on_thread_stream(self, work: Callable[[], T]) -> T:
        """`work`'s CUDA kernels and copies on a stream of the calling thread's own, waited for before
        returning: a forward pass never queues behind them, and what they produce is complete when it
        reaches a batch. On the CPU, just `work()`."""
        if not self._on_cuda:
            return work()
        stream = getattr(self._decode_streams, "stream", None)
        if stream is None:
            stream = self._decode_streams.stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(stream):
            out = work()
        stream.synchronize()
        return out

    def forward_resident(self, n: int) -> torch.Tensor:
        """The network alone on the first n images already in the device input buffer (no host copies,
        no wait for the result): what the model itself sustains, for benchmarks. Probabilities [n, classes]."""
        with self._lock, torch.inference_mode():
            return self._run(self._slots[0], "pixels", self._size(n))[:n]

    def close(self) -> None:
        """Finish the batches in flight, then let go of the graphs and the model."""
        if self._decode_queue is not None:
            self._decode_queue.close()
        if self._pipeline is not None:
            self._pipeline.close()
        for slot in self._slots:
            slot.graphs.clear()
        self._model = None  # type: ignore[assignment]
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- batches ----
    def _chunked(self, kind: str, batch: Any) -> np.ndarray:
        n = len(batch)
        if n == 0:
            return np.empty((0, self.num_classes), np.float32)
        top = self.max_batch_size
        if self._pipeline is None:
            with self._lock, torch.inference_mode():
                parts = [self._run_direct(kind, batch[lo : lo + top]) for lo in range(0, n, top)]
        else:
            # Every chunk is submitted before the first is awaited: chunks of one call pipeline too.
            sizes = [(lo, min(top, n - lo)) for lo in range(0, n, top)]
            futures = [self._pipeline.submit((kind, batch[lo : lo + k], k), k) for lo, k in sizes]
            parts = [f.result() for f in futures]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _size(self, n: int) -> int:
        return bucket_for(n, self.buckets) if self.pad else n

    # Two ways through. Static (CUDA, or padding asked for): a slot of the pipeline; the batch is written
    # into the slot's input -- on CUDA from pinned host memory -- and a bucket of it runs (as a graph when
    # captured). Direct (CPU, no padding): the caller's array runs as it is, with no copy.
    def _run_direct(self, kind: str, batch: Any) -> np.ndarray:
        if kind == "pixels":
            probs = self._forward_pixels(host_tensor(batch))
        elif kind == "tensor":
            probs = self._forward_tensor(host_tensor(batch))
        else:
            probs = self._forward_pixels(torch.stack([_on(im, self.device) for im in batch]))
        return probs.numpy().copy()

    def _launch(self, slot: _Slot, job: Job) -> None:
        """Stage one batch into `slot`, run it and start the copy back; on CUDA all of it is queued on the
        slot's stream and nothing here waits for the GPU."""
        kind, batch, n = job
        with torch.inference_mode(), (torch.cuda.stream(slot.stream) if slot.stream else contextlib.nullcontext()):
            if slot.start is not None:
                slot.start.record()
            if kind == "pixels":
                _stage(batch, slot.pixels_dev, slot.pixels_host)
                probs = self._run(slot, "pixels", self._size(n))
            elif kind == "images":
                # One kernel writes every decoded image straight into the slot's input. CPU-decoded
                # images (formats nvJPEG does not take) come as numpy arrays.
                torch.stack([_on(im, self.device) for im in batch], out=slot.pixels_dev[:n])
                probs = self._run(slot, "pixels", self._size(n))
            else:
                _stage(batch, *self._tensor_buffers(slot))
                probs = self._run(slot, "tensor", self._size(n))
            slot.out_host[:n].copy_(probs[:n], non_blocking=slot.stream is not None)
            if slot.end is not None:
                slot.end.record()

    def _tensor_buffers(self, slot: _Slot) -> tuple[torch.Tensor, torch.Tensor | None]:
        if slot.tensor_dev is None:
            s = self.preprocessing.input_size
            shape = (self.max_batch_size, 3, s, s)
            slot.tensor_dev = torch.zeros(shape, dtype=torch.float32, device=self.device)
            if self._on_cuda:
                slot.tensor_host = torch.zeros(shape, dtype=torch.float32, pin_memory=True)
        return slot.tensor_dev, slot.tensor_host

    def _run(self, slot: _Slot, kind: str, size: int) -> torch.Tensor:
        """Run the first `size` rows of the slot's static input `kind` ("pixels" | "tensor"); a graph if
        captured.

        Graphs are captured at load only (pixels): capturing later, while other threads run CUDA work
        for requests, invites trouble, and client-sent tensors are rare enough to run eagerly.
        """
        graph = slot.graphs.get((kind, size))
        if graph is None and self.cuda_graphs and not self._loaded:
            graph = self._capture(slot, kind, size)
        if graph is not None:
            graph[0].replay()
            return graph[1]
        return self._forward(slot, kind, size)

    def _forward(self, slot: _Slot, kind: str, size: int) -> torch.Tensor:
        if kind == "pixels":
            return self._forward_pixels(slot.pixels_dev[:size])
        return self._forward_tensor(self._tensor_buffers(slot)[0][:size])

    def _forward_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        # NHWC uint8 permuted to NCHW is channels_last; elementwise ops keep that layout.
        x = pixels.permute(0, 3, 1, 2).float().mul_(self._scale).add_(self._shift).to(self.dtype)
        return self._model(x).float().softmax(dim=1)

    def _forward_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        x = tensor.to(self.dtype).contiguous(memory_format=torch.channels_last)
        return self._model(x).float().softmax(dim=1)

    def _capture(self, slot: _Slot, kind: str, size: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor] | None:
        """Warm up, then capture bucket `size` as a CUDA graph; on failure fall back to eager for good."""
        try:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(WARMUP_RUNS):
                    self._forward(slot, kind, size)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: another model already serving may run CUDA work in its threads meanwhile.
            # One pool per slot: its graphs never run at once, so they can share their scratch memory.
            with torch.cuda.graph(graph, pool=slot.pool, capture_error_mode="thread_local"):
                out = self._forward(slot, kind, size)
        except Exception as exc:  # an op that cannot be captured: serve eagerly rather than not at all
            log.warning("model %s: CUDA graph capture failed at batch %d (%s); running eagerly", self.name, size, exc)
            self.cuda_graphs = False
            self.meta["cuda_graphs"] = False
            torch.cuda.synchronize(self.device)
            return None
        slot.graphs[(kind, size)] = (graph, out)
        return graph, out

    def _warm_up(self) -> None:
        """Every bucket of every slot once (capturing its graph), largest first, so that no request pays
        for it."""
        with self._lock, torch.inference_mode():
            if not self._on_cuda:
                self._forward_pixels(self._slots[0].pixels_dev[:1])
            else:
                for slot in self._slots:
                    with torch.cuda.stream(slot.stream):
                        for size in sorted(self.buckets if self.pad else (self.max_batch_size,), reverse=True):
                            self._run(slot, "pixels", size)
                torch.cuda.synchronize(self.device)
        self._loaded = True
        if self.capabilities.device_decode:
            self._warm_up_decoder()

    def _warm_up_decoder(self) -> None:
        """nvJPEG initialises on first use (hundreds of ms): do it at load, not in a request."""
        import io

        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (64, 48), (120, 60, 30)).save(buf, "JPEG")
        (decoded,) = self.decode_images([buf.getvalue()])
        if isinstance(decoded, imaging.ImageError):
            raise RunnerError(f"device JPEG decode failed at warm-up: {decoded}")
        self.infer_images([decoded])


class _SlotDevice:
    """The runner's slots as the pipeline's SlotDevice: CUDA events say when a slot is done; on the
    CPU a launch runs the whole batch, so there is nothing to wait for."""

    def __init__(self, runner: TorchRunner) -> None:
        self._runner = runner

    def launch(self, slot: int, batch: Job) -> int:
        s = self._runner._slots[slot]
        try:
            self._runner._launch(s, batch)
        except BaseException:
            if s.stream is not None:
                s.stream.synchronize()  # the slot is handed out again: nothing of this batch may still run
            raise
        return batch[2]

    def wait(self, slot: int, n: int) -> None:
        end = self._runner._slots[slot].end
        if end is not None:
            end.synchronize()

    def fetch(self, slot: int, n: int) -> np.ndarray:
        return self._runner._slots[slot].out_host[:n].numpy().copy()

    def device_seconds(self, slot: int, n: int) -> float | None:
        s = self._runner._slots[slot]
        return s.start.elapsed_time(s.end) / 1000.0 if s.start is not None and s.end is not None else None


def _stage(batch: np.ndarray, dev: torch.Tensor, pinned: torch.Tensor | None) -> None:
    """Write a host batch into the first rows of the device buffer `dev`: through `pinned` staging
    asynchronously (CUDA), else directly."""
    n = len(batch)
    if pinned is not None:
        pinned[:n].numpy()[...] = batch
        dev[:n].copy_(pinned[:n], non_blocking=True)
    else:
        dev[:n].copy_(host_tensor(batch))


def _on(image: torch.Tensor | np.ndarray, device: torch.device) -> torch.Tensor:
    return to_device(host_tensor(image), device) if isinstance(image, np.ndarray) else image


def cuda_mps_running() -> bool:
    """Whether an MPS control daemon is up for this user (several processes then share the GPU's SMs
    at once instead of time-slicing): its control pipe is in CUDA_MPS_PIPE_DIRECTORY."""
    pipe_dir = os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps")
    return Path(pipe_dir, "control").exists()


def build_model(spec: zoo.ModelSpec, meta: dict[str, Any], weights_file: Path) -> nn.Module:
    """The entry's network: zoo builder + weights.pt; for entries without it, rebuild "random" weights."""
    from saikyo.models import builders

    try:
        if weights_file.is_file():
            return builders.build(spec, str(weights_file))
        if meta.get("weights") == "random":
            # Same builder, same seed as at export: the same network, as long as torch's init is unchanged.
            log.warning("%s has no %s; rebuilding its random weights from the seed", spec.name, WEIGHTS_FILE)
            return builders.build(spec, "random")
    except WeightsUnavailable as exc:
        raise RunnerError(f"cannot load the torch weights of {spec.name!r}: {exc}") from None
    raise RunnerError(
        f"model {spec.name!r} has no {WEIGHTS_FILE} beside its model.onnx (exported by an older saikyo); "
        f"export it again for the torch backend: saikyo models export {spec.name} --weights ..."
    )
