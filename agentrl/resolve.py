"""Turn a name into an object: a plain ``{"name": "module:attr"}`` table plus a dotted-path fallback."""

from __future__ import annotations

import importlib
from typing import Any


def resolve(name: str, table: dict[str, str], kind: str) -> Any:
    """Look ``name`` up in ``table``, else import it as ``package.module:attr``.

    Args:
        name: a table key (``"calculator"``) or an import path (``"my_pkg.envs:ShopEnv"``).
        table: the name table, values are ``module:attr`` paths.
        kind: what is being resolved, for the error message (``"environment"``, ``"reward"``).

    Example:
        >>> resolve("json:dumps", {}, "function").__name__
        'dumps'
    """
    path = table.get(name, name)
    if ":" not in path:
        raise KeyError(f"unknown {kind} {name!r}: known names are {sorted(table)}, "
                       "or give an import path like 'my_pkg.module:Name'")
    module_name, attr = path.split(":", 1)
    module = importlib.import_module(module_name)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise AttributeError(f"{kind} {name!r}: module {module_name!r} has no attribute {attr!r}") from None
