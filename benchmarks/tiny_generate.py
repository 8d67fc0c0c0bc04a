"""Cold and warm starts with the built-in tiny-shapes model: one image from a fresh process,
jaxsd vs diffusers.

    python benchmarks/tiny_generate.py [--repeats 3] [--steps 50]

jaxsd: the `jaxsd generate "a red circle on a blue background" --seed 0` command itself
(import, load, compile, 50 steps of the folder's own sampler with guidance, decode, PNG), twice:
"cold" with an empty compilation cache folder every run (what a first run pays, writing the
cache included), "warm" with the folder a previous run filled (every later run).
diffusers: a Python process that imports diffusers, loads the same folder with
`StableDiffusionPipeline.from_pretrained`, and runs the same prompt, steps and guidance at
64 x 64, then saves a PNG. Each run is a fresh process
(no warm caches but the OS's file cache, warmed by one untimed run each); runs alternate. The
median wall time of the repeats and the ratio are printed, with the load average before.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

PROMPT = "a red circle on a blue background"

DIFFUSERS = """
import sys, torch, diffusers
from jaxsd.checkpoints.sources import BUILTIN_MODELS
pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(BUILTIN_MODELS["tiny-shapes"]),
    torch_dtype=torch.float32, safety_checker=None, requires_safety_checker=False)
pipe.set_progress_bar_config(disable=True)
image = pipe(sys.argv[1], num_inference_steps=int(sys.argv[2]), guidance_scale=7.5,
             generator=torch.Generator().manual_seed(0)).images[0]
image.save(sys.argv[3] + "/diffusers.png")
"""


def run(cmd, cache: str | None = None) -> float:
    env = {k: v for k, v in os.environ.items() if k != "JAXSD_NO_CACHE"}
    if cache is not None:
        env["JAXSD_CACHE_DIR"] = cache
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=50)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as out:
        jaxsd_cmd = ["jaxsd", "generate", PROMPT, "--seed", "0", "--steps", str(args.steps), "--out", out]
        diffusers_cmd = [sys.executable, "-c", DIFFUSERS, PROMPT, str(args.steps), out]
        print(f"load average before: {os.getloadavg()[0]:.2f}")
        warm = os.path.join(out, "warm-cache")
        run(jaxsd_cmd, warm), run(diffusers_cmd)  # warm the file cache; fill the compilation cache
        times = {"jaxsd cold": [], "jaxsd warm": [], "diffusers": []}
        for i in range(args.repeats):
            times["jaxsd cold"].append(run(jaxsd_cmd, os.path.join(out, f"cold-cache-{i}")))
            times["jaxsd warm"].append(run(jaxsd_cmd, warm))
            times["diffusers"].append(run(diffusers_cmd))
    for name, ts in times.items():
        print(f"{name:10s} median {statistics.median(ts):.1f} s  (all: {', '.join(f'{t:.1f}' for t in ts)})")
    for name in ("jaxsd cold", "jaxsd warm"):
        ratio = statistics.median(times[name]) / statistics.median(times["diffusers"])
        print(f"{name} / diffusers: {ratio:.2f}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
