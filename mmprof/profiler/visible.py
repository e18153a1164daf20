"""CUDA_VISIBLE_DEVICES: which NVML device is torch's cuda:i.

The CUDA runtime reads the variable as comma-separated entries, each a device ordinal or a
(prefix of a) UUID such as ``GPU-8f3c...``; the first invalid entry hides it and everything after
it. NVML ignores the variable and numbers every GPU in the machine, so torch index i must be
translated before asking NVML about it.
"""

from __future__ import annotations

from .gpu import NvmlUnavailable


def visible_nvml_indices(value: str | None, nvml_uuids: list[str]) -> list[int]:
    """NVML indices of the GPUs CUDA sees, in CUDA order, given the variable and NVML's UUIDs.

    ``nvml_uuids[k]`` is the UUID NVML reports for its device k (``GPU-...``).
    """
    if value is None:
        return list(range(len(nvml_uuids)))
    out: list[int] = []
    for raw in value.split(","):
        entry = raw.strip()
        target = _resolve(entry, nvml_uuids)
        if target is None or target in out:
            break
        out.append(target)
    return out


def _resolve(entry: str, nvml_uuids: list[str]) -> int | None:
    if entry.startswith("MIG-"):
        raise NvmlUnavailable(
            f"CUDA_VISIBLE_DEVICES selects MIG instance {entry}: NVML reports power and energy per "
            "physical GPU, not per MIG instance"
        )
    if entry.startswith("GPU-"):
        matches = [k for k, u in enumerate(nvml_uuids) if u.lower().startswith(entry.lower())]
        return matches[0] if len(matches) == 1 else None
    try:
        ordinal = int(entry)
    except ValueError:
        return None
    return ordinal if 0 <= ordinal < len(nvml_uuids) else None
