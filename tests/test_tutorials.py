"""Every tutorial runs, offline, on the built-in model, as a notebook and as a script, and its own
checks pass (each tutorial asserts that what it computes by hand matches the library); the
documentation site builds from those notebooks with ``mkdocs build --strict``.

Each tutorial is executed once, as a notebook (``docs/hooks.py``, what the site build does), and
the executed notebooks are what the site test renders: nothing runs twice. The script path
(``python tutorials/x.py "a prompt"``) is exercised by the shortest tutorial.
"""
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
TUTORIALS = sorted((ROOT / "tutorials").glob("*.py"))
SCRIPT = ROOT / "tutorials" / "denoise_by_hand.py"


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _start(command, cwd):
    with open(cwd / "stdout.txt", "w") as out, open(cwd / "stderr.txt", "w") as err:
        return subprocess.Popen(command, cwd=cwd, stdout=out, stderr=err)


def _wait(process, cwd, what):
    returncode = process.wait(timeout=1800)
    stdout, stderr = (cwd / "stdout.txt").read_text(), (cwd / "stderr.txt").read_text()
    assert returncode == 0, f"{what} failed:\n" + stdout[-2000:] + stderr[-6000:]


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """Every tutorial executed as a notebook, each in its own folder, all at once (most of a
    tutorial's time is XLA compiling, which keeps about one core busy), plus the script run.
    The performance tutorial's timings suffer from the company; here only its running is
    tested (the site build, docs/hooks.py, runs the tutorials one at a time).
    Yields ({script name: (folder, notebook path)}, {script name: failure})."""
    hooks = ROOT / "docs" / "hooks.py"
    runs, notebooks = {}, tmp_path_factory.mktemp("notebooks")
    for script in TUTORIALS:
        cwd = tmp_path_factory.mktemp(script.stem)
        runs[script.name] = cwd, notebooks / f"{script.stem}.ipynb"
    started = [(_start([sys.executable, str(hooks), str(s), str(runs[s.name][1])], runs[s.name][0]), s.name)
               for s in TUTORIALS]
    script_cwd = tmp_path_factory.mktemp("as_script")
    started.append((_start([sys.executable, str(SCRIPT), "a small green square on a white background"],
                           script_cwd), "script"))
    runs["script"] = script_cwd, None
    failures = {}
    for process, name in started:
        try:
            _wait(process, runs[name][0], name)
        except AssertionError as error:
            failures[name] = str(error)
    yield runs, failures


def test_there_are_tutorials():
    assert TUTORIALS, "tutorials/*.py: none found"


@pytest.mark.parametrize("script", TUTORIALS, ids=lambda p: p.name)
def test_tutorial_opens_as_a_notebook(script):
    """Each tutorial is a jupytext percent script: prose cells and code cells, a title first."""
    import jupytext

    cells = jupytext.read(script).cells
    kinds = {cell.cell_type for cell in cells}
    assert kinds == {"markdown", "code"}, f"{script.name}: cells of kinds {kinds}"
    assert cells[0].cell_type == "markdown" and cells[0].source.startswith("# "), \
        f"{script.name}: the first cell should be markdown with the title as '# ...'"
    assert sum(c.cell_type == "markdown" for c in cells) >= 4, f"{script.name}: explain more than that"
    assert "__file__" not in script.read_text(), f"{script.name}: __file__ is undefined in a notebook"


@pytest.mark.parametrize("script", TUTORIALS, ids=lambda p: p.name)
def test_tutorial_runs_as_a_notebook(script, executed):
    import nbformat

    runs, failures = executed
    assert script.name not in failures, failures.get(script.name)
    cwd, notebook = runs[script.name]
    assert list((cwd / "outputs").glob("*.png")), "a tutorial writes its pictures to outputs/"
    outputs = [o for c in nbformat.read(notebook, as_version=4).cells if c.cell_type == "code"
               for o in c.get("outputs", [])]
    assert any("image/png" in o.get("data", {}) for o in outputs), \
        f"{script.name}: no picture shown inline (make a grid the last expression of a cell)"
    warnings = [o["text"][:300] for o in outputs if o.get("name") == "stderr"]
    assert not warnings, f"{script.name}: the rendered page would show warnings: {warnings}"


def test_a_tutorial_runs_as_a_script_with_a_prompt(executed):
    runs, failures = executed
    assert "script" not in failures, failures.get("script")
    cwd, _ = runs["script"]
    assert "prompt: 'a small green square on a white background'" in (cwd / "stdout.txt").read_text()
    assert (cwd / "outputs" / "denoise_by_hand.png").is_file()


def test_site_builds_strict(executed, tmp_path):
    """``mkdocs build --strict`` on a copy of docs/ holding the executed notebooks: every page,
    the API reference from the docstrings, every link; the tutorials with their pictures."""
    pytest.importorskip("mkdocs", reason="the docs extra: pip install -e '.[docs]'")
    runs, failures = executed
    assert not failures, f"tutorials failed, so the site cannot show them: {sorted(failures)}"
    docs = tmp_path / "docs"
    shutil.copytree(ROOT / "docs", docs, symlinks=False)        # docs/tutorials -> ../tutorials
    for name, (_, notebook) in runs.items():
        if notebook is not None:
            shutil.copy(notebook, docs / "tutorials" / notebook.name)
    config = tmp_path / "mkdocs.yml"
    config.write_text(f"INHERIT: {ROOT / 'mkdocs.yml'}\ndocs_dir: {docs}\n")
    hooks = _hooks()
    for notebook in (docs / "tutorials").glob("*.ipynb"):
        assert hooks.is_fresh(notebook.with_suffix(".py"), notebook), f"{notebook.name} would execute again"
    site = tmp_path / "site"
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
                            capture_output=True, text=True, timeout=900,
                            env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert "executing" not in result.stderr, "the build executed a tutorial the test had already run"
    quickstart = (site / "tutorials" / "quickstart" / "index.html").read_text()
    assert quickstart.count("data:image/png;base64") >= 5, "the quickstart page shows its pictures"
    api = (site / "api" / "index.html").read_text()
    import jaxsd
    for name in jaxsd.__all__:
        assert f'id="jaxsd.{name}"' in api, f"the API reference lacks jaxsd.{name}"
