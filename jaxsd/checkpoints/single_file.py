"""Original single-file Stable Diffusion checkpoints (SD 1.x/2.x/XL, CompVis layout) <-> diffusers components.

``read_single_file`` splits one ``.safetensors`` (or, opted in, ``.ckpt``) file into the UNet,
VAE and text encoder(s) state dicts under diffusers' and transformers' own key names, infers each
component's ``config.json`` from the tensors, and refuses a file with keys it does not know.
``write_single_file`` goes the other way. The key tables are in ``ldm_keys.py``, the
architecture inference in ``ldm_arch.py``; the rules and what they follow in diffusers are in
``docs/single_file.md``.
"""
from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import NamedTuple

import ml_dtypes
import numpy as np

from jaxsd.checkpoints.convert import _template_regex
from jaxsd.checkpoints.files import _DTYPES, SafetensorsFile, SingleFileError, is_floating
from jaxsd.checkpoints.ldm_arch import BETA_END, BETA_START, Arch, infer_arch
from jaxsd.checkpoints.ldm_keys import OPEN_CLIP_PREFIX, TEXT_TOWERS, text_key_map, unet_key_map, vae_key_map

logger = logging.getLogger(__name__)

# Keys real files hold that are deliberately not converted: (template, reason). A ``{name}``
# placeholder matches one dot-free segment; a trailing ``*`` matches any rest of the key.
IGNORED = (
    ("model_ema.{name}", "the EMA copy of the UNet (keys with the dots removed, plus decay and "
                         "num_updates); diffusers reads the non-EMA weights (extract_ema=False)"),
    *((name, "a DDPM schedule buffer of the LDM training wrapper; the scheduler recomputes it")
      for name in ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                   "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
                   "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
                   "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2")),
    ("first_stage_model.loss.*", "the VAE's training loss (LPIPS and discriminator), saved by "
                                 "some VAE fine-tunes"),
    ("denoiser.sigmas", "SDXL (sgm) DiscreteDenoiser's noise levels; the scheduler recomputes them"),
)
# ... and in each text encoder, after its prefix (ldm_keys.TEXT_TOWERS).
CLIP_IGNORED = (("embeddings.position_ids", "a constant buffer arange(77) that older transformers saved"),)
OPEN_CLIP_IGNORED = (
    ("logit_scale", "CLIP's contrastive temperature, unused by SD"),
    ("attn_mask", "OpenCLIP's causal mask buffer, rebuilt at run time"),
    ("visual.*", "OpenCLIP's image tower (LDM deletes it; some merges keep it)"),
)
# SD 2 only (SDXL's bigG keeps and converts both).
SD2_TEXT_PROJECTION_REASON = ("projects the pooled text embedding for CLIP's contrastive loss; SD 2 "
                              "uses the per-token states")
LAST_RESBLOCK_REASON = ("OpenCLIP's last layer: SD 2 conditions on the penultimate layer's output "
                        "(LDM FrozenOpenCLIPEmbedder layer='penultimate'), so diffusers' text "
                        "encoder stops one layer earlier and drops this one")

class SingleFileCheckpoint(NamedTuple):
    # "unet" | "vae" | "text_encoder" | "text_encoder_2" (SDXL; the refiner has only this one)
    # -> lazy {diffusers key: np.ndarray}
    state_dicts: dict
    configs: dict       # the same components and "scheduler" -> config.json contents
    arch: Arch


# ---------------------------------------------------------------------------------------------
# Opening the file.

def _open(path: Path, allow_pickle: bool) -> tuple[Mapping, int | None]:
    """The flat state dict (lazy for safetensors) and a .ckpt's ``global_step`` if it has one."""
    if path.suffix == ".safetensors":
        return SafetensorsFile(path), None
    if path.suffix not in (".ckpt", ".pt", ".pth", ".bin"):
        raise SingleFileError(f"{path}: expected a .safetensors file (or, with allow_pickle=True, "
                              f"a .ckpt/.pt/.pth/.bin pickle), got suffix {path.suffix!r}")
    if not allow_pickle:
        raise SingleFileError(
            f"{path} is a pickle file. Unpickling can run arbitrary code, so jaxsd refuses it by "
            f"default. Prefer a .safetensors checkpoint; if you trust this file, pass "
            f"allow_pickle=True (it is then read with torch.load(weights_only=True), which needs "
            f"torch installed).")
    import torch  # only on this explicitly requested path

    state, global_step = torch.load(path, map_location="cpu", weights_only=True), None
    while isinstance(state, Mapping) and "state_dict" in state:   # LDM/Lightning wrapper
        global_step = state.get("global_step", global_step)
        state = state["state_dict"]
    arrays = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise SingleFileError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        arrays[key] = (value.float().numpy().astype(ml_dtypes.bfloat16) if value.dtype == torch.bfloat16
                       else value.numpy())
    return arrays, (int(global_step) if global_step is not None else None)


class _Converted(Mapping):
    """A lazy ``{diffusers key: np.ndarray}`` view of one component of the file."""

    def __init__(self, source: Mapping, key_map: dict, dtype=None):
        self._source = source
        self._index = {d: (ldm, k, transform) for ldm, (ds, transform) in key_map.items()
                       for k, d in enumerate(ds)}
        self.dtype = None if dtype is None else np.dtype(dtype)

    def __getitem__(self, key: str) -> np.ndarray:
        ldm, k, transform = self._index[key]
        array = np.asarray(transform.to_diffusers(self._source[ldm])[k])
        if self.dtype is not None and is_floating(array.dtype):
            array = array.astype(self.dtype)
        return array

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)


def _check_schedule(source: Mapping, scheduler: dict, path):
    """Warn when the file's own ``alphas_cumprod`` buffer disagrees with the scheduler config."""
    if "alphas_cumprod" not in source:
        return
    betas = np.linspace(BETA_START ** 0.5, BETA_END ** 0.5, scheduler["num_train_timesteps"]) ** 2
    ours = np.cumprod(1 - betas)
    theirs = np.asarray(source["alphas_cumprod"], np.float64)
    if not np.allclose(ours, theirs, rtol=1e-3, atol=1e-6):
        logger.warning("%s: its alphas_cumprod buffer does not match the scaled_linear schedule "
                       "(%g, %g) in the inferred scheduler config (max difference %.3g)",
                       path, BETA_START, BETA_END, np.abs(ours - theirs).max())


# ---------------------------------------------------------------------------------------------
# The public API.

def key_maps(configs: dict, family: str) -> dict:
    """``component -> {ldm key: (diffusers keys, transform)}`` for these configs."""
    return {"unet": unet_key_map(configs["unet"]), "vae": vae_key_map(configs["vae"]),
            **{name: text_key_map(configs[name], tower) for name, tower in TEXT_TOWERS[family].items()}}


def _ignored(configs: dict, family: str) -> list[tuple[re.Pattern, str]]:
    rules = list(IGNORED)
    for name, tower in TEXT_TOWERS[family].items():
        rules += [(tower.prefix + t, why) for t, why in (OPEN_CLIP_IGNORED if tower.open_clip else CLIP_IGNORED)]
        if tower.open_clip and not tower.with_projection:   # SD 2
            last = configs[name]["num_hidden_layers"]
            rules += [(tower.prefix + "text_projection", SD2_TEXT_PROJECTION_REASON),
                      (f"{tower.prefix}transformer.resblocks.{last}.*", LAST_RESBLOCK_REASON)]
    return [(re.compile("^" + re.escape(t[:-1])) if t.endswith("*") else _template_regex(t, "."), why)
            for t, why in rules]


def read_single_file(path: str | os.PathLike, *, allow_pickle: bool = False, dtype=None,
                     prediction_type: str | None = None, upcast_attention: bool | None = None,
                     image_size: int | None = None, unet_config: dict | None = None,
                     vae_config: dict | None = None, text_encoder_config: dict | None = None,
                     text_encoder_2_config: dict | None = None) -> SingleFileCheckpoint:
    """An original SD 1.x/2.x/XL single-file checkpoint as diffusers components.

    :param path: a ``.safetensors`` file (or ``.ckpt`` with ``allow_pickle``).
    :param allow_pickle: read pickle files through ``torch.load(weights_only=True)``.
    :param dtype: cast floating tensors to this dtype when read (None keeps the file's).
    :param prediction_type: "epsilon" or "v_prediction"; None infers it (SD 2 non-inpainting
        files are v_prediction unless saved at SD 2.0-base's global step, as in diffusers).
    :param upcast_attention: None infers it (True for SD 2 text-to-image, as SD 2.1's config).
    :param image_size: the default resolution; None takes diffusers' (512, or 768 for SD 2).
    :param unet_config, vae_config, text_encoder_config, text_encoder_2_config: config fields the
        tensors cannot show (``ldm_arch.UNSEEN``: head counts, GroupNorm groups), merged into the
        inferred configs. Known for the released SD 1.x/2.x/XL architectures; required for any
        other, and a missing one is a ``SingleFileError`` naming it. A value that contradicts the
        tensors is refused. ``text_encoder_2_config`` is SDXL's second (OpenCLIP bigG) encoder.
    """
    path = Path(path)
    source, global_step = _open(path, allow_pickle)
    shapes = {k: (source.shape(k) if isinstance(source, SafetensorsFile) else source[k].shape)
              for k in source}
    arch, configs = infer_arch(shapes, global_step, prediction_type=prediction_type,
                               upcast_attention=upcast_attention, image_size=image_size,
                               unet_config=unet_config, vae_config=vae_config,
                               text_encoder_config=text_encoder_config,
                               text_encoder_2_config=text_encoder_2_config, path=path)
    maps = key_maps(configs, arch.family)
    expected = {k for m in maps.values() for k in m}
    ignored = _ignored(configs, arch.family)
    unexpected = sorted(k for k in shapes if k not in expected and not any(r.match(k) for r, _ in ignored))
    missing = sorted(expected - set(shapes))
    if unexpected or missing:
        texts = "".join(f", {name.replace('_', ' ')} {c['num_hidden_layers']} layers"
                        for name, c in configs.items() if name.startswith("text_encoder"))
        lines = [f"{path}: the keys do not fit the inferred {arch.model_type} architecture "
                 f"(unet {configs['unet']['block_out_channels']} x {configs['unet']['layers_per_block']}{texts})"]
        for title, keys in (("missing", missing), ("unknown (neither converted nor on the ignore lists "
                                                   "IGNORED, CLIP_IGNORED, OPEN_CLIP_IGNORED of "
                                                   "jaxsd.checkpoints.single_file)", unexpected)):
            if keys:
                lines.append(f"{len(keys)} {title}:\n  " + "\n  ".join(keys))
        raise SingleFileError("\n".join(lines))
    _check_schedule(source, configs["scheduler"], path)
    state_dicts = {name: _Converted(source, m, dtype) for name, m in maps.items()}
    return SingleFileCheckpoint(state_dicts, configs, arch)


def to_single_file_state_dict(state_dicts: Mapping, configs: Mapping, family: str) -> dict:
    """Diffusers component state dicts (NumPy, PyTorch layouts) -> one CompVis-layout state dict.

    For SD 2 the file gets OpenCLIP's full layout: a last resblock and a ``text_projection``
    that the diffusers text encoder does not have, written as zeros (SD never runs them).
    SDXL's second text encoder is a ``CLIPTextModelWithProjection`` state dict (``text_model.*``).
    """
    if family not in TEXT_TOWERS:
        raise ValueError(f"family={family!r}; choose one of {list(TEXT_TOWERS)}")
    out = {}
    for name, key_map in key_maps(configs, family).items():
        sd = state_dicts[name]
        sd = {k.removeprefix("text_model."): v for k, v in sd.items()} if name == "text_encoder" else sd
        needed = {d for ds, _ in key_map.values() for d in ds}
        extra = sorted(set(sd) - needed - {"embeddings.position_ids"})
        absent = sorted(needed - set(sd))
        if extra or absent:
            raise SingleFileError(f"{name} state dict does not fit its config: missing {absent}, "
                                  f"unknown {extra}")
        for ldm, (ds, transform) in key_map.items():
            out[ldm] = transform.to_ldm(tuple(np.asarray(sd[d]) for d in ds))
    if family == "sd2":
        text = configs["text_encoder"]
        D, last = text["hidden_size"], text["num_hidden_layers"]
        block = f"{OPEN_CLIP_PREFIX}transformer.resblocks.{last}."
        for ldm, shape in (("ln_1.weight", (D,)), ("ln_1.bias", (D,)), ("attn.in_proj_weight", (3 * D, D)),
                           ("attn.in_proj_bias", (3 * D,)), ("attn.out_proj.weight", (D, D)),
                           ("attn.out_proj.bias", (D,)), ("ln_2.weight", (D,)), ("ln_2.bias", (D,)),
                           ("mlp.c_fc.weight", (text["intermediate_size"], D)),
                           ("mlp.c_fc.bias", (text["intermediate_size"],)),
                           ("mlp.c_proj.weight", (D, text["intermediate_size"])), ("mlp.c_proj.bias", (D,))):
            out[block + ldm] = np.zeros(shape, np.float32)
        # OpenCLIP's (width, embed_dim); diffusers reads its first axis as the q/k/v split size.
        out[OPEN_CLIP_PREFIX + "text_projection"] = np.zeros((D, D), np.float32)
    return out


def save_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata=None):
    """Write ``{name: array}`` as a ``.safetensors`` file (the format :class:`SafetensorsFile` reads)."""
    tags = {np.dtype(v): k for k, v in _DTYPES.items()}
    header, offset = {}, 0
    for name, array in tensors.items():
        array = np.asarray(array)
        header[name] = {"dtype": tags[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)    # pad the header so the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for array in tensors.values():
            f.write(np.ascontiguousarray(array).tobytes())


def write_single_file(path: str | os.PathLike, state_dicts: Mapping, configs: Mapping, family: str):
    """Write diffusers components as an original (CompVis-layout) single ``.safetensors`` file.

    :param state_dicts: "unet", "vae", "text_encoder" and/or "text_encoder_2" -> {diffusers key: NumPy array}.
    :param configs: the same components' configs (``model.config``; the text encoder's
        ``config.to_dict()``); only their structural fields are read.
    :param family: which text encoders, in which layout (``ldm_keys.TEXT_TOWERS``): "sd1" (CLIP),
        "sd2" (OpenCLIP), "sdxl" (CLIP and OpenCLIP bigG), "sdxl_refiner" (OpenCLIP bigG).
    """
    save_safetensors(path, to_single_file_state_dict(state_dicts, configs, family))
