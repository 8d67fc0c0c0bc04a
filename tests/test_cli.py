"""The jaxsd command."""
import subprocess
import sys

import numpy as np

from jaxsd.cli import main


def test_tokenize(capsys):
    assert main(["tokenize", "a photograph of an astronaut riding a horse"]) == 0
    ids, tokens = capsys.readouterr().out.splitlines()
    assert ids == "49406 320 8853 539 550 18376 6765 320 4558 49407"
    assert tokens.split()[:3] == ["<|startoftext|>", "a</w>", "photograph</w>"]


def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "jaxsd", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("jaxsd ")


# ---------------------------------------------------------------------------------------------
# generate / info on a tiny random checkpoint (built by tests/pipeline_reference.py)
from pipeline_reference import sd1_folder  # noqa: E402,F401


def test_generate_writes_pngs_with_parameters_and_never_overwrites(sd1_folder, tmp_path, capsys):
    from PIL import Image

    argv = ["generate", "a red cube", "--model", sd1_folder, "--negative", "blurry", "--steps", "2",
            "--scheduler", "euler", "--karras", "--seed", "42", "--size", "64x64", "--out", str(tmp_path)]
    assert main(argv) == 0
    assert main(argv) == 0  # the same seed again: a second file, the first untouched
    out = capsys.readouterr().out
    written = sorted(tmp_path.glob("*.png"))
    assert [p.name for p in written] == ["00000-42.png", "00001-42.png"]
    assert f"wrote {written[0]}" in out
    png = Image.open(written[0])
    assert png.size == (64, 64)
    prompt, negative, fields = png.text["parameters"].splitlines()
    assert prompt == "a red cube" and negative == "Negative prompt: blurry"
    assert fields == f"Steps: 2, Sampler: Euler Karras, CFG scale: 7.5, Seed: 42, Size: 64x64, Model: {sd1_folder.rstrip('/').split('/')[-1]}"
    assert (np.asarray(png) == np.asarray(Image.open(written[1]))).all()


def test_info(sd1_folder, capsys):
    assert main(["info", sd1_folder]) == 0
    out = capsys.readouterr().out
    assert "prediction type: epsilon" in out and "default scheduler: pndm (PNDMScheduler)" in out
    assert "architecture: custom (text width 32)" in out and "unet " in out


def test_img2img_command(sd1_folder, tmp_path, capsys):
    from PIL import Image

    picture = tmp_path / "in.png"
    Image.fromarray(np.full((64, 64, 3), 120, np.uint8)).save(picture)
    assert main(["img2img", str(picture), "a red cube", "--model", sd1_folder, "--steps", "2",
                 "--strength", "0.5", "--seed", "1", "--out", str(tmp_path / "out")]) == 0
    written = tmp_path / "out" / "00000-1.png"
    assert f"wrote {written}" in capsys.readouterr().out
    assert "Denoising strength: 0.5" in Image.open(written).text["parameters"]


def test_inpaint_command(sd1_folder, tmp_path, capsys):
    from PIL import Image

    picture, mask = tmp_path / "in.png", tmp_path / "mask.png"
    Image.fromarray(np.full((64, 64, 3), 120, np.uint8)).save(picture)
    m = np.zeros((64, 64), np.uint8)
    m[:32] = 255
    Image.fromarray(m).save(mask)
    assert main(["inpaint", str(picture), str(mask), "a red cube", "--model", sd1_folder, "--steps", "2",
                 "--seed", "1", "--out", str(tmp_path / "out")]) == 0
    written = tmp_path / "out" / "00000-1.png"
    assert f"wrote {written}" in capsys.readouterr().out
    assert Image.open(written).text["parameters"].startswith("a red cube\nSteps: 2, ")


def test_bad_model_is_a_message_not_a_traceback(tmp_path, capsys):
    assert main(["generate", "a red circle", "--model", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxsd generate: error: model ") and "Traceback" not in err
    assert "neither a built-in model (tiny-shapes), an existing folder or file, nor a Hugging Face Hub id" in err


def test_train_tiny_command_stops_and_resumes(tmp_path, capsys):
    from jaxsd.training import loop as train_loop
    args = ["train-tiny", str(tmp_path), "--preset", "smoke", "--stage", "vae", "--stop-after", "2"]
    assert main(args) == 0
    assert train_loop.saved_step(tmp_path, "vae") == 2
    assert main(args) == 0  # resumes where it stopped
    assert train_loop.saved_step(tmp_path, "vae") == 4
