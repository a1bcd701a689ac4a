"""RobustBench leaderboard models as a backbone source: `robustbench:<dataset>/<threat>/<name>`.

robustbench 1.1.1 cannot be imported as a whole here: its `__init__` pulls in `loaders.py`
(`import pkg_resources`, gone from setuptools >= 81) and `eval.py` (`from autoattack import
AutoAttack`, a module no PyPI package provides). Its model zoo (`robustbench.model_zoo`) and
`robustbench.utils.load_model` import fine once `geotorch`, `torchdiffeq` and `gdown` are
installed, so this module imports those two submodules directly, without running the package's
`__init__`. Loading is offline only: the checkpoint must already be in the cache directory in
robustbench's layout `<cache_dir>/<dataset>/<threat_model>/<name>.pt` (ensembles:
`<name>.pt_m<i>.pt`); otherwise a `RobustBenchError` names the spec and the expected path,
rather than robustbench trying Google Drive. Models come back frozen, in eval mode, taking
[0,1] images (robustbench puts any normalisation inside its models).

Not supported: entries robustbench builds through timm with `pretrained=True` (XCiT/DeiT/...)
need the Hugging Face hub cache and are refused with a clear message when it lacks them; the
torchattacks 3.5.1 wheel ships an older robustbench copy into the same folder, which this
module detects (installing robustbench after torchattacks restores 1.1.1).
"""

from __future__ import annotations

import base64
import difflib
import hashlib
import importlib
import importlib.metadata
import importlib.util
import sys
import types
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

PREFIX = "robustbench:"
DATASETS = ("cifar10", "cifar100", "imagenet")
THREAT_MODELS = ("Linf", "L2", "corruptions", "corruptions_3d")
REQUIRED_VERSION = "1.1.1"
INSTALL_HINT = (
    f"pip install --no-deps robustbench=={REQUIRED_VERSION} geotorch==0.4.0 torchdiffeq==0.2.5 "
    "gdown==5.1.0 beautifulsoup4==4.15.0 soupsieve==4.1.2 (after torchattacks, whose wheel "
    "overwrites robustbench's files with an older copy)"
)
# Files whose content must match robustbench's own RECORD: torchattacks' copy differs in these.
_VERIFIED_FILES = ("robustbench/utils.py", "robustbench/model_zoo/models.py")


class RobustBenchError(RuntimeError):
    """A robustbench spec cannot be served: bad spec, package unusable, or weights not cached."""


@dataclass(frozen=True)
class RobustBenchSpec:
    """A parsed `robustbench:<dataset>/<threat_model>/<model_name>`."""

    dataset: str
    threat_model: str
    model_name: str

    def __str__(self) -> str:
        return f"{PREFIX}{self.dataset}/{self.threat_model}/{self.model_name}"


def parse_robustbench_spec(spec: str) -> RobustBenchSpec:
    """Parse and validate the spec's shape, dataset and threat model (not the model name)."""
    if not isinstance(spec, str) or not spec.startswith(PREFIX):
        raise RobustBenchError(
            f"spec: {spec!r} does not start with {PREFIX!r}; expected "
            f"'{PREFIX}<dataset>/<threat_model>/<model_name>'"
        )
    parts = spec[len(PREFIX) :].split("/")
    if len(parts) != 3 or not all(parts):
        raise RobustBenchError(
            f"spec: {spec!r} must have three parts, '{PREFIX}<dataset>/<threat_model>/<model_name>'"
            f", e.g. '{PREFIX}cifar10/Linf/Carmon2019Unlabeled'"
        )
    dataset, threat, name = parts
    if dataset not in DATASETS:
        raise RobustBenchError(f"spec: dataset {dataset!r} in {spec!r} is not one of {DATASETS}")
    if threat not in THREAT_MODELS:
        raise RobustBenchError(
            f"spec: threat model {threat!r} in {spec!r} is not one of {THREAT_MODELS}"
        )
    return RobustBenchSpec(dataset, threat, name)


def _record_hash(path: Path) -> str:
    digest = hashlib.sha256(path.read_bytes()).digest()
    return "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _import_robustbench() -> tuple[types.ModuleType, types.ModuleType]:
    """Import robustbench.utils and robustbench.model_zoo.enums without the package __init__."""
    found = importlib.util.find_spec("robustbench")
    if found is None or not found.submodule_search_locations:
        raise RobustBenchError(f"robustbench is not installed; install it with: {INSTALL_HINT}")
    try:
        dist = importlib.metadata.distribution("robustbench")
    except importlib.metadata.PackageNotFoundError:
        raise RobustBenchError(
            f"the robustbench package at {list(found.submodule_search_locations)[0]} is the old "
            f"copy bundled in torchattacks' wheel, not robustbench {REQUIRED_VERSION}; install "
            f"it with: {INSTALL_HINT}"
        ) from None
    if dist.version != REQUIRED_VERSION:
        raise RobustBenchError(
            f"robustbench {dist.version} is installed; this source needs {REQUIRED_VERSION} "
            f"({INSTALL_HINT})"
        )
    records = {str(f): f for f in dist.files or []}
    for rel in _VERIFIED_FILES:
        rec = records.get(rel)
        path = Path(dist.locate_file(rel))
        if (
            rec is None
            or rec.hash is None
            or not path.exists()
            or _record_hash(path) != (f"{rec.hash.mode}={rec.hash.value}")
        ):
            raise RobustBenchError(
                f"{path} does not match robustbench {REQUIRED_VERSION}'s own file (torchattacks' "
                f"wheel overwrites it with an older copy); reinstall: {INSTALL_HINT}"
            )
    if "robustbench" not in sys.modules:
        # Stand in for the package so its __init__ (which cannot import here) never runs.
        package = types.ModuleType("robustbench")
        package.__path__ = list(found.submodule_search_locations)
        package.__spec__ = found
        package.__file__ = found.origin
        sys.modules["robustbench"] = package
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # timm's deprecated import paths
            utils = importlib.import_module("robustbench.utils")
            enums = importlib.import_module("robustbench.model_zoo.enums")
    except ImportError as err:
        raise RobustBenchError(
            f"robustbench's model zoo does not import ({err}); install it with: {INSTALL_HINT}"
        ) from err
    return utils, enums


def robustbench_available() -> bool:
    """True when robustbench's model zoo can be used here."""
    try:
        _import_robustbench()
    except RobustBenchError:
        return False
    return True


def _zoo_entry(spec: RobustBenchSpec, utils: Any, enums: Any) -> tuple[dict[str, Any], str]:
    dataset = enums.BenchmarkDataset(spec.dataset)
    # robustbench keeps 3D-corruption models in the `corruptions` folder and table.
    threat = enums.ThreatModel(spec.threat_model.replace("_3d", ""))
    zoo = utils.all_models[dataset].get(threat, {})
    if spec.model_name not in zoo:
        close = difflib.get_close_matches(spec.model_name, list(zoo), n=5, cutoff=0.5)
        hint = f"; close names: {close}" if close else f"; {len(zoo)} models exist there"
        raise RobustBenchError(
            f"spec: model {spec.model_name!r} is not in robustbench's {spec.dataset}/"
            f"{threat.value} model zoo{hint}"
        )
    return zoo[spec.model_name], threat.value


def expected_checkpoints(spec: str | RobustBenchSpec, cache_dir: str | Path) -> list[Path]:
    """The checkpoint files robustbench's loader reads for this spec under `cache_dir`."""
    parsed = spec if isinstance(spec, RobustBenchSpec) else parse_robustbench_spec(spec)
    utils, enums = _import_robustbench()
    entry, threat = _zoo_entry(parsed, utils, enums)
    base = Path(cache_dir) / parsed.dataset / threat / f"{parsed.model_name}.pt"
    ids = entry.get("gdrive_id")
    if isinstance(ids, list):
        return [Path(f"{base}_m{i}.pt") for i in range(len(ids))]
    return [base]


def _timm_name(spec: RobustBenchSpec) -> str:
    threat = spec.threat_model.replace("_3d", "").lower()
    return f"{spec.model_name.lower().replace('-', '_')}_{spec.dataset.lower()}_{threat}"


def load_robustbench_model(
    spec: str, cache_dir: str | Path, *, device: str | Any = "cpu"
) -> nn.Module:
    """Build a RobustBench leaderboard model from its locally cached checkpoint.

    Returns a frozen nn.Module in eval mode that takes [0,1] images and returns logits. Raises
    RobustBenchError naming the spec and the cache path when the checkpoint is not cached (no
    download is attempted), or when robustbench's model zoo cannot be imported.
    """
    parsed = parse_robustbench_spec(spec)
    cache = Path(cache_dir).expanduser()
    utils, enums = _import_robustbench()
    entry, threat = _zoo_entry(parsed, utils, enums)
    import timm

    if timm.is_model(_timm_name(parsed)):
        return _load_via_timm(parsed, utils, threat, device)
    if entry.get("gdrive_id") is None:
        raise RobustBenchError(f"spec: {parsed} has no checkpoint in robustbench's model zoo")
    if parsed.dataset == "imagenet" and "Standard" in parsed.model_name:
        raise RobustBenchError(
            f"spec: {parsed} is torchvision's pretrained ImageNet model, which robustbench "
            "downloads from torchvision's hub; not supported offline by this source"
        )
    missing = [p for p in expected_checkpoints(parsed, cache) if not p.is_file()]
    if missing:
        raise RobustBenchError(
            f"{parsed}: checkpoint not in the local cache (cache_dir={cache}); expected "
            f"{', '.join(str(p) for p in missing)}. robustbench downloads it from Google Drive, "
            "which is not reachable offline: fetch it where you have network (e.g. "
            "robustbench.utils.load_model) and copy it to that path"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model = utils.load_model(
                parsed.model_name, model_dir=str(cache), dataset=parsed.dataset, threat_model=threat
            )
    except RobustBenchError:
        raise
    except Exception as err:
        raise RobustBenchError(
            f"{parsed}: robustbench failed to build it from {cache} ({type(err).__name__}: {err})"
        ) from err
    return _frozen(model, device)


def _load_via_timm(spec: RobustBenchSpec, utils: Any, threat: str, device: str | Any) -> nn.Module:
    """Entries registered as timm models load their weights from the Hugging Face hub cache."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model = utils.load_model(spec.model_name, dataset=spec.dataset, threat_model=threat)
    except Exception as err:
        raise RobustBenchError(
            f"{spec}: robustbench builds this entry through timm ({_timm_name(spec)}) with weights "
            "from the Hugging Face hub, which are not in the local hub cache (HF_HOME) and cannot "
            f"be downloaded here ({type(err).__name__}: {err})"
        ) from err
    return _frozen(model, device)


def _frozen(model: nn.Module, device: str | Any) -> nn.Module:
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
