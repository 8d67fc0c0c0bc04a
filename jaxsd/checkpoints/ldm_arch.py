"""What an original (CompVis/LDM) single-file checkpoint is, read off its tensor shapes alone.

The file holds no config: the number of levels, channels, layers and the text towers are
counted from the keys and shapes. What the tensors cannot show: head counts and GroupNorm
groups are known for the released SD 1.x/2.x/XL architectures and must be given for any other
(``UNSEEN``, ``RELEASED``); prediction type and default size follow diffusers' own rules. ``single_file.py`` reads the
tensors with the configs found here; ``docs/single_file.md`` explains each rule.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

from jaxsd.checkpoints.files import SingleFileError
from jaxsd.checkpoints.ldm_keys import TEXT_TOWERS, UNET_PREFIX, VAE_PREFIX, TextTower

# The noise schedule every SD 1.x/2.x LDM config trains with (linear_start, linear_end in
# v1-inference.yaml / v2-inference(-v).yaml; beta_schedule "linear" in LDM is diffusers'
# "scaled_linear": betas = linspace(sqrt(0.00085), sqrt(0.012), 1000) ** 2).
BETA_START, BETA_END = 0.00085, 0.012
# diffusers' DIFFUSERS_TO_LDM_DEFAULT_IMAGE_SIZE_MAP, keyed by its infer_diffusers_model_type names.
IMAGE_SIZE = {"v1": 512, "v2": 768, "inpainting": 512, "inpainting_v2": 512,
              "xl_base": 1024, "xl_refiner": 1024, "xl_inpaint": 1024}
# diffusers' model type by (family, 9-channel inpainting UNet); there is no inpainting refiner.
MODEL_TYPES = {("sd1", False): "v1", ("sd1", True): "inpainting", ("sd2", False): "v2",
               ("sd2", True): "inpainting_v2", ("sdxl", False): "xl_base", ("sdxl", True): "xl_inpaint",
               ("sdxl_refiner", False): "xl_refiner"}
# SD 2.0-base's .ckpt was saved at this step; diffusers' only clue that an SD 2 file is epsilon.
SD2_BASE_GLOBAL_STEP = 875000


# What the tensors cannot show, per component. For the released architectures the LDM yamls
# say it; for any other (a small test model, a distilled or pruned UNet) the user must.
UNSEEN = {"unet": ("attention_head_dim", "norm_num_groups"), "vae": ("norm_num_groups",),
          "text_encoder": ("num_attention_heads",), "text_encoder_2": ("num_attention_heads",)}
# The released SD 1.x/2.x/XL architectures, by the inferred fields that identify them, and their
# unseen settings: LDM's v1-inference.yaml (num_heads 8), v2-inference.yaml (num_head_channels 64,
# which diffusers writes as per-level head counts), sgm's sd_xl_base.yaml / sd_xl_refiner.yaml
# (num_head_channels 64 too: [320, 640, 1280] / 64 = [5, 10, 20]), GroupNorm(32) everywhere,
# 64-wide CLIP heads.
RELEASED = {
    "unet": {"sd1": ({"block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768},
                     {"attention_head_dim": 8, "norm_num_groups": 32}),
             "sd2": ({"block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 1024},
                     {"attention_head_dim": [5, 10, 20, 20], "norm_num_groups": 32}),
             "sdxl": ({"block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048},
                      {"attention_head_dim": [5, 10, 20], "norm_num_groups": 32}),
             "sdxl_refiner": ({"block_out_channels": [384, 768, 1536, 1536], "cross_attention_dim": 1280},
                              {"attention_head_dim": [6, 12, 24, 24], "norm_num_groups": 32})},
    "vae": {family: ({"block_out_channels": [128, 256, 512, 512]}, {"norm_num_groups": 32})
            for family in TEXT_TOWERS},
    "text_encoder": {family: ({"hidden_size": 768, "num_hidden_layers": 12}, {"num_attention_heads": 12})
                     for family in ("sd1", "sdxl")} | {
                     "sd2": ({"hidden_size": 1024, "num_hidden_layers": 23}, {"num_attention_heads": 16})},
    "text_encoder_2": {family: ({"hidden_size": 1280, "num_hidden_layers": 32}, {"num_attention_heads": 20})
                       for family in ("sdxl", "sdxl_refiner")},
}
_ARG = {"unet": "unet_config", "vae": "vae_config", "text_encoder": "text_encoder_config",
        "text_encoder_2": "text_encoder_2_config"}
# Fields counted off the tensors (an override may repeat them, not change them) ...
_FROM_TENSORS = {
    "unet": {"in_channels", "out_channels", "block_out_channels", "layers_per_block", "down_block_types",
             "up_block_types", "cross_attention_dim", "transformer_layers_per_block",
             "use_linear_projection"},
    "vae": {"in_channels", "out_channels", "block_out_channels", "layers_per_block", "latent_channels",
            "down_block_types", "up_block_types"},
    "text_encoder": {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "max_position_embeddings"},
    "text_encoder_2": {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                       "max_position_embeddings", "projection_dim"},
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
        described = ", ".join([f"UNet {configs['unet']['block_out_channels']}",
                               f"VAE {configs['vae']['block_out_channels']}"] + [
            f"{name.replace('_', ' ')} {c['hidden_size']} wide x {c['num_hidden_layers']} layers"
            for name, c in configs.items() if name.startswith("text_encoder")])
        raise SingleFileError(
            f"{path} is not a released SD 1.x/2.x/XL architecture ({described}), so jaxsd cannot "
            f"know what its tensors do not show; missing: {', '.join(missing)}. Pass them, e.g. "
            f"StableDiffusion.from_pretrained(path, unet_config={{'attention_head_dim': 8, "
            f"'norm_num_groups': 32}}, vae_config={{'norm_num_groups': 32}}, "
            f"text_encoder_config={{'num_attention_heads': 12}}) with this model's values")


@dataclasses.dataclass(frozen=True)
class Arch:
    """What the tensors (and the overrides) say about the model."""
    family: str             # which text towers (ldm_keys.TEXT_TOWERS): "sd1" (OpenAI CLIP ViT-L/14),
                            # "sd2" (OpenCLIP ViT-H/14), "sdxl" (both CLIP ViT-L and OpenCLIP bigG),
                            # "sdxl_refiner" (OpenCLIP bigG only)
    model_type: str         # diffusers' name (MODEL_TYPES): "v1", "v2", "inpainting", "xl_base", ...
    prediction_type: str    # "epsilon" or "v_prediction" (read off the tensors only for SD 2, weakly)
    in_channels: int        # 4, or 9 for inpainting (latents + mask + masked-image latents)
    upcast_attention: bool  # diffusers' SD 2.1 config: attention scores in float32
    image_size: int         # the default resolution in pixels (sets the configs' sample_size)
    global_step: int | None = None   # from a .ckpt wrapper, when there


def _indices(shapes: Mapping, pattern: str) -> list[int]:
    """Sorted distinct ``{i}`` values of the keys matching ``pattern`` (a regex with one group)."""
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for key in shapes if (m := regex.match(key))})


def _what_is_it(shapes: Mapping, path) -> str:
    """The family of an SD 1.x/2.x/XL checkpoint (``TEXT_TOWERS``), told by its text encoders' keys,
    as diffusers' ``infer_diffusers_model_type`` does."""
    has = lambda prefix: any(k.startswith(prefix) for k in shapes)
    towers = {t.prefix: t.name for family in TEXT_TOWERS.values() for t in family.values()}
    found = [name for name, prefix in (("UNet", UNET_PREFIX), ("VAE", VAE_PREFIX)) if has(prefix)] + [
        f"{name} ({prefix}*)" for prefix, name in towers.items() if has(prefix)]
    families = [f for f, family in TEXT_TOWERS.items() if all(has(t.prefix) for t in family.values())]
    if not (has(UNET_PREFIX) and has(VAE_PREFIX) and families):
        sample = sorted(shapes)[:5]
        expected = "; ".join(f"{f}: " + " and ".join(f"{t.name} ({t.prefix}*)" for t in family.values())
                             for f, family in TEXT_TOWERS.items())
        raise SingleFileError(
            f"{path} is not a complete Stable Diffusion 1.x/2.x/XL single-file checkpoint: expected "
            f"the UNet under {UNET_PREFIX!r}, the VAE under {VAE_PREFIX!r} and the text encoders "
            f"of one family ({expected}); found {', '.join(found) or 'none of them'} "
            f"({len(shapes)} keys, e.g. {sample})")
    if len(families) > 1 or len(found) > 2 + len(TEXT_TOWERS[families[0]]):
        raise SingleFileError(f"{path} holds the text encoders of more than one family: "
                              f"{', '.join(found[2:])}; expected those of one")
    return families[0]


def infer_text_encoder_config(shapes: Mapping, tower: TextTower) -> dict:
    """transformers ``CLIPTextConfig`` fields from one text encoder's tensors."""
    p = tower.prefix
    if tower.open_clip:
        prefix = p + "transformer.resblocks."
        vocab, hidden = shapes[p + "token_embedding.weight"]
        positions = shapes[p + "positional_embedding"][0]
        layers = len(_indices(shapes, re.escape(prefix) + r"(\d+)\."))
        layers -= 0 if tower.with_projection else 1     # SD 2: minus the dropped last one
        intermediate = shapes[prefix + "0.mlp.c_fc.weight"][0]
    else:
        vocab, hidden = shapes[p + "embeddings.token_embedding.weight"]
        positions = shapes[p + "embeddings.position_embedding.weight"][0]
        layers = len(_indices(shapes, re.escape(p) + r"encoder\.layers\.(\d+)\."))
        intermediate = shapes[p + "encoder.layers.0.mlp.fc1.weight"][0]
    return {
        "architectures": ["CLIPTextModelWithProjection" if tower.with_projection else "CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": intermediate,
        "num_hidden_layers": layers, "max_position_embeddings": positions,
        "hidden_act": "gelu" if tower.open_clip else "quick_gelu",   # OpenCLIP: exact GELU
        "layer_norm_eps": 1e-5,
        # As in SD 1.5's, SD 2's and SDXL's text_encoder(_2)/config.json (legacy eos_token_id 2: the
        # pooled output takes the argmax token, which is <|endoftext|>). projection_dim: OpenCLIP's
        # text_projection is (width, embed_dim); unused without it (SD 1.5's / SD 2's values).
        "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
        "projection_dim": (shapes[p + "text_projection"][1] if tower.with_projection
                           else 512 if tower.open_clip else 768),
    }


def infer_unet_config(shapes: Mapping, xl: bool = False) -> dict:
    """``UNet2DConditionModel`` structure from the UNet's tensors (the arch-dependent fields are
    added by :func:`infer_arch`); ``xl``: SDXL's micro-conditioning MLP (``label_emb``)."""
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
    count = lambda block: len(_indices(shapes, re.escape(f"{u}{block}.1.") + r"transformer_blocks\.(\d+)\."))
    # Transformer blocks per level (None: no attention there) and in the mid block. diffusers has
    # one value per level, the mid block taking the last level's: one int when all agree (SD: 1,
    # the refiner: 4), else a list with 1 where a level has no attention (SDXL base: [1, 2, 10]).
    depths = [count(f"input_blocks.{n}") if a else None for n, a in zip(first, down_attn)]
    mid = count("middle_block")
    if depths[-1] not in (None, mid):
        raise SingleFileError(f"UNet: the last level has {depths[-1]} transformer blocks but the mid "
                              f"block {mid}; diffusers' config has one value for both")
    depth = mid if {d for d in depths if d is not None} == {mid} else [d or 1 for d in depths[:-1]] + [mid]
    label = shapes.get(u + "label_emb.0.0.weight") if xl else None
    return {
        "_class_name": "UNet2DConditionModel",
        "in_channels": shapes[u + "input_blocks.0.0.weight"][1],
        "out_channels": shapes[u + "out.2.weight"][0],
        "block_out_channels": [shapes[f"{u}input_blocks.{n}.0.out_layers.3.weight"][0] for n in first],
        "layers_per_block": R,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in down_attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attn],
        "cross_attention_dim": shapes[attn + "transformer_blocks.0.attn2.to_k.weight"][1],
        "transformer_layers_per_block": depth,
        "use_linear_projection": len(shapes[attn + "proj_in.weight"]) == 2,   # SD 2/XL: Linear, SD 1: 1x1 conv
        # SD 1.x/2.x have no class or added embeddings (fields as diffusers' config mapping writes
        # them). SDXL adds an MLP of [pooled text | 256-wide sinusoids of each size/crop number]
        # (sgm's ConcatTimestepEmbedderND outdim 256, as diffusers sets for SDXL).
        "class_embed_type": None, "addition_embed_type": "text_time" if label else None,
        "addition_time_embed_dim": 256 if label else None,
        "projection_class_embeddings_input_dim": label[1] if label else None,
    }


def infer_vae_config(shapes: Mapping, xl: bool = False) -> dict:
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
        # LDM's default scale_factor: makes SD 1.x/2.x latents roughly unit variance. SDXL's VAE
        # was retrained and scales by sgm's 0.13025; its published config also says force_upcast
        # (it overflows in float16).
        **({"scaling_factor": 0.13025, "force_upcast": True} if xl else {"scaling_factor": 0.18215}),
    }


def infer_arch(shapes: Mapping, global_step: int | None = None, *, prediction_type=None,
               upcast_attention=None, image_size=None, unet_config=None, vae_config=None,
               text_encoder_config=None, text_encoder_2_config=None,
               path="checkpoint") -> tuple[Arch, dict]:
    """The :class:`Arch` and the configs ("unet", "vae", "text_encoder" and/or "text_encoder_2",
    "scheduler") from ``{ldm key: shape}`` (no tensor is read).

    ``unet_config``, ``vae_config``, ``text_encoder_config``, ``text_encoder_2_config``: settings
    the tensors cannot show (:data:`UNSEEN`), merged into the inferred configs; required for an
    architecture other than the released SD 1.x/2.x/XL ones (:data:`RELEASED`), whose values jaxsd knows.
    """
    shapes = {k: tuple(s) for k, s in shapes.items()}
    family = _what_is_it(shapes, path)
    xl = family.startswith("sdxl")
    try:
        texts = {name: infer_text_encoder_config(shapes, tower) for name, tower in TEXT_TOWERS[family].items()}
        unet, vae = infer_unet_config(shapes, xl), infer_vae_config(shapes, xl)
    except (KeyError, IndexError) as e:
        raise SingleFileError(f"{path}: cannot infer the architecture, key {e} is missing") from None
    # The UNet attends to the text encoders' hidden states, concatenated (SDXL: 768 + 1280).
    widths = [t["hidden_size"] for t in texts.values()]
    if unet["cross_attention_dim"] != sum(widths):
        raise SingleFileError(f"{path}: the UNet attends to {unet['cross_attention_dim']}-wide text "
                              f"states but the text encoder(s) are {' + '.join(map(str, widths))} wide")
    if unet["in_channels"] not in (4, 9):
        raise SingleFileError(f"{path}: the UNet takes {unet['in_channels']} input channels; jaxsd "
                              f"reads text-to-image (4) and inpainting (9) models only")
    # diffusers' infer_diffusers_model_type: inpainting if conv_in takes 9 channels, SD 2 if the
    # cross-attention is 1024 wide (here: if the text encoder is OpenCLIP, the same thing for
    # real SD files and also true for small test models), SDXL base/refiner by their embedders.
    inpainting = unet["in_channels"] == 9
    if (family, inpainting) not in MODEL_TYPES:
        raise SingleFileError(f"{path}: a {family} UNet with 9 input channels (inpainting) is not a "
                              f"released architecture; jaxsd reads {sorted(MODEL_TYPES.values())}")
    model_type = MODEL_TYPES[family, inpainting]
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
    configs = {"unet": unet, "vae": vae, **texts}
    given = {"unet": unet_config, "vae": vae_config, "text_encoder": text_encoder_config,
             "text_encoder_2": text_encoder_2_config}
    for name in sorted(set(given) - set(configs)):
        if given[name] is not None:
            raise ValueError(f"{_ARG[name]}={given[name]!r}: this {model_type} file has no {name}")
    _add_unseen(family, configs, {name: given[name] for name in configs}, path)
    scheduler = {
        # The published repos diffusers configures each file from ship these: SDXL's Euler, SD
        # 2.1's DDIM (for "v2" files), SD 1.5's PNDM.
        "_class_name": "EulerDiscreteScheduler" if xl else "DDIMScheduler" if model_type == "v2" else "PNDMScheduler",
        "num_train_timesteps": shapes.get("alphas_cumprod", (1000,))[0],
        "beta_start": BETA_START, "beta_end": BETA_END, "beta_schedule": "scaled_linear",
        "prediction_type": prediction_type, "clip_sample": False, "set_alpha_to_one": False,
        "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None,
        **({"interpolation_type": "linear", "use_karras_sigmas": False} if xl else {}),
    }
    return arch, {**configs, "scheduler": scheduler}
