"""Textual-inversion embeddings against diffusers' load_textual_inversion, on the random-weight
tiny SD 1 folder, with embedding files written here in each format.

Tolerance: the prompt embeddings within 1e-4 of their scale (max |x|); images within 2/255.
"""
import numpy as np
import pytest
import torch

from pipeline_reference import PROMPT, max_diff, reference_pipeline, sd1, sd1_folder, to_uint8, torch_noise  # noqa: F401
from jaxsd.adapters.embeddings import EmbeddingError


def reference_embeds(ref, prompt, negative):
    with torch.no_grad():
        cond, uncond = ref.encode_prompt(prompt, "cpu", 1, True, negative)
    return cond.numpy(), uncond.numpy()


def assert_close(ours, theirs, label):
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    error, scale = np.abs(ours - theirs).max(), np.abs(theirs).max()
    print(f"{label}: max error {error:.2e} of scale {scale:.2f}")
    assert error <= 1e-4 * scale, f"{label}: max error {error:.3e} > 1e-4 x {scale:.3f}"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One file per format, vectors of the tiny text encoder's width (32)."""
    from safetensors.numpy import save_file

    root, rng = tmp_path_factory.mktemp("embeddings"), np.random.default_rng(0)
    vec = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    out = {"diffusers": root / "learned_embeds.safetensors", "single": root / "one.safetensors",
           "a1111": root / "style-x.safetensors", "pt": root / "old.pt"}
    save_file({"<cat-toy>": vec(3, 32)}, str(out["diffusers"]))
    save_file({"<one>": vec(32)}, str(out["single"]))
    save_file({"emb_params": vec(2, 32)}, str(out["a1111"]))
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.from_numpy(vec(2, 32))},
                "name": "old-style", "step": 500}, out["pt"])
    return out


def test_embeddings_match_load_textual_inversion(sd1, sd1_folder, files):
    """Four files (multi-vector, single-vector, A1111 safetensors and .pt), loaded one after the
    other: the tokens get the same ids and the prompts the same embeddings as in diffusers,
    the negative prompt's tokens expanded too."""
    ref = reference_pipeline(sd1_folder)
    ref.load_textual_inversion(str(files["diffusers"]))
    ref.load_textual_inversion(str(files["single"]))
    ref.load_textual_inversion(str(files["a1111"]), token="style-x")
    ref.load_textual_inversion(str(files["pt"]))
    ours = (sd1.with_embedding(files["diffusers"]).with_embedding(files["single"])
            .with_embedding(files["a1111"]).with_embedding(files["pt"], allow_pickle=True))
    assert ours.embeddings == {"<cat-toy>": 3, "<one>": 1, "style-x": 2, "old-style": 2}
    assert sd1.embeddings == {} and len(sd1.tokenizer) == 49408
    for token in ("<cat-toy>", "<cat-toy>_2", "<one>", "style-x_1", "old-style"):
        assert ours.tokenizer.convert_tokens_to_ids(token) == ref.tokenizer.convert_tokens_to_ids(token)
    prompt, negative = "a <cat-toy> on a table, style-x, old-style <one>", "<cat-toy> blurry"
    cond, uncond = reference_embeds(ref, prompt, negative)
    embeds = ours.encode_prompt(prompt, negative)
    assert_close(embeds.cond, cond, "prompt")
    assert_close(embeds.uncond, uncond, "negative prompt")
    plain = sd1.encode_prompt(prompt, negative)   # the embedding words really change the embeddings
    assert np.abs(np.asarray(plain.cond) - cond).max() > 0.1 * np.abs(cond).max()

    nchw, nhwc = torch_noise((1, 8, 8, 4), 0)
    with torch.no_grad():
        expected = to_uint8(ref(prompt, negative_prompt=negative, num_inference_steps=5, height=64, width=64,
                                latents=nchw, output_type="np").images)
    drawn = ours.text_to_image(prompt, negative_prompt=negative, num_steps=5, height=64, width=64, latents=nhwc)
    print(f"images: max pixel difference {max_diff(drawn, expected)}/255")
    assert max_diff(drawn, expected) <= 2


def test_bare_tensor_embedding_matches_load_textual_inversion(sd1, sd1_folder, tmp_path):
    """torch.save(tensor): vectors with no name; diffusers reads it with token=..., and so does
    jaxsd (without a token both refuse)."""
    path = tmp_path / "bare.pt"
    torch.save(torch.from_numpy(np.random.default_rng(1).standard_normal((2, 32)).astype(np.float32)), path)
    ref = reference_pipeline(sd1_folder)
    ref.load_textual_inversion(str(path), token="<bare>")
    ours = sd1.with_embedding(path, token="<bare>", allow_pickle=True)
    assert ours.embeddings == {"<bare>": 2}
    for token in ("<bare>", "<bare>_1"):
        assert ours.tokenizer.convert_tokens_to_ids(token) == ref.tokenizer.convert_tokens_to_ids(token)
    cond, uncond = reference_embeds(ref, "a <bare> house", "")
    assert_close(ours.encode_prompt("a <bare> house", "").cond, cond, "bare tensor prompt")
    with pytest.raises(EmbeddingError, match=r"holds a bare tensor \(2, 32\), with no token name; pass the token"):
        sd1.with_embedding(path, allow_pickle=True)


def test_bad_embeddings_are_refused(sd1, files, tmp_path):
    from safetensors.numpy import save_file

    with pytest.raises(EmbeddingError, match="pickle file.*allow_pickle=True"):
        sd1.with_embedding(files["pt"])
    wide = tmp_path / "wide.safetensors"
    save_file({"<wide>": np.zeros((2, 768), np.float32)}, str(wide))
    with pytest.raises(EmbeddingError, match="width 768, but this text encoder's tokens are 32 wide"):
        sd1.with_embedding(wide)
    with pytest.raises(EmbeddingError, match=r"token\(s\) \['<\|endoftext\|>'\] are already in the tokenizer"):
        sd1.with_embedding(files["single"], token="<|endoftext|>")
    once = sd1.with_embedding(files["diffusers"])
    with pytest.raises(EmbeddingError, match=r"\['<cat-toy>', '<cat-toy>_1', '<cat-toy>_2'\] are already"):
        once.with_embedding(files["diffusers"])
    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"clip_l": np.zeros((1, 768), np.float32), "clip_g": np.zeros((1, 1280), np.float32)}, str(sdxl))
    with pytest.raises(EmbeddingError, match="SDXL embedding"):
        sd1.with_embedding(sdxl)
    with pytest.raises(EmbeddingError, match="no such embedding file"):
        sd1.with_embedding(tmp_path / "missing.safetensors")


def test_generate_command_takes_embeddings(sd1, sd1_folder, files, tmp_path, capsys):
    """`jaxsd generate --embedding FILE[:TOKEN]` draws what with_embedding draws; a pickle file
    is refused before the model loads."""
    from PIL import Image

    from jaxsd.cli import main

    prompt = "a <cat-toy> in style-y"
    argv = ["generate", prompt, "--model", sd1_folder, "--steps", "2", "--seed", "4", "--size", "64x64",
            "--embedding", str(files["diffusers"]), "--embedding", f"{files['a1111']}:style-y",
            "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    png = Image.open(next((tmp_path / "out").glob("*.png")))
    expected = (sd1.with_embedding(files["diffusers"]).with_embedding(files["a1111"], "style-y")
                .text_to_image(prompt, num_steps=2, height=64, width=64, seed=4)[0])
    assert max_diff(np.asarray(png.convert("RGB")), expected) == 0
    assert png.text["parameters"].splitlines()[0] == prompt
    capsys.readouterr()
    assert main(argv[:-4] + ["--embedding", str(files["pt"]), "--out", str(tmp_path / "none")]) == 2
    assert "is a pickle file" in capsys.readouterr().err
