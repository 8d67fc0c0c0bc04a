"""Original single-file Stable Diffusion checkpoints (SD 1.x/2.x, CompVis layout) <-> diffusers components.

``read_single_file`` splits one ``.safetensors`` (or, opted in, ``.ckpt``) file into the UNet,
VAE and text encoder state dicts under diffusers' and transformers' own key names, infers each
component's ``config.json`` from the tensors, and refuses a file with keys it does not know.
``write_single_file`` goes the other way. The key tables are in :mod:`jaxsd.ldm_keys`; the
inference rules and what they follow in diffusers are in ``docs/single_file.md``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import NamedTuple

import ml_dtypes
import numpy as np

from jaxsd.checkpoint import _DTYPES, CheckpointError, SafetensorsFile, is_floating
from jaxsd.convert import _template_regex
from jaxsd.ldm_keys import (CLIP_PREFIX, OPEN_CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX, text_key_map,
                            unet_key_map, vae_key_map)

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
    (CLIP_PREFIX + "embeddings.position_ids", "a constant buffer arange(77) that older transformers saved"),
    (OPEN_CLIP_PREFIX + "text_projection", "projects the pooled text embedding for CLIP's "
                                           "contrastive loss; SD uses the per-token states"),
    (OPEN_CLIP_PREFIX + "logit_scale", "CLIP's contrastive temperature, unused by SD"),
    (OPEN_CLIP_PREFIX + "attn_mask", "OpenCLIP's causal mask buffer, rebuilt at run time"),
    (OPEN_CLIP_PREFIX + "visual.*", "OpenCLIP's image tower (LDM deletes it; some merges keep it)"),
)
LAST_RESBLOCK_REASON = ("OpenCLIP's last layer: SD 2 conditions on the penultimate layer's output "
                        "(LDM FrozenOpenCLIPEmbedder layer='penultimate'), so diffusers' text "
                        "encoder stops one layer earlier and drops this one")

# The noise schedule every SD 1.x/2.x LDM config trains with (linear_start, linear_end in
# v1-inference.yaml / v2-inference(-v).yaml; beta_schedule "linear" in LDM is diffusers'
# "scaled_linear": betas = linspace(sqrt(0.00085), sqrt(0.012), 1000) ** 2).
BETA_START, BETA_END = 0.00085, 0.012
# diffusers' DIFFUSERS_TO_LDM_DEFAULT_IMAGE_SIZE_MAP, keyed by its infer_diffusers_model_type names.
IMAGE_SIZE = {"v1": 512, "v2": 768, "inpainting": 512, "inpainting_v2": 512}
# SD 2.0-base's .ckpt was saved at this step; diffusers' only clue that an SD 2 file is epsilon.
SD2_BASE_GLOBAL_STEP = 875000


@dataclasses.dataclass(frozen=True)
class Arch:
    """What the tensors (and the overrides) say about the model."""
    family: str             # "sd1" (OpenAI CLIP ViT-L/14 text tower) or "sd2" (OpenCLIP ViT-H/14)
    model_type: str         # diffusers' name: "v1", "v2", "inpainting", "inpainting_v2"
    prediction_type: str    # "epsilon" or "v_prediction" (read off the tensors only for SD 2, weakly)
    in_channels: int        # 4, or 9 for inpainting (latents + mask + masked-image latents)
    upcast_attention: bool  # diffusers' SD 2.1 config: attention scores in float32
    image_size: int         # the default resolution in pixels (sets the configs' sample_size)
    global_step: int | None = None   # from a .ckpt wrapper, when there


class SingleFileCheckpoint(NamedTuple):
    state_dicts: dict   # "unet" | "vae" | "text_encoder" -> lazy {diffusers key: np.ndarray}
    configs: dict       # "unet" | "vae" | "text_encoder" | "scheduler" -> config.json contents
    arch: Arch


class SingleFileError(CheckpointError):
    """A single file that is not an SD 1.x/2.x checkpoint, or whose keys do not fit one."""


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


# ---------------------------------------------------------------------------------------------
# Inferring the architecture from tensor shapes.

def _indices(shapes: Mapping, pattern: str) -> list[int]:
    """Sorted distinct ``{i}`` values of the keys matching ``pattern`` (a regex with one group)."""
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for key in shapes if (m := regex.match(key))})


def _what_is_it(shapes: Mapping, path) -> bool:
    """Check that the file is an SD 1.x/2.x checkpoint; True for the OpenCLIP (SD 2) text encoder."""
    has = {name: any(k.startswith(prefix) for k in shapes) for name, prefix in (
        ("UNet", UNET_PREFIX), ("VAE", VAE_PREFIX), ("CLIP", CLIP_PREFIX), ("OpenCLIP", OPEN_CLIP_PREFIX))}
    if any(k.startswith("conditioner.embedders.") for k in shapes):
        raise SingleFileError(f"{path} looks like an SDXL checkpoint (conditioner.embedders.*); "
                              f"jaxsd reads SD 1.x/2.x single files only")
    if not (has["UNet"] and has["VAE"] and (has["CLIP"] or has["OpenCLIP"])):
        sample = sorted(shapes)[:5]
        raise SingleFileError(
            f"{path} is not a complete Stable Diffusion 1.x/2.x single-file checkpoint: expected "
            f"the UNet under {UNET_PREFIX!r}, the VAE under {VAE_PREFIX!r} and the text encoder "
            f"under {CLIP_PREFIX!r} (SD 1.x) or {OPEN_CLIP_PREFIX!r} (SD 2.x); found "
            f"{', '.join(n for n, h in has.items() if h) or 'none of them'} "
            f"({len(shapes)} keys, e.g. {sample})")
    if has["CLIP"] and has["OpenCLIP"]:
        raise SingleFileError(f"{path} holds both a CLIP ({CLIP_PREFIX}*) and an OpenCLIP "
                              f"({OPEN_CLIP_PREFIX}*) text encoder; expected one")
    return has["OpenCLIP"]


def infer_text_encoder_config(shapes: Mapping, open_clip: bool) -> dict:
    """transformers ``CLIPTextConfig`` fields from the text encoder's tensors."""
    if open_clip:
        p, prefix = OPEN_CLIP_PREFIX, OPEN_CLIP_PREFIX + "transformer.resblocks."
        vocab, hidden = shapes[p + "token_embedding.weight"]
        positions = shapes[p + "positional_embedding"][0]
        layers = len(_indices(shapes, re.escape(prefix) + r"(\d+)\.")) - 1   # minus the dropped last one
        intermediate = shapes[prefix + "0.mlp.c_fc.weight"][0]
    else:
        p = CLIP_PREFIX
        vocab, hidden = shapes[p + "embeddings.token_embedding.weight"]
        positions = shapes[p + "embeddings.position_embedding.weight"][0]
        layers = len(_indices(shapes, re.escape(p) + r"encoder\.layers\.(\d+)\."))
        intermediate = shapes[p + "encoder.layers.0.mlp.fc1.weight"][0]
    return {
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
        "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": intermediate,
        "num_hidden_layers": layers, "max_position_embeddings": positions,
        # Not in the tensors: both towers use 64-wide heads (12 x 64 = 768, 16 x 64 = 1024).
        "num_attention_heads": max(1, hidden // 64),
        "hidden_act": "gelu" if open_clip else "quick_gelu",   # OpenCLIP: exact GELU
        "layer_norm_eps": 1e-5,
        # As in SD 1.5's and SD 2's text_encoder/config.json (legacy eos_token_id 2: the pooled
        # output takes the argmax token, which is <|endoftext|>); projection_dim is unused here.
        "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
        "projection_dim": 512 if open_clip else 768,
    }


def infer_unet_config(shapes: Mapping) -> dict:
    """``UNet2DConditionModel`` structure from the UNet's tensors (the arch-dependent fields are
    added by :func:`read_single_file`)."""
    u = UNET_PREFIX
    n_in = len(_indices(shapes, re.escape(u) + r"input_blocks\.(\d+)\."))
    n_down = len(_indices(shapes, re.escape(u) + r"input_blocks\.(\d+)\.0\.op\.weight$"))
    L = n_down + 1                      # levels: one fewer downsamplers than levels
    R = n_in // L - 1                   # n_in = 1 (conv_in) + L R (resnets) + L - 1 (downsamplers)
    if L * (R + 1) != n_in:
        raise SingleFileError(f"UNet: {n_in} input blocks with {n_down} downsamplers do not form "
                              f"levels of equal depth")
    first = [1 + i * (R + 1) for i in range(L)]       # the first input block of each level
    down_attn = [f"{u}input_blocks.{n}.1.norm.weight" in shapes for n in first]
    up_attn = [f"{u}output_blocks.{k * (R + 1)}.1.norm.weight" in shapes for k in range(L)]
    if not any(down_attn):
        raise SingleFileError("UNet: no cross-attention block found in input_blocks.*.1")
    attn = f"{u}input_blocks.{first[down_attn.index(True)]}.1."
    return {
        "_class_name": "UNet2DConditionModel",
        "in_channels": shapes[u + "input_blocks.0.0.weight"][1],
        "out_channels": shapes[u + "out.2.weight"][0],
        "block_out_channels": [shapes[f"{u}input_blocks.{n}.0.out_layers.3.weight"][0] for n in first],
        "layers_per_block": R,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in down_attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attn],
        "cross_attention_dim": shapes[attn + "transformer_blocks.0.attn2.to_k.weight"][1],
        "transformer_layers_per_block": len(_indices(shapes, re.escape(attn) + r"transformer_blocks\.(\d+)\.")),
        "use_linear_projection": len(shapes[attn + "proj_in.weight"]) == 2,   # SD 2: Linear, SD 1: 1x1 conv
        # SD 1.x/2.x have no class or added embeddings (fields as diffusers' config mapping writes them).
        "class_embed_type": None, "addition_embed_type": None, "addition_time_embed_dim": None,
        "projection_class_embeddings_input_dim": None,
    }


def infer_vae_config(shapes: Mapping) -> dict:
    """``AutoencoderKL`` structure from the VAE's tensors."""
    v = VAE_PREFIX
    levels = _indices(shapes, re.escape(v) + r"encoder\.down\.(\d+)\.")
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": shapes[v + "encoder.conv_in.weight"][1],
        "out_channels": shapes[v + "decoder.conv_out.weight"][0],
        "down_block_types": ["DownEncoderBlock2D"] * len(levels),
        "up_block_types": ["UpDecoderBlock2D"] * len(levels),
        "block_out_channels": [shapes[f"{v}encoder.down.{i}.block.0.conv2.weight"][0] for i in levels],
        "latent_channels": shapes[v + "decoder.conv_in.weight"][1],
        "layers_per_block": len(_indices(shapes, re.escape(v) + r"encoder\.down\.0\.block\.(\d+)\.")),
        # LDM's default scale_factor: makes SD 1.x/2.x latents roughly unit variance.
        "scaling_factor": 0.18215,
    }


def infer_arch(shapes: Mapping, global_step: int | None = None, *, prediction_type=None,
               upcast_attention=None, image_size=None, path="checkpoint") -> tuple[Arch, dict]:
    """The :class:`Arch` and the four configs from ``{ldm key: shape}`` (no tensor is read)."""
    shapes = {k: tuple(s) for k, s in shapes.items()}
    open_clip = _what_is_it(shapes, path)
    try:
        text, unet, vae = (infer_text_encoder_config(shapes, open_clip), infer_unet_config(shapes),
                           infer_vae_config(shapes))
    except (KeyError, IndexError) as e:
        raise SingleFileError(f"{path}: cannot infer the architecture, key {e} is missing") from None
    family = "sd2" if open_clip else "sd1"
    if unet["cross_attention_dim"] != text["hidden_size"]:
        raise SingleFileError(f"{path}: the UNet attends to {unet['cross_attention_dim']}-wide text "
                              f"states but the text encoder is {text['hidden_size']} wide")
    if unet["in_channels"] not in (4, 9):
        raise SingleFileError(f"{path}: the UNet takes {unet['in_channels']} input channels; jaxsd "
                              f"reads text-to-image (4) and inpainting (9) models only")
    # diffusers' infer_diffusers_model_type: inpainting if conv_in takes 9 channels, SD 2 if the
    # cross-attention is 1024 wide (here: if the text encoder is OpenCLIP, the same thing for
    # real SD files and also true for small test models).
    inpainting = unet["in_channels"] == 9
    model_type = {(False, False): "v1", (True, False): "v2", (False, True): "inpainting",
                  (True, True): "inpainting_v2"}[open_clip, inpainting]
    # diffusers configures "v2" files from SD 2.1 (v_prediction); its legacy scheduler path makes
    # SD 2.0-base's .ckpt (saved at global step 875000) the one epsilon exception.
    if prediction_type is None:
        prediction_type = ("epsilon" if model_type != "v2" or global_step == SD2_BASE_GLOBAL_STEP
                           else "v_prediction")
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type={prediction_type!r}; choose 'epsilon' or 'v_prediction'")
    arch = Arch(family=family, model_type=model_type, prediction_type=prediction_type,
                in_channels=unet["in_channels"],
                # diffusers loads SD 2.1's unet config (upcast_attention: true) for "v2" files.
                upcast_attention=(model_type == "v2") if upcast_attention is None else bool(upcast_attention),
                image_size=image_size or IMAGE_SIZE[model_type], global_step=global_step)
    vae_scale = 2 ** (len(vae["block_out_channels"]) - 1)
    unet.update(
        sample_size=arch.image_size // vae_scale, upcast_attention=arch.upcast_attention,
        # Not in the tensors. LDM configs: SD 1 has num_heads 8 at every level; SD 2 has 64-wide
        # heads (num_head_channels 64), which diffusers writes as per-level head counts.
        attention_head_dim=(8 if family == "sd1" else
                            [max(1, c // 64) for c in unet["block_out_channels"]]))
    vae["sample_size"] = arch.image_size
    scheduler = {
        # SD 2.1's repo (which diffusers configures "v2" files from) ships DDIM, SD 1.5's PNDM.
        "_class_name": "DDIMScheduler" if model_type == "v2" else "PNDMScheduler",
        "num_train_timesteps": shapes.get("alphas_cumprod", (1000,))[0],
        "beta_start": BETA_START, "beta_end": BETA_END, "beta_schedule": "scaled_linear",
        "prediction_type": prediction_type, "clip_sample": False, "set_alpha_to_one": False,
        "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None,
    }
    return arch, {"unet": unet, "vae": vae, "text_encoder": text, "scheduler": scheduler}


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
            "text_encoder": text_key_map(configs["text_encoder"], open_clip=family == "sd2")}


def _ignored(configs: dict, family: str) -> list[tuple[re.Pattern, str]]:
    rules = list(IGNORED)
    if family == "sd2":
        last = configs["text_encoder"]["num_hidden_layers"]
        rules.append((f"{OPEN_CLIP_PREFIX}transformer.resblocks.{last}.*", LAST_RESBLOCK_REASON))
    return [(re.compile("^" + re.escape(t[:-1])) if t.endswith("*") else _template_regex(t, "."), why)
            for t, why in rules]


def read_single_file(path: str | os.PathLike, *, allow_pickle: bool = False, dtype=None,
                     prediction_type: str | None = None, upcast_attention: bool | None = None,
                     image_size: int | None = None) -> SingleFileCheckpoint:
    """An original SD 1.x/2.x single-file checkpoint as diffusers components.

    :param path: a ``.safetensors`` file (or ``.ckpt`` with ``allow_pickle``).
    :param allow_pickle: read pickle files through ``torch.load(weights_only=True)``.
    :param dtype: cast floating tensors to this dtype when read (None keeps the file's).
    :param prediction_type: "epsilon" or "v_prediction"; None infers it (SD 2 non-inpainting
        files are v_prediction unless saved at SD 2.0-base's global step, as in diffusers).
    :param upcast_attention: None infers it (True for SD 2 text-to-image, as SD 2.1's config).
    :param image_size: the default resolution; None takes diffusers' (512, or 768 for SD 2).
    """
    path = Path(path)
    source, global_step = _open(path, allow_pickle)
    shapes = {k: (source.shape(k) if isinstance(source, SafetensorsFile) else source[k].shape)
              for k in source}
    arch, configs = infer_arch(shapes, global_step, prediction_type=prediction_type,
                               upcast_attention=upcast_attention, image_size=image_size, path=path)
    maps = key_maps(configs, arch.family)
    expected = {k for m in maps.values() for k in m}
    ignored = _ignored(configs, arch.family)
    unexpected = sorted(k for k in shapes if k not in expected and not any(r.match(k) for r, _ in ignored))
    missing = sorted(expected - set(shapes))
    if unexpected or missing:
        lines = [f"{path}: the keys do not fit the inferred {arch.model_type} architecture "
                 f"(unet {configs['unet']['block_out_channels']} x {configs['unet']['layers_per_block']}, "
                 f"text encoder {configs['text_encoder']['num_hidden_layers']} layers)"]
        for title, keys in (("missing", missing), ("unknown (neither converted nor on the ignore list "
                                                   "of jaxsd.single_file.IGNORED)", unexpected)):
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
    """
    if family not in ("sd1", "sd2"):
        raise ValueError(f"family={family!r}; choose 'sd1' or 'sd2'")
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

    :param state_dicts: "unet", "vae", "text_encoder" -> {diffusers key: NumPy array}.
    :param configs: the same components' configs (``model.config``; the text encoder's
        ``config.to_dict()``); only their structural fields are read.
    :param family: "sd1" (CLIP text encoder layout) or "sd2" (OpenCLIP layout).
    """
    save_safetensors(path, to_single_file_state_dict(state_dicts, configs, family))
