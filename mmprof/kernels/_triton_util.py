"""What the Triton kernels share: backend choice, autotune configs, grid sizing.

Triton runs on CUDA tensors, and on CPU tensors only when its interpreter was requested
(TRITON_INTERPRET=1 set before triton is imported), which is how CI tests the kernels.
"""

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

BACKENDS = ("auto", "triton", "torch")


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter instead of compiling for a GPU."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def select_backend(backend: str, tensor: torch.Tensor) -> str:
    """Resolve "auto" | "triton" | "torch" to the implementation that runs for `tensor`.

    "auto" is Triton on CUDA tensors and plain PyTorch everywhere else (CPU, meta). "triton" on a
    CPU tensor needs the interpreter; asking for it without one is an error, not a silent fallback.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if tensor.is_cuda:
        return "triton"
    if backend == "triton":
        if tensor.device.type == "cpu" and interpreting():
            return "triton"
        raise ValueError(
            f"backend='triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set "
            f"before triton is imported); got a tensor on {tensor.device}"
        )
    return "torch"


def autotune_configs(gpu: list[tuple[dict, int]], interpret: dict):
    """Configs to autotune over: the (meta-parameters, num_warps) pairs of `gpu` on a GPU, the single
    `interpret` one under the interpreter (autotuning needs a GPU to time on)."""
    if interpreting():
        return [triton.Config(dict(interpret), num_warps=1)]
    return [triton.Config(dict(meta), num_warps=warps) for meta, warps in gpu]


def pdl_supported(tensor: torch.Tensor) -> bool:
    """Whether kernels on `tensor`'s device can be launched with programmatic dependent launch
    (Hopper and later, compiled, a Triton that has `griddepcontrol`): the next launch in the stream
    may start while this one runs, and waits (`gdc_wait`) before it reads what this one wrote."""
    if interpreting() or not tensor.is_cuda or not hasattr(tl.extra.cuda, "gdc_wait"):
        return False
    return torch.cuda.get_device_capability(tensor.device)[0] >= 9


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def persistent_programs(device: torch.device, rows: int, per_sm: int = 8) -> int:
    """How many programs a row-looping kernel launches: a few per SM on a GPU, at most `rows`."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return max(1, min(rows, _sm_count(index) * per_sm))
    return max(1, min(rows, 4))


def device_guard(tensor: torch.Tensor):
    """Launch on the tensor's GPU (Triton launches on the current device), a no-op elsewhere."""
    if tensor.is_cuda:
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


def row_block(features: int) -> tuple[int, int]:
    """Block width (the whole row, a power of two) and warps for a one-row-per-program kernel."""
    block = triton.next_power_of_2(features)
    return block, 1 if interpreting() else min(16, max(1, block // 256))


@triton.jit
def round_half_even(v):
    """torch.round's rounding (half to even) from floor and a tie test: the interpreter has no rint."""
    r = tl.floor(v + 0.5)
    tie = (r - v) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(tie & odd, r - 1.0, r)
