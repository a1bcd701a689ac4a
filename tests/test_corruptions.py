"""Shapes, ranges, seeding, errors and severity ordering of the 15 corruptions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vpt_robust.corruptions import CORRUPTIONS, PARAMS, corrupt, select_table
from vpt_robust.corruptions.blur import glass_source_map
from vpt_robust.corruptions.frost_textures import _TEXTURES, N_TEXTURES, frost_texture
from vpt_robust.data.images import sample_photos

DETERMINISTIC = {
    "defocus_blur",
    "zoom_blur",
    "brightness",
    "contrast",
    "pixelate",
    "jpeg_compression",
}


def natural_images(size: int) -> torch.Tensor:
    """Six real photos from scikit-image, resized to size x size, as a float batch."""
    return torch.from_numpy(sample_photos(size, 6)).permute(0, 3, 1, 2).float() / 255.0


@pytest.fixture(scope="module")
def batch32() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.cat([natural_images(32)[:3], torch.rand(1, 3, 32, 32)])


def test_names_in_standard_order() -> None:
    assert CORRUPTIONS[:3] == ("gaussian_noise", "shot_noise", "impulse_noise")
    assert CORRUPTIONS[-1] == "jpeg_compression"
    assert len(CORRUPTIONS) == 15 == len(set(CORRUPTIONS))
    for name in CORRUPTIONS:
        for table in ("cifar", "imagenet"):
            assert len(PARAMS[name][table]) == 5


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_shapes_ranges_and_seeding(name: str, batch32: torch.Tensor) -> None:
    for severity in range(1, 6):
        out = corrupt(batch32, name, severity, seed=7)
        assert out.shape == batch32.shape and out.dtype == batch32.dtype
        assert torch.isfinite(out).all()
        assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
        assert not torch.equal(out, batch32), f"{name} s{severity} changed nothing"
        again = corrupt(batch32, name, severity, seed=7)
        assert torch.equal(out, again), f"{name} s{severity}: same seed, different output"
        other = corrupt(batch32, name, severity, seed=8)
        if name in DETERMINISTIC:
            assert torch.equal(out, other)
        else:
            assert not torch.equal(out, other), f"{name} s{severity} ignores the seed"


def test_seed_none_draws_from_global_rng(batch32: torch.Tensor) -> None:
    torch.manual_seed(3)
    a = corrupt(batch32, "gaussian_noise", 3)
    torch.manual_seed(3)
    b = corrupt(batch32, "gaussian_noise", 3)
    c = corrupt(batch32, "gaussian_noise", 3)
    assert torch.equal(a, b) and not torch.equal(b, c)


def test_dtype_is_preserved(batch32: torch.Tensor) -> None:
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        out = corrupt(batch32.to(dtype), "contrast", 2)
        assert out.dtype == dtype
        assert torch.allclose(out.float(), corrupt(batch32, "contrast", 2), atol=1e-2)


def test_empty_batch() -> None:
    x = torch.zeros(0, 3, 32, 32)
    assert corrupt(x, "fog", 3, seed=0).shape == x.shape


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "gaussian"}, "valid names: gaussian_noise, shot_noise"),
        ({"severity": 0}, "severity"),
        ({"severity": 6}, "severity"),
        ({"severity": "3"}, "severity"),
        ({"severity": True}, "severity"),
        ({"images": torch.rand(3, 32, 32)}, r"shape \(B, 3, H, W\)"),
        ({"images": torch.rand(2, 1, 32, 32)}, r"shape \(B, 3, H, W\)"),
        ({"images": torch.rand(2, 3, 8, 32)}, "at least 16"),
        ({"images": torch.rand(2, 3, 32, 32) * 2}, r"\[0, 1\]"),
        ({"images": -torch.rand(2, 3, 32, 32)}, r"\[0, 1\]"),
        ({"images": torch.full((2, 3, 32, 32), float("nan"))}, r"\[0, 1\]"),
        ({"table": "tiny"}, "table"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs: dict, message: str) -> None:
    args = {"images": torch.rand(2, 3, 32, 32), "name": "fog", "severity": 3} | kwargs
    table = args.pop("table", "auto")
    with pytest.raises(ValueError, match=message):
        corrupt(args["images"], args["name"], args["severity"], table=table)


def test_bad_types_raise_clear_errors() -> None:
    with pytest.raises(TypeError, match="floating dtype"):
        corrupt(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), "fog", 1)
    with pytest.raises(TypeError, match="torch.Tensor"):
        corrupt(np.zeros((2, 3, 32, 32)), "fog", 1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="seed"):
        corrupt(torch.rand(2, 3, 32, 32), "fog", 1, seed=1.5)  # type: ignore[arg-type]


def test_table_selection_by_size() -> None:
    assert select_table(32, 32) == "cifar"
    assert select_table(64, 48) == "cifar"
    assert select_table(65, 65) == "imagenet"
    assert select_table(224, 224) == "imagenet"
    assert select_table(32, 32, "imagenet") == "imagenet"
    x = natural_images(32)[:2]
    auto = corrupt(x, "contrast", 5)
    assert torch.equal(auto, corrupt(x, "contrast", 5, table="cifar"))
    assert not torch.equal(auto, corrupt(x, "contrast", 5, table="imagenet"))


def test_cpu_chunking_matches_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    # Chunks of 6 images: deterministic results must not depend on the chunking.
    from vpt_robust.corruptions import registry

    monkeypatch.setattr(registry, "CPU_CHUNK_VALUES", 6 * 3 * 96 * 96)
    x = torch.rand(40, 3, 96, 96)
    for name in ("contrast", "defocus_blur", "pixelate"):
        whole = corrupt(x, name, 3)
        parts = torch.cat([corrupt(x[i : i + 1], name, 3) for i in range(0, 40, 7)])
        assert torch.equal(whole[::7], parts), name


# Where the original tables do not grow the distortion (mean |corrupted - clean|) with severity.
# CIFAR-10-C: glass blur s1-s3 barely differ and s4 > s5; motion blur s3 = s4 (radius 6 -> 8
# at sigma 2 adds nothing visible); frost peaks at s3 (image weight falls faster than the frost
# weight rises); elastic *shrinks* its affine jitter from 2.56 to 0.96 px. ImageNet-C: glass s3 >
# s4, frost s3 > s4, snow s2 ~ s3, elastic s1-s2 are large affine warps (jitter 24 / 49 px)
# while s3-s5 are small local displacements; fog s3 and s4 share strength 2.5 (only the
# fractal's roughness differs), so their distortion ties.
NOT_MONOTONE = {
    "cifar": {
        "glass_blur": [(1, 2), (2, 3), (4, 5)],
        "motion_blur": [(3, 4)],
        "frost": [(3, 4), (4, 5)],
        "elastic_transform": "all",
    },
    "imagenet": {
        "glass_blur": [(3, 4)],
        "frost": [(3, 4)],
        "snow": [(2, 3)],
        "fog": [(3, 4)],
        "elastic_transform": [(2, 3)],
    },
}


@pytest.mark.parametrize(("size", "table"), [(32, "cifar"), (96, "imagenet")])
def test_distortion_grows_with_severity(size: int, table: str) -> None:
    x = natural_images(size)
    for name in CORRUPTIONS:
        dist = []
        for s in range(1, 6):
            outs = [corrupt(x, name, s, seed=r, table=table) for r in range(2)]
            dist.append(float(torch.stack([(o - x).abs().mean() for o in outs]).mean()))
        exceptions = NOT_MONOTONE[table].get(name, [])
        if exceptions == "all":
            continue
        for s in range(1, 5):
            if (s, s + 1) in exceptions:
                continue
            assert dist[s] > dist[s - 1], f"{name} ({table}): s{s + 1} {dist[s]} <= s{s} {dist}"
        if name != "elastic_transform":
            assert dist[4] > dist[0], f"{name} ({table}): {dist}"


def test_glass_source_map_matches_sequential_numpy_semantics() -> None:
    """The original's `x[h, w], x[h', w'] = x[h', w'], x[h, w]` on numpy rows (copy, not swap)."""
    rng = np.random.default_rng(0)
    for height, width, delta in ((12, 12, 1), (15, 11, 2), (20, 20, 4)):
        dy = rng.integers(-delta, delta, size=height * width)
        dx = rng.integers(-delta, delta, size=height * width)
        img = np.arange(height * width).reshape(height, width, 1).repeat(3, axis=2)
        for h in range(height - delta, delta, -1):
            for w in range(width - delta, delta, -1):
                k = h * width + w
                hp, wp = h + dy[k], w + dx[k]
                img[h, w], img[hp, wp] = img[hp, wp], img[h, w]
        ours = glass_source_map(
            torch.from_numpy(dy)[None], torch.from_numpy(dx)[None], height, width, delta
        )
        assert np.array_equal(ours[0].numpy(), img[..., 0].ravel())


def test_frost_textures_match_the_photo_statistics() -> None:
    for i in range(N_TEXTURES):
        tex = frost_texture(i)
        spec = _TEXTURES[i]
        assert tuple(tex.shape) == (3, *spec["size"])
        assert torch.equal(tex, frost_texture(i))
        for c in range(3):
            q = np.percentile(tex[c].numpy(), [1, 50, 99])
            ref = np.array(spec["quantiles"][c])[[1, 5, 9]]
            assert np.abs(q - ref).max() <= 3.0, (i, c, q, ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_for_deterministic_corruptions(batch32: torch.Tensor) -> None:
    for name in sorted(DETERMINISTIC - {"jpeg_compression"}):
        cpu = corrupt(batch32, name, 4)
        gpu = corrupt(batch32.cuda(), name, 4).cpu()
        assert torch.allclose(cpu, gpu, atol=1e-4), name
    for name in CORRUPTIONS:
        out = corrupt(batch32.cuda(), name, 5, seed=1)
        assert out.device.type == "cuda" and float(out.min()) >= 0 and float(out.max()) <= 1
        assert torch.equal(out, corrupt(batch32.cuda(), name, 5, seed=1))


def test_motion_blur_shift_and_fft_paths_agree() -> None:
    from vpt_robust.corruptions.filters import motion_blur

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 40, 37, generator=gen)
    for lo in (-45.0, -135.0):  # motion blur's and snow's angle ranges
        angles = torch.rand(4, generator=gen, dtype=torch.float64) * 90 + lo
        for radius, sigma in ((6, 1), (15, 8), (20, 15)):
            a = motion_blur(x, radius, sigma, angles, method="shifts")
            b = motion_blur(x, radius, sigma, angles, method="fft")
            assert torch.allclose(a, b, atol=1e-5)
            for method in ("shifts", "fft"):  # padding from the angle range, no device sync
                c = motion_blur(x, radius, sigma, angles, method, angle_range=(lo, lo + 90))
                assert torch.allclose(a, c, atol=1e-5)


def test_motion_extents_bound_the_offsets_of_any_angle_in_range() -> None:
    from vpt_robust.corruptions.filters import motion_extents, motion_offsets

    for lo, hi in ((-45.0, 45.0), (-135.0, -45.0), (10.0, 200.0)):
        angles = torch.linspace(lo, hi, 2001, dtype=torch.float64)
        for radius in (6, 15, 20):
            _, dy, dx = motion_offsets(radius, 3.0, angles, 10_000, 10_000)
            top, bottom, left, right = motion_extents(2 * radius + 1, (lo, hi))
            assert int(dy.max()) <= top and int(-dy.min()) <= bottom
            assert int(dx.max()) <= left and int(-dx.min()) <= right
            assert max(top, bottom, left, right) <= 2 * radius + 1


def test_grid_sampling_equals_tap_by_tap_boundary_handling() -> None:
    from vpt_robust.corruptions.filters import sample_bilinear, sample_bilinear_taps

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 20, 17, generator=gen, dtype=torch.float64)
    for spread in (0.5, 3.0, 40.0):  # 40 px: several reflections
        ys = (torch.rand(2, 9, 11, generator=gen, dtype=torch.float64) * 2 - 1) * spread + 10
        xs = (torch.rand(2, 9, 11, generator=gen, dtype=torch.float64) * 2 - 1) * spread + 8
        for mode in ("mirror", "reflect", "nearest"):
            a = sample_bilinear(x, torch.stack([xs, ys], dim=1), mode)
            assert torch.allclose(a, sample_bilinear_taps(x, ys, xs, mode), atol=1e-12)


def test_separable_filter_shift_and_matmul_paths_agree() -> None:
    from vpt_robust.corruptions.filters import gaussian_kernel1d, separable_filter

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 29, 34, generator=gen)
    for sigma in (0.7, 2.44, 6.0):
        weights = gaussian_kernel1d(sigma, 3.0)
        for mode in ("nearest", "reflect", "mirror"):
            a = separable_filter(x, weights, mode, method="shifts")
            b = separable_filter(x, weights, mode, method="matmul")
            assert torch.allclose(a, b, atol=1e-5), (sigma, mode)
    with pytest.raises(ValueError, match="method: 'fft'"):
        separable_filter(x, gaussian_kernel1d(1.0), "nearest", method="fft")


def original_plasma_fractal(mapsize: int, decay: float, uniforms: np.ndarray) -> np.ndarray:
    """The original diamond-square (hendrycks/robustness) with its np.random.uniform draws
    replaced by `uniforms`, consumed level by level: squares, then the two diamond sets."""
    maparray = np.zeros((mapsize, mapsize))
    stepsize, wibble, used = mapsize, 100.0, 0

    def wibbledmean(array: np.ndarray) -> np.ndarray:
        nonlocal used
        u = uniforms[used : used + array.size].reshape(array.shape)
        used += array.size
        return array / 4 + wibble * (u * 2 * wibble - wibble)

    while stepsize >= 2:
        half = stepsize // 2
        cornerref = maparray[0:mapsize:stepsize, 0:mapsize:stepsize]
        squareaccum = cornerref + np.roll(cornerref, shift=-1, axis=0)
        squareaccum += np.roll(squareaccum, shift=-1, axis=1)
        maparray[half:mapsize:stepsize, half:mapsize:stepsize] = wibbledmean(squareaccum)
        drgrid = maparray[half:mapsize:stepsize, half:mapsize:stepsize]
        ulgrid = maparray[0:mapsize:stepsize, 0:mapsize:stepsize]
        ltsum = drgrid + np.roll(drgrid, 1, axis=0) + ulgrid + np.roll(ulgrid, -1, axis=1)
        maparray[0:mapsize:stepsize, half:mapsize:stepsize] = wibbledmean(ltsum)
        ttsum = drgrid + np.roll(drgrid, 1, axis=1) + ulgrid + np.roll(ulgrid, -1, axis=0)
        maparray[half:mapsize:stepsize, 0:mapsize:stepsize] = wibbledmean(ttsum)
        stepsize //= 2
        wibble /= decay
    maparray -= maparray.min()
    return maparray / maparray.max()


def test_plasma_fractal_matches_the_original_diamond_square() -> None:
    from vpt_robust.corruptions.weather import plasma_fractal, plasma_uniforms

    for mapsize, decay in ((2, 3.0), (16, 2.0), (64, 1.4)):
        gen = torch.Generator().manual_seed(mapsize)
        ours = plasma_fractal(2, mapsize, decay, gen, torch.device("cpu"))
        gen = torch.Generator().manual_seed(mapsize)
        draws = plasma_uniforms(2, mapsize, gen, torch.device("cpu")).double().numpy()
        for i in range(2):
            ref = original_plasma_fractal(mapsize, decay, draws[i])
            np.testing.assert_allclose(ours[i].numpy(), ref, atol=2e-4)


def test_jpeg_threads_give_the_same_bytes_as_one_thread(batch32: torch.Tensor) -> None:
    from vpt_robust.corruptions.digital import jpeg_roundtrip_cpu

    one = jpeg_roundtrip_cpu(batch32, 20, workers=1)
    assert one.shape == batch32.shape and one.dtype == torch.float32
    assert torch.equal(one * 255, (one * 255).round())  # decoded 8-bit values
    assert torch.equal(one, jpeg_roundtrip_cpu(batch32, 20, workers=3))
    assert torch.equal(one, jpeg_roundtrip_cpu(batch32, 20, workers=8))


@pytest.mark.parametrize(("height", "width"), [(32, 32), (224, 224), (37, 45), (61, 100)])
def test_pixelate_matches_pil_box_resizes_exactly(height: int, width: int) -> None:
    from PIL import Image

    from vpt_robust.corruptions.digital import pixelate

    img = np.random.default_rng(height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    factors = PARAMS["pixelate"]["cifar"] + PARAMS["pixelate"]["imagenet"] + (0.13,)
    for factor in factors:
        small = (max(int(width * factor), 1), max(int(height * factor), 1))
        pil = Image.fromarray(img).resize(small, Image.BOX).resize((width, height), Image.BOX)
        ours = (pixelate(x, factor, None)[0].permute(1, 2, 0) * 255).round().to(torch.uint8)
        assert np.array_equal(ours.numpy(), np.asarray(pil)), f"{height}x{width} at {factor}"


def test_box_downscaling_with_and_without_the_transposed_copy_agree() -> None:
    from vpt_robust.corruptions.digital import _box_down_pil

    x = torch.rand(2, 3, 45, 61, generator=torch.Generator().manual_seed(0))
    for height, width in ((37, 19), (11, 53), (45, 30)):
        rows = _box_down_pil(x, height, width, transpose=True)
        assert rows.shape == (2, 3, height, width) and rows.is_contiguous()
        assert torch.equal(rows, _box_down_pil(x, height, width, transpose=False))


def test_box_upscaling_falls_back_where_nearest_exact_is_not_pil() -> None:
    from vpt_robust.corruptions.digital import _box_up, _box_up_index, _nearest_exact_is_pil

    # 24 -> 37: (18 + 0.5) * 24 / 37 is 12 (PIL's float64) but lands just under 12 in float32.
    assert _box_up_index(24, 37)[18] == 12 and not _nearest_exact_is_pil(24, 37, "cpu")
    assert _nearest_exact_is_pil(89, 224, "cpu")
    small = torch.rand(2, 3, 24, 89)
    up = _box_up(small, 37, 224)
    rows, cols = torch.from_numpy(_box_up_index(24, 37)), torch.from_numpy(_box_up_index(89, 224))
    assert torch.equal(up, small[:, :, rows][..., cols])


def test_contrast_stays_in_range_without_clipping() -> None:
    from vpt_robust.corruptions.digital import contrast

    x = torch.zeros(3, 3, 16, 16)
    x[0] = 1.0  # channels at the top of the range: the sum must round to at most 1
    x[1, :, ::2] = 1.0  # half 0, half 1
    x[2] = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    factors = torch.rand(2000, generator=torch.Generator().manual_seed(1)).tolist()
    for factor in factors + list(PARAMS["contrast"]["cifar"] + PARAMS["contrast"]["imagenet"]):
        y = contrast(x, factor, None)
        assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0, factor
    means = x.mean(dim=(2, 3), keepdim=True)
    assert torch.allclose(contrast(x, 0.3, None), 0.3 * x + 0.7 * means, atol=1e-6)
    assert float(contrast(x * 3 - 1, 2.0, None).max()) == 1.0  # outside [0, 1]: clipped


def test_frost_crop_views_and_gather_agree(batch32: torch.Tensor) -> None:
    from vpt_robust.corruptions.weather import blend_crops

    gen = torch.Generator().manual_seed(0)
    stack = torch.rand(3, 3, 50, 60, generator=gen) * 255
    idx = torch.tensor([0, 2, 1, 2])
    y0, x0 = torch.tensor([0, 18, 5, 11]), torch.tensor([28, 0, 3, 17])
    views = blend_crops(batch32, stack, idx, y0, x0, 0.7, 0.7 / 255, method="views")
    gather = blend_crops(batch32, stack, idx, y0, x0, 0.7, 0.7 / 255, method="gather")
    assert torch.allclose(views, gather, atol=1e-6)
    crop = stack[2, :, 18:50, 0:32]
    assert torch.allclose(views[1], (0.7 * batch32[1] + crop * 0.7 / 255).clamp(0, 1), atol=1e-6)
    with pytest.raises(ValueError, match="method: 'loop'"):
        blend_crops(batch32, stack, idx, y0, x0, 0.7, 0.1, method="loop")


FUSED_CHECK = """
import torch
from vpt_robust.corruptions import fused
from vpt_robust.corruptions.weather import normalize_maps, plasma_from_uniforms, plasma_uniforms

gen = torch.Generator().manual_seed(0)
for mapsize, decay in ((2, 3.0), (16, 2.0), (64, 1.4)):
    u = plasma_uniforms(3, mapsize, gen, torch.device("cpu"))
    ours, ref = fused.plasma_map(u, mapsize, decay), plasma_from_uniforms(u, mapsize, decay)
    assert ours.shape == ref.shape == (3, mapsize, mapsize)
    assert float((ours - ref).abs().max()) <= 1e-6 * float(ref.abs().max()), mapsize
x = torch.rand(3, 3, 40, 50, generator=gen)
maps = plasma_from_uniforms(plasma_uniforms(3, 64, gen, torch.device("cpu")), 64, 1.7)
haze = normalize_maps(maps)[:, None, :40, :50]
top = x.amax(dim=(1, 2, 3), keepdim=True)
ref = torch.add(x, haze, alpha=1.5).mul_(top / (top + 1.5)).clamp_(0, 1)
assert float((fused.fog_blend(x, maps, 1.5) - ref).abs().max()) < 1e-6
print("fused kernels match")
"""


def test_fused_fog_kernels_match_the_eager_code() -> None:
    """The Triton kernels that fog uses on CUDA, run in Triton's interpreter on CPU tensors."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-c", FUSED_CHECK], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "fused kernels match" in done.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fog_fused_kernels_match_the_eager_code() -> None:
    from vpt_robust.corruptions import fused
    from vpt_robust.corruptions.weather import plasma_from_uniforms, plasma_uniforms

    assert fused.available(torch.device("cuda"))
    gen = torch.Generator(device="cuda").manual_seed(0)
    u = plasma_uniforms(8, 256, gen, torch.device("cuda"))
    ours, ref = fused.plasma_map(u, 256, 1.7), plasma_from_uniforms(u, 256, 1.7)
    assert float((ours - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    x = natural_images(224).cuda()
    out = corrupt(x, "fog", 3, seed=1)
    assert torch.equal(out, corrupt(x, "fog", 3, seed=1))
    assert float(out.min()) >= 0 and float(out.max()) <= 1


def test_fused_kernels_can_be_disabled_with_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    from vpt_robust.corruptions import fused

    monkeypatch.setattr(fused, "_FAILED", None)
    with pytest.warns(RuntimeWarning, match="fused corruption kernels disabled.*no compiler"):
        fused.disable(RuntimeError("no compiler"))
    assert not fused.available(torch.device("cuda"))
    assert not fused.available(torch.device("cpu"))


@pytest.mark.parametrize("mode", ["nearest", "reflect", "mirror"])
def test_boundary_padding_equals_gathering_every_position(mode: str) -> None:
    from vpt_robust.corruptions.filters import boundary_index, pad_boundary

    x = torch.rand(2, 3, 9, 12, generator=torch.Generator().manual_seed(0))
    for dim, radius in ((-1, 4), (-2, 3), (-1, 11), (-2, 20)):  # up to several reflections
        n = x.shape[dim]
        idx = boundary_index(torch.arange(-radius, n + radius), n, mode)
        assert torch.equal(pad_boundary(x, radius, dim, mode), x.index_select(dim, idx))
