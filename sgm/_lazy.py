"""Lazy package namespaces (PEP 562): ``from sgm.diffusion import VanillaCFG`` imports
``sgm.diffusion.guiders`` when the name is first asked for, not when the package is imported.

So a torch-free module inside a package (``sgm.diffusion._checks``, ``sgm.networks.sizes``) can be
imported by the checks that run before torch is (run.py's config errors, sgm.tasks.sample_numbers).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def lazy_namespace(package: str, modules: Mapping[str, Sequence[str]]
                   ) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """``(__getattr__, __dir__, __all__)`` for ``package``: ``modules`` maps each submodule
    (relative, ``".guiders"``) to the public names it defines; any other name is tried as a submodule."""
    exports = {name: module for module, names in modules.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name in exports:
            value = getattr(importlib.import_module(exports[name], package), name)
        elif name.startswith("__"):
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        else:
            try:
                value = importlib.import_module(f".{name}", package)
            except ModuleNotFoundError as exc:
                if exc.name != f"{package}.{name}":
                    raise
                raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        setattr(importlib.import_module(package), name, value)  # later lookups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted(set(exports) | set(vars(importlib.import_module(package))))

    return __getattr__, __dir__, sorted(exports)
