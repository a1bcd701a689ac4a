"""Benchmark: our PGD against torchattacks' PGD on the same model, batch and settings.

Reports images/s and robust accuracy of both and their ratio, and the bound that a PGD-k can
reach on this hardware: k forward+backward passes per image, so `batch / (k * t_fwd_bwd)`
images/s, with t_fwd_bwd one input-gradient pass of the same model at the same batch and
precision (measured as k passes queued back to back, divided by k; the single synced pass is
reported too). Prints one JSON line, then a readable table.

    .venv/bin/python bench/attacks.py --device cpu --model tiny --batch 64 --steps 10
    python bench/attacks.py --device cuda --model vit_b_16 --batch 128 --steps 10 --amp bf16

Labels are the model's own clean predictions, so clean accuracy is 100% and robust accuracy
measures the attack alone (the ViTs are randomly initialised: only their speed is real).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vpt_robust.attacks.autoattack import autoattack  # noqa: E402
from vpt_robust.attacks.pgd import default_alpha, input_gradient, pgd, robust_accuracy  # noqa: E402

CLASSES = ["airplane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
OPEN_CLIP_NAMES = {"vit_b_32": "ViT-B-32", "vit_b_16": "ViT-B-16"}


class TinyNet(nn.Module):
    """A small 32 px CNN with normalisation inside, standing in for the embedded tiny model."""

    def __init__(self, n_classes: int = 10) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.48, 0.46, 0.41]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.27, 0.26, 0.28]).view(1, 3, 1, 1))
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 128, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(128, n_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body((x - self.mean) / self.std)


class ClipZeroShot(nn.Module):
    """open_clip image tower + a zero-shot head over fixed class text features; [0,1] inputs."""

    def __init__(self, clip: nn.Module, text_features: torch.Tensor, mean, std) -> None:
        super().__init__()
        self.clip = clip
        self.register_buffer("text", F.normalize(text_features, dim=-1))
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        self.scale = float(clip.logit_scale.detach().exp())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = F.normalize(self.clip.encode_image((x - self.mean) / self.std), dim=-1)
        return self.scale * feats @ self.text.to(feats.dtype).t()


def prototype_data(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """10 classes of smooth colour prototypes plus heavy noise: learnable in seconds, and a
    trained model on it has margins that an eps of a few /255 can cross."""
    protos = torch.rand(10, 3, size // 4, size // 4, generator=torch.Generator().manual_seed(99))
    protos = F.interpolate(protos, size=(size, size), mode="bilinear", align_corners=False)
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    return (protos[labels] + 0.5 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1), labels


def train_tiny(model: nn.Module, steps: int = 150) -> None:
    """A few seconds of Adam on prototype data, so robust accuracy is neither 0 nor 1."""
    images, labels = prototype_data(steps * 32, 32, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for i in range(steps):
        sl = slice(i * 32, (i + 1) * 32)
        loss = F.cross_entropy(model(images[sl]), labels[sl])
        opt.zero_grad()
        loss.backward()
        opt.step()


def build_model(name: str, device: torch.device) -> tuple[nn.Module, int]:
    """The model under test (frozen, eval mode) and its input size."""
    torch.manual_seed(0)
    if name == "tiny":
        model, size = TinyNet(), 32
        train_tiny(model)
    else:
        import open_clip

        clip = open_clip.create_model(OPEN_CLIP_NAMES[name], pretrained=None)
        tokenizer = open_clip.get_tokenizer(OPEN_CLIP_NAMES[name])
        with torch.no_grad():
            text = clip.encode_text(tokenizer([f"a photo of a {c}." for c in CLASSES]))
        size = clip.visual.image_size
        size = size[0] if isinstance(size, tuple | list) else size
        model = ClipZeroShot(
            clip, text, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
        )
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, size


class Autocast(nn.Module):
    """Runs a model under autocast and returns fp32 logits (to give torchattacks the same precision)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = (
            torch.autocast(device_type=x.device.type, dtype=self.dtype)
            if self.dtype
            else contextlib.nullcontext()
        )
        with ctx:
            return self.model(x).float()


def smooth_images(n: int, size: int, device: torch.device) -> torch.Tensor:
    """Natural-ish test images: smoothed noise blobs in [0,1] (never zeros, never pure noise)."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, 3, size // 4, size // 4, generator=g)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x + 0.05 * torch.randn(n, 3, size, size, generator=g)
    return x.clamp(0, 1).to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(
    fns: dict[str, Callable[[], object]], device: torch.device, warmup: int, repeats: int
) -> dict[str, float]:
    """Median wall time of each fn, device work included. The fns take turns within every
    repeat, so a load change on a shared machine hits all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def robust_acc(model: nn.Module, adv: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(adv).argmax(1) == labels).float().mean())


class _Stamp(torch.autograd.Function):
    """Identity whose backward appends a timestamp: placed at a model's input and output, the
    two stamps bracket the model's own backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, log: list) -> torch.Tensor:  # noqa: ANN001
        ctx.log = log
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        ctx.log.append(time.perf_counter())
        return grad, None


class ModelClock(nn.Module):
    """Accumulates the wall time spent inside the model, forward and backward (CPU: no sync
    needed), and the number of images it saw, so an attack's non-model overhead is measured."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.seconds, self.images, self.grad_images = 0.0, 0, 0
        self._bwd: list[list[float]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        self.images += x.shape[0]
        if torch.is_grad_enabled() and x.requires_grad:
            log: list[float] = []
            self._bwd.append(log)
            self.grad_images += x.shape[0]
            out = _Stamp.apply(self.model(_Stamp.apply(x, log)), log)
        else:
            out = self.model(x)
        self.seconds += time.perf_counter() - t0
        return out

    def total(self) -> float:
        """Forward seconds plus every finished backward's seconds."""
        bwd = sum(log[1] - log[0] for log in self._bwd if len(log) == 2)
        return self.seconds + bwd


def early_exit_section(model, images, labels, *, eps, steps, batch, repeats, device) -> dict:
    """robust_accuracy with and without early exit on the same samples: effective img/s
    (images evaluated / time) against the full attack's compute bound, and robust accuracy."""
    kwargs = {"eps": eps, "steps": steps, "batch_size": batch, "device": device, "seed": 0}
    fns = {
        "early": lambda: robust_accuracy(model, (images, labels), **kwargs),
        "full": lambda: robust_accuracy(model, (images, labels), early_exit=False, **kwargs),
        "k_fwd_bwd": lambda: [
            input_gradient(model, images[s : s + batch], labels[s : s + batch])
            for s in range(0, images.shape[0], batch)
            for _ in range(steps)
        ],
    }
    med = interleaved_medians(fns, device, warmup=0, repeats=repeats)
    e_clock, f_clock = ModelClock(model), ModelClock(model)
    early = robust_accuracy(e_clock, (images, labels), **kwargs)
    full = robust_accuracy(f_clock, (images, labels), early_exit=False, **kwargs)
    n = images.shape[0]
    bound = n / med["k_fwd_bwd"]  # every step on every image: the full attack's compute bound
    return {
        "n": n,
        "eps": eps,
        "steps": steps,
        "bound_img_s": bound,
        "full_img_s": n / med["full"],
        "early_img_s": n / med["early"],
        "early_over_bound": (n / med["early"]) / bound,
        "early_over_full": med["full"] / med["early"],
        "full_robust_accuracy": full.robust_accuracy,
        "early_robust_accuracy": early.robust_accuracy,
        "early_never_above_full": bool(not (early.robust_correct & ~full.robust_correct).any()),
        # The work each run pays: images through fwd+bwd. Their ratio is what early exit can
        # reach at best on this model, eps and step size (each broken sample must still walk to
        # its first fooling iterate).
        "full_fwd_bwd_images": f_clock.grad_images,
        "early_fwd_bwd_images": e_clock.grad_images,
        "work_ratio": f_clock.grad_images / max(e_clock.grad_images, 1),
    }


def autoattack_section(model, images, labels, *, eps, batch, device, ours_first) -> dict:
    """AutoAttack (standard) ours vs pyautoattack's own `run_standard_evaluation` on the same
    samples: time, robust acc, per-sample agreement, each run's share of time in the model,
    and the samples each attack received in the library's own run (survivors only?). Both run
    behind the same ModelClock (same overhead), in the order `ours_first` says."""
    from pyautoattack import AutoAttack

    ref_clock, ours_clock = ModelClock(model), ModelClock(model)
    ref = AutoAttack(ref_clock, norm="Linf", eps=eps, version="standard", seed=0, device=device)
    ref.verbose = False
    received: dict[str, int] = {}
    for name, atk in (("apgd-ce", ref.apgd), ("apgd-t", ref.apgd_targeted),
                      ("fab-t", ref.fab), ("square", ref.square)):  # fmt: skip
        original = atk.perturb

        def counted(x, *a, _o=original, _n=name, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
            received[_n] = received.get(_n, 0) + x.shape[0]
            return _o(x, *a, **k)

        atk.perturb = counted
    out: dict = {}

    def run_ref() -> None:
        t0 = time.perf_counter()
        out["y_adv"] = ref.run_standard_evaluation(images, labels, batch_size=batch)[1]
        out["t_ref"] = time.perf_counter() - t0

    def run_ours() -> None:
        t0 = time.perf_counter()
        out["ours"] = autoattack(
            ours_clock, images, labels, eps=eps, batch_size=batch, chunk_size=images.shape[0],
            device=device, seed=0,
        )  # fmt: skip
        out["t_ours"] = time.perf_counter() - t0

    for fn in (run_ours, run_ref) if ours_first else (run_ref, run_ours):
        fn()
    with torch.no_grad():
        clean = model(images).argmax(1) == labels
    theirs = clean & (out["y_adv"] == labels)
    ours, t_ref, t_ours = out["ours"], out["t_ref"], out["t_ours"]
    return {
        "eps": eps,
        "n": images.shape[0],
        "clean_accuracy": float(clean.float().mean()),
        "pyautoattack_s": t_ref,
        "ours_s": t_ours,
        "speedup": t_ref / t_ours,
        "ours_first": ours_first,
        "pyautoattack_robust_accuracy": float(theirs.float().mean()),
        "ours_robust_accuracy": ours.robust_accuracy,
        "per_sample_equal": bool(torch.equal(ours.robust_correct, theirs)),
        "model_share_of_pyautoattack_time": ref_clock.total() / t_ref,
        "model_share_of_ours_time": ours_clock.total() / t_ours,
        "model_forwards": {"pyautoattack": ref_clock.images, "ours": ours_clock.images},
        "samples_received_per_attack": received,
    }


def model_side_speedups(model, images, labels, *, batch, repeats, device) -> dict:
    """fwd+bwd time of the model as it is, in channels-last, and under torch.compile (CPU: the
    candidates for a faster model side that leave the logits' argmax unchanged)."""
    x, y = images[:batch], labels[:batch]
    variants = {"as_is": (model, x)}
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    variants["channels_last"] = (cl, x.contiguous(memory_format=torch.channels_last))
    variants["compile"] = (torch.compile(copy.deepcopy(model)), x)
    t0 = time.perf_counter()
    input_gradient(variants["compile"][0], x, y)
    compile_s = time.perf_counter() - t0
    fns = {k: (lambda m=m, xi=xi: input_gradient(m, xi, y)) for k, (m, xi) in variants.items()}
    med = interleaved_medians(fns, device, warmup=2, repeats=repeats)
    same = {}
    with torch.no_grad():
        ref = model(x).argmax(1)
        for k, (m, xi) in variants.items():
            same[k] = bool(torch.equal(m(xi).argmax(1), ref))
    return {
        "fwd_bwd_ms": {k: 1e3 * v for k, v in med.items()},
        "speedup": {k: med["as_is"] / v for k, v in med.items()},
        "argmax_unchanged": same,
        "compile_first_call_s": compile_s,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--model", default="tiny", choices=["tiny", "vit_b_32", "vit_b_16"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument(
        "--eps",
        type=float,
        default=None,
        help="default 4/255 (tiny), 0.05/255 (random-init ViTs: their margins are tiny, this "
        "leaves robust accuracy mid-range so the two attacks' accuracies can be compared)",
    )
    ap.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    ap.add_argument("--compile", default="none", choices=["none", "default", "reduce-overhead"])
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (house rule: <= 2 here)")
    ap.add_argument("--ee-n", type=int, default=512, help="samples for early exit vs full")
    ap.add_argument("--ee-eps", type=float, default=4 / 255)
    ap.add_argument("--aa-n", type=int, default=32, help="samples for AutoAttack (0: skip)")
    ap.add_argument("--aa-eps", default="1,4", help="AutoAttack eps values, in /255")
    args = ap.parse_args(argv)

    if args.steps < 1 or args.batch < 1:
        ap.error("--steps and --batch must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available on this machine")
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    eps = args.eps if args.eps is not None else (4 / 255 if args.model == "tiny" else 0.05 / 255)
    alpha = default_alpha(eps, args.steps)

    model, size = build_model(args.model, device)
    ours_model: nn.Module = model
    if args.compile != "none":
        ours_model = torch.compile(model, mode=None if args.compile == "default" else args.compile)
    if args.model == "tiny":
        images = prototype_data(args.batch, size, seed=1)[0].to(device)
    else:
        images = smooth_images(args.batch, size, device)
    with torch.no_grad():
        labels = model(images).argmax(1)

    import torchattacks

    peers = {"torchattacks": Autocast(model, amp)}
    if amp is not None:
        peers["torchattacks_fp32"] = model  # what a user of torchattacks gets by default
    gen = torch.Generator(device=device)

    def run_ours() -> torch.Tensor:
        gen.manual_seed(0)
        return pgd(
            ours_model, images, labels, eps=eps, alpha=alpha, steps=args.steps,
            amp_dtype=amp, generator=gen,
        )  # fmt: skip

    def fwd_bwd() -> torch.Tensor:
        return input_gradient(ours_model, images, labels, amp_dtype=amp)

    def k_fwd_bwd() -> None:
        # k passes queued back to back, as PGD-k queues them: a single synced pass would also
        # count the launch latency that PGD hides when the model is small enough to be
        # launch-bound (seen with ViT-B/32 at batch 128 on an H100).
        for _ in range(args.steps):
            fwd_bwd()

    attacks = {
        name: torchattacks.PGD(m, eps=eps, alpha=alpha, steps=args.steps, random_start=True)
        for name, m in peers.items()
    }
    fns: dict[str, Callable[[], object]] = {
        "fwd_bwd": fwd_bwd,
        "k_fwd_bwd": k_fwd_bwd,
        "ours": run_ours,
    }
    fns.update({name: (lambda atk=atk: atk(images, labels)) for name, atk in attacks.items()})
    if args.compile != "none":  # compilation happens on the first calls: keep it out of the timing
        for _ in range(2):
            fwd_bwd()
            run_ours()
    medians = interleaved_medians(fns, device, args.warmup, args.repeats)
    t_fb, t_ours = medians["k_fwd_bwd"] / args.steps, medians["ours"]
    acc_ours = robust_acc(model, run_ours(), labels)
    peer_stats = {}
    for name, atk in attacks.items():
        torch.manual_seed(0)  # the same random start as ours (same generator, same seed)
        peer_stats[name] = {
            "img_s": args.batch / medians[name],
            "robust_accuracy": robust_acc(model, atk(images, labels), labels),
        }

    bound = args.batch / (args.steps * t_fb)
    ours_ips = args.batch / t_ours
    record = {
        "bench": "attacks.pgd",
        "device": args.device,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "model": args.model,
        "image_size": size,
        "batch": args.batch,
        "steps": args.steps,
        "eps": eps,
        "alpha": alpha,
        "amp": args.amp,
        "compile": args.compile,
        "ours_img_s": ours_ips,
        "ours_robust_accuracy": acc_ours,
        "torchattacks_img_s": peer_stats["torchattacks"]["img_s"],
        "torchattacks_robust_accuracy": peer_stats["torchattacks"]["robust_accuracy"],
        "speedup_vs_torchattacks": ours_ips / peer_stats["torchattacks"]["img_s"],
        "fwd_bwd_s": t_fb,
        "fwd_bwd_single_synced_s": medians["fwd_bwd"],
        "fwd_bwd_img_s": args.batch / t_fb,
        "bound_img_s": bound,
        "fraction_of_bound": ours_ips / bound,
    }
    if "torchattacks_fp32" in peer_stats:
        record["torchattacks_fp32_img_s"] = peer_stats["torchattacks_fp32"]["img_s"]
        record["torchattacks_fp32_robust_accuracy"] = peer_stats["torchattacks_fp32"][
            "robust_accuracy"
        ]
        record["speedup_vs_torchattacks_fp32"] = ours_ips / peer_stats["torchattacks_fp32"]["img_s"]
    sections = extra_sections(args, model, size, device)
    record.update(sections)
    print(json.dumps(record))
    print_sections(sections)

    prec = args.amp if amp is not None else "fp32"
    print(
        f"\nPGD-{args.steps} {args.model} ({size}px) batch {args.batch} eps {eps:.5f} on "
        f"{record['device_name']}, {prec}, compile={args.compile}"
    )
    print(f"{'attack':<28}{'images/s':>12}{'robust acc':>12}{'vs torchattacks':>18}")
    print(
        f"{'ours (vpt_robust.pgd)':<28}{ours_ips:>12.1f}{acc_ours:>12.3f}{record['speedup_vs_torchattacks']:>17.2f}x"
    )
    for name, s in peer_stats.items():
        label = f"torchattacks PGD ({prec if name == 'torchattacks' else 'fp32'})"
        print(
            f"{label:<28}{s['img_s']:>12.1f}{s['robust_accuracy']:>12.3f}{ours_ips / s['img_s']:>17.2f}x"
        )
    print(
        f"bound: one fwd+bwd {t_fb * 1e3:.2f} ms ({args.batch / t_fb:.1f} img/s) -> PGD-{args.steps} "
        f"could reach {bound:.1f} img/s; ours reaches {100 * record['fraction_of_bound']:.1f}% of it"
    )
    return record


def extra_sections(args: argparse.Namespace, model: nn.Module, size: int, device) -> dict:
    """Early exit vs full PGD, the model-side speed-ups, AutoAttack ours vs pyautoattack."""
    out: dict = {}
    if args.model != "tiny":
        return out  # the random-init ViTs have no meaningful robust accuracy to compare
    images = prototype_data(args.ee_n, size, seed=2)[0].to(device)
    # True labels would leave clean mistakes out of the attack; the model's own predictions
    # keep all ee_n samples in it, as in the PGD comparison above.
    with torch.no_grad():
        labels = model(images).argmax(1)
    out["early_exit"] = early_exit_section(
        model, images, labels, eps=args.ee_eps, steps=args.steps, batch=args.batch,
        repeats=args.repeats, device=device,
    )  # fmt: skip
    out["model_side"] = model_side_speedups(
        model, images, labels, batch=args.batch, repeats=args.repeats, device=device
    )
    if args.aa_n > 0:
        x, y = prototype_data(args.aa_n, size, seed=3)
        out["autoattack"] = [
            autoattack_section(
                model,
                x.to(device),
                y.to(device),
                eps=float(e) / 255,
                batch=args.batch,
                device=device,
                ours_first=k % 2 == 0,
            )
            for k, e in enumerate(args.aa_eps.split(","))
        ]
    return out


def print_sections(sec: dict) -> None:
    """The readable table of the extra sections."""
    if "early_exit" in sec:
        e = sec["early_exit"]
        print(
            f"\nrobust_accuracy PGD-{e['steps']} on {e['n']} samples, eps {e['eps'] * 255:.0f}/255"
        )
        print(f"{'':<34}{'img/s':>10}{'robust acc':>12}")
        print(f"{'bound (every step, every image)':<34}{e['bound_img_s']:>10.1f}")
        print(f"{'full attack (early_exit=False)':<34}{e['full_img_s']:>10.1f}"
              f"{e['full_robust_accuracy']:>12.3f}")  # fmt: skip
        print(f"{'early exit (default)':<34}{e['early_img_s']:>10.1f}"
              f"{e['early_robust_accuracy']:>12.3f}")  # fmt: skip
        print(f"early exit / bound = {e['early_over_bound']:.2f}x, / full = "
              f"{e['early_over_full']:.2f}x; never above full: {e['early_never_above_full']}")  # fmt: skip
        print(f"fwd+bwd images: full {e['full_fwd_bwd_images']}, early {e['early_fwd_bwd_images']}"
              f" -> early exit's own bound {e['work_ratio']:.2f}x")  # fmt: skip
    if "model_side" in sec:
        m = sec["model_side"]
        print("\nmodel side, one fwd+bwd: " + ", ".join(
            f"{k} {m['fwd_bwd_ms'][k]:.2f} ms ({m['speedup'][k]:.2f}x, argmax same: "
            f"{m['argmax_unchanged'][k]})" for k in m["fwd_bwd_ms"]
        ) + f"; compile's first call {m['compile_first_call_s']:.1f} s")  # fmt: skip
    for a in sec.get("autoattack", []):
        print(f"\nAutoAttack standard, {a['n']} samples, eps {a['eps'] * 255:.0f}/255")
        print(f"{'':<16}{'seconds':>10}{'robust acc':>12}")
        print(f"{'pyautoattack':<16}{a['pyautoattack_s']:>10.1f}"
              f"{a['pyautoattack_robust_accuracy']:>12.3f}")  # fmt: skip
        print(f"{'ours':<16}{a['ours_s']:>10.1f}{a['ours_robust_accuracy']:>12.3f}")
        print(f"speed-up {a['speedup']:.2f}x; per-sample equal: {a['per_sample_equal']}; "
              f"model share of time: pyautoattack {100 * a['model_share_of_pyautoattack_time']:.0f}%, "
              f"ours {100 * a['model_share_of_ours_time']:.0f}%; images through the model: "
              f"{a['model_forwards']}; ran first: {'ours' if a['ours_first'] else 'pyautoattack'}; "
              f"samples each attack received: {a['samples_received_per_attack']}")  # fmt: skip


if __name__ == "__main__":
    main()
