"""Image conversion and atomic writes: of a file, of a PNG, of a whole folder."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_pil(image: torch.Tensor, scale: int = 1) -> Image.Image:
    """[3, H, W] in [0, 1] (or [K, 3, H, W]: a horizontal strip) → PIL, optionally upscaled (nearest)."""
    if image.ndim == 4:
        image = torch.cat(list(image), dim=-1)
    arr = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    pil = Image.fromarray(arr)
    return pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST) if scale > 1 else pil


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_folder(folder: str | Path, write: Callable[[Path], object]) -> Path:
    """``write(tmp)`` fills a temporary folder beside ``folder``; its files are fsynced and it is renamed to
    ``folder`` (an existing one is first moved aside, then removed). A reader sees the old folder or the new
    one, never a mix; a crash leaves at most a hidden ``.NAME.*`` temp folder."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    old = None
    try:
        write(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if folder.exists():
            old = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.old."))
            os.replace(folder, old)
        os.replace(tmp, folder)
        dir_fd = os.open(folder.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def save_png(image: torch.Tensor, path: str | Path, scale: int = 1) -> None:
    import io

    buf = io.BytesIO()
    to_pil(image, scale).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
