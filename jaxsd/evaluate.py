"""An automatic judge for the shapes dataset: does a generated image show what its prompt says?

The rules invert :mod:`jaxsd.data.shapes`' rendering; nothing is learned:

    1. label every pixel with the nearest named colour (Euclidean distance in RGB)
    2. background = the most common label on the image's 2-pixel frame
    3. foreground colour = the most common label among the pixels not labelled background
       (cleaned by a 3 x 3 majority vote, then eroded by one pixel so that the anti-aliased edge,
       where red on blue blends into something purple, does not vote)
    4. foreground mask = pixels nearer the foreground colour than the background colour, cleaned
       by a 3 x 3 majority vote (isolated specks of noise go, the shape stays)
    5. shape = the template with the largest intersection-over-union with the mask, each template
       drawn to fill the mask's bounding box: a square fills it, a circle covers pi/4 of it, the
       triangle and the cross half and 5/9 of it, in different places
    6. size = the nearest named half-size to the one the mask's area gives for that shape;
       position = the grid point nearest to the bounding box's centre

``tests/test_evaluate.py`` checks it on fresh renders, clean, noisy, blurred and down-up-sampled.
:func:`score` turns judgements into the accuracies the tiny model's card reports.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from jaxsd.data import shapes


class Judgement(NamedTuple):
    """What the judge sees in one image; indices into the tables of :mod:`jaxsd.data.shapes`."""
    bg: int         # background colour
    fg: int         # foreground colour, -1 when no foreground was found
    shape: int      # -1 when no foreground was found
    size: int       # nearest named size of the bounding box, -1 when no foreground
    position: int   # nearest grid point to the bounding box's centre, -1 when no foreground
    iou: float      # the winning template's intersection-over-union with the mask (0 when none)


def nearest_color(pixels: np.ndarray) -> np.ndarray:
    """Pixels [..., 3] (0..255) -> index of the nearest named colour [...]."""
    d = np.square(pixels[..., None, :].astype(np.float32) - shapes.PALETTE).sum(-1)   # [..., K]
    return d.argmin(-1)


def _box_filter_3x3(mask: np.ndarray) -> np.ndarray:
    """Count of True among each pixel's 3 x 3 neighbourhood (zero padding)."""
    padded = np.pad(mask.astype(np.int32), 1)
    H, W = mask.shape
    return sum(padded[i:i + H, j:j + W] for i in range(3) for j in range(3))


def _mode(labels: np.ndarray) -> int:
    return int(np.bincount(labels.ravel(), minlength=len(shapes.COLOR_NAMES)).argmax())


def _templates(x0: float, x1: float, y0: float, y1: float, size: int) -> np.ndarray:
    """Every shape drawn to fill the box [x0, x1] x [y0, y1] (pixel edges): [S, H, W] booleans."""
    cx, cy, hx, hy = (x0 + x1) / 2, (y0 + y1) / 2, max((x1 - x0) / 2, 0.5), max((y1 - y0) / 2, 0.5)
    coords = np.arange(size, dtype=np.float32) + 0.5
    # In box-relative coordinates every template is the unit shape (half-size 1).
    u = ((coords[None, :] - cx) / hx)[None]       # [1, 1, W]
    v = ((coords[:, None] - cy) / hy)[None]       # [1, H, 1]
    unit = np.ones((1, 1, 1), np.float32)
    return np.stack([np.broadcast_to(sdf(u, v, unit), (1, size, size))[0] < 0
                     for sdf in (shapes._circle, shapes._square, shapes._triangle, shapes._cross)])


def judge(image: np.ndarray) -> Judgement:
    """One uint8 image [H, W, 3] -> :class:`Judgement`."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be one RGB image [height, width, 3]; got shape {image.shape}")
    H, W, _ = image.shape
    labels = nearest_color(image)                                          # [H, W]
    frame = np.ones((H, W), bool)
    frame[2:-2, 2:-2] = False
    bg = _mode(labels[frame])

    # A first guess at the foreground: pixels not labelled as background, specks voted out.
    rough = _box_filter_3x3(labels != bg) >= 5                             # 3 x 3 majority
    if rough.sum() < 4:
        return Judgement(bg, -1, -1, -1, -1, 0.0)
    core = _box_filter_3x3(rough) == 9                                     # eroded by one pixel
    fg = _mode(labels[core if core.sum() >= 4 else rough])
    # The mask proper: pixels nearer the foreground colour than the background colour. Two far
    # apart colours make a far cleaner split under noise than "any of the other seven colours",
    # and under blur the boundary is the 50% coverage contour, the rendered outline.
    pixels = image.astype(np.float32)
    nearer_fg = (np.square(pixels - shapes.PALETTE[fg]).sum(-1)
                 < np.square(pixels - shapes.PALETTE[bg]).sum(-1))
    mask = _box_filter_3x3(nearer_fg) >= 5
    if mask.sum() < 4:
        return Judgement(bg, fg, -1, -1, -1, 0.0)

    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1          # pixel edges
    templates = _templates(x0, x1, y0, y1, H)                              # [S, H, W]
    iou = (templates & mask).sum((1, 2)) / np.maximum((templates | mask).sum((1, 2)), 1)
    shape = int(iou.argmax())

    # Half-size from the area, which blur and anti-aliasing change far less than the box:
    # area = k s^2 with k = pi (circle), 4 (square), 2 (triangle), 4 - 4 (2/3)^2 = 20/9 (cross).
    area_per_half_squared = (np.pi, 4.0, 2.0, 4.0 * (1 - (1 - shapes.CROSS_ARM) ** 2))
    half = np.sqrt(mask.sum() / area_per_half_squared[shape])
    size = int(np.abs(np.array(list(shapes.SIZES.values())) - half).argmin())
    centres = np.array(list(shapes.POSITIONS.values()), np.float32)        # [9, (x, y)]
    position = int(np.square(centres - [(x0 + x1) / 2, (y0 + y1) / 2]).sum(-1).argmin())
    return Judgement(bg, fg, shape, size, position, float(iou[shape]))


class Scores(NamedTuple):
    """Fractions of images judged right (size and position only over prompts that name them)."""
    n: int
    colors: float       # foreground and background both right
    fg: float
    bg: float
    shape: float
    size: float
    position: float
    all: float          # colours and shape right, and size and position where the prompt names them


def score(prompts: Sequence[shapes.Prompt], images: np.ndarray) -> Scores:
    """Judge each image against its prompt; ``images`` uint8 [N, H, W, 3]."""
    if len(prompts) != len(images):
        raise ValueError(f"got {len(prompts)} prompts but {len(images)} images; need one image per prompt")
    fg, bg, shape, size, position, every = [], [], [], [], [], []
    for prompt, image in zip(prompts, images):
        j = judge(image)
        fg.append(j.fg == prompt.fg)
        bg.append(j.bg == prompt.bg)
        shape.append(j.shape == prompt.shape)
        ok = fg[-1] and bg[-1] and shape[-1]
        if prompt.size is not None:
            size.append(j.size == prompt.size)
            ok = ok and size[-1]
        if prompt.position is not None:
            position.append(j.position == prompt.position)
            ok = ok and position[-1]
        every.append(ok)
    mean = lambda xs: float(np.mean(xs)) if len(xs) else float("nan")
    return Scores(len(prompts), mean(np.logical_and(fg, bg)), mean(fg), mean(bg), mean(shape),
                  mean(size), mean(position), mean(every))
