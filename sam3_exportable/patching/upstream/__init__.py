"""The declared patch set, one module per upstream file it fixes.

One module per upstream file (``sam3/model/<file>.py``), one :class:`~..engine.Patch` per
upstream attribute. ``ALL_PATCHES`` lists every patch in application order; see
:mod:`..selection` for choosing the default set and :func:`..selection.exportable_sam3` for
applying it.
"""

from __future__ import annotations

from ..engine import Patch
from . import decoder, encoder, geometry_encoders, model_misc, position_encoding

ALL_PATCHES: tuple[Patch, ...] = (
    position_encoding.PRECOMPUTE_ON_AVAILABLE_DEVICE,
    position_encoding.SYMINT_SAFE_ENCODE_XY,
    position_encoding.TRACE_SAFE_CACHE,
    decoder.COORDS_ON_AVAILABLE_DEVICE,
    decoder.STATIC_RPB_FEAT_SIZE,
    encoder.FEAT_SIZES_DIM_CHECK,
    geometry_encoders.BATCHED_ROI_ALIGN,
    geometry_encoders.EMPTY_FIRST_SEQUENCE,
    model_misc.SDPA_BOX_RPB_CROSS_ATTENTION,
    model_misc.CONTIGUOUS_IN_PROJECTION_UNDER_AUTOCAST,
)

__all__ = ["ALL_PATCHES"]
