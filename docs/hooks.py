"""The documentation site's build step: run every tutorial as a notebook, keep its outputs.

mkdocs calls ``on_pre_build`` (``hooks:`` in mkdocs.yml) before it collects the pages. For each
``tutorials/<name>.py`` (a jupytext "percent" script) it writes ``tutorials/<name>.ipynb``, the
notebook executed from a scratch folder, which mkdocs-jupyter then renders with its pictures.
A notebook is executed again only when its fingerprint changes: the tutorial's source and every
file of the installed ``jaxsd`` package (code and the built-in model's weights), so the pictures
on the site are always the ones this checkout draws.

The test suite executes the tutorials the same way (``tests/test_tutorials.py``) and builds the
site from those notebooks, so nothing runs twice. From the command line:

    python docs/hooks.py tutorials/quickstart.py [OUT.ipynb]   # run one, keep the notebook
"""
from __future__ import annotations

import hashlib
import sys
import tempfile
from pathlib import Path

KERNEL_TIMEOUT_S = 1800          # one cell; the slowest (SD 1.5's UNet, cold) takes about a minute


def fingerprint(script: Path) -> str:
    """sha256 of the tutorial's source and of every file of the installed jaxsd package."""
    import jaxsd

    digest = hashlib.sha256(script.read_bytes())
    package = Path(jaxsd.__file__).parent
    for path in sorted(package.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            digest.update(str(path.relative_to(package)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def is_fresh(script: Path, notebook: Path) -> bool:
    """Whether ``notebook`` was executed from this ``script`` with this jaxsd."""
    import nbformat

    if not notebook.is_file():
        return False
    try:
        saved = nbformat.read(notebook, as_version=4).metadata.get("jaxsd", {}).get("fingerprint")
    except Exception:            # unreadable: execute again
        return False
    return saved == fingerprint(script)


def execute(script: Path, notebook: Path, cwd: Path | None = None) -> None:
    """Run ``script`` as a notebook (cwd: ``cwd`` or a scratch folder) and write it, with its
    outputs, to ``notebook``. A cell that raises fails the whole run (nbclient's
    CellExecutionError names the cell and the traceback)."""
    import jupytext
    import nbformat
    from nbclient import NotebookClient

    nb = jupytext.read(script)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    def run(folder):
        NotebookClient(nb, timeout=KERNEL_TIMEOUT_S, kernel_name="python3",
                       resources={"metadata": {"path": str(folder)}}).execute()

    if cwd is not None:
        run(cwd)
    else:
        with tempfile.TemporaryDirectory(prefix=f"jaxsd-{script.stem}-") as scratch:
            run(scratch)
    nb.metadata["jaxsd"] = {"fingerprint": fingerprint(script)}
    notebook.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, notebook)


def on_pre_build(config) -> None:
    """mkdocs hook: execute the tutorials whose notebook is missing or stale."""
    import logging

    log = logging.getLogger("mkdocs.hooks.tutorials")
    tutorials = Path(config["docs_dir"]) / "tutorials"
    for script in sorted(tutorials.glob("*.py")):
        notebook = script.with_suffix(".ipynb")
        if is_fresh(script, notebook):
            log.info("tutorial %s: notebook up to date", script.name)
            continue
        log.info("tutorial %s: executing (minutes on a CPU)", script.name)
        execute(script, notebook)


if __name__ == "__main__":
    if not 2 <= len(sys.argv) <= 3:
        sys.exit("usage: python docs/hooks.py tutorials/NAME.py [OUT.ipynb]")
    source = Path(sys.argv[1])
    if source.suffix != ".py" or not source.is_file():
        sys.exit(f"{source}: not a tutorial script (tutorials/*.py)")
    execute(source, Path(sys.argv[2]) if len(sys.argv) == 3 else source.with_suffix(".ipynb"), cwd=Path.cwd())
