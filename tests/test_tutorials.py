"""Every tutorial runs, offline, on the built-in model, and its own checks pass (each tutorial
asserts that what it computes by hand matches the library)."""
import subprocess
import sys
from pathlib import Path

import pytest

TUTORIALS = sorted((Path(__file__).parents[1] / "tutorials").glob("*.py"))


@pytest.fixture(scope="module")
def started(request, tmp_path_factory):
    """Every selected tutorial, started at once in its own folder. Most of a tutorial's time is
    XLA compiling, which keeps about one core busy, so on a small machine they finish together
    in much less time than one after another."""
    selected = [item.callspec.params["script"] for item in request.session.items
                if item.module is request.module and hasattr(item, "callspec")]
    runs = {}
    for script in selected:
        cwd = tmp_path_factory.mktemp(script.stem)
        with open(cwd / "stdout.txt", "w") as out, open(cwd / "stderr.txt", "w") as err:
            runs[script] = cwd, subprocess.Popen([sys.executable, str(script)], cwd=cwd, stdout=out,
                                                 stderr=err)
    yield runs
    for _, process in runs.values():
        if process.poll() is None:
            process.kill()


def test_there_are_tutorials():
    assert TUTORIALS, "tutorials/*.py: none found"


@pytest.mark.parametrize("script", TUTORIALS, ids=lambda p: p.name)
def test_tutorial_runs(script, started):
    cwd, process = started[script]
    returncode = process.wait(timeout=900)
    stdout, stderr = (cwd / "stdout.txt").read_text(), (cwd / "stderr.txt").read_text()
    assert returncode == 0, stdout[-2000:] + stderr[-4000:]
    assert list((cwd / "outputs").glob("*.png")), "a tutorial writes its images to outputs/"
