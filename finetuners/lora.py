"""LoRA on the UNet attention projections (peft), saved and loaded in diffusers' own format.

``add_lora(unet, rank)`` adds an adapter on to_q, to_k, to_v and to_out.0 (ALGORITHMS.md §0.3);
``save_lora(unet, folder)`` writes ``pytorch_lora_weights.safetensors`` atomically through
``StableDiffusionPipeline.save_lora_weights``, so ``pipe.load_lora_weights(folder)`` reloads it
(no ``module.`` prefixes; §0.5). ``save_full_unet`` writes a whole UNet folder (safetensors).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .imageio import atomic_write_folder

TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
LORA_FILE = "pytorch_lora_weights.safetensors"


def add_lora(unet, rank: int = 4, alpha: float | None = None) -> list[torch.nn.Parameter]:
    """Freeze the UNet, add a LoRA adapter (rank r, α = r by default) and return its trainable parameters."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, init_lora_weights="gaussian",
                        target_modules=list(TARGET_MODULES))  # fmt: skip
    unet.add_adapter(config)
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # LoRA weights train in fp32 even under a fp16 UNet
    return params


def lora_state_dict(unet, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """The adapter's weights in diffusers' key format (default: the UNet's only or first adapter)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    name = adapter_name or next(iter(unet.peft_config))
    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=name))


def save_lora(unet, folder: str | Path) -> None:
    """Write the LoRA into ``folder`` (replaced atomically) as diffusers' ``pytorch_lora_weights.safetensors``."""
    from diffusers import StableDiffusionPipeline

    state = {k: v.detach().float().cpu().contiguous() for k, v in lora_state_dict(unet).items()}
    atomic_write_folder(Path(folder), lambda tmp: StableDiffusionPipeline.save_lora_weights(
        tmp, unet_lora_layers=state, safe_serialization=True))  # fmt: skip


def save_full_unet(unet, folder: str | Path) -> None:
    """Write the whole UNet as a diffusers folder (config.json + safetensors), atomically."""
    atomic_write_folder(Path(folder), lambda tmp: unet.save_pretrained(tmp, safe_serialization=True))


def load_lora(pipe, folder: str | Path, adapter_name: str | None = None) -> None:
    """Load a LoRA written by ``save_lora`` into a pipeline with diffusers' ``load_lora_weights``."""
    pipe.load_lora_weights(str(folder), weight_name=LORA_FILE, adapter_name=adapter_name)
