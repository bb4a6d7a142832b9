"""The learned Bradley–Terry preference reward (ALGORITHMS.md §6), trained on the user's own pairwise labels.

*Objective.* P(x_0 ≻ x_1 | c) = σ(Δ), Δ = r_ψ(x_0, c) − r_ψ(x_1, c);
    loss = −[y·log σ(Δ) + (1 − y)·log σ(−Δ)],  y = label_0 ∈ {1, ½, 0}  (a tie pulls Δ towards 0).

*Models.* Two small networks on frozen Shapes-probe features plus a prompt-attribute embedding:

- ``"cells"`` (the default offline): the probe's per-cell readings p_j(o) = P(cell j holds object o) (shape
  and colour independent, as the probe factorises them), against the objects the prompt names. Object k
  matches cell j by
      s_kj = a·p_j(o_k) + b·p_j(shape of o_k) + c·p_j(colour of o_k) + rowcol_jᵀ V w_k,
  rowcol_j the one-hot row and column of cell j on the 3×3 grid and w_k the prompt's place word. A prompt
  with one object scores τ·logsumexp_j(s_0j / τ); one with two objects and a relation word ρ scores the soft
  maximum over placements (j ≠ l) of s_0j + s_1l + u_ρᵀ g(j, l), g the row / column comparisons of the
  two cells. Plus q([occupied cells, objects asked for]) for extra or missing objects. a starts at
  ``match_init`` (the prior "a cell that holds the object the prompt names is good"); b, c, V and U start
  at zero. The labels teach which grid rows and columns each place and relation word means, and how much
  each part matters: 130 parameters, which 200 labels pin down, where a free cell × token matrix
  (``geometry=False``, the model of earlier versions: 949 parameters) over-fits and a generic MLP finds no
  matching at all (bench/preference_learning.py measures all three).
- ``"mlp"`` (any feature vector: the probe's penultimate layer, or the CLIP image embedding of the user's
  local CLIP weights, ``ClipFeatures``):
      r = wᵀx̂ + u·h(x̂) + ⟨A·h(x̂), B·e(c)⟩,  x̂ the standardised features, h one hidden SiLU layer,
  e(c) the attribute embedding of the parsed caption (bag of objects, shapes, colours, position, relation),
  or with CLIP features the CLIP text embedding of the caption (any prompt, not only Shapes captions).

*Training.* Full-batch AdamW with weight decay; early stopping on held-out log-loss, the split made by
pair (every label of one pair lands on the same side, so a pair labelled by three people cannot leak).
Held-out accuracy is reported on non-tie labels.

*Output.* Standardised: (r − μ)/σ with μ, σ over the training images, so RL clip ranges behave.

The reward follows the standard signature ``reward_fn(images, prompts, metadata) -> (rewards, info)``
and is differentiable with respect to the images (the probe and the model are).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError
from .imageio import atomic_write_folder
from .shapes.world import COLOR_NAMES, GRID, N_CELLS, POSITIONS, RELATIONS, SHAPES, parse_prompt

log = logging.getLogger(__name__)

PROBE_IMAGE_SIZE = 32  # the Shapes probe reads 32×32 images; others are area-resized to it
_OBJECTS = [(s, c) for s in SHAPES for c in COLOR_NAMES]
N_OBJECTS = len(_OBJECTS)  # 18 (shape, colour) kinds
MAX_OBJECTS = 2  # a caption of the default Shapes mix names one or two objects


def _spec(prompt):
    """The caption's PromptSpec where these prompt features describe it: the default mix's templates. A three-object
    caption (outside that mix) counts as not a Shapes caption: only the quality term scores it."""
    spec = parse_prompt(prompt) if isinstance(prompt, str) else None
    return spec if spec is not None and len(spec.objects) <= MAX_OBJECTS else None


# -- prompt embeddings -------------------------------------------------------------------------------------
ATTRIBUTE_DIM = N_OBJECTS + len(SHAPES) + len(COLOR_NAMES) + len(POSITIONS) + len(RELATIONS) + 3
OBJECT_TOKEN_DIM = N_OBJECTS + len(POSITIONS) + 2 * len(RELATIONS)
OBJECT_TOKENS_DIM = MAX_OBJECTS * OBJECT_TOKEN_DIM + MAX_OBJECTS  # tokens, then the mask of present objects


def shapes_prompt_embedding(prompts: Sequence[str]) -> torch.Tensor:
    """[B, ATTRIBUTE_DIM] float32 attributes of parsed Shapes captions (for the "mlp" model).

    Layout: bag of requested (shape, colour) objects (18) | shapes (3) | colours (6) | position (5) |
    relation (4) | one object, two objects, not a Shapes caption (3). A caption that does not parse gets
    only the last flag (the prompt term then carries no signal), and so does a three-object caption."""
    out = torch.zeros(len(prompts), ATTRIBUTE_DIM)
    o_shape = N_OBJECTS
    o_color = o_shape + len(SHAPES)
    o_pos = o_color + len(COLOR_NAMES)
    o_rel = o_pos + len(POSITIONS)
    o_flag = o_rel + len(RELATIONS)
    for b, prompt in enumerate(prompts):
        spec = _spec(prompt)
        if spec is None:
            out[b, o_flag + 2] = 1
            continue
        for shape, color in spec.objects:
            out[b, _OBJECTS.index((shape, color))] += 1
            out[b, o_shape + SHAPES.index(shape)] += 1
            out[b, o_color + COLOR_NAMES.index(color)] += 1
        if spec.position is not None:
            out[b, o_pos + list(POSITIONS).index(spec.position)] = 1
        if spec.relation is not None:
            out[b, o_rel + RELATIONS.index(spec.relation)] = 1
        out[b, o_flag + len(spec.objects) - 1] = 1
    return out


def shapes_object_tokens(prompts: Sequence[str]) -> torch.Tensor:
    """[B, OBJECT_TOKENS_DIM] float32: per named object (≤ 2) a token [one-hot object (18) | position word
    (5) | relation × role (subject / object, 8)], then a mask of which tokens are present (for "cells").
    A caption that does not parse has no tokens (only the quality term scores it)."""
    out = torch.zeros(len(prompts), MAX_OBJECTS, OBJECT_TOKEN_DIM)
    mask = torch.zeros(len(prompts), MAX_OBJECTS)
    for b, prompt in enumerate(prompts):
        spec = _spec(prompt)
        if spec is None:
            continue
        for k, obj in enumerate(spec.objects[:MAX_OBJECTS]):
            mask[b, k] = 1
            out[b, k, _OBJECTS.index(obj)] = 1
            if spec.position is not None:
                out[b, k, N_OBJECTS + list(POSITIONS).index(spec.position)] = 1
            if spec.relation is not None:
                out[b, k, N_OBJECTS + len(POSITIONS) + 2 * RELATIONS.index(spec.relation) + k] = 1
    return torch.cat([out.flatten(1), mask], 1)


PROMPT_EMBEDDINGS: dict[str, tuple[Callable[[Sequence[str]], torch.Tensor] | None, int]] = {
    "shapes-objects": (shapes_object_tokens, OBJECT_TOKENS_DIM),
    "shapes-attributes": (shapes_prompt_embedding, ATTRIBUTE_DIM),
    "none": (None, 0),
}


# -- image features ------------------------------------------------------------------------------------------
CELL_TOKEN_DIM = 1 + N_OBJECTS + N_CELLS  # P(empty), P(object), one-hot cell
CELL_FEATURES_DIM = N_CELLS * CELL_TOKEN_DIM
# Comparisons g(j, l) of two cells on the grid: row j < row l, row j > row l, column j < column l, column j > l.
_COMPARISONS = ("row<", "row>", "col<", "col>")


def _cell_rowcol() -> torch.Tensor:
    """[9, 6]: one-hot row, then one-hot column, of each cell (row-major)."""
    out = torch.zeros(N_CELLS, 2 * GRID)
    for j in range(N_CELLS):
        out[j, j // GRID] = out[j, GRID + j % GRID] = 1
    return out


def _cell_pair_comparisons() -> torch.Tensor:
    """[9, 9, 4]: g(j, l), the _COMPARISONS of cell j against cell l."""
    out = torch.zeros(N_CELLS, N_CELLS, len(_COMPARISONS))
    for j in range(N_CELLS):
        for k in range(N_CELLS):
            (rj, cj), (rk, ck) = divmod(j, GRID), divmod(k, GRID)
            out[j, k] = torch.tensor([rj < rk, rj > rk, cj < ck, cj > ck], dtype=torch.float32)
    return out


def module_digest(module: nn.Module) -> str:
    """sha256 of a module's parameters and buffers: which feature extractor a reward model was trained on."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


class ProbeFeatures(nn.Module):
    """Frozen Shapes-probe features of images [B, 3, H, W] in [0, 1], differentiable.

    ``kind="cells"``: per-cell readings flattened, [B, 9 × 28] (see the module docstring);
    ``kind="penultimate"``: the probe's feature layer, [B, feature_dim]."""

    def __init__(self, probe: nn.Module, kind: str = "cells"):
        super().__init__()
        if kind not in ("cells", "penultimate"):
            raise UserError(f"unknown probe features {kind!r}: cells or penultimate")
        self.probe = copy.deepcopy(probe).eval().requires_grad_(False)  # a private copy: moving it moves no one else's
        self.kind = kind
        self.dim = CELL_FEATURES_DIM if kind == "cells" else probe.config.feature_dim
        self.digest = module_digest(probe)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (PROBE_IMAGE_SIZE, PROBE_IMAGE_SIZE):
            images = F.interpolate(images, size=(PROBE_IMAGE_SIZE, PROBE_IMAGE_SIZE), mode="area")
        if self.kind == "penultimate":
            return self.probe.features(images)
        shape_logits, color_logits = self.probe(images)  # [B, 9, 4], [B, 9, 6]
        p_shape, p_color = shape_logits.softmax(-1), color_logits.softmax(-1)
        p_object = (p_shape[..., 1:, None] * p_color[..., None, :]).flatten(2)  # [B, 9, 18], _OBJECTS order
        cell = torch.eye(N_CELLS, device=images.device, dtype=p_shape.dtype).expand(len(images), -1, -1)
        return torch.cat([p_shape[..., :1], p_object, cell], -1).flatten(1)


# CLIP's own preprocessing constants (CLIPImageProcessor), used when a folder has no preprocessor_config.json.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _weights_digest(files: Sequence[Path], extra: dict) -> str:
    """sha256 of weight files (streamed: no second copy of a large model in memory) and a JSON dict."""
    h = hashlib.sha256()
    for path in files:
        h.update(path.name.encode())
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
    h.update(json.dumps(extra, sort_keys=True).encode())
    return h.hexdigest()


def _clip_weight_files(folder: Path) -> list[Path]:
    """The safetensors files ``CLIPModel.from_pretrained`` reads: model.safetensors, or the shards of its index
    (other *.safetensors in a hub folder, e.g. open_clip's, are not the transformers model)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise UserError(f"the CLIP weights index {str(index)!r} is unreadable: {e}") from e
        return [folder / name for name in shards if (folder / name).is_file()]
    return [folder / "model.safetensors"] if (folder / "model.safetensors").is_file() else []


class ClipFeatures(nn.Module):
    """Frozen CLIP features from a local transformers ``CLIPModel`` folder (safetensors weights only).

    ``forward(images [B, 3, H, W] in [0, 1]) -> [B, projection_dim]``: L2-normalised image embeddings,
    differentiable in the images. Preprocessing as CLIPImageProcessor, in torch: the shorter side resized to
    the vision config's ``image_size`` (bicubic, antialiased), a centre crop, normalisation with the folder's
    preprocessor_config.json mean / std (CLIP's standard constants without one).
    ``embed_prompts(prompts) -> [B, projection_dim]``: L2-normalised CLIP text embeddings (no gradient;
    needs the folder's tokenizer, loaded when ``text=True``).
    ``digest``: sha256 of the weight files and the preprocessing, to check a reward reloads the same encoder."""

    def __init__(self, folder: str | Path, text: bool = True):
        super().__init__()
        from .names import typed_path

        folder = typed_path(folder, "CLIP weights folder")
        if not folder.is_dir():
            raise UserError(f"no CLIP weights folder {str(folder)!r}")
        weights = _clip_weight_files(folder)
        if not weights:
            pickled = sorted(p.name for p in folder.glob("*.bin"))
            hint = f" (found only pickle weights: {', '.join(pickled)}; convert them to safetensors)" if pickled else ""
            raise UserError(f"no safetensors CLIP weights in {str(folder)!r}{hint}")
        from safetensors import SafetensorError
        from transformers import CLIPModel, CLIPTokenizer

        try:
            model = CLIPModel.from_pretrained(folder, local_files_only=True, use_safetensors=True)
            self.tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True) if text else None
            pre = json.loads((folder / "preprocessor_config.json").read_text()) if (
                folder / "preprocessor_config.json").is_file() else {}  # fmt: skip
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as e:
            raise UserError(f"the CLIP weights in {str(folder)!r} are unreadable: {str(e).splitlines()[0]}") from e
        self.clip = model.eval().requires_grad_(False)
        self.folder = folder.resolve()
        self.image_size = int(model.config.vision_config.image_size)
        self.dim = int(model.config.projection_dim)
        mean, std = pre.get("image_mean", CLIP_MEAN), pre.get("image_std", CLIP_STD)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.digest = _weights_digest(weights, {"mean": list(mean), "std": list(std), "size": self.image_size})

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> [B, 3, S, S] normalised, S = image_size; differentiable."""
        s = self.image_size
        h, w = images.shape[-2:]
        if (h, w) != (s, s):
            scale = s / min(h, w)
            size = (max(s, round(h * scale)), max(s, round(w * scale)))
            images = F.interpolate(images, size=size, mode="bicubic", antialias=True, align_corners=False)
            images = images.clamp(0, 1)  # bicubic overshoots; the processor's uint8 image cannot
            top, left = (size[0] - s) // 2, (size[1] - s) // 2
            images = images[..., top : top + s, left : left + s]
        return (images - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.clip.get_image_features(pixel_values=self.preprocess(images))
        emb = out if isinstance(out, torch.Tensor) else out.pooler_output  # transformers ≥ 5 returns an output
        return F.normalize(emb, dim=-1)

    @torch.no_grad()
    def embed_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        if self.tokenizer is None:
            raise ValueError("these CLIP features were loaded without the text tower (text=False)")
        max_len = min(self.tokenizer.model_max_length, self.clip.config.text_config.max_position_embeddings)
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        device = self.mean.device
        out = self.clip.get_text_features(
            input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device)
        )
        emb = out if isinstance(out, torch.Tensor) else out.pooler_output
        return F.normalize(emb, dim=-1).to(self.mean.dtype)


FEATURES = ("shapes-probe-cells", "shapes-probe", "clip", "precomputed")
CLIP_TEXT = "clip-text"  # the prompt embedding of CLIP-feature models: ClipFeatures.embed_prompts


def embed_prompts(kind: str, prompts: Sequence[str], features: nn.Module | None = None) -> torch.Tensor | None:
    """The prompt embedding ``kind`` (a PROMPT_EMBEDDINGS key or CLIP_TEXT, which reads ``features``) [B, P]."""
    if kind == CLIP_TEXT:
        if not hasattr(features, "embed_prompts"):
            raise ValueError("the clip-text prompt embedding needs ClipFeatures")
        return features.embed_prompts(list(prompts)).float()
    embed = PROMPT_EMBEDDINGS[kind][0]
    return None if embed is None else embed(list(prompts))


# -- the model ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PreferenceConfig:
    model: str = "cells"  # "cells" (Shapes-probe cell readings × prompt objects) | "mlp" (any feature vector)
    feature_dim: int = CELL_FEATURES_DIM  # D: size of the image features
    prompt_embedding: str = "shapes-objects"  # a key of PROMPT_EMBEDDINGS, or "clip-text"; "none": ignores the prompt
    features: str = "shapes-probe-cells"  # shapes-probe-cells | shapes-probe (penultimate) | clip | precomputed
    hidden: int = 16  # width of the hidden layer (cells: of q; mlp: of h)
    rank: int = 16  # mlp: rank k of the image–prompt bilinear term
    match_init: float = 2.0  # cells: initial weight of "this cell holds the object the prompt names"
    tau: float = 0.2  # cells: temperature of the soft maximum over cells (→ 0: hard max)
    geometry: bool = True  # cells: grid rows / columns for place words, and a joint term for relations
    feature_digest: str = ""  # digest of the probe / CLIP weights the features came from ("" = not checked)
    clip_folder: str = ""  # clip: the local CLIP folder (absolute) the reward reloads its encoder from
    text_dim: int = 0  # clip-text: size P of the CLIP text embedding (the CLIP projection_dim)

    @property
    def prompt_dim(self) -> int:
        return self.text_dim if self.prompt_embedding == CLIP_TEXT else PROMPT_EMBEDDINGS[self.prompt_embedding][1]

    def __post_init__(self):
        if self.model not in ("cells", "mlp"):
            raise UserError(f"unknown preference model {self.model!r}: cells or mlp")
        if self.features not in FEATURES:
            raise UserError(f"unknown features {self.features!r}: {', '.join(FEATURES)}")
        if self.prompt_embedding not in (*PROMPT_EMBEDDINGS, CLIP_TEXT):
            raise UserError(f"unknown prompt embedding {self.prompt_embedding!r}: "
                            f"{', '.join((*PROMPT_EMBEDDINGS, CLIP_TEXT))}")  # fmt: skip
        if self.prompt_embedding == CLIP_TEXT and (self.features != "clip" or self.text_dim < 1):
            raise UserError("the clip-text prompt embedding goes with CLIP features and a positive text_dim")
        if self.features == "clip" and (self.model != "mlp" or not self.clip_folder):
            raise UserError("CLIP features are read by the mlp model, from a recorded clip_folder")
        if self.feature_dim < 1 or self.hidden < 1 or self.rank < 1 or self.tau <= 0:
            raise UserError("feature_dim, hidden, rank and tau must be positive")
        if self.model == "cells" and (
            self.feature_dim != CELL_FEATURES_DIM
            or self.prompt_embedding != "shapes-objects"
            or self.features == "shapes-probe"
        ):
            raise UserError("the cells model reads Shapes-probe cell features and the prompt's object tokens")


class PreferenceModel(nn.Module):
    """r_ψ(features [B, D], prompt embedding [B, P]) -> [B]: ``raw`` (for Δ) or standardised (``forward``)."""

    def __init__(self, config: PreferenceConfig):
        super().__init__()
        self.config = config
        d, p, hdim = config.feature_dim, config.prompt_dim, config.hidden
        if config.model == "cells" and config.geometry:
            # a: the named object, b: its shape, c: its colour (partial credit), read in one cell.
            self.match = nn.Parameter(torch.tensor([config.match_init, 0.0, 0.0]))
            self.place = nn.Parameter(torch.zeros(2 * GRID, len(POSITIONS)))  # V: row / column × place word
            self.relation = nn.Parameter(torch.zeros(len(RELATIONS), len(_COMPARISONS)))  # U
            self.register_buffer("cell_rowcol", _cell_rowcol(), persistent=False)
            self.register_buffer("cell_pairs", _cell_pair_comparisons(), persistent=False)
            self.quality = nn.Sequential(nn.Linear(1 + MAX_OBJECTS, hdim), nn.SiLU(), nn.Linear(hdim, 1))
        elif config.model == "cells":
            self.match = nn.Parameter(torch.zeros(CELL_TOKEN_DIM, OBJECT_TOKEN_DIM))  # W
            with torch.no_grad():
                self.match[1 : 1 + N_OBJECTS, :N_OBJECTS] = config.match_init * torch.eye(N_OBJECTS)
            self.quality = nn.Sequential(nn.Linear(1 + MAX_OBJECTS, hdim), nn.SiLU(), nn.Linear(hdim, 1))
        else:
            self.linear = nn.Linear(d, 1, bias=False)  # the linear part of the quality term: learns fastest
            self.h = nn.Sequential(nn.Linear(d, hdim), nn.SiLU())
            self.quality = nn.Linear(hdim, 1)
            self.image_proj = nn.Linear(hdim, config.rank, bias=False) if p else None
            self.prompt_proj = nn.Linear(p, config.rank, bias=True) if p else None
        # Input normalisation (mlp: per-feature mean / std of the training images) and output standardisation.
        self.register_buffer("feature_mean", torch.zeros(d))
        self.register_buffer("feature_std", torch.ones(d))
        self.register_buffer("reward_mean", torch.zeros(()))
        self.register_buffer("reward_std", torch.ones(()))

    def raw(self, features: torch.Tensor, prompt_emb: torch.Tensor | None = None) -> torch.Tensor:
        if self.config.prompt_dim and prompt_emb is None:
            raise ValueError("this preference model needs a prompt embedding")
        if self.config.model == "cells":
            return self._raw_cells(features, prompt_emb)
        x = (features - self.feature_mean) / self.feature_std
        z = self.h(x)
        r = (self.linear(x) + self.quality(z)).squeeze(-1)
        if self.image_proj is not None:
            r = r + (self.image_proj(z) * self.prompt_proj(prompt_emb.to(z.dtype))).sum(-1)
        return r

    def _raw_cells(self, features: torch.Tensor, prompt_emb: torch.Tensor) -> torch.Tensor:
        cells = features.unflatten(1, (N_CELLS, CELL_TOKEN_DIM))  # [B, 9, 28]
        prompt_emb = prompt_emb.to(cells.dtype)
        tokens = prompt_emb[:, : MAX_OBJECTS * OBJECT_TOKEN_DIM].unflatten(1, (MAX_OBJECTS, OBJECT_TOKEN_DIM))
        present = prompt_emb[:, MAX_OBJECTS * OBJECT_TOKEN_DIM :]  # [B, 2]
        tau = self.config.tau
        if not self.config.geometry:
            scores = torch.einsum("bjc,cd,bkd->bkj", cells, self.match, tokens)  # [B, 2, 9]: object k in cell j
            matched = (tau * torch.logsumexp(scores / tau, dim=-1) * present).sum(-1)
        else:
            grid = (len(SHAPES), len(COLOR_NAMES))
            p_object = cells[..., 1 : 1 + N_OBJECTS].unflatten(-1, grid)  # [B, 9, 3, 6]: P(shape, colour) per cell
            want = tokens[..., :N_OBJECTS].unflatten(-1, grid)  # [B, 2, 3, 6]: the named object, one-hot
            scores = (
                self.match[0] * torch.einsum("bjsc,bksc->bkj", p_object, want)
                + self.match[1] * torch.einsum("bjs,bks->bkj", p_object.sum(-1), want.sum(-1))
                + self.match[2] * torch.einsum("bjc,bkc->bkj", p_object.sum(-2), want.sum(-2))
            )
            place_word = tokens[..., N_OBJECTS : N_OBJECTS + len(POSITIONS)]  # [B, 2, 5]
            scores = scores + torch.einsum("jg,gp,bkp->bkj", self.cell_rowcol.to(cells.dtype), self.place, place_word)
            one = tau * torch.logsumexp(scores[:, 0] / tau, dim=-1)
            # Two objects: the soft maximum over placements (j, l), j ≠ l, of s_0j + s_1l + u_relᵀ g(j, l).
            relation = tokens[:, 0, N_OBJECTS + len(POSITIONS) :: 2]  # [B, 4]: the relation word (role 0)
            pair_geometry = torch.einsum("br,rf,jlf->bjl", relation, self.relation, self.cell_pairs.to(cells.dtype))
            joint = scores[:, 0, :, None] + scores[:, 1, None, :] + pair_geometry
            joint = joint.masked_fill(torch.eye(N_CELLS, dtype=torch.bool, device=joint.device), float("-inf"))
            two = tau * torch.logsumexp(joint.flatten(1) / tau, dim=-1)
            matched = torch.where(present[:, 1] > 0, two, one * present[:, 0])
        occupied = (1 - cells[..., 0]).sum(-1, keepdim=True)  # expected number of objects in the image
        return matched + self.quality(torch.cat([occupied, present], -1)).squeeze(-1)

    def forward(self, features: torch.Tensor, prompt_emb: torch.Tensor | None = None) -> torch.Tensor:
        return (self.raw(features, prompt_emb) - self.reward_mean) / self.reward_std

    # -- persistence: a folder with config.json and model.safetensors ----------------------------------
    def save(self, folder: str | Path, metrics: dict | None = None) -> Path:
        """Write ``config.json`` (config + training metrics) and ``model.safetensors`` into a temporary
        folder and rename it over ``folder``: a reader sees the old model or the new one, never a mix."""
        from safetensors.torch import save_file

        def write(tmp: Path) -> None:
            state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
            save_file(state, tmp / "model.safetensors")
            doc = {"config": asdict(self.config), "metrics": metrics or {}}
            (tmp / "config.json").write_text(json.dumps(doc, indent=2, default=float))

        return atomic_write_folder(folder, write)

    @classmethod
    def load(cls, folder: str | Path) -> tuple[PreferenceModel, dict]:
        """(model in eval mode on CPU, its training metrics). A missing or broken folder is a UserError."""
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
            raise UserError(f"no preference model in {folder}: train one from the labels first")
        try:
            doc = json.loads((folder / "config.json").read_text())
            model = cls(PreferenceConfig(**{"geometry": False} | doc["config"]))  # models saved before geometry
            model.load_state_dict(load_file(folder / "model.safetensors", device="cpu"))
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
            raise UserError(f"the preference model in {folder} is unreadable: {str(e).splitlines()[0]}") from e
        return model.eval(), doc.get("metrics", {})


# -- training ---------------------------------------------------------------------------------------------
def bt_loss(delta: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean −[y·log σ(Δ) + (1 − y)·log σ(−Δ)] over [N]; y ∈ {1, ½, 0}."""
    return F.binary_cross_entropy_with_logits(delta, y.to(delta.dtype))


def pairwise_accuracy(delta: torch.Tensor, y: torch.Tensor) -> tuple[float | None, int]:
    """(fraction of non-tie labels whose side Δ picks, how many non-tie labels); Δ = 0 counts as half."""
    keep = y != 0.5
    n = int(keep.sum())
    if n == 0:
        return None, 0
    d, t = delta[keep], y[keep]
    hit = torch.where(d == 0, torch.full_like(d, 0.5), ((d > 0) == (t > 0.5)).to(d.dtype))
    return float(hit.mean()), n


@dataclass
class PreferenceData:
    """N labels: image features of the left / right image, the prompt embedding, the target y = label_0,
    and the pair each label belongs to (the unit of the train / held-out split)."""

    features_0: torch.Tensor  # [N, D]
    features_1: torch.Tensor  # [N, D]
    prompt_emb: torch.Tensor | None  # [N, P] or None
    y: torch.Tensor  # [N] in {1, 0.5, 0}
    groups: torch.Tensor  # [N] int: pair id

    def __post_init__(self):
        n = len(self.y)
        shapes_ok = self.features_0.shape == self.features_1.shape and self.features_0.shape[0] == n
        if not shapes_ok or len(self.groups) != n or (self.prompt_emb is not None and len(self.prompt_emb) != n):
            raise ValueError("features_0, features_1, prompt_emb, y and groups must have the same length")

    def subset(self, idx: torch.Tensor) -> PreferenceData:
        pe = None if self.prompt_emb is None else self.prompt_emb[idx]
        return PreferenceData(self.features_0[idx], self.features_1[idx], pe, self.y[idx], self.groups[idx])


@dataclass(frozen=True)
class FitConfig:
    lr: float = 1e-2  # AdamW, full batch
    weight_decay: float = 0.05  # decoupled (AdamW); the main guard against over-fitting 200 labels
    max_steps: int = 2000  # full-batch steps
    patience: int = 200  # stop after this many steps without a better held-out log-loss
    val_fraction: float = 0.2  # share of *pairs* held out
    min_pairs: int = 10  # fewer labelled pairs is refused: nothing meaningful to learn or to hold out
    seed: int = 0  # init and split

    def __post_init__(self):
        if not 0 < self.val_fraction < 1:
            raise UserError("val_fraction must be between 0 and 1")
        if self.lr <= 0 or self.weight_decay < 0 or self.max_steps < 1 or self.patience < 1:
            raise UserError("lr must be positive, weight_decay non-negative, max_steps and patience at least 1")


def split_by_pair(groups: torch.Tensor, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, held-out indices) with every label of one pair on the same side."""
    unique = np.unique(groups.cpu().numpy())
    rng = np.random.default_rng(seed)
    rng.shuffle(unique)
    n_val = max(1, int(round(val_fraction * len(unique))))
    val_groups = torch.as_tensor(unique[:n_val])
    is_val = torch.isin(groups.cpu(), val_groups)
    return torch.nonzero(~is_val).squeeze(1), torch.nonzero(is_val).squeeze(1)


def _delta(model: PreferenceModel, data: PreferenceData) -> torch.Tensor:
    return model.raw(data.features_0, data.prompt_emb) - model.raw(data.features_1, data.prompt_emb)


def fit_preference(
    data: PreferenceData, config: PreferenceConfig, fit: FitConfig = FitConfig(), progress: Callable | None = None
) -> tuple[PreferenceModel, dict]:
    """Train r_ψ on ``data``; returns (model in eval mode, metrics).

    metrics: n_labels, n_pairs, n_train / n_val labels, train / val log-loss, val_accuracy (non-tie held-out
    labels; None if there are none), n_val_non_tie, train_accuracy, best_step, steps. ``progress(step,
    metrics)`` is called every 50 steps (for a progress bar)."""
    n_pairs = int(torch.unique(data.groups).numel())
    if n_pairs < fit.min_pairs:
        raise UserError(f"need at least {fit.min_pairs} labelled pairs to train a reward model (have {n_pairs})")
    train_idx, val_idx = split_by_pair(data.groups, fit.val_fraction, fit.seed)
    train, val = data.subset(train_idx), data.subset(val_idx)

    with torch.random.fork_rng(devices=[]):  # PyTorch's default init, from the run's seed, global RNG untouched
        torch.manual_seed(fit.seed)
        model = PreferenceModel(config)
    if config.model == "mlp":
        with torch.no_grad():
            images = _unique_images(train)
            model.feature_mean.copy_(images.mean(0))
            model.feature_std.copy_(images.std(0).clamp_min(1e-6) if len(images) > 1 else torch.ones_like(images[0]))
    opt = torch.optim.AdamW(model.parameters(), lr=fit.lr, weight_decay=fit.weight_decay)
    best = (float("inf"), 0, {k: v.clone() for k, v in model.state_dict().items()})
    step = 0
    for step in range(1, fit.max_steps + 1):
        model.train()
        loss = bt_loss(_delta(model, train), train.y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            val_loss = float(bt_loss(_delta(model.eval(), val), val.y))
        if val_loss < best[0] - 1e-6:
            best = (val_loss, step, {k: v.clone() for k, v in model.state_dict().items()})
        elif step - best[1] >= fit.patience:
            break
        if progress is not None and step % 50 == 0:
            progress(step, {"train_loss": float(loss.detach()), "val_loss": val_loss})
    model.load_state_dict(best[2])
    model.eval().requires_grad_(False)
    with torch.no_grad():
        # Output standardisation over the training images (each image once).
        r = model.raw(*_unique_images(train, with_prompts=True))
        model.reward_mean.copy_(r.mean())
        model.reward_std.copy_(r.std().clamp_min(1e-6) if len(r) > 1 else torch.ones(()))
        d_train, d_val = _delta(model, train), _delta(model, val)
        val_acc, n_val_non_tie = pairwise_accuracy(d_val, val.y)
        metrics = {
            "n_labels": len(data.y),
            "n_pairs": n_pairs,
            "n_train": len(train.y),
            "n_val": len(val.y),
            "train_loss": float(bt_loss(d_train, train.y)),
            "val_loss": best[0],
            "val_accuracy": val_acc,
            "n_val_non_tie": n_val_non_tie,
            "train_accuracy": pairwise_accuracy(d_train, train.y)[0],
            "best_step": best[1],
            "steps": step,
        }
    log.info("preference model: held-out accuracy %s on %d non-tie labels, log-loss %.4f (step %d of %d)",
             val_acc, n_val_non_tie, best[0], best[1], step)  # fmt: skip
    return model, metrics


def _unique_images(data: PreferenceData, with_prompts: bool = False):
    """Each training image once (the first label of each pair): features [M, D] (and prompt embeddings)."""
    g = data.groups.cpu().numpy()
    _, first = np.unique(g, return_index=True)
    idx = torch.as_tensor(np.sort(first))
    feats = torch.cat([data.features_0[idx], data.features_1[idx]])
    if not with_prompts:
        return feats
    pe = None if data.prompt_emb is None else torch.cat([data.prompt_emb[idx], data.prompt_emb[idx]])
    return feats, pe


# -- the reward ---------------------------------------------------------------------------------------------
@dataclass
class PreferenceReward:
    """``reward_fn(images, prompts, metadata) -> (rewards [B] float32, info)``; differentiable in ``images``.

    Runs on the device and in the dtype of the images it is given (the caller chooses)."""

    model: PreferenceModel
    features: nn.Module  # images [B, 3, H, W] in [0, 1] -> [B, D]
    metrics: dict = field(default_factory=dict)

    differentiable = True
    needs_weights = True

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Standardised r_ψ [B] in the images' dtype, with the autograd graph."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
        lo, hi = float(images.detach().min()), float(images.detach().max())
        if lo < 0 or hi > 1:
            raise ValueError(f"images must be in [0, 1], got values in [{lo:.3g}, {hi:.3g}]")
        self.model.to(device=images.device, dtype=images.dtype)
        self.features.to(device=images.device, dtype=images.dtype)
        pe = embed_prompts(self.model.config.prompt_embedding, prompts, self.features)
        pe = None if pe is None else pe.to(device=images.device, dtype=images.dtype)
        return self.model(self.features(images), pe)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict] | None = None):
        if images.dtype != torch.float32:
            raise ValueError(f"images must be float32, got {images.dtype}")
        r = self.score(images, prompts)
        return r.float(), {"preference_raw": (r * self.model.reward_std + self.model.reward_mean).detach()}


def preference_reward(
    folder: str | Path, probe: nn.Module | str | Path | None = None, clip: str | Path | None = None
) -> PreferenceReward:
    """Reward factory: the trained model in ``folder`` with its feature extractor.

    ``probe``: the Shapes probe the model was trained on (a module, or its folder; default: the shipped
    ``assets/shapes-probe``). ``clip``: for a model on CLIP features, the CLIP folder (default: the one recorded
    at training time). A different probe or different CLIP weights than at training time is a UserError."""
    model, metrics = PreferenceModel.load(folder)
    if model.config.features == "clip":
        features = ClipFeatures(clip if clip is not None else model.config.clip_folder,
                                text=model.config.prompt_embedding == CLIP_TEXT)  # fmt: skip
        if model.config.feature_digest and model.config.feature_digest != features.digest:
            raise UserError(f"the preference model in {folder} was trained on other CLIP weights than those in "
                            f"{str(features.folder)!r}; retrain it from the labels")  # fmt: skip
        return PreferenceReward(model, features, metrics)
    if model.config.features == "precomputed":
        raise UserError(f"the preference model in {folder} was trained on precomputed features; build the reward "
                        "with PreferenceReward(model, features) and the same feature extractor")  # fmt: skip
    kind = "cells" if model.config.features == "shapes-probe-cells" else "penultimate"
    features = ProbeFeatures(_load_probe(probe), kind)
    if model.config.feature_digest and model.config.feature_digest != features.digest:
        raise UserError(f"the preference model in {folder} was trained on another Shapes probe's features; "
                        "retrain it from the labels")  # fmt: skip
    return PreferenceReward(model, features, metrics)


def _load_probe(probe: nn.Module | str | Path | None) -> nn.Module:
    if isinstance(probe, nn.Module):
        return probe
    from .models import PROBE_PATH
    from .shapes.probe import ShapesProbe

    folder = Path(probe) if probe is not None else PROBE_PATH
    if not (folder / "model.safetensors").is_file() or not (folder / "config.json").is_file():
        raise UserError(f"the Shapes probe is not in {folder}: train it (python -m finetuners.shapes.train)")
    return ShapesProbe.load(folder)


# -- from the label store -------------------------------------------------------------------------------------
def load_image(path: str | Path) -> torch.Tensor:
    """A stored image file -> float32 [3, H, W] in [0, 1]."""
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


@torch.no_grad()
def store_dataset(store, features: nn.Module, prompt_embedding: str = "shapes-objects", batch: int = 256):
    """PreferenceData from every live non-skip label in a ``LabelStore`` (ties as y = ½): ``features`` of
    each stored image (computed once per image) and the ``prompt_embedding`` (a PROMPT_EMBEDDINGS key, or
    CLIP_TEXT with ClipFeatures)."""
    labels = store.labels()
    if not labels:
        raise UserError("there are no labels yet: label some pairs first")
    uids = sorted({u for lab in labels for u in (lab.pair.image_0_uid, lab.pair.image_1_uid)})
    missing = [u for u in uids if not store.image_path(u).is_file()]
    if missing:
        raise UserError(
            f"{len(missing)} labelled image(s) are missing from {store.images_dir}; run the integrity check"
        )
    param = next(features.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    feats = {}
    for i in range(0, len(uids), batch):
        chunk = uids[i : i + batch]
        images = torch.stack([load_image(store.image_path(u)) for u in chunk]).to(device)
        for u, f in zip(chunk, features(images).float().cpu()):
            feats[u] = f
    prompts = sorted({lab.pair.prompt for lab in labels})  # each prompt embedded once
    emb = embed_prompts(prompt_embedding, prompts, features)
    row = {p: i for i, p in enumerate(prompts)}
    return PreferenceData(
        features_0=torch.stack([feats[lab.pair.image_0_uid] for lab in labels]),
        features_1=torch.stack([feats[lab.pair.image_1_uid] for lab in labels]),
        prompt_emb=None if emb is None else emb.float().cpu()[[row[lab.pair.prompt] for lab in labels]],
        y=torch.tensor([lab.label_0 for lab in labels], dtype=torch.float32),
        groups=torch.tensor([lab.pair.id for lab in labels]),
    )


def train_from_store(
    store,
    out: str | Path | None = None,
    probe: nn.Module | str | Path | None = None,
    *,
    model: str | None = None,
    clip: str | Path | None = None,
    fit: FitConfig = FitConfig(),
    use_prompt: bool = True,
    progress: Callable | None = None,
    **config,
) -> tuple[PreferenceReward, dict]:
    """Train the Bradley–Terry reward on a ``LabelStore``'s labels and save it to ``out`` (safetensors + JSON)
    when given. Returns (reward_fn, metrics).

    Features: the Shapes probe (default), or with ``clip`` a local CLIP folder (``ClipFeatures``: the image
    embedding, and the caption's CLIP text embedding as the prompt embedding).
    ``model``: with the probe, "cells" (probe cell readings × the prompt's objects; the default) or "mlp" (the
    probe's penultimate features with the caption's attribute embedding); with CLIP, "mlp" (the default).
    ``use_prompt=False``: an mlp that ignores the prompt. ``probe``: a ShapesProbe, its folder, or None for the
    shipped one. Extra keywords go to PreferenceConfig."""
    if clip is not None:
        if model not in (None, "mlp"):
            raise UserError("CLIP features are read by the mlp model")
        features = ClipFeatures(clip, text=use_prompt)
        kind = {"features": "clip", "prompt_embedding": CLIP_TEXT if use_prompt else "none",
                "clip_folder": str(features.folder), "text_dim": features.dim if use_prompt else 0}  # fmt: skip
        model = "mlp"
    elif model in (None, "cells"):
        model = "cells"
        if not use_prompt:
            raise UserError("the cells model scores the image against the prompt; use model='mlp' without it")
        features = ProbeFeatures(_load_probe(probe), "cells")
        kind = {"features": "shapes-probe-cells", "prompt_embedding": "shapes-objects"}
    elif model == "mlp":
        features = ProbeFeatures(_load_probe(probe), "penultimate")
        kind = {"features": "shapes-probe", "prompt_embedding": "shapes-attributes" if use_prompt else "none"}
    else:
        raise UserError(f"unknown preference model {model!r}: cells or mlp")
    cfg = PreferenceConfig(model=model, feature_dim=features.dim, feature_digest=features.digest, **kind, **config)
    data = store_dataset(store, features, cfg.prompt_embedding)
    reward_model, metrics = fit_preference(data, cfg, fit, progress)
    if out is not None:
        reward_model.save(out, metrics | {"fit": asdict(fit)})
    return PreferenceReward(reward_model, features, metrics), metrics
