"""The jaxsd command."""
import re
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
    # TCD's gamma goes in as --eta and is recorded
    assert main(argv[:8] + ["--scheduler", "tcd", "--eta", "0.3", "--seed", "1", "--size", "64x64",
                            "--out", str(tmp_path / "tcd")]) == 0
    fields = Image.open(next((tmp_path / "tcd").glob("*.png"))).text["parameters"].splitlines()[-1]
    assert fields.startswith("Steps: 2, Sampler: TCD, CFG scale: 7.5, Seed: 1,") and fields.endswith(", Eta: 0.3")
    # a named schedule is applied and recorded
    assert main(argv[:8] + ["--scheduler", "dpmpp_2m", "--schedule", "sgm_uniform", "--seed", "1",
                            "--size", "64x64", "--out", str(tmp_path / "sgm")]) == 0
    fields = Image.open(next((tmp_path / "sgm").glob("*.png"))).text["parameters"].splitlines()[-1]
    assert fields.startswith("Steps: 2, Sampler: DPM++ 2M,") and fields.endswith(", Schedule type: sgm_uniform")


def test_info(sd1_folder, capsys):
    assert main(["info", sd1_folder]) == 0
    out = capsys.readouterr().out
    assert "prediction type: epsilon" in out and "default scheduler: pndm (PNDMScheduler)" in out
    assert "architecture: custom (text width 32)" in out and "unet " in out
    assert "samplers: ddim, ddpm, pndm, lms, euler" in out and "refused" not in out


def test_info_names_the_samplers_the_built_in_model_refuses(capsys):
    """tiny-shapes has a zero-terminal-SNR schedule: info lists the nine samplers that run it,
    then the eight whose diffusers class cannot, and why."""
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "samplers: ddim, ddpm, euler, euler_a, dpmpp_2m, dpmpp_2m_sde, unipc, lcm, tcd\n" in out
    assert ("samplers refused for this model's schedule: pndm, lms, heun, dpm2, dpm2_a, dpmpp_2s, "
            "dpmpp_sde, deis\n") in out
    assert "rescale_betas_zero_snr" in out


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


# ---------------------------------------------------------------------------------------------
# Mistakes are answered before the model loads; interrupts and failed writes leave nothing behind.

import pytest  # noqa: E402


@pytest.mark.parametrize("extra, message", [
    (["--scheduler", "eular"], "--scheduler 'eular' is not a sampler; did you mean 'euler'?"),
    (["--steps", "0"], "--steps 0: must be at least 1"),
    (["--batch", "0"], "--batch 0: must be at least 1"),
    (["--guidance", "nan"], "--guidance nan: must be a finite number"),
    (["--seed", "-2"], "--seed -2: must be in [0, 2**64 - 1], or -1 for a random seed"),
    (["--seed", str(2**64)], "must be in [0, 2**64 - 1]"),
    (["--size", "100x64"], "--size 100x64: width 100 must be a positive multiple of 16 for this model (the VAE "
                           "turns 4 x 4 pixels into one latent and the UNet halves the latent side 2 times: 4 x 4 = 16)"),
    (["--size", "64x100000"], "--size 64x100000: height 100000 must be a positive multiple of 16"),
    (["--eta", "1.5", "--scheduler", "tcd"], "--eta 1.5: must be in [0, 1]"),
    (["--schedule", "uniform"], "--schedule 'uniform' is not a schedule; choose one of ['default', 'karras'"),
    (["--schedule", "ays", "--steps", "20"], "--schedule ays is Align Your Steps' 10-step schedule; pass --steps 10"),
    (["--schedule", "simple", "--karras"], "--karras and --schedule simple ask for two schedules"),
    (["--eta", "0.3", "--scheduler", "euler"], "--eta 0.3 is ddim's eta or tcd's gamma; pass --scheduler ddim or tcd"),
    (["--refiner-switch", "0.7"], "--refiner-switch 0.7 needs --refiner MODEL"),
    (["--refiner", "x", "--refiner-switch", "1.0"], "--refiner-switch 1.0: must be strictly between 0 and 1"),
])
def test_generate_mistakes_are_reported_before_the_model_loads(monkeypatch, tmp_path, capsys, extra, message):
    import jaxsd.cli

    monkeypatch.setattr(jaxsd.cli, "_load", lambda args: pytest.fail("the model was loaded"))
    assert main(["generate", "a red circle", "--out", str(tmp_path)] + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxsd generate: error: ") and message in err, err


def test_img2img_mistakes_are_reported_before_the_model_loads(monkeypatch, tmp_path, capsys):
    import jaxsd.cli
    from PIL import Image

    monkeypatch.setattr(jaxsd.cli, "_load", lambda args: pytest.fail("the model was loaded"))
    picture, not_a_picture, a_file = tmp_path / "in.png", tmp_path / "notes.png", tmp_path / "afile"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(picture)
    not_a_picture.write_text("hello")
    a_file.write_text("")
    for argv, message in (
            ([str(tmp_path / "missing.png"), "x"], "missing.png': no such file"),
            ([str(not_a_picture), "x"], "notes.png' is not an image PIL can read"),
            ([str(picture), "x", "--strength", "1.5"], "--strength 1.5: must be in (0, 1]"),
            ([str(picture), "x", "--out", str(a_file)], "afile' is a file, not a folder"),
            ([str(picture), "x", "--out", str(a_file / "sub")], "cannot write there")):
        assert main(["img2img"] + argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("jaxsd img2img: error: ") and message in err, (argv, err)


def test_seed_minus_one_draws_a_random_seed_and_records_it(sd1_folder, tmp_path):
    from PIL import Image

    assert main(["generate", "a red cube", "--model", sd1_folder, "--steps", "1", "--size", "64x64",
                 "--seed", "-1", "--out", str(tmp_path)]) == 0
    (written,) = tmp_path.glob("*.png")
    seed = int(written.stem.split("-", 1)[1])
    assert seed >= 0 and f"Seed: {seed}," in Image.open(written).text["parameters"]


def test_a_failed_write_leaves_no_file(monkeypatch, tmp_path):
    from pathlib import Path

    from jaxsd.cli import save_png

    real = Path.write_bytes

    def disk_full(self, data):
        real(self, data[:len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_png(np.zeros((8, 8, 3), np.uint8), tmp_path, 1, "params")
    assert list(tmp_path.iterdir()) == []


def test_writes_without_hard_links(monkeypatch, tmp_path):
    """On a filesystem without hard links (FAT, some network drives) the PNG is written with an
    exclusive create: same bytes, never overwriting, and a failed write leaves no partial file."""
    import errno

    from PIL import Image

    from jaxsd.cli import save_png

    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    image = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
    linked = save_png(image, tmp_path / "linked", 1, "params")
    monkeypatch.setattr("os.link", no_links)
    first = save_png(image, tmp_path, 1, "params")
    second = save_png(image, tmp_path, 1, "params")
    assert (first.name, second.name) == ("00000-1.png", "00001-1.png")
    assert first.read_bytes() == second.read_bytes() == linked.read_bytes()
    np.testing.assert_array_equal(np.asarray(Image.open(first)), image)

    def disk_full(fd):   # the bytes are in the file; the disk refuses to keep them
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("os.fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_png(image, tmp_path, 1, "params")
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["00000-1.png", "00001-1.png"]


def test_ctrl_c_stops_sampling_at_once_and_writes_nothing(tmp_path):
    """SIGINT while a 1,000-step run samples: exit 130 within seconds, one line, no PNG."""
    import signal
    import time

    argv = ["jaxsd", "generate", "a red circle on blue", "--steps", "1000", "--batch", "8",
            "--scheduler", "euler", "--out", str(tmp_path)]
    # `python -m jaxsd`, with Ctrl-C raising KeyboardInterrupt as in a terminal (a shell's
    # background job, as CI may be, starts with SIGINT ignored, and Python then leaves it so).
    launcher = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                f"sys.argv = {argv!r}; runpy.run_module('jaxsd', run_name='__main__')")
    proc = subprocess.Popen([sys.executable, "-c", launcher], stderr=subprocess.PIPE, text=True)
    seen = ""
    while not re.search(r"[1-9]\d*/1000", seen):    # compiled, and the steps run
        chunk = proc.stderr.read(1)
        assert chunk, f"the command ended before sampling: {seen}"
        seen += chunk
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    start = time.monotonic()
    rest = proc.communicate(timeout=60)[1]
    waited = time.monotonic() - start
    assert proc.returncode == 130, seen + rest
    assert rest.strip().splitlines()[-1] == "jaxsd generate: interrupted"
    assert "Traceback" not in rest, rest
    assert waited < 5, f"took {waited:.1f} s to stop"
    assert list(tmp_path.glob("*.png")) == []


def test_a_batch_gives_each_image_its_own_seed_which_regenerates_it(sd1_folder, tmp_path):
    from PIL import Image

    common = ["generate", "a red cube", "--model", sd1_folder, "--steps", "2", "--size", "64x64"]
    assert main(common + ["--seed", "5", "--batch", "2", "--out", str(tmp_path / "batch")]) == 0
    first, second = sorted((tmp_path / "batch").glob("*.png"))
    assert (first.name, second.name) == ("00000-5.png", "00001-6.png")
    assert "Seed: 6," in Image.open(second).text["parameters"]
    assert "Batch size: 2, Batch pos: 1" in Image.open(second).text["parameters"]
    assert main(common + ["--seed", "6", "--out", str(tmp_path / "alone")]) == 0
    (alone,) = (tmp_path / "alone").glob("*.png")
    np.testing.assert_array_equal(np.asarray(Image.open(alone)), np.asarray(Image.open(second)))


def test_samplers_command_lists_each_with_what_its_diffusers_class_can_do(capsys):
    """`jaxsd samplers`: one row per sampler; its Karras and zero-terminal-SNR columns are what
    its diffusers class's config offers, its order diffusers' default `solver_order` (LMS: the
    default `order` of its step), its evaluations the plan's."""
    import inspect

    import diffusers

    from jaxsd import sampling

    assert main(["samplers"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {cells[0]: cells for cells in (line.strip("| ").split(" | ") for line in lines[2:])}
    assert list(rows) == list(sampling.SAMPLERS)
    for name, (_, scheduler, order, evals, _, karras, zero_snr, options) in rows.items():
        config = getattr(diffusers, scheduler.split("(")[0])().config
        assert karras == ("yes" if "use_karras_sigmas" in config else "no"), name
        assert zero_snr == ("yes" if "rescale_betas_zero_snr" in config else "no"), name
        assert int(evals) == sampling.make_plan(name, 25, sampling.SD1_CONFIG).timesteps.shape[0], name
        if "solver_order" in config:
            assert int(order) == config["solver_order"], name
    lms_order = inspect.signature(diffusers.LMSDiscreteScheduler.step).parameters["order"].default
    assert rows["lms"][2] == str(lms_order) and rows["heun"][3] == "49"
    # the options column: what each plan accepts (TCD has LCM's config keys but uses fewer)
    assert rows["ddim"][7] == "eta, thresholding, clip_sample"
    assert rows["euler"][7] == "exponential/beta sigmas, timesteps=, sigmas=, s_churn"
    assert rows["lcm"][7] == "thresholding, clip_sample, timesteps=, original_inference_steps, timestep_scaling"
    assert rows["tcd"][7] == "eta (its gamma), timesteps=, original_inference_steps"


def test_samplers_command_refuses_a_step_count_out_of_range(capsys):
    assert main(["samplers", "--steps", "0"]) == 2
    assert "--steps 0" in capsys.readouterr().err
