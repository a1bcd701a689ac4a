"""Frozen backbones: open_clip models (a pretrained tag or a local checkpoint), timm ViTs with
local weights, and the embedded tiny CLIP. Normalisation lives inside: inputs are [0,1] images."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from vpt_robust.config import BackboneConfig

if TYPE_CHECKING:
    from vpt_robust.models.prompted_vit import TokenGeometry, TokenPrompt


class BackboneError(RuntimeError):
    """The backbone named in the config cannot be built or its weights cannot be found."""


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class Backbone(nn.Module):
    """A frozen image (and, for CLIP, text) encoder plus the normalisation it expects.

    ``kind`` is ``"clip"`` (open_clip model: image and text towers, logit scale) or ``"timm"``
    (image tower only). ``identity`` says where the weights came from, so learned prompts can
    refuse to load onto a different backbone.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        kind: str,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        image_size: int,
        identity: dict[str, Any],
        tokenizer: Any = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.kind = kind
        self.image_size = image_size
        self.identity = identity
        self.tokenizer = tokenizer
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.model.requires_grad_(False)
        self.model.eval()
        # The config that rebuilds exactly this backbone (set by load_backbone; a saved prompt
        # records it so that load_prompted_model can rebuild the classifier on its own).
        self.config: BackboneConfig | None = None

    def train(self, mode: bool = True) -> Backbone:
        """The frozen model always stays in eval mode (no dropout, fixed norm statistics)."""
        super().train(mode)
        self.model.eval()
        return self

    @property
    def has_text(self) -> bool:
        return self.kind == "clip"

    @property
    def image_model(self) -> nn.Module:
        return self.model.visual if self.kind == "clip" else self.model

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """[0,1] images -> the model's input: resized to its image size, then normalised."""
        return self.standardize(self.resize(images))

    def resize(self, images: torch.Tensor) -> torch.Tensor:
        """[0,1] images resized (bilinear) to the model's image size, still in [0,1]."""
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            images = F.interpolate(
                images,
                size=(self.image_size, self.image_size),
                mode="bilinear",
                align_corners=False,
            )
        return images

    def standardize(self, images: torch.Tensor) -> torch.Tensor:
        """[0,1] images of the model's size -> normalised with the model's mean and std."""
        return (images - self.mean) / self.std

    def encode_image(
        self, normalized: torch.Tensor, token_prompt: TokenPrompt | None = None
    ) -> torch.Tensor:
        """Image features of already-normalised images, with ``token_prompt``'s tokens in the
        ViT's sequence if given (see ``models/prompted_vit.py``)."""
        if token_prompt is not None:
            from vpt_robust.models.prompted_vit import prompted_image_features

            return prompted_image_features(self.image_model, normalized, token_prompt)
        if self.kind == "clip":
            return self.model.encode_image(normalized)
        if self.kind == "classifier":
            return self.model(normalized)
        feats = self.model.forward_features(normalized)
        return self.model.forward_head(feats, pre_logits=True)

    @property
    def token_geometry(self) -> TokenGeometry:
        """Width, depth and patch size of the ViT image tower (what token prompts are built for);
        a clear error if the image tower is not a ViT."""
        from vpt_robust.models.prompted_vit import vit_geometry

        return vit_geometry(self.image_model)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        if not self.has_text:
            raise BackboneError("this backbone has no text tower: use a linear head")
        return self.model.encode_text(tokens)

    def _text_tower(self) -> nn.Module:
        """The module holding open_clip's text transformer pieces (CLIP or CustomTextCLIP)."""
        if not self.has_text:
            raise BackboneError("this backbone has no text tower: use a linear head")
        text = getattr(self.model, "text", None)
        if text is not None:
            if getattr(text, "cls_emb", None) is not None or getattr(text, "use_pad_mask", False):
                raise BackboneError(
                    "learned text context (CoOp) needs a causal text tower without a class "
                    f"token or pad mask; {type(self.model).__name__}'s text tower has one"
                )
            return text
        return self.model

    @property
    def text_width(self) -> int:
        """Width of the text tower's token embeddings (the size of a CoOp context vector)."""
        return int(self._text_tower().token_embedding.weight.shape[1])

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids ``(N, L)`` -> the text tower's input token embeddings ``(N, L, width)``."""
        return self._text_tower().token_embedding(tokens)

    def encode_text_embeddings(
        self, embeddings: torch.Tensor, tokens: torch.Tensor
    ) -> torch.Tensor:
        """Text features from input token embeddings (some of them learned, as in CoOp).

        Runs the text tower from its token embeddings on: + position embedding -> transformer
        -> final norm -> pooling at the end-of-text token of ``tokens`` -> projection.
        ``encode_text_embeddings(embed_tokens(t), t)`` equals ``encode_text(t)``.
        """
        from open_clip.transformer import text_global_pool

        tower = self._text_tower()
        is_custom = tower is not self.model
        if embeddings.shape[:2] != tokens.shape:
            raise ValueError(
                f"embeddings {tuple(embeddings.shape)} do not match tokens {tuple(tokens.shape)}"
            )
        cast = tower.transformer.get_cast_dtype()
        x = embeddings.to(cast) + tower.positional_embedding[: tokens.shape[1]].to(cast)
        x = tower.transformer(x, attn_mask=tower.attn_mask)
        x = tower.ln_final(x)
        if is_custom:
            x = text_global_pool(x, tokens, tower.pool_type, eos_token_id=tower.eos_id)
        else:
            x = text_global_pool(
                x, tokens, tower.text_pool_type, eos_token_id=getattr(tower, "text_eos_id", None)
            )
        proj = tower.text_projection
        if proj is not None:
            x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
        return x

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        if self.tokenizer is None:
            raise BackboneError("this backbone has no tokenizer: use a linear head")
        return self.tokenizer(texts)

    @property
    def logit_scale(self) -> torch.Tensor:
        if not self.has_text:
            raise BackboneError("this backbone has no logit scale (no text tower)")
        return self.model.logit_scale.exp()

    @property
    def feature_dim(self) -> int:
        with torch.no_grad():
            probe = torch.zeros(1, 3, self.image_size, self.image_size, device=self.mean.device)
            return int(self.encode_image(probe).shape[-1])


def _load_state_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return state


def _open_clip_backbone(
    name: str,
    pretrained: str | None,
    cfg: BackboneConfig,
    source: str,
    model: nn.Module | None = None,
) -> Backbone:
    """``model``: an already built and loaded open_clip model named ``name`` (else built here)."""
    import open_clip

    if pretrained and Path(pretrained).suffix and not Path(pretrained).is_file():
        raise BackboneError(f"backbone.pretrained: checkpoint file not found: {pretrained}")
    kwargs: dict[str, Any] = {"pretrained": pretrained, "cache_dir": cfg.cache_dir, **cfg.kwargs}
    if cfg.image_size:
        kwargs["force_image_size"] = cfg.image_size
    try:
        if model is None:
            model = open_clip.create_model(name, **kwargs)
    except RuntimeError as exc:
        if "download" in str(exc).lower() or "pretrained" in str(exc).lower():
            raise BackboneError(
                f"open_clip {name!r} with pretrained={pretrained!r}: weights are not reachable "
                "(offline, and not in the cache). Download them where there is internet, or "
                "set backbone.pretrained to a local checkpoint file. Original error: "
                f"{str(exc).splitlines()[0]}"
            ) from None
        raise BackboneError(f"open_clip could not build {name!r}: {exc}") from exc
    except ValueError as exc:
        raise BackboneError(f"backbone.name: {name!r} is not an open_clip model ({exc})") from None
    pre = open_clip.get_model_preprocess_cfg(model)
    size = pre.get("size", cfg.image_size or 224)
    size = size[0] if isinstance(size, tuple | list) else size
    identity = {"source": source, "name": name, "pretrained": pretrained}
    if pretrained and Path(pretrained).is_file():
        identity["pretrained"] = Path(pretrained).name
        identity["sha256"] = file_sha256(pretrained)
    return Backbone(
        model,
        kind="clip",
        mean=tuple(pre["mean"]),
        std=tuple(pre["std"]),
        image_size=int(size),
        identity=identity,
        tokenizer=open_clip.get_tokenizer(name),
    )


def _timm_backbone(cfg: BackboneConfig) -> Backbone:
    import timm

    kwargs: dict[str, Any] = {"pretrained": False, "num_classes": 0, **cfg.kwargs}
    if cfg.image_size:
        kwargs["img_size"] = cfg.image_size
    try:
        model = timm.create_model(cfg.name, **kwargs)
    except RuntimeError as exc:
        raise BackboneError(f"backbone.name: timm could not build {cfg.name!r}: {exc}") from None
    identity: dict[str, Any] = {"source": "timm", "name": cfg.name, "pretrained": None}
    if cfg.pretrained:
        path = Path(cfg.pretrained)
        if not path.is_file():
            raise BackboneError(f"backbone.pretrained: timm weights file not found: {path}")
        state = _load_state_file(path)
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:
            raise BackboneError(
                f"backbone.pretrained: {path} does not fit timm {cfg.name!r}: "
                f"{str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else exc}"
            ) from None
        if missing or unexpected:
            raise BackboneError(
                f"backbone.pretrained: {path} does not fit timm {cfg.name!r}: "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        identity.update(pretrained=path.name, sha256=file_sha256(path))
    data_cfg = timm.data.resolve_data_config({}, model=model)
    return Backbone(
        model,
        kind="timm",
        mean=tuple(data_cfg["mean"]),
        std=tuple(data_cfg["std"]),
        # The size the model was built for (timm's data config reports the pretrained default).
        image_size=int(cfg.image_size or kwargs.get("img_size") or data_cfg["input_size"][-1]),
        identity=identity,
    )


def _robustbench_backbone(cfg: BackboneConfig) -> Backbone:
    """A RobustBench leaderboard classifier (normalisation already inside, logits as features),
    so it can sit in the same robustness table as the prompted models (with a linear head)."""
    from vpt_robust.models.robustbench import load_robustbench_model

    spec = cfg.name if cfg.name.startswith("robustbench:") else f"robustbench:{cfg.name}"
    cache = cfg.cache_dir or str(Path.home() / ".cache" / "robustbench" / "models")
    model = load_robustbench_model(spec, cache)
    dataset = spec.split(":", 1)[1].split("/")[0]
    return Backbone(
        model,
        kind="classifier",
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        image_size=cfg.image_size or (224 if dataset == "imagenet" else 32),
        identity={"source": "robustbench", "name": spec, "pretrained": cache},
    )


def load_backbone(
    cfg: BackboneConfig, device: torch.device, checkpoint: Path | None = None
) -> Backbone:
    """Build the frozen backbone named by ``cfg``; ``checkpoint`` is the embedded model's weights."""
    resolved = cfg
    if cfg.source == "embedded":
        from vpt_robust.models.tiny_clip import load_tiny_clip, tiny_clip_name

        path = Path(cfg.pretrained) if cfg.pretrained else checkpoint
        if path is None or not path.is_file():
            raise BackboneError(
                f"embedded tiny CLIP checkpoint not found: {path}; run the pretrain stage first"
            )
        # The architecture the checkpoint records (it may predate a change of the default).
        model = load_tiny_clip(path)
        name = tiny_clip_name(model.tiny_clip_spec)
        if cfg.name and cfg.name != name:
            raise BackboneError(
                f"backbone.name: {cfg.name!r}, but {path} holds the tiny CLIP {name!r}"
            )
        backbone = _open_clip_backbone(name, str(path), cfg, "embedded", model=model)
        resolved = cfg.model_copy(update={"pretrained": str(path)})
    elif cfg.source == "robustbench":
        backbone = _robustbench_backbone(cfg)
    elif cfg.source == "open_clip":
        backbone = _open_clip_backbone(cfg.name, cfg.pretrained, cfg, "open_clip")
    else:
        backbone = _timm_backbone(cfg)
    backbone.config = resolved
    return backbone.to(device)
