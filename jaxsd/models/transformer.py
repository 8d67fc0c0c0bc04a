"""The UNet's spatial transformer: self-attention over pixels, cross-attention to the text.

diffusers' ``Transformer2DModel`` (continuous input) with its ``BasicTransformerBlock``s, as
Stable Diffusion uses it (Rombach et al., 2022, sec. 3.3 and appendix):

    x [B, H, W, C] -> GroupNorm -> proj_in -> [B, H*W, C]
                   -> depth x TransformerBlock(., text [B, S, D])
                   -> proj_out -> [B, H, W, C] -> + x

    TransformerBlock:  h = h + SelfAttention(LayerNorm(h))
                       h = h + CrossAttention(LayerNorm(h), text)
                       h = h + GEGLU feed-forward(LayerNorm(h))

``proj_in``/``proj_out`` are 1x1 convolutions in SD 1.x checkpoints and linear layers in SD 2.x
(``use_linear_projection``). On [B, H*W, C] tokens both are the same matrix product, so the model
always uses a Dense layer and the converter reshapes SD 1.x's (O, I, 1, 1) conv kernels.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jaxsd.models.layers import Dtype, GroupNorm, attention


class Attention(nn.Module):
    """Multi-head attention (Vaswani et al., 2017) without biases on Q, K, V; with one on the output.

    x [B, T, C], context [B, S, D] or None (self-attention) -> [B, T, C]
    """
    heads: int
    head_dim: int
    upcast: bool = False  # SD 2.1's upcast_attention: scores and softmax in float32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BTC, context_BSD=None):
        B, T, C = x_BTC.shape
        N, H = self.heads, self.head_dim
        context_BSD = x_BTC if context_BSD is None else context_BSD
        S = context_BSD.shape[1]
        dense = lambda name: nn.Dense(N * H, use_bias=False, dtype=self.dtype, name=name)
        q_BTNH = dense("query")(x_BTC).reshape(B, T, N, H)
        k_BSNH = dense("key")(context_BSD).reshape(B, S, N, H)
        v_BSNH = dense("value")(context_BSD).reshape(B, S, N, H)
        out_BTNH = attention(q_BTNH, k_BSNH, v_BSNH, upcast=self.upcast)
        return nn.Dense(C, dtype=self.dtype, name="out")(out_BTNH.reshape(B, T, N * H))


class FeedForward(nn.Module):
    """GEGLU feed-forward (Shazeer, 2020): fc2(a * GELU(g)) with [a, g] = fc1(x), inner width 4C.

    GELU is the exact (erf) one, as torch's ``F.gelu``; JAX's default is the tanh approximation.
    """
    mult: int = 4
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BTC):
        C = x_BTC.shape[-1]
        a_BTF, gate_BTF = jnp.split(nn.Dense(2 * self.mult * C, dtype=self.dtype, name="fc1")(x_BTC), 2, axis=-1)
        return nn.Dense(C, dtype=self.dtype, name="fc2")(a_BTF * nn.gelu(gate_BTF, approximate=False))


class TransformerBlock(nn.Module):
    """diffusers' ``BasicTransformerBlock`` (layer_norm, GEGLU, no dropout): pre-norm residuals."""
    heads: int
    head_dim: int
    upcast: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BTC, context_BSD):
        norm = lambda name: nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, dtype=self.dtype, name=name)
        attn = lambda name: Attention(self.heads, self.head_dim, self.upcast, self.dtype, name=name)
        x_BTC = x_BTC + attn("self_attn")(norm("norm1")(x_BTC))
        x_BTC = x_BTC + attn("cross_attn")(norm("norm2")(x_BTC), context_BSD)
        x_BTC = x_BTC + FeedForward(dtype=self.dtype, name="ff")(norm("norm3")(x_BTC))
        return x_BTC


class SpatialTransformer(nn.Module):
    """diffusers' ``Transformer2DModel`` on a feature map: pixels become tokens and back.

    x [B, H, W, C], context [B, S, D] -> [B, H, W, C]. ``heads`` heads of size ``C // heads``.
    """
    heads: int
    depth: int = 1             # transformer_layers_per_block
    groups: int = 32
    upcast: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BHWC, context_BSD):
        B, H, W, C = x_BHWC.shape
        head_dim = C // self.heads
        inner = self.heads * head_dim  # = C for every SD config
        # The norm's epsilon is fixed at 1e-6 in diffusers, whatever the UNet's norm_eps.
        h = GroupNorm(self.groups, eps=1e-6, dtype=self.dtype, name="norm")(x_BHWC)
        h_BTI = nn.Dense(inner, dtype=self.dtype, name="proj_in")(h.reshape(B, H * W, C))
        for k in range(self.depth):
            h_BTI = TransformerBlock(self.heads, head_dim, self.upcast, self.dtype, name=f"blocks_{k}")(
                h_BTI, context_BSD)
        h_BTC = nn.Dense(C, dtype=self.dtype, name="proj_out")(h_BTI)
        return x_BHWC + h_BTC.reshape(B, H, W, C)
