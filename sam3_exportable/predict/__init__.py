"""Images and phrases in, masks, boxes and scores out, with any artifact kind.

* :mod:`.images`: every image form (paths, PIL, numpy, tensors) to 8-bit RGB by one path;
* :mod:`.predictor`: :class:`Predictor` (phrases tokenized once as :class:`Prompts`, one
  graph call, the kept pairs and results);
* :mod:`.processing`: the one pre- and post-processing path (numpy, or torch's kernels for
  torch kinds through :mod:`._torch_kernels`);
* :mod:`.outputs`: one image's results as bytes: COCO RLE, instance-label PNGs, the overlay.

Nothing here imports ``sam3``, and nothing but :mod:`._torch_kernels` imports torch.
"""

from __future__ import annotations

from ..artifact.loader import load_artifact
from ..tokenizer import validate_phrases
from .images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, load_image, to_rgb
from .predictor import (
    DEFAULT_MAX_PAIRS,
    Instance,
    KeptPair,
    PairResult,
    Predictor,
    Prompts,
    iter_instances,
    keep_pair,
    postprocess,
)

__all__ = [
    "DEFAULT_MAX_PAIRS",
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "Instance",
    "KeptPair",
    "PairResult",
    "Predictor",
    "Prompts",
    "iter_instances",
    "keep_pair",
    "load_artifact",
    "load_image",
    "postprocess",
    "to_rgb",
    "validate_phrases",
]
