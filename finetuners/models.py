"""Loading pipelines: the embedded Shapes model, any Stable-Diffusion-family folder, or a hub id.

Everything goes through ``load_model(id_or_path, device, dtype)``, which calls diffusers' own
``StableDiffusionPipeline.from_pretrained`` with safetensors only. Hub ids are resolved from the local
Hugging Face cache; nothing is downloaded unless ``allow_download=True`` is passed explicitly.

A model may carry a LoRA of its own: ``BASE+LORA`` (SD 1.5 with LCM-LoRA:
``stable-diffusion-v1-5/stable-diffusion-v1-5+latent-consistency/lcm-lora-sdv1-5``) loads BASE, then LORA (a hub
id in the cache, a folder or a .safetensors file) through diffusers' ``load_lora_weights``, fused into the
weights, so the result is a plain pipeline that fine-tuning adds its own adapter to. A LoRA whose name says "lcm"
also switches the scheduler to diffusers' ``LCMScheduler``, as LCM-LoRA is meant to be sampled.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError
from .names import typed_path

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_MODEL = "shapes"  # alias of the embedded pipeline
COMPOSE_MODEL = "shapes-partial"  # the Shapes world with captions that leave objects out (docs/SHAPES.md)
ALIASES = {DEFAULT_MODEL: ASSETS / "shapes-sd", COMPOSE_MODEL: ASSETS / "shapes-partial-sd"}
PROBE_PATH = ASSETS / "shapes-probe"
DEFAULTS_FILE = "finetuners.json"  # sampler defaults stored beside a pipeline's model_index.json
SMALL_UNET_PARAMS = 20_000_000  # below: a toy-sized UNet (Shapes), whose speed per-call overhead bounds
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}  # fmt: skip


@dataclass(frozen=True)
class ModelDefaults:
    """Sampler settings a model family expects (ALGORITHMS.md §0.2, few-step models)."""

    sampler: str  # "ddim" | "ddim-trailing" | "lcm"
    steps: int
    guidance: float
    superdiff_guidance: float | None = None  # SuperDiff's guidance where it differs from sampling's (shapes-partial)


def resolve_device(device: str | None) -> torch.device:
    """'auto' / None → CUDA when present, else CPU. A CUDA request without CUDA is a clear error."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise UserError(f"unknown device {device!r}: use cpu, cuda, cuda:N or auto") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {device!r} was asked for, but this machine has no CUDA GPU (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"device {device!r} does not exist: {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type not in ("cpu", "mps"):
        raise UserError(f"unsupported device {device!r}: use cpu, cuda, cuda:N or auto")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}: use one of {', '.join(sorted(DTYPES))}")
    if DTYPES[dtype] == torch.float16 and device.type == "cpu":
        raise UserError("float16 is not supported on the CPU: use float32 or bfloat16")
    return DTYPES[dtype]


def split_model_spec(spec: str) -> tuple[str, str | None]:
    """``BASE+LORA`` → (BASE, LORA); any other model name (or an existing path that holds a '+') → (name, None)."""
    name = (spec or "").strip()
    if "+" not in name or _exists(name):
        return name, None
    base, lora = (part.strip() for part in name.rsplit("+", 1))
    if not base or not lora:
        raise UserError(f"model {name!r}: write a model with a LoRA as BASE+LORA, e.g. "
                        "stable-diffusion-v1-5/stable-diffusion-v1-5+latent-consistency/lcm-lora-sdv1-5")  # fmt: skip
    return base, lora


def _exists(name: str) -> bool:
    try:
        return Path(name).exists()
    except (OSError, ValueError):  # over-long or NUL-holding names: not a path here (typed_path words it later)
        return False


def resolve_lora_file(lora: str, allow_download: bool = False) -> Path:
    """A LoRA named by a .safetensors file, a folder holding one, or a hub id found in the local cache → the file."""
    path = typed_path(lora, "LoRA path")
    looks_local = path.is_absolute() or lora.startswith((".", "~")) or path.exists() or lora.count("/") != 1
    if looks_local:
        if not path.exists():
            raise UserError(f"LoRA {lora!r} does not exist")
        folder = path
    else:
        folder = Path(_snapshot(lora, allow_download, ["*.json", "*.safetensors"]))
    if folder.is_file():
        if folder.suffix != ".safetensors":
            raise UserError(f"LoRA {lora!r} is not a .safetensors file: only safetensors weights are loaded")
        return folder
    files = sorted(folder.glob("*.safetensors"))
    if len(files) != 1:
        raise UserError(f"LoRA folder {lora!r} holds {len(files)} .safetensors files; name the one to load")
    return files[0]


def _snapshot(name: str, allow_download: bool, patterns: list[str]) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return snapshot_download(name, local_files_only=not allow_download, allow_patterns=patterns)
    except (LocalEntryNotFoundError, FileNotFoundError) as e:
        raise UserError(
            f"model {name!r} is not in the local Hugging Face cache; download it first "
            f"(huggingface-cli download {name}) or pass a local folder"
        ) from e
    except HFValidationError as e:
        raise UserError(f"{name!r} is neither a local folder nor a valid hub id") from e


def resolve_model_path(id_or_path: str, allow_download: bool = False) -> str:
    """An alias, a local pipeline folder, or a hub id found in the local cache → a local folder path. For
    ``BASE+LORA``, BASE's folder, once the LoRA is found too."""
    name, lora = split_model_spec(id_or_path)
    folder = _pipeline_folder(name, allow_download)
    if lora is not None:
        resolve_lora_file(lora, allow_download)
    return folder


def _pipeline_folder(name: str, allow_download: bool) -> str:
    if not name:
        raise UserError("no model given: pass a pipeline folder, a hub id, 'shapes' or 'shapes-partial'")
    if name in ALIASES:
        return str(ALIASES[name])
    path = typed_path(name, "model path")  # NUL bytes, over-long names, '~nobody': a message, not an OSError
    looks_local = path.is_absolute() or name.startswith((".", "~")) or path.exists() or name.count("/") != 1
    if looks_local:
        if not path.exists():
            raise UserError(f"model path {name!r} does not exist")
        if not path.is_dir() or not (path / "model_index.json").is_file():
            raise UserError(f"{name!r} is not a diffusers pipeline folder (no model_index.json)")
        return str(path)
    return _snapshot(name, allow_download, ["*.json", "*.txt", "*.safetensors", "*.model"])


def load_model(id_or_path: str = DEFAULT_MODEL, device: str | None = "cpu", dtype=None, *,
               allow_download: bool = False, attention: str = "auto"):  # fmt: skip
    """Load a Stable-Diffusion-family pipeline through diffusers' ``from_pretrained`` (safetensors only).

    ``attention``: "auto" uses xformers on CUDA when it is installed, "xformers" requires it, "sdpa"
    keeps PyTorch's scaled-dot-product attention.
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    folder = resolve_model_path(id_or_path, allow_download)  # bad input fails before the heavy imports
    lora = split_model_spec(id_or_path)[1]
    lora_file = resolve_lora_file(lora, allow_download) if lora is not None else None
    import diffusers
    import transformers
    from diffusers import StableDiffusionPipeline

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            folder, dtype=dt, use_safetensors=True, safety_checker=None, requires_safety_checker=False,
            local_files_only=True,
        )  # fmt: skip
    except (OSError, ValueError) as e:
        raise UserError(f"could not load {id_or_path!r} as a Stable-Diffusion pipeline: {_first_line(e)}") from e
    if lora_file is not None:
        fuse_lora_file(pipe, lora_file, lcm="lcm" in lora.lower())
    pipe = pipe.to(dev)
    pipe.set_progress_bar_config(disable=True)
    configure_attention(pipe, dev, attention)
    pipe.finetuners_source = id_or_path
    pipe.finetuners_folder = folder
    return pipe


def is_lcm_model(spec: str) -> bool:
    """Whether a model name loads as an LCM model (an LCM scheduler, or an LCM-LoRA), read from its files without
    loading the weights."""
    base, lora = split_model_spec(spec)
    if lora is not None and "lcm" in lora.lower():
        return True
    config = Path(resolve_model_path(base)) / "scheduler" / "scheduler_config.json"
    try:
        return "LCM" in json.loads(config.read_text()).get("_class_name", "")
    except (OSError, ValueError, AttributeError):
        return False


def fuse_lora_file(pipe, file: Path, lcm: bool = False) -> None:
    """Load a LoRA file with diffusers' ``load_lora_weights`` and fuse it into the pipeline's weights (no adapter
    layers stay behind); ``lcm`` also switches the scheduler to ``LCMScheduler`` (LCM-LoRA)."""
    try:
        pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name="model-lora")
        pipe.fuse_lora(adapter_names=["model-lora"])
        pipe.unload_lora_weights()
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"could not apply the LoRA {str(file)!r}: {_first_line(e)}") from e
    if lcm:
        from diffusers import LCMScheduler

        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)


def configure_attention(pipe, device: torch.device, attention: str = "auto") -> bool:
    """xformers attention on CUDA when ``attention`` is "auto" (if it can be used) or "xformers" (required:
    ``UserError`` otherwise); "sdpa" and every CPU keep PyTorch's attention. Returns whether xformers is on."""
    if attention not in ("auto", "xformers", "sdpa"):
        raise UserError(f"unknown attention backend {attention!r}: auto, xformers or sdpa")
    if device.type != "cuda" or attention == "sdpa":
        return False
    try:
        pipe.enable_xformers_memory_efficient_attention()
    except Exception as e:  # noqa: BLE001 - optional accelerator; report why it is off
        if attention == "xformers":
            raise UserError(f"xformers was asked for but cannot be used: {_first_line(e)}") from e
        log.info("xformers not used: %s", _first_line(e))
        return False
    log.info("xformers attention enabled")
    return True


def model_defaults(pipe, checkpoint: bool = True) -> ModelDefaults:
    """Sampler defaults for a loaded pipeline. A run's checkpoint samples as its run evaluated it
    (``runs.load_checkpoint_pipeline`` sets them: fine-tuned models train without guidance); ``checkpoint=False``
    skips that and gives its base model's, which say what family the model is of. Else an LCM scheduler → LCM
    (an LCM-LoRA too), else those recorded in the folder's ``finetuners.json`` (the Shapes pipeline), else a turbo
    model → trailing timesteps with guidance 0, any other SD model → 25 DDIM steps at guidance 7.5."""
    if checkpoint and isinstance(found := getattr(pipe, "finetuners_defaults", None), ModelDefaults):
        return found
    sched_cls = type(pipe.scheduler).__name__
    if "LCM" in sched_cls:  # an LCM model, or any model with an LCM-LoRA fused in (its folder's defaults are moot)
        return ModelDefaults("lcm", 4, 1.0)
    marker = Path(getattr(pipe, "finetuners_folder", "") or ".") / DEFAULTS_FILE
    if marker.is_file():
        try:
            return ModelDefaults(**json.loads(marker.read_text()))
        except (ValueError, TypeError) as e:
            log.warning("ignoring unreadable %s: %s", marker, e)
    source = str(getattr(pipe, "finetuners_source", "")) + str(getattr(pipe, "name_or_path", ""))
    if "turbo" in source.lower():
        return ModelDefaults("ddim-trailing", 1, 0.0)
    return ModelDefaults("ddim", 25, 7.5)


def small_unet(pipe) -> bool:
    """Whether the pipeline's UNet has under ``SMALL_UNET_PARAMS`` weights (the Shapes model and its checkpoints)."""
    return sum(p.numel() for p in pipe.unet.parameters()) < SMALL_UNET_PARAMS


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
