"""Names of a package imported on first use, so importing the package stays light (PEP 562)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    package: dict[str, Any], exports: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module-level ``__getattr__`` and ``__dir__`` of a package whose public ``name`` lives in the
    module ``exports[name]``: imported on first access, then kept in the package's ``globals()``."""

    def __getattr__(name: str) -> Any:
        module_name = exports.get(name)
        if module_name is None:
            raise AttributeError(f"module {package['__name__']!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module_name), name)
        package[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(exports) | set(package))

    return __getattr__, __dir__
