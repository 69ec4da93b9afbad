"""Metadata that reads at a glance in the Dagster UI.

The UI plots every numeric metadata value across materializations, so a constant (a gate's
ceiling, a count of compared days) becomes a flat "time series"; and it prints floats in full
(``ece 0.014496708800914223``). :func:`at_a_glance` rounds floats to 4 decimals and turns the
settings a figure is compared against into text.
"""

from __future__ import annotations

import dagster as dg

OWNERS = ["team:ml-platform"]
"""Who owns every asset: applied once, over all asset specs, in ``definitions.py``."""

SETTINGS = frozenset({"ceiling", "floor", "allowed_drop", "min_test_images", "min_ood_images", "target",
                      "tolerance", "compared_days", "rule", "method", "evidence", "reason"})
"""Keys that hold a setting or a label, not a figure of this materialization: shown as text."""


def _round(value):
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_round(v) for v in value]
    return value


def at_a_glance(md: dict, settings: frozenset[str] = SETTINGS) -> dict:
    """``md`` with floats rounded (nested ones too), dicts/lists as JSON and ``settings`` as text."""
    out = {}
    for key, value in md.items():
        if isinstance(value, dg.MetadataValue) or value is None or isinstance(value, bool):
            out[key] = value
        elif key in settings:
            out[key] = dg.MetadataValue.text(str(_round(value)))
        elif isinstance(value, dict | list | tuple):
            out[key] = dg.MetadataValue.json(_round(value))
        else:
            out[key] = _round(value)
    return out
