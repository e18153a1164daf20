"""The environment variables mmprof reads, each parsed in one place with a one-line error.

- MMPROF_DIST_TIMEOUT_S: process-group timeout under torchrun, seconds (default 300).
- MMPROF_TEST_TEAR_ROW_S: tests only; each results row is written in two halves this many seconds
  apart, so a test can kill a sweep mid-row (mmprof.results.store).
- MMPROF_GIT_COMMIT: the commit a run folder records where the copy has no .git (free text).
- MMPROF_INT8_FORWARD: 0 runs the fused BitLinear forward product in bf16 instead of on int8 tensor cores
  (default 1: on GPUs that have them; kernels.bitlinear_prologue).
- MMPROF_REFERENCE_FAST: 0 runs the reference model's ops (`vanilla`/`ref-fused`: kernels.reference_ops,
  and the recurrence on finished gates, kernels.mlgru_scan) in plain PyTorch on CUDA too, for A/B timing
  (default 1: while training on CUDA, torch.compile'd bodies and a Triton scan saving the same tensors).
"""

from __future__ import annotations

import math
import os

from mmprof.errors import UserError

SECONDS_VARIABLES = {"MMPROF_DIST_TIMEOUT_S": 300.0, "MMPROF_TEST_TEAR_ROW_S": None}


def env_seconds(name: str, default: float | None) -> float | None:
    """A positive, finite number of seconds from the environment, or `default` when unset or empty."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise UserError(f"{name}={text!r}: must be a positive number of seconds")
    return value


def check_environment() -> None:
    """Parse every variable above now, so a bad one stops a command before anything is measured."""
    for name, default in SECONDS_VARIABLES.items():
        env_seconds(name, default)
    reference_fast_enabled()
    int8_forward_enabled()


def int8_forward_enabled() -> bool:
    """The fused forward product on int8 tensor cores: on unless MMPROF_INT8_FORWARD is 0."""
    return _switch("MMPROF_INT8_FORWARD")


def reference_fast_enabled() -> bool:
    """The reference ops' fast bodies on CUDA: on unless MMPROF_REFERENCE_FAST is 0."""
    return _switch("MMPROF_REFERENCE_FAST")


def _switch(name: str) -> bool:
    """An on/off variable, on by default (unset or empty): 1 or 0, anything else is an error."""
    text = os.environ.get(name, "").strip()
    if text not in ("", "0", "1"):
        raise UserError(f"{name}={text!r}: must be 0 or 1")
    return text != "0"


def mmprof_environment() -> dict[str, str]:
    """Every MMPROF_* variable set in this process, for a run's meta.json."""
    return {name: value for name, value in sorted(os.environ.items()) if name.startswith("MMPROF_")}
