"""The house's layout: no import circles inside bvit/ or orchestrator/, every module importable on its own,
and bvit/ (the science) free of Ray, MLflow and YAML.

The static check reads every `import` in the source (top-level and inside functions: a lazy import is still
an arrow) and looks for a cycle among the package's own modules; the dynamic check imports each module alone
in a fresh interpreter, which is how a circle that only bites in one import order shows itself.
"""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bvit", "orchestrator")
FORBIDDEN_IN_BVIT = ("ray", "mlflow", "yaml")


def modules(package: str) -> dict[str, Path]:
    """{dotted module name: file} of every module in `package`."""
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports_of(name: str, path: Path) -> set[str]:
    """Every module `name` imports (absolute names; relative imports resolved)."""
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)  # `from pkg import module`
    return found


def graph(package: str) -> dict[str, set[str]]:
    """Import arrows between the modules of `package` (a module's import of its own package is no arrow)."""
    mods = modules(package)
    return {name: {m for m in imports_of(name, path) if m in mods and m != name and not name.startswith(m + ".")}
            for name, path in mods.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    """Guards the test below: it must fail when a circle is introduced."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    edges = graph("bvit")
    edges["bvit.config"] = edges["bvit.config"] | {"bvit.trial"}  # trial -> ... -> config -> trial
    assert find_cycle(edges) is not None


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycle_inside_the_package(package):
    edges = graph(package)
    assert len(edges) > 5, f"found only {sorted(edges)} in {package}/"
    assert find_cycle(edges) is None, f"import cycle: {' -> '.join(find_cycle(edges))}"


def test_bvit_imports_neither_ray_nor_mlflow_nor_yaml():
    offenders = {name: sorted(m for m in imports_of(name, path) if m.split(".")[0] in FORBIDDEN_IN_BVIT)
                 for name, path in modules("bvit").items()}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_orchestrator_is_never_imported_by_bvit():
    offenders = {name for name, path in modules("bvit").items()
                 if any(m.split(".")[0] == "orchestrator" for m in imports_of(name, path))}
    assert offenders == set()


ALL_MODULES = sorted(m for p in PACKAGES for m in modules(p))


def test_every_module_is_listed():
    """Guards the parametrization below: an empty or partial list would silently test less."""
    assert {"bvit.trial", "bvit.engine", "bvit.models.bvit", "bvit.data.format", "orchestrator.launch"} <= set(ALL_MODULES)


def test_every_module_imports_alone_in_a_fresh_interpreter():
    """One fresh interpreter per module, so no import order can hide a circle."""
    failures = {}
    for m in ALL_MODULES:
        r = subprocess.run([sys.executable, "-c", f"import {m}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        if r.returncode:
            failures[m] = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"
    assert failures == {}


def test_a_sweep_saved_before_the_tuner_had_its_own_module_still_unpickles():
    """Tune pickles the Tuner's trial-name function and the launcher's callbacks into a sweep's tuner.pkl (and its
    variant generator's state) by module and name: a sweep launched while they lived in orchestrator.launch must
    still `--resume`."""
    import pickle

    from orchestrator.tuner import PrepareFinish, trial_name

    assert pickle.loads(b"corchestrator.launch\n_trial_name\n.") is trial_name
    assert pickle.loads(b"corchestrator.launch\n_PrepareFinish\n.") is PrepareFinish
