"""AutoAttack (Croce & Hein, 2020) through the reference package `pyautoattack`, never rewritten.

What this module adds around it is speed and bookkeeping from the outside: only clean-correct
samples are attacked, in full batches; the model can run under bf16 autocast and
`torch.compile` on CUDA; the work is chunked and each chunk's per-sample flags are written to
a resume file, so a killed run picks up where it stopped. A sample counts as robust only if it
survives every attack of the version (worst case per sample, as AutoAttack defines it). The
standard version drives the library's loop from here, calling each attack's `perturb` on one
batch of survivors at a time: the flags equal the library's own run, its checks and clean
pass are not repeated per call, and the progress bar names the attack and counts samples.

`fast=True` swaps in torchattacks' re-implementation: measured on a CIFAR-10 ResNet-18 it is
~2.4x faster but leaves ~1 pt more robust accuracy, so its results are labelled
"autoattack-fast(torchattacks)" and must not be reported as AutoAttack.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vpt_robust.attacks import checks
from vpt_robust.attacks.pgd import (
    NORMS,
    RobustResult,
    _autocast,
    _check_batch,
    eval_mode,
    resolve_attack_device,
)
from vpt_robust.utils import progress_bar

VERSIONS = ("standard", "rand")
FAST_NAME = "autoattack-fast(torchattacks)"
_RESUME_FORMAT = 1


class _Logits(nn.Module):
    """Wraps a model so the attack packages see fp32 logits, computed under autocast if asked."""

    def __init__(self, model: nn.Module, amp_dtype: torch.dtype | None) -> None:
        super().__init__()
        self.model = model
        self.amp_dtype = amp_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with _autocast(x.device, self.amp_dtype):
            return self.model(x).float()


def attack_name(version: str, fast: bool) -> str:
    """The label every result of this configuration carries."""
    return FAST_NAME if fast else f"autoattack-{version}"


def _fingerprint(images: torch.Tensor, labels: torch.Tensor) -> str:
    """A cheap identity of the evaluated set, so a resume file is never applied to other data."""
    h = hashlib.sha256()
    h.update(str(tuple(images.shape)).encode())
    h.update(labels.detach().cpu().to(torch.int64).numpy().tobytes())
    sums = images.detach().flatten(1).double().sum(dim=1).cpu().numpy()
    h.update(sums.round(6).tobytes())
    return h.hexdigest()[:32]


def _load_resume(path: Path, config: dict[str, Any]) -> dict[str, dict[int, bool]]:
    state = {"clean": {}, "robust": {}}
    if not path.exists():
        return state
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"resume_path: {path} is not a valid resume file ({err})") from err
    if saved.get("config") != config:
        raise ValueError(
            f"resume_path: {path} was written for a different run; saved config "
            f"{saved.get('config')} != current {config}. Delete it or pass another path"
        )
    for key in ("clean", "robust"):
        state[key] = {int(k): bool(v) for k, v in saved.get(key, {}).items()}
    return state


def _save_resume(path: Path, config: dict[str, Any], state: dict[str, dict[int, bool]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    payload = {
        "format": _RESUME_FORMAT,
        "config": config,
        "clean": {str(k): int(v) for k, v in sorted(state["clean"].items())},
        "robust": {str(k): int(v) for k, v in sorted(state["robust"].items())},
    }
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)


def _check_in_ball(adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str, name: str) -> None:
    diff = (adv.detach().float() - x.detach().float()).flatten(1)
    size = diff.abs().amax(dim=1) if norm == "Linf" else diff.norm(p=2, dim=1)
    worst = float(size.max()) if size.numel() else 0.0
    lo, hi = float(adv.detach().min()), float(adv.detach().max())
    if worst > eps * (1 + 1e-4) + 1e-6 or lo < -1e-6 or hi > 1 + 1e-6:
        raise RuntimeError(
            f"{name} returned images outside the threat model: {norm} perturbation {worst:.6g} "
            f"> eps {eps:.6g} or pixels in [{lo:.4g}, {hi:.4g}]"
        )


def _check_settings(
    version: str, norm: str, eps: float, batch_size: int, chunk_size: int | None
) -> int:
    """Validate the attack settings; return the chunk size (default 8 batches)."""
    if version not in VERSIONS:
        raise ValueError(f"version: {version!r} is not one of {VERSIONS}")
    if norm not in NORMS:
        raise ValueError(f"norm: {norm!r} is not one of {NORMS}")
    if not (isinstance(eps, int | float) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps: {eps!r} must be a finite number > 0")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: {batch_size!r} must be an int >= 1")
    chunk_size = chunk_size or 8 * batch_size
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: {chunk_size!r} must be an int >= 1")
    return chunk_size


@torch.no_grad()
def _clean_pass(
    wrapped: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    state: dict[str, dict[int, bool]],
    batch_size: int,
    dev: torch.device,
) -> None:
    """Record clean correctness of every sample not yet in ``state`` (resumed ones skip)."""
    todo = [k for k in range(images.shape[0]) if k not in state["clean"]]
    for start in range(0, len(todo), batch_size):
        pos = todo[start : start + batch_size]
        pred = wrapped(images[pos].to(dev)).argmax(dim=1).cpu()
        for k, ok in zip(pos, (pred == labels[pos].cpu()).tolist(), strict=True):
            state["clean"][k] = ok


def _flags(state: dict[str, dict[int, bool]], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample clean and robust flags (robust only where clean and never broken)."""
    clean = torch.tensor([state["clean"][k] for k in range(n)], dtype=torch.bool)
    robust = torch.tensor(
        [state["clean"][k] and state["robust"].get(k, False) for k in range(n)], dtype=torch.bool
    )
    return clean, robust


def _attack_survivors(
    attacker: Any,
    steps: list[str],
    images: torch.Tensor,
    labels: torch.Tensor,
    state: dict[str, dict[int, bool]],
    *,
    desc: str,
    batch_size: int,
    chunk_size: int,
    save: Any,
) -> None:
    """Attack the clean-correct samples not yet attacked, chunk by chunk, with a progress bar
    counting samples x attacks; ``save()`` after each chunk makes the run resumable."""
    targets = [k for k in range(images.shape[0]) if state["clean"][k] and k not in state["robust"]]
    with progress_bar(desc, total=len(targets) * len(steps), unit="sample-attack") as bar:
        bar.set_postfix_str(f"{len(targets)} clean-correct samples; attacks {'→'.join(steps)}")
        for start in range(0, len(targets), chunk_size):
            pos = targets[start : start + chunk_size]
            robust = attacker(images[pos], labels[pos], batch_size, bar)
            for k, ok in zip(pos, robust.tolist(), strict=True):
                state["robust"][k] = ok
            if save is not None:
                save()


def _global_indices(indices: torch.Tensor | None, n: int) -> torch.Tensor:
    """The samples' global indices (default 0..n-1) as a CPU int64 vector of length n."""
    out = torch.arange(n) if indices is None else torch.as_tensor(indices, dtype=torch.int64)
    if out.shape != (n,):
        raise ValueError(f"indices: expected shape ({n},), got {tuple(out.shape)}")
    return out.cpu()


def _probe(wrapped: nn.Module, first: torch.Tensor, *, deterministic: bool) -> int:
    """The model's class count; with ``deterministic``, refuse a stochastic model first."""
    if deterministic:
        checks.check_deterministic(
            wrapped,
            first,
            hint='standard AutoAttack refuses it: use autoattack(..., version="rand") '
            "(APGD with Expectation over Transformation)",
        )
    with torch.no_grad():
        return int(wrapped(first[:1]).shape[1])


def autoattack(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    eps: float,
    norm: str = "Linf",
    version: str = "standard",
    batch_size: int = 250,
    device: str | torch.device | None = None,
    fast: bool = False,
    seed: int = 0,
    amp_dtype: torch.dtype | None = None,
    compile_model: bool = False,
    resume_path: str | Path | None = None,
    chunk_size: int | None = None,
    indices: torch.Tensor | None = None,
    check: bool = True,
    verbose: bool = False,
) -> RobustResult:
    """AutoAttack robust accuracy with per-sample flags.

    `version="standard"` runs APGD-CE, APGD-T, FAB-T and Square and refuses a stochastic model
    (StochasticModelError: use `version="rand"`, APGD-CE + APGD-DLR with 20 EoT iterations).
    Only clean-correct samples are attacked, in chunks of `chunk_size` (default 8 batches); with
    `resume_path` each finished chunk's flags are saved there and skipped on the next call with
    the same data and settings. `indices` are the samples' global indices (default 0..n-1),
    carried into the result. `amp_dtype` runs the model under autocast (bf16 on CUDA roughly
    doubles throughput); `compile_model` wraps it in torch.compile. Note that pyautoattack seeds
    torch's global RNG, and its random starts are drawn per batch, so its flags depend on the
    batch composition (unlike `robust_accuracy`).
    """
    chunk_size = _check_settings(version, norm, eps, batch_size, chunk_size)
    labels = labels.long() if isinstance(labels, torch.Tensor) else labels
    _check_batch(images, labels)
    n = images.shape[0]
    if n == 0:
        raise ValueError("images: no samples to attack")
    indices = _global_indices(indices, n)
    dev = resolve_attack_device(model, device)
    name = attack_name(version, fast)
    config = {"attack": name, "version": version, "norm": norm, "eps": float(eps)}
    config |= {"seed": int(seed), "n": n, "data": _fingerprint(images, labels)}
    path = Path(resume_path) if resume_path is not None else None
    state = _load_resume(path, config) if path is not None else {"clean": {}, "robust": {}}

    wrapped: nn.Module = _Logits(model, amp_dtype)
    if compile_model:
        wrapped = torch.compile(wrapped)

    with _autoattack_log_level(verbose), eval_mode(model):
        first = images[: min(n, 32)].to(dev)
        n_classes = _probe(wrapped, first, deterministic=check and version == "standard")
        _clean_pass(wrapped, images, labels, state, batch_size, dev)
        if path is not None:
            _save_resume(path, config, state)

        attacker, steps = _make_attacker(
            wrapped, version, norm, eps, seed, dev, fast, n_classes, first
        )
        _attack_survivors(
            attacker,
            steps,
            images,
            labels,
            state,
            desc=f"{name} {norm} eps={eps:.4g}",
            batch_size=batch_size,
            chunk_size=chunk_size,
            save=(lambda: _save_resume(path, config, state)) if path is not None else None,
        )

    clean, robust = _flags(state, n)
    amp = str(amp_dtype).replace("torch.", "") if amp_dtype else None
    params = {"version": version, "fast": fast, "seed": seed, "batch_size": batch_size}
    result = RobustResult(
        attack=name,
        norm=norm,
        eps=float(eps),
        clean_correct=clean,
        robust_correct=robust,
        indices=indices,
        params=params | {"amp_dtype": amp},
    )
    if check:
        checks.check_robust_not_above_clean(result)
    return result


@contextmanager
def _autoattack_log_level(verbose: bool) -> Iterator[None]:
    """pyautoattack logs every attack's progress at INFO: quiet unless ``verbose``."""
    aa_logger = logging.getLogger("auto-attack")
    old_level = aa_logger.level
    aa_logger.setLevel(logging.DEBUG if verbose else logging.WARNING)
    try:
        yield
    finally:
        aa_logger.setLevel(old_level)


def _make_attacker(
    wrapped: nn.Module,
    version: str,
    norm: str,
    eps: float,
    seed: int,
    dev: torch.device,
    fast: bool,
    n_classes: int,
    first: torch.Tensor,
) -> tuple[Callable[..., torch.Tensor], list[str]]:
    """A function (images, labels, batch_size, bar) -> per-sample robust flags (bool, CPU), and
    the names of the attacks it runs in order. It advances `bar` by one per (sample, attack):
    samples broken by an attack are counted done for the attacks they then skip."""
    if fast:
        import torchattacks

        atk = torchattacks.AutoAttack(
            wrapped, norm=norm, eps=eps, version=version, n_classes=n_classes, seed=seed
        )

        def run_fast(x: torch.Tensor, y: torch.Tensor, batch_size: int, bar: Any) -> torch.Tensor:
            flags = []
            for s in range(0, x.shape[0], batch_size):
                xb, yb = x[s : s + batch_size].to(dev), y[s : s + batch_size].to(dev)
                adv = atk(xb, yb)
                _check_in_ball(adv, xb, eps, norm, FAST_NAME)
                with torch.no_grad():
                    flags.append((wrapped(adv).argmax(dim=1) == yb).cpu())
                bar.update(len(yb))
                bar.set_postfix_str(f"{FAST_NAME} {s + len(yb)}/{x.shape[0]} samples")
            return torch.cat(flags)

        return run_fast, [FAST_NAME]

    from pyautoattack import AutoAttack

    aa = AutoAttack(wrapped, norm=norm, eps=eps, version=version, seed=seed, device=dev)
    # The targeted attacks try the top-9 other classes; with fewer classes, try all others (as
    # AutoAttack's authors advise for such datasets) instead of indexing past the logits.
    for targeted in (getattr(aa, "apgd_targeted", None), getattr(aa, "fab", None)):
        if targeted is not None and hasattr(targeted, "n_target_classes"):
            targeted.n_target_classes = min(targeted.n_target_classes, n_classes - 1)
    attacks = list(aa.attacks_to_run)
    if version == "rand":
        return _whole_run(aa, eps, norm, attacks), ["+".join(attacks)]
    return _attack_by_attack(aa, eps, norm, attacks, dev, first), attacks


def _whole_run(aa: Any, eps: float, norm: str, attacks: list[str]) -> Callable[..., torch.Tensor]:
    """One `run_standard_evaluation` per chunk. For the randomised version: there a second
    clean pass per attack would redraw the model's randomness and change which samples are
    attacked, so the library's own loop runs unbroken and progress moves once per chunk."""

    def run(x: torch.Tensor, y: torch.Tensor, batch_size: int, bar: Any) -> torch.Tensor:
        x_adv, y_adv = aa.run_standard_evaluation(x, y, batch_size=batch_size)
        _check_in_ball(x_adv, x, eps, norm, "pyautoattack")
        bar.update(len(y))
        bar.set_postfix_str(f"{'+'.join(attacks)} chunk of {len(y)} samples done")
        # y_adv holds the prediction on each returned image: the clean one for samples no
        # attack broke, the successful adversarial one otherwise.
        return (y_adv.cpu() == y.cpu()).cpu()

    return run


def _perturb(aa: Any, attack: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One attack of the library's standard loop on one batch, set up exactly as
    `run_standard_evaluation` sets it up (loss, target mode, restarts, a fresh seed per call)."""
    if attack == "apgd-ce":
        aa.apgd.loss = "ce"
        atk = aa.apgd
    elif attack == "apgd-t":
        atk = aa.apgd_targeted
    elif attack == "fab-t":
        aa.fab.targeted = True
        aa.fab.n_restarts = 1
        atk = aa.fab
    elif attack == "square":
        atk = aa.square
    else:
        raise ValueError(f"attack: {attack!r} is not one of the standard version's attacks")
    atk.seed = aa.get_seed()
    return atk.perturb(x, y)


def _library_checks(aa: Any, first: torch.Tensor, attacks: list[str]) -> None:
    """The library's warnings about the model (logits not probabilities, no dynamic defense,
    enough classes for the targeted attacks), made once per run instead of once per
    `run_standard_evaluation` call. Its randomness check is `checks.check_deterministic`."""
    from pyautoattack import checks as aa_checks

    n_cls = aa_checks.check_range_output(aa.get_logits, first, logger=aa.logger)
    aa_checks.check_dynamic(aa.model, first, False, logger=aa.logger)
    aa_checks.check_n_classes(
        n_cls, attacks, aa.apgd_targeted.n_target_classes, aa.fab.n_target_classes, logger=aa.logger
    )


def _attack_by_attack(
    aa: Any, eps: float, norm: str, attacks: list[str], dev: torch.device, first: torch.Tensor
) -> Callable[..., torch.Tensor]:
    """The library's standard loop, driven from here: each attack's `perturb` on the samples
    still robust after the previous attacks, in their order, `batch_size` at a time, reseeded
    per call, under `torch.no_grad` (as `run_standard_evaluation` runs it), so the flags equal
    one library call on the chunk (tested). Calling `perturb` directly skips what a library
    call per attack and batch would repeat (its checks and clean pass: 8 forwards a call) and
    lets the bar name the attack and count samples. Needs a deterministic model: the standard
    version checks that first. The library's checks run on `first` before the first chunk."""
    pending_checks = [first]

    def run(x: torch.Tensor, y: torch.Tensor, batch_size: int, bar: Any) -> torch.Tensor:
        if pending_checks:
            _library_checks(aa, pending_checks.pop(), attacks)
        alive = torch.ones(len(y), dtype=torch.bool)
        counts = []
        for i, attack in enumerate(attacks):
            pos = alive.nonzero().flatten()
            for s in range(0, len(pos), batch_size):
                idx = pos[s : s + batch_size]
                xb, yb = x[idx].clone().to(dev), y[idx].clone().to(dev)
                with torch.no_grad():
                    adv = _perturb(aa, attack, xb, yb)
                    pred = aa.get_logits(adv).max(dim=1)[1]
                _check_in_ball(adv, xb, eps, norm, f"pyautoattack {attack}")
                broken = (pred != yb).cpu()
                alive[idx[broken]] = False
                # Broken samples skip the later attacks: count those steps done now.
                bar.update(len(idx) + int(broken.sum()) * (len(attacks) - 1 - i))
                bar.set_postfix_str(
                    f"{attack} {s + len(idx)}/{len(pos)} samples, "
                    f"{int(alive.sum())}/{len(y)} still robust"
                )
            counts.append(int(alive.sum()))
        if "square" in attacks and len(counts) > 1:
            _check_square(counts, attacks, len(y))
        return alive

    return run


def _check_square(counts: list[int], attacks: list[str], n: int, alpha: float = 0.002) -> None:
    """The library's warning when Square (gradient-free, last) breaks samples the gradient
    attacks could not, which hints at masked gradients: one run per attack no longer reaches
    the library's own check, so it is made here on the same accuracies."""
    k = attacks.index("square")
    before = min(counts[:k]) if k else n
    if counts[k] / n < before / n - alpha:
        logging.getLogger("auto-attack").warning(
            "Square Attack has decreased the robust accuracy by %.2f%%: the gradient attacks may "
            "be unreliable on this model (masked gradients?)",
            100 * (before - counts[k]) / n,
        )
