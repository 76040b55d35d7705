"""Which image files a job segments: files, directories and glob patterns, and list files.

:func:`expand_images` gives the job's images in one deterministic order: sorted by resolved
path, each file once however many arguments name it.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from ..errors import InputSpecError
from ..predict.images import IMAGE_EXTENSIONS

__all__ = ["expand_images", "read_image_list"]

_GLOB_CHARS = frozenset("*?[")


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _under(path: Path, excluded: Sequence[Path]) -> bool:
    return any(path == ex or ex in path.parents for ex in excluded)


def _walk(directory: Path, excluded: Sequence[Path]) -> Iterator[Path]:
    """Image files under ``directory``, recursively; hidden files and directories (name
    starting with ``.``) and anything under ``excluded`` are left out. Symbolic links are
    followed, as a glob pattern follows them, each real directory walked once (no loop)."""
    if _under(directory.resolve(), excluded):
        return
    seen = {directory.resolve()}
    for root, dirs, files in os.walk(directory, followlinks=True):
        base = Path(root)
        kept = []
        for d in dirs:
            real = (base / d).resolve()
            if d.startswith(".") or _under(real, excluded) or real in seen:
                continue
            seen.add(real)
            kept.append(d)
        dirs[:] = kept
        for name in files:
            if not name.startswith(".") and _is_image_name(Path(name)):
                yield base / name


def _expand_one(argument: str, excluded: Sequence[Path], what: str) -> list[Path]:
    """The images one ``--image`` value names: an existing path is taken literally (a file
    named ``photo[1].png`` is that file), anything else with ``*?[`` is a pattern. Raises
    :class:`InputSpecError` when it names nothing: an empty value, a missing path, a pattern
    that matches no image, a directory without images."""
    if not argument.strip():
        raise InputSpecError(f"{what}: expected an image file, a directory or a pattern, got {argument!r}")
    literal = Path(os.path.expanduser(argument))
    if not literal.exists() and any(c in argument for c in _GLOB_CHARS):
        found: list[Path] = []
        for match in sorted(glob.glob(os.path.expanduser(argument), recursive=True)):
            path = Path(match)
            if path.is_dir():
                found.extend(_walk(path, excluded))
            elif path.is_file() and _is_image_name(path) and not _under(path.resolve(), excluded):
                found.append(path)
        if not found:
            raise InputSpecError(
                f"{what} {argument!r}: expected a pattern that matches image files "
                f"({', '.join(sorted(IMAGE_EXTENSIONS))}), got no match"
            )
        return found
    path = Path(os.path.expanduser(argument))
    if path.is_dir():
        found = list(_walk(path, excluded))
        if not found:
            raise InputSpecError(
                f"{what} {argument}: expected a directory holding image files "
                f"({', '.join(sorted(IMAGE_EXTENSIONS))}), got none in it"
            )
        return found
    if not path.exists():
        raise InputSpecError(
            f"{what} {argument}: expected an image file, a directory or a pattern, no such path"
        )
    return [path]  # a file named explicitly is read whatever its extension


def read_image_list(path: str | os.PathLike[str]) -> list[str]:
    """The paths a list file names: one per line, surrounding whitespace stripped, blank lines
    and lines starting with ``#`` ignored. Raises :class:`InputSpecError` when the file cannot
    be read or names no path."""
    target = Path(path)
    try:
        text = target.read_text(encoding="utf-8-sig")  # a byte-order mark is not part of the first path
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise InputSpecError(f"--image-list {target}: expected a readable text file, got {reason}") from None
    entries = [line.strip() for line in text.splitlines()]
    entries = [e for e in entries if e and not e.startswith("#")]
    if not entries:
        raise InputSpecError(f"--image-list {target}: expected one image path per line, got none")
    return entries


def expand_images(
    images: Iterable[str | os.PathLike[str]] = (),
    image_lists: Iterable[str | os.PathLike[str]] = (),
    *,
    exclude: Iterable[str | os.PathLike[str]] = (),
) -> list[Path]:
    """Resolved paths of every image the arguments name, sorted, each once.

    ``images``: files (taken whatever their extension), directories (searched recursively for
    names ending in one of :data:`..predict.images.IMAGE_EXTENSIONS`, any case; hidden
    entries skipped) and glob patterns (``**`` recursive; matching directories are searched,
    matching files kept when their extension is an image's). ``image_lists``: list files
    (:func:`read_image_list`) whose lines are image paths, taken literally (relative ones
    from the current directory); a missing one fails when it is read, like an unreadable
    image. Nothing under ``exclude`` (the output directory) is taken from a directory or a
    pattern.

    Raises :class:`InputSpecError` when an ``images`` value matches nothing, a list file is
    unreadable or empty, or no image is named at all.
    """
    excluded = [Path(p).resolve() for p in exclude]
    found: dict[Path, None] = {}
    for argument in images:
        for path in _expand_one(os.fspath(argument), excluded, "--image"):
            found.setdefault(path.resolve(), None)
    for list_file in image_lists:
        for entry in read_image_list(list_file):
            found.setdefault(Path(os.path.expanduser(entry)).resolve(), None)
    if not found:
        raise InputSpecError(
            "--image: expected an image file, a directory or a pattern (or --image-list), got none"
        )
    return sorted(found, key=str)
