"""Key tables between original (CompVis / LDM) Stable Diffusion files and diffusers' component keys.

An original SD 1.x/2.x/XL ``.safetensors``/``.ckpt`` file holds all its networks in one flat
state dict, each under its own prefix:

    model.diffusion_model.*               the UNet           (LDM ``UNetModel``, SDXL's sgm one)
    first_stage_model.*                   the VAE            (LDM ``AutoencoderKL``)
    cond_stage_model.transformer.text_model.*   SD 1.x text encoder (OpenAI CLIP, HF layout)
    cond_stage_model.model.*              SD 2.x text encoder (OpenCLIP ViT-H/14)
    conditioner.embedders.{0,1}.*         SDXL's text encoders (``TEXT_TOWERS``)

Rows are templates, as in :mod:`jaxsd.checkpoints.convert`: a ``{name}`` placeholder runs over a range of
values and carries the same text to the other side. Unlike ``convert.py`` (reference -> jaxsd),
both sides here are PyTorch layouts, so a tensor only changes shape in three places:

    COPY        unchanged
    CONV1X1     the LDM VAE's mid-block attention q/k/v/proj_out are 1x1 convs (O, I, 1, 1);
                diffusers' Attention uses nn.Linear (O, I) (as diffusers' ``conv_attn_to_linear``)
    QKV         OpenCLIP fuses q, k, v into one ``in_proj_weight`` (3D, D) / ``in_proj_bias`` (3D,);
                transformers' CLIP has separate q_proj/k_proj/v_proj (D, D) / (D,)
    TRANSPOSE   OpenCLIP's ``text_projection`` is a matrix (width, embed_dim) used as ``x @ P``;
                transformers' is an nn.Linear weight (embed_dim, width)

A key map is ``{ldm key: (diffusers keys, transform)}``, built from a diffusers config, so it
lists exactly the keys a file of that architecture must hold (diffusers' converters instead
rewrite whatever keys they find with ``str.replace``; tests/test_single_file.py checks that both
give the same tensors).
"""
from __future__ import annotations

import itertools
import re
from typing import Callable, NamedTuple

import numpy as np

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
OPEN_CLIP_PREFIX = "cond_stage_model.model."


class TextTower(NamedTuple):
    """One text encoder of an original file: where it sits and which layout it has."""
    name: str                # for messages
    prefix: str              # its keys' prefix in the file
    open_clip: bool          # OpenCLIP's names (resblocks, fused q/k/v) rather than transformers' CLIP
    with_projection: bool    # SDXL's OpenCLIP bigG: every layer and the text_projection kept, read as
                             # a CLIPTextModelWithProjection. SD 2's OpenCLIP drops both (see below).


# The text encoders of each family, under the component name diffusers gives them. SDXL's
# sgm ``GeneralConditioner`` numbers its embedders: the base has CLIP ViT-L/14 (0) and OpenCLIP
# bigG (1); the refiner only bigG (0).
TEXT_TOWERS = {
    "sd1": {"text_encoder": TextTower("CLIP ViT-L/14", CLIP_PREFIX, False, False)},
    "sd2": {"text_encoder": TextTower("OpenCLIP ViT-H/14", OPEN_CLIP_PREFIX, True, False)},
    "sdxl": {"text_encoder": TextTower("SDXL CLIP ViT-L/14", "conditioner.embedders.0.transformer.text_model.",
                                       False, False),
             "text_encoder_2": TextTower("SDXL OpenCLIP ViT-bigG/14", "conditioner.embedders.1.model.",
                                         True, True)},
    "sdxl_refiner": {"text_encoder_2": TextTower("SDXL refiner OpenCLIP ViT-bigG/14",
                                                 "conditioner.embedders.0.model.", True, True)},
}


class Transform(NamedTuple):
    name: str
    to_diffusers: Callable[[np.ndarray], tuple]     # one LDM tensor -> the diffusers tensors
    to_ldm: Callable[[tuple], np.ndarray]           # the diffusers tensors -> one LDM tensor


COPY = Transform("copy", lambda w: (w,), lambda ws: ws[0])
CONV1X1 = Transform("conv1x1", lambda w: (w.reshape(w.shape[:2]),), lambda ws: ws[0][:, :, None, None])
# in_proj_weight [3D, D] = [W_q; W_k; W_v] stacked along the output axis (torch.nn.MultiheadAttention).
QKV = Transform("qkv", lambda w: tuple(np.split(w, 3, axis=0)), lambda ws: np.concatenate(ws, axis=0))
TRANSPOSE = Transform("transpose", lambda w: (w.T,), lambda ws: ws[0].T)

P = ("weight", "bias")


def expand(rows, ldm_prefix: str, diffusers_prefix: str, **ranges) -> dict:
    """Rows ``(ldm template, diffusers template(s), transform)`` -> ``{ldm key: (diffusers keys, transform)}``.

    Every ``{name}`` placeholder runs over ``ranges[name]`` (``{p}`` defaults to weight, bias).
    """
    ranges.setdefault("p", P)
    out = {}
    for ldm, diffusers, transform in rows:
        diffusers = (diffusers,) if isinstance(diffusers, str) else diffusers
        names = list(dict.fromkeys(re.findall(r"\{(\w+)\}", ldm)))
        for values in itertools.product(*(ranges[n] for n in names)):
            sub = dict(zip(names, values))
            out[ldm_prefix + ldm.format(**sub)] = (
                tuple(diffusers_prefix + d.format(**sub) for d in diffusers), transform)
    return out


# ---------------------------------------------------------------------------------------------
# UNet: LDM ``UNetModel`` -> diffusers ``UNet2DConditionModel``.

UNET_TOP = (
    ("time_embed.0.{p}", "time_embedding.linear_1.{p}", COPY),    # time_embed = Linear, SiLU, Linear
    ("time_embed.2.{p}", "time_embedding.linear_2.{p}", COPY),
    ("input_blocks.0.0.{p}", "conv_in.{p}", COPY),
    ("out.0.{p}", "conv_norm_out.{p}", COPY),                     # out = GroupNorm, SiLU, Conv
    ("out.2.{p}", "conv_out.{p}", COPY),
)
# SDXL's micro-conditioning MLP (diffusers' addition_embed_type "text_time"):
# label_emb = Sequential(Sequential(Linear, SiLU, Linear)).
UNET_ADDED = (
    ("label_emb.0.0.{p}", "add_embedding.linear_1.{p}", COPY),
    ("label_emb.0.2.{p}", "add_embedding.linear_2.{p}", COPY),
)
# LDM ResBlock: in_layers = (GroupNorm, SiLU, Conv), emb_layers = (SiLU, Linear),
# out_layers = (GroupNorm, SiLU, Dropout, Conv).
UNET_RESNET = (
    ("in_layers.0.{p}", "norm1.{p}", COPY),
    ("in_layers.2.{p}", "conv1.{p}", COPY),
    ("emb_layers.1.{p}", "time_emb_proj.{p}", COPY),
    ("out_layers.0.{p}", "norm2.{p}", COPY),
    ("out_layers.3.{p}", "conv2.{p}", COPY),
)
# Only where the block changes the channel count (diffusers: in_channels != out_channels).
UNET_SHORTCUT = (("skip_connection.{p}", "conv_shortcut.{p}", COPY),)
# LDM SpatialTransformer and diffusers Transformer2DModel use the same names below the block.
UNET_TRANSFORMER = tuple((k, k, COPY) for k in (
    "norm.{p}", "proj_in.{p}", "proj_out.{p}",
    "transformer_blocks.{t}.norm{n}.{p}",                          # n = 1 (attn1), 2 (attn2), 3 (ff)
    "transformer_blocks.{t}.attn{a}.to_q.weight",                  # a = 1 self-, 2 cross-attention
    "transformer_blocks.{t}.attn{a}.to_k.weight",
    "transformer_blocks.{t}.attn{a}.to_v.weight",
    "transformer_blocks.{t}.attn{a}.to_out.0.{p}",
    "transformer_blocks.{t}.ff.net.0.proj.{p}",                    # GEGLU projection
    "transformer_blocks.{t}.ff.net.2.{p}",
))
UNET_CONV = (("{p}", "{p}", COPY),)

# The index arithmetic, drawn for SD (L = 4 levels, R = 2 resnets per level, attention at levels
# 0-2). LDM numbers its blocks in two flat lists; each entry is a Sequential whose item 0 is a
# ResBlock (or the Downsample ``op``), item 1 a SpatialTransformer (if any), the last an Upsample.
#
#   input_blocks.0.0                     conv_in
#   input_blocks.1 .0/.1   .2 .0/.1      down_blocks.0.resnets.0/attentions.0, resnets.1/attentions.1
#   input_blocks.3.0.op                  down_blocks.0.downsamplers.0.conv
#   input_blocks.4-5, 6.0.op             down_blocks.1 ...        n = 1 + i (R + 1) + j
#   input_blocks.7-8, 9.0.op             down_blocks.2 ...
#   input_blocks.10-11                   down_blocks.3.resnets.0-1 (no attention, no downsampler)
#   middle_block.0 / .1 / .2             mid_block.resnets.0 / attentions.0 / resnets.1
#   output_blocks.0-2                    up_blocks.0.resnets.0-2  (R + 1 per level: one more resnet,
#   output_blocks.2.1.conv               up_blocks.0.upsamplers.0.conv      it takes the skip from
#   output_blocks.3-5 .0/.1, 5.2.conv    up_blocks.1 resnets/attentions,    the downsampler)
#                                          upsampler after the attention:   n = u (R + 1) + j
#   output_blocks.9-11 .0/.1             up_blocks.3 (no upsampler)
#
# up_blocks.u works at the resolution of level L - 1 - u (diffusers counts up blocks from the bottom).
# SDXL (L = 3, attention at levels 1-2 with 2 and 10 transformer blocks) numbers the same way;
# only the transformer_blocks.{t} range changes per level: transformer_layers_per_block[level],
# and the mid block takes the last level's value, as diffusers' UNet does.


def _one_int(config: dict, name: str, default: int) -> int:
    """A per-model count that diffusers may write per level ([1, 1, 1]): the original format has
    one value for the whole UNet, so the levels must agree."""
    value = config.get(name, default)
    if isinstance(value, (list, tuple)) and value and len(set(value)) == 1:
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}={value!r}: the original single-file layout has one value for every "
                         f"level; per-level values that differ cannot be written")
    return value


def unet_key_map(config: dict) -> dict:
    """``{ldm key: (diffusers keys, transform)}`` for a ``UNet2DConditionModel`` config (SD 1.x/2.x/XL)."""
    chans = list(config["block_out_channels"])
    L = len(chans)
    R = _one_int(config, "layers_per_block", 2)
    down_attn = [t.startswith("CrossAttn") for t in config["down_block_types"]]
    up_attn = [t.startswith("CrossAttn") for t in config["up_block_types"]]
    depth = config.get("transformer_layers_per_block", 1)
    depth = [depth] * L if isinstance(depth, int) else list(depth)     # per level
    keys = expand(UNET_TOP, UNET_PREFIX, "")
    if config.get("addition_embed_type") == "text_time":
        keys.update(expand(UNET_ADDED, UNET_PREFIX, ""))

    def block(rows, ldm, diffusers, level=None):
        ranges = dict(t=range(depth[level]), n=(1, 2, 3), a=(1, 2)) if level is not None else {}
        keys.update(expand(rows, f"{UNET_PREFIX}{ldm}.", f"{diffusers}.", **ranges))

    def resnet(ldm, diffusers, c_in, c_out):
        block(UNET_RESNET + (UNET_SHORTCUT if c_in != c_out else ()), ldm, diffusers)

    c = chans[0]                                        # channels flowing into the next block
    skips = [c]                                         # the skip connections' channels (a stack)
    for i in range(L):
        for j in range(R):
            n = 1 + i * (R + 1) + j
            resnet(f"input_blocks.{n}.0", f"down_blocks.{i}.resnets.{j}", c, chans[i])
            c = chans[i]
            skips.append(c)
            if down_attn[i]:
                block(UNET_TRANSFORMER, f"input_blocks.{n}.1", f"down_blocks.{i}.attentions.{j}", i)
        if i < L - 1:
            block(UNET_CONV, f"input_blocks.{1 + i * (R + 1) + R}.0.op", f"down_blocks.{i}.downsamplers.0.conv")
            skips.append(c)
    resnet("middle_block.0", "mid_block.resnets.0", c, c)
    block(UNET_TRANSFORMER, "middle_block.1", "mid_block.attentions.0", L - 1)
    resnet("middle_block.2", "mid_block.resnets.1", c, c)
    for u, level in enumerate(reversed(range(L))):
        for j in range(R + 1):
            n = u * (R + 1) + j
            resnet(f"output_blocks.{n}.0", f"up_blocks.{u}.resnets.{j}", c + skips.pop(), chans[level])
            c = chans[level]
            if up_attn[u]:
                block(UNET_TRANSFORMER, f"output_blocks.{n}.1", f"up_blocks.{u}.attentions.{j}", level)
        if u < L - 1:
            item = 2 if up_attn[u] else 1
            block(UNET_CONV, f"output_blocks.{u * (R + 1) + R}.{item}.conv", f"up_blocks.{u}.upsamplers.0.conv")
    return keys


# ---------------------------------------------------------------------------------------------
# VAE: LDM ``AutoencoderKL`` (Encoder/Decoder) -> diffusers ``AutoencoderKL``.

VAE_TOP = (
    ("encoder.conv_in.{p}", "encoder.conv_in.{p}", COPY),
    ("encoder.norm_out.{p}", "encoder.conv_norm_out.{p}", COPY),
    ("encoder.conv_out.{p}", "encoder.conv_out.{p}", COPY),
    ("decoder.conv_in.{p}", "decoder.conv_in.{p}", COPY),
    ("decoder.norm_out.{p}", "decoder.conv_norm_out.{p}", COPY),
    ("decoder.conv_out.{p}", "decoder.conv_out.{p}", COPY),
    ("quant_conv.{p}", "quant_conv.{p}", COPY),                   # moments -> moments (1x1)
    ("post_quant_conv.{p}", "post_quant_conv.{p}", COPY),
)
VAE_RESNET = tuple((k, k, COPY) for k in ("norm1.{p}", "conv1.{p}", "norm2.{p}", "conv2.{p}"))
VAE_SHORTCUT = (("nin_shortcut.{p}", "conv_shortcut.{p}", COPY),)
VAE_ATTENTION = (
    ("norm.{p}", "group_norm.{p}", COPY),
    ("q.weight", "to_q.weight", CONV1X1), ("q.bias", "to_q.bias", COPY),
    ("k.weight", "to_k.weight", CONV1X1), ("k.bias", "to_k.bias", COPY),
    ("v.weight", "to_v.weight", CONV1X1), ("v.bias", "to_v.bias", COPY),
    ("proj_out.weight", "to_out.0.weight", CONV1X1), ("proj_out.bias", "to_out.0.bias", COPY),
)


def vae_key_map(config: dict) -> dict:
    """``{ldm key: (diffusers keys, transform)}`` for an ``AutoencoderKL`` config.

    The encoder's ``down.{i}`` is ``down_blocks.{i}``; the decoder's ``up.{k}`` is numbered by
    resolution like the encoder (``up.0`` is the last, full-resolution block), so it is
    ``up_blocks.{L - 1 - k}`` in diffusers, which numbers blocks in the order they run.
    """
    chans, R = list(config["block_out_channels"]), config["layers_per_block"]
    L = len(chans)
    keys = expand(VAE_TOP, VAE_PREFIX, "")

    def block(rows, ldm, diffusers):
        keys.update(expand(rows, f"{VAE_PREFIX}{ldm}.", f"{diffusers}."))

    def resnet(ldm, diffusers, c_in, c_out):
        block(VAE_RESNET + (VAE_SHORTCUT if c_in != c_out else ()), ldm, diffusers)

    c = chans[0]
    for i in range(L):
        for j in range(R):
            resnet(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", c, chans[i])
            c = chans[i]
        if i < L - 1:
            block(UNET_CONV, f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv")
    for part in ("encoder", "decoder"):
        resnet(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", chans[-1], chans[-1])
        block(VAE_ATTENTION, f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0")
        resnet(f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", chans[-1], chans[-1])
    c = chans[-1]
    for u, k in enumerate(reversed(range(L))):
        for j in range(R + 1):
            resnet(f"decoder.up.{k}.block.{j}", f"decoder.up_blocks.{u}.resnets.{j}", c, chans[k])
            c = chans[k]
        if k > 0:
            block(UNET_CONV, f"decoder.up.{k}.upsample.conv", f"decoder.up_blocks.{u}.upsamplers.0.conv")
    return keys


# ---------------------------------------------------------------------------------------------
# Text encoders -> transformers ``CLIPTextModel`` in the transformers-5 key form (no
# ``text_model.`` prefix; jaxsd's CLIP table accepts both forms), or SDXL's second encoder as a
# ``CLIPTextModelWithProjection`` (which transformers 5 still saves as ``text_model.*`` plus
# ``text_projection.weight``).

CLIP_ROWS = tuple((k, k, COPY) for k in (
    "embeddings.token_embedding.weight", "embeddings.position_embedding.weight",
    "encoder.layers.{i}.self_attn.q_proj.{p}", "encoder.layers.{i}.self_attn.k_proj.{p}",
    "encoder.layers.{i}.self_attn.v_proj.{p}", "encoder.layers.{i}.self_attn.out_proj.{p}",
    "encoder.layers.{i}.layer_norm1.{p}", "encoder.layers.{i}.layer_norm2.{p}",
    "encoder.layers.{i}.mlp.fc1.{p}", "encoder.layers.{i}.mlp.fc2.{p}",
    "final_layer_norm.{p}",
))

OPEN_CLIP_ROWS = (
    ("token_embedding.weight", "embeddings.token_embedding.weight", COPY),
    ("positional_embedding", "embeddings.position_embedding.weight", COPY),
    ("transformer.resblocks.{i}.ln_1.{p}", "encoder.layers.{i}.layer_norm1.{p}", COPY),
    ("transformer.resblocks.{i}.attn.in_proj_{p}",
     tuple(f"encoder.layers.{{i}}.self_attn.{x}_proj.{{p}}" for x in "qkv"), QKV),
    ("transformer.resblocks.{i}.attn.out_proj.{p}", "encoder.layers.{i}.self_attn.out_proj.{p}", COPY),
    ("transformer.resblocks.{i}.ln_2.{p}", "encoder.layers.{i}.layer_norm2.{p}", COPY),
    ("transformer.resblocks.{i}.mlp.c_fc.{p}", "encoder.layers.{i}.mlp.fc1.{p}", COPY),
    ("transformer.resblocks.{i}.mlp.c_proj.{p}", "encoder.layers.{i}.mlp.fc2.{p}", COPY),
    ("ln_final.{p}", "final_layer_norm.{p}", COPY),
)


def text_key_map(config: dict, tower: TextTower) -> dict:
    """``{ldm key: (diffusers keys, transform)}`` for a ``CLIPTextModel(WithProjection)`` config.

    For SD 2's OpenCLIP only the first ``num_hidden_layers`` resblocks map: SD 2 conditions on
    the penultimate layer's output, so diffusers' text encoder has 23 of OpenCLIP's 24 layers.
    SDXL's bigG keeps all its layers (diffusers' pipeline takes the penultimate hidden states
    itself, and the pooled output needs the last layer) and its projection.
    """
    layers = range(config["num_hidden_layers"])
    if not tower.open_clip:
        return expand(CLIP_ROWS, tower.prefix, "", i=layers)
    if not tower.with_projection:
        return expand(OPEN_CLIP_ROWS, tower.prefix, "", i=layers)
    return {**expand(OPEN_CLIP_ROWS, tower.prefix, "text_model.", i=layers),
            tower.prefix + "text_projection": (("text_projection.weight",), TRANSPOSE)}
