"""Multi-host: two `jax.distributed` processes on this machine split one batch.

Each process has one CPU device; `jaxsd.runtime.initialize_distributed` joins them from the
environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), JAX's CPU collectives
(gloo) gather the images, and both processes must hold the images of one single-process run.
"""
import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np

WORKER = textwrap.dedent("""
    import json, sys
    import numpy as np
    from jaxsd import runtime
    index, count = runtime.initialize_distributed()
    import jax, jaxsd
    from jaxsd.sampling import loop
    jitted, outs = loop._sample_jit, []
    loop._sample_jit = lambda *a, **k: outs.append(jitted(*a, **k)) or outs[-1]
    pipe = jaxsd.StableDiffusion.from_pretrained("tiny-shapes")
    images = pipe.text_to_image(["a red circle on blue", "a green cross on white", "a big square"],
                                num_steps=5, scheduler="euler_a", seed=[3, 4, 5])
    np.save(sys.argv[1] + f"/images-{index}.npy", images)
    latents = outs[-1].latents
    print("REPORT " + json.dumps({"index": index, "count": count, "devices": len(jax.devices()),
                                  "local_rows": [s.data.shape[0] for s in latents.addressable_shards],
                                  "global_rows": latents.shape[0]}))
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_draw_the_single_process_images(tmp_path):
    import jaxsd

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env |= {"JAX_COORDINATOR_ADDRESS": f"localhost:{free_port()}", "JAX_NUM_PROCESSES": "2"}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path)], text=True,
                              env=env | {"JAX_PROCESS_ID": str(i)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    reports = [json.loads([l for l in out.splitlines() if l.startswith("REPORT ")][-1][7:]) for out, _ in outs]
    assert [(r["index"], r["count"], r["devices"]) for r in reports] == [(0, 2, 2), (1, 2, 2)]
    # 3 images padded to 4 rows, 2 in each process: each process computed its own half
    assert [(r["local_rows"], r["global_rows"]) for r in reports] == [([2], 4), ([2], 4)]

    pipe = jaxsd.StableDiffusion.from_pretrained("tiny-shapes")
    single = pipe.text_to_image(["a red circle on blue", "a green cross on white", "a big square"],
                                num_steps=5, scheduler="euler_a", seed=[3, 4, 5])
    assert single.std() > 10
    for i in range(2):   # every process holds the whole batch, equal to the one-process run
        images = np.load(tmp_path / f"images-{i}.npy")
        assert images.shape == single.shape
        assert np.abs(images.astype(int) - single).max() <= 1


def test_the_command_with_distributed_writes_once_from_process_0(tmp_path):
    """`jaxsd generate --distributed --batch 3` in two processes: process 0 writes the three
    PNGs, process 1 none; they are the pictures of a one-process run."""
    from PIL import Image

    from jaxsd.cli import main

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env |= {"JAX_COORDINATOR_ADDRESS": f"localhost:{free_port()}", "JAX_NUM_PROCESSES": "2"}
    args = ["generate", "a red circle on blue", "--batch", "3", "--steps", "5", "--seed", "21",
            "--scheduler", "euler_a", "--distributed"]
    procs = [subprocess.Popen([sys.executable, "-m", "jaxsd", *args, "--out", str(tmp_path / f"p{i}")],
                              env=env | {"JAX_PROCESS_ID": str(i)}, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    written = sorted(p.name for p in (tmp_path / "p0").glob("*.png"))
    assert written == ["00000-21.png", "00001-22.png", "00002-23.png"]
    assert not list((tmp_path / "p1").glob("*.png")) and "wrote" not in outs[1][0]
    assert main(args[:-1] + ["--out", str(tmp_path / "single")]) == 0
    for name in written:
        a, b = (np.asarray(Image.open(tmp_path / d / name)).astype(int) for d in ("p0", "single"))
        assert np.abs(a - b).max() <= 1, name


def test_a_distributed_run_without_its_environment_is_an_error(capsys, monkeypatch):
    from jaxsd.cli import main

    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    assert main(["generate", "a red circle", "--distributed", "--steps", "2"]) == 2
    assert "JAX_NUM_PROCESSES='two' must be an integer" in capsys.readouterr().err
