"""Procedural renderer of the embedded data set: shapes in several styles on real photo crops.

Every shape is a boolean mask on a fine canonical grid, turned once into a signed distance field
(SDF, via an exact Euclidean distance transform). An image samples that SDF at its rotated,
scaled and shifted pixel coordinates, so anti-aliased fills, outlines, glows and shadows all come
from one array lookup per pixel, whatever the shape. Backgrounds are crops of the photographs
that scikit-image ships (no download). All randomness comes from a numpy Generator seeded per
(style, class) group, so the output is a pure function of (seed, image_size, count).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import numpy as np
from scipy import ndimage

GENERATOR_VERSION = 1

# The order fixes the class ids: the first 12 are the usual "base" classes, the last 8 "novel".
CLASS_NAMES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "heart",
    "cross",
    "crescent",
    "ring",
    "arrow",
    "house",
    "tree",
    "flower",
    "cloud",
    "bolt",
    "key",
    "bone",
    "drop",
    "fish",
    "bell",
    "mushroom",
)

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.10, 0.10),
    "orange": (0.98, 0.52, 0.05),
    "yellow": (0.96, 0.86, 0.10),
    "green": (0.15, 0.68, 0.20),
    "cyan": (0.10, 0.78, 0.85),
    "blue": (0.12, 0.25, 0.90),
    "purple": (0.55, 0.18, 0.75),
    "pink": (0.98, 0.45, 0.70),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)

# The noun each style uses in captions ("a sketch of a red star").
STYLE_NOUNS: dict[str, str] = {
    "photo": "photo",
    "flat": "icon",
    "sketch": "sketch",
    "neon": "neon sign",
    "night": "night photo",
}
STYLE_NAMES: tuple[str, ...] = tuple(STYLE_NOUNS)

_GRID = 256  # canonical SDF resolution over [-_EXTENT, _EXTENT]^2
_EXTENT = 1.3
_PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "colorwheel",
    "camera",
    "coins",
    "brick",
    "grass",
    "gravel",
    "moon",
    "page",
    "clock",
    "cell",
)


# ----------------------------------------------------------------------------- shapes


def _xy() -> tuple[np.ndarray, np.ndarray]:
    c = np.linspace(-_EXTENT, _EXTENT, _GRID)
    y, x = np.meshgrid(c, c, indexing="ij")  # y points down, like image rows
    return x, y


def _disk(x: np.ndarray, y: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    return (x - cx) ** 2 + (y - cy) ** 2 <= r * r


def _rect(x: np.ndarray, y: np.ndarray, x0: float, x1: float, y0: float, y1: float) -> np.ndarray:
    return (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)


def _poly(x: np.ndarray, y: np.ndarray, pts: list[tuple[float, float]]) -> np.ndarray:
    """Even-odd point-in-polygon test, vectorised over the grid."""
    inside = np.zeros(x.shape, dtype=bool)
    n = len(pts)
    for i in range(n):
        x0, y0 = pts[i]
        x1, y1 = pts[(i + 1) % n]
        crosses = (y0 > y) != (y1 > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            xint = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (x < xint)
    return inside


def _star_pts(n: int, r_out: float, r_in: float, dy: float = 0.0) -> list[tuple[float, float]]:
    pts = []
    for k in range(2 * n):
        a = -np.pi / 2 + k * np.pi / n
        r = r_out if k % 2 == 0 else r_in
        pts.append((r * np.cos(a), r * np.sin(a) + dy))
    return pts


def _heart(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    # The classic implicit heart (x^2 + y^2 - 1)^3 - x^2 y^3 <= 0, y up, scaled to the unit box.
    s = 0.78
    u, v = x / s, -(y / s) + 0.15
    return (u * u + v * v - 1) ** 3 - u * u * v**3 <= 0


_SHAPES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "circle": lambda x, y: _disk(x, y, 0, 0, 0.9),
    "square": lambda x, y: _rect(x, y, -0.75, 0.75, -0.75, 0.75),
    "triangle": lambda x, y: _poly(x, y, [(0, -0.8), (0.95, 0.75), (-0.95, 0.75)]),
    "star": lambda x, y: _poly(x, y, _star_pts(5, 1.0, 0.42, dy=0.1)),
    "heart": _heart,
    "cross": lambda x, y: (
        _rect(x, y, -0.85, 0.85, -0.28, 0.28) | _rect(x, y, -0.28, 0.28, -0.85, 0.85)
    ),
    "crescent": lambda x, y: _disk(x, y, 0, 0, 0.9) & ~_disk(x, y, 0.42, -0.2, 0.75),
    "ring": lambda x, y: _disk(x, y, 0, 0, 0.9) & ~_disk(x, y, 0, 0, 0.5),
    "arrow": lambda x, y: (
        _rect(x, y, -0.95, 0.15, -0.2, 0.2) | _poly(x, y, [(0.1, -0.65), (0.98, 0), (0.1, 0.65)])
    ),
    "house": lambda x, y: (
        (
            _rect(x, y, -0.65, 0.65, -0.1, 0.85)
            | _poly(x, y, [(-0.92, -0.05), (0, -0.9), (0.92, -0.05)])
        )
        & ~_rect(x, y, -0.17, 0.17, 0.38, 0.9)
    ),
    "tree": lambda x, y: (
        _poly(x, y, [(0, -0.98), (0.5, -0.3), (-0.5, -0.3)])
        | _poly(x, y, [(0, -0.6), (0.78, 0.42), (-0.78, 0.42)])
        | _rect(x, y, -0.14, 0.14, 0.4, 0.92)
    ),
    "flower": lambda x, y: (
        np.any(
            [
                _disk(x, y, 0.58 * np.cos(a), 0.58 * np.sin(a), 0.36)
                for a in -np.pi / 2 + 2 * np.pi * np.arange(5) / 5
            ],
            axis=0,
        )
        | _disk(x, y, 0, 0, 0.3)
    ),
    "cloud": lambda x, y: (
        _disk(x, y, -0.5, 0.12, 0.38)
        | _disk(x, y, 0.05, -0.15, 0.52)
        | _disk(x, y, 0.52, 0.1, 0.4)
        | _rect(x, y, -0.5, 0.52, 0.1, 0.5)
    ),
    "bolt": lambda x, y: _poly(
        x,
        y,
        [
            (0.1, -1.0),
            (-0.5, 0.12),
            (-0.04, 0.12),
            (-0.22, 1.0),
            (0.52, -0.16),
            (0.08, -0.16),
            (0.42, -1.0),
        ],
    ),
    "key": lambda x, y: (
        (_disk(x, y, -0.52, 0, 0.42) & ~_disk(x, y, -0.52, 0, 0.17))
        | _rect(x, y, -0.15, 0.95, -0.12, 0.12)
        | _rect(x, y, 0.52, 0.68, 0.1, 0.42)
        | _rect(x, y, 0.78, 0.94, 0.1, 0.34)
    ),
    "bone": lambda x, y: (
        _rect(x, y, -0.62, 0.62, -0.17, 0.17)
        | _disk(x, y, -0.7, -0.2, 0.25)
        | _disk(x, y, -0.7, 0.2, 0.25)
        | _disk(x, y, 0.7, -0.2, 0.25)
        | _disk(x, y, 0.7, 0.2, 0.25)
    ),
    "drop": lambda x, y: (
        _disk(x, y, 0, 0.32, 0.6) | _poly(x, y, [(0, -0.95), (0.53, 0.03), (-0.53, 0.03)])
    ),
    "fish": lambda x, y: (
        (
            (((x + 0.18) / 0.66) ** 2 + (y / 0.42) ** 2 <= 1)
            | _poly(x, y, [(0.35, 0), (0.95, -0.48), (0.95, 0.48)])
        )
        & ~_disk(x, y, -0.5, -0.08, 0.09)
    ),
    "bell": lambda x, y: (
        _disk(x, y, 0, -0.3, 0.48)
        | _poly(x, y, [(-0.48, -0.3), (0.48, -0.3), (0.85, 0.55), (-0.85, 0.55)])
        | _disk(x, y, 0, 0.68, 0.2)
    ),
    "mushroom": lambda x, y: (
        ((((x / 0.95) ** 2 + ((y - 0.05) / 0.8) ** 2) <= 1) & (y <= 0.05))
        | _rect(x, y, -0.24, 0.24, 0.0, 0.85)
    ),
}
assert tuple(_SHAPES) == CLASS_NAMES


@cache
def shape_sdfs() -> np.ndarray:
    """Signed distance fields (C, G, G) in canonical units: negative inside, positive outside."""
    x, y = _xy()
    cell = 2 * _EXTENT / (_GRID - 1)
    out = np.empty((len(CLASS_NAMES), _GRID, _GRID), dtype=np.float32)
    for i, name in enumerate(CLASS_NAMES):
        mask = _SHAPES[name](x, y)
        outside = ndimage.distance_transform_edt(~mask)
        inside = ndimage.distance_transform_edt(mask)
        # Half a cell moves the zero level onto the boundary between the two cell sets.
        out[i] = ((np.where(mask, -inside, outside) + np.where(mask, 0.5, -0.5)) * cell).astype(
            np.float32
        )
    return out


def _sample_sdf(sdf: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Bilinear lookup of one canonical SDF at canonical coordinates (u right, v down)."""
    scale = (_GRID - 1) / (2 * _EXTENT)
    fx = np.clip((u + _EXTENT) * scale, 0, _GRID - 1.001)
    fy = np.clip((v + _EXTENT) * scale, 0, _GRID - 1.001)
    x0 = fx.astype(np.int32)
    y0 = fy.astype(np.int32)
    ax = (fx - x0).astype(np.float32)
    ay = (fy - y0).astype(np.float32)
    top = sdf[y0, x0] * (1 - ax) + sdf[y0, x0 + 1] * ax
    bot = sdf[y0 + 1, x0] * (1 - ax) + sdf[y0 + 1, x0 + 1] * ax
    d = top * (1 - ay) + bot * ay
    # Beyond the canonical square the clamped lookup underestimates; add the overshoot back.
    over = np.hypot(np.maximum(np.abs(u) - _EXTENT, 0), np.maximum(np.abs(v) - _EXTENT, 0))
    return d + over.astype(np.float32)


# ----------------------------------------------------------------------------- backgrounds


@cache
def _photo_bank(image_size: int) -> tuple[np.ndarray, ...]:
    """The scikit-image photos as float RGB, each at several scales relative to the image size."""
    from skimage import data as skdata
    from skimage.transform import resize

    bank = []
    for name in _PHOTOS:
        img = np.asarray(getattr(skdata, name)())
        if img.dtype == bool:
            img = img.astype(np.uint8) * 255
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        img = img[..., :3].astype(np.float32) / 255.0
        short = min(img.shape[:2])
        # Crops span 1/1.5 to 1/4 of a photo's short side; large image sizes upsample instead.
        sides = sorted({max(image_size, min(f * image_size, short)) for f in (1.5, 2.5, 4.0)})
        for side in sides:
            s = side / short
            shape = (
                max(image_size, round(img.shape[0] * s)),
                max(image_size, round(img.shape[1] * s)),
            )
            bank.append(resize(img, shape, order=1, anti_aliasing=True).astype(np.float32))
    return tuple(bank)


def _photo_crops(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    bank = _photo_bank(size)
    out = np.empty((n, size, size, 3), dtype=np.float32)
    idx = rng.integers(0, len(bank), n)
    fy = rng.random(n)
    fx = rng.random(n)
    flip = rng.random(n) < 0.5
    for i in range(n):
        img = bank[idx[i]]
        y0 = int(fy[i] * (img.shape[0] - size + 1))
        x0 = int(fx[i] * (img.shape[1] - size + 1))
        crop = img[y0 : y0 + size, x0 : x0 + size]
        out[i] = crop[:, ::-1] if flip[i] else crop
    return out


# ----------------------------------------------------------------------------- styles


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _cov(d_px: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage of the inside of an SDF given in pixels."""
    return np.clip(0.5 - d_px, 0, 1)


def _line(d_px: np.ndarray, width: np.ndarray) -> np.ndarray:
    return np.clip(width / 2 + 0.5 - np.abs(d_px), 0, 1)


def _style_photo(g: _Geometry, rng: np.random.Generator) -> np.ndarray:
    n, s = g.n, g.size
    bg = _photo_crops(rng, n, s)
    light = rng.uniform(0, 2 * np.pi, n).astype(np.float32)[:, None, None]
    grad = np.cos(light) * g.u + np.sin(light) * g.v  # about [-1, 1] across the object
    shade = np.clip(1.05 - 0.3 * grad - 0.35 * np.exp(-np.abs(g.d_px) / 1.2), 0.35, 1.3)
    tex = rng.normal(0, 0.03, (n, s, s, 1)).astype(np.float32)
    obj = np.clip(g.color[:, None, None, :] * shade[..., None] + tex, 0, 1)
    # Soft drop shadow: the object's SDF looked up a little away from the light.
    shift = rng.uniform(0.8, 2.0, n).astype(np.float32)[:, None, None]
    sd = g.sdf_at(g.px + np.cos(light) * shift, g.py + np.sin(light) * shift)
    shadow = np.clip(0.5 - sd / 1.5, 0, 1) * 0.5
    bg = bg * (1 - shadow[..., None])
    a = _cov(g.d_px)[..., None]
    return bg * (1 - a) + obj * a


def _style_flat(g: _Geometry, rng: np.random.Generator) -> np.ndarray:
    n = g.n
    # A plain, low-saturation background whose lightness contrasts with the object's.
    dark = _luma(g.color) > 0.5
    light_level = np.where(dark, rng.uniform(0.12, 0.3, n), rng.uniform(0.78, 0.97, n))
    tint = rng.uniform(-0.08, 0.08, (n, 3))
    bg = np.clip(light_level[:, None] + tint, 0, 1).astype(np.float32)
    a = _cov(g.d_px)[..., None]
    return bg[:, None, None, :] * (1 - a) + g.color[:, None, None, :] * a


def _style_sketch(g: _Geometry, rng: np.random.Generator) -> np.ndarray:
    n, s = g.n, g.size
    paper = np.array([0.93, 0.91, 0.85], dtype=np.float32) * rng.uniform(0.92, 1.03, (n, 1, 1, 1))
    paper = paper + rng.normal(0, 0.025, (n, s, s, 1)).astype(np.float32)
    # A hand-drawn wobble: the outline is traced through a smooth random displacement.
    d = g.sdf_at(g.px, g.py, wobble=0.035 * g.radius_px, rng=rng)
    width = rng.uniform(1.0, 1.8, n).astype(np.float32)[:, None, None]
    a = _line(d, width)[..., None] * rng.uniform(0.8, 1.0, (n, 1, 1, 1))
    ink = g.color[:, None, None, :] * 0.85
    return np.clip(paper * (1 - a) + ink * a, 0, 1)


def _style_neon(g: _Geometry, rng: np.random.Generator) -> np.ndarray:
    n, s = g.n, g.size
    bg = _photo_crops(rng, n, s) * rng.uniform(0.06, 0.18, (n, 1, 1, 1)).astype(np.float32)
    bg = bg + rng.normal(0, 0.015, (n, s, s, 1)).astype(np.float32)
    width = rng.uniform(1.0, 1.6, n).astype(np.float32)[:, None, None]
    core = _line(g.d_px, width)[..., None]
    glow = np.exp(-np.maximum(np.abs(g.d_px) - width / 2, 0) / 1.6)[..., None] * 0.75
    col = g.color[:, None, None, :]
    img = bg + glow * col
    return np.clip(img * (1 - core) + (0.45 * col + 0.55) * core, 0, 1)


def _style_night(g: _Geometry, rng: np.random.Generator) -> np.ndarray:
    """The photo style taken at night: dark, blue-tinted, low contrast, with sensor noise."""
    n, s = g.n, g.size
    img = _style_photo(g, rng)
    level = rng.uniform(0.35, 0.5, (n, 1, 1, 1)).astype(np.float32)
    tint = np.array([0.75, 0.9, 1.25], dtype=np.float32)
    img = img * level * tint + 0.03
    img = img + rng.normal(0, 0.03, (n, s, s, 3)).astype(np.float32)
    return np.clip(img, 0, 1)


_STYLE_FNS = {
    "photo": _style_photo,
    "flat": _style_flat,
    "sketch": _style_sketch,
    "neon": _style_neon,
    "night": _style_night,
}
assert tuple(_STYLE_FNS) == STYLE_NAMES


class _Geometry:
    """Random placement of one class's shape in n images, and SDF lookups in pixel units."""

    def __init__(self, rng: np.random.Generator, class_id: int, n: int, size: int) -> None:
        self.n, self.size = n, size
        self.sdf = shape_sdfs()[class_id]
        self.color_id = rng.integers(0, len(COLOR_NAMES), n)
        base = np.array([COLORS[c] for c in COLOR_NAMES], dtype=np.float32)[self.color_id]
        self.color = np.clip(base + rng.normal(0, 0.04, (n, 3)), 0, 1).astype(np.float32)
        r = rng.uniform(0.27, 0.42, n) * size
        self.radius_px = r.astype(np.float32)[:, None, None]
        aspect = np.exp(rng.normal(0, 0.08, n))
        self.sx = (r * aspect)[:, None, None].astype(np.float32)
        self.sy = (r / aspect)[:, None, None].astype(np.float32)
        theta = np.deg2rad(rng.uniform(-25, 25, n))
        self.cos = np.cos(theta)[:, None, None].astype(np.float32)
        self.sin = np.sin(theta)[:, None, None].astype(np.float32)
        self.flip = np.where(rng.random(n) < 0.5, -1.0, 1.0)[:, None, None].astype(np.float32)
        margin = 0.9 * r
        self.cx = rng.uniform(margin, size - margin)[:, None, None].astype(np.float32)
        self.cy = rng.uniform(margin, size - margin)[:, None, None].astype(np.float32)
        pix = np.arange(size, dtype=np.float32) + 0.5
        py, px = np.meshgrid(pix, pix, indexing="ij")
        self.px = np.broadcast_to(px, (n, size, size))
        self.py = np.broadcast_to(py, (n, size, size))
        self.u, self.v = self._canon(self.px, self.py)
        self.d_px = self.sdf_at(self.px, self.py)

    def _canon(self, px: np.ndarray, py: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        dx, dy = px - self.cx, py - self.cy
        u = (self.cos * dx + self.sin * dy) / self.sx * self.flip
        v = (-self.sin * dx + self.cos * dy) / self.sy
        return u, v

    def sdf_at(
        self,
        px: np.ndarray,
        py: np.ndarray,
        wobble: float | np.ndarray = 0.0,
        rng: np.random.Generator | None = None,
    ) -> np.ndarray:
        """Signed distance in pixels at pixel positions, optionally through a smooth wobble."""
        if rng is not None:
            px, py = px.copy(), py.copy()
            for arr in (px, py):
                for _ in range(2):
                    f = rng.uniform(0.5, 1.8, (self.n, 2, 1, 1)).astype(np.float32) * (
                        2 * np.pi / self.size
                    )
                    ph = rng.uniform(0, 2 * np.pi, (self.n, 1, 1)).astype(np.float32)
                    arr += wobble * np.sin(f[:, 0] * self.px + f[:, 1] * self.py + ph)
        u, v = self._canon(px, py)
        return _sample_sdf(self.sdf, u, v) * self.radius_px


def render_group(
    seed: int, style_id: int, class_id: int, n: int, image_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Render n images of one class in one style: (uint8 N,H,W,3 images, colour ids)."""
    rng = np.random.default_rng([seed, GENERATOR_VERSION, style_id, class_id])
    images = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    colors = np.empty(n, dtype=np.int64)
    chunk = max(1, (1 << 16) // (image_size * image_size))
    fn = _STYLE_FNS[STYLE_NAMES[style_id]]
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        geom = _Geometry(rng, class_id, m, image_size)
        img = fn(geom, rng)
        images[start : start + m] = np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)
        colors[start : start + m] = geom.color_id
    return images, colors
