"""An automatic judge for the shapes dataset: does a generated image show what its prompt says?

The rules invert :mod:`jaxsd.training.shapes`' rendering; nothing is learned:

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

from jaxsd.training import shapes


class Judgement(NamedTuple):
    """What the judge sees in one image; indices into the tables of :mod:`jaxsd.training.shapes`."""
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


def evaluate_generator(generate, prompts: Sequence[shapes.Prompt] | None = None,
                       batch_size: int = 16, on_batch=None) -> Scores:
    """Score a text-to-image function on the fixed evaluation prompts.

    :param generate: ``generate(texts: list[str], first_index: int) -> uint8 [len(texts), H, W, 3]``;
        ``first_index`` lets it seed each image by its prompt's index, for reproducible figures.
    :param prompts: default :func:`jaxsd.training.shapes.evaluation_prompts` (240 held-out prompts).
    :param on_batch: called with the number of images done, for a progress bar.
    """
    prompts = list(prompts or shapes.evaluation_prompts())
    images = []
    for start in range(0, len(prompts), batch_size):
        texts = [p.text for p in prompts[start:start + batch_size]]
        images.append(np.asarray(generate(texts, start)))
        if on_batch is not None:
            on_batch(len(texts))
    return score(prompts, np.concatenate(images))


def evaluate_pipeline(pipe, scheduler: str | None = None, *, num_steps: int = 25,
                      guidance_scale: float = 7.5, karras: bool = False, seed: int = 0,
                      prompts: Sequence[shapes.Prompt] | None = None, batch_size: int = 240,
                      on_batch=None) -> Scores:
    """Score a :class:`jaxsd.StableDiffusion` on the evaluation prompts at its native size.

    The batch starting at prompt ``i`` is drawn from seed ``seed + i``, so the figures depend
    only on the arguments (and on the machine's float arithmetic): the model card's table is
    ``jaxsd evaluate`` with its defaults.
    """
    def generate(texts, first_index):
        return pipe.text_to_image(texts, scheduler=scheduler, num_steps=num_steps,
                                  guidance_scale=guidance_scale, karras=karras, seed=seed + first_index)
    return evaluate_generator(generate, prompts, batch_size=batch_size, on_batch=on_batch)


def evaluate_autoencoder(pipe, n: int = 480, seed: int = 99, batch_size: int = 120) -> Scores:
    """The judge on the pipeline's VAE reconstructions of ``n`` fresh renders of the held-out
    (colour, background, shape) combinations, the shapes the evaluation prompts ask for: the
    ceiling of :func:`evaluate_pipeline`, since the UNet cannot draw sharper than the decoder.
    Latents are sampled from q(z|x) (as the UNet was trained on them) with key ``seed``."""
    import jax

    batch = shapes.ShapesDataset(seed=seed, split="heldout").batch(0, n)
    images = []
    for start in range(0, n, batch_size):
        x = batch.images[start:start + batch_size].astype(np.float32) / 127.5 - 1.0
        latents = pipe.encode_image(x, jax.random.PRNGKey(seed + start))
        images.append(pipe.decode(latents))
    return score(_ground_truth(batch.scenes), np.concatenate(images))


def degrade(images: np.ndarray, noise: float = 0.0, blur: float = 0.0, seed: int = 0) -> np.ndarray:
    """Gaussian blur of radius ``blur`` px, then Gaussian noise of std ``noise`` (0..255 units)."""
    from PIL import Image, ImageFilter

    if blur > 0:
        images = np.stack([np.asarray(Image.fromarray(x).filter(ImageFilter.GaussianBlur(blur)))
                           for x in images])
    if noise > 0:
        rng = np.random.default_rng(seed)
        images = np.clip(images + rng.normal(0.0, noise, images.shape), 0, 255).round().astype(np.uint8)
    return images


def validate_on_renders(n: int = 500, seed: int = 7, noise: float = 0.0, blur: float = 0.0) -> Scores:
    """The judge's own accuracy on freshly rendered (and optionally degraded) ground truth."""
    batch = shapes.ShapesDataset(seed=seed).batch(0, n)
    return score(_ground_truth(batch.scenes), degrade(batch.images, noise, blur, seed))


def _ground_truth(s: shapes.Scenes) -> list[shapes.Prompt]:
    """What each rendered scene shows, as prompts naming every attribute."""
    return [shapes.Prompt("", *(int(v[i]) for v in (s.fg, s.bg, s.shape, s.size, s.position)))
            for i in range(len(s.fg))]


def main(argv=None) -> int:
    """``python -m jaxsd.training.evaluate``: the judge's accuracy on clean and degraded renders."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m jaxsd.training.evaluate", description=(
        "Validate the shapes judge on rendered ground truth, clean and degraded."))
    parser.add_argument("-n", type=int, default=500, help="images per condition")
    args = parser.parse_args(argv)
    print(f"{'condition':24s} " + " ".join(f"{f:>8s}" for f in Scores._fields[1:]))
    for name, noise, blur in (("clean", 0, 0), ("noise 10/255", 10, 0), ("noise 25/255", 25, 0),
                              ("noise 40/255", 40, 0), ("blur 1 px", 0, 1), ("blur 2 px", 0, 2),
                              ("blur 1 px + noise 25", 25, 1)):
        s = validate_on_renders(args.n, noise=noise, blur=blur)
        print(f"{name:24s} " + " ".join(f"{v:8.3f}" for v in s[1:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
