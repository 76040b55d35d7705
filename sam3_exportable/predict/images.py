"""Images in every form users hand over, converted by one path to 8-bit RGB.

Accepted (the same picture gives the same pixels however it comes):

* a path to an image file, or the file's bytes (EXIF orientation applied);
* a ``PIL.Image.Image`` of any mode;
* a numpy array ``[H, W]`` (grayscale) or ``[H, W, C]`` with C in 1, 3, 4 (RGB order;
  alpha dropped);
* a torch tensor ``[H, W]`` or ``[C, H, W]`` (torchvision's layout), C in 1, 3, 4.

Pixel values: 8-bit as they are; 16-bit scaled by 1/257 (65535 -> 255); 32-bit integers
within 16 bits likewise, wider ones refused; floats in ``[0, 1]`` scaled by 255, floats in
``[0, 255]`` taken as 8-bit values; anything else (negative, NaN, out of range, booleans) is
refused with :class:`~..errors.InputSpecError` saying how to convert it. Pillow's
decompression-bomb guard is replaced by an explicit pixel limit (``max_pixels``), checked
from the header before any pixel is decoded.
"""

from __future__ import annotations

import io
import os
import threading
import warnings
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..contract import is_torch_tensor
from ..errors import ImageTooLargeError, InputSpecError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "ImageInput",
    "load_image",
    "rgb_array",
    "to_rgb",
]

#: File name extensions treated as images when a directory is searched.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm"}
)

#: Default pixel limit (width * height): 16384 x 16384, far above any camera or tile.
DEFAULT_MAX_PIXELS = 16384 * 16384

ImageInput = Union[str, "os.PathLike[str]", bytes, Image.Image, np.ndarray, Any]

_PILLOW_LIMIT = threading.Lock()


def _describe(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return f"image {os.fspath(source)}"
    if isinstance(source, bytes):
        return "image (bytes)"
    return f"image ({type(source).__name__})"


def _open(source: Path | bytes, max_pixels: int) -> Image.Image:
    if isinstance(source, bytes):
        what, fp = "image (bytes)", io.BytesIO(source)
    else:
        what, fp = f"image {source}", source
        if not source.exists():
            raise FileNotFoundError(f"{what}: no such file")
        if not source.is_file():
            raise InputSpecError(f"{what}: expected an image file, got a directory or special file")
    with _PILLOW_LIMIT:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None  # the limit below replaces Pillow's guard
        try:
            img = Image.open(fp)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise InputSpecError(f"{what}: expected a readable image file, got {exc}") from None
        finally:
            Image.MAX_IMAGE_PIXELS = saved
    width, height = img.size
    if width * height > max_pixels:
        img.close()
        raise ImageTooLargeError(
            f"{what}: expected at most {max_pixels:,} pixels (--max-pixels), got {width}x{height} "
            f"= {width * height:,} (a decompression bomb, or pass a larger --max-pixels)"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()  # also closes the file Pillow opened
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        img.close()
        raise InputSpecError(f"{what}: expected a readable image file, got {exc}") from None
    return img


def _upright(img: Image.Image) -> Image.Image:
    """``img`` turned as its EXIF orientation says (the same object when it says nothing)."""
    if img.getexif().get(0x0112, 1) in (None, 1):
        return img
    return ImageOps.exif_transpose(img)


def _scale_to_uint8(array: np.ndarray, what: str) -> np.ndarray:
    """Pixel values to uint8 by the rules of the module docstring."""
    if array.size == 0:
        raise InputSpecError(f"{what}: expected pixels, got an empty image of shape {list(array.shape)}")
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        raise InputSpecError(
            f"{what}: expected pixel values, got a boolean mask; convert it with a.astype(np.uint8) * 255"
        )
    if array.size == 0:
        raise InputSpecError(f"{what}: expected pixels, got an empty image of shape {list(array.shape)}")
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise InputSpecError(f"{what}: expected finite pixel values, got NaN or infinity")
        low, high = float(array.min()), float(array.max())
        if low >= 0.0 and high <= 1.0:
            return np.clip(np.rint(array.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
        if low >= 0.0 and high <= 255.0:
            return np.clip(np.rint(array.astype(np.float64)), 0, 255).astype(np.uint8)
        raise InputSpecError(
            f"{what}: expected float pixels in [0, 1] (or [0, 255]), got [{low:g}, {high:g}]; "
            "rescale it first, e.g. (a - a.min()) / (a.max() - a.min())"
        )
    if np.issubdtype(array.dtype, np.integer):
        low, high = int(array.min()), int(array.max())
        if low < 0:
            raise InputSpecError(
                f"{what}: expected non-negative integer pixels, got values down to {low}; "
                "shift and rescale it to 8 or 16 bits first"
            )
        if array.dtype.itemsize == 1 or (high <= 255 and array.dtype.itemsize > 2):
            return array.astype(np.uint8)
        if high <= 65535:
            return np.clip(np.rint(array.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)
        raise InputSpecError(
            f"{what}: expected 8- or 16-bit pixel values, got {array.dtype} values up to {high}; "
            "rescale it first, e.g. (a / a.max() * 255).astype(np.uint8)"
        )
    raise InputSpecError(f"{what}: expected integer or float pixels, got dtype {array.dtype}")


def _from_array(array: np.ndarray, what: str) -> Image.Image:
    """An HWC / HW array of any supported dtype as an RGB image."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise InputSpecError(
            f"{what}: expected an array [H, W] or [H, W, C] with C in 1, 3, 4, got shape {list(array.shape)}"
        )
    pixels = _scale_to_uint8(np.ascontiguousarray(array), what)
    if pixels.ndim == 2:
        return Image.fromarray(pixels, mode="L").convert("RGB")
    return Image.fromarray(np.ascontiguousarray(pixels[:, :, :3]), mode="RGB")


#: Pillow modes whose pixels are not 8-bit, decoded through :func:`_scale_to_uint8`.
_WIDE_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}


def _from_pil(img: Image.Image, what: str) -> Image.Image:
    img = _upright(img)
    if img.mode in _WIDE_MODES:
        array = np.asarray(img)
        if img.mode.startswith("I;16"):
            array = array.astype(np.uint16)
        return _from_array(array, what)
    # grayscale, palette (transparency ignored), alpha (dropped), CMYK, ...: Pillow's rules
    return img if img.mode == "RGB" else img.convert("RGB")


#: Pixels per strip when :func:`rgb_array` copies a large image out of Pillow.
_STRIP_PIXELS = 1 << 22


def rgb_array(img: Image.Image) -> np.ndarray:
    """The pixels of an RGB image as a writable uint8 ``[H, W, 3]`` array: one copy.

    ``np.asarray(img)`` goes through ``tobytes()``, two copies of the image at once (0.86 GB
    for a 12000x12000 picture); this copies row strips into one array instead, with the
    same values.
    """
    if img.mode != "RGB":
        raise InputSpecError(f"image: expected an RGB image (see to_rgb), got mode {img.mode!r}")
    width, height = img.size
    if width * height <= _STRIP_PIXELS:
        return np.array(img)
    out = np.empty((height, width, 3), dtype=np.uint8)
    rows = max(1, _STRIP_PIXELS // width)
    for top in range(0, height, rows):
        bottom = min(height, top + rows)
        out[top:bottom] = np.asarray(img.crop((0, top, width, bottom)))
    return out


def to_rgb(source: ImageInput, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """``source`` (see the module docstring) as an 8-bit RGB ``PIL.Image.Image``.

    Raises ``FileNotFoundError`` for a missing file and
    :class:`~..errors.InputSpecError` for an unreadable file, an
    unsupported layout or pixel values that cannot be converted without loss of meaning
    (:class:`~..errors.ImageTooLargeError`, a subclass, for a file or PIL image of more than
    ``max_pixels`` pixels).
    """
    what = _describe(source)
    if isinstance(source, (str, os.PathLike)):
        return _from_pil(_open(Path(source), max_pixels), what)
    if isinstance(source, bytes):
        return _from_pil(_open(source, max_pixels), what)
    if isinstance(source, Image.Image):
        width, height = source.size
        if width * height > max_pixels:
            raise ImageTooLargeError(f"{what}: expected at most {max_pixels:,} pixels, got {width}x{height}")
        return _from_pil(source, what)
    if isinstance(source, np.ndarray):
        return _from_array(source, what)
    if is_torch_tensor(source):
        tensor = source.detach().cpu()
        if tensor.dim() == 3:
            tensor = tensor.permute(1, 2, 0)
        return _from_array(tensor.numpy(), what)
    raise InputSpecError(
        f"{what}: expected a file path, file bytes, a PIL image, a numpy array [H, W(, C)] or a tensor "
        f"[(C, )H, W], got {type(source).__name__}"
    )


def load_image(path: str | os.PathLike[str], *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open an image file as 8-bit RGB (:func:`to_rgb` of a path)."""
    return to_rgb(path, max_pixels=max_pixels)
