"""Pictures in and out of the pipelines, as diffusers' ``VaeImageProcessor`` prepares them.

    image  PIL image(s) or uint8 / float-in-[0, 1] arrays [H, W, 3] or [B, H, W, 3]
           -> resized to (height, width) -> float32 [B, H, W, 3] in [-1, 1]
    mask   PIL image(s) or arrays [H, W], [H, W, 1] or [B, H, W(, 1)]; white = repaint
           -> resized -> grayscale -> binarised at 0.5 -> float32 [B, H, W, 1] in {0, 1}
    output float images in [-1, 1] -> uint8: round(clip(x / 2 + 1/2, 0, 1) * 255)

Resizing, as diffusers does it: PIL images with Lanczos (PIL's), arrays by nearest neighbour on
their float values (diffusers turns arrays into tensors and calls torch's F.interpolate, whose
default mode is "nearest"). Channel-first arrays ([3, H, W], PyTorch's layout) are refused.

The default size is the image's own, rounded down to a multiple of the VAE's factor (8).
"""
from __future__ import annotations

import logging

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)


def _as_list(image, what: str) -> list:
    """One image or a batch -> a list of PIL images or 2-D/3-D float arrays in [0, 1]."""
    if isinstance(image, (list, tuple)):
        return [x for item in image for x in _as_list(item, what)]
    if isinstance(image, Image.Image):
        return [image]
    array = np.asarray(image)
    if array.dtype == np.bool_:
        array = array.astype(np.float32)
    elif np.issubdtype(array.dtype, np.integer):
        if array.min() < 0 or array.max() > 255:
            raise ValueError(f"{what} is an integer array with values outside [0, 255]")
        array = array.astype(np.float32) / 255.0
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError(f"{what} holds NaN or infinite values")
        if array.min() < 0 or array.max() > 1:
            raise ValueError(f"{what} is a float array with values in [{array.min():g}, {array.max():g}]; "
                             f"floats must lie in [0, 1] (or pass uint8 pixels in [0, 255])")
        array = array.astype(np.float32)
    else:
        raise TypeError(f"{what} must be a PIL image or a NumPy array, got {type(image).__name__}")
    _check_layout(array, what)
    # A batch: [B, H, W, C], or for masks also [B, H, W] (one [H, W, 1] or RGB [H, W, 3] mask is one).
    if array.ndim == 4 or (array.ndim == 3 and what == "mask" and array.shape[-1] not in (1, 3)):
        return list(array)
    return [array]


def _check_layout(array: np.ndarray, what: str) -> None:
    """Arrays are channel-last: images [H, W, 3] / [B, H, W, 3], masks [H, W(, 1)] / [B, H, W(, 1)]."""
    channels = (3,) if what == "image" else (1, 3)
    layouts = ("[H, W, 3] or [B, H, W, 3]" if what == "image"
               else "[H, W], [H, W, 1], [H, W, 3] or [B, H, W(, 1)]")
    has_channels = array.ndim == 4 or (what == "image" and array.ndim == 3)
    if array.ndim in (2, 3, 4) and not (has_channels and array.shape[-1] not in channels):
        return
    first = has_channels and array.shape[-3] in channels  # [C, H, W] or [B, C, H, W]
    hint = ": channels first, PyTorch's layout; move them last, e.g. np.moveaxis(x, -3, -1)" if first else ""
    raise ValueError(f"{what} array has shape {array.shape}; jaxsd takes {layouts}{hint}")


def image_size(image, what: str = "image") -> tuple[int, int]:
    """(height, width) of the first image of a batch."""
    first = _as_list(image, what)[0]
    return (first.height, first.width) if isinstance(first, Image.Image) else first.shape[:2]


def default_size(image, factor: int = 8) -> tuple[int, int]:
    """The image's size rounded down to a multiple of ``factor`` (diffusers' get_default_height_width)."""
    h, w = image_size(image)
    return h - h % factor, w - w % factor


def _to_pil(array: np.ndarray) -> Image.Image:
    pixels = (array * 255).round().astype(np.uint8)
    return Image.fromarray(pixels[..., 0] if pixels.ndim == 3 and pixels.shape[-1] == 1 else pixels)


def nearest_indices(size_in: int, size_out: int) -> np.ndarray:
    """The source row (or column) of each output one in torch's "nearest" F.interpolate:
    min(floor(i * scale), size_in - 1) with scale = size_in / size_out, in float32 as torch
    computes it (torch's shortcuts for the same size and an exact 2x give the same indices)."""
    scale = np.float32(size_in) / np.float32(size_out)
    return np.minimum(np.floor(np.arange(size_out, dtype=np.float32) * scale).astype(np.int64), size_in - 1)


def _resize(item, height: int, width: int):
    """PIL images: Lanczos (diffusers' default resample). Arrays: nearest neighbour on the float
    values, as diffusers resizes arrays (torch's F.interpolate); the right size is kept as it is."""
    if isinstance(item, Image.Image):
        return item.resize((width, height), resample=Image.LANCZOS)
    rows, cols = nearest_indices(item.shape[0], height), nearest_indices(item.shape[1], width)
    return item[rows][:, cols]


def prepare_image(image, height: int, width: int) -> np.ndarray:
    """image(s) -> float32 [B, height, width, 3] in [-1, 1]."""
    batch = []
    for item in _as_list(image, "image"):
        item = _resize(item, height, width)
        if isinstance(item, Image.Image):
            item = np.asarray(item.convert("RGB"), np.float32) / 255.0
        if item.ndim != 3 or item.shape[-1] != 3:
            raise ValueError(f"image must be RGB [height, width, 3]; got shape {item.shape}")
        batch.append(item)
    return np.stack(batch) * 2.0 - 1.0


def prepare_mask(mask, height: int, width: int) -> np.ndarray:
    """mask(s) -> float32 [B, height, width, 1] in {0, 1}; 1 (white) marks what is repainted."""
    batch = []
    for item in _as_list(mask, "mask"):
        item = _resize(item, height, width)
        if isinstance(item, Image.Image):
            item = np.asarray(item.convert("L"), np.float32) / 255.0
        if item.ndim == 3:
            if item.shape[-1] == 3:  # an RGB array: ITU-R 601 luma, as PIL's convert("L")
                item = item @ np.array([0.299, 0.587, 0.114], np.float32)
            else:
                item = item[..., 0]
        batch.append(item)
    return (np.stack(batch)[..., None] >= 0.5).astype(np.float32)


def check_mask_matches(image, mask) -> None:
    """The mask must cover the image pixel for pixel (before any resizing)."""
    if image_size(image) != image_size(mask, "mask"):
        raise ValueError(f"mask size {image_size(mask, 'mask')} (height, width) does not match the "
                         f"image size {image_size(image)}; resize the mask to the image first")


def to_uint8(images: np.ndarray) -> np.ndarray:
    """float images [B, H, W, 3] in [-1, 1] -> uint8, as diffusers' postprocess; NaN -> 0 with a warning."""
    images = np.asarray(images, np.float32)
    if np.isnan(images).any():
        logger.warning(
            "the decoded images contain NaN (%.1f%% of the pixels; shown as black). The likely cause "
            "is a float16 overflow, usually in the VAE decoder (SD 1.x/2.x VAEs overflow float16); "
            "load with dtype=jnp.bfloat16 or jnp.float32 instead", 100 * np.isnan(images).mean())
        images = np.nan_to_num(images, nan=-1.0)
    return (np.clip(images * 0.5 + 0.5, 0.0, 1.0) * 255).round().astype(np.uint8)


def image_grid(images, labels=None, columns: int | None = None, scale: int = 1,
               title: str | None = None) -> Image.Image:
    """Lay pictures out as one labelled grid, for looking at results side by side.

    :param images: a list of images or a batch: PIL images or uint8 / float-in-[0, 1] arrays
        [H, W, 3] or [B, H, W, 3], all of one size.
    :param labels: one caption per picture (drawn in the strip above it), or None.
    :param columns: pictures per row (default: all in one row).
    :param scale: integer nearest-neighbour upscaling, so that 64 x 64 pictures stay readable.
    :param title: one line drawn above the whole grid, or None.
    :returns: a PIL image. Notebooks show it inline when it is a cell's last expression.
    """
    from PIL import ImageDraw

    tiles = [np.asarray((x if isinstance(x, Image.Image) else _to_pil(x)).convert("RGB"))
             for x in _as_list(images, "images")]
    if not tiles:
        raise ValueError("images: the list is empty; image_grid needs at least one picture")
    if len({tile.shape for tile in tiles}) > 1:
        raise ValueError(f"images: all pictures must have one size; got {sorted({t.shape for t in tiles})}")
    if labels is not None and len(labels) != len(tiles):
        raise ValueError(f"labels: {len(labels)} labels for {len(tiles)} pictures; give one per picture")
    if columns is None:
        columns = len(tiles)
    if not isinstance(scale, int) or scale < 1 or not isinstance(columns, int) or columns < 1:
        raise ValueError(f"columns={columns!r}, scale={scale!r}: both must be integers >= 1")
    rows = -(-len(tiles) // columns)
    h, w = tiles[0].shape[0] * scale, tiles[0].shape[1] * scale
    strip = 14 if labels is not None else 0          # PIL's default font is about 11 px high
    head = 16 if title is not None else 0
    gap = 2
    canvas = Image.new("RGB", (columns * (w + gap) + gap, head + rows * (h + strip + gap) + gap), "white")
    draw = ImageDraw.Draw(canvas)
    if title is not None:
        draw.text((gap + 1, 2), title, fill="black")
    for k, tile in enumerate(tiles):
        r, c = divmod(k, columns)
        x, y = gap + c * (w + gap), head + gap + r * (h + strip + gap)
        if labels is not None:
            draw.text((x + 1, y + 1), _fit(draw, str(labels[k]), w - 2), fill="black")
        canvas.paste(Image.fromarray(tile).resize((w, h), Image.NEAREST), (x, y + strip))
    return canvas


def _fit(draw, text: str, width: int) -> str:
    """``text``, cut to ``width`` pixels with a trailing "..." when it is longer."""
    if draw.textlength(text) <= width:
        return text
    while text and draw.textlength(text + "...") > width:
        text = text[:-1]
    return text + "..."
