"""Data parallel: a batch split over every device, equal to the one-device images.

The devices are 8 simulated CPU devices (``--xla_force_host_platform_device_count=8``), which
JAX fixes when it starts: so the checks run in one fresh Python process and report back in JSON.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import json, os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, numpy as np, jaxsd
    from jaxsd.sampling import loop

    pipe = jaxsd.StableDiffusion.from_pretrained("tiny-shapes")
    devices = jax.devices()
    report = {"devices": len(devices), "diffs": {}}
    calls = []
    jitted = loop._sample_jit
    def spy(*args, **kwargs):            # records the sampling program's arguments and output
        out = jitted(*args, **kwargs)
        calls.append((args, kwargs, out))
        return out
    loop._sample_jit = spy

    def run(n, kind, B, sampler, seed=1, **kw):
        pipe.devices = devices[:n]
        prompt = "a red circle on blue"
        common = dict(batch_size=B, num_steps=5, scheduler=sampler, seed=seed, **kw)
        if kind == "txt2img":
            return pipe.text_to_image(prompt, **common)
        image = pipe.text_to_image("a blue square on red", num_steps=5, seed=9)[0]
        if kind == "img2img":
            return pipe.image_to_image(image, prompt, strength=0.6, **common)
        mask = np.zeros((64, 64), np.float32); mask[16:48, 16:48] = 1
        return pipe.inpaint(image, mask, prompt, **common)

    cases = [("txt2img", 1, "euler", 8), ("txt2img", 8, "euler", 8),   # 1, 2, 3, 8 images, both kinds
             ("txt2img", 2, "euler_a", 8), ("txt2img", 3, "euler_a", 8)]
    cases += [("txt2img", 3, "euler_a", n) for n in (2, 4)]
    cases += [("img2img", 3, "dpmpp_2m", 8), ("inpaint", 3, "euler_a", 8)]
    cases += [("txt2img", 10, "euler_a", 8)]                    # 8 devices, padded to 16
    for kind, B, sampler, n in cases:
        one, many = run(1, kind, B, sampler), run(n, kind, B, sampler)
        report["diffs"][f"{kind} B={B} {sampler} {n} devices"] = [
            list(many.shape), list(one.shape), int(np.abs(many.astype(int) - one).max()),
            float(np.asarray(one, float).std())]
    for kind in ("txt2img", "inpaint"):                         # one seed per image
        one, many = run(1, kind, 3, "euler_a", seed=[4, 8, 5]), run(8, kind, 3, "euler_a", seed=[4, 8, 5])
        report["diffs"][f"{kind} seeds [4, 8, 5] euler_a 8 devices"] = [
            list(many.shape), list(one.shape), int(np.abs(many.astype(int) - one).max()),
            float(np.asarray(one, float).std())]
    one, many = run(1, "txt2img", 3, "dpmpp_2m", progress=True), run(8, "txt2img", 3, "dpmpp_2m", progress=True)
    report["diffs"]["progress bar, B=3 dpmpp_2m 8 devices"] = [
        list(many.shape), list(one.shape), int(np.abs(many.astype(int) - one).max()),
        float(np.asarray(one, float).std())]
    # SDXL: the pooled text and size numbers are split with the text (a tiny random SDXL folder)
    import sys
    xl = jaxsd.StableDiffusion.from_pretrained(sys.argv[2])
    def xl_run(n):
        xl.devices = devices[:n]
        return xl.text_to_image(["a red circle", "a blue square", "a cross"], negative_prompt="blurry",
                                num_steps=4, seed=[1, 2, 3], original_size=(128, 96))
    one, many = xl_run(1), xl_run(8)
    report["diffs"]["SDXL B=3 euler 8 devices"] = [
        list(many.shape), list(one.shape), int(np.abs(many.astype(int) - one).max()),
        float(np.asarray(one, float).std())]

    # The latents are split: the sampling program's output, and its work per device.
    run(8, "txt2img", 8, "euler")
    args, kwargs, out = calls[-1]
    report["sharding"] = [str(out.latents.sharding.spec), len(out.latents.sharding.device_set),
                          [list(s.data.shape) for s in out.latents.addressable_shards]]
    flops = lambda a, k: jitted.lower(*a, **k).compile().cost_analysis()["flops"]
    many_flops = flops(args, kwargs)
    run(1, "txt2img", 8, "euler")
    report["flops_ratio"] = flops(*calls[-1][:2]) / many_flops

    # No recompilation across calls: new seeds and prompts, the same batch.
    pipe.devices = devices
    pipe.text_to_image("a red cross", batch_size=3, num_steps=5, scheduler="euler", seed=5)
    report["mesh_sizes"] = [len(calls[-1][2].latents.sharding.device_set)]
    before = jitted._cache_size()
    for seed, prompt in ((6, "a green circle"), (7, "a big square")):
        pipe.text_to_image(prompt, batch_size=3, num_steps=5, scheduler="euler", seed=seed)
    report["new_programs"] = jitted._cache_size() - before

    # The command: a batch and a prompts file, drawn 8 images per call on the 8 devices.
    import sys
    from jaxsd.cli import main
    out = sys.argv[1]
    report["cli"] = [main(["generate", "a red circle on blue", "--batch", "3", "--steps", "5",
                           "--seed", "11", "--scheduler", "euler_a", "--out", out + "/batch"]),
                     main(["generate", "--prompts", out + "/prompts.txt", "--steps", "5",
                           "--scheduler", "euler_a", "--out", out + "/prompts"])]
    print("REPORT " + json.dumps(report))
""")


PROMPTS = "a red circle on blue\n{\"prompt\": \"a green cross\", \"seed\": 40}\na big yellow square\n"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from pipeline_reference import save_xl_checkpoint
    folder = tmp_path_factory.mktemp("parallel")
    (folder / "prompts.txt").write_text(PROMPTS)
    save_xl_checkpoint(folder / "sdxl", seed=2)
    return folder


@pytest.fixture(scope="module")
def report(folder):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(folder), str(folder / "sdxl")], capture_output=True, text=True,
                         env=env, timeout=1200)
    assert out.returncode == 0, out.stderr[-4000:]
    line = [l for l in out.stdout.splitlines() if l.startswith("REPORT ")][-1]
    return json.loads(line[len("REPORT "):])


def test_images_equal_the_one_device_run(report):
    """1, 2, 3, 8 and 10 images on 8 devices (3 on 2 and 4), deterministic and stochastic
    samplers, img2img, 4-channel inpainting (its after-step paste), per-image seeds, the
    progress-bar loop and an SDXL batch (its pooled text and size numbers split too): within 1/255 of the single-device images, same shape (padding dropped)."""
    assert report["devices"] == 8
    assert len(report["diffs"]) == 13
    for case, (many, one, diff, spread) in report["diffs"].items():
        assert many == one, case
        assert diff <= 1, f"{case}: images differ by {diff}/255"
        assert spread > 10, f"{case}: a flat image proves nothing"


def test_the_latents_are_split_over_the_devices(report):
    spec, n, shards = report["sharding"]
    assert spec == "P('batch',)" and n == 8
    assert shards == [[1, 16, 16, 4]] * 8   # 8 images, one per device (tiny-shapes: 64 px / 4)
    # each device computes its share, not the whole batch: per-device work / 8 (within 10%)
    assert report["flops_ratio"] > 7.2, report["flops_ratio"]


def test_the_command_draws_the_one_device_pictures(report, folder, tmp_path):
    """`jaxsd generate --batch 3` and `--prompts` on 8 devices (one call for all the images):
    the same files, pixel for pixel within 1/255, as on this process's one device."""
    import numpy as np
    from PIL import Image

    from jaxsd.cli import main

    assert report["cli"] == [0, 0]
    assert main(["generate", "a red circle on blue", "--batch", "3", "--steps", "5", "--seed", "11",
                 "--scheduler", "euler_a", "--out", str(tmp_path / "batch")]) == 0
    assert main(["generate", "--prompts", str(folder / "prompts.txt"), "--steps", "5",
                 "--scheduler", "euler_a", "--out", str(tmp_path / "prompts")]) == 0
    for sub, count in (("batch", 3), ("prompts", 3)):
        names = sorted(p.name for p in (tmp_path / sub).glob("*.png"))
        assert sorted(p.name for p in (folder / sub).glob("*.png")) == names and len(names) == count
        for name in names:
            a, b = (np.asarray(Image.open(f / sub / name)).astype(int) for f in (folder, tmp_path))
            assert np.abs(a - b).max() <= 1, name
            assert Image.open(folder / sub / name).text == Image.open(tmp_path / sub / name).text


def test_no_recompilation_across_calls(report):
    assert report["mesh_sizes"] == [3]   # 3 images use 3 of the 8 devices: no padding rows
    assert report["new_programs"] == 0


# ---------------------------------------------------------------------------------------------
# One seed per image: how a batch (split over devices or not) draws each image as if alone.

@pytest.fixture(scope="module")
def tiny():
    import jaxsd
    return jaxsd.StableDiffusion.from_pretrained("tiny-shapes")


@pytest.mark.parametrize("kind", ["txt2img", "img2img", "inpaint"])
def test_a_seed_list_draws_each_image_as_a_batch_of_one(tiny, kind):
    """seed=[5, 6, 7]: image b equals the one-image call with seed 5 + b, with a stochastic
    sampler (per-image sampler noise), img2img's and inpainting's encodings (per-image posterior
    samples) included; within 1/255, and not equal to a batch drawn from seed 5 alone."""
    import numpy as np

    prompts = ["a red circle on blue", "a green cross on yellow", "a small square on white"]
    image = tiny.text_to_image("a blue square on red", num_steps=4, seed=9)[0]
    mask = np.zeros((64, 64), np.float32)
    mask[16:48, 16:48] = 1

    def draw(prompt, seed):
        kw = dict(num_steps=5, scheduler="euler_a", seed=seed)
        if kind == "txt2img":
            return tiny.text_to_image(prompt, **kw)
        if kind == "img2img":
            return tiny.image_to_image(image, prompt, strength=0.7, **kw)
        return tiny.inpaint(image, mask, prompt, **kw)

    batch = draw(prompts, [5, 6, 7])
    for b, (prompt, seed) in enumerate(zip(prompts, [5, 6, 7])):
        alone = draw(prompt, seed)[0]
        assert np.abs(batch[b].astype(int) - alone).max() <= 1, (kind, b)
    one_seed = draw(prompts, 5)
    assert np.abs(one_seed[1:].astype(int) - batch[1:]).max() > 20  # the list did something


def test_a_seed_list_must_fit_the_batch(tiny):
    with pytest.raises(ValueError, match="seed has 2 entries for a batch of 3 images"):
        tiny.text_to_image("a red circle", batch_size=3, num_steps=2, seed=[1, 2])
    with pytest.raises(ValueError, match=r"seed=-1 must be in \[0, 2\*\*64 - 1\]"):
        tiny.text_to_image("a red circle", batch_size=2, num_steps=2, seed=[1, -1])
    with pytest.raises(ValueError, match="seed=\\[\\] has no seed"):
        tiny.text_to_image("a red circle", num_steps=2, seed=[])
