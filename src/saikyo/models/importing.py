"""`saikyo models import`: a user's own classifier -> a new version in the repository.

SOURCE is an ONNX file (any single-input image classifier, rewritten to the contract by
models/onnx_import.py) or a PyTorch state dict for a zoo or timm architecture (exported as zoo models
are). Labels and preprocessing come with it. Everything is built and checked in a private temporary
directory; only then is it published (Repository.publish: files, then meta.json, renamed into place
locally, the same path `models push` takes to s3://), so an error leaves the repository as it was.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saikyo.inference.preprocessing import Preprocessing
from saikyo.models import onnx_import, zoo
from saikyo.models.contract import check_contract, io_meta
from saikyo.models.errors import ImportRejected
from saikyo.models.label_files import LABELS_FILE, read_labels, write_labels
from saikyo.models.preprocessing_files import PreprocessingSpec, read_file
from saikyo.models.provenance import sha256_file, utc_now, versions
from saikyo.models.repository import MODEL_FILE, Repository

FAMILY = "imported"
TIMM_PREFIX = "timm:"
DEFAULT_OPSET = 18

Progress = Callable[[str], None]


@dataclass
class ImportOptions:
    labels: Path | None = None
    preprocessing_file: Path | None = None
    preprocessing: PreprocessingSpec = field(default_factory=PreprocessingSpec)  # from flags
    layout: str | None = None
    output: str | None = None
    arch: str | None = None
    opset: int = DEFAULT_OPSET
    quantize: str | None = None  # "int8": NAME-int8 beside NAME, calibrated on calibration_dir's photos
    calibration_dir: Path | None = None


@dataclass(frozen=True)
class Converted:
    """A source turned into the contract's model.onnx, and what meta.json says of it."""

    preprocessing: Preprocessing
    asked: dict[str, Any]  # the preprocessing as given (file, flags), for meta.json
    source: str  # onnx | torch | timm
    num_classes: int
    layout: str  # the source's input layout
    output: str  # the source's output kind: logits | probabilities
    notes: list[str]
    check: dict[str, Any]
    fixed_batch: int | None = None  # the graph only takes this batch
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Imported:
    name: str
    version: int
    meta: dict[str, Any]
    notes: list[str]
    int8: dict[str, Any] | None = None  # NAME-int8's meta.json, when asked for


def check_name(name: str) -> None:
    """An imported model's name: one path component, and not a zoo model's (whose name means its network)."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith(".") or len(name) > 128:
        raise ImportRejected(f"model name {name!r} must be one path component (letters, digits, - _ .), not starting with '.'")
    base, variant = zoo.split_variant(name)
    if base in zoo.ZOO:
        raise ImportRejected(f"{name!r} is a zoo model's name; import under a name of your own")
    if variant is not None:
        raise ImportRejected(f"{name!r} ends in -{variant}, which names quantised variants; choose another name")


def import_model(name: str, source: Path, repository: Repository, options: ImportOptions, progress: Progress | None = None) -> Imported:
    say = progress or (lambda _msg: None)
    check_name(name)
    if not source.is_file():
        raise ImportRejected(f"SOURCE {source} is not a file; expected an ONNX model or, with --arch, a PyTorch state dict")
    calibration = _calibration_photos(options)
    given = read_file(options.preprocessing_file) if options.preprocessing_file is not None else None
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"saikyo-import-{name}.") as tmp:
        path = Path(tmp) / MODEL_FILE
        if options.arch is not None:
            done = _from_state_dict(source, options, given, path, say)
        else:
            if options.opset != DEFAULT_OPSET:
                raise ImportRejected("--opset is for --arch state dicts; an ONNX file keeps its own opset")
            done = _from_onnx(source, options, options.preprocessing.over(given or PreprocessingSpec()), path, say)
        pre, kind = done.preprocessing, done.source
        if done.fixed_batch is None:
            check_contract(path, pre.input_size, done.num_classes)
        files = [path]
        labels_meta = None
        if options.labels is not None:
            labels = read_labels(options.labels, done.num_classes)
            files.append(write_labels(labels, Path(tmp) / LABELS_FILE))
            labels_meta = LABELS_FILE
        weights = f"file:{sha256_file(source)}"
        meta: dict[str, Any] = {
            "name": name,
            "family": FAMILY,
            "source": kind,
            "source_file": source.name,
            "source_sha256": sha256_file(source),
            "base_model": name,
            "description": f"imported from {source.name} ({kind})",
            "precision": "fp32",
            "weights": weights,
            "num_classes": done.num_classes,
            "input_size": pre.input_size,
            "layout": done.layout,
            "output": done.output,
            "labels": labels_meta,
            "preprocessing": pre.to_dict(),
            "preprocessing_source": done.asked,
            "opset": _opset(path),
            "exported_at": utc_now(),
            "export_seconds": round(time.perf_counter() - started, 1),
            "versions": versions(),
            **io_meta(pre.input_size, done.num_classes),
            "import_notes": done.notes,
            "check": done.check,
            "sha256": sha256_file(path),
            **done.extra,
        }
        if done.fixed_batch is not None:
            # The repository's per-model serving settings: this graph cannot take larger batches.
            meta["serving"] = {"max_batch_size": done.fixed_batch}
            for tensor in (*meta["inputs"], *meta["outputs"]):
                tensor["shape"][0] = done.fixed_batch
        int8 = None
        if options.quantize is not None:
            int8_files, int8 = _int8(name, files, meta, Path(tmp) / "int8", calibration, say)
        say(f"publishing {name} to {repository.location}")
        version = repository.publish(name, files, meta)
        if int8 is not None:
            int8_name = zoo.variant_name(name, "int8")
            say(f"publishing {int8_name} to {repository.location}")
            repository.publish(int8_name, int8_files, int8)
    return Imported(name, version, meta, done.notes, int8)


CALIBRATION_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
MAX_CALIBRATION_PHOTOS = 1000


def _calibration_photos(options: ImportOptions) -> list[Path] | None:
    """The photos in --calibration-dir, each checked to open as an image; None: scikit-image's."""
    if options.quantize is None:
        if options.calibration_dir is not None:
            raise ImportRejected("--calibration-dir is for --quantize int8")
        return None
    if options.quantize not in zoo.VARIANTS:
        raise ImportRejected(f"--quantize {options.quantize!r}: supported: {', '.join(zoo.VARIANTS)}")
    if options.calibration_dir is None:
        return None
    if not options.calibration_dir.is_dir():
        raise ImportRejected(f"--calibration-dir {options.calibration_dir} is not a directory")
    photos = sorted(p for p in options.calibration_dir.iterdir() if p.suffix.lower() in CALIBRATION_SUFFIXES and p.is_file())
    if not photos:
        raise ImportRejected(f"--calibration-dir {options.calibration_dir} holds no photos ({', '.join(CALIBRATION_SUFFIXES)})")
    if len(photos) > MAX_CALIBRATION_PHOTOS:
        raise ImportRejected(f"--calibration-dir holds {len(photos)} photos; calibrate on at most {MAX_CALIBRATION_PHOTOS}")
    from PIL import Image

    for photo in photos:
        try:
            with Image.open(photo) as image:
                image.verify()
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImportRejected(f"calibration photo {photo} is not a usable image ({type(exc).__name__})") from None
    return photos


def _int8(name: str, files: list[Path], meta: dict[str, Any], directory: Path, calibration: list[Path] | None, say: Progress) -> tuple[list[Path], dict[str, Any]]:
    """NAME-int8's files and meta.json, made from the staged fp32 version before anything is published."""
    import shutil

    from saikyo.models.quantize import quantize_file
    from saikyo.models.repository import Entry

    directory.mkdir()
    model, meta_int8 = quantize_file(Entry(name, files[0], meta), zoo.variant_name(name, "int8"), f"{meta['description']}, int8 quantised", directory, calibration, say)
    agreement = meta_int8["quantization"]["top1_agreement_with_fp32"]
    say(f"int8 top-1 agrees with fp32 on {agreement:.0%} of the held-out photos")
    return [model] + [Path(shutil.copy2(f, directory / f.name)) for f in files[1:]], meta_int8


def _opset(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _from_onnx(source: Path, options: ImportOptions, asked: PreprocessingSpec, path: Path, say: Progress) -> Converted:
    import onnx

    say(f"reading {source}")
    model = onnx_import.load(source)
    found = onnx_import.inspect(model, options.layout, asked.size, options.output)
    pre, channel_order, asked_meta = asked.resolve(found.size)
    say(f"found input {found.layout.upper()} {found.dtype} {found.size}x{found.size}, {found.num_classes} classes ({found.output}); rewriting to the serving contract")
    rewritten, notes, check = onnx_import.to_contract(model, found, channel_order)
    onnx.save(rewritten, str(path))
    fixed = found.batch if onnx_import.is_fixed_batch(rewritten) else None
    return Converted(pre, asked_meta, "onnx", found.num_classes, found.layout, found.output, notes, check, fixed)


def _from_state_dict(source: Path, options: ImportOptions, given: PreprocessingSpec | None, path: Path, say: Progress) -> Converted:
    try:
        import torch

        from saikyo.models import builders, export
    except ImportError as exc:
        raise ImportRejected(f"importing a state dict needs torch: pip install 'saikyo[export]' ({exc})") from None
    from saikyo.models.errors import WeightsUnavailable

    arch = options.arch or ""
    if options.layout is not None or options.output is not None:
        raise ImportRejected("--layout and --output describe ONNX files; a state dict's network is known from --arch")
    say(f"reading the state dict {source}")
    try:
        state = builders.read_state_dict(source)
    except WeightsUnavailable as exc:
        raise ImportRejected(str(exc)) from None
    if arch.startswith(TIMM_PREFIX):
        import timm

        timm_name = arch[len(TIMM_PREFIX) :]
        if timm_name not in timm.list_models():
            raise ImportRejected(f"--arch {arch}: timm has no architecture {timm_name!r} (see timm.list_models())")
        kind = "timm"

        def build(classes: int) -> Any:
            return timm.create_model(timm_name, pretrained=False, num_classes=classes)

        cfg = build(1000).pretrained_cfg
        default = PreprocessingSpec(
            size=int(cfg["input_size"][1]),
            crop_pct=float(cfg.get("crop_pct", 0.875)),
            interpolation=str(cfg.get("interpolation", "bilinear")),
            mean=tuple(cfg["mean"]),  # type: ignore[arg-type]
            std=tuple(cfg["std"]),  # type: ignore[arg-type]
            source=f"timm pretrained_cfg of {timm_name}",
        )
        builder_name = f"timm.create_model({timm_name!r})"
    else:
        try:
            spec = zoo.get(arch)
        except KeyError:
            raise ImportRejected(f"--arch {arch!r} is neither a zoo model ({', '.join(zoo.ZOO)}) nor timm:NAME") from None
        kind = "torch"
        builder = builders.resolve_builder(spec.builder)

        def build(classes: int) -> Any:
            return builder(num_classes=classes)

        zp = spec.preprocessing
        default = PreprocessingSpec(size=zp.input_size, crop_pct=zp.crop_pct, interpolation=zp.interpolation, mean=zp.mean, std=zp.std, source=f"zoo {arch}")
        builder_name = spec.builder
    # The architecture's own preprocessing unless a file says otherwise; flags over either.
    asked = options.preprocessing.over(given or default)
    num_classes = _head_classes(build(1000), state, arch)
    say(f"building {arch} with a {num_classes}-class head")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build(num_classes)
    try:
        builders.load_state_dict(model, state)
    except WeightsUnavailable as exc:
        raise ImportRejected(f"the state dict does not fit --arch {arch}: {exc}") from None
    model.eval()
    pre, channel_order, asked_meta = asked.resolve(asked.size or default.size or 224)
    if channel_order != "rgb":
        raise ImportRejected("--channel-order bgr is for ONNX files; torch networks built here take RGB")
    say(f"exporting to ONNX (opset {options.opset})")
    if options.opset < export.MIN_OPSET:
        raise ImportRejected(f"opset {options.opset} is too old; use {export.MIN_OPSET} or newer")
    with torch.no_grad():
        export._torch_to_onnx(model, path, pre.input_size, options.opset)
    say("checking ONNX Runtime against torch")
    check = export._check_against_torch(model, path, pre.input_size, num_classes)
    return Converted(pre, asked_meta, kind, num_classes, "nchw", "logits", [], check, extra={"builder": builder_name, "arch": arch})


def _head_classes(model: Any, state: dict[str, Any], arch: str) -> int:
    """K of a fine-tuned head, from the state dict: the tensor where the 1000-class network has its last
    1000-row weight (fc.weight, classifier.1.weight, head.fc.weight ...)."""
    own = model.state_dict()
    heads = [k for k, v in own.items() if k.endswith("weight") and v.ndim >= 2 and v.shape[0] == 1000]
    if not heads:
        raise ImportRejected(f"cannot find the classifier head of {arch}")
    key = heads[-1]
    if key not in state:
        raise ImportRejected(f"the state dict has no {key!r}, the classifier head of {arch}; is it a state dict of {arch}?")
    return int(state[key].shape[0])
