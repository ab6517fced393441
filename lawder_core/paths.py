"""Paths built from untrusted names, and writing that never goes through a symbolic link.

Names that come from data (HDF5 case ids, image file stems, CT volume names) become file names only through
`safe_name` / `unique_names`: the result is one path component of [A-Za-z0-9._-], so it cannot climb out of its
folder (`../x`), make a sub-folder (`a/b`), look like an option (`-rf`), be hidden or empty.

`write_safely` refuses a symbolic link at the target (even where --force allows replacing files), creates its
temporary file exclusively without following links, and renames it over the target: a link planted in an
output folder is never written through. `links_leaving` finds input files that only lead out of their folder.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

from lawder_core.errors import DataError
from lawder_core.files import atomic_save

MAX_NAME = 100  # characters of a sanitised name, suffixes (.png, _seg.nii.gz) not counted
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def safe_name(name: object, max_length: int = MAX_NAME) -> str:
    """One harmless file-name component: characters outside [A-Za-z0-9._-] become `_`, leading dots and dashes
    go, at most `max_length` characters (a cut name ends in a hash of the whole, so cut names stay apart),
    never empty ("unnamed")."""
    text = str(name)
    cleaned = _UNSAFE.sub("_", text).lstrip(".-")
    if len(cleaned) > max_length:
        digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        cleaned = f"{cleaned[:max_length - 9]}_{digest}"
    return cleaned or "unnamed"


def unique_names(names: Iterable[object], max_length: int = MAX_NAME) -> list[str]:
    """`safe_name` of each, in order, made unique within the list ignoring case (a case-insensitive file system
    would merge `A` and `a`): a later duplicate gets `-2`, `-3`, ..."""
    taken: set[str] = set()
    out = []
    for name in names:
        base = safe_name(name, max_length)
        candidate, k = base, 1
        while candidate.casefold() in taken:
            k += 1
            suffix = f"-{k}"
            candidate = f"{base[:max_length - len(suffix)]}{suffix}"
        taken.add(candidate.casefold())
        out.append(candidate)
    return out


def refuse_symlink(path: str | os.PathLike, what: str = "output") -> None:
    """A DataError (exit 3) naming `path` when it is a symbolic link: lawder does not write through one."""
    path = Path(path)
    if path.is_symlink():
        raise DataError(f"the {what} {path} is a symbolic link (to {os.readlink(path)}); lawder does not write "
                        "through symbolic links, not even with --force.",
                        "Remove the link, or choose another -o folder.")


def open_new(path: str | os.PathLike) -> BinaryIO:
    """A new file opened for writing: never through a symbolic link and never over an existing file."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags, 0o666)
    except FileExistsError as err:
        raise DataError(f"cannot write {path}: something is already there (a link or a leftover file).",
                        "Remove it and run again.") from err
    return os.fdopen(fd, "wb")


def write_safely(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """`write(file)` into a fresh temporary file, renamed over `path` (atomic); refused when `path` is a link."""
    refuse_symlink(path)

    def save(tmp: Path) -> None:
        with open_new(tmp) as f:
            write(f)

    return atomic_save(save, path)


def is_inside(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """Whether `path`, every link on the way resolved, lies in `folder` (itself resolved)."""
    return Path(path).resolve().is_relative_to(Path(folder).resolve())


def links_leaving(folder: str | os.PathLike, files: Iterable[Path]) -> list[Path]:
    """The `files` (found in `folder`) that resolve outside it: a link out, or a file under a linked folder."""
    return [path for path in files if not is_inside(path, folder)]
