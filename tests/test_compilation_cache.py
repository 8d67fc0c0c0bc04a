"""The compilation cache: a second `jaxsd generate` process reads every program back.

Each run is a fresh Python process (JAX decides once per process whether it uses a cache), with
a listener on JAX's own monitoring events counting cache requests and hits.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxsd.cli import main

LAUNCHER = """
import json, sys
from jax import monitoring
counts = {}
monitoring.register_event_listener(lambda event, **kw: counts.__setitem__(event, counts.get(event, 0) + 1))
from jaxsd.cli import main
code = main(sys.argv[1:])
import jax
counts = {k.rsplit("/", 1)[-1]: v for k, v in counts.items() if "compilation_cache" in k}
print(json.dumps(counts | {"dir": jax.config.jax_compilation_cache_dir}))
sys.exit(code)
"""


def run(args, env):
    out = subprocess.run([sys.executable, "-c", LAUNCHER, *args], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture
def env(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("JAXSD_NO_CACHE", "JAX_COMPILATION_CACHE_DIR")}
    return env | {"JAXSD_CACHE_DIR": str(tmp_path / "cache")}


def test_second_process_compiles_nothing(tmp_path, env):
    from PIL import Image

    args = ["generate", "a red circle on blue", "--steps", "4", "--seed", "3", "--scheduler", "euler"]
    cold = run(args + ["--out", str(tmp_path / "cold")], env)
    assert cold["dir"] == str(tmp_path / "cache" / "xla")
    programs = list((tmp_path / "cache" / "xla").iterdir())
    assert cold["cache_misses"] >= 4 and len(programs) == cold["cache_misses"]  # each one written
    warm = run(args + ["--out", str(tmp_path / "warm")], env)
    # every program the command needs is read back, none compiled (the progress bar's included)
    assert warm.get("cache_misses", 0) == 0
    assert warm["cache_hits"] == warm["compile_requests_use_cache"] == cold["compile_requests_use_cache"]
    (a,), (b,) = (tmp_path / "cold").glob("*.png"), (tmp_path / "warm").glob("*.png")
    np.testing.assert_array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))


@pytest.mark.parametrize("how", ["--no-cache", "JAXSD_NO_CACHE=1"])
def test_the_cache_can_be_turned_off(tmp_path, env, how):
    args = ["generate", "a red circle", "--steps", "2", "--out", str(tmp_path / "out")]
    if how == "--no-cache":
        args.append(how)
    else:
        env = env | {"JAXSD_NO_CACHE": "1"}
    counts = run(args, env)
    assert counts["dir"] is None and "cache_hits" not in counts
    assert not (tmp_path / "cache").exists()


def test_an_unusable_cache_folder_is_an_error_naming_it(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.delenv("JAXSD_NO_CACHE")
    monkeypatch.setenv("JAXSD_CACHE_DIR", str(blocker))
    assert main(["generate", "a red circle", "--steps", "2", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"cannot create the compilation cache folder '{blocker}/xla'" in err
    assert "--no-cache" in err and not (tmp_path / "out").exists()
