"""What the config schema and a config's identity need of the methods, without running the method modules: each
method's name and aliases, the classes it derives from and the config nodes they declare (``config_defaults``).
A method module imports torch (seconds, a minute on a busy machine); the commands that only read files (``--help``,
``grid.py status`` and ``report``, ``compare.py --results``) compose and hash configs but run no method.

The built-in methods' declarations are read from their source files with ``ast``, not run:

- ``@register_method("name", aliases=(...))`` on a class: its name and aliases (literals);
- the class's bases, by the names its module defines or imports from another module of this package (bases from
  outside, such as torch's ``nn.Module``, declare no node and are left out);
- ``config_defaults = {...}`` (and ``auxiliary_models = {...}``) in the class body: evaluated with what the module
  imports from ``conf`` (``Option``, ...) and its own constants (``VOTES = ("eps_softmax", "one_hot")``), as Python
  evaluates it when the module runs.

Each class becomes a stand-in class of the same name, module, bases, ``config_defaults`` and ``auxiliary_models``,
which is all that ``own_nodes``, ``nodes_declared_by`` and ``harness.build.input_files`` read. Once a built-in method
module runs (a run imports them), or where a built-in declaration cannot be read this way (a ``config_defaults``
computed by something the module does not take from ``conf`` or its constants), the registered classes themselves
are used: the built-in methods are imported.
tests/test_startup.py checks that both give the same declarations for every built-in method, and a grid the same
jobs."""
from __future__ import annotations

import ast
import functools
import importlib
import pkgutil
import sys
from pathlib import Path

from conf.registry import Registry
from methods.registry import METHODS, nodes_declared_by

PACKAGE_DIR = Path(__file__).resolve().parent
# Modules of this package that hold shared code, not a method: the base class, the frames and parameter helpers,
# the loss kernels, the caches, the test-time views, the learnable prompts (TPT's and C-TPT's), the registry and
# this reader. A method module imports these, never another method module (tests/test_architecture.py).
INFRASTRUCTURE = {"base", "frames", "losses", "caches", "augmentations", "prompts", "registry",
                  "declarations", "batchnorm", "teachers", "ood_scores"}


# What a stand-in holds of its class's body: the config nodes it declares, the further CLIPs it needs and the keys
# under which it reads source data (all part of what a run reads: harness.build.input_files).
DECLARED_ATTRIBUTES = ("config_defaults", "auxiliary_models", "source_data")


class UnreadableDeclaration(Exception):
    """A built-in module's declarations cannot be read from its source; the module is imported instead."""


@functools.lru_cache(maxsize=1)
def builtin_method_modules() -> tuple[str, ...]:
    """The modules of the built-in methods (every module of this package but the shared ones)."""
    return tuple(f"methods.{m.name}" for m in pkgutil.iter_modules([str(PACKAGE_DIR)])
                 if m.name not in INFRASTRUCTURE and not m.name.startswith("_"))


def load_builtin_methods() -> None:
    """Import every built-in method module, so that its methods are registered in METHODS."""
    for module in builtin_method_modules():
        importlib.import_module(module)


def builtins_loaded() -> bool:
    return any(module in sys.modules for module in builtin_method_modules())


def method_declarations() -> Registry:
    """Every method's class by name, for its declarations: the registered classes once a built-in method module has
    run (the other built-ins are imported then too); otherwise the built-ins' stand-ins read from their sources and
    the plug-ins registered so far."""
    static = None if builtins_loaded() else _static_declarations()
    if static is None:
        load_builtin_methods()
        return METHODS
    declarations = Registry(METHODS.kind, METHODS.key)
    aliases = {}
    for registry in (static, METHODS):
        for alias, name in registry.aliases().items():
            aliases.setdefault(name, []).append(alias)
    for registry in (static, METHODS):
        for name, cls in registry.items():
            declarations.add(name, cls, aliases.get(name, ()))
    return declarations


def declared_nodes(leave_out_modules=frozenset()) -> dict[str, dict]:
    """Every node declared by a method (built-in or registered plug-in), except those of methods defined in
    ``leave_out_modules`` (methods.registry.nodes_declared_by)."""
    return nodes_declared_by([cls for _, cls in method_declarations().items()], leave_out_modules)


# ------------------------------------------------------------------------------------------------ reading sources

@functools.lru_cache(maxsize=1)
def _static_declarations() -> Registry | None:
    """The built-in methods' stand-ins by name; None when a module's declarations cannot be read."""
    registry = Registry(METHODS.kind, METHODS.key)
    try:
        for module in builtin_method_modules():
            for name, aliases, cls in _read_module(module)["__registered__"]:
                registry.add(name, cls, aliases)
    except (UnreadableDeclaration, OSError, SyntaxError, ValueError):
        return None
    return registry


@functools.lru_cache(maxsize=None)
def _read_module(module: str) -> dict:
    """The names a module of this package defines that declarations use (its conf imports, constants and classes,
    the latter as stand-ins), and under "__registered__" its registrations [(name, aliases, stand-in)]."""
    path = PACKAGE_DIR / f"{module.split('.', 1)[1]}.py"
    namespace: dict = {"__name__": module}
    registered = []
    for statement in ast.parse(path.read_text(), str(path)).body:
        if isinstance(statement, ast.ImportFrom) and statement.level == 0 and statement.module:
            _import_names(statement, namespace)
        elif isinstance(statement, (ast.Assign, ast.AnnAssign)) and statement.value is not None:
            targets = statement.targets if isinstance(statement, ast.Assign) else [statement.target]
            if all(isinstance(t, ast.Name) for t in targets):
                try:
                    value = _evaluate(statement.value, namespace, path)
                except UnreadableDeclaration:
                    continue      # a value computed with what is not read here (torch): no declaration uses it
                for target in targets:
                    namespace[target.id] = value
        elif isinstance(statement, ast.ClassDef):
            cls = _stand_in(statement, module, namespace, path)
            namespace[statement.name] = cls
            registered += [(*_registration(d, path), cls) for d in statement.decorator_list if _registers(d)]
    namespace["__registered__"] = registered
    return namespace


def _import_names(statement: ast.ImportFrom, namespace: dict) -> None:
    """``from conf... import x``: the real x (conf imports nothing heavy); ``from methods.m import x``: x as read
    from m. Anything else (torch, the standard library) is not read."""
    source = statement.module
    if source == "conf" or source.startswith("conf."):
        imported = vars(importlib.import_module(source))
    elif source.startswith("methods.") and source not in ("methods.registry", "methods.declarations"):
        imported = _read_module(source)
    else:
        return
    for alias in statement.names:
        if alias.name in imported:
            namespace[alias.asname or alias.name] = imported[alias.name]


def _evaluate(node: ast.expr, namespace: dict, path: Path):
    try:
        return eval(compile(ast.Expression(node), str(path), "eval"), namespace)   # noqa: S307 (our own source)
    except Exception as err:      # a name that is not read here, or a call of one
        raise UnreadableDeclaration(f"{path}:{node.lineno}: {type(err).__name__}: {err}") from None


def _stand_in(statement: ast.ClassDef, module: str, namespace: dict, path: Path) -> type:
    bases = []
    for base in statement.bases:
        if isinstance(base, ast.Name) and isinstance(namespace.get(base.id), type):
            bases.append(namespace[base.id])
    body = {"__module__": module, "__qualname__": statement.name}
    for item in statement.body:
        targets = item.targets if isinstance(item, ast.Assign) else [item.target] if isinstance(item, ast.AnnAssign) \
            else []
        declared = [t.id for t in targets if isinstance(t, ast.Name) and t.id in DECLARED_ATTRIBUTES]
        if declared and item.value is not None:
            body[declared[0]] = _evaluate(item.value, namespace, path)
    try:
        return type(statement.name, tuple(bases) or (object,), body)
    except TypeError as err:     # an order of bases Python refuses without the bases left out
        raise UnreadableDeclaration(f"{path}:{statement.lineno}: {err}") from None


def _registers(decorator: ast.expr) -> bool:
    return (isinstance(decorator, ast.Call) and isinstance(decorator.func, ast.Name)
            and decorator.func.id == "register_method")


def _registration(decorator: ast.Call, path: Path) -> tuple[str, tuple[str, ...]]:
    """register_method(name, aliases=()) as written: literals."""
    try:
        args = [ast.literal_eval(a) for a in decorator.args]
        kwargs = {k.arg: ast.literal_eval(k.value) for k in decorator.keywords}
    except ValueError as err:
        raise UnreadableDeclaration(f"{path}:{decorator.lineno}: register_method's arguments: {err}") from None
    if not 1 <= len(args) <= 2 or set(kwargs) - {"aliases"} or (len(args) == 2 and kwargs):
        raise UnreadableDeclaration(f"{path}:{decorator.lineno}: register_method's arguments are not (name, aliases)")
    return args[0], tuple(args[1] if len(args) == 2 else kwargs.get("aliases", ()))
