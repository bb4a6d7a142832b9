"""Names that users give to things kept in folders (runs, policies): one path component, never an escape.

A name is letters, digits, '.', '_' and '-', starts with a letter or digit, holds no '..', and is at most
``max_chars`` long; ``child_folder`` also checks that the resolved path sits directly in its root.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import UserError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def is_valid_name(name, max_chars: int) -> bool:
    return isinstance(name, str) and len(name) <= max_chars and bool(_NAME.match(name)) and ".." not in name


def check_name(name, what: str, max_chars: int) -> str:
    """``name`` itself, or a ``UserError`` saying what a valid ``what`` name looks like."""
    if not is_valid_name(name, max_chars):
        raise UserError(f"invalid {what} name {name!r}: use letters, digits, '.', '_' and '-' only "
                        f"(no path separators or '..', at most {max_chars} characters)")  # fmt: skip
    return name


def child_folder(root: str | Path, name, what: str, max_chars: int, folder_word: str) -> Path:
    """``root/name`` resolved, refusing any name that could leave ``root`` (``folder_word``: "runs"…)."""
    root = Path(root).resolve()
    path = (root / check_name(name, what, max_chars)).resolve()
    if path.parent != root:
        raise UserError(f"{what} name {name!r} escapes the {folder_word} folder")
    return path
