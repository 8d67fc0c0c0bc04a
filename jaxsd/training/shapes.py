"""A synthetic captioned dataset of simple shapes, generated deterministically from a seed.

Every image is 64 x 64 RGB: one shape of one named colour on a plain background of another
named colour (pairs of shapes are not implemented: docs/tiny_model.md). Its caption says what
is drawn, in one of several phrasings, e.g. "a small red circle on a blue background, top
left". The tiny built-in model (``docs/tiny_model.md``) is trained on it, and
:mod:`jaxsd.training.evaluate` checks generated images against the same rules.

    scene   (foreground colour, background colour, shape, size, position), integers into the
            tables below, plus a sub-pixel jitter of centre and size
    render  signed distance d(p) of every pixel centre p to the shape's outline (negative inside);
            coverage = clip(0.5 - d, 0, 1) anti-aliases the edge over one pixel;
            pixel = coverage * foreground + (1 - coverage) * background
    caption one of PHRASINGS, filled in; size and position are left out of some captions, so
            "a red circle on a blue background" means "any size, anywhere"

Every shape of half-size s centred at (cx, cy) fills the box [cx - s, cx + s] x [cy - s, cy + s]
(the triangle points up, its base on the box's bottom edge; the cross has arms s * 2/3 wide).

Held-out split: the (foreground, background, shape) triples with
``(3 fg + 5 bg + 7 shape) mod 8 == 0`` never occur in training. For each fixed pair of the three
attributes, at most one value of the third is held out, so every pair (e.g. "red" + "circle",
"red on blue") is still seen in training, in other combinations: the evaluation asks the model to
compose attributes it knows, in combinations it has never seen.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Iterator, NamedTuple

import numpy as np

SIZE = 64  # image height and width in pixels

# Named colours, well separated in RGB so that a nearest-colour rule recovers them from pixels.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "purple": (140, 40, 180),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLOR_NAMES = tuple(COLORS)
PALETTE = np.array([COLORS[c] for c in COLOR_NAMES], np.float32)  # [K, 3], in 0..255

SHAPES = ("circle", "square", "triangle", "cross")
# Half-size s in pixels: the shape fills a (2s x 2s) box. The smallest is what a 16 x 16 latent
# keeps: at s = 7 (issue 7's dataset) the autoencoder lost small triangles and crosses, and its
# reconstructions scored 71% shapes; at 10, with the outline-weighted loss, 99.8%
# (docs/tiny_model.md, "The autoencoder").
SIZES: dict[str, float] = {"small": 10.0, "medium": 13.0, "large": 16.0}
SIZE_NAMES = tuple(SIZES)
# A 3 x 3 grid of centres; the name is what the caption says.
POSITIONS: dict[str, tuple[float, float]] = {  # name -> (x, y) of the centre, in pixels
    "top left": (16, 16), "top": (32, 16), "top right": (48, 16),
    "left": (16, 32), "center": (32, 32), "right": (48, 32),
    "bottom left": (16, 48), "bottom": (32, 48), "bottom right": (48, 48),
}
POSITION_NAMES = tuple(POSITIONS)
JITTER = 2.0        # the centre moves up to +-2 px from its grid point, the half-size up to +-1 px;
                    # then the centre is moved inwards where needed to keep the shape whole
CROSS_ARM = 1 / 3   # a cross's arms are 2s/3 wide (half-width s/3)

# Caption templates. {size} may be empty, {where} is ", top left" or empty; see caption().
# "{a}" is "a" or "an", whichever fits the word after it.
PHRASINGS = (
    "{a} {size}{fg} {shape} on {a_bg} {bg} background{where}",
    "{size}{fg} {shape} on {bg}{where}",
    "{a} {size}{fg} {shape} against {a_bg} {bg} background{where}",
    "a picture of {a} {size}{fg} {shape} on {a_bg} {bg} background{where}",
    "{a_bg} {bg} background with {a} {size}{fg} {shape}{where}",
)


class Scenes(NamedTuple):
    """A batch of B single-shape scenes (all fields [B])."""
    fg: np.ndarray          # int, index into COLOR_NAMES
    bg: np.ndarray          # int, index into COLOR_NAMES, never equal to fg
    shape: np.ndarray       # int, index into SHAPES
    size: np.ndarray        # int, index into SIZE_NAMES
    position: np.ndarray    # int, index into POSITION_NAMES
    cx: np.ndarray          # float, centre x in pixels (jittered)
    cy: np.ndarray          # float, centre y in pixels (jittered)
    half: np.ndarray        # float, half-size s in pixels (jittered)


def is_held_out(fg, bg, shape):
    """True for the (foreground, background, shape) triples kept out of training (see module doc)."""
    return (3 * np.asarray(fg) + 5 * np.asarray(bg) + 7 * np.asarray(shape)) % 8 == 0


def all_triples(split: str) -> np.ndarray:
    """The (fg, bg, shape) index triples of a split, [N, 3]: "train" (200) or "heldout" (24)."""
    _check_choice("split", split, ("train", "heldout"))
    triples = np.array([(f, b, s) for f, b, s in itertools.product(
        range(len(COLOR_NAMES)), range(len(COLOR_NAMES)), range(len(SHAPES))) if f != b])
    held = is_held_out(*triples.T)
    return triples[held] if split == "heldout" else triples[~held]


def sample_scenes(rng: np.random.Generator, n: int, split: str = "train") -> Scenes:
    """n scenes drawn uniformly over the split's triples, sizes and positions, with jitter."""
    triples = all_triples(split)
    fg, bg, shape = triples[rng.integers(len(triples), size=n)].T
    size = rng.integers(len(SIZE_NAMES), size=n)
    position = rng.integers(len(POSITION_NAMES), size=n)
    centres = np.array([POSITIONS[p] for p in POSITION_NAMES], np.float32)[position]
    cx, cy = (centres + rng.uniform(-JITTER, JITTER, size=(n, 2))).T
    half = np.array([SIZES[s] for s in SIZE_NAMES], np.float32)[size] + rng.uniform(-1, 1, size=n)
    # Keep every shape whole, one pixel inside the image (this moves large shapes inwards).
    cx, cy = (np.clip(c, half + 1, SIZE - half - 1) for c in (cx, cy))
    return Scenes(fg, bg, shape, size, position, cx.astype(np.float32), cy.astype(np.float32),
                  half.astype(np.float32))


# ---------------------------------------------------------------------------------------------
# Rendering: signed distances, vectorised over the batch.

def signed_distance(shape, cx, cy, half, size: int = SIZE) -> np.ndarray:
    """Signed distance in pixels from every pixel centre to each scene's outline, [B, H, W].

    Negative inside. Exact for circle, square and cross; for the triangle, the largest signed
    distance to its three edge lines (exact inside and along the edges, which is all the
    one-pixel anti-aliasing needs).
    """
    shape = np.asarray(shape).reshape(-1, 1, 1)
    cx, cy, half = (np.asarray(a, np.float32).reshape(-1, 1, 1) for a in (cx, cy, half))
    coords = np.arange(size, dtype=np.float32) + 0.5       # pixel centres
    x = coords[None, None, :] - cx                         # [B, 1, W], relative to the centre
    y = coords[None, :, None] - cy                         # [B, H, 1], y grows downwards

    distance = np.empty((len(shape), size, size), np.float32)
    for k, sdf in enumerate((_circle, _square, _triangle, _cross)):  # each scene computes only its own
        rows = shape[:, 0, 0] == k
        if rows.any():
            distance[rows] = np.broadcast_to(sdf(x[rows], y[rows], half[rows]), (rows.sum(), size, size))
    return distance


# Signed distances for a shape centred at the origin, half-size s; x, y relative pixel coordinates.

def _box(x, y, hx, hy):  # an axis-aligned box with half-widths (hx, hy)
    qx, qy = np.abs(x) - hx, np.abs(y) - hy
    return np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0)


def _circle(x, y, s):
    return np.hypot(x, y) - s


def _square(x, y, s):
    return _box(x, y, s, s)


def _triangle(x, y, s):
    # Apex (0, -s), base from (-s, s) to (s, s): the base line y = s, and the two slanted edges
    # through the apex, with outward normals (+-2, -1) / sqrt(5).
    return np.maximum(y - s, (2 * np.abs(x) - y - s) / np.sqrt(5.0))


def _cross(x, y, s):
    arm = s * CROSS_ARM
    return np.minimum(_box(x, y, s, arm), _box(x, y, arm, s))


def coverage(shape, cx, cy, half, size: int = SIZE) -> np.ndarray:
    """Fraction of each pixel covered by the shape, [B, H, W] in [0, 1] (one-pixel anti-aliasing)."""
    return np.clip(0.5 - signed_distance(shape, cx, cy, half, size), 0.0, 1.0)


def outline_mask(scenes: Scenes, width: float = 1.5) -> np.ndarray:
    """1 where a pixel centre lies within ``width`` pixels of the shape's outline, else 0,
    float32 [B, 64, 64]: where a triangle's apex or a cross's arm is told from a blob."""
    d = signed_distance(scenes.shape, scenes.cx, scenes.cy, scenes.half)
    return (np.abs(d) <= width).astype(np.float32)


def render(scenes: Scenes) -> np.ndarray:
    """Scenes -> uint8 images [B, 64, 64, 3]: coverage * foreground + (1 - coverage) * background."""
    alpha = coverage(scenes.shape, scenes.cx, scenes.cy, scenes.half)[..., None]   # [B, H, W, 1]
    fg, bg = PALETTE[scenes.fg][:, None, None, :], PALETTE[scenes.bg][:, None, None, :]
    return np.rint(alpha * fg + (1 - alpha) * bg).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Captions.

def caption(fg: int, bg: int, shape: int, size: int | None = None, position: int | None = None,
            phrasing: int = 0) -> str:
    """The caption of one scene; ``size`` / ``position`` None leaves them out."""
    size_word = "" if size is None else SIZE_NAMES[size] + " "
    article = lambda word: "an" if word[0] in "aeiou" else "a"
    return PHRASINGS[phrasing].format(
        fg=COLOR_NAMES[fg], bg=COLOR_NAMES[bg], shape=SHAPES[shape], size=size_word,
        a=article(size_word or COLOR_NAMES[fg]), a_bg=article(COLOR_NAMES[bg]),
        where="" if position is None else ", " + POSITION_NAMES[position])


def parse_caption(text: str) -> "Prompt":
    """Caption -> its attributes (the inverse of :func:`caption`, for any of PHRASINGS).

    Finds the two colour words (the background is the one followed by "background", or after
    "on"/"against" in the short phrasing), the shape word, and optional size and position words.
    """
    words = text.lower().replace(",", " ,").split()
    colors = [(i, COLOR_NAMES.index(w)) for i, w in enumerate(words) if w in COLOR_NAMES]
    shapes = [SHAPES.index(w) for w in words if w in SHAPES]
    if len(colors) != 2 or len(shapes) != 1:
        raise ValueError(f"caption {text!r} does not describe one shape of one colour on a background "
                         f"of another: it needs two of {list(COLOR_NAMES)} and one of {list(SHAPES)}")
    (i0, c0), (i1, c1) = colors
    # The background colour is followed by "background", or (short phrasing) comes after the shape.
    first_is_bg = i0 + 1 < len(words) and words[i0 + 1] == "background"
    fg, bg = (c1, c0) if first_is_bg else (c0, c1)
    size = next((SIZE_NAMES.index(w) for w in words if w in SIZE_NAMES), None)
    tail = text.split(",")[-1].strip() if "," in text else None
    position = POSITION_NAMES.index(tail) if tail in POSITION_NAMES else None
    return Prompt(text, fg, bg, shapes[0], size, position)


def caption_attributes(texts: list[str]) -> np.ndarray:
    """What each caption says, int32 [B, 5]: foreground, background, shape, size, position
    (indices into the tables; size and position ``len(SIZE_NAMES)`` / ``len(POSITION_NAMES)``
    when the caption does not say). An empty caption (dropped for guidance) gives zeros."""
    rows = []
    for text in texts:
        if not text:
            rows.append((0, 0, 0, 0, 0))
            continue
        p = parse_caption(text)
        rows.append((p.fg, p.bg, p.shape, len(SIZE_NAMES) if p.size is None else p.size,
                     len(POSITION_NAMES) if p.position is None else p.position))
    return np.array(rows, np.int32).reshape(len(texts), 5)


def captions(rng: np.random.Generator, scenes: Scenes, p_size: float = 0.7,
             p_position: float = 0.7) -> list[str]:
    """One caption per scene, in a random phrasing; size and position each mentioned with the
    given probability (so that prompts without them also make sense)."""
    n = len(scenes.fg)
    phrasing = rng.integers(len(PHRASINGS), size=n)
    say_size, say_position = rng.random(n) < p_size, rng.random(n) < p_position
    return [caption(scenes.fg[i], scenes.bg[i], scenes.shape[i],
                    scenes.size[i] if say_size[i] else None,
                    scenes.position[i] if say_position[i] else None, phrasing[i])
            for i in range(n)]


# ---------------------------------------------------------------------------------------------
# Batches for training, and the fixed evaluation prompts.

class Batch(NamedTuple):
    images: np.ndarray      # uint8 [B, 64, 64, 3]
    captions: list[str]     # B captions
    scenes: Scenes          # what was drawn


@dataclasses.dataclass(frozen=True)
class ShapesDataset:
    """An endless, deterministic stream of captioned batches.

    Batch ``i`` depends only on (seed, split, batch_size, i), so training resumes at step i with
    exactly the data it would have seen.
    """
    seed: int = 0
    split: str = "train"

    def __post_init__(self):
        _check_choice("split", self.split, ("train", "heldout"))

    def batch(self, index: int, batch_size: int) -> Batch:
        rng = np.random.default_rng([self.seed, index, 0 if self.split == "train" else 1])
        scenes = sample_scenes(rng, batch_size, self.split)
        return Batch(render(scenes), captions(rng, scenes), scenes)

    def batches(self, batch_size: int, start: int = 0) -> Iterator[Batch]:
        for index in itertools.count(start):
            yield self.batch(index, batch_size)


class Prompt(NamedTuple):
    text: str
    fg: int
    bg: int
    shape: int
    size: int | None        # None when the prompt does not say
    position: int | None


def evaluation_prompts(n_per_triple: int = 10, seed: int = 1234) -> list[Prompt]:
    """The fixed evaluation set: ``n_per_triple`` distinct prompts for each of the 24 held-out
    triples (240 by default), in varied phrasings, sizes and positions (a fifth of them without
    a size, a fifth without a position); none occurs in training."""
    rng = np.random.default_rng(seed)
    prompts = []
    for fg, bg, shape in all_triples("heldout"):
        texts = set()
        for k in range(n_per_triple):
            while True:
                size = None if k % 5 == 3 else int(rng.integers(len(SIZE_NAMES)))
                position = None if k % 5 == 4 else int(rng.integers(len(POSITION_NAMES)))
                text = caption(fg, bg, shape, size, position, phrasing=k % len(PHRASINGS))
                if text not in texts:
                    break
            texts.add(text)
            prompts.append(Prompt(text, int(fg), int(bg), int(shape), size, position))
    return prompts


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {list(choices)}")
