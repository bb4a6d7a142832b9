"""Names that users give to things kept in folders (runs, policies): one path component, never an escape.

A name is letters, digits, '.', '_' and '-', starts with a letter or digit, holds no '..', and is at most
``max_chars`` long; ``child_folder`` also checks that the resolved path sits directly in its root.
``typed_path`` turns a path someone typed (a model folder, an export folder) into a ``Path`` that every filesystem
call can take, or a ``UserError`` saying why it cannot be one.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import UserError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
NAME_MAX_BYTES = 255  # one path component (Linux NAME_MAX): longer ones make stat() fail with ENAMETOOLONG
PATH_MAX_BYTES = 4095  # a whole path (Linux PATH_MAX less the terminating NUL)


def is_valid_name(name, max_chars: int) -> bool:
    return isinstance(name, str) and len(name) <= max_chars and bool(_NAME.match(name)) and ".." not in name


def check_name(name, what: str, max_chars: int) -> str:
    """``name`` itself, or a ``UserError`` saying what a valid ``what`` name looks like."""
    if not is_valid_name(name, max_chars):
        raise UserError(f"invalid {what} name {name!r}: use letters, digits, '.', '_' and '-' only "
                        f"(no path separators or '..', at most {max_chars} characters)")  # fmt: skip
    return name


def child_folder(root: str | Path, name, what: str, max_chars: int, folder_word: str) -> Path:
    """``root/name`` resolved, refusing any name that could leave ``root`` (``folder_word``: "runs"…), and a root
    (typed: ``--runs``, ``--run``'s parent) that no filesystem call could take."""
    root = typed_path(root, f"{folder_word} folder").resolve()
    path = (root / check_name(name, what, max_chars)).resolve()
    if path.parent != root:
        raise UserError(f"{what} name {name!r} escapes the {folder_word} folder")
    if len(os.fsencode(path)) > PATH_MAX_BYTES:
        raise UserError(f"the {what} folder's path is too long (at most {PATH_MAX_BYTES} bytes in all)")
    return path


def typed_path(text, what: str) -> Path:
    """``text`` (a path someone typed) as a ``Path`` with '~' expanded; ``UserError`` for what the operating system
    would refuse with an exception other than "not found": a NUL byte, text with no bytes on disk (a lone
    surrogate), a part over 255 bytes or a whole over 4095, a '~user' with no home folder."""
    if not isinstance(text, str | os.PathLike):
        raise UserError(f"the {what} must be text, got {type(text).__name__}")
    text = os.fspath(text)
    if "\x00" in text:
        raise UserError(f"the {what} contains a NUL byte: type a plain path")
    try:
        encoded = os.fsencode(text)
    except UnicodeEncodeError as e:
        raise UserError(f"the {what} {text!r} holds characters that cannot be part of a file name") from e
    if len(encoded) > PATH_MAX_BYTES or any(len(part) > NAME_MAX_BYTES for part in encoded.split(b"/")):
        raise UserError(f"the {what} is too long (at most {NAME_MAX_BYTES} bytes per folder name, "
                        f"{PATH_MAX_BYTES} in all)")  # fmt: skip
    try:
        return Path(text).expanduser()
    except RuntimeError as e:  # "~nobody/x": no such user, or no home folder
        raise UserError(f"the {what} {text!r} starts with '~' but that home folder is unknown") from e


def entries_of_new_folder(folder: Path, what: str) -> list[str]:
    """The names in ``folder``, which a new run or policy is about to fill ([] when it does not exist yet), for the
    caller to refuse a folder that already holds something; ``UserError`` when ``folder`` is a file."""
    if not folder.exists():
        return []
    if not folder.is_dir():
        raise UserError(f"{what} {str(folder)!r} is a file, not a folder: choose another")
    return [p.name for p in folder.iterdir()]
