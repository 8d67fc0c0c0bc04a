"""The jaxsd command."""
import subprocess
import sys

from jaxsd.cli import main


def test_tokenize(capsys):
    assert main(["tokenize", "a photograph of an astronaut riding a horse"]) == 0
    ids, tokens = capsys.readouterr().out.splitlines()
    assert ids == "49406 320 8853 539 550 18376 6765 320 4558 49407"
    assert tokens.split()[:3] == ["<|startoftext|>", "a</w>", "photograph</w>"]


def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "jaxsd", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("jaxsd ")
