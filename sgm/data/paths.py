"""The one check that a path given by the user names an existing file (torch-free: the validate steps use it)."""

from __future__ import annotations

import os
from pathlib import Path


def existing_file(path: str | os.PathLike[str], what: str, kind: str = "file", hint: str = "",
                  directory_error: type[Exception] = IsADirectoryError) -> Path:
    """``path`` as a :class:`~pathlib.Path` to an existing file, else an error that names the parameter ``what``
    and says which of the two it is: a directory (``directory_error``, "is a directory, not a ``kind``") or
    nothing there (FileNotFoundError, "does not exist"); ``hint`` follows either message (": give ...")."""
    path = Path(str(path))
    if path.is_dir():
        raise directory_error(f"{what} {str(path)!r} is a directory, not a {kind}{hint}")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist{hint}")
    return path
