"""``jaxsd generate --prompts FILE``: many prompts in one process, one PNG per image, resumable.

The file has one prompt per line, or one JSON object per line for per-line settings:

    a red circle on a blue background
    {"prompt": "a yellow square", "negative": "blurry", "seed": 7, "size": "64x64"}

Blank lines are skipped. Each prompt draws ``--batch`` B images; image k of it has seed
``s + k``, where s is the line's own ``"seed"``, or else ``--seed`` (default 0) + B x the number
of prompts before it (prompt 0 gets seeds 0..B-1, prompt 1 B..2B-1, ...), so that every image
has a fixed seed and a fixed file name,
``<line, 5 digits>-<seed>.png``. That name is what makes a run resumable: an image whose file
exists is skipped, a file is never overwritten, and each PNG is written under a temporary name
and linked into place, so an interrupted run leaves no partial file. Run the same command again
and it draws only what is missing.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

JSON_KEYS = ("prompt", "negative", "seed", "size")


@dataclass(frozen=True)
class Job:
    """One line of the prompts file."""
    line: int                        # 1-based, as an editor shows it
    prompt: str
    negative: str | None
    seed: int                        # of its first image
    size: tuple[int, int] | None     # (width, height); None: the command's --size or the model's


def _size(value, where: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)[xX](\d+)", str(value))
    if not m:
        raise ValueError(f"{where}: size {value!r} must be WIDTHxHEIGHT, e.g. \"512x512\"")
    return int(m.group(1)), int(m.group(2))


def read_prompts(path: str | Path, *, seed: int = 0, batch: int = 1, negative: str | None = None,
                 size: tuple[int, int] | None = None) -> list[Job]:
    """The jobs of a prompts file, every line checked before any image is drawn.

    :param seed: ``--seed``: the first prompt's seed; prompt i without its own gets
        ``seed + batch * i``.
    :param batch: ``--batch``: images per prompt.
    :param negative, size: the command's, for lines that do not give their own.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise ValueError(f"--prompts {str(path)!r}: cannot read it ({error.strerror or error})") from None
    except UnicodeDecodeError:
        raise ValueError(f"--prompts {str(path)!r}: not a UTF-8 text file") from None
    jobs = []
    for number, text in enumerate(lines, start=1):
        text = text.strip()
        if not text:
            continue
        where = f"{path.name} line {number}"
        fields = {"prompt": text}
        if text.startswith("{"):
            try:
                fields = json.loads(text)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
            if not isinstance(fields, dict):
                raise ValueError(f"{where}: a JSON line must be an object with the keys {list(JSON_KEYS)}")
            unknown = sorted(set(fields) - set(JSON_KEYS))
            if unknown:
                raise ValueError(f"{where}: unknown key(s) {unknown}; the keys are {list(JSON_KEYS)}")
        prompt = fields.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{where}: \"prompt\" must be a non-empty string, got {prompt!r}")
        own_seed = fields.get("seed")
        if own_seed is not None and (isinstance(own_seed, bool) or not isinstance(own_seed, int)
                                     or not 0 <= own_seed < 2**63):
            raise ValueError(f"{where}: \"seed\" must be an integer in [0, 2**63), got {own_seed!r}")
        line_negative = fields.get("negative", negative)
        if line_negative is not None and not isinstance(line_negative, str):
            raise ValueError(f"{where}: \"negative\" must be a string, got {line_negative!r}")
        jobs.append(Job(number, prompt, line_negative,
                        own_seed if own_seed is not None else seed + batch * len(jobs),
                        _size(fields["size"], where) if "size" in fields else size))
    if not jobs:
        raise ValueError(f"--prompts {str(path)!r}: no prompts in it (one per line)")
    return jobs


def output_path(folder: Path, job: Job, image_seed: int) -> Path:
    """The fixed file name of one image of a job: ``<line>-<seed>.png``."""
    return folder / f"{job.line:05d}-{image_seed}.png"


def calls(items: list, size: int, key) -> list[list]:
    """``items`` in order, cut into groups of at most ``size`` consecutive items with equal
    ``key(item)`` (one pipeline call each: a call draws images of one size)."""
    groups: list[list] = []
    for item in items:
        if groups and len(groups[-1]) < size and key(groups[-1][0]) == key(item):
            groups[-1].append(item)
        else:
            groups.append([item])
    return groups
