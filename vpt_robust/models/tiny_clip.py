"""The embedded tiny CLIP: an ``open_clip`` model whose image tower is a small hybrid ViT.

No CLIP weights can be downloaded here, so the default pipeline pretrains this model itself.
The image tower is a timm ``VisionTransformer`` whose tokens come from a small convolutional stem
(a plain patchify ViT, ``stem="patch"``, pretrained for minutes stays near chance: it lacks the
image prior; README), so token prompts (VPT, L2P, TeCoA) see an ordinary ``[CLS, patches]`` sequence. The text
tower is open_clip's standard transformer with its standard BPE tokenizer (vocabulary 49,408),
so templates and CoOp work exactly as on real CLIP.

Both towers are built through open_clip's and timm's normal machinery: the timm trunk is a
registered timm model and the CLIP is an open_clip model config, so a checkpoint saved with
:func:`save_clip_checkpoint` loads back with
``open_clip.create_model(TINY_CLIP_NAME, pretrained=str(path))`` after
:func:`register_tiny_clip` (or with :func:`load_tiny_clip`, which also handles non-default
architectures). Inputs are normalised images, with open_clip's default (OpenAI) mean and std
that ``open_clip.get_model_preprocess_cfg(model)`` reports.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import open_clip
import timm
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from timm.layers import to_2tuple
from timm.models import VisionTransformer, build_model_with_cfg
from torch import nn

__all__ = [
    "TINY_CLIP_NAME",
    "ConvStem",
    "TinyClipSpec",
    "build_tiny_clip",
    "clip_mean_std",
    "clip_tokenize",
    "load_tiny_clip",
    "register_tiny_clip",
    "save_clip_checkpoint",
    "tiny_clip_name",
]

TINY_CLIP_NAME = "vpt-tiny-clip"
_TIMM_PREFIX = "vpt_tiny_hybrid_vit"
_META_KEY = "vpt_robust.tiny_clip_spec"


@dataclass(frozen=True)
class TinyClipSpec:
    """Architecture of the tiny CLIP; the defaults are the embedded pipeline's model."""

    image_size: int = 32
    stem: str = "conv"
    stem_channels: tuple[int, ...] = (32, 64, 128)
    stem_depth: int = 2
    patch_size: int = 4
    width: int = 128
    depth: int = 2
    heads: int = 4
    mlp_ratio: float = 2.0
    pool: str = "token"
    embed_dim: int = 128
    text_width: int = 128
    text_layers: int = 3
    text_heads: int = 4
    context_length: int = 32
    vocab_size: int = 49408

    def __post_init__(self) -> None:
        if self.stem not in ("conv", "patch"):
            raise ValueError(f"stem: {self.stem!r} is not 'conv' or 'patch'")
        if self.patch_size < 1:
            raise ValueError(f"patch_size: {self.patch_size} must be >= 1")
        stride = self.stride
        if self.image_size % stride:
            raise ValueError(
                f"image_size: {self.image_size} is not divisible by the stem stride {stride}"
            )
        if self.width % self.heads or self.text_width % self.text_heads:
            raise ValueError("width / text_width must be divisible by heads / text_heads")
        if self.stem_depth < 1:
            raise ValueError(f"stem_depth: {self.stem_depth} must be >= 1")
        if self.pool not in ("token", "avg"):
            raise ValueError(f"pool: {self.pool!r} is not 'token' or 'avg'")

    @property
    def stride(self) -> int:
        """Pixels per token side: the conv stem's total stride, or the linear patch size."""
        return self.patch_size if self.stem == "patch" else 2 ** len(self.stem_channels)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["stem_channels"] = list(self.stem_channels)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TinyClipSpec:
        values = dict(values)
        if "stem_channels" in values:
            values["stem_channels"] = tuple(values["stem_channels"])
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown tiny CLIP spec fields: {sorted(unknown)}")
        return cls(**values)


_DEFAULT_SPEC = TinyClipSpec()


class ConvStem(nn.Module):
    """Convolutional tokeniser: one stage of ``depth`` 3x3 convs per entry of ``channels``, the
    first conv of each stage but the first halving the resolution, then a strided 3x3 conv to
    the token width; output (B, H/s * W/s, width) like timm's ``PatchEmbed``.

    It stands in for ``PatchEmbed`` inside timm's ``VisionTransformer`` (same constructor keywords
    and the attributes the ViT reads: ``img_size``, ``patch_size``, ``grid_size``,
    ``num_patches``, ``feat_ratio``, ``dynamic_feat_size``, ``set_input_size``).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 32,
        patch_size: int | tuple[int, int] = 4,
        in_chans: int = 3,
        embed_dim: int = 128,
        bias: bool = True,
        channels: tuple[int, ...] = (32, 64),
        depth: int = 1,
        dynamic_img_pad: bool = False,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        **_: Any,
    ) -> None:
        super().__init__()
        stride = 2 ** len(channels)
        if to_2tuple(patch_size) != (stride, stride):
            raise ValueError(f"patch_size: {patch_size} must equal the stem stride {stride}")
        if dynamic_img_pad:
            raise ValueError("dynamic_img_pad is not supported by ConvStem")
        dd = {"device": device, "dtype": dtype}
        layers: list[nn.Module] = []
        prev = in_chans
        first = True
        for ch in channels:
            for i in range(depth):
                step = 2 if i == 0 and not first else 1
                layers.append(nn.Conv2d(prev, ch, 3, stride=step, padding=1, **dd))
                layers.append(nn.BatchNorm2d(ch, **dd))
                layers.append(nn.GELU())
                prev = ch
            first = False
        layers.append(nn.Conv2d(prev, embed_dim, 3, stride=2, padding=1, bias=bias, **dd))
        self.stem = nn.Sequential(*layers)
        self.patch_size = (stride, stride)
        self.flatten = True
        self.output_fmt = "NLC"
        self.dynamic_img_pad = False
        self.set_input_size(img_size)

    def set_input_size(
        self,
        img_size: int | tuple[int, int] | None = None,
        patch_size: int | tuple[int, int] | None = None,
    ) -> None:
        if patch_size is not None and to_2tuple(patch_size) != self.patch_size:
            raise ValueError(f"patch_size: the conv stem's stride is fixed at {self.patch_size}")
        if img_size is not None:
            size = to_2tuple(img_size)
            if size[0] % self.patch_size[0] or size[1] % self.patch_size[1]:
                raise ValueError(f"img_size: {size} is not divisible by {self.patch_size}")
            self.img_size = size
            self.grid_size = (size[0] // self.patch_size[0], size[1] // self.patch_size[1])
            self.num_patches = self.grid_size[0] * self.grid_size[1]

    def feat_ratio(self, as_scalar: bool = True) -> int | tuple[int, int]:
        return max(self.patch_size) if as_scalar else self.patch_size

    def dynamic_feat_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        return img_size[0] // self.patch_size[0], img_size[1] // self.patch_size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(
                f"images: expected (B,3,{self.img_size[0]},{self.img_size[1]}), got {tuple(x.shape)}"
            )
        return self.stem(x).flatten(2).transpose(1, 2)


def _spec_key(spec: TinyClipSpec) -> str:
    return hashlib.sha1(json.dumps(spec.to_dict(), sort_keys=True).encode()).hexdigest()[:10]


def tiny_clip_name(spec: TinyClipSpec | None = None) -> str:
    """The open_clip model name of an architecture: ``TINY_CLIP_NAME`` for the default one."""
    spec = spec or _DEFAULT_SPEC
    return TINY_CLIP_NAME if spec == _DEFAULT_SPEC else f"{TINY_CLIP_NAME}-{_spec_key(spec)}"


def _timm_name(spec: TinyClipSpec) -> str:
    return _TIMM_PREFIX if spec == _DEFAULT_SPEC else f"{_TIMM_PREFIX}_{_spec_key(spec)}"


def _register_timm(spec: TinyClipSpec) -> str:
    name = _timm_name(spec)
    if name in timm.list_models(name):
        return name

    def entrypoint(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
        if pretrained:
            raise ValueError(f"{name} has no downloadable weights; load a local checkpoint")
        model_args = dict(
            img_size=spec.image_size,
            patch_size=spec.stride,
            embed_dim=spec.width,
            depth=spec.depth,
            num_heads=spec.heads,
            mlp_ratio=spec.mlp_ratio,
            class_token=True,
            global_pool=spec.pool,
        )
        if spec.stem == "conv":
            model_args["embed_layer"] = partial(
                ConvStem, channels=spec.stem_channels, depth=spec.stem_depth
            )
        cfg = {
            "architecture": name,
            "input_size": (3, spec.image_size, spec.image_size),
            "mean": OPENAI_DATASET_MEAN,
            "std": OPENAI_DATASET_STD,
            "num_classes": 0,
            "first_conv": "patch_embed.stem.0" if spec.stem == "conv" else "patch_embed.proj",
            "classifier": "head",
        }
        kwargs.pop("pretrained_cfg", None)
        kwargs.setdefault("num_classes", 0)
        return build_model_with_cfg(
            VisionTransformer, name, False, pretrained_cfg=cfg, **dict(model_args, **kwargs)
        )

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    timm.models.register_model(entrypoint)
    setattr(sys.modules[__name__], name, entrypoint)
    return name


def _open_clip_config(spec: TinyClipSpec) -> dict[str, Any]:
    return {
        "embed_dim": spec.embed_dim,
        "vision_cfg": {
            "timm_model_name": _timm_name(spec),
            "timm_model_pretrained": False,
            "timm_pool": spec.pool,
            "timm_proj": "linear",
            "image_size": spec.image_size,
        },
        "text_cfg": {
            "context_length": spec.context_length,
            "vocab_size": spec.vocab_size,
            "width": spec.text_width,
            "heads": spec.text_heads,
            "layers": spec.text_layers,
        },
    }


def register_tiny_clip(spec: TinyClipSpec | None = None, **overrides: Any) -> str:
    """Register the timm trunk and the open_clip config of an architecture; return its name.

    Idempotent. With no arguments it registers the default model under ``TINY_CLIP_NAME``;
    ``overrides`` are ``TinyClipSpec`` fields (e.g. ``depth=2``).
    """
    spec = dataclasses.replace(spec or _DEFAULT_SPEC, **overrides)
    name = tiny_clip_name(spec)
    _register_timm(spec)
    if name not in open_clip.list_models():
        # open_clip registers configs from JSON files and keeps them once read, so the
        # file can live in a directory that is removed right after.
        with tempfile.TemporaryDirectory(prefix="vpt-tiny-clip-") as tmp:
            path = Path(tmp) / f"{name}.json"
            path.write_text(json.dumps(_open_clip_config(spec), indent=2))
            open_clip.add_model_config(path)
        if name not in open_clip.list_models():
            raise RuntimeError(f"open_clip did not register the tiny CLIP config {name!r}")
    return name


def build_tiny_clip(image_size: int = 32, **overrides: Any) -> open_clip.CLIP:
    """An untrained tiny CLIP (``TinyClipSpec`` fields as keyword overrides)."""
    spec = dataclasses.replace(_DEFAULT_SPEC, image_size=image_size, **overrides)
    name = register_tiny_clip(spec)
    model = open_clip.create_model(name, pretrained=None)
    model.tiny_clip_spec = spec  # lets save_clip_checkpoint record a non-default architecture
    return model


def save_clip_checkpoint(model: nn.Module, path: str | Path) -> Path:
    """Save the state dict as safetensors (``.safetensors``) or a torch file (other suffixes).

    The architecture spec goes into the safetensors metadata, so :func:`load_tiny_clip` can
    rebuild a non-default model; the default one also loads with
    ``open_clip.create_model(TINY_CLIP_NAME, pretrained=str(path))``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    spec = getattr(model, "tiny_clip_spec", None)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        meta = {_META_KEY: json.dumps(spec.to_dict())} if spec is not None else None
        save_file(state, str(path), metadata=meta)
    else:
        torch.save(state, path)
    return path


def load_tiny_clip(path: str | Path, device: torch.device | str = "cpu") -> open_clip.CLIP:
    """Load a tiny CLIP checkpoint, rebuilding its architecture from the file's metadata."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tiny CLIP checkpoint not found: {path}")
    spec = _DEFAULT_SPEC
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        if _META_KEY in meta:
            spec = TinyClipSpec.from_dict(json.loads(meta[_META_KEY]))
    name = register_tiny_clip(spec)
    model = open_clip.create_model(name, pretrained=str(path), device=device)
    model.tiny_clip_spec = spec
    return model


def clip_mean_std(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The normalisation (mean, std) an open_clip model expects, from its preprocess config."""
    cfg = open_clip.get_model_preprocess_cfg(model)
    return tuple(cfg["mean"]), tuple(cfg["std"])


def clip_tokenize(texts: list[str], context_length: int) -> torch.Tensor:
    """open_clip's standard BPE tokenisation (what ``open_clip.get_tokenizer`` gives the model)."""
    return open_clip.tokenize(texts, context_length=context_length)
