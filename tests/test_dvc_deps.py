"""dvc.yaml's deps and params cover what each stage's code imports and reads.

Static, from the AST (no import runs): for ``vpt_robust.stages.<name>`` every module of the
``vpt_robust`` package it imports, transitively (imports inside functions included, and the
``__init__.py`` of every package on the way, which Python runs too), must lie under a dep of the
stage; every ``params.<block>[.<field>]`` read in those modules must be covered by the stage's
``params:``. Reading the code statically over-approximates (a function that a stage never calls
still counts), which errs on the side of re-running, never on stale results.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "vpt_robust"

# Modules a stage imports whose code cannot change a dvc out, with the reason.
NOT_DEPS = {
    "vpt_robust/tracking.py": "logs to MLflow only; no stage output passes through it",
}
# Params blocks a stage reads that do not change its outputs, with the reason.
NOT_PARAMS = {
    "tracking": "where results are logged, not what they are",
    "prompt": "the one-family shorthand; config makes `prompts` the one list stages use",
}
# Per stage: blocks the function-level walk reaches but the stage never reads, with the reason.
NOT_READ_BY = {
    "pretrain": {
        "prompts": "evaluates only the zero-shot classifier (build.classifier, prompted=False)"
    },
    "tecoa": {
        "evaluate": "stages.tecoa.eval_params replaces the evaluate block by the tecoa block's "
        "attack settings before evaluate_model reads it; only evaluate.batch_size is kept"
    },
}


def _module_file(module: str) -> Path | None:
    """``vpt_robust.a.b`` -> its file under ROOT (module or package), None if not ours."""
    if module != PACKAGE and not module.startswith(PACKAGE + "."):
        return None
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _packages_of(module: str) -> list[str]:
    """``a.b.c`` -> ``["a", "a.b", "a.b.c"]``: importing a module runs every package above it."""
    parts = module.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _imported(path: Path, module: str) -> set[str]:
    """Modules ``path`` (the file of ``module``) imports anywhere in its body."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = module.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            # `from pkg import sub` imports the submodule pkg.sub when it is one
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


@cache
def closure(module: str) -> dict[str, Path]:
    """Every ``vpt_robust`` module that importing ``module`` runs -> its file."""
    todo, seen = [module], {}
    while todo:
        name = todo.pop()
        for pkg in _packages_of(name):
            path = _module_file(pkg)
            if path is None or pkg in seen:
                continue
            seen[pkg] = path
            todo.extend(m for m in _imported(path, pkg) if _module_file(m) is not None)
    return seen


def params_read(tree: ast.AST) -> set[str]:
    """``block`` and ``block.field`` for every ``params.block[.field]`` read in ``tree``."""
    reads: set[str] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        if isinstance(node.value, ast.Name) and node.value.id == "params":
            reads.add(node.attr)
        inner = node.value
        if (
            isinstance(inner, ast.Attribute)
            and isinstance(inner.value, ast.Name)
            and inner.value.id == "params"
        ):
            # a method (`params.train.model_dump()`) reads the whole block
            method = node.attr.startswith("model_")
            reads.add(inner.attr if method else f"{inner.attr}.{node.attr}")
    # `params.block.field` counts as the narrower `block.field` only
    narrow = {r.split(".")[0] for r in reads if "." in r}
    return {r for r in reads if "." in r or r not in narrow or _whole_read(tree, r)}


def _whole_read(tree: ast.AST, block: str) -> bool:
    """Whether ``params.block`` is used other than as ``params.block.field``."""
    parents = {id(c): n for n in ast.walk(tree) for c in ast.iter_child_nodes(n)}
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr == block
            and isinstance(node.value, ast.Name)
            and node.value.id == "params"
            and not isinstance(parents.get(id(node)), ast.Attribute)
        ):
            return True
    return False


@cache
def _module_tree(module: str) -> ast.Module:
    path = _module_file(module)
    assert path is not None, module
    return ast.parse(path.read_text(), filename=str(path))


@cache
def _bindings(module: str) -> tuple[dict[str, ast.AST], dict[str, tuple[str, str | None]]]:
    """Top-level defs of ``module`` and its imported names -> (module, attribute or None)."""
    tree = _module_tree(module)
    is_package = _module_file(module).name == "__init__.py"
    defs: dict[str, ast.AST] = {}
    names: dict[str, tuple[str, str | None]] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            defs[node.name] = node
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                names[alias.asname or alias.name.split(".")[0]] = (
                    alias.name if alias.asname else alias.name.split(".")[0],
                    None,
                )
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = module.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                names[alias.asname or alias.name] = (base, alias.name)
    return defs, names


def _resolve(module: str, name: str, depth: int = 0) -> tuple[str, str] | None:
    """Where the function or class ``name`` seen in ``module`` is defined (re-exports followed)."""
    if _module_file(module) is None or depth > 10:
        return None
    defs, names = _bindings(module)
    if name in defs:
        return module, name
    if name in names:
        base, attr = names[name]
        if attr is None:
            return None
        if _module_file(f"{base}.{attr}") is not None:
            return None  # a submodule, not a function
        return _resolve(base, attr, depth + 1)
    return None


def _referenced(module: str, node: ast.AST) -> set[tuple[str, str]]:
    """Functions and classes of ours that ``node`` names (called or passed on)."""
    _, names = _bindings(module)
    found: set[tuple[str, str]] = set()
    for sub in ast.walk(node):
        target = None
        if isinstance(sub, ast.Name):
            target = _resolve(module, sub.id)
        elif isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name):
            base, attr = names.get(sub.value.id, (None, None))
            mod = base if attr is None else f"{base}.{attr}"
            if mod and _module_file(mod) is not None:
                target = _resolve(mod, sub.attr)
        if target is not None:
            found.add(target)
    return found


@cache
def reached(module: str, entry: str = "run") -> frozenset[tuple[str, str]]:
    """``module.entry`` and every function or class of ours it names, transitively."""
    todo, seen = [(module, entry)], set()
    while todo:
        item = todo.pop()
        if item in seen:
            continue
        seen.add(item)
        todo.extend(_referenced(item[0], _bindings(item[0])[0][item[1]]) - seen)
    return frozenset(seen)


def reachable_params(module: str, entry: str = "run") -> set[str]:
    """Params read by ``module.entry`` and every function of ours it reaches."""
    reads: set[str] = set()
    for mod, name in reached(module, entry):
        reads |= params_read(_bindings(mod)[0][name])
    return reads


def _blocks() -> set[str]:
    from vpt_robust.config import Params

    return set(Params.model_fields)


def _stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _dep_paths(spec: dict) -> list[str]:
    return [next(iter(d)) if isinstance(d, dict) else d for d in spec.get("deps", [])]


def _covered(rel: str, deps: list[str]) -> bool:
    return any(rel == d or rel.startswith(d.rstrip("/") + "/") for d in deps)


def needed_params(module: str) -> set[str]:
    """The params a stage's code reads, at the narrowest level the code shows."""
    blocks = _blocks()
    reads = reachable_params(module)
    wanted = {r for r in reads if r.split(".")[0] in blocks}
    wanted = {r for r in wanted if r.split(".")[0] not in NOT_PARAMS}
    # a whole-block read (`params.train` passed on) needs the block, which covers its fields
    whole = {r for r in wanted if "." not in r}
    return whole | {r for r in wanted if "." in r and r.split(".")[0] not in whole}


def missing_deps(name: str, spec: dict) -> list[str]:
    deps = _dep_paths(spec)
    files = sorted(str(p.relative_to(ROOT)) for p in closure(f"{PACKAGE}.stages.{name}").values())
    return [f for f in files if f not in NOT_DEPS and not _covered(f, deps)]


def missing_params(name: str, spec: dict) -> list[str]:
    declared = [str(p) for p in spec.get("params", []) if not isinstance(p, dict)]
    exempt = NOT_READ_BY.get(name, {})
    return sorted(
        r
        for r in needed_params(f"{PACKAGE}.stages.{name}")
        if not any(r == d or r.startswith(d + ".") for d in declared)
        and r.split(".")[0] not in exempt
    )


@pytest.mark.parametrize("name", sorted(_stages()))
def test_stage_deps_cover_its_import_closure(name: str) -> None:
    missing = missing_deps(name, _stages()[name])
    assert not missing, f"dvc.yaml stage {name!r} lacks deps covering {missing}"


@pytest.mark.parametrize("name", sorted(_stages()))
def test_stage_params_cover_the_blocks_its_code_reads(name: str) -> None:
    missing = missing_params(name, _stages()[name])
    assert not missing, f"dvc.yaml stage {name!r} lacks params {missing}"


# What builds or loads a prompted classifier.
PROMPTED_BUILDERS = {
    ("vpt_robust.models.classifier", "build_classifier"),
    ("vpt_robust.prompts.io", "load_prompted_model"),
}


def test_every_stage_that_builds_prompted_models_lists_prompts() -> None:
    building = set()
    for name, spec in _stages().items():
        if PROMPTED_BUILDERS & reached(f"{PACKAGE}.stages.{name}"):
            building.add(name)
            if "prompts" not in NOT_READ_BY.get(name, {}):
                assert "prompts" in spec.get("params", []), f"stage {name!r} lacks 'prompts'"
    assert {"train_prompt", "evaluate", "stream_eval"} <= building


def test_every_stage_of_the_cli_is_in_dvc_yaml() -> None:
    from vpt_robust.stages import STAGES

    assert sorted(_stages()) == sorted(STAGES)


def test_the_checks_see_what_they_must(tmp_path: Path) -> None:
    """The walk follows function-level and relative imports and names a missing file."""
    evaluate = closure("vpt_robust.stages.evaluate")
    assert "vpt_robust.prompts" in evaluate and "vpt_robust.stages.build" in evaluate
    stream = closure("vpt_robust.stages.stream_eval")
    assert "vpt_robust.stages.evaluate" in stream
    # amp_dtype in stages/common.py imports methods.optim inside the function
    assert "vpt_robust.methods.optim" in closure("vpt_robust.stages.common")
    spec = {"deps": ["vpt_robust/stages/stream_eval.py"], "params": ["stream"]}
    assert "vpt_robust/stages/evaluate.py" in missing_deps("stream_eval", spec)
    assert "train.seeds" in missing_params("stream_eval", spec)
    assert "prompts" in needed_params("vpt_robust.stages.train_prompt")
