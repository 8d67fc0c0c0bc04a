"""The built-in tiny-shapes model: it loads offline by name, diffusers draws the same images from the
shipped folder, the command draws what it is asked, and the model card's figures reproduce."""
import json
import re
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline_reference import max_diff, reference_pipeline, to_uint8, torch_noise
from jaxsd import StableDiffusion
from jaxsd.checkpoints.sources import BUILTIN_MODELS
from jaxsd.cli import main
from jaxsd.sampling import default_sampler
from jaxsd.training import shapes
from jaxsd.training.evaluate import judge

FOLDER = BUILTIN_MODELS["tiny-shapes"]
PROMPTS = ["a red circle on a blue background", "a large yellow square on a green background, top left",
           "small white triangle on black, bottom right", "a purple background with an orange cross"]


@pytest.fixture(scope="module")
def tiny():
    return StableDiffusion.from_pretrained("tiny-shapes")


def test_shipped_folder_fits_the_size_budget():
    size = sum(p.stat().st_size for p in FOLDER.rglob("*") if p.is_file())
    assert size <= 25 * 2**20, f"{FOLDER} holds {size / 2**20:.1f} MiB; the budget is 25 MiB"
    assert (FOLDER / "README.md").is_file()


def test_loads_by_name_at_its_native_size(tiny):
    assert tiny.source == "tiny-shapes" and tiny.default_size == 64 and tiny.vae_factor == 4
    assert tiny.info()["parameters"]["unet"] > 0


@pytest.mark.parametrize("guidance", [1.0, 7.5])
def test_diffusers_draws_the_same_images_from_the_shipped_folder(tiny, guidance):
    """Same initial latents, the folder's own scheduler (Euler), 25 steps: within 2/255. diffusers
    takes the folder as it is, with no deprecation warning about (and rewrite of) its config."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = reference_pipeline(str(FOLDER))
    assert not [w for w in caught if "steps_offset" in str(w.message)], "diffusers rewrote the scheduler config"
    nchw, nhwc = torch_noise((len(PROMPTS), 16, 16, 4), seed=3)
    with torch.no_grad():
        ref = to_uint8(pipe(PROMPTS, num_inference_steps=25, guidance_scale=guidance, latents=nchw,
                            output_type="np").images)
    ours = tiny.text_to_image(PROMPTS, num_steps=25, guidance_scale=guidance, latents=nhwc)
    assert ref.shape == ours.shape == (len(PROMPTS), 64, 64, 3)
    assert max_diff(ours, ref) <= 2


# One prompt per shape, each colour at most once, with and without size and position words.
DRAW_PROMPTS = ["a red circle on a blue background", "a yellow square on a purple background, top left",
                "a large white triangle on a black background", "small green cross on orange, bottom right"]


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    """The README's first command, with the built-in default model, for each of DRAW_PROMPTS,
    four seeds each: {prompt: the four PNG paths}."""
    root = tmp_path_factory.mktemp("generate")
    written = {}
    for k, prompt in enumerate(DRAW_PROMPTS):
        out = root / str(k)
        assert main(["generate", prompt, "--seed", "0", "--batch", "4", "--steps", "25", "--out", str(out)]) == 0
        written[prompt] = sorted(out.glob("*.png"))
    return written


def test_generate_with_no_model_writes_images(drawn):
    written = drawn[DRAW_PROMPTS[0]]
    assert len(written) == 4
    png = Image.open(written[0])
    assert png.size == (64, 64) and "Model: tiny-shapes" in png.text["parameters"]


def test_generate_with_no_model_draws_the_prompt(drawn):
    """`jaxsd generate PROMPT` with no model, four seeds per prompt (16 images), judged against
    the issue's goals for the model: colours right in every image, the shape in at least 80%,
    size and position in at least 70% of the images whose prompt names them.

    Per image the model is not perfect (on 32 seeds of "a red circle on a blue background" the
    judge saw a circle in 94%, the rest rounded squares), so a test that every image be right
    would fail on seeds, not on the model; issue 7's model (shapes 16-27%, position at chance)
    fails this one.
    """
    right = {"colours": [], "shape": [], "size": [], "position": []}
    wrong = []
    for prompt, paths in drawn.items():
        asked = shapes.parse_caption(prompt)
        for path in paths:
            j = judge(np.asarray(Image.open(path).convert("RGB")))
            checks = {"colours": (j.fg, j.bg) == (asked.fg, asked.bg), "shape": j.shape == asked.shape}
            if asked.size is not None:
                checks["size"] = j.size == asked.size
            if asked.position is not None:
                checks["position"] = j.position == asked.position
            for name, ok in checks.items():
                right[name].append(ok)
            if not all(checks.values()):
                wrong.append(f"{prompt!r} {path.name}: judged fg {j.fg} bg {j.bg} shape {j.shape} size {j.size} "
                             f"position {j.position}; asked {asked}")
    assert len(right["colours"]) == 16 and len(right["size"]) == len(right["position"]) == 8
    goals = {"colours": 1.0, "shape": 0.8, "size": 0.7, "position": 0.7}
    report = "\n".join(wrong)
    for name, goal in goals.items():
        assert np.mean(right[name]) >= goal, f"{name}: {np.mean(right[name]):.0%} right, goal {goal:.0%}\n{report}"


def test_model_card_figures_reproduce(capsys):
    """`jaxsd evaluate --autoencoder --samplers <the folder's default>` prints the model card's
    rows for the VAE's reconstructions and for the default sampler.

    The figures are exact on one machine; another CPU's float rounding may flip a borderline
    image, so each column may differ by at most one image in 240.
    """
    default = default_sampler(json.loads((FOLDER / "scheduler" / "scheduler_config.json").read_text()))
    card_text = (FOLDER / "README.md").read_text()
    assert main(["evaluate", "--autoencoder", "--samplers", default]) == 0
    printed = capsys.readouterr().out
    for label in (re.escape("(VAE reconstructions of 480 renders)"), default):
        pattern = rf"^\| {label} \| ([\d.]+)% \| ([\d.]+)% \| ([\d.]+)% \| ([\d.]+)% \| ([\d.]+)% \|$"
        card = re.search(pattern, card_text, re.M)
        assert card, f"the model card has no row {label!r} in its quality table"
        measured = re.search(pattern, printed, re.M)
        assert measured, f"jaxsd evaluate printed no row {label!r}"
        for name, a, b in zip(("colours", "shape", "size", "position", "all"), card.groups(), measured.groups()):
            assert abs(float(a) - float(b)) <= 100 / 240 + 0.1, f"{label} {name}: card {a}%, measured {b}%"


def test_evaluate_rejects_unknown_samplers(capsys):
    assert main(["evaluate", "--samplers", "pndm", "nope"]) == 2
    assert "nope" in capsys.readouterr().err


def test_evaluate_refuses_to_score_nothing(capsys):
    assert main(["evaluate", "--samplers", "none"]) == 2
    assert "--autoencoder" in capsys.readouterr().err


def test_evaluate_names_samplers_that_cannot_run_the_schedule(tmp_path, capsys, monkeypatch):
    """A zero-terminal-SNR folder runs only the samplers whose diffusers class has
    rescale_betas_zero_snr: one asked for by name is refused before any work; with "all",
    the others get a row that says why instead of stopping the run half-way."""
    import shutil

    from jaxsd.training import evaluate

    folder = tmp_path / "ztsnr"
    shutil.copytree(FOLDER, folder)
    config_path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config.update(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing")
    config_path.write_text(json.dumps(config))
    assert main(["evaluate", "--model", str(folder), "--samplers", "pndm"]) == 2
    assert "rescale_betas_zero_snr" in capsys.readouterr().err

    ran = []
    fake = evaluate.Scores(240, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
    monkeypatch.setattr(evaluate, "evaluate_pipeline", lambda pipe, name, **kw: ran.append(name) or fake)
    assert main(["evaluate", "--model", str(folder)]) == 0
    rows = {line.split(" | ")[0][2:]: line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")}
    assert sorted(ran) == sorted(["ddim", "ddpm", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_sde", "unipc",
                                  "lcm", "tcd"]), ran
    assert all(rows[name].endswith("| 100.0% | 100.0% | 100.0% | 100.0% | 100.0% |") for name in ran)
    for name in ("pndm", "lms", "heun"):
        assert "not run:" in rows[name] and "rescale_betas_zero_snr" in rows[name], rows[name]
