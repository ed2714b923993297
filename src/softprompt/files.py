"""Atomic file writes: an interrupted save never destroys the previous file, and a failed one (disk full, read-only,
no permission) is a SoftPromptError naming the path, not a traceback."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import SoftPromptError


def cache_root() -> Path:
    """Where pulled models and downloaded data live (`$SOFTPROMPT_CACHE`, default ~/.cache/softprompt)."""
    return Path(os.environ.get("SOFTPROMPT_CACHE", "~/.cache/softprompt")).expanduser()


def write_atomically(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temp file next to `path`, then rename it over `path`."""
    path = Path(path)
    with _saving(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            write(tmp)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a saved prompt should look like any other file
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return path


@contextlib.contextmanager
def _saving(path: Path):
    """OS errors while saving `path` become one clear SoftPromptError; the previous file is untouched."""
    try:
        yield
    except OSError as error:
        kept = f"the previous {path.name} is unchanged" if path.exists() else "nothing was written"
        raise SoftPromptError(f"cannot write {path}: {error.strerror or error}; {kept}") from None


def write_text_atomically(path: str | Path, text: str) -> Path:
    return write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_directory_atomically(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_dir)` on a fresh directory next to `path`, then swap it in for `path`.

    Two renames, not one (a directory cannot replace a non-empty one): between them `path` is briefly absent,
    but its old contents survive as `.<name>.old` until the new ones are in place.
    """
    path = Path(path)
    old = path.with_name(f".{path.name}.old")
    with _saving(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
        try:
            write(tmp)
            os.chmod(tmp, 0o777 & ~_umask())
            shutil.rmtree(old, ignore_errors=True)
            if path.exists():
                os.replace(path, old)
            os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    shutil.rmtree(old, ignore_errors=True)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
