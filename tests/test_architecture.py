"""The layers point one way, no module imports itself back through others, and a method module imports no other
method module (what methods share lives in the infrastructure modules: base, frames, losses, caches, ...).

    conf  <-  datasets, models  <-  methods  <-  harness (report <- the rest of harness)  <-  scripts, test_time.py

Every import statement counts, at module level or inside a function, so a deferred import cannot hide an upward
dependency."""
import ast
from pathlib import Path

import pytest

from methods.declarations import builtin_method_modules

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ["conf", "datasets", "models", "methods", "harness"]
# What each package may import of the suite (itself always).
ALLOWED = {
    "conf": set(),
    "datasets": {"conf"},
    "models": {"conf"},
    "methods": {"conf", "models"},
    "harness": {"conf", "datasets", "models", "methods"},
}
# Inside harness, reporting is apart from running: harness.report imports none of these.
RUNNING = {"harness.build", "harness.run", "harness.comparison", "harness.cli", "harness.settings", "harness.stream",
           "harness.grid", "harness.grid.spec", "harness.grid.jobs", "harness.grid.status", "harness.grid.tables",
           "harness.launch"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def suite_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The suite modules a file imports (``from a.b import c`` counts as a.b.c when that is a module, else a.b)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                     for alias in node.names]
        else:
            continue
        found.update(name for name in names if name.split(".")[0] in PACKAGES)
    return found


MODULES = suite_modules()
GRAPH = {name: imports_of(path, MODULES) for name, path in MODULES.items()}
# The built-in method modules: every module of methods/ but the infrastructure (methods.declarations.INFRASTRUCTURE).
METHOD_MODULES = set(builtin_method_modules())


def method_modules_imported(path: Path) -> set[str]:
    """The built-in method modules a file imports (``from methods import tpt`` and ``import methods.tpt`` count)."""
    return imports_of(path, MODULES) & METHOD_MODULES


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_imports_only_its_own_layer_and_below(module):
    package = module.split(".")[0]
    upward = sorted(i for i in GRAPH[module] if i.split(".")[0] not in ALLOWED[package] | {package})
    assert not upward, f"{module} imports {upward} from a layer above it"
    if module.startswith("harness.report"):
        running = sorted(i for i in GRAPH[module] if i in RUNNING)
        assert not running, f"{module} (reporting) imports {running} (running)"


def test_no_import_cycle():
    """Depth-first search over module -> imported module (a package import counts as its __init__)."""
    def targets(module):
        return [t for t in GRAPH[module] if t in GRAPH and t != module and not module.startswith(t + ".")]
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module):
        state[module] = 1
        stack.append(module)
        for target in targets(module):
            if state.get(target) == 1:
                cycle = stack[stack.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[module] = 2
    for module in sorted(GRAPH):
        if module not in state:
            visit(module)


def test_the_checker_sees_deferred_imports(tmp_path):
    source = tmp_path / "probe.py"
    source.write_text("def f():\n    from harness.run import evaluate\n    import methods.base\n")
    assert imports_of(source, MODULES) == {"harness.run", "methods.base"}


@pytest.mark.parametrize("module", sorted(METHOD_MODULES))
def test_a_method_module_imports_no_other_method_module(module):
    others = sorted(method_modules_imported(MODULES[module]) - {module})
    assert not others, (f"{module} imports the method module(s) {others}; move what they share to methods/frames.py, "
                        f"methods/losses.py or methods/caches.py")


def test_the_checker_sees_a_method_module_imported(tmp_path):
    source = tmp_path / "probe.py"
    source.write_text("from methods.tent import Tent\nimport methods.frames\n\n"
                      "def f():\n    from methods import tpt\n    import methods.rpl\n    from methods.losses import x\n")
    assert method_modules_imported(source) == {"methods.tent", "methods.tpt", "methods.rpl"}
    assert {"methods.tent", "methods.tpt", "methods.rpl", "methods.tda"} <= METHOD_MODULES
    assert not {"methods.base", "methods.frames", "methods.losses", "methods.caches"} & METHOD_MODULES


MAX_FUNCTION_LINES = 60


def long_functions(path: Path) -> list[str]:
    """'name (N lines)' of every function in ``path`` longer than MAX_FUNCTION_LINES (decorators not counted)."""
    tree = ast.parse(path.read_text())
    return [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]


def test_no_function_over_sixty_lines_outside_scripts_and_tests():
    """A function a reader takes in at once; entry-point scripts and tests are left out."""
    found = {str(path.relative_to(ROOT)): long_functions(path) for path in ROOT.rglob("*.py")
             if not {".venv", "scripts", "tests", ".git"} & set(path.relative_to(ROOT).parts)}
    assert {path: names for path, names in found.items() if names} == {}


def test_the_length_check_counts_a_long_function(tmp_path):
    body = "\n".join(f"    x{k} = {k}" for k in range(MAX_FUNCTION_LINES))
    (tmp_path / "long.py").write_text(f"def long():\n{body}\n")
    assert long_functions(tmp_path / "long.py") == [f"long ({MAX_FUNCTION_LINES + 1} lines)"]
