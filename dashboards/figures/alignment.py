"""The Alignment tab's chart: label, demo and carry mismatches per step."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import pandas as pd

from dashboards.figures.base import Figure, C, layout, figure, empty_figure, series, markers


ALIGN_SERIES = (("label_mismatch_per_step", "labels", C["label"]), ("demo_mismatch_per_step", "demos", C["demo"]),
                ("carry_mismatch_per_step", "carry", C["carry"]))


def alignment_figure(f: pd.DataFrame, findings: Sequence[Mapping[str, Any]] = (), focus: int | None = None,
                     title: str = "Alignment mismatches per step") -> Figure:
    if f.empty or not any(c in f.columns for c, _, _ in ALIGN_SERIES):
        return empty_figure("no alignment counts recorded", title)
    data: list[dict[str, Any]] = []
    for c, name, color in ALIGN_SERIES:
        if c in f.columns:
            data += series(f, c, name, color, hover=".2f")
    lay = layout(title, y_title="slots per step")
    lay["yaxis"]["rangemode"] = "tozero"
    total = sum(float(f[c.removesuffix("_per_step")].fillna(0).sum()) for c, _, _ in ALIGN_SERIES
                if c.removesuffix("_per_step") in f.columns)
    if total == 0:
        lay["annotations"].append({"text": "no mismatches: every slot's labels and demos are its own", "x": 0.5,
                                   "y": 0.6, "xref": "paper", "yref": "paper", "showarrow": False,
                                   "font": {"size": 12, "color": C["coverage"]}})
        lay["yaxis"]["range"] = [0, 1]
    lay["shapes"] = markers(findings, focus)
    return figure(data, lay)
