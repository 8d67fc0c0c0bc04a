"""`jaxsd generate --prompts FILE`: the file's format and errors, and a run interrupted halfway
(Ctrl-C in a real process) that a second run completes: exactly the full set of files, no
duplicate, no partial file, the same images as one uninterrupted run."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from pipeline_reference import sd1_folder  # noqa: F401
from jaxsd.batch import Job, read_prompts
from jaxsd.cli import main


def test_prompt_lines_and_json_lines(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text('a red circle\n\n  {"prompt": "a square", "seed": 7, "negative": "blurry", "size": "32x48"}\n'
                    'a cross\n', encoding="utf-8")
    assert read_prompts(path, seed=10, batch=2, negative="ugly", size=(64, 64)) == [
        Job(1, "a red circle", "ugly", 10, (64, 64)),
        Job(3, "a square", "blurry", 7, (32, 48)),
        Job(4, "a cross", "ugly", 14, (64, 64))]          # the third prompt: 10 + 2 x 2


@pytest.mark.parametrize("line,message", [
    ('{"prompt": "x", "steps": 3}', r"p.txt line 2: unknown key\(s\) \['steps'\]; the keys are \['prompt', 'negative', 'seed', 'size'\]"),
    ('{"prompt": "x",', r"p.txt line 2: not valid JSON"),
    ('{"negative": "x"}', r"line 2: \"prompt\" must be a non-empty string, got None"),
    ('{"prompt": "x", "seed": -3}', r"line 2: \"seed\" must be an integer in \[0, 2\*\*63\), got -3"),
    ('{"prompt": "x", "size": "big"}', r"line 2: size 'big' must be WIDTHxHEIGHT"),
])
def test_bad_lines_are_reported_with_their_number(tmp_path, line, message):
    path = tmp_path / "p.txt"
    path.write_text(f"a fine prompt\n{line}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        read_prompts(path)


def test_command_mistakes_are_reported_before_the_model_loads(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    for argv, message in (
            (["generate"], "no prompt: pass one, or --prompts FILE"),
            (["generate", "x", "--prompts", str(empty)], "pass a prompt or --prompts FILE, not both"),
            (["generate", "--prompts", str(empty)], "no prompts in it"),
            (["generate", "--prompts", str(tmp_path / "none.txt")], "cannot read it"),
            (["generate", "--prompts", str(empty), "--seed", "-1"], "--seed -1 draws a random seed")):
        assert main(argv + ["--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "o")]) == 2
        assert message in capsys.readouterr().err


def _pngs(folder):
    return sorted(p.name for p in folder.iterdir() if p.suffix == ".png")


def test_an_interrupted_run_resumes_to_exactly_the_full_set(sd1_folder, tmp_path):
    prompts = tmp_path / "prompts.txt"
    lines = [f"a photograph of object number {i}" for i in range(16)]
    lines[5] = '{"prompt": "a red circle", "seed": 1000, "size": "128x64"}'
    prompts.write_text("\n".join(lines) + "\n", encoding="utf-8")
    argv = ["generate", "--prompts", str(prompts), "--model", sd1_folder, "--steps", "8", "--size", "64x64"]

    resumed = tmp_path / "resumed"
    process = subprocess.Popen([sys.executable, "-m", "jaxsd", *argv, "--out", str(resumed)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 600
    while (not resumed.is_dir() or len(_pngs(resumed)) < 2) and process.poll() is None:
        assert time.monotonic() < deadline, "no images after 10 minutes"
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 130, output
    first = _pngs(resumed)
    assert 2 <= len(first) < 16, f"interrupt the run halfway, not at the end: {first}"
    assert not [p for p in os.listdir(resumed) if not p.endswith(".png")], "a partial or temporary file was left"

    assert main(argv + ["--out", str(resumed)]) == 0         # the second run draws only what is missing
    whole = tmp_path / "whole"
    assert main(argv + ["--out", str(whole)]) == 0
    expected = [f"{line:05d}-{seed}.png" for line, seed in
                zip(range(1, 17), [0, 1, 2, 3, 4, 1000, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15])]
    assert _pngs(resumed) == _pngs(whole) == sorted(expected)
    assert sorted(os.listdir(resumed)) == sorted(expected)
    for name in expected:
        a, b = Image.open(resumed / name), Image.open(whole / name)
        assert a.text == b.text and (np.asarray(a) == np.asarray(b)).all(), name
    assert Image.open(resumed / "00006-1000.png").size == (128, 64)
    assert main(argv + ["--out", str(resumed)]) == 0         # a third run: nothing to do, nothing touched
    assert sorted(os.listdir(resumed)) == sorted(expected)
