"""LoRA files against diffusers' load_lora_weights / fuse_lora / set_adapters (with peft), on
random-weight tiny SD 1 and SD 2 folders, with LoRA files written here in each key format.

Tolerances: the UNet's and the text encoder's outputs within 1e-4 of their scale (max |x|), as
every float32 comparison in this suite; images within 2/255. Each comparison first checks that
the LoRA moves the output by far more than the tolerance, so that a LoRA silently not applied
fails.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from pipeline_reference import (PROMPT, max_diff, reference_pipeline, sd1, sd1_folder, sd2,  # noqa: F401
                                sd2_folder, to_uint8, torch_noise)
from jaxsd.adapters import LoraError, read_lora

# Modules a test LoRA adapts: linear and 1x1/3x3/strided convolutions, attention, feed-forward,
# resnet and transformer projections, in down, mid and up blocks; text encoder attention and MLP.
UNET_TARGETS = [
    "down_blocks.0.attentions.0.proj_in",                                   # SD 1: 1x1 conv; SD 2: linear
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
    "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2",
    "down_blocks.0.resnets.0.conv1",                                        # 3x3 (LoCon)
    "down_blocks.0.resnets.0.time_emb_proj",
    "down_blocks.0.downsamplers.0.conv",                                    # 3x3, stride 2
    "mid_block.attentions.0.proj_out",
    "up_blocks.1.resnets.0.conv_shortcut",                                  # 1x1
    "up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_v",
]
TEXT_TARGETS = ["encoder.layers.0.self_attn.q_proj", "encoder.layers.1.self_attn.out_proj",
                "encoder.layers.2.mlp.fc1", "encoder.layers.0.mlp.fc2"]
_PROCESSOR = {"to_q": "to_q_lora", "to_k": "to_k_lora", "to_v": "to_v_lora", "to_out.0": "to_out_lora"}


def factors(module, rank, rng):
    """Random (down, up) for a torch Linear or Conv2d, as float32 NumPy."""
    if isinstance(module, torch.nn.Conv2d):
        kh, kw = module.kernel_size
        down, up = (rank, module.in_channels, kh, kw), (module.out_channels, rank, 1, 1)
    else:
        down, up = (rank, module.in_features), (module.out_features, rank)
    return (rng.standard_normal(down).astype(np.float32) * 0.2,
            rng.standard_normal(up).astype(np.float32) * 0.2)


def write_lora(path, reference, fmt, *, seed=0, alpha=3.0, unet_targets=UNET_TARGETS):
    """A LoRA file for `reference`'s UNet and text encoder in one key format; ranks 1-8.

    fmt: "peft" (with lora_adapter_metadata: lora_alpha, one alpha_pattern entry, rank_pattern),
    "diffusers_old" (no alpha: s = 1), "kohya" (an .alpha per module, the same for all:
    diffusers reads a mixed set differently from kohya-ss and A1111)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors, ranks = {}, {}
    for component, model, targets in (("unet", reference.unet, unet_targets),
                                      ("text_encoder", reference.text_encoder, TEXT_TARGETS)):
        ranks[component] = {}
        for k, name in enumerate(targets):
            rank = 1 + (k + seed) % 8
            ranks[component][name] = rank
            down, up = factors(model.get_submodule(name), rank, rng)
            if fmt == "peft":
                tensors[f"{component}.{name}.lora_A.weight"] = down
                tensors[f"{component}.{name}.lora_B.weight"] = up
            elif fmt == "diffusers_old":
                parent, leaf = name.rsplit(".", 1) if not name.endswith("to_out.0") else (name[:-9], "to_out.0")
                if component == "unet" and leaf in _PROCESSOR:
                    stem = f"unet.{parent}.processor.{_PROCESSOR[leaf]}"
                elif component == "text_encoder":
                    stem = f"text_encoder.text_model.{name}.lora_linear_layer"
                else:
                    stem = f"unet.{name}.lora"
                tensors[f"{stem}.down.weight"], tensors[f"{stem}.up.weight"] = down, up
            else:
                prefix = "lora_unet_" if component == "unet" else "lora_te_text_model_"
                stem = prefix + name.replace(".", "_")
                tensors[f"{stem}.lora_down.weight"] = down.astype(np.float16)   # as kohya-ss saves
                tensors[f"{stem}.lora_up.weight"] = up.astype(np.float16)
                tensors[f"{stem}.alpha"] = np.array(alpha, np.float16)
    metadata = None
    if fmt == "peft":
        config = {}
        for component, r in ranks.items():
            modules = list(r)
            config.update({f"{component}.r": r[modules[0]], f"{component}.lora_alpha": alpha,
                           f"{component}.target_modules": modules,
                           f"{component}.rank_pattern": {m: v for m, v in r.items()},
                           f"{component}.alpha_pattern": {modules[1]: 5.0}})
        metadata = {"lora_adapter_metadata": json.dumps(config)}
    save_file(tensors, str(path), metadata=metadata)
    return str(path)


def unet_inputs(config, seed=0):
    rng = np.random.default_rng(seed)
    sample = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    text = rng.standard_normal((2, 77, 32)).astype(np.float32)
    return sample, np.array([999, 259]), text


def torch_unet(unet, sample, t, text):
    with torch.no_grad():
        out = unet(torch.from_numpy(sample).permute(0, 3, 1, 2), torch.from_numpy(t),
                   encoder_hidden_states=torch.from_numpy(text)).sample
    return out.permute(0, 2, 3, 1).numpy()


def torch_text(text_encoder, ids):
    with torch.no_grad():
        return text_encoder(torch.from_numpy(ids.astype(np.int64))).last_hidden_state.numpy()


def assert_close(ours, theirs, base, label):
    ours, theirs, base = (np.asarray(x, np.float64) for x in (ours, theirs, base))
    scale = np.abs(theirs).max()
    error, moved = np.abs(ours - theirs).max(), np.abs(theirs - base).max()
    print(f"{label}: max error {error:.2e} of scale {scale:.2f}; the LoRA moved it by {moved:.2e}")
    assert moved > 100 * 1e-4 * scale, f"{label}: the LoRA barely changes the output; the test would prove nothing"
    assert error <= 1e-4 * scale, f"{label}: max error {error:.3e} > 1e-4 x {scale:.3f}"


@pytest.mark.parametrize("fmt", ["peft", "diffusers_old", "kohya"])
@pytest.mark.parametrize("version", ["sd1", "sd2"])
def test_merged_lora_matches_fuse_lora(version, fmt, tmp_path, request):
    """with_lora(file, s) == diffusers' load_lora_weights(file) + fuse_lora(lora_scale=s), on the
    UNet and the text encoder outputs."""
    from jaxsd.checkpoints.tokenizer import tokenize

    pipe, folder = request.getfixturevalue(version), request.getfixturevalue(f"{version}_folder")
    ref = reference_pipeline(folder)
    path = write_lora(tmp_path / f"{fmt}.safetensors", ref, fmt, seed=1)
    sample, t, text = unet_inputs(ref.unet.config)
    ids = tokenize(pipe.tokenizer, [PROMPT, "a red circle"])
    base_unet, base_text = torch_unet(ref.unet, sample, t, text), torch_text(ref.text_encoder, ids)

    ref.load_lora_weights(path, adapter_name="a")
    ref.fuse_lora(lora_scale=0.7)
    adapted = pipe.with_lora(path, scale=0.7)
    assert adapted.loras == ((path, 0.7),) and pipe.loras == ()
    ours = adapted.unet.apply({"params": adapted.unet_params}, jnp.asarray(sample), jnp.asarray(t), jnp.asarray(text))
    assert_close(ours, torch_unet(ref.unet, sample, t, text), base_unet, f"{version} {fmt} UNet")
    ours = adapted.text_encoder.apply({"params": adapted.text_params}, jnp.asarray(ids)).last_hidden_state
    assert_close(ours, torch_text(ref.text_encoder, ids), base_text, f"{version} {fmt} text encoder")


def test_two_adapters_match_set_adapters_images(sd1, sd1_folder, tmp_path):
    """Two LoRAs with different scales (diffusers: unfused, set_adapters with weights) draw the
    same images as two with_lora calls."""
    ref = reference_pipeline(sd1_folder)
    a = write_lora(tmp_path / "a.safetensors", ref, "kohya", seed=2, alpha=2.0)
    b = write_lora(tmp_path / "b.safetensors", ref, "peft", seed=3,
                   unet_targets=[m for m in UNET_TARGETS if "resnets" not in m])
    nchw, nhwc = torch_noise((1, 8, 8, 4), 0)
    with torch.no_grad():
        plain = to_uint8(ref(PROMPT, num_inference_steps=5, height=64, width=64, latents=nchw,
                             output_type="np").images)
    ref.load_lora_weights(a, adapter_name="a")
    ref.load_lora_weights(b, adapter_name="b")
    ref.set_adapters(["a", "b"], adapter_weights=[0.6, 1.3])
    with torch.no_grad():
        expected = to_uint8(ref(PROMPT, num_inference_steps=5, height=64, width=64, latents=nchw,
                                output_type="np").images)
    ours = sd1.with_lora(a, 0.6).with_lora(b, 1.3).text_to_image(PROMPT, num_steps=5, height=64, width=64,
                                                                 latents=nhwc)
    print(f"two adapters: max pixel difference {max_diff(ours, expected)}/255; "
          f"the adapters moved diffusers' image by {max_diff(plain, expected)}/255")
    assert max_diff(plain, expected) > 20
    assert max_diff(ours, expected) <= 2


def test_scale_is_traced_inside_jit(sd1, sd1_folder, tmp_path):
    """merge() inside jax.jit: a new scale re-uses the compiled program, and scale 0 gives the
    base weights back."""
    from jaxsd.adapters import lora_deltas, merge
    from jaxsd.checkpoints import convert

    ref = reference_pipeline(sd1_folder)
    updates = read_lora(write_lora(tmp_path / "k.safetensors", ref, "kohya"))
    with pytest.raises(LoraError, match="for the text_encoder, which was not passed"):
        lora_deltas(updates, {"unet": convert.unet_table(sd1.unet.config)}, {"unet": sd1.unet_params})
    deltas = lora_deltas(updates, {"unet": convert.unet_table(sd1.unet.config), "text_encoder": convert.CLIP_TEXT},
                         {"unet": sd1.unet_params, "text_encoder": sd1.text_params})
    compiles = []

    @jax.jit
    def unet_with_lora(params, delta, scale, sample, t, text):
        compiles.append(1)   # runs once per trace
        return sd1.unet.apply({"params": merge(params, [delta], [scale])}, sample, t, text)

    sample, t, text = (jnp.asarray(x) for x in unet_inputs(None))
    outs = [unet_with_lora(sd1.unet_params, deltas["unet"], jnp.float32(s), sample, t, text) for s in (0.0, 0.5, 1.0)]
    assert len(compiles) == 1, f"{len(compiles)} compilations for three scales"
    base = sd1.unet.apply({"params": sd1.unet_params}, sample, t, text)
    np.testing.assert_allclose(np.asarray(outs[0]), np.asarray(base), atol=1e-5)
    merged = sd1.with_lora(updates, 0.5)
    np.testing.assert_allclose(np.asarray(outs[1]),
                               np.asarray(sd1.unet.apply({"params": merged.unet_params}, sample, t, text)),
                               atol=1e-5)
    assert np.abs(np.asarray(outs[2]) - np.asarray(outs[1])).max() > 1e-2


def test_a_lora_for_another_model_is_refused_with_its_keys(sd1, tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "sdxl.safetensors"
    save_file({"lora_unet_down_blocks_1_attentions_0_transformer_blocks_5_attn1_to_q.lora_down.weight":
               np.zeros((4, 640), np.float32),
               "lora_unet_down_blocks_1_attentions_0_transformer_blocks_5_attn1_to_q.lora_up.weight":
               np.zeros((640, 4), np.float32)}, str(path))
    with pytest.raises(LoraError, match=r"match no module.*\n.*transformer_blocks_5_attn1_to_q\.lora_down"):
        sd1.with_lora(path)


def test_wrong_shapes_and_unsupported_types_are_refused(sd1, tmp_path):
    from safetensors.numpy import save_file

    stem = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    path = tmp_path / "big.safetensors"
    save_file({f"{stem}.lora_A.weight": np.zeros((4, 320), np.float32),
               f"{stem}.lora_B.weight": np.zeros((320, 4), np.float32)}, str(path))
    with pytest.raises(LoraError, match=r"wrong shape.*\n.*update \(320, 320\) for .*attn1\.to_q, whose weight is \(32, 32\)"):
        sd1.with_lora(path)
    path = tmp_path / "loha.safetensors"
    save_file({"lora_unet_conv_in.hada_w1_a": np.zeros((4, 4), np.float32)}, str(path))
    with pytest.raises(LoraError, match=r"hada_w1_a.*LoHa"):
        read_lora(path)
    path = tmp_path / "half.safetensors"
    save_file({f"{stem}.lora_A.weight": np.zeros((4, 32), np.float32)}, str(path))
    with pytest.raises(LoraError, match="has no up weight"):
        read_lora(path)
    path = tmp_path / "other.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": np.zeros((4,), np.float32)}, str(path))
    with pytest.raises(LoraError, match="not LoRA keys jaxsd knows"):
        read_lora(path)
    with pytest.raises(LoraError, match=r"\.safetensors only"):
        read_lora(tmp_path / "x.pt")
    with pytest.raises(ValueError, match="scale=nan"):
        sd1.with_lora(read_lora(tmp_path / "big.safetensors"), float("nan"))


def test_generate_command_merges_loras_and_records_them_as_automatic1111_does(sd1, sd1_folder, tmp_path, capsys):
    """`jaxsd generate --lora a.safetensors:0.6 --lora b.safetensors` draws what with_lora draws,
    and writes `<lora:name:scale>` into the recorded prompt and `Lora hashes` (AUTOMATIC1111's
    short hash: SHA-256 of the tensor data after the safetensors header)."""
    import hashlib

    from PIL import Image

    from jaxsd.cli import main

    ref = reference_pipeline(sd1_folder)
    a = write_lora(tmp_path / "a.safetensors", ref, "kohya", seed=2)
    b = write_lora(tmp_path / "b.safetensors", ref, "peft", seed=3)
    argv = ["generate", "a red cube", "--model", sd1_folder, "--steps", "2", "--seed", "4", "--size", "64x64",
            "--lora", f"{a}:0.6", "--lora", b, "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    png = Image.open(next((tmp_path / "out").glob("*.png")))
    expected = sd1.with_lora(a, 0.6).with_lora(b, 1.0).text_to_image("a red cube", num_steps=2, height=64,
                                                                      width=64, seed=4)[0]
    assert max_diff(np.asarray(png.convert("RGB")), expected) == 0
    prompt, fields = png.text["parameters"].splitlines()
    assert prompt == "a red cube <lora:a:0.6> <lora:b:1>"

    def short_hash(path):
        data = open(path, "rb").read()
        return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]
    assert fields.endswith(f', Lora hashes: "a: {short_hash(a)}, b: {short_hash(b)}"')

    # a LoRA for another model: refused with its keys, nothing written
    from safetensors.numpy import save_file
    other = tmp_path / "sdxl.safetensors"
    save_file({"lora_unet_down_blocks_2_attentions_0_proj_in.lora_down.weight": np.zeros((4, 1280), np.float32),
               "lora_unet_down_blocks_2_attentions_0_proj_in.lora_up.weight": np.zeros((1280, 4), np.float32)},
              str(other))
    capsys.readouterr()
    assert main(argv[:-4] + ["--lora", str(other), "--out", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxsd generate: error: --lora sdxl: ") and "lora_unet_down_blocks_2_attentions_0_proj_in" in err
    assert not list((tmp_path / "none").glob("*.png"))
    assert main(argv[:-4] + ["--lora", str(tmp_path / "missing.safetensors:0.5")]) == 2
    assert "missing.safetensors is not a file" in capsys.readouterr().err


def test_bfloat16_and_damaged_files(sd1, tmp_path):
    """A LoRA stored in bfloat16 (safetensors' NumPy reader cannot read it) reads through the
    checkpoints' reader, exactly; a truncated file is refused as damaged."""
    import safetensors.torch

    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    down, up = torch.randn(4, 32).bfloat16(), torch.randn(32, 4).bfloat16()
    path = tmp_path / "bf16.safetensors"
    safetensors.torch.save_file({f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up,
                                 f"{stem}.alpha": torch.tensor(2.0)}, str(path))
    (update,) = read_lora(path)
    expected = (up.float() @ down.float()).numpy() * 0.5
    np.testing.assert_allclose(update.delta(), expected, rtol=1e-6, atol=1e-6)
    sd1.with_lora(path)                                        # lands on its weight
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(LoraError, match="damaged or incomplete"):
        read_lora(cut)


def test_per_component_scales_match_set_adapters_dict(sd1, sd1_folder, tmp_path):
    """with_lora(path, {"unet": 0.4, "text_encoder": 1.5}) == diffusers' set_adapters with the
    per-component dict, on both outputs; bad keys and values are refused."""
    from jaxsd.checkpoints.tokenizer import tokenize

    ref = reference_pipeline(sd1_folder)
    path = write_lora(tmp_path / "k.safetensors", ref, "kohya", seed=4)
    sample, t, text = unet_inputs(None)
    ids = tokenize(sd1.tokenizer, [PROMPT])
    base_unet, base_text = torch_unet(ref.unet, sample, t, text), torch_text(ref.text_encoder, ids)
    ref.load_lora_weights(path, adapter_name="a")
    ref.set_adapters(["a"], adapter_weights=[{"unet": 0.4, "text_encoder": 1.5}])
    ours = sd1.with_lora(path, {"unet": 0.4, "text_encoder": 1.5})
    assert ours.loras == ((path, {"unet": 0.4, "text_encoder": 1.5}),)
    out = ours.unet.apply({"params": ours.unet_params}, jnp.asarray(sample), jnp.asarray(t), jnp.asarray(text))
    assert_close(out, torch_unet(ref.unet, sample, t, text), base_unet, "UNet at 0.4")
    out = ours.text_encoder.apply({"params": ours.text_params}, jnp.asarray(ids)).last_hidden_state
    assert_close(out, torch_text(ref.text_encoder, ids), base_text, "text encoder at 1.5")
    with pytest.raises(ValueError, match=r"unknown component\(s\) \['vae'\]; the keys are 'unet' and 'text_encoder'"):
        sd1.with_lora(path, {"vae": 1.0})
    with pytest.raises(ValueError, match="must be a real number, or a dict of them"):
        sd1.with_lora(path, {"unet": "high"})


def test_peft_metadata_without_lora_alpha_gets_pefts_default(sd1, sd1_folder, tmp_path):
    """A PEFT file whose metadata leaves lora_alpha out: diffusers builds peft's LoraConfig from
    the metadata as written, so alpha is LoraConfig's default 8 (s = 8 / r), not r."""
    from safetensors.numpy import save_file

    ref = reference_pipeline(sd1_folder)
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    down, up = factors(ref.unet.get_submodule(name), 4, np.random.default_rng(0))
    path = tmp_path / "no_alpha.safetensors"
    save_file({f"unet.{name}.lora_A.weight": down, f"unet.{name}.lora_B.weight": up}, path,
              metadata={"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.target_modules": [name]})})
    sample, t, text = unet_inputs(ref.unet.config)
    base = torch_unet(ref.unet, sample, t, text)
    ref.load_lora_weights(path, adapter_name="a")
    ref.fuse_lora(lora_scale=1.0)
    adapted = sd1.with_lora(path, scale=1.0)
    assert [u.alpha for u in read_lora(path)] == [8.0]
    ours = adapted.unet.apply({"params": adapted.unet_params}, jnp.asarray(sample), jnp.asarray(t), jnp.asarray(text))
    assert_close(ours, torch_unet(ref.unet, sample, t, text), base, "PEFT metadata without lora_alpha")
