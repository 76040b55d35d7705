"""Exceptions raised by sam3_exportable; each message names the input, what was expected and
what came.

The command line turns every one of them into one line on stderr and exit status 2.
"""

from __future__ import annotations

__all__ = [
    "ArtifactError",
    "CheckpointError",
    "DynamicShapeAuditError",
    "ImageTooLargeError",
    "InputSpecError",
    "MissingExtraError",
    "OutputExistsError",
    "OutputPathError",
    "UpstreamMismatchError",
    "WorkerError",
]


class UpstreamMismatchError(RuntimeError):
    """A patch's target (in ``sam3`` or in torch) is missing or its source differs from the
    fingerprint the patch was written against."""


class CheckpointError(ValueError):
    """A checkpoint is not an upstream SAM3 checkpoint, does not fit the model, or cannot be
    fetched."""


class DynamicShapeAuditError(RuntimeError):
    """An exported program (or ONNX graph) specialized, or constrained, a dim that must stay
    dynamic."""


class InputSpecError(ValueError):
    """A pipeline input (tensor, image, phrase, option value) has the wrong rank, size, dtype,
    range or is empty."""


class ImageTooLargeError(InputSpecError):
    """An image decodes (or would) to more pixels than the caller's ``max_pixels``."""


class ArtifactError(RuntimeError):
    """An artifact or its manifest is missing, foreign, inconsistent, or fails its hash check."""


class OutputPathError(ValueError):
    """An output path cannot be written: an existing file or directory without ``force``, a
    directory where a file is expected, a read-only or missing location."""


class OutputExistsError(OutputPathError, FileExistsError):
    """An output exists and overwriting it was not asked for (``--force``)."""


class WorkerError(RuntimeError):
    """The workers of a batch job could not start (Ray did not start, its cluster cannot be
    reached) or one died (killed for memory, say); the images not returned are not written,
    and a resumed run does them."""


class MissingExtraError(ImportError):
    """What was asked needs an optional part of sam3-exportable that is not installed; the
    message names the extra (``pip install 'sam3-exportable[export]'``)."""
