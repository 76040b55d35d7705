"""Which image files a job segments (files, directories and glob patterns, and list files)
and the exemplar boxes it gives them (``--box``, ``--boxes FILE.jsonl``).

:func:`expand_images` gives the job's images in one deterministic order: sorted by resolved
path, each file once however many arguments name it.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import InputSpecError
from ..predict.boxes import ExemplarBox, parse_box, parse_phrase_boxes
from ..predict.images import IMAGE_EXTENSIONS

__all__ = ["expand_images", "job_boxes", "read_box_file", "read_image_list"]

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


def _record(box: ExemplarBox) -> list[Any]:
    """A box as the job records it: ``[x0, y0, x1, y1, positive]``."""
    return [box.x0, box.y0, box.x1, box.y1, box.positive]


def _pair_records(rows: Any, prompts: int, where: str) -> list[list[list[Any]]]:
    """One image's boxes per phrase, validated before the image is read, as records."""
    return [[_record(b) for b in pair] for pair in parse_phrase_boxes(rows, prompts, None, None, where)]


def read_box_file(path: str | os.PathLike[str], prompts: int) -> dict[str, list[list[list[Any]]]]:
    """The exemplar boxes a JSONL file gives per image: one line per image,
    ``{"path": "<image>", "boxes": [[box, ...] per phrase]}``, each box ``[x0, y0, x1, y1]`` or
    ``[x0, y0, x1, y1, label]`` in that image's pixels (label 1/true positive, 0/false
    negative); ``[]`` or ``null`` for a phrase without boxes. Paths are taken as
    ``--image-list`` takes them (relative ones from the current directory). Returns
    ``{resolved path: boxes}``.

    Raises :class:`InputSpecError` naming the file and line for an unreadable file, a line
    that is not such an object, a bad box, or an image named twice.
    """
    target = Path(path)
    try:
        text = target.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise InputSpecError(f"--boxes {target}: expected a readable JSONL file, got {reason}") from None
    found: dict[str, list[list[list[Any]]]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"--boxes {target} line {number}"
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputSpecError(f"{where}: expected a JSON object, got invalid JSON ({exc.msg})") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("path"), str) or "boxes" not in doc:
            raise InputSpecError(
                f'{where}: expected {{"path": "<image>", "boxes": [...]}}, got {line[:80]!r}'
            )
        key = str(Path(os.path.expanduser(doc["path"])).resolve())
        if key in found:
            raise InputSpecError(f"{where}: expected each image once, got {doc['path']} again")
        found[key] = _pair_records(doc["boxes"], prompts, f"{where} boxes")
    if not found:
        raise InputSpecError(f"--boxes {target}: expected one line per image, got none")
    return found


def job_boxes(
    boxes: Sequence[Any] | Mapping[str, Any] | None, images: Sequence[Path], phrases: Sequence[str | None]
) -> dict[str, list[list[list[Any]]]] | None:
    """The job's exemplar boxes by image path, validated (not yet against image sizes).

    ``boxes``: a list of boxes for every image and phrase (``--box``), or a mapping from
    image path to one list of boxes per phrase (``--boxes FILE``: :func:`read_box_file`), or
    None. A phrase of None (boxes alone) needs boxes in every image. Raises
    :class:`InputSpecError` for a bad box, an image of the mapping that is not in the job, or
    a phrase of None with an image that has no box for it.
    """
    if boxes is None:
        per_image = None
    elif isinstance(boxes, Mapping):
        known = {str(p) for p in images}
        per_image = {}
        for key, rows in boxes.items():
            resolved = str(Path(os.path.expanduser(key)).resolve())
            if resolved not in known:
                raise InputSpecError(
                    f"--boxes: expected boxes of the job's images, got {key}, not one of them"
                )
            per_image[resolved] = _pair_records(rows, len(phrases), f"boxes of {key}")
    else:
        if isinstance(boxes, (str, bytes)) or not isinstance(boxes, Sequence) or not boxes:
            raise InputSpecError(f"--box: expected at least one box, got {boxes!r}")
        every = [_record(parse_box(b, None, None, f"--box #{k + 1}")) for k, b in enumerate(boxes)]
        per_image = {str(p): [list(every) for _ in phrases] for p in images}
    for j, phrase in enumerate(phrases):
        if phrase is not None:
            continue
        missing = [str(p) for p in images if not (per_image or {}).get(str(p), [[]] * len(phrases))[j]]
        if missing:
            raise InputSpecError(
                f"--prompt: expected a phrase, or boxes for every image to prompt with boxes alone, "
                f"got {len(missing)} image(s) without a box, e.g. {missing[0]}"
            )
    return per_image
