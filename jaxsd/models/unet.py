"""The Stable Diffusion UNet: predicts the noise (or v) in a latent, given the timestep and the text.

diffusers' ``UNet2DConditionModel`` for SD 1.x and 2.x (Rombach et al., 2022; the UNet of Ho et
al., 2020, with cross-attention to CLIP text embeddings). NHWC throughout:

    sample [B, h, w, in_channels], timesteps [] or [B], text [B, S, cross_attention_dim]
    t      -> sinusoidal embedding -> fc1 -> SiLU -> fc2            temb [B, 4 * C0]
    sample -> conv_in                                               [B, h, w, C0]
    down level l = 0..L-1 (channels C_l):
        layers_per_block x (ResnetBlock(temb) [-> SpatialTransformer(text)]), keeping each output
        Downsample (not on the last level), keeping its output too
    mid:  ResnetBlock -> SpatialTransformer -> ResnetBlock          [B, h/2^(L-1), w/2^(L-1), C_{L-1}]
    up level l = L-1..0:
        (layers_per_block + 1) x (concat the last kept skip -> ResnetBlock [-> SpatialTransformer])
        Upsample (not on level 0)
    GroupNorm -> SiLU -> conv_out                                   [B, h, w, out_channels]

SDXL adds to temb an MLP of its pooled text and size/crop numbers (``AddedCond``, the config's
``addition_embed_type="text_time"``), and has a first level without attention and deeper
transformers per level (``transformer_depth`` [1, 2, 10]); docs/sdxl.md.

Which levels have attention is a per-level flag of the config (SD: all but the lowest-resolution
level), read from diffusers' block type names once, in :meth:`UNetConfig.from_diffusers`.
See ``docs/unet.md`` for the walk-through, the head-dim trap and the dtype policy.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsd.models.layers import (Downsample, Dtype, GroupNorm, ResnetBlock, Upsample, conv3x3, MAX_DEPTH,
                                 require_finite, require_positive_int, require_positive_ints)
from jaxsd.models.transformer import SpatialTransformer

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Configuration

@dataclass(frozen=True)
class UNetConfig:
    """A UNet's architecture, with per-level tuples (level 0 = full latent resolution)."""
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)  # C_l, one per level
    layers_per_block: tuple[int, ...] = (2, 2, 2, 2)    # ResnetBlocks per down level (up: one more)
    down_attention: tuple[bool, ...] = (True, True, True, False)  # CrossAttnDownBlock2D vs DownBlock2D
    up_attention: tuple[bool, ...] = (True, True, True, False)    # per level (diffusers lists up blocks reversed)
    mid_block: bool = True                              # mid_block_type None: no mid block at all
    mid_attention: bool = True                          # UNetMidBlock2DCrossAttn vs UNetMidBlock2D
    heads: tuple[int, ...] = (8, 8, 8, 8)               # diffusers' attention_head_dim (!), see docs/unet.md
    transformer_depth: tuple[int, ...] = (1, 1, 1, 1)   # transformer_layers_per_block
    cross_attention_dim: int = 768                      # text embedding width: 768 (SD 1.x), 1024 (SD 2.x)
    use_linear_projection: bool = False                 # proj_in/out stored as Linear (SD 2.x) or 1x1 conv
    upcast_attention: bool = False                      # attention scores in float32 (SD 2.1)
    in_channels: int = 4                                # 9 for inpainting: latent + mask + masked latent
    out_channels: int = 4
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True                        # [cos, sin] rather than [sin, cos]
    freq_shift: float = 0.0                             # frequencies exp(-ln(10^4) k / (C0/2 - freq_shift))
    time_embedding_dim: int = 1280                      # 4 * C0 unless the config says otherwise
    time_cond_proj_dim: int | None = None               # LCM: width of the guidance-scale embedding
    # SDXL's micro-conditioning (addition_embed_type "text_time"): a pooled text embedding [B, P]
    # and N numbers (sizes, crop; the refiner: an aesthetic score) each through a sinusoid of
    # width addition_time_embed_dim, concatenated (P + N * 256 = 2816 for the base) -> add_mlp.
    addition_embed_type: str | None = None               # None or "text_time"
    addition_time_embed_dim: int = 256
    projection_class_embeddings_input_dim: int | None = None  # P + N * addition_time_embed_dim

    def __post_init__(self):
        where = "UNet config"
        require_positive_ints(where, "block_out_channels", self.block_out_channels)
        L = len(self.block_out_channels)
        require_positive_ints(where, "heads", self.heads)
        for name in ("layers_per_block", "transformer_depth"):
            require_positive_ints(where, name, getattr(self, name), at_most=MAX_DEPTH)
        for name in ("layers_per_block", "down_attention", "up_attention", "heads", "transformer_depth"):
            if len(getattr(self, name)) != L:
                raise ValueError(f"{where}: {name}={list(getattr(self, name))} must have one entry per "
                                 f"level of block_out_channels={list(self.block_out_channels)}")
        for name in ("cross_attention_dim", "in_channels", "out_channels", "norm_num_groups",
                     "time_embedding_dim"):
            require_positive_int(where, name, getattr(self, name))
        if self.time_cond_proj_dim is not None:
            require_positive_int(where, "time_cond_proj_dim", self.time_cond_proj_dim)
        if self.addition_embed_type not in ADDITION_EMBED_TYPES:
            raise ValueError(f"{where}: addition_embed_type={self.addition_embed_type!r}; supported: "
                             f"{' or '.join(repr(a) for a in ADDITION_EMBED_TYPES)}")
        if self.addition_embed_type is not None:
            require_positive_int(where, "addition_time_embed_dim", self.addition_time_embed_dim)
            require_positive_int(where, "projection_class_embeddings_input_dim",
                                 self.projection_class_embeddings_input_dim)
        require_finite(where, "norm_eps", self.norm_eps, positive=True)
        require_finite(where, "freq_shift", self.freq_shift)
        for name in ("mid_block", "mid_attention", "use_linear_projection", "upcast_attention", "flip_sin_to_cos"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{where}: {name}={getattr(self, name)!r} must be true or false")
        for name in ("down_attention", "up_attention"):
            if not all(isinstance(v, bool) for v in getattr(self, name)):
                raise ValueError(f"{where}: {name}={getattr(self, name)!r} must be true/false per level")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"{where}: block_out_channels={list(self.block_out_channels)} has {bad}, "
                             f"not divisible by norm_num_groups={self.norm_num_groups}")
        bad = [(c, h) for c, h, a in zip(self.block_out_channels, self.heads, self.down_attention) if a and c % h]
        if bad:
            raise ValueError(f"{where}: channels {[c for c, _ in bad]} are not divisible by their "
                             f"attention heads {[h for _, h in bad]} (attention_head_dim)")

    @property
    def levels(self) -> int:
        return len(self.block_out_channels)

    @classmethod
    def from_diffusers(cls, config: dict) -> "UNetConfig":
        """Our config from diffusers' ``unet/config.json``, refusing anything we do not implement."""
        _check_supported(config)
        get = lambda name, default: config[name] if config.get(name) is not None else default
        channels = tuple(get("block_out_channels", (320, 640, 1280, 1280)))
        L = len(channels)

        def per_level(name, default):
            value = get(name, default)
            values = (value,) * L if isinstance(value, (int, float)) else tuple(value)
            if len(values) != L or not all(isinstance(v, int) for v in values):
                raise ValueError(f"UNet config field {name!r} = {value!r}: expected an int or a list of "
                                 f"{L} ints (one per entry of block_out_channels {list(channels)})")
            return values

        down = tuple(get("down_block_types", ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)))
        up = tuple(get("up_block_types", ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3))
        if len(down) != L or len(up) != L:
            raise ValueError(f"UNet config: down_block_types {list(down)} and up_block_types {list(up)} "
                             f"need one entry per block_out_channels entry {list(channels)}")
        mid = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
        cross_attention_dim = get("cross_attention_dim", 1280)
        if not isinstance(cross_attention_dim, int):
            raise ValueError(f"UNet config field 'cross_attention_dim' = {cross_attention_dim!r}: jaxsd "
                             f"supports one int (the text embedding width), not per-block values")
        return cls(
            block_out_channels=channels,
            layers_per_block=per_level("layers_per_block", 2),
            down_attention=tuple(t == "CrossAttnDownBlock2D" for t in down),
            up_attention=tuple(t == "CrossAttnUpBlock2D" for t in reversed(up)),
            mid_block=mid is not None,
            mid_attention=mid == "UNetMidBlock2DCrossAttn",
            # diffusers: num_attention_heads = num_attention_heads or attention_head_dim
            heads=per_level("attention_head_dim", 8),
            transformer_depth=per_level("transformer_layers_per_block", 1),
            cross_attention_dim=cross_attention_dim,
            use_linear_projection=get("use_linear_projection", False),
            upcast_attention=get("upcast_attention", False),
            in_channels=get("in_channels", 4),
            out_channels=get("out_channels", 4),
            norm_num_groups=get("norm_num_groups", 32),
            norm_eps=get("norm_eps", 1e-5),
            flip_sin_to_cos=get("flip_sin_to_cos", True),
            freq_shift=get("freq_shift", 0),
            time_embedding_dim=get("time_embedding_dim", 4 * channels[0]),
            time_cond_proj_dim=config.get("time_cond_proj_dim"),
            addition_embed_type=config.get("addition_embed_type"),
            addition_time_embed_dim=get("addition_time_embed_dim", 256),
            projection_class_embeddings_input_dim=config.get("projection_class_embeddings_input_dim"),
        )


# Fields of diffusers' UNet2DConditionModel that switch on something jaxsd does not implement:
# name -> (the values we accept, what a different value would need).
_UNSUPPORTED = {
    "addition_embed_type": ((None, "text_time"), "another added embedding (Kandinsky's text/image)"),
    "class_embed_type": ((None,), "class embeddings"),
    "num_class_embeds": ((None,), "class embeddings"),
    "encoder_hid_dim": ((None,), "a projection of the text embeddings"),
    "encoder_hid_dim_type": ((None,), "a projection of the text embeddings"),
    "time_embedding_type": (("positional",), "Fourier time features"),
    "time_embedding_act_fn": ((None,), "an extra activation on the time embedding"),
    "timestep_post_act": ((None,), "an extra activation after the time MLP"),
    "resnet_time_scale_shift": (("default",), "scale-shift (FiLM) time conditioning in ResNet blocks"),
    "resnet_skip_time_act": ((False,), "ResNet blocks without SiLU on the time embedding"),
    "resnet_out_scale_factor": ((1, 1.0), "rescaled ResNet outputs"),
    "mid_block_scale_factor": ((1, 1.0), "a rescaled mid block"),
    "dual_cross_attention": ((False,), "dual cross-attention"),
    "only_cross_attention": ((False, None), "blocks with cross-attention in place of self-attention"),
    "mid_block_only_cross_attention": ((False, None), "a mid block with only cross-attention"),
    "attention_type": (("default",), "GLIGEN gated attention"),
    "cross_attention_norm": ((None,), "a norm on the text embeddings inside attention"),
    "num_attention_heads": ((None,), "num_attention_heads (diffusers itself refuses it; use attention_head_dim)"),
    "reverse_transformer_layers_per_block": ((None,), "asymmetric transformer depths"),
    "conv_in_kernel": ((3,), "another conv_in kernel size"),
    "conv_out_kernel": ((3,), "another conv_out kernel size"),
    "downsample_padding": ((1,), "another Downsample padding"),
    "center_input_sample": ((False,), "centring the input (2x - 1)"),
    "act_fn": (("silu",), "another activation function"),
    "mid_block_type": (("UNetMidBlock2DCrossAttn", "UNetMidBlock2D", None), "another mid block"),
}
_BLOCK_TYPES = {"down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
                "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D")}
# Fields read by from_diffusers, and fields that do not change the computation here.
_READ = {"block_out_channels", "layers_per_block", "attention_head_dim", "transformer_layers_per_block",
         "cross_attention_dim", "use_linear_projection", "upcast_attention", "in_channels", "out_channels",
         "norm_num_groups", "norm_eps", "flip_sin_to_cos", "freq_shift", "time_embedding_dim",
         "time_cond_proj_dim", "addition_embed_type", "addition_time_embed_dim",
         "projection_class_embeddings_input_dim"}
_IRRELEVANT = {"sample_size", "dropout",  # the sample size is free; no dropout at inference
               # only used together with the class/added embeddings refused above:
               "addition_embed_type_num_heads", "class_embeddings_concat"}
ADDITION_EMBED_TYPES = (None, "text_time")


def _check_supported(config: dict) -> None:
    unknown = sorted(set(config) - _READ - _IRRELEVANT - set(_UNSUPPORTED) - set(_BLOCK_TYPES))
    unknown = [name for name in unknown if not name.startswith("_")]  # _class_name, _diffusers_version
    if unknown:
        logger.warning("UNet config fields unknown to jaxsd, ignored: %s", ", ".join(unknown))
    for name, (accepted, feature) in _UNSUPPORTED.items():
        value = config.get(name, accepted[0])
        per_level = isinstance(value, list) and name == "only_cross_attention"  # one flag per level
        if (any(value) if per_level else value) not in accepted:
            raise NotImplementedError(
                f"UNet config field {name!r} = {value!r} needs {feature}, which jaxsd does not implement; "
                f"supported: {' or '.join(repr(a) for a in accepted)}")
    for name, accepted in _BLOCK_TYPES.items():
        for value in config.get(name, ()):
            if value not in accepted:
                raise NotImplementedError(f"UNet config field {name!r} contains {value!r}, which jaxsd "
                                          f"does not implement; supported: {', '.join(accepted)}")
    if config.get("norm_num_groups", 32) is None:
        raise NotImplementedError("UNet config field 'norm_num_groups' = None (no output norm) is not "
                                  "implemented; supported: an int such as 32")
    depth = config.get("transformer_layers_per_block", 1)
    if isinstance(depth, (list, tuple)) and any(isinstance(d, (list, tuple)) for d in depth):
        raise NotImplementedError(f"UNet config field 'transformer_layers_per_block' = {depth!r} has "
                                  f"per-ResNet lists; supported: an int or one int per level")


# The UNets of the released checkpoints, as parsed from their config.json.
SD15 = UNetConfig()  # runwayml / stable-diffusion-v1-5 (also SD 1.1-1.4)
SD15_INPAINT = UNetConfig(in_channels=9)
SD21 = UNetConfig(heads=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True,
                  upcast_attention=True)  # stabilityai/stable-diffusion-2-1 (head size 64)
SDXL_BASE = UNetConfig(  # stabilityai/stable-diffusion-xl-base-1.0 (and sdxl-turbo): 2.6B parameters
    block_out_channels=(320, 640, 1280), layers_per_block=(2, 2, 2), down_attention=(False, True, True),
    up_attention=(False, True, True), heads=(5, 10, 20), transformer_depth=(1, 2, 10),
    cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
    projection_class_embeddings_input_dim=2816)  # 1280 pooled + 6 x 256
SDXL_REFINER = UNetConfig(  # stabilityai/stable-diffusion-xl-refiner-1.0: 5 numbers, no text_encoder
    block_out_channels=(384, 768, 1536, 1536), layers_per_block=(2, 2, 2, 2),
    down_attention=(False, True, True, False), up_attention=(False, True, True, False),
    heads=(6, 12, 24, 24), transformer_depth=(4, 4, 4, 4), cross_attention_dim=1280,
    use_linear_projection=True, time_embedding_dim=1536, addition_embed_type="text_time",
    projection_class_embeddings_input_dim=2560)  # 1280 pooled + 5 x 256


# ---------------------------------------------------------------------------------------------
# Time embedding

def timestep_embedding(t_B, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0,
                       max_period: float = 10000.0):
    """Sinusoidal features of (possibly fractional) timesteps: Vaswani et al. (2017), sec. 3.5.

    emb[b] = [sin(t_b w_k), cos(t_b w_k)]_k with w_k = max_period^(-k / (dim/2 - freq_shift)),
    k = 0..dim/2-1, in float32 (diffusers' ``get_timestep_embedding``). t [B] -> [B, dim]
    """
    half = dim // 2
    w_K = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
    angle_BK = t_B.astype(jnp.float32)[:, None] * w_K[None, :]
    sin, cos = jnp.sin(angle_BK), jnp.cos(angle_BK)
    emb_BD = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    return jnp.pad(emb_BD, ((0, 0), (0, dim % 2)))


def guidance_scale_embedding(w_B, dim: int):
    """An LCM UNet's condition: sinusoidal features of 1000 w (Luo et al. 2023, sec. 4.2; diffusers'
    ``get_guidance_scale_embedding``): [sin(1000 w f_k), cos(1000 w f_k)], f_k = 10^(-4k / (dim/2 - 1)).
    w [B] -> [B, dim] float32. The pipelines pass w = guidance_scale - 1."""
    half = dim // 2
    f_K = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -(jnp.log(jnp.float32(10000.0)) / (half - 1)))
    angle_BK = (jnp.asarray(w_B, jnp.float32) * 1000.0)[:, None] * f_K[None, :]
    emb_BD = jnp.concatenate([jnp.sin(angle_BK), jnp.cos(angle_BK)], axis=-1)
    return jnp.pad(emb_BD, ((0, 0), (0, dim % 2)))


class TimeEmbedding(nn.Module):
    """The time MLP: fc2(SiLU(fc1(sinusoid(t) [+ cond_proj(cond)]))). t [B], cond [B, E] -> [B, dim]"""
    dim: int
    sinusoid_dim: int
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t_B, cond_BE=None):
        emb = timestep_embedding(t_B, self.sinusoid_dim, self.flip_sin_to_cos, self.freq_shift)
        emb = emb.astype(self.dtype)
        if cond_BE is not None:  # LCM: the guidance scale joins the time features (no bias)
            emb = emb + nn.Dense(self.sinusoid_dim, use_bias=False, dtype=self.dtype,
                                 name="cond_proj")(cond_BE.astype(self.dtype))
        return _mlp(emb, self.dim, self.dtype)


def _mlp(x, dim: int, dtype):
    """diffusers' ``TimestepEmbedding``: fc2(SiLU(fc1(x))), as submodules of the calling module."""
    x = nn.silu(nn.Dense(dim, dtype=dtype, name="fc1")(x))
    return nn.Dense(dim, dtype=dtype, name="fc2")(x)


class AddedCond(NamedTuple):
    """SDXL's extra conditioning (diffusers' ``added_cond_kwargs``), for ``addition_embed_type``
    "text_time": the second text encoder's projected pooled output and the micro-conditioning
    numbers (base: original height, width, crop top, left, target height, width; the refiner:
    original size, crop, aesthetic score)."""
    text_embeds: jax.Array   # [B, P]
    time_ids: jax.Array      # [B, N]


class AddedEmbedding(nn.Module):
    """SDXL's micro-conditioning (Podell et al. 2023, sec. 2.2) as diffusers' ``get_aug_embed``:
    each number through the time sinusoid (width 256, the UNet's flip/shift), flattened after the
    pooled text, then an MLP. [B, P], [B, N] -> [B, dim], added to the time embedding."""
    dim: int
    sinusoid_dim: int
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, cond: AddedCond):
        B, N = cond.time_ids.shape
        ids_BNS = timestep_embedding(cond.time_ids.reshape(B * N), self.sinusoid_dim, self.flip_sin_to_cos,
                                     self.freq_shift)
        x = jnp.concatenate([cond.text_embeds.astype(jnp.float32), ids_BNS.reshape(B, N * self.sinusoid_dim)],
                            axis=-1).astype(self.dtype)                        # [B, P + N * 256]
        return _mlp(x, self.dim, self.dtype)


# ---------------------------------------------------------------------------------------------
# The UNet

class UNet(nn.Module):
    """``UNet2DConditionModel`` for SD 1.x/2.x and SDXL. See the module docstring for the data flow.

    :ivar config: the architecture (:class:`UNetConfig`).
    :ivar dtype: compute dtype (float32 or bfloat16); GroupNorm statistics stay in float32.
        Parameters may be stored in another dtype; they are cast to ``dtype`` when used.
    """
    config: UNetConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, sample_BHWC, timesteps, encoder_hidden_states_BSD, timestep_cond_BE=None,
                 added_cond: AddedCond | None = None):
        """sample [B, h, w, in_channels], timesteps [] or [B] (int or float), text [B, S, D],
        for an LCM UNet (``time_cond_proj_dim`` E) optionally the guidance-scale embedding
        [B, E] (``guidance_scale_embedding``), for SDXL (``addition_embed_type``) the
        :class:`AddedCond` -> model output [B, h, w, out_channels] (noise or v, in ``dtype``)."""
        cfg, dtype = self.config, self.dtype
        self._check_inputs(sample_BHWC, timesteps, encoder_hidden_states_BSD, timestep_cond_BE, added_cond)
        B = sample_BHWC.shape[0]
        text = encoder_hidden_states_BSD.astype(dtype)
        t_B = jnp.broadcast_to(jnp.asarray(timesteps), (B,))
        temb = TimeEmbedding(cfg.time_embedding_dim, cfg.block_out_channels[0], cfg.flip_sin_to_cos,
                             cfg.freq_shift, dtype, name="time_mlp")(t_B, timestep_cond_BE)
        if cfg.addition_embed_type == "text_time":  # SDXL: temb += MLP([pooled | sinusoids(ids)])
            temb = temb + AddedEmbedding(cfg.time_embedding_dim, cfg.addition_time_embed_dim,
                                         cfg.flip_sin_to_cos, cfg.freq_shift, dtype, name="add_mlp")(added_cond)

        def resnet(channels, name):
            return ResnetBlock(channels, cfg.norm_num_groups, cfg.norm_eps, dtype, name=name)

        def transformer(level, name):
            return SpatialTransformer(cfg.heads[level], cfg.transformer_depth[level], cfg.norm_num_groups,
                                      cfg.upcast_attention, dtype, name=name)

        x = conv3x3(cfg.block_out_channels[0], dtype, "conv_in")(sample_BHWC.astype(dtype))
        skips = [x]

        # Downsampling flow: each level keeps its outputs for the skip connections.
        for level, channels in enumerate(cfg.block_out_channels):
            for j in range(cfg.layers_per_block[level]):
                x = resnet(channels, f"down_{level}_res_{j}")(x, temb)
                if cfg.down_attention[level]:
                    x = transformer(level, f"down_{level}_attn_{j}")(x, text)
                skips.append(x)
            if level < cfg.levels - 1:
                x = Downsample(channels, dtype=dtype, name=f"down_{level}_downsample")(x)
                skips.append(x)

        # Middle, at the lowest resolution.
        if cfg.mid_block:
            top = cfg.levels - 1
            x = resnet(cfg.block_out_channels[top], "mid_res_0")(x, temb)
            if cfg.mid_attention:
                x = transformer(top, "mid_attn_0")(x, text)
                x = resnet(cfg.block_out_channels[top], "mid_res_1")(x, temb)

        # Upsampling flow: each ResnetBlock takes [x, the last kept skip] along channels.
        for level in reversed(range(cfg.levels)):
            channels = cfg.block_out_channels[level]
            for j in range(cfg.layers_per_block[level] + 1):
                x = jnp.concatenate([x, skips.pop()], axis=-1)
                x = resnet(channels, f"up_{level}_res_{j}")(x, temb)
                if cfg.up_attention[level]:
                    x = transformer(level, f"up_{level}_attn_{j}")(x, text)
            if level > 0:
                x = Upsample(channels, dtype=dtype, name=f"up_{level}_upsample")(x)

        x = nn.silu(GroupNorm(cfg.norm_num_groups, cfg.norm_eps, dtype, name="norm_out")(x))
        return conv3x3(cfg.out_channels, dtype, "conv_out")(x)

    def _check_inputs(self, sample, timesteps, text, cond=None, added=None):
        cfg = self.config
        if (added is not None) != (cfg.addition_embed_type is not None):
            raise ValueError("added_cond is required by this UNet (addition_embed_type='text_time', SDXL): "
                             "pass AddedCond(text_embeds, time_ids)" if added is None else
                             "added_cond was given but this UNet has no addition_embed_type")
        if added is not None:
            B, S = sample.shape[0], cfg.addition_time_embed_dim
            P, N = jnp.shape(added.text_embeds)[-1], jnp.shape(added.time_ids)[-1]
            if (jnp.ndim(added.text_embeds) != 2 or jnp.ndim(added.time_ids) != 2 or jnp.shape(added.text_embeds)[0] != B
                    or jnp.shape(added.time_ids)[0] != B or P + N * S != cfg.projection_class_embeddings_input_dim):
                raise ValueError(
                    f"added_cond has text_embeds {tuple(jnp.shape(added.text_embeds))} and time_ids "
                    f"{tuple(jnp.shape(added.time_ids))}; expected [{B}, P] and [{B}, N] with P + N x "
                    f"{S} (addition_time_embed_dim) = {cfg.projection_class_embeddings_input_dim} "
                    f"(projection_class_embeddings_input_dim)")
        if cond is not None and (cfg.time_cond_proj_dim is None or cond.shape != (sample.shape[0], cfg.time_cond_proj_dim)):
            want = ("none: this UNet has no time_cond_proj_dim" if cfg.time_cond_proj_dim is None
                    else f"[{sample.shape[0]}, {cfg.time_cond_proj_dim}] (batch, time_cond_proj_dim)")
            raise ValueError(f"timestep_cond has shape {tuple(cond.shape)}; expected {want}")
        factor = 2 ** (cfg.levels - 1)
        if sample.ndim != 4 or sample.shape[-1] != cfg.in_channels:
            raise ValueError(f"sample has shape {tuple(sample.shape)}; expected NHWC [batch, height, width, "
                             f"{cfg.in_channels}] (in_channels of this UNet)")
        B, h, w, _ = sample.shape
        if h % factor or w % factor:
            raise ValueError(f"sample has height x width {h} x {w}; both must be multiples of {factor} "
                             f"(2^(levels-1) for {cfg.levels} levels), e.g. {h - h % factor or factor} "
                             f"x {w - w % factor or factor}")
        if text.ndim != 3 or text.shape[-1] != cfg.cross_attention_dim or text.shape[0] != B:
            raise ValueError(f"encoder_hidden_states has shape {tuple(text.shape)}; expected [{B}, "
                             f"sequence, {cfg.cross_attention_dim}] (batch of sample, cross_attention_dim)")
        t_shape = jnp.shape(timesteps)
        if t_shape not in ((), (B,), (1,)):
            raise ValueError(f"timesteps has shape {t_shape}; expected a scalar or a vector of {B} "
                             f"(one per sample)")

    def example_inputs(self, batch: int = 1, size: int | None = None, sequence: int = 77):
        """Dummy inputs of the right shapes, for ``init`` and shape checks: sample, timesteps and
        text, then timestep_cond for an LCM UNet and added_cond for SDXL's, so that their layers
        are created."""
        cfg = self.config
        size = size or 2 ** (cfg.levels - 1)
        inputs = (jnp.zeros((batch, size, size, cfg.in_channels), self.dtype), jnp.zeros((batch,), jnp.int32),
                  jnp.zeros((batch, sequence, cfg.cross_attention_dim), self.dtype))
        if cfg.time_cond_proj_dim is not None:
            inputs += (jnp.zeros((batch, cfg.time_cond_proj_dim), jnp.float32),)
        if cfg.addition_embed_type is not None:  # any split of the width builds the same MLP
            width = cfg.projection_class_embeddings_input_dim - cfg.addition_time_embed_dim
            inputs += (None,) * (cfg.time_cond_proj_dim is None) + (
                AddedCond(jnp.zeros((batch, width), jnp.float32), jnp.zeros((batch, 1), jnp.float32)),)
        return inputs
