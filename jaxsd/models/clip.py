"""The CLIP text encoder (Radford et al., 2021): a prompt's token ids -> 77 x D embeddings.

Stable Diffusion conditions its UNet on the *per-token* outputs of CLIP's text transformer
(``last_hidden_state``, [B, 77, D]), not on the pooled sentence vector. The architecture is
GPT-2-like: token + learned position embeddings, then pre-LayerNorm transformer blocks with
*causal* self-attention (each token sees only the tokens before it), then a final LayerNorm.

    SD 1.x  CLIP ViT-L/14 text tower      12 layers, D = 768,  12 heads, quick_gelu
    SD 2.x  OpenCLIP ViT-H/14 text tower  23 layers, D = 1024, 16 heads, gelu
    SDXL    CLIP ViT-L/14 (as SD 1.x) and OpenCLIP ViT-bigG/14: 32 layers, D = 1280, 20 heads,
            gelu, with a projection of the pooled output (``text_projection``, no bias)

Matches ``transformers.CLIPTextModel`` and ``CLIPTextModelWithProjection`` (checked in
``tests/test_clip.py``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsd.models.layers import MAX_DEPTH, require_finite, require_positive_int

Dtype = Any

# hidden_act -> activation. quick_gelu is OpenAI CLIP's sigmoid approximation x * sigmoid(1.702 x);
# gelu is the exact erf form (OpenCLIP, so SD 2.x).
ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408               # CLIP's BPE vocabulary (256 bytes x 2 + 48,894 merges + 2)
    hidden_size: int = 768                # D, the width of every token embedding
    intermediate_size: int = 3072         # the MLP's hidden width, 4 D
    num_hidden_layers: int = 12
    num_attention_heads: int = 12         # head size = D / heads = 64
    max_position_embeddings: int = 77     # CLIP's context length
    hidden_act: str = "quick_gelu"        # "quick_gelu" (OpenAI CLIP) or "gelu" (OpenCLIP)
    layer_norm_eps: float = 1e-5
    bos_token_id: int = 49406             # <|startoftext|>
    eos_token_id: int = 49407             # <|endoftext|>; 2 in legacy configs (see pooled output)
    pad_token_id: int = 1
    # CLIPTextModelWithProjection (SDXL's second encoder): pooled [B, D] -> text_embeds [B, P].
    # projection_dim alone says nothing (SD 1.x's CLIPTextModel config has 768 too): the
    # config's "architectures" decides, in from_dict.
    with_projection: bool = False
    projection_dim: int = 768

    def __post_init__(self):
        where = "CLIP text config"
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                     "max_position_embeddings", "projection_dim"):
            require_positive_int(where, name, getattr(self, name))
        require_positive_int(where, "num_hidden_layers", self.num_hidden_layers, at_most=MAX_DEPTH)
        require_finite(where, "layer_norm_eps", self.layer_norm_eps, positive=True)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < self.vocab_size:
                raise ValueError(f"{where}: {name}={value!r} must be a token id in [0, vocab_size={self.vocab_size})")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"CLIP config: hidden_act={self.hidden_act!r} is not supported; "
                             f"choose one of {sorted(ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"CLIP config: hidden_size={self.hidden_size} is not divisible by "
                             f"num_attention_heads={self.num_attention_heads}")

    @classmethod
    def from_dict(cls, config: dict) -> "CLIPTextConfig":
        """From a transformers ``CLIPTextConfig`` ``config.json`` (unknown keys are bookkeeping)."""
        if "text_config" in config:  # a full CLIPModel config: take its text tower
            config = config["text_config"]
        names = {f.name for f in dataclasses.fields(cls)} - {"with_projection"}
        with_projection = "CLIPTextModelWithProjection" in (config.get("architectures") or ())
        if not with_projection:  # projection_dim means nothing without the projection
            names.discard("projection_dim")
        return cls(**{k: v for k, v in config.items() if k in names}, with_projection=with_projection)


class TextOutput(NamedTuple):
    last_hidden_state: jax.Array      # [B, T, D], after the final LayerNorm
    pooler_output: jax.Array          # [B, D], last_hidden_state at each prompt's EOS token
    hidden_states: tuple | None       # num_layers + 1 arrays [B, T, D]: embeddings, then each layer
                                      # (the last one before the final LayerNorm)
    text_embeds: jax.Array | None = None  # [B, P] the projected pooled output (with_projection)


class SelfAttention(nn.Module):
    """Multi-head causal self-attention (Vaswani et al., 2017)."""
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BTD):
        B, T, D = x_BTD.shape
        N = self.config.num_attention_heads
        H = D // N
        q_BTNH, k_BTNH, v_BTNH = (
            nn.Dense(D, dtype=self.dtype, name=name)(x_BTD).reshape(B, T, N, H)
            for name in ("query", "key", "value"))
        # Causal: token t attends to tokens 0..t. softmax(q k^T / sqrt(H)) v.
        out_BTNH = jax.nn.dot_product_attention(q_BTNH, k_BTNH, v_BTNH, is_causal=True)
        return nn.Dense(D, dtype=self.dtype, name="out")(out_BTNH.reshape(B, T, D))


class MLP(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BTD):
        h_BTF = nn.Dense(self.config.intermediate_size, dtype=self.dtype, name="fc1")(x_BTD)
        h_BTF = ACTIVATIONS[self.config.hidden_act](h_BTF)
        return nn.Dense(self.config.hidden_size, dtype=self.dtype, name="fc2")(h_BTF)


class EncoderLayer(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BTD):
        eps = self.config.layer_norm_eps
        x_BTD = x_BTD + SelfAttention(self.config, self.dtype, name="attn")(
            nn.LayerNorm(eps, dtype=self.dtype, name="norm1")(x_BTD))
        x_BTD = x_BTD + MLP(self.config, self.dtype, name="mlp")(
            nn.LayerNorm(eps, dtype=self.dtype, name="norm2")(x_BTD))
        return x_BTD


class CLIPTextModel(nn.Module):
    """input_ids [B, T] (T <= 77) -> :class:`TextOutput`."""
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32  # compute dtype; the parameters keep the dtype they were loaded in

    @nn.compact
    def __call__(self, input_ids_BT, output_hidden_states: bool = False) -> TextOutput:
        cfg = self.config
        B, T = input_ids_BT.shape
        if T > cfg.max_position_embeddings:
            raise ValueError(f"input_ids has {T} tokens per prompt; this CLIP text encoder takes at most "
                             f"max_position_embeddings={cfg.max_position_embeddings}")
        token_embedding = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, name="token_embedding")
        position_embedding = self.param("position_embedding", nn.initializers.normal(0.01),
                                        (cfg.max_position_embeddings, cfg.hidden_size))
        x_BTD = token_embedding(input_ids_BT) + position_embedding[:T].astype(self.dtype)

        hidden_states = [x_BTD]
        for i in range(cfg.num_hidden_layers):
            x_BTD = EncoderLayer(cfg, self.dtype, name=f"layers_{i}")(x_BTD)
            hidden_states.append(x_BTD)
        last_BTD = nn.LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, name="final_norm")(x_BTD)

        # The pooled output is the final state at the end-of-text token, found as transformers
        # finds it: configs older than transformers PR #24773 say eos_token_id=2 (SD 2.x's
        # OpenCLIP among them) and take the position of the largest id, since <|endoftext|> is
        # the largest id in CLIP's vocabulary; newer configs take the first eos_token_id.
        if cfg.eos_token_id == 2:
            eos_B = jnp.argmax(input_ids_BT, axis=-1)
        else:
            eos_B = jnp.argmax(input_ids_BT == cfg.eos_token_id, axis=-1)
        pooled_BD = last_BTD[jnp.arange(B), eos_B]
        embeds_BP = None
        if cfg.with_projection:  # CLIPTextModelWithProjection: text_embeds = W pooled
            embeds_BP = nn.Dense(cfg.projection_dim, use_bias=False, dtype=self.dtype,
                                 name="text_projection")(pooled_BD)
        return TextOutput(last_BTD, pooled_BD, tuple(hidden_states) if output_hidden_states else None,
                          embeds_BP)
