"""Text-to-image generation over the shared primitives: the function behind the Sample tab and the CLI.

``SampleRequest`` validates every user-facing setting on construction (a ``UserError`` with a clear
message otherwise). ``generate`` encodes the prompt with the pipeline's own ``encode_prompt``, draws
x_T per image from ``seed + i`` (so image i of a batch equals image 0 at seed + i), runs
``sample_loop`` and decodes with the pipeline's VAE.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import torch

from .denoisers import CFGDenoiser, unet_denoiser
from .errors import UserError
from .sampling import Trajectory, initial_noise, sample_loop
from .steps import timesteps

Sampler = Literal["ddim", "ddim-trailing", "lcm"]
SAMPLERS: tuple[str, ...] = ("ddim", "ddim-trailing", "lcm")
LIMITS = {"steps": (1, 200), "batch": (1, 64), "seed": (0, 2**32 - 1), "guidance": (0.0, 30.0), "eta": (0.0, 1.0)}
MAX_PROMPT_CHARS = 1000


def is_text(value) -> bool:
    """A ``str`` that can be written as UTF-8 (no lone surrogate halves, which browsers and APIs can send)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True)
class SampleRequest:
    prompt: str
    steps: int = 20
    sampler: str = "ddim"  # ddim: leading spacing (SD 1.x); ddim-trailing: SD-Turbo; lcm: LCM scheduler
    eta: float = 0.0  # DDIM stochasticity: 0 deterministic, 1 DDPM-like
    guidance: float = 3.0  # classifier-free guidance scale; ≤ 1 means no guidance (one UNet pass)
    seed: int = 0
    batch: int = 1
    negative_prompt: str = ""
    record_pred_x0: bool = True  # decode x̂0 at every step (the dual-state strip)

    def __post_init__(self):
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise UserError("the prompt is empty: type what the image should show")
        if len(self.prompt) > MAX_PROMPT_CHARS:
            raise UserError(f"the prompt is too long ({len(self.prompt)} characters; at most {MAX_PROMPT_CHARS})")
        if not is_text(self.prompt) or not is_text(self.negative_prompt):
            raise UserError("the prompt holds characters that are not valid text (a lone surrogate): retype it")
        for name in ("steps", "batch", "seed"):
            value = getattr(self, name)
            if isinstance(value, float) and value.is_integer():
                object.__setattr__(self, name, int(value))
                value = int(value)
            if not isinstance(value, int) or isinstance(value, bool):
                raise UserError(f"{name} must be a whole number, got {value!r}")
            lo, hi = LIMITS[name]
            if not lo <= value <= hi:
                raise UserError(f"{name} must be between {lo} and {hi}, got {value}")
        for name in ("guidance", "eta"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
                raise UserError(f"{name} must be a number, got {value!r}")
            lo, hi = LIMITS[name]
            if not lo <= value <= hi:
                raise UserError(f"{name} must be between {lo:g} and {hi:g}, got {value:g}")
        if self.sampler not in SAMPLERS:
            raise UserError(f"unknown sampler {self.sampler!r}: choose one of {', '.join(SAMPLERS)}")
        if not isinstance(self.negative_prompt, str) or len(self.negative_prompt) > MAX_PROMPT_CHARS:
            raise UserError(f"the negative prompt must be text of at most {MAX_PROMPT_CHARS} characters")


@dataclass
class SampleResult:
    images: torch.Tensor  # [B, 3, H, W] in [0, 1], float32, CPU
    pred_x0_images: torch.Tensor | None  # [B, K, 3, H, W] in [0, 1]: decoded x̂0 at every step
    trajectory: Trajectory
    seconds: float
    timesteps: list[int]
    info: dict = field(default_factory=dict)

    @property
    def seconds_per_image(self) -> float:
        return self.seconds / self.images.shape[0]


def check_prompt_fits(pipe, prompt: str) -> None:
    """Refuse prompts longer than the text encoder's context instead of truncating them silently, and text a
    tokenizer cannot read (a lone surrogate half, which it refuses with a TypeError)."""
    if not is_text(prompt):
        raise UserError("the prompt holds characters that are not valid text (a lone surrogate): retype it")
    tok = pipe.tokenizer
    n = len(tok(prompt, truncation=False).input_ids)
    if n > tok.model_max_length:
        raise UserError(f"the prompt is too long for this model: {n} tokens, at most {tok.model_max_length}")


def sampler_setup(pipe, sampler: str, steps: int) -> tuple[list[int], str, dict]:
    """Timesteps, step kind and step options for a sampler name on this pipeline's noise schedule."""
    cfg = pipe.scheduler.config
    n_train = cfg.get("num_train_timesteps", 1000)
    if sampler == "lcm":
        from diffusers import LCMScheduler

        lcm = LCMScheduler.from_config(cfg)
        lcm.set_timesteps(steps)
        return [int(t) for t in lcm.timesteps], "lcm", {"timestep_scaling": lcm.config.timestep_scaling}
    spacing = "trailing" if sampler == "ddim-trailing" else cfg.get("timestep_spacing", "leading")
    return timesteps(steps, spacing, num_train_timesteps=n_train, steps_offset=cfg.get("steps_offset", 0)), "ddim", {}


def schedule_tensors(pipe, device, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """ᾱ_t for t = 0…999 and ᾱ after the last step (1 if ``set_alpha_to_one`` else ᾱ_0), as diffusers' DDIM."""
    sched = pipe.scheduler
    alphas = sched.alphas_cumprod.to(device=device, dtype=dtype)
    final = 1.0 if sched.config.get("set_alpha_to_one", True) else alphas[0]
    return alphas, torch.as_tensor(final, device=device, dtype=dtype)


def encode(pipe, prompts: list[str], negative: list[str] | None, guided: bool):
    cond, uncond = pipe.encode_prompt(prompts, pipe.device, 1, guided, negative_prompt=negative)
    return cond, uncond


def decode_differentiable(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Latents → images in [0, 1], float32 on CPU, with the graph (rewards backpropagated into the sampler)."""
    vae = pipe.vae
    x = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    return (x.float() / 2 + 0.5).clamp(0, 1).cpu()


@torch.no_grad()
def decode(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Latents → images in [0, 1], float32 on CPU."""
    return decode_differentiable(pipe, latents)


@torch.no_grad()
def generate(pipe, request: SampleRequest, callback=None) -> SampleResult:
    """Sample ``request.batch`` images for one prompt. ``callback(i, t, x, out)`` runs after every step."""
    check_prompt_fits(pipe, request.prompt)
    if request.negative_prompt:
        check_prompt_fits(pipe, request.negative_prompt)
    device = pipe.device
    start = time.perf_counter()
    guided = request.guidance > 1.0
    prompts = [request.prompt] * request.batch
    negative = [request.negative_prompt] * request.batch if guided else None
    cond, uncond = encode(pipe, prompts, negative, guided)
    ts, kind, step_kwargs = sampler_setup(pipe, request.sampler, request.steps)
    alphas, final_alpha = schedule_tensors(pipe, device)
    unet = pipe.unet
    shape = (request.batch, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    generators = [torch.Generator(device="cpu").manual_seed(request.seed + i) for i in range(request.batch)]
    x_T = initial_noise(shape, generators, device, dtype=torch.float32)
    denoiser = CFGDenoiser(unet_denoiser(unet), uncond, request.guidance)
    final, traj = sample_loop(
        denoiser, x_T, cond, ts, alphas, step_kind=kind, eta=request.eta,
        prediction_type=pipe.scheduler.config.get("prediction_type", "epsilon"),
        final_alpha_cumprod=final_alpha, generator=generators, record_pred_x0=request.record_pred_x0,
        callback=callback, step_kwargs=step_kwargs,
    )  # fmt: skip
    images = decode(pipe, final)
    strip = None
    if request.record_pred_x0:
        b, k = traj.pred_x0.shape[:2]
        strip = decode(pipe, traj.pred_x0.flatten(0, 1)).unflatten(0, (b, k))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return SampleResult(images, strip, traj, seconds, ts, {"sampler": request.sampler, "step_kind": kind})
