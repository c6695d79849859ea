"""Lazy package exports, so importing a package imports none of its heavy submodules."""

import importlib
from collections.abc import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list]]:
    """Returns the module-level `__getattr__` and `__dir__` that load `exports[name]` (a module) on first use."""

    def __getattr__(name: str) -> object:
        if name not in exports:
            raise AttributeError(f"module '{package}' has no attribute '{name}'")
        return getattr(importlib.import_module(exports[name]), name)

    def __dir__() -> list:
        return sorted(exports)

    return __getattr__, __dir__
