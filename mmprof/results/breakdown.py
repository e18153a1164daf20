"""The --breakdown table: what is alive at each row's peak, in GiB and bytes per token per layer."""

from __future__ import annotations

import pandas as pd

GIB = 1024**3


def breakdown_table(parts: list[tuple[str, dict[str, tuple[int, float]]]]) -> pd.DataFrame:
    """[(row label, {part: (bytes, bytes per token per layer)})] -> one text row per (configuration, part)."""
    rows = []
    for label, items in parts:
        for name, (nbytes, per_token_layer) in items.items():
            rows.append({"configuration": label, "part": name, "GiB": f"{nbytes / GIB:.3f}",
                         "bytes/token/layer": f"{per_token_layer:,.0f}"})
    return pd.DataFrame(rows, columns=["configuration", "part", "GiB", "bytes/token/layer"])
