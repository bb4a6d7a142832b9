"""The Shapes probe: a small CNN that reads a Shapes image back into per-cell (shape, colour) readings.

It gives the Shapes world its metrics and rewards:
- ``read_scene``: the argmax reading as a list of :class:`~finetuners.shapes.world.Obj`;
- ``prompt_accuracy``: whether that reading satisfies the prompt (exact: right objects, no extra ones,
  placed as the prompt says);
- ``prompt_log_prob``: the differentiable log-probability, under the probe's factorised per-cell
  distribution, that the image satisfies the prompt (a sum over every valid placement; see below);
- ``features``: the penultimate layer (``FEATURE_DIM``), the space of the Fréchet distance;
- ``read_prompts`` and ``outcome``: what the shipped probe sees in a batch of images and which of one or two
  prompts each image shows (the Superpose tab's and the ``superpose`` command's reading of a superposition).
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .world import COLOR_NAMES, GRID, IMAGE_SIZE, N_CELLS, SHAPES, Obj, PromptSpec, parse_prompt, valid_placements

N_SHAPE_CLASSES = 1 + len(SHAPES)  # 0 = empty cell
N_COLORS = len(COLOR_NAMES)


@dataclass(frozen=True)
class ProbeConfig:
    width: int = 64
    feature_dim: int = 128


class ShapesProbe(nn.Module):
    """Image in [0, 1], [B, 3, 32, 32] -> per-cell shape logits [B, 9, 4] and colour logits [B, 9, 6]."""

    def __init__(self, config: ProbeConfig = ProbeConfig()):
        super().__init__()
        self.config = config
        w = config.width
        self.trunk = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(w, w, 3, padding=1, stride=2), nn.SiLU(),  # 16x16
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1, stride=2), nn.SiLU(),  # 8x8
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(GRID),
            nn.Flatten(),
        )  # fmt: skip
        self.embed = nn.Sequential(nn.Linear(2 * w * N_CELLS, config.feature_dim), nn.SiLU())
        self.head = nn.Linear(config.feature_dim, N_CELLS * (N_SHAPE_CLASSES + N_COLORS))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> [B, feature_dim]."""
        return self.embed(self.trunk(images * 2 - 1))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.head(self.features(images)).view(-1, N_CELLS, N_SHAPE_CLASSES + N_COLORS)
        return out[..., :N_SHAPE_CLASSES], out[..., N_SHAPE_CLASSES:]

    # -- persistence: a folder with config.json and model.safetensors -----------------------------
    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(asdict(self.config), indent=2))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, folder / "model.safetensors")

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu") -> ShapesProbe:
        folder = Path(folder)
        probe = cls(ProbeConfig(**json.loads((folder / "config.json").read_text())))
        probe.load_state_dict(load_file(folder / "model.safetensors", device="cpu"))
        return probe.to(device).eval().requires_grad_(False)


def probe_loss(shape_logits, color_logits, shape_targets, color_targets) -> torch.Tensor:
    """Cross-entropy of cell shapes, plus colour cross-entropy on occupied cells only."""
    loss = F.cross_entropy(shape_logits.reshape(-1, N_SHAPE_CLASSES), shape_targets.reshape(-1))
    occupied = color_targets.reshape(-1) >= 0
    return loss + F.cross_entropy(color_logits.reshape(-1, N_COLORS)[occupied], color_targets.reshape(-1)[occupied])


def read_scene(shape_logits: torch.Tensor, color_logits: torch.Tensor) -> list[list[Obj]]:
    """Argmax readings [B, 9, ·] -> per image, the objects the probe sees."""
    shapes = shape_logits.argmax(-1).tolist()
    colors = color_logits.argmax(-1).tolist()
    return [
        [Obj(SHAPES[s - 1], COLOR_NAMES[c], cell) for cell, (s, c) in enumerate(zip(ss, cc)) if s > 0]
        for ss, cc in zip(shapes, colors)
    ]


@torch.no_grad()
def read_images(probe: ShapesProbe, images: torch.Tensor) -> list[list[Obj]]:
    """Per image [B, 3, 32, 32] in [0, 1], the objects the probe sees."""
    return read_scene(*probe(images.to(next(probe.parameters()).device)))


@functools.cache
def shipped_probe() -> ShapesProbe | None:
    """The probe in ``assets/shapes-probe`` on the CPU, loaded once; None when its weights are not there."""
    from ..models import PROBE_PATH

    return ShapesProbe.load(PROBE_PATH) if (PROBE_PATH / "model.safetensors").is_file() else None


def read_prompts(images: torch.Tensor, prompts: list[str]) -> tuple[list[PromptSpec], list[list[Obj]]] | None:
    """The prompts as specs and the shipped probe's reading of each image, where the probe can read them: every
    prompt a Shapes caption and the images 32×32; else None."""
    specs = [parse_prompt(p) for p in prompts]
    if None in specs or tuple(images.shape[-2:]) != (IMAGE_SIZE, IMAGE_SIZE) or (probe := shipped_probe()) is None:
        return None
    return specs, read_images(probe, images.float())


ONE_PROMPT_OUTCOMES = ("as the prompt says", "with other objects", "not shown")
TWO_PROMPT_OUTCOMES = ("both", "A only", "B only", "neither")


def outcome(scene: list[Obj], specs: list[PromptSpec]) -> str:
    """What a scene shows of one prompt (``ONE_PROMPT_OUTCOMES``: exactly, among other objects, or not at all) or of
    two (``TWO_PROMPT_OUTCOMES``). A prompt is shown when its objects are there, placed as it says."""
    if len(specs) == 1:
        spec = specs[0]
        return ONE_PROMPT_OUTCOMES[0 if spec.satisfied_by(scene) else 1 if spec.shown_in(scene) else 2]
    a, b = (spec.shown_in(scene) for spec in specs)
    return TWO_PROMPT_OUTCOMES[0 if a and b else 1 if a else 2 if b else 3]


def _spec(prompt: str | PromptSpec) -> PromptSpec:
    spec = prompt if isinstance(prompt, PromptSpec) else parse_prompt(prompt)
    if spec is None:
        raise ValueError(f"not a Shapes caption: {prompt!r}")
    return spec


def prompt_accuracy(probe: ShapesProbe, images: torch.Tensor, prompts: list) -> torch.Tensor:
    """[B] float: 1 where the probe's reading of the image satisfies its prompt exactly."""
    scenes = read_scene(*probe(images))
    return torch.tensor([float(_spec(p).satisfied_by(s)) for p, s in zip(prompts, scenes)])


def prompt_log_prob(probe: ShapesProbe, images: torch.Tensor, prompts: list) -> torch.Tensor:
    """[B] differentiable log P(image satisfies prompt) under the probe's factorised cell distribution.

    Cells are independent under the probe; a placement assigns the prompt's objects to distinct cells
    and leaves every other cell empty. Distinct placements are disjoint events, so
        log P = logsumexp_placements [ Σ_assigned (log p_shape + log p_colour) + Σ_other log p_empty ].
    """
    shape_logits, color_logits = probe(images)
    log_ps = shape_logits.log_softmax(-1)  # [B, 9, 4]
    log_pc = color_logits.log_softmax(-1)  # [B, 9, 6]
    out = []
    for b, prompt in enumerate(prompts):
        spec = _spec(prompt)
        empty = log_ps[b, :, 0]  # [9]
        # obj_lp[k, cell]: log-prob that object k sits in the cell (shape and colour).
        obj_lp = torch.stack(
            [log_ps[b, :, 1 + SHAPES.index(s)] + log_pc[b, :, COLOR_NAMES.index(c)] for s, c in spec.objects]
        )
        cells = torch.tensor(valid_placements(spec), device=images.device)  # [P, k]
        gain = sum(obj_lp[k, cells[:, k]] - empty[cells[:, k]] for k in range(len(spec.objects)))
        out.append(empty.sum() + torch.logsumexp(gain, 0))
    return torch.stack(out)
