"""Building blocks shared by the VAE and the UNet. NHWC throughout.

    GroupNorm     statistics in float32 whatever the compute dtype
    Conv          nn.Conv's parameters; on CPU small convolutions run as one matmul (im2col)
    ResnetBlock   GroupNorm -> SiLU -> conv3x3 (+ time embedding) -> GroupNorm -> SiLU -> conv3x3,
                  plus the input (through a 1x1 conv when the channel count changes)
    Downsample    stride-2 conv3x3 (the VAE pads only right/bottom, as diffusers does)
    Upsample      nearest-neighbour x2, then conv3x3
    attention     softmax(Q K^T / sqrt(d)) V through jax.nn.dot_product_attention
                  (on CPU in cache-sized blocks: blocked_attention)

Names follow the architecture, not checkpoint keys; the renames live in ``jaxsd/checkpoints/convert.py``.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


class GroupNorm(nn.Module):
    """GroupNorm (Wu & He, 2018) over (H, W, C/G) per group, computed in float32.

    In bfloat16 the mean of a 64x64x40 group loses most of its bits; computing the statistics
    (and the normalisation) in float32 and casting back costs nothing measurable.
    """
    groups: int = 32
    eps: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BHWC):
        B, H, W, C = x_BHWC.shape
        G = self.groups
        x = x_BHWC.astype(jnp.float32).reshape(B, H, W, G, C // G)
        mean = x.mean(axis=(1, 2, 4), keepdims=True)
        var = jnp.square(x - mean).mean(axis=(1, 2, 4), keepdims=True)  # biased, as torch
        x = ((x - mean) * jax.lax.rsqrt(var + self.eps)).reshape(B, H, W, C)
        scale = self.param("scale", nn.initializers.ones, (C,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (C,), jnp.float32)
        return (x * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


class Conv(nn.Module):
    """A 2-D convolution on NHWC maps, with ``nn.Conv``'s parameters: "kernel" [k, k, C_in, C_out]
    (HWIO) and "bias" [C_out].

    y[b, i, j, o] = bias[o] + sum_{di, dj, c} x_pad[b, s*i + di, s*j + dj, c] * kernel[di, dj, c, o]

    One ``lax.conv_general_dilated`` (cuDNN on GPU, XLA's own kernel on CPU). Faster CPU kernels
    were tried (``benchmarks/conv_ab.py``): a 1x1 kernel as a matmul gained nothing (XLA already
    runs it as one), and small 3x3 maps as an im2col matmul gained 10-14% but crashed XLA's CPU
    compiler in CI, so they are not used (benchmarks/RESULTS.md).
    """
    features: int
    kernel_size: int = 3
    stride: int = 1
    padding: tuple = ((1, 1), (1, 1))  # ((top, bottom), (left, right))
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BHWC):
        k, s = self.kernel_size, self.stride
        C_in = x_BHWC.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, C_in, self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        x_BHWC, kernel, bias = x_BHWC.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype)
        y_BHWO = _lax_conv(x_BHWC, kernel, s, self.padding)
        return y_BHWO + bias


def _lax_conv(x_BHWC, kernel_kkIO, stride: int, padding):
    return jax.lax.conv_general_dilated(x_BHWC, kernel_kkIO, (stride, stride), padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def conv3x3(features: int, dtype: Dtype, name: str | None = None, stride: int = 1,
            padding=((1, 1), (1, 1))) -> Conv:
    return Conv(features, 3, stride, tuple(map(tuple, padding)), dtype, name=name)


def conv1x1(features: int, dtype: Dtype, name: str | None = None) -> Conv:
    return Conv(features, 1, 1, ((0, 0), (0, 0)), dtype, name=name)


class ResnetBlock(nn.Module):
    """diffusers' ``ResnetBlock2D`` with ``time_embedding_norm="default"``, no dropout at inference.

    x [B, H, W, C_in], temb [B, T] or None -> [B, H, W, out_channels]
    """
    out_channels: int
    groups: int = 32
    eps: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb=None):
        h = nn.silu(GroupNorm(self.groups, self.eps, self.dtype, name="norm1")(x))
        h = conv3x3(self.out_channels, self.dtype, "conv1")(h)
        if temb is not None:
            # The time embedding shifts every channel: h + Linear(SiLU(temb))[:, None, None, :]
            t = nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = nn.silu(GroupNorm(self.groups, self.eps, self.dtype, name="norm2")(h))
        h = conv3x3(self.out_channels, self.dtype, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = conv1x1(self.out_channels, self.dtype, "shortcut")(x)
        return x + h


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 conv.

    ``pad="same"`` pads one pixel on every side (UNet); ``pad="right"`` pads only right and
    bottom (the VAE encoder, diffusers' ``Downsample2D(padding=0)`` with ``F.pad(x, (0, 1, 0, 1))``).
    """
    channels: int
    pad: str = "same"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BHWC):
        padding = ((1, 1), (1, 1)) if self.pad == "same" else ((0, 1), (0, 1))
        return conv3x3(self.channels, self.dtype, "conv", stride=2, padding=padding)(x_BHWC)


class Upsample(nn.Module):
    """Double H and W by nearest-neighbour repetition, then a 3x3 conv."""
    channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BHWC):
        x = jnp.repeat(jnp.repeat(x_BHWC, 2, axis=1), 2, axis=2)  # [B, 2H, 2W, C]
        return conv3x3(self.channels, self.dtype, "conv")(x)


def attention(q_BTNH, k_BSNH, v_BSNH, *, upcast: bool = False):
    """softmax(Q K^T / sqrt(H)) V for N heads of size H (Vaswani et al., 2017, eq. 1).

    Goes through ``jax.nn.dot_product_attention``, which XLA lowers to cuDNN's fused
    (flash) attention on GPUs where it can; on CPU through :func:`blocked_attention`, the
    same arithmetic in cache-sized blocks. ``upcast`` computes the scores in float32
    (SD 2.1's ``upcast_attention``); the output keeps the input dtype.
    """
    dtype = q_BTNH.dtype
    if upcast:
        q_BTNH, k_BSNH, v_BSNH = (a.astype(jnp.float32) for a in (q_BTNH, k_BSNH, v_BSNH))
    out_BTNH = jax.lax.platform_dependent(q_BTNH, k_BSNH, v_BSNH, cpu=blocked_attention,
                                          default=jax.nn.dot_product_attention)
    return out_BTNH.astype(dtype)


def blocked_attention(q_BTNH, k_BSNH, v_BSNH, block: int = 256):
    """``jax.nn.dot_product_attention``'s arithmetic, one head and ``block`` queries at a time.

    XLA's CPU backend computes all B*N score matrices at once ([B, N, T, S]: 1 GiB of float32
    for SD's self-attention at a 64x64 latent) and streams them through memory several times.
    One [block, S] slice at a time stays in cache: about 9x faster on CPU, on par with
    PyTorch's flash-attention kernel. As in JAX, scores and softmax are float32.
    """
    B, T, N, H = q_BTNH.shape
    S = k_BSNH.shape[1]
    block = min(block, T)
    pad = -T % block  # pad the queries to whole blocks; the padded rows are dropped below
    q_BTNH = jnp.pad(q_BTNH, ((0, 0), (0, pad), (0, 0), (0, 0)))
    G, C = B * N, (T + pad) // block                        # G heads in all, C blocks per head
    q_GCbH = q_BTNH.transpose(0, 2, 1, 3).reshape(G, C, block, H)
    k_GHS = k_BSNH.transpose(0, 2, 3, 1).reshape(G, H, S)
    v_GSH = v_BSNH.transpose(0, 2, 1, 3).reshape(G, S, H)

    def one_head(args):
        q_CbH, k_HS, v_SH = args

        def one_block(q_bH):
            logits_bS = jnp.matmul(q_bH, k_HS, preferred_element_type=jnp.float32) * H ** -0.5
            p_bS = jax.nn.softmax(logits_bS, axis=-1).astype(v_SH.dtype)
            return p_bS @ v_SH
        return jax.lax.map(one_block, q_CbH)

    out_GCbH = jax.lax.map(one_head, (q_GCbH, k_GHS, v_GSH))
    out_BNTH = out_GCbH.reshape(B, N, T + pad, H)[:, :, :T]
    return out_BNTH.transpose(0, 2, 1, 3)


# ---------------------------------------------------------------------------------------------
# Config checks, shared by the config dataclasses: a bad value fails when the config is made,
# naming the field, the value and what is allowed, instead of deep inside a jax initialiser.

MAX_WIDTH = 2**20   # widths, channels, vocabulary sizes: far above any real model's
MAX_DEPTH = 256     # layers, blocks per level, levels: building a model traces each one


def require_positive_int(where: str, name: str, value, at_most: int = MAX_WIDTH) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= at_most:
        raise ValueError(f"{where}: {name}={value!r} must be an integer in [1, {at_most}]")


def require_positive_ints(where: str, name: str, values, at_most: int = MAX_WIDTH) -> None:
    if (not isinstance(values, tuple) or not 1 <= len(values) <= MAX_DEPTH or not all(
            isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= at_most for v in values)):
        raise ValueError(f"{where}: {name}={values!r} must be a non-empty list of integers in [1, {at_most}]")


def require_finite(where: str, name: str, value, *, positive: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (positive and value <= 0):
        raise ValueError(f"{where}: {name}={value!r} must be a finite number{' > 0' if positive else ''}")
