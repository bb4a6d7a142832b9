"""The Shapes world: a procedural, seeded text-to-image dataset.

A scene is one or two coloured shapes on a dark background, each sitting in one cell of a 3x3 grid
(with a little jitter in position and size). Captions come from three templates:

    "a red circle"                               one object, any cell
    "a red circle on the left" / "... in the center"   one object, constrained cell
    "a red circle above a blue square"           two objects and a spatial relation

and, outside the default mix (``three_share``), a fourth that asks for more of the sampler:

    "a red circle, a blue square and a green triangle"   three objects, any cells

Everything is a pure function of a seed (``numpy.random.Generator``), so a dataset replays exactly.
``parse_prompt`` turns a caption back into a :class:`PromptSpec` whose ``satisfied_by`` checks a scene
read back by the probe (``finetuners.shapes.probe``).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 32
GRID = 3
N_CELLS = GRID * GRID
SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 70),
    "blue": (50, 90, 235),
    "yellow": (240, 220, 40),
    "purple": (160, 60, 210),
    "white": (235, 235, 235),
}
COLOR_NAMES = tuple(COLORS)
BACKGROUND = (28, 28, 34)
# Domains: the default world and shifted variants for cross-domain fine-tuning (SADM, ALGORITHMS.md §5.4).
# A domain sets the half-size range of a shape in output pixels; everything else is shared. "large" is a
# shift the shipped probe still reads (98 % of real images) and the shipped VAE still reconstructs (37.7 dB).
DOMAINS = {"shapes": (3.6, 4.6), "large": (4.8, 5.4)}
POSITIONS = {  # single-object position words -> allowed cells (row-major, row 0 = top)
    "on the left": {r * GRID + 0 for r in range(GRID)},
    "on the right": {r * GRID + GRID - 1 for r in range(GRID)},
    "at the top": {0 * GRID + c for c in range(GRID)},
    "at the bottom": {(GRID - 1) * GRID + c for c in range(GRID)},
    "in the center": {(GRID // 2) * GRID + GRID // 2},
}
RELATIONS = ("above", "below", "to the left of", "to the right of")
TEMPLATES = ("object", "position", "relation", "three")  # a PromptSpec's template; the first three as TEMPLATE_WEIGHTS
# Template mix of the training distribution: P(one object), P(one object + position), P(two objects). Three-object
# captions are outside it: ``random_spec(rng, three_share=s)`` draws one with probability s, and with s = 0 (the
# default) draws exactly what it always has, so every dataset and evaluation set replays.
TEMPLATE_WEIGHTS = (0.3, 0.3, 0.4)
VOCABULARY = (
    "a", "on", "the", "at", "in", "to", "of", "left", "right", "top", "bottom", "center",
    "above", "below", *SHAPES, *COLOR_NAMES,
)  # fmt: skip

_SUPERSAMPLE = 4  # render at 4x and downsample with a box filter: anti-aliased edges


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    cell: int  # 0..8, row-major

    @property
    def row(self) -> int:
        return self.cell // GRID

    @property
    def col(self) -> int:
        return self.cell % GRID


@dataclass(frozen=True)
class PromptSpec:
    """What a caption asks for: objects (shape, colour) and a constraint on their cells."""

    objects: tuple[tuple[str, str], ...]  # (shape, colour) per object
    position: str | None = None  # key of POSITIONS, one-object prompts only
    relation: str | None = None  # one of RELATIONS, two-object prompts only

    @property
    def template(self) -> str:
        """Which caption template this is: one of ``TEMPLATES``."""
        if len(self.objects) == 3:
            return "three"
        return "relation" if self.relation else "position" if self.position else "object"

    def cells_ok(self, cells: tuple[int, ...]) -> bool:
        """Whether objects placed in ``cells`` (same order as ``objects``) satisfy the constraint."""
        if len(cells) != len(self.objects) or len(set(cells)) != len(cells):
            return False
        if self.position is not None:
            return cells[0] in POSITIONS[self.position]
        if self.relation is not None:
            (ra, ca), (rb, cb) = divmod(cells[0], GRID), divmod(cells[1], GRID)
            return {
                "above": ra < rb,
                "below": ra > rb,
                "to the left of": ca < cb,
                "to the right of": ca > cb,
            }[self.relation]
        return True

    def valid_placements(self) -> list[tuple[int, ...]]:
        """Every assignment of distinct cells to the objects that satisfies the prompt."""
        return [cells for cells in itertools.permutations(range(N_CELLS), len(self.objects)) if self.cells_ok(cells)]

    def satisfied_by(self, objects: list[Obj]) -> bool:
        """True when the scene holds exactly the prompted objects, placed as the prompt says."""
        return len(objects) == len(self.objects) and self.shown_in(objects)

    def shown_in(self, objects: list[Obj]) -> bool:
        """True when the scene holds the prompted objects, placed as the prompt says; other objects may be there too
        (what a superposition of two one-object prompts is asked to show)."""
        for chosen in itertools.permutations(objects, len(self.objects)):
            if all((o.shape, o.color) == want for o, want in zip(chosen, self.objects)) and self.cells_ok(
                tuple(o.cell for o in chosen)
            ):
                return True
        return False


def describe_scene(objects: list[Obj]) -> str:
    """A scene in words, objects in reading order: "red circle + blue square", or "(empty)"."""
    return " + ".join(f"{o.color} {o.shape}" for o in sorted(objects, key=lambda o: o.cell)) or "(empty)"


def caption(spec: PromptSpec) -> str:
    words = [f"a {color} {shape}" for shape, color in spec.objects]
    if spec.relation is not None:
        return f"{words[0]} {spec.relation} {words[1]}"
    if spec.position is not None:
        return f"{words[0]} {spec.position}"
    if len(words) == 3:
        return f"{words[0]}, {words[1]} and {words[2]}"
    return words[0]


def partial_captions(spec: PromptSpec) -> tuple[str, ...]:
    """One-object captions of each of ``spec``'s objects, in order: what a caption that leaves things out says."""
    return tuple(caption(PromptSpec((obj,))) for obj in spec.objects)


_OBJ = r"an? (\w+) (\w+)"
_RE_TWO = re.compile(rf"^{_OBJ} ({'|'.join(RELATIONS)}) {_OBJ}$")
_RE_POS = re.compile(rf"^{_OBJ} ({'|'.join(POSITIONS)})$")
_RE_ONE = re.compile(rf"^{_OBJ}$")
_RE_THREE = re.compile(rf"^{_OBJ} ?, {_OBJ},? and {_OBJ}$")


def parse_prompt(text: str) -> PromptSpec | None:
    """Parse a Shapes caption (case and surrounding spaces ignored); ``None`` if it is not one."""
    text = " ".join(text.lower().strip().rstrip(".").split())

    def obj(color: str, shape: str) -> tuple[str, str] | None:
        return (shape, color) if shape in SHAPES and color in COLORS else None

    if m := _RE_TWO.match(text):
        a, b = obj(m[1], m[2]), obj(m[4], m[5])
        return PromptSpec((a, b), relation=m[3]) if a and b else None
    if m := _RE_POS.match(text):
        a = obj(m[1], m[2])
        return PromptSpec((a,), position=m[3]) if a else None
    if m := _RE_ONE.match(text):
        a = obj(m[1], m[2])
        return PromptSpec((a,)) if a else None
    if m := _RE_THREE.match(text):
        objs = (obj(m[1], m[2]), obj(m[3], m[4]), obj(m[5], m[6]))
        return PromptSpec(objs) if all(objs) and len(set(objs)) == 3 else None
    return None


def random_spec(rng: np.random.Generator, three_share: float = 0.0) -> PromptSpec:
    """Draw a caption from the training distribution (TEMPLATE_WEIGHTS); with ``three_share`` > 0, a three-object
    caption (three distinct objects, any cells) with that probability instead."""

    def one() -> tuple[str, str]:
        return SHAPES[rng.integers(len(SHAPES))], COLOR_NAMES[rng.integers(len(COLOR_NAMES))]

    def distinct(n: int) -> tuple[tuple[str, str], ...]:  # n different objects, a repeat drawn again
        objs = [one()]
        while len(objs) < n:
            if (o := one()) not in objs:
                objs.append(o)
        return tuple(objs)

    if three_share > 0 and rng.random() < three_share:
        return PromptSpec(distinct(3))
    kind = rng.choice(3, p=TEMPLATE_WEIGHTS)
    if kind == 0:
        return PromptSpec((one(),))
    if kind == 1:
        return PromptSpec((one(),), position=list(POSITIONS)[rng.integers(len(POSITIONS))])
    return PromptSpec(distinct(2), relation=RELATIONS[rng.integers(len(RELATIONS))])


def place(spec: PromptSpec, rng: np.random.Generator) -> list[Obj]:
    """Draw cells for the prompt's objects uniformly among the valid placements."""
    placements = valid_placements(spec)
    cells = placements[rng.integers(len(placements))]
    return [Obj(shape, color, cell) for (shape, color), cell in zip(spec.objects, cells)]


_PLACEMENT_CACHE: dict[PromptSpec, list[tuple[int, ...]]] = {}


def valid_placements(spec: PromptSpec) -> list[tuple[int, ...]]:
    """``spec.valid_placements()``, cached by the prompt's constraint (objects do not matter)."""
    key = PromptSpec(tuple(("", "") for _ in spec.objects), spec.position, spec.relation)
    if key not in _PLACEMENT_CACHE:
        _PLACEMENT_CACHE[key] = key.valid_placements()
    return _PLACEMENT_CACHE[key]


def render(objects: list[Obj], rng: np.random.Generator, domain: str = "shapes") -> np.ndarray:
    """Render a scene as uint8 [H, W, 3]. Jitter of centre (±1.5 px) and size (``DOMAINS[domain]``) comes
    from ``rng``."""
    s = _SUPERSAMPLE
    size = IMAGE_SIZE * s
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    cell = IMAGE_SIZE / GRID
    for o in objects:
        cx = (o.col + 0.5) * cell + rng.uniform(-1.5, 1.5)
        cy = (o.row + 0.5) * cell + rng.uniform(-1.5, 1.5)
        r = rng.uniform(*DOMAINS[domain])  # half-size in output pixels
        box = [(cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s]
        fill = COLORS[o.color]
        if o.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif o.shape == "square":
            rr = r * 0.9
            draw.rectangle([(cx - rr) * s, (cy - rr) * s, (cx + rr) * s, (cy + rr) * s], fill=fill)
        else:  # triangle pointing up
            draw.polygon(
                [(cx * s, (cy - r) * s), ((cx - r) * s, (cy + r) * s), ((cx + r) * s, (cy + r) * s)], fill=fill
            )
    return np.asarray(img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX))


@dataclass(frozen=True)
class Sample:
    caption: str
    spec: PromptSpec
    objects: list[Obj]
    image: np.ndarray  # uint8 [H, W, 3]


def make_sample(
    rng: np.random.Generator, spec: PromptSpec | None = None, domain: str = "shapes", three_share: float = 0.0
) -> Sample:
    spec = spec if spec is not None else random_spec(rng, three_share)
    objects = place(spec, rng)
    return Sample(caption(spec), spec, objects, render(objects, rng, domain))


def make_dataset(n: int, seed: int, domain: str = "shapes", three_share: float = 0.0) -> list[Sample]:
    """``n`` samples of ``domain`` (a key of ``DOMAINS``), a pure function of ``seed`` (and ``three_share``)."""
    rng = np.random.default_rng(seed)
    return [make_sample(rng, domain=domain, three_share=three_share) for _ in range(n)]


def cell_targets(objects: list[Obj]) -> tuple[np.ndarray, np.ndarray]:
    """Per-cell labels for the probe: shape index (0 = empty, 1.. = SHAPES) and colour index (-1 if empty)."""
    shape = np.zeros(N_CELLS, dtype=np.int64)
    color = np.full(N_CELLS, -1, dtype=np.int64)
    for o in objects:
        shape[o.cell] = 1 + SHAPES.index(o.shape)
        color[o.cell] = COLOR_NAMES.index(o.color)
    return shape, color


def eval_prompts(n: int, seed: int = 12345, three_share: float = 0.0) -> list[str]:
    """A fixed list of captions from the training distribution, for evaluation tables."""
    rng = np.random.default_rng(seed)
    return [caption(random_spec(rng, three_share)) for _ in range(n)]
