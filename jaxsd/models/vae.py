"""The VAE (Kingma & Welling, 2014) that maps Stable Diffusion's pixels to latents and back.

Latent diffusion (Rombach et al., 2022, sec. 3.1) runs the diffusion model on a compressed
image: the encoder E turns an image x [B, H, W, 3] in [-1, 1] into the parameters of a diagonal
Gaussian q(z|x) over latents z [B, H/8, W/8, 4]; the decoder D turns a latent back into pixels.

    encode   x -> conv_in -> down blocks (ResNets, stride-2 conv) -> mid (ResNet, attention, ResNet)
               -> GroupNorm, SiLU, conv_out -> quant_conv (1x1) -> (mean, logvar)
    decode   z -> post_quant_conv (1x1) -> conv_in -> mid -> up blocks (ResNets, nearest x2, conv)
               -> GroupNorm, SiLU, conv_out -> x

The diffusion model sees ``z * scaling_factor`` (latents of about unit variance); that scaling
is the pipeline's job, as in diffusers. :func:`image_to_latents` and :func:`latents_to_image`
do it, with the image conversions, for users who want latents for a picture and back.

Matches ``diffusers.AutoencoderKL`` (checked in ``tests/test_vae.py``); see ``docs/vae.md``.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxsd.models.layers import (Downsample, GroupNorm, ResnetBlock, Upsample, attention, conv1x1, conv3x3, MAX_DEPTH,
                                 require_finite, require_positive_int, require_positive_ints)

Dtype = Any
logger = logging.getLogger(__name__)

EPS = 1e-6  # every GroupNorm of diffusers' VAE (resnet_eps=1e-6, conv_norm_out eps=1e-6)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3                  # RGB in ...
    out_channels: int = 3                 # ... and out
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # one level per entry; each but the last halves H, W
    layers_per_block: int = 2             # ResNets per encoder level; the decoder has one more
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215       # ~1/std of SD's latents (Rombach et al., 2022, sec. 4.3.2, D.1)
    shift_factor: float | None = None     # subtracted before scaling; None (= 0) for SD 1.x/2.x
    use_quant_conv: bool = True           # 1x1 conv on the encoder's moments
    use_post_quant_conv: bool = True      # 1x1 conv on the latents before decoding
    mid_block_add_attention: bool = True  # self-attention between the two mid-block ResNets
    # Run in float32 when the pipeline runs in float16 (SDXL's VAE overflows float16); read by
    # the SDXL pipelines only, as in diffusers. No effect on the network itself.
    force_upcast: bool = True

    def __post_init__(self):
        if isinstance(self.block_out_channels, list):
            object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        where = "VAE config"
        require_positive_ints(where, "block_out_channels", self.block_out_channels)
        for name in ("in_channels", "out_channels", "latent_channels", "norm_num_groups"):
            require_positive_int(where, name, getattr(self, name))
        require_positive_int(where, "layers_per_block", self.layers_per_block, at_most=MAX_DEPTH)
        require_finite(where, "scaling_factor", self.scaling_factor, positive=True)
        if self.shift_factor is not None:
            require_finite(where, "shift_factor", self.shift_factor)
        if not isinstance(self.force_upcast, bool):
            raise ValueError(f"{where}: force_upcast={self.force_upcast!r} must be true or false")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"VAE config: block_out_channels={list(self.block_out_channels)} has "
                             f"{bad}, not divisible by norm_num_groups={self.norm_num_groups}")

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent along H and W: 8 for SD's four levels."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, config: dict) -> "VAEConfig":
        """From diffusers' ``AutoencoderKL`` ``config.json``; refuses settings jaxsd does not implement."""
        def refuse(key, valid):
            raise ValueError(f"VAE config: {key}={config[key]!r} is not supported by jaxsd; "
                             f"supported: {valid}")

        if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
            refuse("_class_name", "'AutoencoderKL'")
        if config.get("act_fn", "silu") not in ("silu", "swish"):  # diffusers: both are nn.SiLU
            refuse("act_fn", "'silu' (or its alias 'swish')")
        levels = len(config.get("block_out_channels", cls.block_out_channels))
        for key, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            if key in config and list(config[key]) != [block] * levels:
                refuse(key, f"{[block] * levels} (one {block} per entry of block_out_channels)")
        for key in ("latents_mean", "latents_std"):
            if config.get(key) is not None:
                refuse(key, "None (per-channel latent statistics are not implemented)")
        names = {f.name for f in dataclasses.fields(cls)}
        # sample_size steers diffusers' tiling, not the network.
        bookkeeping = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values",
                       "act_fn", "down_block_types", "up_block_types", "latents_mean", "latents_std",
                       "sample_size"}
        unknown = sorted(set(config) - names - bookkeeping)
        if unknown:
            logger.warning("VAE config: ignoring keys jaxsd does not know: %s", unknown)
        return cls(**{k: v for k, v in config.items() if k in names})


SD_VAE = VAEConfig()  # SD 1.x and 2.x share this VAE architecture (83.7M parameters)
TINY_VAE = VAEConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8)  # for tests


class DiagonalGaussian(NamedTuple):
    """The encoder's posterior q(z|x) = N(mean, diag(exp(logvar))), one Gaussian per latent element."""
    mean: jax.Array     # [B, h, w, latent_channels], float32
    logvar: jax.Array   # [B, h, w, latent_channels], float32, clamped to [-30, 20] as diffusers

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)  # sigma = exp(log(sigma^2) / 2)

    def sample(self, key: jax.Array) -> jax.Array:
        """z = mean + std * eps, eps ~ N(0, I) (reparameterisation, Kingma & Welling, 2014, sec. 2.4)."""
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

    def mode(self) -> jax.Array:
        return self.mean


class MidAttention(nn.Module):
    """Self-attention over all H*W positions, with a residual: x + out(attn(GroupNorm(x))).

    diffusers builds it with ``heads = channels // attention_head_dim`` and
    ``attention_head_dim = channels``: one head as wide as the block.
    """
    groups: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BHWC):
        B, H, W, C = x_BHWC.shape
        h_BTC = GroupNorm(self.groups, EPS, self.dtype, name="norm")(x_BHWC).reshape(B, H * W, C)
        q_BT1C, k_BT1C, v_BT1C = (
            nn.Dense(C, dtype=self.dtype, name=name)(h_BTC).reshape(B, H * W, 1, C)
            for name in ("query", "key", "value"))
        # softmax(q k^T / sqrt(C)) v, scores in float32 (diffusers: upcast_softmax=True)
        out_BT1C = attention(q_BT1C, k_BT1C, v_BT1C, upcast=True)
        out_BHWC = nn.Dense(C, dtype=self.dtype, name="out")(out_BT1C.reshape(B, H * W, C))
        return x_BHWC + out_BHWC.reshape(B, H, W, C)


class MidBlock(nn.Module):
    """ResNet -> self-attention -> ResNet at the lowest resolution (diffusers' ``UNetMidBlock2D``)."""
    config: VAEConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BHWC):
        C, G = x_BHWC.shape[-1], self.config.norm_num_groups
        x_BHWC = ResnetBlock(C, G, EPS, self.dtype, name="resnet_0")(x_BHWC)
        if self.config.mid_block_add_attention:
            x_BHWC = MidAttention(G, self.dtype, name="attention")(x_BHWC)
        return ResnetBlock(C, G, EPS, self.dtype, name="resnet_1")(x_BHWC)


class Encoder(nn.Module):
    """x [B, H, W, in_channels] -> moments [B, H/f, W/f, 2 * latent_channels], f = downsample_factor."""
    config: VAEConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BHWC):
        cfg, G = self.config, self.config.norm_num_groups
        h = conv3x3(cfg.block_out_channels[0], self.dtype, "conv_in")(x_BHWC)
        # Downsampling flow: each level's ResNets, then halve H and W (except at the last level).
        # The stride-2 conv pads only right and bottom, as diffusers' Downsample2D(padding=0).
        for i, channels in enumerate(cfg.block_out_channels):
            for j in range(cfg.layers_per_block):
                h = ResnetBlock(channels, G, EPS, self.dtype, name=f"down_{i}_resnet_{j}")(h)
            if i < len(cfg.block_out_channels) - 1:
                h = Downsample(channels, pad="right", dtype=self.dtype, name=f"down_{i}_downsample")(h)
        h = MidBlock(cfg, self.dtype, name="mid")(h)
        h = nn.silu(GroupNorm(G, EPS, self.dtype, name="norm_out")(h))
        return conv3x3(2 * cfg.latent_channels, self.dtype, "conv_out")(h)  # mean and logvar


class Decoder(nn.Module):
    """z [B, h, w, latent_channels] -> x [B, h*f, w*f, out_channels], f = downsample_factor."""
    config: VAEConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z_BhwC):
        cfg, G = self.config, self.config.norm_num_groups
        h = conv3x3(cfg.block_out_channels[-1], self.dtype, "conv_in")(z_BhwC)
        h = MidBlock(cfg, self.dtype, name="mid")(h)
        # Upsampling flow, widest level first: layers_per_block + 1 ResNets per level, then
        # nearest-neighbour x2 and a conv (except at the last level).
        channels_up = cfg.block_out_channels[::-1]
        for i, channels in enumerate(channels_up):
            for j in range(cfg.layers_per_block + 1):
                h = ResnetBlock(channels, G, EPS, self.dtype, name=f"up_{i}_resnet_{j}")(h)
            if i < len(channels_up) - 1:
                h = Upsample(channels, self.dtype, name=f"up_{i}_upsample")(h)
        h = nn.silu(GroupNorm(G, EPS, self.dtype, name="norm_out")(h))
        return conv3x3(cfg.out_channels, self.dtype, "conv_out")(h)


class AutoencoderKL(nn.Module):
    """diffusers' ``AutoencoderKL``, NHWC. ``encode`` -> :class:`DiagonalGaussian`, ``decode`` -> pixels."""
    config: VAEConfig
    dtype: Dtype = jnp.float32  # compute dtype; GroupNorm statistics and the outputs stay float32

    def setup(self):
        cfg = self.config
        self.encoder = Encoder(cfg, self.dtype)
        self.decoder = Decoder(cfg, self.dtype)
        if cfg.use_quant_conv:
            self.quant_conv = conv1x1(2 * cfg.latent_channels, self.dtype)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = conv1x1(cfg.latent_channels, self.dtype)

    def encode(self, images_BHWC) -> DiagonalGaussian:
        """images [B, H, W, in_channels], floats in [-1, 1]; H and W multiples of downsample_factor."""
        cfg = self.config
        _check_input("images", images_BHWC, cfg.in_channels, "in_channels", cfg.downsample_factor,
                     dtype_hint="Scale uint8 pixels p to p / 127.5 - 1, or use jaxsd.image_to_latents")
        moments = self.encoder(images_BHWC.astype(self.dtype))
        if cfg.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return DiagonalGaussian(mean, jnp.clip(logvar, -30.0, 20.0))

    def decode(self, latents_BhwC) -> jax.Array:
        """latents [B, h, w, latent_channels] -> images [B, h*f, w*f, out_channels], float32, unclipped.

        The latents are the VAE's own (unscaled): divide the diffusion model's by scaling_factor
        first (and add shift_factor), or use :func:`latents_to_image`.
        """
        cfg = self.config
        _check_input("latents", latents_BhwC, cfg.latent_channels, "latent_channels")
        z = latents_BhwC.astype(self.dtype)
        if cfg.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, images_BHWC):
        """Reconstruct: decode the posterior's mean (diffusers' forward with sample_posterior=False)."""
        return self.decode(self.encode(images_BHWC).mode())


def _check_input(name, x, channels, channels_field, multiple_of=1, dtype_hint=""):
    """Shape and dtype errors that name the argument, what it got and what it needs."""
    shape = getattr(x, "shape", None)
    if shape is None or len(shape) != 4:
        raise ValueError(f"{name} must be a 4-D NHWC array [batch, height, width, {channels}]; got shape {shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be a floating array; got dtype {x.dtype}. {dtype_hint}".rstrip())
    B, H, W, C = shape
    if C != channels:
        raise ValueError(f"{name} has {C} channels (last axis of shape {tuple(shape)}); this VAE takes "
                         f"{channels_field}={channels}. jaxsd is NHWC: [batch, height, width, channels]")
    if H % multiple_of or W % multiple_of:
        fit = lambda n: max(multiple_of, n // multiple_of * multiple_of)
        raise ValueError(f"{name} height x width {H}x{W} must both be multiples of {multiple_of} "
                         f"(the VAE's downsampling factor); e.g. crop or resize to {fit(H)}x{fit(W)}")


# ---------------------------------------------------------------------------------------------
# Pictures <-> the scaled latents the diffusion model works on.

def image_to_latents(model: AutoencoderKL, params, image, key: jax.Array | None = None) -> jax.Array:
    """uint8 image(s) -> scaled latents ``(z - shift_factor) * scaling_factor``, [B, h, w, C].

    :param image: uint8 [H, W, 3] or [B, H, W, 3], or a ``PIL.Image`` (converted to RGB).
    :param key: sample z ~ q(z|x) with this PRNG key; None takes the mean (deterministic).
    """
    pixels = _as_uint8_batch(image, model.config.in_channels)
    x = 2.0 * (pixels.astype(np.float32) / 255.0) - 1.0   # [0, 255] -> [-1, 1], as diffusers
    return _encode_scaled(model, params, x, key)


def latents_to_image(model: AutoencoderKL, params, latents) -> np.ndarray:
    """Scaled latents [B, h, w, C] -> uint8 images [B, h*f, w*f, 3] (diffusers' decode + postprocess)."""
    return np.asarray(_decode_scaled(model, params, jnp.asarray(latents))).astype(np.uint8)


@functools.partial(jax.jit, static_argnums=0)  # compiled once per model config, dtype and shape
def _encode_scaled(model: AutoencoderKL, params, x_BHWC, key):
    cfg = model.config
    posterior = model.apply({"params": params}, x_BHWC, method=model.encode)
    z = posterior.mode() if key is None else posterior.sample(key)
    return (z - (cfg.shift_factor or 0.0)) * cfg.scaling_factor


@functools.partial(jax.jit, static_argnums=0)
def _decode_scaled(model: AutoencoderKL, params, latents_BhwC):
    cfg = model.config
    z = latents_BhwC / cfg.scaling_factor + (cfg.shift_factor or 0.0)
    x = model.apply({"params": params}, z, method=model.decode)
    return jnp.round(jnp.clip(x * 0.5 + 0.5, 0.0, 1.0) * 255)   # [-1, 1] -> [0, 255], as diffusers


def _as_uint8_batch(image, channels: int) -> np.ndarray:
    """A PIL image or a uint8 (or integer, within [0, 255]) HWC / BHWC array -> uint8 BHWC."""
    try:
        from PIL import Image
        if isinstance(image, Image.Image):
            image = np.asarray(image.convert("RGB"))
    except ImportError:  # pragma: no cover - pillow is a dependency
        pass
    image = np.asarray(image)
    if np.issubdtype(image.dtype, np.floating) or not np.issubdtype(image.dtype, np.integer):
        raise ValueError(f"image must hold uint8 pixels in [0, 255]; got dtype {image.dtype}. For "
                         f"floats in [-1, 1] call model.encode directly; for floats in [0, 1] "
                         f"pass (image * 255).round().astype(np.uint8)")
    if image.dtype != np.uint8:
        low, high = int(image.min()), int(image.max())
        if low < 0 or high > 255:
            raise ValueError(f"image has dtype {image.dtype} with values in [{low}, {high}]; "
                             f"pixels must lie in [0, 255] (uint8)")
        image = image.astype(np.uint8)
    if image.ndim not in (3, 4) or image.shape[-1] != channels:
        raise ValueError(f"image must be [height, width, {channels}] or [batch, height, width, "
                         f"{channels}] (channels last); got shape {image.shape}")
    return image if image.ndim == 4 else image[None]
