"""A version's own serving settings: the optional `serving` object of its meta.json (Triton's
config.pbtxt idea). Each key it sets overrides the server's setting of the same meaning for this model
only; the keys it leaves out keep the server's value.

The block comes from a file anyone may have written, so it is checked as hostile input: known keys
only, exact types, bounded ranges. `saikyo models config` checks it before writing anything, and the
server checks it again at load, where a bad block fails that model with the reason.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from saikyo.models.errors import RepositoryError

SERVING_KEY = "serving"

# Block key -> the Settings field it overrides (the server's default for it).
SETTING_OF = {
    "max_batch_size": "max_batch_size",
    "max_delay_ms": "max_delay_ms",
    "backend": "backend",
    "precision": "precision",
    "threads": "intra_op_threads",
    "streams": "openvino_streams",
    "in_flight": "torch_in_flight",
}


class ServingBlock(BaseModel):
    """What a `serving` object may hold; None = not set here (the server's value applies)."""

    # Strict: "16" is not 16 and true is not 1; unknown keys are refused, not ignored, so a typo shows.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    # Upper bounds keep one file from asking a server for unbounded buffers, threads or waits.
    max_batch_size: Optional[int] = Field(None, ge=1, le=1024, description="largest batch one forward pass runs")
    max_delay_ms: Optional[float] = Field(None, ge=0, le=1000, allow_inf_nan=False, description="how long an idle runner waits for more images")
    backend: Optional[Literal["auto", "onnxruntime", "openvino", "torch"]] = Field(None, description="the runner")
    precision: Optional[Literal["auto", "fp32", "bf16"]] = Field(None, description="openvino: inference precision")
    threads: Optional[int] = Field(None, ge=0, le=256, description="inference threads; 0 = one per core")
    streams: Optional[int] = Field(None, ge=1, le=64, description="openvino: batches in flight at once")
    in_flight: Optional[int] = Field(None, ge=1, le=16, description="torch: batches in flight on the device")

    def overrides(self) -> dict[str, Any]:
        """The keys this block sets."""
        return self.model_dump(exclude_none=True)


class ServingConfigError(RepositoryError):
    """A `serving` block that cannot be used; the message names the key, what it holds and what is allowed."""


def parse_serving(raw: Any, where: str = "serving") -> ServingBlock:
    """`raw` (a meta.json's `serving` value, or a dict built from flags) checked; ServingConfigError
    naming every problem otherwise."""
    if raw is None:
        return ServingBlock()
    if not isinstance(raw, dict):
        raise ServingConfigError(f"{where} must be a JSON object of settings, not {type(raw).__name__}")
    try:
        return ServingBlock.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        # A hostile file may hold thousands of bad keys: the first few say enough.
        problems = "; ".join(_describe(e) for e in errors[:_SHOWN])
        if len(errors) > _SHOWN:
            problems += f"; and {len(errors) - _SHOWN} more"
        if any(e["type"] == "extra_forbidden" for e in errors):
            problems += f" (known keys: {', '.join(SETTING_OF)})"
        raise ServingConfigError(f"{where}: {problems}") from None


def serving_of(meta: dict[str, Any], where: str = "serving") -> ServingBlock:
    """The checked `serving` block of a version's meta.json (empty when it has none)."""
    return parse_serving(meta.get(SERVING_KEY), where)


_SHOWN = 5


def _describe(error: Any) -> str:
    key = ".".join(str(p) for p in error["loc"])[:40] or "serving"
    if error["type"] == "extra_forbidden":
        return f"unknown key {key!r}"
    value = repr(error.get("input"))
    return f"{key}: {error['msg'].lower()}, not {value[:40]}"
