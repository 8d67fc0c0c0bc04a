"""The ``jaxsd`` command."""
from __future__ import annotations

import argparse
import sys


def _tokenize(args) -> int:
    from jaxsd.tokenizer import load_tokenizer, tokenize

    tokenizer = load_tokenizer(args.tokenizer)
    ids = tokenize(tokenizer, args.prompt)[0]
    end = int((ids == tokenizer.eos_token_id).argmax()) + 1
    print(" ".join(map(str, ids[:end] if not args.padded else ids)))
    print(" ".join(tokenizer.convert_ids_to_tokens(ids[:end].tolist())))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from jaxsd import __version__

    parser = argparse.ArgumentParser(prog="jaxsd", description="Stable Diffusion in JAX.")
    parser.add_argument("--version", action="version", version=f"jaxsd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tok = commands.add_parser("tokenize", help="show the CLIP token ids of a prompt")
    tok.add_argument("prompt")
    tok.add_argument("--tokenizer", default=None, help="a checkpoint's tokenizer/ folder "
                     "(default: the CLIP vocabulary shipped with jaxsd)")
    tok.add_argument("--padded", action="store_true", help="print all 77 ids, padding included")
    tok.set_defaults(run=_tokenize)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
