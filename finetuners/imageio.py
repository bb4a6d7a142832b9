"""Image conversion and atomic PNG writes."""

from __future__ import annotations

import os
import tempfile
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


def save_png(image: torch.Tensor, path: str | Path, scale: int = 1) -> None:
    import io

    buf = io.BytesIO()
    to_pil(image, scale).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
