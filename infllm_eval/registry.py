"""One registration style for everything a config names by string: methods, task builders, metrics, model sources.

The project's own entries register themselves with a decorator in their own module:

    @METHODS.register("infllm")
    class InfLLM(ContextMethod): ...

A registry knows which of the project's modules fill it (`modules`) and imports them only on the first lookup, so
`infllm-eval ls` stays instant. Third-party code joins through the Python entry point group `infllm_eval`
(`[project.entry-points.infllm_eval] my_methods = "my_pkg.methods"`): each such module is imported on the first
lookup of any registry and registers with the same decorators. Config and task files of a plugin live in a folder
named by `INFLLM_EVAL_PATH` (`infllm_eval.paths`). Configs never import modules by path.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

from infllm_eval.errors import UserError, unknown_name

T = TypeVar("T")
ENTRY_POINT_GROUP = "infllm_eval"
_plugins_loaded = False


def load_plugins() -> None:
    """Import every module of the `infllm_eval` entry point group once (they register themselves)."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as e:  # noqa: BLE001 - a broken plugin is named in one sentence, not a traceback
            raise UserError(f"The infllm_eval plugin '{ep.name}' ({ep.value}) failed to import: "
                            f"{type(e).__name__}: {e}.") from e


class Registry(Generic[T]):
    """name -> entry. `kind` names the entries in messages ("method", "task builder", ...)."""

    def __init__(self, kind: str, modules: tuple[str, ...] = ()):
        self.kind = kind
        self.modules = modules  # the project's modules that register entries here, imported on first lookup
        self._entries: dict[str, T] = {}
        self._loaded = False

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: `@REGISTRY.register("name")`. A second, different entry under one name is an error."""

        def add(obj: T) -> T:
            self.add(name, obj)
            return obj

        return add

    def add(self, name: str, obj: T) -> None:
        old = self._entries.get(name)
        if old is not None and old is not obj and getattr(old, "__qualname__", None) != getattr(obj, "__qualname__", 0):
            raise UserError(f"Two {self.kind}s are registered as '{name}' ({_where(old)} and {_where(obj)}); "
                            f"rename one.")
        self._entries[name] = obj

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            for module in self.modules:
                importlib.import_module(module)
            load_plugins()

    def get(self, name: str) -> T:
        self._load()
        if name not in self._entries:
            raise unknown_name(self.kind, name, list(self._entries))
        return self._entries[name]

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def __getitem__(self, name: str) -> T:
        """`REGISTRY[name]`, the same as `get`: an unknown name is a UserError with a suggestion."""
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def items(self) -> list[tuple[str, T]]:
        self._load()
        return sorted(self._entries.items())

    def values(self) -> list[T]:
        return [obj for _, obj in self.items()]


def _where(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"
