"""Result tensors → PIL images for display: the only image handling the UI does."""

from __future__ import annotations

from PIL import Image

from finetuners.imageio import to_pil


def display_scale(width: int, target_px: int) -> int:
    """Whole-number upscale that brings a small image (e.g. 32 px Shapes) to about ``target_px``; 1 if large."""
    return max(1, target_px // max(1, width))


def to_display(image, target_px: int = 256) -> Image.Image:
    """[3, H, W] in [0, 1] → PIL, upscaled by nearest neighbour so every model pixel stays a crisp block."""
    return to_pil(image, display_scale(image.shape[-1], target_px))
