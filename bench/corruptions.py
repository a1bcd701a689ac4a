"""Throughput of our batched corruptions vs the reference `imagecorruptions` package.

Per corruption and image size, in one run on the same images (real photos from scikit-image,
resized): images/s of `vpt_robust.corruptions.corrupt` on a batch (CPU or CUDA) and of
`imagecorruptions.corrupt` per image on one CPU core (numpy/OpenCV/BLAS threads pinned to 1),
and their ratio. Both use the same parameter table (ImageNet-C, the only one imagecorruptions
has) unless --table says otherwise. The reference's glass_blur and fog run through the same
compatibility shims as the fidelity tests (its code unchanged). Severity 3 by default.

Each row also gives a bound on the ratio, measured in the same run on the same batch and
device: images/s of `x.clone()` (one read and one fresh write, which every corruption needs at
least), or, where slower, of the part of the corruption no implementation on this stack avoids:
its random draws from torch's generator (noises, snow, fog, elastic) or the JPEG codec calls
alone. Where the bound is below a target, the target is out of reach on that machine.

    python bench/corruptions.py --device cpu --sizes 32 224 --batch 256 32
    python bench/corruptions.py --device cuda --sizes 32 224 --batch 12544 256

(On CPU the bench fixes glibc's mmap/trim thresholds (`vpt_robust.utils.keep_freed_memory`,
as jemalloc or tcmalloc would) for ours and the reference alike: with glibc's adaptive defaults
freed temporaries are sometimes unmapped and page-faulted in again on every call, and a
memory-bound corruption ran at one of two speeds, 2.5x apart, depending on the process.
--glibc-malloc keeps the defaults.)

Writes a JSON file (--out) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from vpt_robust.corruptions import CORRUPTIONS, corrupt, select_table
from vpt_robust.corruptions.digital import to_uint8
from vpt_robust.corruptions.draws import parallel_draws, rand, randn
from vpt_robust.corruptions.tables import params_for
from vpt_robust.data.images import sample_photos
from vpt_robust.utils import keep_freed_memory


def load_reference() -> Callable[..., np.ndarray]:
    """imagecorruptions.corrupt, made importable/runnable on current NumPy and scikit-image."""
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        stub = types.ModuleType("pkg_resources")

        def resource_filename(package: str, name: str) -> str:
            return os.path.join(os.path.dirname(sys.modules[package].__file__), name)

        stub.resource_filename = resource_filename  # type: ignore[attr-defined]
        sys.modules["pkg_resources"] = stub
    if not hasattr(np, "float_"):
        np.float_ = np.float64  # type: ignore[attr-defined]
    import imagecorruptions.corruptions as icc
    import skimage.filters
    from imagecorruptions import corrupt as ic_corrupt

    gaussian = skimage.filters.gaussian

    def gaussian_compat(*args, multichannel=None, **kwargs):
        if multichannel:
            kwargs["channel_axis"] = -1
        return gaussian(*args, **kwargs)

    icc.gaussian = gaussian_compat
    return ic_corrupt


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_batched(fn: Callable[[int], object], device: torch.device, batch: int, min_time: float,
                 max_reps: int) -> float:  # fmt: skip
    """Images/s of fn(rep) on a batch of `batch` images, after one warm-up call."""
    fn(0)
    sync(device)
    reps, start = 0, time.perf_counter()
    while True:
        fn(reps + 1)
        reps += 1
        sync(device)
        elapsed = time.perf_counter() - start
        if elapsed >= min_time or reps >= max_reps:
            return reps * batch / elapsed


def time_ours(
    x: torch.Tensor, name: str, severity: int, table: str, min_time: float, max_reps: int
) -> float:
    """Images/s of one batched call (warm-up first: kernels, caches, textures)."""

    def call(rep: int) -> object:
        return corrupt(x, name, severity, seed=rep, table=table)

    return time_batched(call, x.device, len(x), min_time, max_reps)


def time_clone(x: torch.Tensor, min_time: float, max_reps: int) -> float:
    """Images/s of `x.clone()`: one read and one freshly allocated write of the batch.

    Every corruption must at least read its input and return a new batch, so no float32
    implementation can beat this on the same device; clone / reference bounds the ratio.
    """
    return time_batched(lambda rep: x.clone(), x.device, len(x), min_time, max_reps * 10)


def floor_call(
    x: torch.Tensor, name: str, severity: int, table: str
) -> tuple[str, Callable] | None:
    """The part of a corruption no implementation on this stack avoids, as (kind, fn(rep)).

    "draws": its random numbers from torch's generators on this device, one per core on CPU
    (`parallel_draws`): the noises need one draw per value, fog one per fractal point, snow and
    elastic one per pixel of their layers.
    "codec": the JPEG encoder and decoder calls alone (the same library ours calls), on
    8-bit images, in as many threads as ours uses. None where the floor is the clone bound.
    """
    b, _, h, w = x.shape
    device = x.device
    p = params_for(name, severity, select_table(h, w, table))
    gen = torch.Generator(device=device)

    def draw(shape: tuple[int, ...], kind: str = "rand") -> Callable[[int], object]:
        sample = randn if kind == "randn" else rand
        return lambda rep: sample(shape, gen.manual_seed(rep), device)

    if name == "gaussian_noise":
        return "draws", draw(tuple(x.shape), "randn")
    if name == "shot_noise":
        lam, counts = x * float(p), torch.empty_like(x)

        def poisson(rows: slice, g: torch.Generator) -> None:
            counts[rows] = torch.poisson(lam[rows], generator=g)

        return "draws", lambda rep: parallel_draws(counts, gen.manual_seed(rep), poisson)
    if name == "impulse_noise":
        return "draws", draw(tuple(x.shape))
    if name == "snow":
        return "draws", draw((b, 1, h, w), "randn")
    if name == "fog":
        mapsize = 1 << (max(h, w) - 1).bit_length()
        return "draws", draw((b, mapsize * mapsize - 1))
    if name == "elastic_transform":
        return "draws", draw((b, 2, h, w))
    if name == "jpeg_compression":
        return "codec", jpeg_codec_call(x, int(p))
    return None


def jpeg_codec_call(x: torch.Tensor, quality: int) -> Callable[[int], object]:
    """encode_jpeg + decode_jpeg on the batch as 8-bit images, as `jpeg_compression` calls them."""
    from concurrent.futures import ThreadPoolExecutor

    from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

    images = list(to_uint8(x).unbind(0))
    if x.device.type == "cuda":

        def roundtrip(rep: int) -> object:
            encoded = encode_jpeg(images, quality=quality)
            sizes = [int(e.numel()) for e in encoded]
            host = list(torch.cat(encoded).cpu().split(sizes))
            return decode_jpeg(host, mode=ImageReadMode.RGB, device=x.device)

        return roundtrip
    workers = max(1, torch.get_num_threads())
    chunks = [images[i::workers] for i in range(workers)]
    pool = ThreadPoolExecutor(workers)

    def chunk(part: list[torch.Tensor]) -> object:
        return decode_jpeg(encode_jpeg(part, quality=quality), mode=ImageReadMode.RGB)

    return lambda rep: [f.result() for f in [pool.submit(chunk, part) for part in chunks]]


def time_reference(
    ic_corrupt: Callable[..., np.ndarray], imgs: np.ndarray, name: str, severity: int,
    min_time: float, max_images: int,
) -> float:  # fmt: skip
    """Images/s of the per-image reference on one core, after one warm-up image."""
    np.random.seed(0)
    ic_corrupt(imgs[0], corruption_name=name, severity=severity)
    count, start = 0, time.perf_counter()
    while True:
        ic_corrupt(imgs[count % len(imgs)], corruption_name=name, severity=severity)
        count += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_time or count >= max_images:
            return count / elapsed


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--batch",
        type=int,
        nargs="+",
        default=[32],
        help="batch size for ours: one for all sizes, or one per --sizes entry",
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 224])
    parser.add_argument("--severity", type=int, default=3)
    parser.add_argument("--corruptions", nargs="+", default=list(CORRUPTIONS))
    parser.add_argument("--table", default="imagenet", choices=["imagenet", "cifar", "auto"])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads for ours")
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds per measurement")
    parser.add_argument("--max-reps", type=int, default=50, help="max batched calls (ours)")
    parser.add_argument("--max-ref-images", type=int, default=200)
    parser.add_argument("--out", default=None, help="JSON path (default outputs/bench/...)")
    parser.add_argument(
        "--glibc-malloc", action="store_true", help="keep glibc's adaptive malloc thresholds"
    )
    args = parser.parse_args(argv)
    malloc_fixed = False if args.glibc_malloc else keep_freed_memory()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here")
    ic_corrupt = load_reference()
    import cv2
    from threadpoolctl import threadpool_limits

    if len(args.batch) not in (1, len(args.sizes)):
        parser.error(f"--batch: give 1 value or {len(args.sizes)} (one per size)")
    batches = dict(zip(args.sizes, args.batch * len(args.sizes), strict=False))
    rows = []
    for size in args.sizes:
        imgs = sample_photos(size, batches[size])
        x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div(255.0).to(device)
        x = x.contiguous()
        torch.set_num_threads(args.threads)
        clone = time_clone(x, args.min_time, args.max_reps)
        print(f"clone (bound)      {size:4d}px  {clone:10.1f} img/s", flush=True)
        for name in args.corruptions:
            torch.set_num_threads(args.threads)
            cv2.setNumThreads(max(args.threads, 1))
            ours = time_ours(x, name, args.severity, args.table, args.min_time, args.max_reps)
            floor = floor_call(x, name, args.severity, args.table)
            floor_kind, floor_rate = "clone", clone
            if floor is not None:
                rate = time_batched(floor[1], device, len(x), args.min_time, args.max_reps)
                if rate < clone:
                    floor_kind, floor_rate = floor[0], rate
            torch.set_num_threads(1)
            cv2.setNumThreads(1)
            with threadpool_limits(limits=1):
                ref = time_reference(
                    ic_corrupt, imgs, name, args.severity, args.min_time, args.max_ref_images
                )
            rows.append(
                {
                    "corruption": name,
                    "size": size,
                    "batch": batches[size],
                    "ours_img_s": ours,
                    "reference_img_s": ref,
                    "ratio": ours / ref,
                    "clone_img_s": clone,
                    "bound_ratio": clone / ref,
                    "floor_kind": floor_kind,
                    "floor_img_s": floor_rate,
                    "floor_ratio": floor_rate / ref,
                }
            )
            print(
                f"{name:18s} {size:4d}px  ours {ours:10.1f} img/s  reference {ref:8.1f} img/s"
                f"  x{ours / ref:8.1f}  (bound x{clone / ref:.0f}, floor x{floor_rate / ref:.1f}"
                f" {floor_kind})",
                flush=True,
            )
    result = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads_ours": args.threads if device.type == "cpu" else None,
        "threads_reference": 1,
        "malloc_thresholds_fixed": malloc_fixed,
        "batch": batches,
        "severity": args.severity,
        "table": args.table,
        "rows": rows,
    }  # fmt: skip
    out = Path(args.out or f"outputs/bench/corruptions_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print_table(result)
    print(f"\nwritten: {out}")
    return result


def print_table(result: dict) -> None:
    sizes = sorted({r["size"] for r in result["rows"]})
    names = list(dict.fromkeys(r["corruption"] for r in result["rows"]))
    by = {(r["corruption"], r["size"]): r for r in result["rows"]}
    print(
        f"\nimages/s, severity {result['severity']}, table {result['table']}, "
        f"ours on {result['device']} (batch {result['batch']}) vs imagecorruptions (1 core)"
    )
    print(
        "bound: the most ours could reach over the reference: x.clone() (one read + one new "
        "write of the batch), or the corruption's random draws or codec calls alone where slower"
    )
    header = "| corruption | " + " | ".join(
        f"ours {s}px | ref {s}px | ratio {s}px | bound {s}px" for s in sizes
    )
    print(header + " |")
    print("|" + " --- |" * (1 + 4 * len(sizes)))
    for n in names:
        cells = []
        for s in sizes:
            r = by.get((n, s))
            cells += (
                [
                    f"{r['ours_img_s']:.0f}",
                    f"{r['reference_img_s']:.0f}",
                    f"{r['ratio']:.1f}x",
                    f"{r['floor_ratio']:.{0 if r['floor_ratio'] >= 100 else 1}f}x {r['floor_kind']}",
                ]
                if r
                else ["-"] * 4
            )
        print(f"| {n} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
