"""The method registry (MODEL.ADAPTATION -> class), filled by the ``@register_method`` decorator, and the config
nodes method classes declare."""
from __future__ import annotations

from conf.errors import ConfigError
from conf.registry import Registry

METHODS = Registry("method", "MODEL.ADAPTATION")


def register_method(name: str, aliases: tuple[str, ...] = ()):
    """Class decorator: registers the method under ``name`` (and ``aliases``); sets ``cls.method_name``."""
    def decorate(cls):
        METHODS.add(name, cls, aliases)
        cls.method_name = name
        return cls
    return decorate


def own_nodes(cls) -> dict[str, dict]:
    """The config nodes a method class reads: those declared in ``config_defaults`` by it and by the classes it
    derives from (a subclass of RPL reads RPL's node, and may declare nodes of its own)."""
    nodes: dict[str, dict] = {}
    for klass in reversed(cls.__mro__):
        nodes.update(klass.__dict__.get("config_defaults", {}) or {})
    return nodes


def nodes_declared_by(classes, leave_out_modules=frozenset()) -> dict[str, dict]:
    """Every node declared by the method ``classes`` (and the classes they derive from), except those of methods
    defined in ``leave_out_modules`` (plug-in modules another config imported). A node belongs to the class whose
    ``config_defaults`` declares it; subclasses share it. Two unrelated classes declaring one node name is an
    error. (methods.declared_nodes: the nodes of every method.)"""
    owners: dict[str, type] = {}
    nodes: dict[str, dict] = {}
    for cls in {id(c): c for c in classes}.values():
        if any(cls.__module__ == m or cls.__module__.startswith(m + ".") for m in leave_out_modules):
            continue
        for klass in cls.__mro__:
            for node, keys in (klass.__dict__.get("config_defaults", {}) or {}).items():
                if node in owners and owners[node] is not klass:
                    raise ConfigError(f"config node {node} is declared by both {owners[node].__qualname__} and "
                                      f"{klass.__qualname__}; give one of them another node name")
                owners[node] = klass
                nodes[node] = keys
    return nodes
