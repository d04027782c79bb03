"""Synthetic pedestrians: a procedural re-ID dataset in the Market-1501 layout, with ground truth for swaps.

Real re-ID datasets cannot be downloaded everywhere, and tests must not need them. This module draws
pedestrian crops with Pillow and writes them as Market-1501 does (`bounding_box_train/`,
`bounding_box_test/`, `query/`, names `0002_c1s1_000451_00.jpg`), plus one `metadata.json` that lists
every image's parameters so that any image can be drawn again.

Design
------
Every image is the product of two parameter sets, kept apart on purpose because they are exactly what
DG-Net separates:

* **appearance** (the identity): skin tone, hair colour and style, upper-body colour, pattern and
  sleeves, lower-body colour and type, shoes, bag, build. Every image of an identity carries the same
  appearance.
* **structure** (the image): viewpoint, walking phase, scale and position in the crop, occlusion,
  background (each camera its own scene, plus random clutter), camera lighting, blur, noise, JPEG.

`render(appearance_of=A, structure_of=B)` draws A's identity in B's exact structure, so every swap has a
true target (swap quality can be measured, not only looked at), and `render(A, A)` is the very image
that was encoded to A's file.

Drawing goes through an *index map*: the person and occluder are drawn with ImageDraw primitives into a
one-channel image whose values name a part (skin, hair, upper, ...); stripes and checks are applied to
it with numpy; a per-image palette then turns indices into colours over the background. This keeps
drawing fast (no per-pixel Python), gives part masks for free (`part_labels`), and makes the silhouette a
pure function of (appearance, structure). Camera effects follow: lighting (a per-channel lookup table),
Gaussian blur, seeded Gaussian noise, JPEG.

Identity must be earned, not read off one pixel: clothing colours come from a small palette of common
colours with jitter, some identities are near neighbours of another (a copy with one colour shifted a
little), each camera has its own scene and colour cast, and some images are occluded. `difficulty` in
[0, 1] scales palette closeness, occlusion, lighting strength, blur and noise; at 0 there is no
lighting change, blur, noise or occlusion.

Protocol: half of the identities (pids 1..ids//2) train, the others test. Each identity appears in 2 or
more cameras with at least 2 images in each, so that for a test identity one image per camera becomes
a query and the rest gallery, and every query has a true match in another camera. The gallery also
holds distractors (pid 0: people outside train and test, some near neighbours of test identities) and
junk (pid -1: background-only crops, zoomed-in fragments, people cut by the crop edge).

Determinism: every random choice comes from a numpy Generator seeded by (seed, stream, index); there is
no global RNG, so the same arguments give byte-identical files.
"""
from __future__ import annotations

import argparse
import copy
import functools
import io
import json
import math
import os
import statistics
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from utils import UserError

FORMAT = "dgnet-synthetic-pedestrians"
GENERATOR_VERSION = 1  # bump when a change to drawing or sampling changes the files
METADATA_FILE = "metadata.json"
SPLIT_FOLDERS = {"train": "bounding_box_train", "gallery": "bounding_box_test", "query": "query"}
DISTRACTOR_PID = 0
JUNK_PID = -1
DISTRACTOR_SHARE = 0.05  # distractors, as a share of the test identities' gallery images
JUNK_SHARE = 0.03  # junk crops, likewise
PART_NAMES = ("background", "skin", "hair", "upper", "lower", "shoes", "bag", "occluder")

# Random streams: each (seed, stream, index) triple seeds its own Generator.
_STREAM_PROTOCOL, _STREAM_CAMERA, _STREAM_IDENTITY, _STREAM_DISTRACTOR, _STREAM_JUNK, _STREAM_IMAGE = range(6)

# Values of the index map. Several indices share a part (cap is headwear -> hair; pattern -> upper).
(_NONE, _SKIN, _HAIR, _UPPER, _UPPER_PATTERN, _LOWER, _SHOES, _BAG, _CAP, _OCCLUDER,
 _OCCLUDER_DETAIL) = range(11)
_PART_OF_INDEX = np.array([0, 1, 2, 3, 3, 4, 5, 6, 2, 7, 7], dtype=np.uint8)

Colour = list[int]

# ---------------------------------------------------------------------------------------------
# Palettes

# Clothing colours, most common first (as in real footage: black, white, grey and navy dominate).
# Higher difficulty keeps only the commoner ones, so more people share a colour family.
_CLOTHING = (
    ((28, 28, 32), 4.0),  # black
    ((225, 225, 220), 2.5),  # white
    ((125, 125, 128), 2.0),  # grey
    ((35, 45, 90), 2.0),  # navy
    ((70, 100, 150), 1.5),  # denim blue
    ((210, 195, 170), 1.2),  # beige
    ((100, 70, 45), 1.0),  # brown
    ((175, 35, 40), 1.0),  # red
    ((45, 105, 60), 0.9),  # green
    ((180, 160, 110), 0.8),  # khaki
    ((225, 145, 170), 0.7),  # pink
    ((100, 55, 130), 0.6),  # purple
    ((225, 195, 55), 0.6),  # yellow
    ((225, 120, 45), 0.5),  # orange
    ((30, 130, 135), 0.5),  # teal
    ((150, 200, 230), 0.5),  # light blue
)
_LOWER_BASES = (0, 2, 3, 4, 5, 6, 9, 1)  # indices into _CLOTHING: trousers are mostly dark, denim, beige
_SKIN_TONES = ((255, 224, 196), (241, 194, 160), (224, 172, 105), (198, 134, 66), (141, 85, 36), (92, 58, 40))
_HAIR_COLOURS = ((20, 16, 14), (60, 40, 25), (110, 75, 40), (170, 130, 70), (205, 185, 125), (135, 135, 135),
                 (150, 60, 30))
_SHOE_COLOURS = ((25, 25, 25), (230, 230, 230), (120, 120, 120), (95, 60, 35), (170, 40, 40), (40, 50, 90))

_PATTERNS = (("solid", 0.5), ("stripes", 0.2), ("checks", 0.12), ("print", 0.18))
_PRINT_SHAPES = ("circle", "square", "triangle", "diamond")
_LOWER_TYPES = (("trousers", 0.6), ("shorts", 0.2), ("skirt", 0.2))
_HAIR_STYLES = (("short", 0.45), ("long", 0.25), ("bun", 0.12), ("cap", 0.18))
_BAG_TYPES = (("none", 0.45), ("backpack", 0.35), ("handbag", 0.2))
_VIEWS = ("front", "back", "left", "right")  # left/right: the way the person faces in the image
_OCCLUDERS = (("pole", 0.25), ("box", 0.35), ("passerby", 0.25), ("sign", 0.15))
_JUNK_FRAMINGS = ("background", "fragment", "edge")

# Scene families: each camera gets one, with its own jittered colours, so backgrounds tell cameras apart
# (and mislead any matcher that looks at the whole crop, as real backgrounds do).
_SCENE_FAMILIES = {
    "corridor": {"wall_top": (200, 195, 180), "wall_bottom": (170, 165, 150), "floor_far": (150, 140, 120),
                 "floor_near": (120, 110, 95), "accent": (110, 80, 55), "detail": (95, 90, 80)},
    "street": {"wall_top": (160, 150, 140), "wall_bottom": (135, 125, 118), "floor_far": (120, 120, 125),
               "floor_near": (90, 90, 95), "accent": (60, 70, 85), "detail": (180, 180, 175)},
    "park": {"wall_top": (170, 200, 230), "wall_bottom": (195, 212, 222), "floor_far": (90, 130, 70),
             "floor_near": (70, 110, 55), "accent": (50, 100, 45), "detail": (120, 95, 65)},
    "brick": {"wall_top": (150, 80, 60), "wall_bottom": (135, 72, 55), "floor_far": (160, 155, 150),
              "floor_near": (130, 125, 120), "accent": (190, 180, 170), "detail": (100, 100, 100)},
    "shop": {"wall_top": (70, 70, 80), "wall_bottom": (60, 60, 70), "floor_far": (185, 180, 170),
             "floor_near": (160, 155, 145), "accent": (170, 200, 210), "detail": (200, 60, 50)},
    "station": {"wall_top": (215, 215, 210), "wall_bottom": (190, 190, 190), "floor_far": (140, 140, 145),
                "floor_near": (110, 110, 115), "accent": (120, 125, 135), "detail": (230, 200, 40)},
}
_PLATE_HEIGHT, _PLATE_WIDTH = 1.5, 5.0  # a camera's scene, in crop sizes; each crop is a window into it


# ---------------------------------------------------------------------------------------------
# Sampling helpers (all take the Generator explicitly; values are rounded so metadata stays short)

def _uniform(rng: np.random.Generator, low: float, high: float, digits: int = 4) -> float:
    return round(float(rng.uniform(low, high)), digits)


def _pick(rng: np.random.Generator, weights) -> int:
    """An index drawn with probability proportional to `weights` (cheaper than rng.choice for short lists)."""
    target, total = float(rng.random()) * sum(weights), 0.0
    for index, weight in enumerate(weights):
        total += weight
        if target < total:
            return index
    return len(weights) - 1


def _weighted(rng: np.random.Generator, options: tuple) -> Any:
    """One name from ((name, weight), ...)."""
    return options[_pick(rng, [w for _, w in options])][0]


def _clip_colour(values) -> Colour:
    return [int(min(255, max(0, round(float(v))))) for v in values]


def _jitter_colour(rng: np.random.Generator, base, sigma: float) -> Colour:
    """A colour near `base`: a shared brightness shift plus a smaller per-channel (hue) shift."""
    shift = rng.normal(0.0, sigma) + rng.normal(0.0, sigma / 2, size=3)
    return _clip_colour(np.asarray(base, dtype=np.float64) + shift)


def _shift_colour(rng: np.random.Generator, colour: Colour, amount: float) -> Colour:
    """A colour `amount` away (RGB distance) in a random direction: similar, never equal."""
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction) + 1e-9
    for sign in (1.0, -1.0):  # near black or white one direction clips away most of the change
        moved = _clip_colour(np.asarray(colour) + sign * amount * direction)
        if np.linalg.norm(np.subtract(moved, colour)) >= amount / 2:
            return moved
    return _clip_colour(np.asarray(colour) + np.where(np.asarray(colour) < 128, amount, -amount))


def _clothing_colour(rng: np.random.Generator, difficulty: float, bases: tuple[int, ...] | None = None) -> Colour:
    allowed = len(_CLOTHING) - round((len(_CLOTHING) - 6) * difficulty)  # closer palettes when harder
    indices = [i for i in (bases if bases is not None else range(len(_CLOTHING))) if i < allowed]
    base = _CLOTHING[indices[_pick(rng, [_CLOTHING[i][1] for i in indices])]][0]
    return _jitter_colour(rng, base, 26.0 * (1.0 - 0.4 * difficulty))


# ---------------------------------------------------------------------------------------------
# Appearance (identity)

def _sample_appearance(rng: np.random.Generator, difficulty: float) -> dict:
    hair_style = _weighted(rng, _HAIR_STYLES)
    upper = {
        "colour": _clothing_colour(rng, difficulty),
        "pattern": _weighted(rng, _PATTERNS),
        "secondary": _clothing_colour(rng, difficulty),
        "period": _uniform(rng, 0.04, 0.08),  # stripe/check period, in person heights
        "sleeves": "long" if rng.random() < 0.6 else "short",
        "print_shape": _PRINT_SHAPES[int(rng.integers(len(_PRINT_SHAPES)))],
        "print_size": _uniform(rng, 0.8, 1.4),
    }
    return {
        "skin": _jitter_colour(rng, _SKIN_TONES[int(rng.integers(len(_SKIN_TONES)))], 8.0),
        "hair": {"style": hair_style,
                 "colour": _jitter_colour(rng, _HAIR_COLOURS[int(rng.integers(len(_HAIR_COLOURS)))], 10.0),
                 "cap_colour": _clothing_colour(rng, difficulty)},
        "upper": upper,
        "lower": {"colour": _clothing_colour(rng, difficulty, _LOWER_BASES), "type": _weighted(rng, _LOWER_TYPES)},
        "shoes": _jitter_colour(rng, _SHOE_COLOURS[int(rng.integers(len(_SHOE_COLOURS)))], 12.0),
        "bag": {"type": _weighted(rng, _BAG_TYPES), "colour": _clothing_colour(rng, difficulty),
                "side": "right" if rng.random() < 0.5 else "left"},  # the person's side it is carried on
        "build": {"height": _uniform(rng, 0.9, 1.06), "width": _uniform(rng, 0.85, 1.2)},
    }


def _near_neighbour(rng: np.random.Generator, source: dict, difficulty: float) -> dict:
    """A different person who looks like `source`: one main colour shifted a little, maybe one more change."""
    appearance = copy.deepcopy(source)
    amount = 34.0 - 18.0 * difficulty  # RGB distance; small enough to be confused under a colour cast
    garment = "upper" if rng.random() < 0.6 else "lower"
    appearance[garment]["colour"] = _shift_colour(rng, appearance[garment]["colour"], amount)
    if rng.random() < 0.5:
        change = ("shoes", "hair", "bag", "pattern", "sleeves", "secondary")[int(rng.integers(6))]
        if change == "shoes":
            appearance["shoes"] = _jitter_colour(rng, _SHOE_COLOURS[int(rng.integers(len(_SHOE_COLOURS)))], 12.0)
        elif change == "hair":
            appearance["hair"]["colour"] = _shift_colour(rng, appearance["hair"]["colour"], amount)
        elif change == "bag":
            appearance["bag"]["type"] = _weighted(rng, _BAG_TYPES)
        elif change == "pattern":
            appearance["upper"]["pattern"] = _weighted(rng, _PATTERNS)
        elif change == "sleeves":
            appearance["upper"]["sleeves"] = "short" if appearance["upper"]["sleeves"] == "long" else "long"
        else:
            appearance["upper"]["secondary"] = _shift_colour(rng, appearance["upper"]["secondary"], 2 * amount)
    build = appearance["build"]
    build["height"] = round(min(1.08, max(0.88, build["height"] + float(rng.uniform(-0.03, 0.03)))), 4)
    build["width"] = round(min(1.22, max(0.83, build["width"] + float(rng.uniform(-0.05, 0.05)))), 4)
    return appearance


# ---------------------------------------------------------------------------------------------
# Cameras and structure (image)

def _sample_camera(rng: np.random.Generator, family: str, difficulty: float) -> dict:
    """A camera: its scene (a background family with its own colours) and its photometric character."""
    d = difficulty
    scene = {
        "family": family,
        "colours": {name: _jitter_colour(rng, rgb, 14.0) for name, rgb in _SCENE_FAMILIES[family].items()},
        "horizon": _uniform(rng, 0.42, 0.68),  # wall/floor boundary, as a share of the scene height
        "seed": int(rng.integers(2**31)),  # places doors, trees, windows
    }
    photometric = {
        "gain": [round(1.0 + float(rng.uniform(-1, 1)) * 0.16 * d, 4) for _ in range(3)],  # colour cast
        "brightness": round(1.0 + float(rng.uniform(-1, 1)) * 0.22 * d, 4),
        "gamma": round(math.exp(float(rng.uniform(-1, 1)) * 0.25 * d), 4),
        "bias": round(float(rng.uniform(-1, 1)) * 12.0 * d, 2),
        "blur": round(float(rng.uniform(0.0, 1.1)) * d, 3),  # Gaussian sigma in pixels at 128 px height
        "noise": round(float(rng.uniform(0.5, 1.5)) * 6.0 * d, 3),  # noise sigma, 0..255 scale
        "jpeg_quality": round(95 - float(rng.uniform(0, 30)) * d),
    }
    return {"scene": scene, "photometric": photometric}


def _sample_occluder(rng: np.random.Generator, difficulty: float) -> dict:
    kind = _weighted(rng, _OCCLUDERS)
    left_side = rng.random() < 0.5
    if kind == "pole":
        centre, half = _uniform(rng, 0.2, 0.8), _uniform(rng, 0.04, 0.08)
        box = [centre - half, -0.05, centre + half, 1.05]
    elif kind == "box":  # bench, bin, car bonnet: hides the legs
        box = [_uniform(rng, -0.2, 0.3), _uniform(rng, 0.62, 0.85), _uniform(rng, 0.6, 1.2), 1.05]
    elif kind == "passerby":  # someone else entering the crop from one side
        reach = _uniform(rng, 0.15, 0.25 + 0.15 * difficulty)
        box = [-0.3, _uniform(rng, 0.05, 0.2), reach, 1.05] if left_side else \
            [1 - reach, _uniform(rng, 0.05, 0.2), 1.3, 1.05]
    else:  # sign or railing panel at mid height
        x0, y0 = _uniform(rng, -0.2, 0.5), _uniform(rng, 0.2, 0.6)
        box = [x0, y0, x0 + _uniform(rng, 0.3, 0.55), y0 + _uniform(rng, 0.12, 0.25)]
    return {"kind": kind, "box": [round(v, 4) for v in box],
            "colour": _clothing_colour(rng, difficulty), "secondary": _clothing_colour(rng, difficulty)}


def _sample_clutter(rng: np.random.Generator, difficulty: float) -> list[dict]:
    """Objects in the scene behind the person, some in clothing colours to mislead colour matching."""
    items = []
    for _ in range(int(rng.integers(0, 2 + round(3 * difficulty)))):
        shape = ("rect", "ellipse", "bar")[int(rng.integers(3))]
        x0, y0 = _uniform(rng, -0.2, 0.9), _uniform(rng, 0.0, 0.85)
        w = _uniform(rng, 0.04, 0.1) if shape == "bar" else _uniform(rng, 0.1, 0.45)
        h = _uniform(rng, 0.3, 0.8) if shape == "bar" else _uniform(rng, 0.05, 0.35)
        items.append({"shape": shape, "box": [x0, y0, round(x0 + w, 4), round(y0 + h, 4)],
                      "colour": _clothing_colour(rng, difficulty)})
    return items


def _sample_structure(rng: np.random.Generator, camera: dict, difficulty: float, height: int, width: int,
                      framing: str) -> dict:
    d = difficulty
    scale, foot_y = _uniform(rng, 0.8, 0.95), _uniform(rng, 0.93, 0.99)
    center_x = round(0.5 + float(rng.uniform(-1, 1)) * (0.03 + 0.07 * d), 4)
    if framing == "fragment":  # a detector box far too small: part of a torso or legs fills the crop
        scale, foot_y, center_x = _uniform(rng, 1.7, 2.8), _uniform(rng, 1.25, 2.3), _uniform(rng, 0.15, 0.85)
    elif framing == "edge":  # a box that mostly missed the person
        center_x = _uniform(rng, -0.2, -0.02) if rng.random() < 0.5 else _uniform(rng, 1.02, 1.2)
    occluded = framing == "normal" and rng.random() < 0.35 * d
    cam = camera["photometric"]
    jitter = 1.0 + float(rng.uniform(-1, 1)) * 0.12 * d  # per-image exposure change
    return {
        "height": height,  # the size the image was drawn at; render() may draw at another
        "width": width,
        "framing": framing,  # normal, or a junk kind: background (no person), fragment, edge
        "view": _VIEWS[int(rng.integers(4))],
        "phase": _uniform(rng, 0.0, 2 * math.pi),  # walking phase: limb swing is stride * sin(phase)
        "stride": _uniform(rng, 0.2, 0.5),  # swing amplitude, radians
        "scale": scale,  # person height (before build) as a share of the crop height
        "center_x": center_x,  # feet position as shares of the crop width and height
        "foot_y": foot_y,
        "occluder": _sample_occluder(rng, d) if occluded else None,
        "scene": camera["scene"],
        "crop": [_uniform(rng, 0, 1), _uniform(rng, 0, 1)],  # where in the camera's scene this crop lies
        "clutter": _sample_clutter(rng, d),
        "lighting": {
            "gain": [round(g * cam["brightness"] * jitter, 4) for g in cam["gain"]],
            "gamma": round(cam["gamma"] * math.exp(float(rng.uniform(-1, 1)) * 0.08 * d), 4),
            "bias": round(cam["bias"] + float(rng.uniform(-1, 1)) * 4.0 * d, 2),
        },
        "blur": round(max(0.0, cam["blur"] + float(rng.uniform(-0.3, 0.4)) * d), 3),
        "noise": {"sigma": round(cam["noise"] * float(rng.uniform(0.7, 1.3)), 3), "seed": int(rng.integers(2**31))},
        "jpeg": {"quality": int(min(95, max(40, round(cam["jpeg_quality"] + float(rng.integers(-4, 5)) * d)))),
                 "subsampling": "4:2:0"},
    }


# ---------------------------------------------------------------------------------------------
# Drawing the person into the index map

@dataclass
class _Pose:
    """Pixel geometry of one person in one image: where the joints are."""

    u: float  # person height in pixels; body sizes are shares of it
    bw: float  # build width factor
    cx: float  # feet centre x
    top: float  # top of the head, y
    view: str
    facing: float  # side views: +1 faces image right, -1 image left
    legs: list  # [(hip, knee, ankle)], drawing order (far leg first)
    arms: dict  # "right"/"left" (the person's) -> (shoulder, elbow, hand)

    def y(self, share: float) -> float:
        return self.top + share * self.u

    @property
    def side(self) -> bool:
        return self.view in ("left", "right")

    @property
    def near_side(self) -> str:
        """Side views: the person's side that faces the camera (facing right, their right faces us)."""
        return "right" if self.facing > 0 else "left"


def _image_side(view: str, person_side: str) -> float:
    """Front/back views: -1 if the person's `person_side` is on the image left, +1 if on the right."""
    right_on_left = view == "front"  # facing the camera, their right hand is on our left
    return (-1.0 if right_on_left else 1.0) * (1.0 if person_side == "right" else -1.0)


_THIGH, _SHIN, _UPPER_ARM, _FOREARM = 0.235, 0.225, 0.16, 0.15  # limb lengths, in person heights


def _side_limbs(cx: float, hip_y: float, shoulder_y: float, u: float, facing: float, swing: float):
    """Legs and arms seen from the side: they swing about the hip and shoulder by `swing` radians."""
    legs = []
    for sign in (-1.0, 1.0):  # the far leg (back when the near one is forward) first
        theta = sign * swing
        knee = (cx + facing * _THIGH * u * math.sin(theta), hip_y + _THIGH * u * math.cos(theta))
        phi = theta - 0.9 * max(0.0, -theta)  # a leg behind the body bends, lifting the heel
        legs.append(((cx, hip_y), knee, (knee[0] + facing * _SHIN * u * math.sin(phi),
                                         knee[1] + _SHIN * u * math.cos(phi))))
    near = "right" if facing > 0 else "left"
    far = "left" if near == "right" else "right"
    arms = {}
    for name, sign in ((far, 1.0), (near, -1.0)):  # each arm swings against the leg on its side
        alpha = sign * 0.9 * swing
        elbow = (cx + facing * _UPPER_ARM * u * math.sin(alpha), shoulder_y + _UPPER_ARM * u * math.cos(alpha))
        beta = alpha + 0.25 + 0.3 * max(0.0, alpha)  # the forearm bends forward
        hand = (elbow[0] + facing * _FOREARM * u * math.sin(beta), elbow[1] + _FOREARM * u * math.cos(beta))
        arms[name] = ((cx, shoulder_y), elbow, hand)
    return legs, arms


def _front_limbs(cx: float, hip_y: float, shoulder_y: float, u: float, bw: float, view: str, phase: float,
                 stride: float):
    """Legs and arms seen from the front or back: a stride shows as a lifted foot and a shorter arm."""
    legs = []
    for sign in (-1.0, 1.0):
        x = cx + sign * 0.045 * u * bw
        lift = 0.05 * u * max(0.0, sign * math.sin(phase)) * stride / 0.35
        knee = (x + sign * 0.004 * u, hip_y + _THIGH * u - 0.3 * lift)
        legs.append(((x, hip_y), knee, (x, hip_y + (_THIGH + _SHIN) * u - lift)))
    shoulder_half = 0.115 * u * bw
    arms = {}
    for name in ("right", "left"):
        sign = _image_side(view, name)
        raise_by = 0.04 * u * abs(math.sin(phase))  # an arm swung toward or away from us looks shorter
        shoulder = (cx + sign * (shoulder_half - 0.025 * u), shoulder_y)
        hand = (cx + sign * (shoulder_half + 0.012 * u), hip_y - raise_by)
        elbow = ((shoulder[0] + hand[0]) / 2 + sign * 0.012 * u, (shoulder[1] + hand[1]) / 2)
        arms[name] = (shoulder, elbow, hand)
    return legs, arms


def _pose(appearance: dict, structure: Mapping, height: int, width: int) -> _Pose:
    """Joint positions: the structure places and poses the body, the appearance's build sizes it."""
    u = structure["scale"] * height * appearance["build"]["height"]
    bw = appearance["build"]["width"] * 1.12  # body widths in the drawing code are for a slim build
    cx, foot = structure["center_x"] * width, structure["foot_y"] * height
    top = foot - u  # the feet stay where the structure puts them, whatever the height
    view = structure["view"]
    facing = -1.0 if view == "left" else 1.0
    hip_y, shoulder_y = top + 0.5 * u, top + 0.19 * u
    if view in ("left", "right"):
        swing = structure["stride"] * math.sin(structure["phase"])
        legs, arms = _side_limbs(cx, hip_y, shoulder_y, u, facing, swing)
    else:
        legs, arms = _front_limbs(cx, hip_y, shoulder_y, u, bw, view, structure["phase"], structure["stride"])
    return _Pose(u, bw, cx, top, view, facing, legs, arms)


def _segment(draw: ImageDraw.ImageDraw, p0, p1, half_width: float, fill: int) -> None:
    """A limb: the quadrilateral of `half_width` around p0-p1, with a round joint at p1."""
    (x0, y0), (x1, y1) = p0, p1
    length = math.hypot(x1 - x0, y1 - y0) or 1.0
    nx, ny = -(y1 - y0) / length * half_width, (x1 - x0) / length * half_width
    draw.polygon([(x0 + nx, y0 + ny), (x1 + nx, y1 + ny), (x1 - nx, y1 - ny), (x0 - nx, y0 - ny)], fill=fill)
    _disc(draw, p1, half_width, half_width, fill)


def _disc(draw: ImageDraw.ImageDraw, centre, rx: float, ry: float, fill: int) -> None:
    rx, ry = max(rx, 0.5), max(ry, 0.5)
    draw.ellipse([centre[0] - rx, centre[1] - ry, centre[0] + rx, centre[1] + ry], fill=fill)


def _box(draw: ImageDraw.ImageDraw, x0: float, y0: float, x1: float, y1: float, fill: int) -> None:
    draw.rectangle([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], fill=fill)


def _draw_arm(draw: ImageDraw.ImageDraw, pose: _Pose, arm, long_sleeves: bool) -> None:
    shoulder, elbow, hand = arm
    u, bw = pose.u, pose.bw
    _disc(draw, shoulder, 0.032 * u * bw, 0.032 * u * bw, _UPPER)
    _segment(draw, shoulder, elbow, 0.03 * u * bw, _UPPER)
    _segment(draw, elbow, hand, 0.026 * u * bw, _UPPER if long_sleeves else _SKIN)
    _disc(draw, hand, 0.024 * u, 0.024 * u, _SKIN)


def _draw_handbag(draw: ImageDraw.ImageDraw, pose: _Pose, hand) -> None:
    half = (0.03 if pose.side else 0.045) * pose.u
    _box(draw, hand[0] - half, hand[1] + 0.005 * pose.u, hand[0] + half, hand[1] + 0.085 * pose.u, _BAG)


def _draw_legs(draw: ImageDraw.ImageDraw, pose: _Pose, lower_type: str) -> None:
    u, bw = pose.u, pose.bw
    leg_fill = _LOWER if lower_type == "trousers" else _SKIN
    for hip, knee, ankle in pose.legs:
        _segment(draw, hip, knee, 0.042 * u * bw, leg_fill)
        _segment(draw, knee, ankle, 0.034 * u * bw, leg_fill)
        if lower_type == "shorts":  # shorts end above the knee
            end = (hip[0] + 0.7 * (knee[0] - hip[0]), hip[1] + 0.7 * (knee[1] - hip[1]))
            _segment(draw, hip, end, 0.048 * u * bw, _LOWER)
        if pose.side:
            _disc(draw, (ankle[0] + pose.facing * 0.02 * u, ankle[1] + 0.02 * u), 0.048 * u, 0.02 * u, _SHOES)
        else:
            _disc(draw, (ankle[0], ankle[1] + 0.02 * u), 0.035 * u * bw, 0.022 * u, _SHOES)


def _draw_lower_garment(draw: ImageDraw.ImageDraw, pose: _Pose, lower_type: str) -> None:
    """The part of trousers, shorts or skirt that joins the legs below the hips."""
    u, cx = pose.u, pose.cx
    hip_half = (0.06 if pose.side else 0.09) * u * pose.bw
    if lower_type == "skirt":
        flare = 1.4 if pose.side else 1.55
        draw.polygon([(cx - hip_half, pose.y(0.49)), (cx + hip_half, pose.y(0.49)),
                      (cx + hip_half * flare, pose.y(0.71)), (cx - hip_half * flare, pose.y(0.71))], fill=_LOWER)
    else:
        _box(draw, cx - hip_half, pose.y(0.48), cx + hip_half, pose.y(0.57), _LOWER)


def _draw_torso(draw: ImageDraw.ImageDraw, pose: _Pose) -> None:
    u, cx = pose.u, pose.cx
    shoulder_half = (0.065 if pose.side else 0.115) * u * pose.bw
    hip_half = (0.062 if pose.side else 0.095) * u * pose.bw
    chest = pose.facing * 0.01 * u if pose.side else 0.0
    draw.polygon([(cx - shoulder_half + chest, pose.y(0.17)), (cx + shoulder_half + chest, pose.y(0.17)),
                  (cx + hip_half, pose.y(0.52)), (cx - hip_half, pose.y(0.52))], fill=_UPPER)


def _draw_print(draw: ImageDraw.ImageDraw, pose: _Pose, shape: str, size: float) -> None:
    """A logo on the chest: seen from the front only, so from behind the shirt looks plain."""
    x, y, r = pose.cx, pose.y(0.3), 0.045 * pose.u * pose.bw * size
    if shape == "circle":
        _disc(draw, (x, y), r, r, _UPPER_PATTERN)
    elif shape == "square":
        _box(draw, x - r, y - r, x + r, y + r, _UPPER_PATTERN)
    elif shape == "triangle":
        draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=_UPPER_PATTERN)
    else:
        draw.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=_UPPER_PATTERN)


def _draw_backpack(draw: ImageDraw.ImageDraw, pose: _Pose) -> None:
    """Full pack from behind, a strip on the back edge from the side, two straps from the front."""
    u, cx = pose.u, pose.cx
    if pose.view == "back":
        half = 0.09 * u * pose.bw
        _box(draw, cx - half, pose.y(0.2), cx + half, pose.y(0.44), _BAG)
    elif pose.side:
        back_x = cx - pose.facing * 0.065 * u * pose.bw
        _box(draw, back_x - pose.facing * 0.075 * u, pose.y(0.2), back_x + pose.facing * 0.01 * u, pose.y(0.44), _BAG)
    else:
        for sign in (-1.0, 1.0):
            x = cx + sign * 0.062 * u * pose.bw
            _segment(draw, (x, pose.y(0.175)), (x + sign * 0.006 * u, pose.y(0.36)), max(0.6, 0.011 * u), _BAG)


def _draw_head(draw: ImageDraw.ImageDraw, pose: _Pose, hair: dict) -> None:
    u, view, style = pose.u, pose.view, hair["style"]
    hx = pose.cx + (pose.facing * 0.012 * u if pose.side else 0.0)
    hy, rx, ry = pose.y(0.068), 0.052 * u, 0.066 * u
    _box(draw, pose.cx - 0.022 * u, pose.y(0.11), pose.cx + 0.022 * u, pose.y(0.19), _SKIN)  # neck
    if style == "long":  # hair falling behind the head to the shoulders, or down the back
        if pose.side:
            back = hx - pose.facing * rx
            _box(draw, back - pose.facing * 0.3 * rx, hy - 0.3 * ry, back + pose.facing * 1.1 * rx, pose.y(0.25), _HAIR)
        else:
            bottom = pose.y(0.27) if view == "back" else pose.y(0.23)
            _box(draw, hx - 1.15 * rx, hy - 0.3 * ry, hx + 1.15 * rx, bottom, _HAIR)
    head_box = [hx - rx, hy - ry, hx + rx, hy + ry]
    top_box = [hx - 1.06 * rx, hy - 1.08 * ry, hx + 1.06 * rx, hy + 0.9 * ry]
    if view == "back":
        draw.ellipse(head_box, fill=_HAIR)  # the back of a head is hair
    else:
        draw.ellipse(head_box, fill=_SKIN)
        draw.chord(top_box, 180, 360, fill=_HAIR)
        if pose.side:  # hair covers the back half of the head
            start = 90 if pose.facing > 0 else -90
            draw.pieslice(head_box, start, start + 180, fill=_HAIR)
            _disc(draw, (hx + pose.facing * 0.65 * rx, hy + 0.1 * ry), 0.3 * rx, 0.3 * ry, _SKIN)  # face
    if style == "bun":
        bun_x = hx - (pose.facing * 0.7 * rx if pose.side else 0.0)
        _disc(draw, (bun_x, hy - 0.95 * ry), 0.5 * rx, 0.42 * ry, _HAIR)
    elif style == "cap":
        draw.chord([hx - 1.1 * rx, hy - 1.12 * ry, hx + 1.1 * rx, hy + 0.6 * ry], 180, 360, fill=_CAP)
        if pose.side:
            _box(draw, hx, hy - 0.38 * ry, hx + pose.facing * 1.9 * rx, hy - 0.18 * ry, _CAP)
        elif view == "front":
            _box(draw, hx - 1.15 * rx, hy - 0.32 * ry, hx + 1.15 * rx, hy - 0.12 * ry, _CAP)


def _draw_person(draw: ImageDraw.ImageDraw, pose: _Pose, appearance: dict) -> None:
    """Back to front: far limbs, legs, hips, torso, pack, near limbs, head."""
    upper, bag = appearance["upper"], appearance["bag"]
    long_sleeves = upper["sleeves"] == "long"
    lower_type = appearance["lower"]["type"]
    if pose.side:
        far = "left" if pose.near_side == "right" else "right"
        _draw_arm(draw, pose, pose.arms[far], long_sleeves)
        if bag["type"] == "handbag" and bag["side"] == far:
            _draw_handbag(draw, pose, pose.arms[far][2])
    _draw_legs(draw, pose, lower_type)
    _draw_lower_garment(draw, pose, lower_type)
    if pose.side and bag["type"] == "backpack":
        _draw_backpack(draw, pose)  # before the torso: only the part behind the back shows
    _draw_torso(draw, pose)
    if pose.view == "front" and upper["pattern"] == "print":
        _draw_print(draw, pose, upper["print_shape"], upper["print_size"])
    if pose.view == "back":
        _draw_head(draw, pose, appearance["hair"])  # long hair falls over the back, under a backpack
    if not pose.side and bag["type"] == "backpack":
        _draw_backpack(draw, pose)
    arm_names = [pose.near_side] if pose.side else ["right", "left"]
    for name in arm_names:
        _draw_arm(draw, pose, pose.arms[name], long_sleeves)
        if bag["type"] == "handbag" and bag["side"] == name:
            _draw_handbag(draw, pose, pose.arms[name][2])
    if pose.view != "back":
        _draw_head(draw, pose, appearance["hair"])


def _draw_occluder(draw: ImageDraw.ImageDraw, occluder: dict, height: int, width: int) -> None:
    x0, y0, x1, y1 = occluder["box"]
    x0, x1, y0, y1 = x0 * width, x1 * width, y0 * height, y1 * height
    kind = occluder["kind"]
    _box(draw, x0, y0, x1, y1, _OCCLUDER)
    if kind == "pole":
        _box(draw, x0, y0 + 0.3 * (y1 - y0), x1, y0 + 0.34 * (y1 - y0), _OCCLUDER_DETAIL)
    elif kind == "box":
        _box(draw, x0, y0, x1, y0 + 0.04 * height, _OCCLUDER_DETAIL)
    elif kind == "passerby":  # torso in one colour, legs in another
        _box(draw, x0, y0 + 0.45 * (y1 - y0), x1, y1, _OCCLUDER_DETAIL)
    else:
        inset = 0.15 * min(x1 - x0, y1 - y0)
        _box(draw, x0 + inset, y0 + inset, x1 - inset, y1 - inset, _OCCLUDER_DETAIL)


def _apply_pattern(index: np.ndarray, pose: _Pose, upper: dict) -> None:
    """Stripes or checks on upper-body clothing, in body coordinates so they move with the person."""
    if upper["pattern"] not in ("stripes", "checks"):
        return
    half = max(1.0, upper["period"] * pose.u / 2)
    rows = np.floor((np.arange(index.shape[0]) - pose.y(0.17)) / half).astype(np.int64) % 2 == 1
    pattern = np.broadcast_to(rows[:, None], index.shape)
    if upper["pattern"] == "checks":
        cols = np.floor((np.arange(index.shape[1]) - pose.cx) / half).astype(np.int64) % 2 == 1
        pattern = pattern ^ cols[None, :]
    index[(index == _UPPER) & pattern] = _UPPER_PATTERN


def _index_map(appearance: dict, structure: Mapping, height: int, width: int) -> np.ndarray:
    canvas = Image.new("L", (width, height), _NONE)
    draw = ImageDraw.Draw(canvas)
    pose = None
    if structure["framing"] != "background":
        pose = _pose(appearance, structure, height, width)
        _draw_person(draw, pose, appearance)
    if structure["occluder"]:
        _draw_occluder(draw, structure["occluder"], height, width)
    index = np.array(canvas)
    if pose is not None:
        _apply_pattern(index, pose, appearance["upper"])
    return index


def _palette(appearance: dict, structure: Mapping) -> np.ndarray:
    palette = np.zeros((11, 3), dtype=np.uint8)
    palette[_SKIN] = appearance["skin"]
    palette[_HAIR] = appearance["hair"]["colour"]
    palette[_CAP] = appearance["hair"]["cap_colour"]
    palette[_UPPER] = appearance["upper"]["colour"]
    palette[_UPPER_PATTERN] = appearance["upper"]["secondary"]
    palette[_LOWER] = appearance["lower"]["colour"]
    palette[_SHOES] = appearance["shoes"]
    palette[_BAG] = appearance["bag"]["colour"]
    if structure["occluder"]:
        palette[_OCCLUDER] = structure["occluder"]["colour"]
        palette[_OCCLUDER_DETAIL] = structure["occluder"]["secondary"]
    return palette


# ---------------------------------------------------------------------------------------------
# Backgrounds: one scene per camera (drawn once per size and cached), each crop a window into it

def _vertical_gradient(top, bottom, rows: int, cols: int) -> np.ndarray:
    t = np.linspace(0.0, 1.0, max(rows, 1))[:rows, None]
    column = np.rint(np.asarray(top, np.float64) * (1 - t) + np.asarray(bottom, np.float64) * t)
    return np.broadcast_to(column.astype(np.uint8)[:, None, :], (rows, cols, 3))


def _scene_corridor(draw, rng, c, horizon, ph, pw):
    x = float(rng.uniform(0, 0.3)) * ph
    while x < pw:  # doors along the wall
        w = float(rng.uniform(0.12, 0.18)) * ph
        draw.rectangle([x, horizon - 0.42 * ph, x + w, horizon], fill=c["accent"])
        draw.rectangle([x + 0.75 * w, horizon - 0.23 * ph, x + 0.85 * w, horizon - 0.2 * ph], fill=c["detail"])
        x += w + float(rng.uniform(0.25, 0.5)) * ph
    draw.rectangle([0, horizon - 0.03 * ph, pw, horizon], fill=c["detail"])  # skirting board
    y, step = float(horizon), 0.05 * ph
    while y < ph:  # floor tiles, wider apart nearer the camera
        draw.line([(0, y), (pw, y)], fill=c["detail"])
        y, step = y + step, step * 1.3
    for x in np.arange(0, pw, max(2.0, 0.12 * ph)):
        draw.line([(float(x), horizon), (float(x), ph)], fill=c["detail"])


def _scene_street(draw, rng, c, horizon, ph, pw):
    offset = float(rng.uniform(0, 0.1)) * ph
    for y in np.arange(0.04 * ph, horizon - 0.12 * ph, 0.16 * ph):  # facade windows
        for x in np.arange(offset, pw, 0.13 * ph):
            draw.rectangle([float(x), float(y), float(x) + 0.07 * ph, float(y) + 0.09 * ph], fill=c["accent"])
    draw.rectangle([0, horizon, pw, horizon + 0.015 * ph], fill=c["detail"])  # kerb
    for x in np.arange(float(rng.uniform(0, 0.15)) * ph, pw, 0.15 * ph):  # paving joints
        draw.line([(float(x), horizon), (float(x) - 0.1 * ph, ph)], fill=c["detail"])


def _scene_park(draw, rng, c, horizon, ph, pw):
    for _ in range(max(1, round(pw / (0.3 * ph)))):  # trees on the horizon
        x, r = float(rng.uniform(0, pw)), float(rng.uniform(0.1, 0.18)) * ph
        draw.rectangle([x - 0.02 * ph, horizon - 0.2 * ph, x + 0.02 * ph, horizon], fill=c["detail"])
        draw.ellipse([x - r, horizon - 0.2 * ph - 1.6 * r, x + r, horizon - 0.2 * ph + 0.4 * r], fill=c["accent"])
    top = horizon + float(rng.uniform(0.05, 0.2)) * ph  # a gravel path across the grass
    draw.polygon([(0, top), (pw, top + 0.05 * ph), (pw, top + 0.2 * ph), (0, top + 0.12 * ph)], fill=c["detail"])
    count = int(0.02 * pw * (ph - horizon))
    points = np.stack([rng.uniform(0, pw, count), rng.uniform(horizon, ph, count)], axis=1)
    draw.point([(float(x), float(y)) for x, y in points], fill=c["accent"])  # grass speckle


def _scene_brick(draw, rng, c, horizon, ph, pw):
    row_height, brick = 0.045 * ph, 0.1 * ph
    for row, y in enumerate(np.arange(0.0, horizon, row_height)):
        draw.line([(0, float(y)), (pw, float(y))], fill=c["accent"])
        for x in np.arange((row % 2) * brick / 2, pw, brick):
            draw.line([(float(x), float(y)), (float(x), float(y) + row_height)], fill=c["accent"])
    for y in np.arange(horizon, ph, 0.2 * ph):  # large paving stones
        draw.line([(0, float(y)), (pw, float(y))], fill=c["detail"])
    for x in np.arange(float(rng.uniform(0, 0.2)) * ph, pw, 0.2 * ph):
        draw.line([(float(x), horizon), (float(x), ph)], fill=c["detail"])


def _scene_shop(draw, rng, c, horizon, ph, pw):
    draw.rectangle([0, 0.06 * ph, pw, 0.14 * ph], fill=c["detail"])  # sign band
    for x in np.arange(float(rng.uniform(0, 0.1)) * ph, pw, 0.45 * ph):  # shop windows with goods
        x = float(x)
        draw.rectangle([x, 0.2 * ph, x + 0.38 * ph, horizon - 0.04 * ph], fill=c["accent"])
        for _ in range(3):
            gx, gy = x + float(rng.uniform(0.02, 0.3)) * ph, float(rng.uniform(0.25, 0.4)) * ph
            colour = tuple(_clothing_colour(rng, 0.0))
            draw.rectangle([gx, gy, gx + 0.06 * ph, max(gy, min(gy + 0.15 * ph, horizon - 0.05 * ph))], fill=colour)


def _scene_station(draw, rng, c, horizon, ph, pw):
    for x in np.arange(float(rng.uniform(0, 0.3)) * ph, pw, float(rng.uniform(0.5, 0.7)) * ph):
        draw.rectangle([float(x), 0, float(x) + 0.1 * ph, horizon], fill=c["accent"])  # pillars
    for x in np.arange(float(rng.uniform(0, 0.2)) * ph, pw, 0.35 * ph):
        draw.rectangle([float(x), 0.02 * ph, float(x) + 0.15 * ph, 0.05 * ph], fill=(245, 245, 235))  # lights
    draw.rectangle([0, horizon + 0.1 * ph, pw, horizon + 0.125 * ph], fill=c["detail"])  # safety line
    for x in np.arange(0, pw, 0.16 * ph):
        draw.line([(float(x), horizon), (float(x), ph)], fill=c["wall_bottom"])


_SCENE_DETAILS = {"corridor": _scene_corridor, "street": _scene_street, "park": _scene_park,
                  "brick": _scene_brick, "shop": _scene_shop, "station": _scene_station}


@functools.lru_cache(maxsize=64)
def _scene_plate(scene_key: str, height: int, width: int) -> np.ndarray:
    """A camera's whole scene, larger than a crop; cached because every image of the camera shares it."""
    scene = json.loads(scene_key)
    ph, pw = round(height * _PLATE_HEIGHT), round(width * _PLATE_WIDTH)
    horizon = round(scene["horizon"] * ph)
    colours = {name: tuple(rgb) for name, rgb in scene["colours"].items()}
    plate = np.empty((ph, pw, 3), dtype=np.uint8)
    plate[:horizon] = _vertical_gradient(colours["wall_top"], colours["wall_bottom"], horizon, pw)
    plate[horizon:] = _vertical_gradient(colours["floor_far"], colours["floor_near"], ph - horizon, pw)
    image = Image.fromarray(plate)
    _SCENE_DETAILS[scene["family"]](ImageDraw.Draw(image), np.random.default_rng(scene["seed"]), colours,
                                    horizon, ph, pw)
    plate = np.array(image)
    plate.flags.writeable = False
    return plate


def _background(structure: Mapping, height: int, width: int) -> np.ndarray:
    plate = _scene_plate(json.dumps(structure["scene"], sort_keys=True), height, width)
    x0 = round(structure["crop"][0] * (plate.shape[1] - width))
    y0 = round(structure["crop"][1] * (plate.shape[0] - height))
    background = plate[y0:y0 + height, x0:x0 + width].copy()
    if structure["clutter"]:
        image = Image.fromarray(background)
        draw = ImageDraw.Draw(image)
        for item in structure["clutter"]:
            bx0, by0, bx1, by1 = item["box"]
            box = [bx0 * width, by0 * height, bx1 * width, by1 * height]
            if item["shape"] == "ellipse":
                draw.ellipse(box, fill=tuple(item["colour"]))
            else:
                draw.rectangle(box, fill=tuple(item["colour"]))
        background = np.array(image)
    return background


# ---------------------------------------------------------------------------------------------
# Camera effects and the public drawing functions

def _lighting_table(lighting: Mapping) -> np.ndarray | None:
    """(3, 256) lookup table for gamma, per-channel gain (cast and brightness) and bias; None if identity."""
    gain, gamma, bias = lighting["gain"], lighting["gamma"], lighting["bias"]
    if gamma == 1.0 and bias == 0.0 and all(g == 1.0 for g in gain):
        return None
    levels = np.power(np.arange(256, dtype=np.float64) / 255.0, gamma) * 255.0
    return np.stack([np.clip(np.rint(levels * g + bias), 0, 255) for g in gain]).astype(np.uint8)


# Standard-normal quantiles at the centres of 256 equal-probability bins: noise is drawn as random bytes
# looked up here (inverse-CDF sampling), several times faster than rng.standard_normal at these sizes.
_NORMAL_QUANTILES = np.array([statistics.NormalDist().inv_cdf((k + 0.5) / 256) for k in range(256)])


def _camera_effects(rgb: np.ndarray, structure: Mapping, height: int) -> Image.Image:
    table = _lighting_table(structure["lighting"])
    if table is not None:
        for channel in range(3):
            rgb[..., channel] = table[channel][rgb[..., channel]]
    image = Image.fromarray(rgb)
    sigma = structure["blur"] * height / 128.0  # blur is stored for a 128-pixel-high crop
    if sigma > 0:
        # One box pass of the same variance: at these sub-2-pixel sizes it looks like a Gaussian and
        # costs a third of ImageFilter.GaussianBlur (three passes).
        image = image.filter(ImageFilter.BoxBlur((math.sqrt(12 * sigma * sigma + 1) - 1) / 2))
    noise_sigma = structure["noise"]["sigma"]
    if noise_sigma > 0:
        rng = np.random.default_rng(structure["noise"]["seed"])
        levels = np.rint(_NORMAL_QUANTILES * noise_sigma).astype(np.int16)
        noise = levels[np.frombuffer(rng.bytes(rgb.size), dtype=np.uint8)].reshape(rgb.shape)
        noisy = np.asarray(image, dtype=np.int16) + noise
        image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    return image


def _size(structure: Mapping, height: int | None, width: int | None) -> tuple[int, int]:
    """The size to draw at: the generated one by default; one side alone keeps the aspect ratio."""
    if height is None and width is None:
        return structure["height"], structure["width"]
    if width is None:
        width = round(height * structure["width"] / structure["height"])
    elif height is None:
        height = round(width * structure["height"] / structure["width"])
    if height < 8 or width < 4:
        raise UserError(f"cannot draw at {height}x{width}: use at least 8x4 pixels")
    return int(height), int(width)


def render(appearance_of: Mapping, structure_of: Mapping, height: int | None = None,
           width: int | None = None) -> Image.Image:
    """Draw the identity of entry `appearance_of` in the exact structure of entry `structure_of`.

    Both are metadata entries (dicts with "appearance" and "structure"). Pose, viewpoint, framing,
    occlusion, background, lighting, blur and noise come from `structure_of`; the person's look (and
    build) from `appearance_of`. `render(A, A)` is the image that was JPEG-encoded to A's file. The
    size defaults to the one `structure_of` was generated at; give one side to keep its aspect ratio.
    """
    appearance, structure = appearance_of["appearance"], structure_of["structure"]
    height, width = _size(structure, height, width)
    index = _index_map(appearance, structure, height, width)
    rgb = _background(structure, height, width)
    drawn = index > 0
    rgb[drawn] = _palette(appearance, structure)[index[drawn]]
    return _camera_effects(rgb, structure, height)


def part_labels(appearance_of: Mapping, structure_of: Mapping, height: int | None = None,
                width: int | None = None) -> np.ndarray:
    """The visible part at each pixel of `render(appearance_of, structure_of)`: an (H, W) uint8 array
    indexing PART_NAMES (0 background, 1 skin, 2 hair/headwear, 3 upper, 4 lower, 5 shoes, 6 bag,
    7 occluder), before blur."""
    structure = structure_of["structure"]
    height, width = _size(structure, height, width)
    return _PART_OF_INDEX[_index_map(appearance_of["appearance"], structure, height, width)]


def person_mask(appearance_of: Mapping, structure_of: Mapping, height: int | None = None,
                width: int | None = None) -> np.ndarray:
    """Boolean (H, W) mask of the visible person (occluders excluded) in render(appearance_of, structure_of)."""
    labels = part_labels(appearance_of, structure_of, height, width)
    return (labels > 0) & (labels < PART_NAMES.index("occluder"))


def jpeg_bytes(image: Image.Image, structure: Mapping) -> bytes:
    """Encode an image with the JPEG settings its structure names (what the generator writes)."""
    buffer = io.BytesIO()
    jpeg = structure["jpeg"]
    image.save(buffer, format="JPEG", quality=jpeg["quality"], subsampling=jpeg["subsampling"], optimize=False)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# Protocol: who appears where, which image is a query

def _spread_over_cameras(rng: np.random.Generator, images: int, cameras: int) -> dict[int, int]:
    """Cameras an identity appears in (at least 2) and images in each (at least 2, so one can be a query
    and at least one stays in the gallery)."""
    count = int(rng.integers(2, min(cameras, images // 2) + 1))
    chosen = sorted(int(c) + 1 for c in rng.choice(cameras, size=count, replace=False))
    extra = rng.multinomial(images - 2 * count, rng.dirichlet(np.ones(count)))
    return {cam: 2 + int(n) for cam, n in zip(chosen, extra, strict=True)}


def _file_name(pid: int, cam: int, frame: int) -> str:
    prefix = "-1" if pid == JUNK_PID else f"{pid:04d}"
    return f"{prefix}_c{cam}s1_{frame:06d}_00.jpg"


def _sample_identities(params: dict) -> list[dict]:
    """Every identity's split, appearance and images per camera.

    A share of identities (growing with difficulty) are near neighbours: look-alikes of an original
    identity of their own split, never of another look-alike, so look-alikes come in small groups
    rather than long chains.
    """
    seed, d = params["seed"], params["difficulty"]
    pids = range(1, params["ids"] + 1)
    rngs = {pid: np.random.default_rng([seed, _STREAM_IDENTITY, pid]) for pid in pids}
    # the last test_ids identities are held out (half of them when the parameter is absent)
    train_ids = params["ids"] - params.get("test_ids", params["ids"] - params["ids"] // 2)
    splits = {pid: "train" if pid <= train_ids else "test" for pid in pids}
    appearances = {pid: _sample_appearance(rngs[pid], d) for pid in pids}
    look_alike = {pid: bool(rngs[pid].random() < 0.15 + 0.35 * d) for pid in pids}
    identities = []
    for pid in pids:
        rng, near_of, appearance = rngs[pid], None, appearances[pid]
        originals = [p for p in pids if splits[p] == splits[pid] and not look_alike[p]]
        if look_alike[pid] and originals:
            near_of = originals[int(rng.integers(len(originals)))]
            appearance = _near_neighbour(rng, appearances[near_of], d)
        per_camera = _spread_over_cameras(rng, params["images_per_id"], params["cameras"])
        identities.append({"pid": pid, "split": splits[pid], "near_neighbour_of": near_of,
                           "appearance": appearance, "cameras": per_camera,
                           "query_picks": {cam: int(rng.integers(n)) for cam, n in per_camera.items()}})
    return identities


def _plan(params: dict) -> tuple[list[dict], list[dict]]:
    """Every image's entry (appearance, structure, split, name) and the identity list, before drawing."""
    seed, d, cameras = params["seed"], params["difficulty"], params["cameras"]
    protocol = np.random.default_rng([seed, _STREAM_PROTOCOL])
    families = list(_SCENE_FAMILIES)
    order = protocol.permutation(len(families))
    camera_setups = {cam: _sample_camera(np.random.default_rng([seed, _STREAM_CAMERA, cam]),
                                         families[int(order[(cam - 1) % len(families)])], d)
                     for cam in range(1, cameras + 1)}
    identities = _sample_identities(params)
    pending = []  # (pid, cam, split, kind, appearance, framing) of every image, in drawing order
    for identity in identities:
        for cam, count in identity["cameras"].items():
            for k in range(count):
                if identity["split"] == "train":
                    split = "train"
                else:  # one image per test identity and camera is the query
                    split = "query" if k == identity["query_picks"][cam] else "gallery"
                pending.append((identity["pid"], cam, split, "identity", identity["appearance"], "normal"))
    test_identities = [i for i in identities if i["split"] == "test"]
    gallery_people = sum(1 for p in pending if p[2] == "gallery")
    for j in range(max(1, round(DISTRACTOR_SHARE * gallery_people))):
        rng = np.random.default_rng([seed, _STREAM_DISTRACTOR, j])
        if rng.random() < 0.3:  # hard distractors: look-alikes of test identities
            source = test_identities[int(rng.integers(len(test_identities)))]
            appearance = _near_neighbour(rng, source["appearance"], d)
        else:
            appearance = _sample_appearance(rng, d)
        pending.append((DISTRACTOR_PID, int(rng.integers(cameras)) + 1, "gallery", "distractor", appearance, "normal"))
    for j in range(max(1, round(JUNK_SHARE * gallery_people))):
        rng = np.random.default_rng([seed, _STREAM_JUNK, j])
        framing = _JUNK_FRAMINGS[int(rng.integers(len(_JUNK_FRAMINGS)))]
        pending.append((JUNK_PID, int(rng.integers(cameras)) + 1, "gallery", "junk", _sample_appearance(rng, d),
                        framing))
    entries, frames = [], dict.fromkeys(camera_setups, 0)
    for index, (pid, cam, split, kind, appearance, framing) in enumerate(pending):
        frames[cam] += int(protocol.integers(1, 6))  # gaps, as between detections in a video
        if frames[cam] > 999_999:
            raise UserError(f"too many images for camera {cam} to number in 6-digit frames; "
                            "use fewer --ids or --images-per-id")
        rng = np.random.default_rng([seed, _STREAM_IMAGE, index])
        structure = _sample_structure(rng, camera_setups[cam], d, params["height"], params["width"], framing)
        name = _file_name(pid, cam, frames[cam])
        entries.append({"file": f"{SPLIT_FOLDERS[split]}/{name}", "split": split, "pid": pid, "cam": cam,
                        "frame": frames[cam], "kind": kind, "appearance": appearance, "structure": structure})
    listing = [{"pid": i["pid"], "split": i["split"], "near_neighbour_of": i["near_neighbour_of"],
                "cameras": {str(cam): n for cam, n in i["cameras"].items()}} for i in identities]
    return entries, listing


def _summarise(entries: list[dict]) -> dict:
    summary: dict[str, Any] = {}
    for split in ("train", "query", "gallery"):
        pids = [e["pid"] for e in entries if e["split"] == split]
        summary[split] = {"images": len(pids), "identities": len({p for p in pids if p > 0}),
                          "distractors": pids.count(DISTRACTOR_PID), "junk": pids.count(JUNK_PID)}
    summary["images"] = len(entries)
    return summary


# ---------------------------------------------------------------------------------------------
# Writing and reading a dataset folder

def _check_int(name: str, value: Any, low: int, high: int, why: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
        raise UserError(f"{name} must be an integer from {low} to {high}{why}, got {value!r}")
    return int(value)


def _validated_params(ids, images_per_id, height, width, difficulty, seed, cameras, test_ids=None) -> dict:
    if isinstance(difficulty, bool) or not isinstance(difficulty, (int, float)) or not 0.0 <= difficulty <= 1.0:
        raise UserError(f"difficulty must be a number from 0 to 1, got {difficulty!r}")
    params = {
        "generator_version": GENERATOR_VERSION,
        "ids": _check_int("ids", ids, 2, 9999, " (training and test identities; pids have 4 digits)"),
        "images_per_id": _check_int("images_per_id", images_per_id, 4, 10000,
                                    " (at least 2 images in each of at least 2 cameras)"),
        "height": _check_int("height", height, 32, 2048),
        "width": _check_int("width", width, 16, 2048),
        "difficulty": float(difficulty),
        "seed": _check_int("seed", seed, 0, 2**63 - 1),
        "cameras": _check_int("cameras", cameras, 2, 9, " (Market names have one camera digit)"),
    }
    if test_ids is not None:  # absent by default, so datasets made before the parameter existed still match
        params["test_ids"] = _check_int("test_ids", test_ids, 1, params["ids"] - 1,
                                        f" (the rest of the {params['ids']} ids train)")
    return params


def _describe(params: Mapping) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())


def differences(root: str | os.PathLike, *, ids: int = 120, images_per_id: int = 12, height: int = 128,
                width: int = 64, difficulty: float = 0.5, seed: int = 0, cameras: int = 6,
                test_ids: int | None = None) -> str:
    """How the dataset in `root` differs from these parameters ("stored vs asked", comma-separated);
    empty when it is exactly this one. A test_ids asked as the default half matches a dataset made
    without the key."""
    asked = _validated_params(ids, images_per_id, height, width, difficulty, seed, cameras, test_ids)
    stored = load_metadata(root).params
    if "test_ids" not in stored and asked.get("test_ids") == asked["ids"] - asked["ids"] // 2:
        asked.pop("test_ids")
    return ", ".join(f"{key} {stored.get(key)} (config {asked.get(key)})"
                     for key in sorted(set(stored) | set(asked)) if stored.get(key) != asked.get(key))


def _existing_summary(out: Path, params: dict) -> dict | None:
    """The summary of the dataset already in `out` if it is exactly this one; None if `out` is free."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder: choose a new or empty folder")
    if not any(out.iterdir()):
        return None
    meta_path = out / METADATA_FILE
    if not meta_path.is_file():
        if any((out / folder).exists() for folder in SPLIT_FOLDERS.values()):
            raise UserError(f"{out} holds an incomplete synthetic dataset (no {METADATA_FILE}: an interrupted "
                            "run?): remove it or choose another --out")
        raise UserError(f"{out} is not empty and holds no synthetic dataset: choose a new or empty folder for --out")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{meta_path} cannot be read ({error}): remove the folder or choose another --out") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{meta_path} is not synthetic-pedestrian metadata: choose another --out")
    if meta.get("params") != params:
        raise UserError(f"{out} holds a synthetic dataset with other parameters ({_describe(meta.get('params', {}))}): "
                        "choose another --out, or the same parameters to reuse it")
    missing = [e["file"] for e in meta["images"] if not (out / e["file"]).is_file()]
    if missing:
        raise UserError(f"{out} lacks {len(missing)} images listed in {METADATA_FILE} (first: {missing[0]}): "
                        "remove it and generate again")
    return meta["summary"]


def _write_metadata(out: Path, params: dict, summary: dict, identities: list[dict], entries: list[dict]) -> None:
    """metadata.json, written last and renamed into place: its presence means the dataset is complete."""
    dumps = functools.partial(json.dumps, separators=(",", ":"))
    lines = ["{", f' "format": {json.dumps(FORMAT)},', f' "params": {json.dumps(params)},',
             f' "summary": {json.dumps(summary)},', ' "identities": [',
             ",\n".join("  " + dumps(i) for i in identities), " ],", ' "images": [',
             ",\n".join("  " + dumps(e) for e in entries), " ]", "}", ""]
    temporary = out / (METADATA_FILE + ".tmp")
    temporary.write_text("\n".join(lines))
    os.replace(temporary, out / METADATA_FILE)


def generate(out: str | os.PathLike, *, ids: int = 120, images_per_id: int = 12, height: int = 128,
             width: int = 64, difficulty: float = 0.5, seed: int = 0, cameras: int = 6,
             test_ids: int | None = None) -> dict:
    """Write a synthetic dataset into `out` (new or empty) and return its summary.

    The last `test_ids` identities (default: half) are the test split, the others the training split.

    The summary has, for "train", "query" and "gallery", the counts "images", "identities" (real people),
    "distractors" (pid 0) and "junk" (pid -1), plus "images" in all. If `out` already holds exactly this
    dataset (same parameters), nothing is written and its summary is returned; any other non-empty
    folder is refused. Nothing is ever deleted.
    """
    params = _validated_params(ids, images_per_id, height, width, difficulty, seed, cameras, test_ids)
    out = Path(out)
    existing = _existing_summary(out, params)
    if existing is not None:
        return existing
    entries, identities = _plan(params)
    summary = _summarise(entries)
    for folder in SPLIT_FOLDERS.values():
        (out / folder).mkdir(parents=True, exist_ok=True)
    for entry in entries:
        (out / entry["file"]).write_bytes(jpeg_bytes(render(entry, entry), entry["structure"]))
    _write_metadata(out, params, summary, identities, entries)
    return summary


class SyntheticMetadata:
    """A generated dataset's metadata: parameters, summary, identities and image entries by file name."""

    def __init__(self, root: Path, meta: dict):
        self.root = root
        self.params: dict = meta["params"]
        self.summary: dict = meta["summary"]
        self.identities: list[dict] = meta["identities"]
        self.images: list[dict] = meta["images"]
        self._by_name = {Path(e["file"]).name: e for e in self.images}

    def __getitem__(self, file: str | os.PathLike) -> dict:
        """The entry of an image, by file name, path relative to the root, or any path ending in it."""
        try:
            return self._by_name[Path(file).name]
        except KeyError:
            raise KeyError(f"{file} is not an image of the synthetic dataset in {self.root}") from None

    def __contains__(self, file: object) -> bool:
        return isinstance(file, (str, os.PathLike)) and Path(file).name in self._by_name

    def __iter__(self) -> Iterator[dict]:
        return iter(self.images)

    def __len__(self) -> int:
        return len(self.images)

    def split(self, name: str) -> list[dict]:
        """Entries of one split: "train", "query" or "gallery"."""
        return [e for e in self.images if e["split"] == name]


def load_metadata(root: str | os.PathLike) -> SyntheticMetadata:
    """Read `root/metadata.json` of a generated dataset."""
    path = Path(root) / METADATA_FILE
    if not path.is_file():
        raise UserError(f"no {METADATA_FILE} in {root}: not a complete synthetic dataset "
                        "(generate one with python -m data.synthetic --out DIR)")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{path} cannot be read ({error}): generate the dataset again") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{path} is not synthetic-pedestrian metadata")
    return SyntheticMetadata(Path(root), meta)


def format_summary(summary: Mapping) -> str:
    """A few lines: counts per split."""
    lines = []
    for split, folder in (("train", "bounding_box_train"), ("query", "query"), ("gallery", "bounding_box_test")):
        s = summary[split]
        line = f"  {split:<8} {s['images']:>6} images  {s['identities']:>5} identities"
        if split == "gallery":
            line += f"  ({s['distractors']} distractors, {s['junk']} junk)"
        lines.append(f"{line}  -> {folder}/")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.synthetic",
                                     description="Generate the synthetic pedestrian dataset (Market-1501 layout).")
    parser.add_argument("--out", required=True, help="new or empty folder to write into")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same files (default 0)")
    parser.add_argument("--ids", type=int, default=120, help="identities, training and test (default 120)")
    parser.add_argument("--test-ids", type=int, help="of them, the test identities (default: half)")
    parser.add_argument("--images-per-id", type=int, default=12, help="images per identity (default 12)")
    parser.add_argument("--height", type=int, default=128, help="image height (default 128)")
    parser.add_argument("--width", type=int, default=64, help="image width (default 64)")
    parser.add_argument("--difficulty", type=float, default=0.5, help="0 easy .. 1 hard (default 0.5)")
    args = parser.parse_args(argv)
    existed = (Path(args.out) / METADATA_FILE).is_file()
    try:
        summary = generate(args.out, ids=args.ids, images_per_id=args.images_per_id, height=args.height,
                           width=args.width, difficulty=args.difficulty, seed=args.seed, test_ids=args.test_ids)
    except (UserError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{'already there' if existed else 'wrote'}: synthetic dataset in {args.out} "
          f"({summary['images']} images, {args.height}x{args.width}, difficulty {args.difficulty}, seed {args.seed})")
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
