"""The synthetic near-twin generator: deterministic, and twins differ only in binding."""

from __future__ import annotations

import csv
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
    path = synth_main(tmp_path / "d", 9, 3, twins=False)
    rows = _read(path)
    assert list(rows[0]) == ["filepath", "caption", "group"]
    assert len(rows) == 9
    for row in rows:
        img = Image.open(path.parent / row["filepath"])
        assert img.format == "PNG" and img.size == (64, 64)


def test_twins_differ_only_in_binding_or_relation() -> None:
    scenes = make_scenes(40, seed=1, twins=True)
    assert len({s.caption for s, _ in scenes}) == 40  # each caption true of one image
    for g in range(10):
        base, swap, flip, both = (s for s, group in scenes if group == g)
        for twin in (swap, flip, both):
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
        # Relation flip: same bindings, the relation word flips and the objects trade slots.
        assert flip.relation == RELATIONS[base.relation] and flip.slots == base.slots[::-1]
        assert (flip.first_colour, flip.first_shape) == (base.first_colour, base.first_shape)
        # The pictures: every object shows its own colour at its slot's centre, and the four
        # renderings are four different images.
        pictures = []
        for scene in (base, swap, flip, both):
            pixels = np.asarray(render(scene), dtype=int)
            objects = ((scene.first_colour, scene.slots[0]), (scene.second_colour, scene.slots[1]))
            for colour, slot in objects:
                got = pixels[int(slot.y), int(slot.x)]
                assert np.abs(got - np.array(COLOURS[colour])).max() < 40, (scene, colour, got)
            pictures.append(pixels.tobytes())
        assert len(set(pictures)) == 4


def test_relation_geometry_matches_caption() -> None:
    for scene, _ in make_scenes(200, seed=5, twins=False):
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
