"""Typed, validated pipeline configuration: one pydantic model per params block.

`params.yaml` is the single source of truth for `dvc repro`; a preset from `configs/` is merged
over it (nested dicts merge key by key). Validation errors name the field, the value and what is
allowed, e.g. ``train.lr: -1 is not > 0``.
"""

from __future__ import annotations

import copy
from fractions import Fraction
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PRESETS_DIR = PROJECT_ROOT / "configs"


class ConfigError(ValueError):
    """A configuration problem; the message names the field, the value and what is allowed."""


def _parse_fraction(value: Any) -> Any:
    """Accept eps-style values written as ``"4/255"`` as well as plain numbers."""
    if isinstance(value, str):
        try:
            return float(Fraction(value.strip()))
        except (ValueError, ZeroDivisionError):
            return value
    return value


Eps = Annotated[float, BeforeValidator(_parse_fraction), Field(ge=0, le=1)]


class Block(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PathsConfig(Block):
    data: str = "data"
    outputs: str = "outputs"
    metrics: str = "metrics"


class DataConfig(Block):
    """The embedded default data set and how it is split."""

    seed: int = 0
    image_size: int = Field(32, ge=8, le=512)
    per_class_style: int = Field(120, ge=4)
    base_classes: int = Field(12, ge=2)
    test_fraction: float = Field(0.3, gt=0, lt=1)
    max_prompt_train: int | None = Field(None, ge=1)
    max_test: int | None = Field(None, ge=1)


class BackboneConfig(Block):
    """Where the frozen model comes from: the embedded tiny CLIP, open_clip, or timm."""

    source: Literal["embedded", "open_clip", "timm"] = "embedded"
    name: str | None = None
    pretrained: str | None = None
    image_size: int | None = Field(None, ge=8)
    cache_dir: str | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _needs_name(self) -> BackboneConfig:
        if self.source in ("open_clip", "timm") and not self.name:
            raise ValueError(f"backbone.name is required when backbone.source is {self.source!r}")
        return self


class PretrainConfig(Block):
    """Contrastive pretraining of the embedded tiny CLIP (ignored for other backbones)."""

    steps: int = Field(1500, ge=1)
    batch_size: int = Field(128, ge=2)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup_steps: int = Field(100, ge=0)
    augment: bool = True


class PromptConfig(Block):
    """Which prompt family plugs into the frozen model, with its own arguments."""

    model_config = ConfigDict(extra="allow", frozen=True)

    kind: str = "padding"


class HeadConfig(Block):
    """The classifier head: CLIP zero-shot, class text features averaged over templates."""

    kind: Literal["zero_shot"] = "zero_shot"
    templates: list[str] = Field(default_factory=lambda: ["This is a photo of a {}"], min_length=1)

    @field_validator("templates")
    @classmethod
    def _has_slot(cls, v: list[str]) -> list[str]:
        bad = [t for t in v if "{}" not in t]
        if bad:
            raise ValueError(f"{bad} have no '{{}}' slot for the class name")
        return v


class TrainConfig(Block):
    """Supervised prompt tuning (Bahng et al. defaults, scaled to the embedded data)."""

    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(40.0, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(10, ge=0)
    grad_clip: float | None = Field(None, gt=0)


class AttackConfig(Block):
    """PGD settings of the evaluation; alpha defaults to 2.5 * eps / steps."""

    norm: Literal["Linf", "L2"] = "Linf"
    eps: list[Eps] = Field(default_factory=lambda: [1 / 255, 4 / 255], min_length=1)
    steps: int = Field(10, ge=1)
    alpha_factor: float = Field(2.5, gt=0)
    restarts: int = Field(1, ge=1)


class EvaluateConfig(Block):
    batch_size: int = Field(256, ge=1)
    attack: AttackConfig = AttackConfig()


class RuntimeConfig(Block):
    device: str = "auto"
    precision: Literal["fp32", "bf16"] = "fp32"
    threads: int | None = Field(None, ge=1)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v != "auto" and v.split(":")[0] not in ("cpu", "cuda", "mps"):
            raise ValueError(f"{v!r} is not one of auto, cpu, cuda, cuda:N, mps")
        return v


class TrackingConfig(Block):
    enabled: bool = True
    uri: str = "sqlite:///mlflow.db"
    artifacts: str = "mlartifacts"
    experiment: str = "vpt-robust"


class Params(Block):
    paths: PathsConfig = PathsConfig()
    data: DataConfig = DataConfig()
    backbone: BackboneConfig = BackboneConfig()
    pretrain: PretrainConfig = PretrainConfig()
    head: HeadConfig = HeadConfig()
    prompt: PromptConfig = PromptConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _splits_fit(self) -> Params:
        from vpt_robust.data.embedded import CLASS_NAMES

        if self.backbone.source == "embedded" and self.data.base_classes >= len(CLASS_NAMES):
            raise ValueError(
                f"data.base_classes: {self.data.base_classes} must be < {len(CLASS_NAMES)} "
                "(the embedded data's class count) so that held-out classes remain"
            )
        return self


_OPS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def _describe(err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err["loc"]) or "params"
    value = err.get("input")
    kind = err["type"]
    ctx = err.get("ctx") or {}
    if kind in _OPS:
        bound = next(iter(ctx.values()))
        return f"{loc}: {value!r} is not {_OPS[kind]} {bound}"
    if kind == "literal_error":
        return f"{loc}: {value!r} is not one of {ctx.get('expected')}"
    if kind == "extra_forbidden":
        return f"{loc}: unknown field (value {value!r}); check the spelling against params.yaml"
    if kind in ("value_error", "assertion_error"):
        msg = str(ctx.get("error", err["msg"]))
        return msg if msg.split(":")[0].count(".") else f"{loc}: {msg}"
    return f"{loc}: {value!r}: {err['msg']}"


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Merge ``override`` into a copy of ``base``; nested dicts merge, everything else replaces."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def validate(raw: dict[str, Any]) -> Params:
    """Validate a raw params dict; raise ConfigError listing every bad field."""
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe(e) for e in exc.errors(include_url=False)]
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of blocks, got {type(data).__name__}")
    return data


def preset_path(name: str) -> Path:
    """Path of a named preset in configs/, or a clear error listing those that exist."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    candidate = PRESETS_DIR / f"{name}.yaml"
    if not candidate.is_file():
        known = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
        raise ConfigError(f"preset {name!r} not found in {PRESETS_DIR}; known presets: {known}")
    return candidate


def load_params(
    params_file: str | Path = "params.yaml",
    preset: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> Params:
    """params.yaml, then a preset, then explicit overrides, merged and validated."""
    raw = _read_yaml(Path(params_file)) if Path(params_file).exists() or not preset else {}
    if preset:
        raw = deep_merge(raw, _read_yaml(preset_path(preset)))
    if overrides:
        raw = deep_merge(raw, overrides)
    return validate(raw)


def parse_override(text: str) -> dict[str, Any]:
    """Turn ``train.lr=0.1`` into ``{"train": {"lr": 0.1}}`` (the value is parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like block.field=value")
    key, value = text.split("=", 1)
    out: dict[str, Any] = yaml.safe_load(value) if value else None
    for part in reversed(key.strip().split(".")):
        out = {part: out}
    return out
