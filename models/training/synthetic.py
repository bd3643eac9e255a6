"""Synthetic image-caption pairs that need attribute binding and spatial relations.

Each scene holds two coloured shapes in a relation ("a red circle to the left of a blue
square"). A scene's *near-twins* (`--hard`) keep the same two shapes, the same two colours and the same
two slots (positions and sizes) and change only the binding or the relation:

- colour swap: the shapes trade colours ("a blue circle to the left of a red square");
- shape swap: the colours stay in their slots, the shapes trade ("a red square to the left
  of a blue circle");
- relation flip: the shapes trade slots ("a red circle to the right of a blue square").

A bag of words cannot tell a colour- or shape-swapped twin apart (same words), and a relation
flip is a binding problem too, since which object is named first varies. A twin group is
these four images; each caption is true of exactly one image in its group.

Datasets are written in the dataset CSV format (`filepath,caption`, paths relative to the CSV's
folder, PNG files) plus `group` (rows sharing a group id are near-twins), `twin` (base,
colour, shape or relation: what the row changes relative to its group's base row) and `boxes`
(a JSON list of {"phrase", "box": [x0, y0, x1, y1]} in fractions of the width and height, one
per object phrase such as "red circle"). Readers that only know `filepath,caption` ignore
them; `xmodal train` uses `boxes` for its grounding loss and `xmodal eval` uses `twin`.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import random
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image, ImageDraw

log = logging.getLogger(__name__)

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "star")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (235, 210, 30),
    "purple": (145, 55, 190),
    "orange": (250, 140, 20),
}
# "first REL second": the flip of each relation, and the axis it lives on.
RELATIONS: dict[str, str] = {"left": "right", "right": "left", "above": "below", "below": "above"}
_PHRASE = {
    "left": "to the left of",
    "right": "to the right of",
    "above": "above",
    "below": "below",
}
_BACKGROUNDS = ((250, 250, 250), (235, 235, 235), (245, 242, 232), (228, 234, 240))
SUPERSAMPLE = 4  # draw at 4x and downsample: anti-aliased edges, like a photo's


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclass(frozen=True)
class Slot:
    """Where an object is drawn: centre and half-size, in pixels of the final image."""

    x: float
    y: float
    r: float


@dataclass(frozen=True)
class Scene:
    """`first REL second`: `first` sits in `slots[0]`, `second` in `slots[1]`."""

    first_shape: str
    first_colour: str
    second_shape: str
    second_colour: str
    relation: str  # left | right | above | below: where `first` is relative to `second`
    slots: tuple[Slot, Slot]
    background: tuple[int, int, int]
    angle: float = 0.0  # small rotation of the shapes, degrees; the same for all twins

    @property
    def caption(self) -> str:
        return (
            f"{_article(self.first_colour)} {self.first_colour} {self.first_shape} "
            f"{_PHRASE[self.relation]} {_article(self.second_colour)} {self.second_colour} "
            f"{self.second_shape}"
        )

    def boxes(self, size: int = 64) -> list[dict[str, object]]:
        """Each object phrase ("red circle") with its box, in fractions of the image size."""
        out: list[dict[str, object]] = []
        for shape, colour, slot in (
            (self.first_shape, self.first_colour, self.slots[0]),
            (self.second_shape, self.second_colour, self.slots[1]),
        ):
            box = [(slot.x - slot.r) / size, (slot.y - slot.r) / size]
            box += [(slot.x + slot.r) / size, (slot.y + slot.r) / size]
            out.append({"phrase": f"{colour} {shape}", "box": [round(v, 4) for v in box]})
        return out

    def shape_swapped(self) -> Scene:
        return replace(self, first_shape=self.second_shape, second_shape=self.first_shape)

    def colour_swapped(self) -> Scene:
        return replace(self, first_colour=self.second_colour, second_colour=self.first_colour)

    def relation_flipped(self) -> Scene:
        # Same words except the relation, so the objects trade slots to keep the caption true.
        return replace(self, relation=RELATIONS[self.relation], slots=self.slots[::-1])

    def twins(self) -> list[Scene]:
        """The scene and its three near-twins, in the order of `TWIN_KINDS`."""
        return [self, self.colour_swapped(), self.shape_swapped(), self.relation_flipped()]


TWIN_KINDS = ("base", "colour", "shape", "relation")


def _sample_slots(rng: random.Random, relation: str, size: int) -> tuple[Slot, Slot]:
    """Two non-overlapping slots where slot 0 is clearly `relation` of slot 1."""
    margin = size / 16
    for _ in range(1000):
        r0, r1 = rng.uniform(size * 0.11, size * 0.17), rng.uniform(size * 0.11, size * 0.17)
        x0, y0 = (
            rng.uniform(r0 + margin, size - r0 - margin),
            rng.uniform(r0 + margin, size - r0 - margin),
        )
        x1, y1 = (
            rng.uniform(r1 + margin, size - r1 - margin),
            rng.uniform(r1 + margin, size - r1 - margin),
        )
        along, across = (x1 - x0, y1 - y0) if relation in ("left", "right") else (y1 - y0, x1 - x0)
        if relation in ("right", "below"):
            along = -along
        # Slot 0 must precede slot 1 on the axis by more than both half-sizes (no overlap on
        # the axis) and lie more along the axis than across it, so the relation is unambiguous.
        if along > r0 + r1 + margin and abs(across) < along * 0.8:
            return Slot(x0, y0, r0), Slot(x1, y1, r1)
    raise RuntimeError("could not place two shapes")  # pragma: no cover - sizes always fit


def _polygon(shape: str, slot: Slot, scale: float, angle: float) -> list[tuple[float, float]]:
    cx, cy, r = slot.x * scale, slot.y * scale, slot.r * scale
    if shape == "square":
        pts = [(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)]
    elif shape == "triangle":
        pts = [(0.0, -1.0), (0.95, 0.8), (-0.95, 0.8)]
    elif shape == "diamond":
        pts = [(0.0, -1.0), (0.8, 0.0), (0.0, 1.0), (-0.8, 0.0)]
    elif shape == "cross":
        a, b = 0.33, 1.0
        pts = [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a),
               (-b, a), (-b, -a), (-a, -a)]  # fmt: skip
    elif shape == "star":
        pts = []
        for k in range(10):
            rad = 1.0 if k % 2 == 0 else 0.45
            theta = -math.pi / 2 + k * math.pi / 5
            pts.append((rad * math.cos(theta), rad * math.sin(theta)))
    else:
        raise ValueError(f"unknown shape {shape!r}")
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return [(cx + r * (px * c - py * s), cy + r * (px * s + py * c)) for px, py in pts]


def render(scene: Scene, size: int = 64) -> Image.Image:
    scale = SUPERSAMPLE
    img = Image.new("RGB", (size * scale, size * scale), scene.background)
    draw = ImageDraw.Draw(img)
    for shape, colour, slot in (
        (scene.first_shape, scene.first_colour, scene.slots[0]),
        (scene.second_shape, scene.second_colour, scene.slots[1]),
    ):
        fill = COLOURS[colour]
        if shape == "circle":
            cx, cy, r = slot.x * scale, slot.y * scale, slot.r * scale * 0.95
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon(_polygon(shape, slot, scale, scene.angle), fill=fill)
    return img.resize((size, size), Image.Resampling.LANCZOS)


def random_scene(
    rng: random.Random,
    size: int = 64,
    shapes: tuple[str, str] | None = None,
    colours: tuple[str, str] | None = None,
    relation: str | None = None,
) -> Scene:
    """Two different shapes in two different colours (a same-shape or same-colour pair would
    make a twin identical to its original)."""
    s0, s1 = shapes if shapes is not None else tuple(rng.sample(SHAPES, 2))
    c0, c1 = colours if colours is not None else tuple(rng.sample(sorted(COLOURS), 2))
    rel = relation if relation is not None else rng.choice(sorted(RELATIONS))
    return Scene(
        first_shape=s0,
        first_colour=c0,
        second_shape=s1,
        second_colour=c1,
        relation=rel,
        slots=_sample_slots(rng, rel, size),
        background=rng.choice(_BACKGROUNDS),
        angle=rng.uniform(-12.0, 12.0),
    )


def _distinct_configs(rng: random.Random) -> list[tuple[tuple[str, str], tuple[str, str], str]]:
    """Every (unordered shape pair, unordered colour pair, axis), shuffled. Two twin groups
    with different configs never share a true caption, so a test query has one right image."""
    configs = []
    for i, a in enumerate(SHAPES):
        for b in SHAPES[i + 1 :]:
            names = sorted(COLOURS)
            for j, c in enumerate(names):
                for d in names[j + 1 :]:
                    for axis in ("left", "above"):
                        configs.append(((a, b), (c, d), axis))
    rng.shuffle(configs)
    return configs


def _orient(
    rng: random.Random, config: tuple[tuple[str, str], tuple[str, str], str]
) -> tuple[tuple[str, str], tuple[str, str], str]:
    """Randomise which object is named first and which relation word names the axis."""
    (a, b), (c, d), axis = config
    if rng.random() < 0.5:
        a, b = b, a
    if rng.random() < 0.5:
        c, d = d, c
    rel = axis if rng.random() < 0.5 else RELATIONS[axis]
    return (a, b), (c, d), rel


def make_scenes(n: int, seed: int, *, twins: bool, size: int = 64) -> list[tuple[Scene, int, str]]:
    """`n` (scene, group id, twin kind) triples, deterministic in `seed`.

    twins=True: whole twin groups (4 consecutive rows in `TWIN_KINDS` order; `n` rounded down
    to a multiple of 4) whose (shape pair, colour pair, axis) are all different while there
    are enough of them (450), so every caption is true of exactly one image in the set.
    twins=False: independent random scenes, each its own group (kind "base").
    """
    rng = random.Random(seed)
    out: list[tuple[Scene, int, str]] = []
    if not twins:
        return [(random_scene(rng, size), g, "base") for g in range(n)]
    groups = n // 4
    configs = _distinct_configs(rng)
    if groups > len(configs):
        log.warning(
            "%d twin groups asked for but only %d distinct configurations exist: "
            "some captions will be true of more than one image",
            groups,
            len(configs),
        )
    for g in range(groups):
        if g % len(configs) == 0 and g:
            rng.shuffle(configs)
        shapes, colours, rel = _orient(rng, configs[g % len(configs)])
        base = random_scene(rng, size, shapes=shapes, colours=colours, relation=rel)
        out.extend((scene, g, kind) for scene, kind in zip(base.twins(), TWIN_KINDS, strict=True))
    return out


def write_dataset(folder: Path, n: int, seed: int, *, twins: bool = False, size: int = 64) -> Path:
    """Render `n` pairs (see `make_scenes`) as PNGs under `folder/images` and write
    `folder/data.csv` (`filepath,caption,group,twin,boxes`). Returns the CSV path."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    csv_path = folder / "data.csv"
    rows = []
    for i, (scene, group, kind) in enumerate(make_scenes(n, seed, twins=twins, size=size)):
        rel = f"images/{i:06d}.png"
        # PNG metadata off: the bytes depend only on the pixels, so files are reproducible.
        render(scene, size).save(folder / rel, format="PNG", optimize=False)
        boxes = json.dumps(scene.boxes(size), separators=(",", ":"))
        rows.append((rel, scene.caption, group, kind, boxes))
    with csv_path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["filepath", "caption", "group", "twin", "boxes"])
        writer.writerows(rows)
    log.info("wrote %d pairs (%s) to %s", len(rows), "twin groups" if twins else "random", csv_path)
    return csv_path


def synth_main(out: Path, n: int, seed: int, hard: bool) -> Path:
    """`xmodal synth --out DIR --n N --seed S [--hard]`: write a dataset, return its CSV."""
    return write_dataset(out, n, seed, twins=hard)
