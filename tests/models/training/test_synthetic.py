"""The synthetic near-twin generator: deterministic, and twins differ only in binding."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

from models.training.synthetic import (
    COLOURS,
    RELATIONS,
    make_scenes,
    render,
    synth_main,
    write_dataset,
)


def _read(csv_path: Path) -> list[dict[str, str]]:
    with csv_path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    a = write_dataset(tmp_path / "a", 12, seed=7, twins=True)
    b = write_dataset(tmp_path / "b", 12, seed=7, twins=True)
    c = write_dataset(tmp_path / "c", 12, seed=8, twins=True)
    assert a.read_bytes() == b.read_bytes()
    for row in _read(a):
        assert (a.parent / row["filepath"]).read_bytes() == (
            b.parent / row["filepath"]
        ).read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_csv_format(tmp_path: Path) -> None:
    path = synth_main(tmp_path / "d", 9, 3, hard=False)
    rows = _read(path)
    assert list(rows[0]) == ["filepath", "caption", "group", "twin", "boxes"]
    assert len(rows) == 9
    for row in rows:
        img = Image.open(path.parent / row["filepath"])
        assert img.format == "PNG" and img.size == (64, 64)
        boxes = json.loads(row["boxes"])
        assert [b["phrase"] in row["caption"] for b in boxes] == [True, True]
        for b in boxes:
            x0, y0, x1, y1 = b["box"]
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
            # The box's centre pixel shows the phrase's colour.
            colour = COLOURS[b["phrase"].split()[0]]
            got = img.convert("RGB").getpixel((int((x0 + x1) * 32), int((y0 + y1) * 32)))
            assert np.abs(np.array(got) - np.array(colour)).max() < 40


def test_twins_differ_only_in_binding_or_relation() -> None:
    scenes = make_scenes(40, seed=1, twins=True)
    assert len({s.caption for s, _, _ in scenes}) == 40  # each caption true of one image
    for g in range(10):
        kinds = [k for _, group, k in scenes if group == g]
        assert kinds == ["base", "colour", "shape", "relation"]
        base, swap, shape, flip = (s for s, group, _ in scenes if group == g)
        for twin in (swap, shape, flip):
            # Same objects (shapes, colours), same two slots, same background and rotation.
            assert {twin.first_shape, twin.second_shape} == {base.first_shape, base.second_shape}
            assert {twin.first_colour, twin.second_colour} == {
                base.first_colour,
                base.second_colour,
            }
            assert set(twin.slots) == set(base.slots)
            assert (twin.background, twin.angle) == (base.background, base.angle)
            assert twin.caption != base.caption
        # Colour swap: the very same words in the caption, only the binding changes.
        assert sorted(swap.caption.split()) == sorted(base.caption.split())
        assert swap.first_colour == base.second_colour and swap.slots == base.slots
        # Shape swap: the very same words, the shapes trade places, colours stay in their slots.
        assert sorted(shape.caption.split()) == sorted(base.caption.split())
        assert shape.first_shape == base.second_shape and shape.slots == base.slots
        assert shape.first_colour == base.first_colour
        # Relation flip: same bindings, the relation word flips and the objects trade slots.
        assert flip.relation == RELATIONS[base.relation] and flip.slots == base.slots[::-1]
        assert (flip.first_colour, flip.first_shape) == (base.first_colour, base.first_shape)
        # The pictures: every object shows its own colour at its slot's centre, and the four
        # renderings are four different images.
        pictures = []
        for scene in (base, swap, shape, flip):
            pixels = np.asarray(render(scene), dtype=int)
            objects = ((scene.first_colour, scene.slots[0]), (scene.second_colour, scene.slots[1]))
            for colour, slot in objects:
                got = pixels[int(slot.y), int(slot.x)]
                assert np.abs(got - np.array(COLOURS[colour])).max() < 40, (scene, colour, got)
            pictures.append(pixels.tobytes())
        assert len(set(pictures)) == 4


def test_relation_geometry_matches_caption() -> None:
    for scene, _, _ in make_scenes(200, seed=5, twins=False):
        a, b = scene.slots
        if scene.relation == "left":
            assert a.x + a.r < b.x - b.r
        elif scene.relation == "right":
            assert a.x - a.r > b.x + b.r
        elif scene.relation == "above":
            assert a.y + a.r < b.y - b.r
        else:
            assert a.y - a.r > b.y + b.r


def test_random_scenes_reproducible() -> None:
    one = make_scenes(20, seed=3, twins=False)
    two = make_scenes(20, seed=3, twins=False)
    assert one == two
