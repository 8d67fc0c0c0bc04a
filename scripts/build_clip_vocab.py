"""Rebuild jaxsd/assets/clip_tokenizer/{vocab.json,merges.txt} from OpenAI's CLIP BPE file.

OpenAI's CLIP byte-pair-encoding table (MIT license) ships inside the ``open_clip_torch``
wheel on PyPI as ``open_clip/bpe_simple_vocab_16e6.txt.gz``. transformers' ``vocab.json`` and
``merges.txt`` are derived from it the same way CLIP's own ``SimpleTokenizer`` builds its
vocabulary:

    256 byte symbols (GPT-2's printable byte-to-unicode map)
    + the same 256 symbols with the end-of-word marker ``</w>``
    + the first 48,894 merges, each merged pair as one token
    + ``<|startoftext|>`` and ``<|endoftext|>``                       = 49,408 tokens

Usage::

    pip download --no-deps open_clip_torch -d /tmp/oc
    python scripts/build_clip_vocab.py /tmp/oc/open_clip_torch-*.whl
"""
import argparse
import gzip
import json
import zipfile
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "jaxsd" / "assets" / "clip_tokenizer"
NUM_MERGES = 49152 - 256 - 2  # CLIP's BPE table size minus byte symbols and special tokens


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map (as in CLIP)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wheel", help="path to an open_clip_torch wheel")
    args = parser.parse_args()
    with zipfile.ZipFile(args.wheel) as wheel:
        text = gzip.decompress(wheel.read("open_clip/bpe_simple_vocab_16e6.txt.gz")).decode("utf-8")
    lines = text.split("\n")
    merges = [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]  # line 0 is a version header
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408, len(vocab)
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "vocab.json", "w", encoding="utf-8") as f:
        json.dump({token: i for i, token in enumerate(vocab)}, f, ensure_ascii=False)
    with open(OUT / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {OUT}")


if __name__ == "__main__":
    main()
