"""Server-folder imports: only folders under the configured roots may be read.

The roots come from `$TLCORE_DATA_ROOTS` (separated by `os.pathsep`, e.g. `/data:/srv/images`)
and from whatever the caller adds (the dashboard passes the roots in its config). A path is
resolved with every symlink followed before it is checked, so `..`, absolute paths and links
pointing out of a root are all refused the same way.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from tlcore.errors import SourceNotAllowed

ROOTS_ENV = "TLCORE_DATA_ROOTS"


def allowed_roots(extra: Iterable[str | os.PathLike] | None = None) -> list[Path]:
    """The folders server imports may read: `$TLCORE_DATA_ROOTS` plus `extra`, resolved.

    Defaults to none, in which case no server folder can be imported.
    """
    raw = [p for p in os.environ.get(ROOTS_ENV, "").split(os.pathsep) if p.strip()]
    raw += [os.fspath(p) for p in (extra or [])]
    roots: list[Path] = []
    for p in raw:
        real = Path(os.path.realpath(os.path.expanduser(str(p).strip())))
        if real not in roots:
            roots.append(real)
    return roots


def is_under(path: str | os.PathLike, roots: Iterable[str | os.PathLike]) -> bool:
    """True if `path`, with symlinks resolved, is one of `roots` or inside one."""
    real = os.path.realpath(path)
    for root in roots:
        r = os.path.realpath(root)
        if real == r or real.startswith(r.rstrip(os.sep) + os.sep):
            return True
    return False


def resolve_under_roots(path: str | os.PathLike,
                        roots: Iterable[str | os.PathLike] | None = None) -> Path:
    """The real path of `path` if it lies under one of `roots` (defaults to `allowed_roots()`).

    Raises:
        SourceNotAllowed: no roots are configured, or the resolved path is outside all of them.
        FileNotFoundError: the path is allowed but does not exist.
    """
    roots = [Path(os.path.realpath(r)) for r in roots] if roots is not None else allowed_roots()
    if not roots:
        raise SourceNotAllowed(
            f"No server folders are open for import, so {os.fspath(path)!r} cannot be read. "
            f"An administrator can list allowed folders in ${ROOTS_ENV} (separated by "
            f"{os.pathsep!r}); otherwise upload a zip."
        )
    real = Path(os.path.realpath(os.path.expanduser(os.fspath(path))))
    if not is_under(real, roots):
        named = ", ".join(str(r) for r in roots)
        via = "" if str(real) == os.path.abspath(os.fspath(path)) else f" (it resolves to {real})"
        raise SourceNotAllowed(
            f"{os.fspath(path)!r} is outside the folders open for import{via}. Allowed: {named}. "
            "Choose a folder under one of them, or upload a zip."
        )
    if not real.exists():
        raise FileNotFoundError(f"{os.fspath(path)!r} does not exist under the allowed folders.")
    return real
