"""jaxsd's CLIP text encoder against transformers.CLIPTextModel (PyTorch), and the tokenizer.

Both sides load the same random weights: the reference model is built from a config,
every parameter is re-randomised (LayerNorm scales too, so no layer is an identity), saved
with ``save_pretrained`` and read back by ``jaxsd.load_clip_text``.

Tolerance (float32): max |ours - reference| <= 1e-4 x the reference's largest magnitude, for
``last_hidden_state``, ``pooler_output`` and every hidden state. Measured: 2e-7 (tiny),
1.7e-6 (SD 1.x), 2.2e-6 (SD 2.x) relative.
bfloat16 under jit: max error <= 5% of the output's largest magnitude, mean error <= 1%
(bfloat16 keeps 8 bits of mantissa, 0.4% per rounding; measured on SD 1.x: 1.7% max, 0.2% mean).
"""
import json
import logging
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import jaxsd
from jaxsd.checkpoints.convert import ConversionError
from jaxsd.checkpoints.files import CheckpointError
from jaxsd.checkpoints.tokenizer import load_tokenizer, tokenize

PROMPTS = ["a photograph of an astronaut riding a horse", "a red circle",
           "an oil painting of a lighthouse on a cliff at dawn, storm clouds, dramatic light"]

CONFIGS = {
    # A tiny encoder with the post-PR-#24773 eos id (first <|endoftext|> is pooled).
    "tiny": dict(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
                 hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=1),
    # SD 1.x: OpenAI CLIP ViT-L/14 text tower, as in SD 1.5's text_encoder/config.json (legacy eos 2).
    "sd1": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                hidden_act="quick_gelu", projection_dim=768, bos_token_id=0, eos_token_id=2, pad_token_id=1),
    # SD 2.x: OpenCLIP ViT-H/14 text tower as diffusers ships it (23 of its 24 layers, gelu).
    "sd2": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                hidden_act="gelu", projection_dim=512, bos_token_id=0, eos_token_id=2, pad_token_id=1),
}


def randomize_(module: torch.nn.Module, seed: int = 0):
    """Re-draw every parameter so no layer is an identity (norm scales around 1, not 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "layer_norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            elif name.endswith("bias") or "layer_norm" in name:
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.02 * noise * (3 if "embedding" in name else 1))


def save_reference(folder, name, seed=0, **save_kwargs):
    config = transformers.CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **CONFIGS[name])
    model = transformers.CLIPTextModel(config).eval()
    randomize_(model, seed)
    model.save_pretrained(folder, **save_kwargs)
    return model


def token_ids(pad_token: str | None = None):
    tokenizer = load_tokenizer()
    if pad_token is not None:  # SD 2.x's tokenizer pads with "!" (id 0)
        tokenizer.pad_token = pad_token
    return tokenize(tokenizer, PROMPTS)


def reference_outputs(model, ids):
    with torch.no_grad():
        out = model(torch.from_numpy(ids).long(), output_hidden_states=True)
    return (out.last_hidden_state.numpy(), out.pooler_output.numpy(),
            [h.numpy() for h in out.hidden_states])


def assert_close(ours, ref, rel=1e-4, what=""):
    ours = np.asarray(ours, np.float32)
    scale = np.abs(ref).max()
    err = np.abs(ours - ref).max()
    assert err <= rel * scale, f"{what}: max abs error {err:.3g} > {rel} x scale {scale:.3g}"


@pytest.mark.parametrize("name,pad_token", [("tiny", None), ("sd1", None), ("sd2", "!")])
def test_matches_transformers(tmp_path, name, pad_token):
    reference = save_reference(tmp_path, name)
    ids = token_ids(pad_token)
    if pad_token == "!":
        assert (ids == 0).any()  # the legacy eos_token_id=2 path pools at argmax(ids), not at a pad
    last, pooled, hidden = reference_outputs(reference, ids)
    del reference

    model, params = jaxsd.load_clip_text(tmp_path)
    out = jax.jit(model.apply, static_argnames="output_hidden_states")(
        {"params": params}, ids, output_hidden_states=True)
    assert out.last_hidden_state.shape == (3, 77, CONFIGS[name]["hidden_size"])
    assert len(out.hidden_states) == len(hidden) == CONFIGS[name]["num_hidden_layers"] + 1
    assert_close(out.last_hidden_state, last, what="last_hidden_state")
    assert_close(out.pooler_output, pooled, what="pooler_output")
    for i, (h_ours, h_ref) in enumerate(zip(out.hidden_states, hidden)):
        assert_close(h_ours, h_ref, what=f"hidden_states[{i}]")


# SDXL's second encoder: OpenCLIP ViT-bigG as transformers' CLIPTextModelWithProjection (the real
# size, 32 x 1280, is checked in TestSDXLEncoder). A projection narrower than the width, so that a
# transposed projection cannot pass the shape check.
WITH_PROJECTION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
                       hidden_act="gelu", projection_dim=24, pad_token_id=1)


def save_with_projection(folder, seed=0, **config):
    config = transformers.CLIPTextConfig(vocab_size=49408, max_position_embeddings=77,
                                         **{**WITH_PROJECTION, **config})
    model = transformers.CLIPTextModelWithProjection(config).eval()
    randomize_(model, seed)
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("eos", [2, 49407])  # SDXL's configs say 2 (legacy pooling at argmax(ids))
def test_with_projection_matches_transformers(tmp_path, eos):
    reference = save_with_projection(tmp_path, bos_token_id=49406 if eos != 2 else 0, eos_token_id=eos)
    ids = token_ids("!")  # tokenizer_2 of SDXL pads with "!" (id 0)
    with torch.no_grad():
        ref = reference(torch.from_numpy(ids).long(), output_hidden_states=True)
    model, params = jaxsd.load_clip_text(tmp_path)
    assert model.config.with_projection and params["text_projection"]["kernel"].shape == (32, 24)
    out = jax.jit(model.apply, static_argnames="output_hidden_states")(
        {"params": params}, ids, output_hidden_states=True)
    assert out.text_embeds.shape == (3, 24)
    assert_close(out.text_embeds, ref.text_embeds.numpy(), what="text_embeds")
    assert_close(out.last_hidden_state, ref.last_hidden_state.numpy(), what="last_hidden_state")
    # SDXL conditions on the penultimate layer's output, without the final LayerNorm
    assert_close(out.hidden_states[-2], ref.hidden_states[-2].numpy(), what="hidden_states[-2]")


# SDXL's text_encoder_2/config.json (stabilityai/stable-diffusion-xl-base-1.0): OpenCLIP ViT-bigG/14.
SDXL_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                 hidden_act="gelu", projection_dim=1280, bos_token_id=0, eos_token_id=2, pad_token_id=1)


def test_sdxl_bigg_at_its_real_config():
    """The real bigG (694M parameters), converted in memory: hidden states, pooled, projected."""
    from jaxsd.checkpoints.components import build_clip_text
    config = transformers.CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **SDXL_BIGG,
                                         architectures=["CLIPTextModelWithProjection"])
    reference = transformers.CLIPTextModelWithProjection(config).eval()
    randomize_(reference, seed=3)
    ids = token_ids("!")[:2]
    with torch.no_grad():
        ref = reference(torch.from_numpy(ids).long(), output_hidden_states=True)
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    del reference
    model, params = build_clip_text(config.to_dict(), state)
    del state
    out = jax.jit(model.apply, static_argnames="output_hidden_states")(
        {"params": params}, ids, output_hidden_states=True)
    assert len(out.hidden_states) == 33
    assert_close(out.text_embeds, ref.text_embeds.numpy(), what="text_embeds")
    assert_close(out.pooler_output, ref.last_hidden_state.numpy()[np.arange(2), ids.argmax(-1)],
                 what="pooled")
    for i in (1, 16, -2, -1):
        assert_close(out.hidden_states[i], ref.hidden_states[i].numpy(), what=f"hidden_states[{i}]")


def test_projection_key_written_beside_text_model(tmp_path):
    from safetensors.numpy import load_file
    from jaxsd.checkpoints import convert
    save_with_projection(tmp_path)
    _, params = jaxsd.load_clip_text(tmp_path)
    state = convert.to_reference(params, convert.CLIP_TEXT)
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert "text_projection.weight" in state and set(state) <= set(saved) | {"text_model." + k for k in saved}
    np.testing.assert_array_equal(state["text_projection.weight"], saved["text_projection.weight"])
    # a plain CLIPTextModel config (SD 1.x says projection_dim too) builds no projection
    config = json.loads((tmp_path / "config.json").read_text())
    config["architectures"] = ["CLIPTextModel"]
    assert not jaxsd.models.clip.CLIPTextConfig.from_dict(config).with_projection


def test_bfloat16_close_to_float32(tmp_path):
    save_reference(tmp_path, "sd1")
    ids = token_ids()
    model32, params32 = jaxsd.load_clip_text(tmp_path)
    model16, params16 = jaxsd.load_clip_text(tmp_path, dtype=jnp.bfloat16)
    assert jax.tree.leaves(params16)[0].dtype == jnp.bfloat16
    ref = np.asarray(jax.jit(model32.apply)({"params": params32}, ids).last_hidden_state)
    out = jax.jit(model16.apply)({"params": params16}, ids).last_hidden_state
    assert out.dtype == jnp.bfloat16
    err = np.abs(np.asarray(out, np.float32) - ref)
    scale = np.abs(ref).max()
    assert np.isfinite(err).all()
    assert err.max() <= 0.05 * scale and err.mean() <= 0.01 * scale, (err.max() / scale, err.mean() / scale)


def test_sharded_and_fp16_variant(tmp_path):
    reference = save_reference(tmp_path / "sharded", "tiny", max_shard_size="1MB")
    assert list((tmp_path / "sharded").glob("*.index.json"))
    ids = token_ids()
    last = reference_outputs(reference, ids)[0]
    reference.half().save_pretrained(tmp_path / "fp16", variant="fp16")  # .half() is in place
    assert (tmp_path / "fp16" / "model.fp16.safetensors").is_file()

    model, params = jaxsd.load_clip_text(tmp_path / "sharded")
    assert_close(model.apply({"params": params}, ids).last_hidden_state, last)
    # fp16 weights read and upcast to float32: the only error is fp16's rounding of the weights.
    model, params = jaxsd.load_clip_text(tmp_path / "fp16", variant="fp16")
    assert jax.tree.leaves(params)[0].dtype == jnp.float32
    assert_close(model.apply({"params": params}, ids).last_hidden_state, last, rel=1e-2)
    with pytest.raises(CheckpointError, match="no weights file for variant 'fp16'"):
        jaxsd.load_clip_text(tmp_path / "sharded", variant="fp16")


def test_pickle_only_with_opt_in(tmp_path):
    reference = save_reference(tmp_path, "tiny")
    torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"arbitrary code.*allow_pickle=True"):
        jaxsd.load_clip_text(tmp_path)
    model, params = jaxsd.load_clip_text(tmp_path, allow_pickle=True)
    ids = token_ids()
    assert_close(model.apply({"params": params}, ids).last_hidden_state, reference_outputs(reference, ids)[0])


def test_loading_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        jaxsd.load_clip_text(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="has no config.json"):
        jaxsd.load_clip_text(tmp_path)

    save_reference(tmp_path / "ok", "tiny")
    broken = tmp_path / "no_weights"
    shutil.copytree(tmp_path / "ok", broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights file"):
        jaxsd.load_clip_text(broken)

    config = json.loads((tmp_path / "ok" / "config.json").read_text())
    bad_act = tmp_path / "bad_act"
    shutil.copytree(tmp_path / "ok", bad_act)
    (bad_act / "config.json").write_text(json.dumps({**config, "hidden_act": "swiglu"}))
    with pytest.raises(ValueError, match=r"hidden_act='swiglu'.*\['gelu', 'quick_gelu'\]"):
        jaxsd.load_clip_text(bad_act)


def _rewrite_weights(folder, edit):
    from safetensors.numpy import load_file, save_file
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors")


def test_conversion_errors_list_every_key(tmp_path):
    save_reference(tmp_path, "tiny")

    def damage(t):
        t["encoder.layers.1.mlp.fc1.weight"] = t["encoder.layers.1.mlp.fc1.weight"][:, :7]
        del t["final_layer_norm.bias"]
        t["encoder.layers.0.mlp.fc3.weight"] = np.zeros((2, 2), np.float32)
        t["text_projection.weight"] = np.zeros((2, 2), np.float32)

    _rewrite_weights(tmp_path, damage)
    with pytest.raises(ConversionError) as info:
        jaxsd.load_clip_text(tmp_path)
    message = str(info.value)
    assert "encoder.layers.1.mlp.fc1.weight -> layers_1/mlp/fc1/kernel" in message
    assert "checkpoint (7, 37)" in message and "model (32, 37)" in message
    assert "final_norm/bias" in message and "missing" in message
    assert "encoder.layers.0.mlp.fc3.weight" in message and "text_projection.weight" in message


def test_position_ids_buffer_is_known(tmp_path):
    """Older transformers saved the position_ids buffer; it is listed as ignored, not unexpected."""
    save_reference(tmp_path, "tiny")
    _rewrite_weights(tmp_path, lambda t: t.update(
        {"text_model.embeddings.position_ids": np.arange(77, dtype=np.int64)[None]}))
    jaxsd.load_clip_text(tmp_path)


def test_keys_saved_by_older_transformers(tmp_path):
    """SD checkpoints on the Hub carry transformers 4's "text_model." prefix on every key."""
    reference = save_reference(tmp_path, "tiny")
    _rewrite_weights(tmp_path, lambda t: t.update({f"text_model.{k}": t.pop(k) for k in list(t)}))
    model, params = jaxsd.load_clip_text(tmp_path)
    ids = token_ids()
    assert_close(model.apply({"params": params}, ids).last_hidden_state, reference_outputs(reference, ids)[0])


def test_input_too_long(tmp_path):
    save_reference(tmp_path, "tiny")
    model, params = jaxsd.load_clip_text(tmp_path)
    with pytest.raises(ValueError, match="78 tokens.*max_position_embeddings=77"):
        model.apply({"params": params}, np.zeros((1, 78), np.int32))


# --- the tokenizer ------------------------------------------------------------------------

def test_tokenizer_known_ids():
    tokenizer = load_tokenizer()
    ids = tokenize(tokenizer, "a photograph of an astronaut riding a horse")
    assert ids.shape == (1, 77) and ids.dtype == np.int32
    assert ids[0, :10].tolist() == [49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407]
    assert (ids[0, 10:] == 49407).all()  # padded with <|endoftext|>
    assert len(tokenizer) == 49408


def test_tokenizer_truncation_warns_with_dropped_text(caplog):
    prompt = " ".join(["cat"] * 80) + " dog"
    with caplog.at_level(logging.WARNING, logger="jaxsd.checkpoints.tokenizer"):
        ids = tokenize(load_tokenizer(), [prompt, "short"])
    assert ids.shape == (2, 77) and ids[0, -1] == 49407
    ours = [r for r in caplog.records if r.name == "jaxsd.checkpoints.tokenizer"]
    assert len(ours) == 1  # only the long prompt, not the short one
    assert "truncated" in ours[0].getMessage() and "cat dog" in ours[0].getMessage()


def test_tokenizer_errors(tmp_path):
    with pytest.raises(TypeError, match="prompts must be a string or a list of strings"):
        tokenize(load_tokenizer(), 3)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="not a CLIP tokenizer folder"):
        load_tokenizer(tmp_path)
