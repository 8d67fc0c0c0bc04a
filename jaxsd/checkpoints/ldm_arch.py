"""What an original (CompVis/LDM) single-file checkpoint is, read off its tensor shapes alone.

The file holds no config: the number of levels, channels, layers and the text tower are
counted from the keys and shapes. What the tensors cannot show: head counts and GroupNorm
groups are known for the released SD 1.x/2.x architectures and must be given for any other
(``UNSEEN``, ``RELEASED``); prediction type and default size follow diffusers' own rules. ``single_file.py`` reads the
tensors with the configs found here; ``docs/single_file.md`` explains each rule.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

from jaxsd.checkpoints.files import SingleFileError
from jaxsd.checkpoints.ldm_keys import CLIP_PREFIX, OPEN_CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX

# The noise schedule every SD 1.x/2.x LDM config trains with (linear_start, linear_end in
# v1-inference.yaml / v2-inference(-v).yaml; beta_schedule "linear" in LDM is diffusers'
# "scaled_linear": betas = linspace(sqrt(0.00085), sqrt(0.012), 1000) ** 2).
BETA_START, BETA_END = 0.00085, 0.012
# diffusers' DIFFUSERS_TO_LDM_DEFAULT_IMAGE_SIZE_MAP, keyed by its infer_diffusers_model_type names.
IMAGE_SIZE = {"v1": 512, "v2": 768, "inpainting": 512, "inpainting_v2": 512}
# SD 2.0-base's .ckpt was saved at this step; diffusers' only clue that an SD 2 file is epsilon.
SD2_BASE_GLOBAL_STEP = 875000


# What the tensors cannot show, per component. For the released architectures the LDM yamls
# say it; for any other (a small test model, a distilled or pruned UNet) the user must.
UNSEEN = {"unet": ("attention_head_dim", "norm_num_groups"), "vae": ("norm_num_groups",),
          "text_encoder": ("num_attention_heads",)}
# The released SD 1.x/2.x architectures, by the inferred fields that identify them, and their
# unseen settings: LDM's v1-inference.yaml (num_heads 8), v2-inference.yaml (num_head_channels 64,
# which diffusers writes as per-level head counts), GroupNorm(32) everywhere, 64-wide CLIP heads.
RELEASED = {
    "unet": {"sd1": ({"block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768},
                     {"attention_head_dim": 8, "norm_num_groups": 32}),
             "sd2": ({"block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 1024},
                     {"attention_head_dim": [5, 10, 20, 20], "norm_num_groups": 32})},
    "vae": {family: ({"block_out_channels": [128, 256, 512, 512]}, {"norm_num_groups": 32})
            for family in ("sd1", "sd2")},
    "text_encoder": {"sd1": ({"hidden_size": 768, "num_hidden_layers": 12}, {"num_attention_heads": 12}),
                     "sd2": ({"hidden_size": 1024, "num_hidden_layers": 23}, {"num_attention_heads": 16})},
}
_ARG = {"unet": "unet_config", "vae": "vae_config", "text_encoder": "text_encoder_config"}
# Fields counted off the tensors (an override may repeat them, not change them) ...
_FROM_TENSORS = {
    "unet": {"in_channels", "out_channels", "block_out_channels", "layers_per_block", "down_block_types",
             "up_block_types", "cross_attention_dim", "transformer_layers_per_block",
             "use_linear_projection"},
    "vae": {"in_channels", "out_channels", "block_out_channels", "layers_per_block", "latent_channels",
            "down_block_types", "up_block_types"},
    "text_encoder": {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "max_position_embeddings"},
}
# ... and fields with their own argument of read_single_file.
_OWN_ARGUMENT = {"unet": {"sample_size": "image_size", "upcast_attention": "upcast_attention"},
                 "vae": {"sample_size": "image_size"}}


def _known_fields(component: str) -> set[str]:
    """The config fields jaxsd's model classes read, for checking the user's override names."""
    from jaxsd.models import clip, unet, vae
    if component == "unet":
        return unet._READ | set(unet._UNSUPPORTED)
    config_class = vae.VAEConfig if component == "vae" else clip.CLIPTextConfig
    return {f.name for f in dataclasses.fields(config_class)}


def _add_unseen(family: str, configs: dict, given: dict, path) -> None:
    """Complete ``configs`` (in place) with what the tensors cannot show: the released
    architecture's values, or the user's ``given`` ones, which must not contradict the tensors."""
    missing = []
    for component, config in configs.items():
        user = given[component] or {}
        if not isinstance(user, Mapping):
            raise TypeError(f"{_ARG[component]}={user!r}: expected a dict of {component} config "
                            f"fields, e.g. {{{UNSEEN[component][0]!r}: ...}}")
        unknown = sorted(set(user) - set(config) - _known_fields(component))
        if unknown:
            raise ValueError(f"{_ARG[component]}: unknown {component} config field(s) {unknown}; "
                             f"what the tensors cannot show is {list(UNSEEN[component])}")
        for key, value in user.items():
            if key in _OWN_ARGUMENT.get(component, {}):
                raise ValueError(f"{_ARG[component]}[{key!r}]: pass {_OWN_ARGUMENT[component][key]}= "
                                 f"instead (it sets the scheduler's and the VAE's configs too)")
            plain = list(value) if isinstance(value, tuple) else value
            if key in _FROM_TENSORS[component] and config[key] != plain:
                raise SingleFileError(
                    f"{path}: {_ARG[component]}[{key!r}] = {value!r} contradicts the file, whose "
                    f"tensors say {config[key]!r}; leave it out (only what the tensors cannot show "
                    f"needs saying: {', '.join(UNSEEN[component])})")
        identity, known = RELEASED[component][family]
        if all(config[k] == v for k, v in identity.items()):
            config.update(known)
        else:
            missing += [f"{_ARG[component]}[{k!r}]" for k in UNSEEN[component] if user.get(k) is None]
        config.update(user)
    if missing:
        described = (f"UNet {configs['unet']['block_out_channels']}, VAE "
                     f"{configs['vae']['block_out_channels']}, text encoder "
                     f"{configs['text_encoder']['hidden_size']} wide x "
                     f"{configs['text_encoder']['num_hidden_layers']} layers")
        raise SingleFileError(
            f"{path} is not a released SD 1.x/2.x architecture ({described}), so jaxsd cannot "
            f"know what its tensors do not show; missing: {', '.join(missing)}. Pass them, e.g. "
            f"StableDiffusion.from_pretrained(path, unet_config={{'attention_head_dim': 8, "
            f"'norm_num_groups': 32}}, vae_config={{'norm_num_groups': 32}}, "
            f"text_encoder_config={{'num_attention_heads': 12}}) with this model's values")


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
        "hidden_act": "gelu" if open_clip else "quick_gelu",   # OpenCLIP: exact GELU
        "layer_norm_eps": 1e-5,
        # As in SD 1.5's and SD 2's text_encoder/config.json (legacy eos_token_id 2: the pooled
        # output takes the argmax token, which is <|endoftext|>); projection_dim is unused here.
        "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
        "projection_dim": 512 if open_clip else 768,
    }


def infer_unet_config(shapes: Mapping) -> dict:
    """``UNet2DConditionModel`` structure from the UNet's tensors (the arch-dependent fields are
    added by :func:`infer_arch`)."""
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
               upcast_attention=None, image_size=None, unet_config=None, vae_config=None,
               text_encoder_config=None, path="checkpoint") -> tuple[Arch, dict]:
    """The :class:`Arch` and the four configs from ``{ldm key: shape}`` (no tensor is read).

    ``unet_config``, ``vae_config``, ``text_encoder_config``: settings the tensors cannot show
    (:data:`UNSEEN`), merged into the inferred configs; required for an architecture other than
    the released SD 1.x/2.x ones (:data:`RELEASED`), whose values jaxsd knows.
    """
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
    unet.update(sample_size=arch.image_size // vae_scale, upcast_attention=arch.upcast_attention)
    vae["sample_size"] = arch.image_size
    _add_unseen(family, {"unet": unet, "vae": vae, "text_encoder": text},
                {"unet": unet_config, "vae": vae_config, "text_encoder": text_encoder_config}, path)
    scheduler = {
        # SD 2.1's repo (which diffusers configures "v2" files from) ships DDIM, SD 1.5's PNDM.
        "_class_name": "DDIMScheduler" if model_type == "v2" else "PNDMScheduler",
        "num_train_timesteps": shapes.get("alphas_cumprod", (1000,))[0],
        "beta_start": BETA_START, "beta_end": BETA_END, "beta_schedule": "scaled_linear",
        "prediction_type": prediction_type, "clip_sample": False, "set_alpha_to_one": False,
        "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None,
    }
    return arch, {"unet": unet, "vae": vae, "text_encoder": text, "scheduler": scheduler}
