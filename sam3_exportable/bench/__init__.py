"""``sam3-exportable bench``: what an artifact costs, side by side with eager, in one run.

* :mod:`.plan`: :class:`BenchPlan`, the presets, the names of jobs and files;
* :mod:`.run`: :class:`BenchRun` runs every job in a fresh process (:mod:`.worker`) and keeps
  ``results.json`` current;
* :mod:`.summary`: the summary sections and targets, computed from the raw job results;
* :mod:`.report`, :mod:`.plots`: ``summary.md`` and the PNG plots;
* :mod:`.host`: the machine (CPU capability, bf16 flags); :mod:`.stats`: min/median/max, fits.
"""

from __future__ import annotations

from ..verify import compare_parity, kept_instances
from .plan import BenchPlan, plan_for
from .run import SCHEMA, BenchRun, run_bench
from .stats import linear_fit, stat

__all__ = [
    "SCHEMA",
    "BenchPlan",
    "BenchRun",
    "compare_parity",
    "kept_instances",
    "linear_fit",
    "plan_for",
    "run_bench",
    "stat",
]
