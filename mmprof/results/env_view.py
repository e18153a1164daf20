"""Plain-text view of the system inventory that `mmprof env` prints."""

from __future__ import annotations

from typing import Any


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _lines(obj: Any, indent: int) -> list[str]:
    pad = "  " * indent
    out: list[str] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, (dict, list)) and v:
                out.append(f"{pad}{k}:")
                out += _lines(v, indent + 1)
            else:
                out.append(f"{pad}{k}: {_value(v) if not isinstance(v, (dict, list)) else 'none'}")
    elif isinstance(obj, list):
        for i, item in enumerate(obj):
            if isinstance(item, dict):
                label = item.get("index", i)
                out.append(f"{pad}- [{label}]")
                out += _lines({k: v for k, v in item.items() if k != "index"}, indent + 1)
            else:
                out.append(f"{pad}- {_value(item)}")
    else:
        out.append(f"{pad}{_value(obj)}")
    return out


def env_text(info: dict) -> str:
    """Sections in the inventory's own order: gpus, cpu, rapl, versions."""
    return "\n".join(_lines(info, 0))
