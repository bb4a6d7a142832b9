"""Reward functions (ALGORITHMS.md §6) in one explicit registry.

Every reward is built by a factory, ``make_reward(name, device=..., weights=...)``, and has the signature
``reward_fn(images [B, 3, H, W] float32 in [0, 1], prompts, metadata) -> (rewards float32 [B], info)``.
Heavy imports live inside the factories. Weights come only from a user-given local path, never a download.

Besides the fixed names, ``preference:<folder>`` is a Bradley–Terry preference model trained on the user's own
labels (``finetuners.preference``, the Label tab's "Train preference reward"): ``<folder>`` holds its
``config.json`` and ``model.safetensors``. A bare name (no ``/``) that is not a folder here is looked up in
``data/rewards/<name>``, where the app with its default ``--data-dir`` saves them. ``weights``, if given, is
the Shapes probe folder the model was trained on (default: the shipped one).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import UserError

RewardFn = Callable[[torch.Tensor, list, list], tuple[torch.Tensor, dict]]
JPEG_QUALITY = 95


@dataclass(frozen=True)
class RewardSpec:
    name: str
    factory: Callable[..., RewardFn]
    differentiable: bool
    needs_weights: bool
    description: str


def check_images(images: torch.Tensor) -> None:
    """The §6 contract: float32 [B, 3, H, W] in [0, 1]."""
    assert images.dtype == torch.float32, f"rewards take float32 images, got {images.dtype}"
    assert images.ndim == 4 and images.shape[1] == 3, f"rewards take [B, 3, H, W], got {tuple(images.shape)}"
    lo, hi = float(images.detach().min()), float(images.detach().max())
    assert lo >= 0.0 and hi <= 1.0, f"rewards take images in [0, 1], got [{lo:g}, {hi:g}]"


def jpeg_kilobytes(images: torch.Tensor) -> torch.Tensor:
    """Size in kB of each image as a PIL JPEG at quality 95 (as DDPO)."""
    arr = (images.detach().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    sizes = []
    for a in arr:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="JPEG", quality=JPEG_QUALITY)
        sizes.append(buf.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32)


def _jpeg(sign: float) -> Callable[..., RewardFn]:
    def factory(device=None, weights=None) -> RewardFn:
        def fn(images, prompts, metadata):
            check_images(images)
            kb = jpeg_kilobytes(images)
            return sign * kb, {"jpeg_kb": kb}

        return fn

    return factory


def _probe(weights, device):
    from .models import PROBE_PATH
    from .shapes.probe import ShapesProbe

    folder = Path(weights) if weights else PROBE_PATH
    if not (folder / "model.safetensors").is_file():
        raise UserError(f"the Shapes probe is missing: no model.safetensors in {str(folder)!r}; "
                        "pass --reward-weights PATH to a probe folder")  # fmt: skip
    return ShapesProbe.load(folder, device or "cpu")


def _shapes_probe(device=None, weights=None) -> RewardFn:
    from .shapes.probe import prompt_log_prob

    probe = _probe(weights, device)

    def fn(images, prompts, metadata):
        check_images(images)
        dev = next(probe.parameters()).device
        return prompt_log_prob(probe, images.to(dev), list(prompts)).float().cpu(), {}

    return fn


def _shapes_accuracy(device=None, weights=None) -> RewardFn:
    from .shapes.probe import prompt_accuracy

    probe = _probe(weights, device)

    @torch.no_grad()
    def fn(images, prompts, metadata):
        check_images(images)
        dev = next(probe.parameters()).device
        return prompt_accuracy(probe, images.to(dev), list(prompts)).float().cpu(), {}

    return fn


def _needs_weights(name: str, what: str) -> Callable[..., RewardFn]:
    def factory(device=None, weights=None) -> RewardFn:
        if not weights:
            raise UserError(f"reward {name!r} ({what}) is not available offline: download its weights yourself "
                            f"and pass --reward-weights PATH")  # fmt: skip
        if not Path(weights).exists():
            raise UserError(f"reward {name!r}: weights path {str(weights)!r} does not exist")
        raise UserError(f"reward {name!r}: loading local weights is not implemented yet ({str(weights)!r})")

    return factory


PREFERENCE_PREFIX = "preference:"
DEFAULT_REWARDS_DIR = Path("data") / "rewards"  # where the app, run with its default --data-dir, saves them


def preference_folder(name: str) -> Path:
    """The folder of the preference model named by ``preference:<folder or name>``; ``UserError`` if it is
    missing or holds no trained model."""
    ref = name[len(PREFERENCE_PREFIX) :].strip()
    if not ref:
        raise UserError("reward 'preference:' needs a folder or a name, e.g. preference:data/rewards/labels")
    folder = Path(ref).expanduser()
    if not folder.is_dir() and len(folder.parts) == 1:
        folder = DEFAULT_REWARDS_DIR / ref
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise UserError(f"reward {name!r}: no trained preference model in {str(folder)!r} "
                        "(train one with \"Train preference reward\" in the Label tab)")  # fmt: skip
    return folder


def _preference(folder: Path) -> Callable[..., RewardFn]:
    def factory(device=None, weights=None) -> RewardFn:
        from .preference import preference_reward

        # ``weights`` (--reward-weights) overrides the encoder the model reads: the Shapes probe's folder, or
        # the CLIP folder of a model on CLIP features. UserError for a corrupt folder or another encoder.
        reward = preference_reward(folder, probe=weights, clip=weights)
        if device is not None:
            reward.model.to(device)
            reward.features.to(device)

        def fn(images, prompts, metadata):
            check_images(images)
            return reward(images, list(prompts), metadata)

        return fn

    return factory


REGISTRY: dict[str, RewardSpec] = {
    s.name: s
    for s in [
        RewardSpec("jpeg-compressibility", _jpeg(-1.0), False, False, "−JPEG size in kB at quality 95"),
        RewardSpec("jpeg-incompressibility", _jpeg(1.0), False, False, "+JPEG size in kB at quality 95"),
        RewardSpec("shapes-probe", _shapes_probe, True, False, "Shapes probe log-prob of the prompt"),
        RewardSpec("shapes-accuracy", _shapes_accuracy, False, False, "Shapes probe exact prompt accuracy"),
        RewardSpec(
            "aesthetic",
            _needs_weights("aesthetic", "LAION aesthetic MLP on CLIP ViT-L/14"),
            True,
            True,
            "LAION aesthetic score",
        ),  # fmt: skip
        RewardSpec("imagereward", _needs_weights("imagereward", "BLIP + MLP"), True, True, "ImageReward"),
        RewardSpec("pickscore", _needs_weights("pickscore", "CLIP-H fine-tuned"), True, True, "PickScore"),
        RewardSpec("hpsv2", _needs_weights("hpsv2", "open_clip ViT-H-14 + HPS"), True, True, "HPSv2"),
    ]
}


def reward_spec(name: str) -> RewardSpec:
    if isinstance(name, str) and name.startswith(PREFERENCE_PREFIX):
        folder = preference_folder(name)
        return RewardSpec(name, _preference(folder), True, False, f"preference model learned from labels ({folder})")
    if name not in REGISTRY:
        raise UserError(f"unknown reward {name!r}: choose one of {', '.join(REGISTRY)}, or preference:<folder>")
    return REGISTRY[name]


def check_reward_fits(name: str, pipe) -> None:
    """A ``UserError`` when the reward cannot read ``pipe``'s images: the Shapes probe's rewards read the Shapes
    world's 32×32 images (its pooling would score a 512×512 image without error, and the score would mean nothing)."""
    from .shapes.world import IMAGE_SIZE

    if name.startswith("shapes-") and (size := pipe.unet.config.sample_size * pipe.vae_scale_factor) != IMAGE_SIZE:
        raise UserError(f"{name} reads {IMAGE_SIZE}×{IMAGE_SIZE} Shapes images, and this model draws {size}×{size}: "
                        "choose a preference model learned in the Label tab, or a scorer of real images")  # fmt: skip


def make_reward(name: str, device=None, weights: str | Path | None = None) -> RewardFn:
    """Build the named reward; ``weights`` is a local path (required where ``needs_weights``)."""
    return reward_spec(name).factory(device=device, weights=weights)
