"""The Shapes probe: a small CNN that reads a Shapes image back into per-cell (shape, colour) readings.

It gives the Shapes world its metrics and rewards:
- ``read_scene``: the argmax reading as a list of :class:`~finetuners.shapes.world.Obj`;
- ``prompt_accuracy``: whether that reading satisfies the prompt (exact: right objects, no extra ones,
  placed as the prompt says);
- ``prompt_log_prob``: the differentiable log-probability, under the probe's factorised per-cell
  distribution, that the image satisfies the prompt (a sum over every valid placement; see below);
- ``features``: the penultimate layer (``FEATURE_DIM``), the space of the Fréchet distance.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .world import COLOR_NAMES, GRID, N_CELLS, SHAPES, Obj, PromptSpec, parse_prompt, valid_placements

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
