#!/usr/bin/env python
"""Production build of the SAM3 .pt2 pipeline: a thin caller of ``sam3-exportable export``.

Example:
    python scripts/export_sam3_full_pipeline.py --checkpoint sam3.pt --out build/sam3.pt2 --verify 1,2
"""

import sys

from sam3_exportable.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
