"""Typed, validated pipeline configuration: one pydantic model per params block.

`params.yaml` is the single source of truth for `dvc repro`; a preset from `configs/` is merged
over it (nested dicts merge key by key; a list, such as the ``prompts`` families, is replaced
whole). Validation errors name the field, the value and what is allowed, e.g.
``train.lr: -1 is not > 0``.

Validating prompt families imports ``vpt_robust.prompts`` (each family's argument model lives in
the family's own file, beside its torch module), so ``validate`` / ``load_params`` import torch;
importing this module does not.
"""

from __future__ import annotations

import copy
import re
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
    ValidationInfo,
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
    """The embedded default data set and how it is split. ``target_style``: the held-out style
    prompts train and are tested on (``night``: the frozen tiny CLIP is clearly above chance
    there; ``neon``: close to chance, a harder domain shift)."""

    seed: int = 0
    target_style: Literal["night", "neon"] = "night"
    image_size: int = Field(32, ge=8, le=512)
    per_class_style: int = Field(120, ge=4)
    base_classes: int = Field(12, ge=2)
    test_fraction: float = Field(0.3, gt=0, lt=1)
    max_prompt_train: int | None = Field(None, ge=1)
    max_test: int | None = Field(None, ge=1)


class BackboneConfig(Block):
    """Where the frozen model comes from: the embedded tiny CLIP, open_clip, or timm."""

    source: Literal["embedded", "open_clip", "timm", "robustbench"] = "embedded"
    name: str | None = None
    pretrained: str | None = None
    image_size: int | None = Field(None, ge=8)
    cache_dir: str | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _needs_name(self) -> BackboneConfig:
        if self.source != "embedded" and not self.name:
            raise ValueError(f"backbone.name is required when backbone.source is {self.source!r}")
        return self


class PretrainConfig(Block):
    """Contrastive pretraining of the embedded tiny CLIP (ignored for other backbones), after
    ``supervised_steps`` steps of a supervised warm start of its image tower on the class labels
    (``methods/pretrain.py``)."""

    steps: int = Field(300, ge=1)
    batch_size: int = Field(128, ge=2)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup_steps: int = Field(50, ge=0)
    augment: bool = False
    supervised_steps: int = Field(300, ge=0)
    architecture: dict[str, Any] = Field(default_factory=dict)

    @field_validator("architecture")
    @classmethod
    def _known_architecture(cls, value: dict[str, Any]) -> dict[str, Any]:
        """``TinyClipSpec`` fields that change the embedded model (``{}``: the default one)."""
        if "image_size" in value:
            raise ValueError("pretrain.architecture: image_size is set by data.image_size")
        if value:
            from vpt_robust.models.tiny_clip import TinyClipSpec

            TinyClipSpec.from_dict(value)
        return value


_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class PromptConfig(Block):
    """One prompt family to learn: which family plugs into the frozen model, with its arguments.

    ``kind`` is a registered family (``padding``, ``evp``, ``vpt``, ``coop``, ...), ``none`` (no
    prompt: with a linear head this is the linear probe), or several families joined by ``+``
    (``padding+vpt``: a pixel and a token prompt together). Every other field is an argument of
    the family (``{kind: vpt, length: 10, depth: deep}``); for a ``+`` stack each part's arguments
    sit under the part's name (``{kind: padding+vpt, padding: {pad_size: 4}, vpt: {length: 5}}``).
    ``name`` names the output folder and report row (default: derived from kind and head),
    ``head`` overrides ``head.kind`` for this family and ``train`` overrides fields of the
    ``train`` block (e.g. its own ``lr`` and ``optimizer``).
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    kind: str = "padding"
    name: str | None = None
    head: Literal["zero_shot", "linear"] | None = None
    train: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> PromptConfig:
        from vpt_robust.prompts import PROMPTS, validate_prompt_args

        kinds = self.part_kinds
        if self.kind != "none":
            unknown = [k for k in kinds if k not in PROMPTS]
            if unknown or len(set(kinds)) != len(kinds):
                raise ValueError(
                    f"kind: {self.kind!r}: each part must be one of {sorted(PROMPTS)} or 'none', "
                    "without repeats"
                )
            for kind, args in self.parts():
                validate_prompt_args(kind, args)
        elif self.args:
            raise ValueError(f"kind 'none' takes no arguments, got {sorted(self.args)}")
        if self.name is not None and not _SAFE_NAME.match(self.name):
            raise ValueError(f"name: {self.name!r} must be letters, digits, '_', '.', '-'")
        if self.train:
            bad = sorted(set(self.train) - (set(TrainConfig.model_fields) - {"seeds"}))
            if bad:
                raise ValueError(f"train: {bad} are not per-family train fields")
            try:
                TrainConfig.model_validate(self.train)
            except ValidationError as exc:
                first = exc.errors(include_url=False)[0]
                raise ValueError(f"train: {_describe(first)}") from None
        return self

    @property
    def args(self) -> dict[str, Any]:
        """The family arguments (every field that is not kind/name/head/train)."""
        return dict(self.model_extra or {})

    @property
    def part_kinds(self) -> list[str]:
        return [] if self.kind == "none" else [k.strip() for k in self.kind.split("+")]

    def parts(self) -> list[tuple[str, dict[str, Any]]]:
        """``(kind, args)`` of every prompt in this family (empty for ``none``)."""
        kinds, args = self.part_kinds, self.args
        if len(kinds) <= 1:
            return [(k, args) for k in kinds]
        stray = sorted(set(args) - set(kinds))
        if stray:
            raise ValueError(
                f"kind {self.kind!r}: arguments {stray} must sit under a part name {kinds}"
            )
        for k in kinds:
            if not isinstance(args.get(k, {}), dict):
                raise ValueError(f"{k}: the arguments of a stacked part must be a mapping")
        return [(k, dict(args.get(k, {}))) for k in kinds]

    def head_kind(self, default: str) -> str:
        return self.head or default

    def family_name(self, default_head: str = "zero_shot") -> str:
        """Folder / report name: ``name`` if given, else the kind (``linear_probe`` for a bare
        linear head, ``<kind>_linear`` for a prompt with a linear head)."""
        if self.name:
            return self.name
        kind = self.kind.replace("+", "_")
        if self.head_kind(default_head) == "linear":
            return "linear_probe" if self.kind == "none" else f"{kind}_linear"
        return kind

    def train_config(self, base: TrainConfig) -> TrainConfig:
        """The ``train`` block with this family's overrides applied (validated)."""
        return TrainConfig.model_validate({**base.model_dump(), **self.train})


class HeadConfig(Block):
    """The classifier head: CLIP's zero-shot head (class text features averaged over
    templates; CoOp replaces the templates by its learned context) or a linear head."""

    kind: Literal["zero_shot", "linear"] = "zero_shot"
    templates: list[str] = Field(default_factory=lambda: ["This is a photo of a {}"], min_length=1)

    @field_validator("templates")
    @classmethod
    def _has_slot(cls, v: list[str]) -> list[str]:
        bad = [t for t in v if "{}" not in t]
        if bad:
            raise ValueError(f"{bad} have no '{{}}' slot for the class name")
        return v


class TrainConfig(Block):
    """Supervised prompt tuning (Bahng et al. defaults, scaled to the embedded data).

    ``optimizer``: ``sgd`` (with ``momentum``), ``adamw``, or ``normalized_sgd`` (EVP's update
    ``p -= lr * g / ||g||_2``, the norm taken over all learned tensors of a parameter group
    together; no momentum). ``schedule``: after a linear warm-up over ``warmup_steps``, the
    learning rate decays to 0 on a cosine (``cosine``) or stays at ``lr`` (``constant``, L2P).
    ``param_groups`` maps a parameter-name prefix of the classifier (``head``, ``token_prompt``,
    ``pixel_prompt``, ``head.context``, ...; matched on whole dotted components, the longest
    prefix wins) to a learning-rate scale: those parameters train at ``lr * scale``, the others
    at ``lr``. A prefix that matches no trainable parameter is an error.
    With ``checkpoint`` a resumable checkpoint is written after every epoch; with ``resume`` an
    interrupted run whose checkpoint matches the current run exactly continues from it (and ends
    with the result an uninterrupted run would have given).
    """

    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1)
    optimizer: Literal["sgd", "adamw", "normalized_sgd"] = "sgd"
    lr: float = Field(40.0, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(10, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    param_groups: dict[str, Annotated[float, Field(gt=0, allow_inf_nan=False)]] = Field(
        default_factory=dict
    )
    grad_clip: float | None = Field(None, gt=0)
    checkpoint: bool = True
    resume: bool = True

    @field_validator("param_groups")
    @classmethod
    def _prefixes(cls, v: dict[str, float]) -> dict[str, float]:
        bad = [k for k in v if not k or any(not part for part in k.split("."))]
        if bad:
            raise ValueError(
                f"prefixes {bad} are not dotted parameter names (e.g. 'head', 'token_prompt')"
            )
        return v


class AttackConfig(Block):
    """PGD settings of the evaluation; alpha defaults to 2.5 * eps / steps."""

    norm: Literal["Linf", "L2"] = "Linf"
    eps: list[Eps] = Field(default_factory=lambda: [1 / 255, 4 / 255], min_length=1)
    steps: int = Field(10, ge=1)
    alpha_factor: float = Field(2.5, gt=0)
    restarts: int = Field(1, ge=1)


class AutoAttackConfig(Block):
    """AutoAttack on a fixed, logged subset of the test samples (it costs 100-200x a PGD-10)."""

    enabled: bool = True
    version: Literal["standard", "rand"] = "standard"
    eps: list[Eps] = Field(default_factory=lambda: [1 / 255], min_length=1)
    n_samples: int = Field(100, ge=1)
    subset_seed: int = 0
    splits: list[Literal["base", "novel"]] = Field(default_factory=lambda: ["base"], min_length=1)
    models: list[str] | None = Field(None, min_length=1)  # null = every model evaluated
    fast: bool = False


class EvaluateConfig(Block):
    batch_size: int = Field(256, ge=1)
    attack: AttackConfig = AttackConfig()
    autoattack: AutoAttackConfig = AutoAttackConfig()
    save_flags: bool = True


class StreamConfig(Block):
    """The corruption stream of the stream_eval stage (CoTTA protocol by default)."""

    protocol: Literal[
        "continual", "gradual", "mixed", "reset_each_shift", "random_orders", "correlated"
    ] = "continual"
    severity: int = Field(5, ge=1, le=5)
    corruptions: list[str] | None = None
    split: Literal["test_base", "test_novel"] = "test_base"
    n_per_segment: int | None = Field(None, ge=1)
    batch_size: int = Field(128, ge=1)
    seed: int = 0
    shuffle: bool = True
    n_orders: int = Field(3, ge=1)
    dirichlet: float = Field(0.1, gt=0, allow_inf_nan=False)

    @field_validator("corruptions")
    @classmethod
    def _known(cls, v: list[str] | None) -> list[str] | None:
        from vpt_robust.corruptions import CORRUPTIONS

        bad = [c for c in v or [] if c not in CORRUPTIONS]
        if bad:
            raise ValueError(f"{bad} are not among {list(CORRUPTIONS)}")
        return v


STREAM_PROTOCOLS = (
    "continual", "gradual", "mixed", "reset_each_shift", "random_orders", "correlated"
)  # fmt: skip


class AdaptMethodConfig(Block):
    """One test-time adaptation method of the stream_adapt stage: ``method`` is a registered
    adapter (``vpt_robust.methods.tta.ADAPTERS``: source, norm, tent, cotta, vdp, vdp_dap_only,
    vdp_dsp_only, vdp_no_homeostasis, tpt); every other field is an argument of the method,
    validated by the method's own argument model here, so a bad argument stops before anything
    runs. ``name`` names its results (default: the method)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    method: str
    name: str | None = None

    @model_validator(mode="after")
    def _check(self) -> AdaptMethodConfig:
        from vpt_robust.methods.tta import validate_adapter_args

        validate_adapter_args(self.method, self.args)
        if self.name is not None and not _SAFE_NAME.match(self.name):
            raise ValueError(f"name: {self.name!r} must be letters, digits, '_', '.', '-'")
        return self

    @property
    def args(self) -> dict[str, Any]:
        """The method's arguments (every field but method/name)."""
        return dict(self.model_extra or {})

    @property
    def label(self) -> str:
        return self.name or self.method


class AdaptAttackConfig(Block):
    """The adversarial stream of the stream_adapt stage: PGD (``norm``, ``eps``, ``steps``,
    step ``alpha``, default 2.5 eps / steps) on every batch of the attacked ``segments`` (indices
    into the first protocol's segments; null: all) against each method's CURRENT adapted state,
    before that batch's adaptation step; ``methods``: the result names attacked (null: all)."""

    enabled: bool = False
    norm: Literal["Linf", "L2"] = "Linf"
    eps: Eps = 1 / 255
    steps: int = Field(5, ge=1)
    alpha: Eps | None = None
    segments: list[Annotated[int, Field(ge=0)]] | None = Field(
        default_factory=lambda: [0, 1, 2, 3, 4]
    )
    methods: list[str] | None = None
    seed: int = 0


class AdaptConfig(Block):
    """The stream_adapt stage: every method in ``methods`` adapts online on the SAME corruption
    streams, one per (protocol, seed); ``protocols[0]`` is the default protocol of
    ``results``. The stream: ``severity``, ``corruptions`` (null: the standard 15),
    ``n_per_segment`` samples per segment (null: the whole split), ``batch_size``, ``shuffle``,
    ``n_orders`` (random_orders), ``dirichlet`` (correlated) as in the ``stream`` block. Its
    images: ``data: embedded``, the ``split`` of outputs/prepare/splits.npz (``pretrain_test``:
    the pretraining styles, where the source model is good), or ``data: cifar_c_files``, the
    distributed CIFAR-10-C / CIFAR-100-C ``.npy`` files under ``files_root`` (a CLIP backbone
    then needs ``class_names``). Per seed the stream's sample order and corruption noise and
    every method's ``seed`` argument (unless set) follow the seed."""

    methods: list[AdaptMethodConfig] = Field(
        default_factory=lambda: [AdaptMethodConfig(method="source")], min_length=1
    )
    protocols: list[Literal[STREAM_PROTOCOLS]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: ["continual"], min_length=1
    )
    severity: int = Field(3, ge=1, le=5)
    corruptions: list[str] | None = None
    n_per_segment: int | None = Field(None, ge=1)
    batch_size: int = Field(64, ge=1)
    shuffle: bool = True
    n_orders: int = Field(3, ge=1)
    dirichlet: float = Field(0.1, gt=0, allow_inf_nan=False)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    data: Literal["embedded", "cifar_c_files"] = "embedded"
    split: Literal["pretrain_test", "test_base", "test_novel"] = "pretrain_test"
    files_root: str | None = None
    class_names: list[str] | None = None
    attack: AdaptAttackConfig = AdaptAttackConfig()

    _known = field_validator("corruptions")(StreamConfig._known.__func__)  # type: ignore[attr-defined]

    @model_validator(mode="after")
    def _check(self) -> AdaptConfig:
        names = [m.label for m in self.methods]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"adapt.methods: names {dupes} repeat; give each entry its own `name`")
        if len(set(self.protocols)) != len(self.protocols):
            raise ValueError(f"adapt.protocols: {self.protocols} repeat a protocol")
        if self.data == "cifar_c_files" and not self.files_root:
            raise ValueError("adapt.files_root is required when adapt.data is 'cifar_c_files'")
        a = self.attack
        unknown = sorted(set(a.methods or []) - set(names))
        if unknown:
            raise ValueError(f"adapt.attack.methods: {unknown} are not among adapt.methods {names}")
        if a.enabled and a.segments is not None:
            n = self.n_segments(self.protocols[0])
            bad = [s for s in a.segments if s >= n]
            if bad:
                raise ValueError(
                    f"adapt.attack.segments: {bad} are past the {n} segments of the "
                    f"{self.protocols[0]!r} stream (indices 0..{n - 1})"
                )
        return self

    def n_segments(self, protocol: str) -> int:
        """How many segments a stream of ``protocol`` has (what attack segments index)."""
        from vpt_robust.corruptions import CORRUPTIONS
        from vpt_robust.corruptions.streams import GRADUAL_SEVERITIES

        n = len(self.corruptions or CORRUPTIONS)
        if protocol == "mixed":
            return 1
        if protocol == "gradual":
            return n * len(GRADUAL_SEVERITIES)
        return n * self.n_orders if protocol == "random_orders" else n


class ContinualConfig(Block):
    """The continual stage (L2P, ``methods/continual.py``): a task sequence of the embedded
    data, the methods run over it, their per-task training and the per-cell PGD attack.

    ``sequence``: ``class_incremental`` (the pretraining styles' classes split into ``tasks``
    equal tasks) or ``domain_incremental`` (one task per style, every class). Images come from
    the pretraining styles outside ``pretrain_train`` (never seen by the backbone), drawn per
    class with ``data_seed``. Training per task: AdamW (weight decay 0), constant ``lr``,
    ``epochs`` per task, optimiser reset per task. The pool: ``pool_size`` prompts of
    ``prompt_length`` tokens, ``top_n`` selected, ``pull_weight`` on the key-pull loss.
    ``style``: the class-incremental images' style: ``pretraining`` (the above) or a held-out
    style (a domain shift, where prompts have something to learn).
    ``sequential_length`` null: VPT tokens matching the pool's learned values. ``head``: the
    classifier of l2p, sequential and joint: ``linear`` (L2P's ``prompt`` head: the prompt
    tokens' mean output -> a linear layer) or ``zero_shot`` (the CLIP text head over the
    classes, on the pooled feature; only the prompts learn).

    ``data``: ``embedded`` (the above) or local files in torchvision's on-disk formats under
    ``root`` (``vpt_robust/data/torchvision_sets.py``; never downloaded): ``split_cifar100``
    (``tasks`` equal tasks of CIFAR-100, 10 x 10 in its preset) or ``five_datasets`` (CIFAR-10,
    MNIST, Fashion-MNIST, SVHN, notMNIST: 5 tasks of 10 classes), class-incremental, each
    data set's train split for training and its test split for evaluation, at most
    ``n_train_per_class`` / ``n_test_per_class`` images per class (null: all), resized to
    ``image_size``.
    """

    data: Literal["embedded", "split_cifar100", "five_datasets"] = "embedded"
    root: str | None = None
    image_size: int = Field(32, ge=8, le=512)
    sequence: Literal["class_incremental", "domain_incremental"] = "class_incremental"
    style: Literal["pretraining", "night", "neon"] = "pretraining"
    tasks: int = Field(5, ge=2)
    n_train_per_class: int | None = Field(30, ge=1)
    n_test_per_class: int | None = Field(20, ge=1)
    data_seed: int = 0
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    methods: list[Literal["l2p", "sequential", "joint", "zero_shot"]] = Field(
        default_factory=lambda: ["l2p", "sequential", "joint", "zero_shot"], min_length=1
    )
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(0.01, gt=0)
    grad_clip: float | None = Field(1.0, gt=0)
    pool_size: int = Field(10, ge=1)
    prompt_length: int = Field(2, ge=1)
    top_n: int = Field(2, ge=1)
    batchwise: bool = False
    task_mask: bool = False
    pull_weight: float = Field(0.1, ge=0)
    head: Literal["linear", "zero_shot"] = "linear"
    sequential_length: int | None = Field(None, ge=1)
    buffer_per_class: int = Field(0, ge=0)
    eps: Eps = 1 / 255
    attack_steps: int = Field(5, ge=0)
    eval_batch_size: int = Field(256, ge=1)

    @model_validator(mode="after")
    def _pool_fits(self) -> ContinualConfig:
        if self.top_n > self.pool_size:
            raise ValueError(f"continual.top_n: {self.top_n} must be <= pool_size {self.pool_size}")
        if self.data != "embedded" and not self.root:
            raise ValueError(
                f"continual.root: continual.data {self.data!r} reads local files and needs "
                "root, the directory holding them in torchvision's layout; got null"
            )
        for name in ("n_train_per_class", "n_test_per_class"):
            if self.data == "embedded" and getattr(self, name) is None:
                raise ValueError(
                    f"continual.{name}: null (every image) needs a real-data source; the "
                    "embedded data's draw takes a number"
                )
        if self.data != "embedded" and self.sequence != "class_incremental":
            raise ValueError(
                f"continual.sequence: {self.sequence!r} needs continual.data 'embedded' (its "
                f"styles are the domains); {self.data!r} is class-incremental"
            )
        if self.data == "five_datasets" and self.tasks != 5:
            raise ValueError(
                f"continual.tasks: five_datasets has 5 tasks (one per data set), got {self.tasks}"
            )
        return self


class DatasetSource(Block):
    """One labelled image set read from local files (``vpt_robust/data/torchvision_sets.py``,
    never downloaded): ``dataset`` in torchvision's on-disk format under ``root``, its ``split``,
    at most ``per_class`` images per class (a draw seeded by ``seed``; null: all).
    ``class_names``: for ``imagefolder`` only, a text file naming the class folders in order."""

    dataset: Literal[
        "imagefolder", "cifar10", "cifar100", "mnist", "fashion_mnist", "svhn", "notmnist"
    ]
    root: str
    split: Literal["train", "test"] = "test"
    per_class: int | None = Field(None, ge=1)
    seed: int = 0
    class_names: str | None = None

    @model_validator(mode="after")
    def _names_for_folders(self) -> DatasetSource:
        if self.class_names is not None and self.dataset != "imagefolder":
            raise ValueError(f"class_names is for dataset imagefolder only, not {self.dataset!r}")
        return self


class TeCoAData(Block):
    """Real data for the tecoa stage: prompts train on ``train`` (its classes are the base
    classes) and are evaluated zero-shot on every set of ``eval`` (name -> set; each with its own
    classes), all resized to ``image_size`` (the backbone's input size)."""

    train: DatasetSource
    eval: dict[str, DatasetSource] = Field(min_length=1)
    image_size: int = Field(224, ge=8, le=1024)


class TeCoAConfig(Block):
    """The tecoa stage (``methods/tecoa.py``): TeCoA on the embedded default's base classes in
    the PRETRAINING styles, evaluated zero-shot on the novel classes, on the held-out styles and
    on the training classes (``stages/tecoa.py``), against the zero-shot model, clean prompt
    tuning, adversarial tuning without text and TeCoA fine-tuning of the image tower.

    ``variants``: the TeCoA prompt families (token, padding, both), as ``prompts`` entries with
    their own ``train`` overrides; ``train`` overrides the ``train`` block for every method.
    Train attack: L-inf PGD ``train_eps`` / ``train_steps`` / ``train_alpha``, random start.
    Evaluation: PGD-``eval_steps`` at every ``eval_eps`` (step ``alpha_factor * eps / steps``)
    on ``n_test`` images per split, AutoAttack at ``autoattack_eps`` on a fixed subset of
    ``autoattack_samples`` (seeded by ``autoattack_seed``), on the first seed, on the
    ``autoattack_splits``, for the ``autoattack_methods`` (null: all). ``finetune: true``
    adds TeCoA fine-tuning of the whole image tower (text frozen; ``finetune_train`` overrides),
    the only method whose backbone weights train; its saved file records ``finetune: true``.
    """

    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    n_train: int | None = Field(720, ge=1)
    n_test: int | None = Field(200, ge=1)
    data_seed: int = 0
    train: dict[str, Any] = Field(default_factory=dict)
    train_eps: Eps = 1 / 255
    train_steps: int = Field(2, ge=1)
    train_alpha: Eps = 1 / 255
    random_start: bool = True
    eval_eps: list[Eps] = Field(default_factory=lambda: [1 / 255, 4 / 255], min_length=1)
    eval_steps: int = Field(100, ge=1)
    alpha_factor: float = Field(2.5, gt=0)
    autoattack: bool = True
    autoattack_version: Literal["standard", "rand"] = "standard"
    autoattack_eps: list[Eps] = Field(default_factory=lambda: [1 / 255])
    autoattack_samples: int = Field(100, ge=1)
    autoattack_seed: int = 0
    autoattack_splits: list[str] = Field(
        default_factory=lambda: ["novel", "heldout_styles", "base"]
    )
    autoattack_methods: list[str] | None = Field(None, min_length=1)  # null = every method
    data: TeCoAData | None = None
    variants: list[PromptConfig] = Field(
        default_factory=lambda: [PromptConfig(kind="vpt", name="vpt", length=32)], min_length=1
    )
    clean_prompt: bool = True
    no_text: bool = True
    finetune: bool = True
    finetune_train: dict[str, Any] = Field(default_factory=dict)

    @field_validator("train", "finetune_train")
    @classmethod
    def _train_overrides(cls, v: dict[str, Any]) -> dict[str, Any]:
        bad = sorted(set(v) - (set(TrainConfig.model_fields) - {"seeds"}))
        if bad:
            raise ValueError(f"{bad} are not train fields")
        try:
            TrainConfig.model_validate(v)
        except ValidationError as exc:
            raise ValueError(_describe(exc.errors(include_url=False)[0])) from None
        return v

    @field_validator("variants")
    @classmethod
    def _variants(cls, v: list[PromptConfig]) -> list[PromptConfig]:
        names = [p.family_name("zero_shot") for p in v]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"variant names {dupes} repeat; give each its own `name`")
        bad = [n for n, p in zip(names, v, strict=True) if p.kind == "none" or p.head == "linear"]
        if bad:
            raise ValueError(f"{bad}: a TeCoA variant is a pixel/token prompt with the text head")
        return v

    @model_validator(mode="after")
    def _autoattack_splits_exist(self) -> TeCoAConfig:
        known = list(self.data.eval) if self.data else ["novel", "heldout_styles", "base"]
        bad = [s for s in self.autoattack_splits if s not in known]
        if bad:
            raise ValueError(f"tecoa.autoattack_splits: {bad} are not evaluation splits {known}")
        if self.autoattack_methods is not None:
            names = self.method_names()
            bad = [m for m in self.autoattack_methods if m not in names]
            if bad:
                raise ValueError(f"tecoa.autoattack_methods: {bad} are not methods {names}")
        return self

    def method_names(self) -> list[str]:
        """The table's rows in order: zero-shot, the first variant's clean and no-text
        baselines, each TeCoA variant, TeCoA fine-tuning."""
        v0 = self.variants[0].family_name("zero_shot")
        return [
            "zero_shot",
            *([f"clean_{v0}"] if self.clean_prompt else []),
            *([f"no_text_{v0}"] if self.no_text else []),
            *(f"tecoa_{v.family_name('zero_shot')}" for v in self.variants),
            *(["tecoa_finetune"] if self.finetune else []),
        ]


class StreamsAttackConfig(Block):
    """PGD (L-inf ``eps``, ``steps``, step 2.5 eps / steps) on a fixed subset of ``n_samples``
    images of each new stream (drawn with ``seed``), against the adapted and the source model."""

    eps: Eps = 1 / 255
    steps: int = Field(5, ge=1)
    n_samples: int = Field(16, ge=1)
    seed: int = 0


def _default_stream_method() -> AdaptMethodConfig:
    return AdaptMethodConfig(method="vdp", n_augmentations=2, ema=0.9)


class StreamsConfig(Block):
    """New domain streams (``vpt_robust/streams``, ``flows/stream.py``): folders of images
    dropped into ``inbox`` are validated, hashed the way DVC hashes a directory, adapted with
    ``method`` (an adapter of ``vpt_robust.methods.tta``) from the latest adapted state and kept
    as versions under ``store`` (null: ``<paths.outputs>/streams``). The source model: the
    saved prompt ``prompt`` (null: ``<paths.outputs>/prompts/<family>/seed_0`` when it exists,
    else the zero-shot classifier) on the configured backbone, over ``class_names`` (null: the
    prompt's, else the embedded data's). The stream: ``batch_size`` images a batch, in a seeded
    random order (``shuffle``, ``seed``), a checkpoint every ``checkpoint_every`` batches. The
    watcher polls every ``poll_seconds`` and takes a folder once it was unchanged for
    ``settle_seconds``."""

    inbox: str = "inbox"
    store: str | None = None
    method: AdaptMethodConfig = Field(default_factory=_default_stream_method)
    prompt: str | None = None
    family: str = "padding"
    class_names: list[str] | None = Field(None, min_length=2)
    batch_size: int = Field(8, ge=1)
    checkpoint_every: int = Field(2, ge=1)
    shuffle: bool = True
    seed: int = 0
    min_image_size: int = Field(8, ge=1)
    max_images: int = Field(10_000, ge=1)
    attack: StreamsAttackConfig = StreamsAttackConfig()
    poll_seconds: float = Field(2.0, gt=0)
    settle_seconds: float = Field(2.0, ge=0)


class GridConfig(Block):
    """The evaluation grid of ``flows/grid.py`` (``vpt_robust/grid.py``): which cells, and the
    Dask cluster that runs them. ``models`` null: zero-shot + every family; ``seeds`` null:
    ``train.seeds``; ``corruptions`` null: the ``stream`` block's (all 15 when that is null),
    [] for none. ``address``: a running Dask scheduler (``tcp://host:8786``); null starts a
    cluster here, ``cluster: local`` (distributed.LocalCluster, ``n_workers`` processes) or
    ``cuda`` (dask_cuda.LocalCUDACluster, one worker per visible GPU)."""

    models: list[str] | None = None
    splits: list[Literal["base", "novel"]] = Field(default_factory=lambda: ["base"], min_length=1)
    seeds: list[int] | None = None
    attacks: bool = True
    corruptions: list[str] | None = None
    severities: list[int] = Field(default_factory=lambda: [3, 5], min_length=1)
    cluster: Literal["local", "cuda"] = "local"
    address: str | None = None
    n_workers: int = Field(2, ge=1)
    threads_per_worker: int = Field(1, ge=1)

    @field_validator("corruptions")
    @classmethod
    def _known(cls, v: list[str] | None) -> list[str] | None:
        from vpt_robust.corruptions import CORRUPTIONS

        bad = [c for c in v or [] if c not in CORRUPTIONS]
        if bad:
            raise ValueError(f"{bad} are not among {list(CORRUPTIONS)}")
        return v

    @field_validator("severities")
    @classmethod
    def _severities(cls, v: list[int]) -> list[int]:
        bad = [s for s in v if not 1 <= s <= 5]
        if bad:
            raise ValueError(f"{bad} are not severities 1..5")
        return v


class RuntimeConfig(Block):
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
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
    prompts: list[PromptConfig] = Field(default_factory=lambda: [PromptConfig()])
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    stream: StreamConfig = StreamConfig()
    adapt: AdaptConfig = Field(default_factory=AdaptConfig)
    continual: ContinualConfig = Field(default_factory=ContinualConfig)
    tecoa: TeCoAConfig = Field(default_factory=TeCoAConfig)
    streams: StreamsConfig = Field(default_factory=StreamsConfig)
    grid: GridConfig = Field(default_factory=GridConfig)
    runtime: RuntimeConfig = RuntimeConfig()
    tracking: TrackingConfig = TrackingConfig()

    @field_validator("prompts")
    @classmethod
    def _unique_families(cls, v: list[PromptConfig], info: ValidationInfo) -> list[PromptConfig]:
        if not v:
            raise ValueError(
                "[] lists no prompt family; give at least one, such as [{kind: padding}] (the "
                "zero-shot model is always evaluated as the baseline)"
            )
        head = info.data["head"].kind if "head" in info.data else "zero_shot"
        idle = [i for i, p in enumerate(v) if p.kind == "none" and p.head_kind(head) != "linear"]
        if idle:
            raise ValueError(
                f"entries {idle} have kind 'none' and the zero-shot head: nothing to learn (the "
                "zero-shot model is always evaluated as the baseline)"
            )
        names = [p.family_name(head) for p in v]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"family names {dupes} repeat; give each entry its own `name`")
        return v

    @model_validator(mode="after")
    def _splits_fit(self) -> Params:
        from vpt_robust.data.embedded import CLASS_NAMES

        if self.backbone.source == "embedded" and self.data.base_classes >= len(CLASS_NAMES):
            raise ValueError(
                f"data.base_classes: {self.data.base_classes} must be < {len(CLASS_NAMES)} "
                "(the embedded data's class count) so that held-out classes remain"
            )
        chosen = self.evaluate.autoattack.models
        if chosen is not None:
            known = ["zero_shot", *(p.family_name(self.head.kind) for p in self.prompts)]
            bad = [m for m in chosen if m not in known]
            if bad:
                raise ValueError(
                    f"evaluate.autoattack.models: {bad} are not evaluated models {known}"
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


def _single_prompt_error(source: str, block: Any, prompts_from: list[str]) -> ConfigError:
    """The error for a ``prompt:`` block: the families are the ``prompts`` list, and a lone
    ``prompt`` next to it would be silently ignored (or silently win), so neither is allowed."""
    where = ""
    if prompts_from:
        setters = ", ".join("it" if s == source else s for s in prompts_from)
        where = f" ({setters} {'sets' if len(prompts_from) == 1 else 'set'} `prompts`)"
    example = "[{kind: padding, pad_size: 30}]"
    if isinstance(block, dict) and block:
        example = yaml.safe_dump([block], default_flow_style=True, sort_keys=False).strip()
    return ConfigError(
        f"{source}: `prompt` is not a params block: the families the pipeline learns are the "
        f"`prompts` list{where}. Write `prompts: {example}` instead of `prompt:` (a preset's "
        "`prompts` replaces the whole list)"
    )


def validate(raw: dict[str, Any]) -> Params:
    """Validate a raw params dict; raise ConfigError listing every bad field."""
    if "prompt" in raw:
        raise _single_prompt_error("params", raw["prompt"], ["params"] if "prompts" in raw else [])
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe(e) for e in exc.errors(include_url=False)]
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        # An empty params file would validate to the models' defaults, another pipeline.
        raise ConfigError(
            f"{path}: the file is empty (a shell redirect `vpt-robust params ... > {path.name}` "
            f"empties it before the command reads it: write it with `vpt-robust params ... "
            f"--output {path.name}`)"
        )
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
    """params.yaml, then a preset, then explicit overrides, merged and validated.

    The params file must exist and hold blocks: the models' own defaults are not a pipeline
    (they differ from params.yaml), so a preset is never merged over them alone.

    A ``prompt:`` block in any of them is an error naming the file it came from (and those that
    set ``prompts``): merged, the two would make one of them silently take no effect."""
    sources: list[tuple[str, dict[str, Any]]] = [
        (_shown(Path(params_file)), _read_yaml(Path(params_file)))
    ]
    if preset:
        path = preset_path(preset)
        sources.append((_shown(path), _read_yaml(path)))
    if overrides:
        sources.append(("the overrides (--set)", overrides))
    prompts_from = [name for name, raw in sources if "prompts" in raw]
    for name, raw in sources:
        if "prompt" in raw:
            raise _single_prompt_error(name, raw["prompt"], prompts_from)
    merged: dict[str, Any] = {}
    for _, raw in sources:
        merged = deep_merge(merged, raw)
    return validate(merged)


def _shown(path: Path) -> str:
    """``path`` relative to the working directory where it lies below it (shorter messages)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def parse_override(text: str) -> dict[str, Any]:
    """Turn ``train.lr=0.1`` into ``{"train": {"lr": 0.1}}`` (the value is parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like block.field=value")
    key, value = text.split("=", 1)
    out: dict[str, Any] = yaml.safe_load(value) if value else None
    for part in reversed(key.strip().split(".")):
        out = {part: out}
    return out
