"""A synthetic image-description task: coloured shapes in one quadrant of a small image.

    scene  : count (1-3) shapes of one colour and one kind in one quadrant
    image  : 64x64 RGB, a noisy dark background; the quadrant holds a 2x2 grid of 16 px
             slots, one shape (10-14 px, jittered) per chosen slot
    answer : "Two red circles at the top left."  (fixed pattern; QUESTION is fixed too)
    detail : DETAIL_QUESTION's answer, >= 30 tokens composed of the same four attributes
             (what the vision weights know) and nothing else

Deterministic (numpy + PIL only): ``examples(n, seed, split)`` draws the same images for
the same arguments; the "train" and "heldout" splits use disjoint random streams.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
QUESTION = "Describe the image."
DETAIL_QUESTION = "Describe the picture in detail."
COLOURS = {"red": (215, 35, 35), "green": (40, 175, 60), "blue": (45, 85, 230),
           "yellow": (235, 215, 40), "purple": (150, 55, 200), "orange": (245, 135, 25)}
SHAPES = ("circle", "square", "triangle", "star")
COUNTS = ("one", "two", "three")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
ATTRIBUTES = ("count", "colour", "shape", "position")
_SPLITS = {"train": 0, "heldout": 1}
_SLOT = IMAGE_SIZE // 4  # a quadrant is 2x2 slots


@dataclass(frozen=True)
class Scene:
    count: int      # 1..3
    colour: str     # a key of COLOURS
    shape: str      # one of SHAPES
    position: str   # one of POSITIONS

    def answer(self) -> str:
        """The target description, e.g. "Two red circles at the top left."."""
        noun = self.shape + ("s" if self.count > 1 else "")
        return f"{COUNTS[self.count - 1].capitalize()} {self.colour} {noun} at the {self.position}."

    def detailed_answer(self) -> str:
        """The answer to DETAIL_QUESTION (>= 30 words): the short answer, then its facts again
        in three sentences (the frozen LM copies them from its own first sentence)."""
        count, many = COUNTS[self.count - 1], self.count > 1
        noun = self.shape + ("s" if many else "")
        return (f"{self.answer()} The picture shows {count} {self.colour} {noun} on a plain dark "
                f"background. {'They are' if many else 'It is'} in the {self.position} corner of "
                f"the picture. The rest of the picture is empty.")


def all_scenes() -> list[Scene]:
    """Every scene (3 counts x 6 colours x 4 shapes x 4 positions)."""
    return [Scene(n, c, s, p) for n in range(1, 4) for c in COLOURS for s in SHAPES for p in POSITIONS]


@functools.lru_cache(maxsize=1)
def _detailed_answers() -> frozenset[str]:
    return frozenset(s.detailed_answer() for s in all_scenes())


def detailed_form(answer: str) -> bool:
    """Is ``answer`` (stripped) the detailed answer of some scene, word for word?"""
    return answer.strip() in _detailed_answers()


@dataclass(frozen=True)
class Example:
    image: Image.Image
    scene: Scene


def random_scene(rng: np.random.Generator) -> Scene:
    return Scene(count=int(rng.integers(1, 4)), colour=str(rng.choice(list(COLOURS))),
                 shape=str(rng.choice(SHAPES)), position=str(rng.choice(POSITIONS)))


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Polygon points of ``shape`` around (cx, cy) with radius r (None: drawn otherwise)."""
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r * 0.85), (cx - r, cy + r * 0.85)]
    if shape == "star":
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r * 1.15, r * 0.45)
        return list(zip(cx + radii * np.cos(angles), cy + radii * np.sin(angles)))
    return None


def draw(scene: Scene, rng: np.random.Generator) -> Image.Image:
    """Render ``scene`` with random background, jitter, sizes and colour noise."""
    base = rng.integers(10, 90, size=3)
    pixels = base + rng.normal(0, 8, (IMAGE_SIZE, IMAGE_SIZE, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    pen = ImageDraw.Draw(image)
    row, col = POSITIONS.index(scene.position) // 2, POSITIONS.index(scene.position) % 2
    colour = tuple(int(c) for c in np.clip(np.array(COLOURS[scene.colour]) + rng.integers(-15, 16, 3), 0, 255))
    for slot in rng.choice(4, size=scene.count, replace=False):
        cx = (2 * col + slot % 2 + 0.5) * _SLOT + rng.uniform(-2, 2)
        cy = (2 * row + slot // 2 + 0.5) * _SLOT + rng.uniform(-2, 2)
        r = rng.uniform(5, 7)
        points = _outline(scene.shape, cx, cy, r)
        if points is not None:
            pen.polygon(points, fill=colour)
        elif scene.shape == "circle":
            pen.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        else:
            pen.rectangle([cx - r * 0.9, cy - r * 0.9, cx + r * 0.9, cy + r * 0.9], fill=colour)
    return image


def sample(rng: np.random.Generator, n: int) -> list[Example]:
    """``n`` random examples drawn from ``rng``."""
    out = []
    for _ in range(n):
        scene = random_scene(rng)
        out.append(Example(draw(scene, rng), scene))
    return out


def examples(n: int, seed: int = 0, split: str = "train") -> list[Example]:
    """``n`` deterministic examples of ``split`` ("train" or "heldout")."""
    if split not in _SPLITS:
        raise ValueError(f"split {split!r} | expected one of {tuple(_SPLITS)}")
    return sample(np.random.default_rng([seed, _SPLITS[split]]), n)


def _words(attribute: str) -> dict[str, tuple[str, ...]]:
    """Each value of ``attribute`` -> the words that name it in an answer (lower case)."""
    if attribute == "count":
        return {str(i + 1): (w, str(i + 1)) for i, w in enumerate(COUNTS)}
    if attribute == "colour":
        return {c: (c,) for c in COLOURS}
    if attribute == "shape":
        return {s: (s,) for s in SHAPES}
    return {p: (p,) for p in POSITIONS}


def score(answer: str, scene: Scene) -> dict[str, bool]:
    """Per attribute: does ``answer`` name the scene's value and no other value?"""
    text = " " + " ".join(answer.lower().replace(".", " ").replace(",", " ").split()) + " "
    truth = {"count": str(scene.count), "colour": scene.colour, "shape": scene.shape,
             "position": scene.position}
    result = {}
    for attribute in ATTRIBUTES:
        named = {value for value, words in _words(attribute).items()
                 if any(f" {w} " in text or f" {w}s " in text for w in words)}
        result[attribute] = named == {truth[attribute]}
    return result
