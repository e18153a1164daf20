"""The ternary arithmetic every BitLinear implementation and kernel shares, in plain PyTorch.

    xn = x * rsqrt(mean(x^2) + eps) * g          RMSNorm over the last dim
    xq = round(xn * s).clamp(-128, 127) / s      s = 127 / max(max|xn|, 1e-5), per row (8-bit activations)
    wq = round(W * t).clamp(-1, 1) / t           t = 1 / max(mean|W|, 1e-5), per tensor (ternary weights)

plus the dtype BitLinear's matmul runs in (autocast's when on, else the promoted dtype) and the
unfused `bitlinear_naive`. This module imports no other file of `mmprof.kernels`; they import it.
"""

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor

NORM_EPS = 1e-8       # BitLinear's own RMSNorm in the reference's unfused class (ops/bitnet.py)
REF_FUSED_EPS = 1e-6  # what the reference's FusedBitLinear (its published model class) really uses
ACT_LEVELS = 127.0
SCALE_FLOOR = 1e-5


def rms_inv(xf: Tensor, eps: float = NORM_EPS) -> Tensor:
    """1 / rms over the last dim, keepdim; xf is fp32."""
    return torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm over the last dim computed in fp32; result in x's dtype."""
    xf = x.float()
    return (xf * rms_inv(xf, eps) * weight.float()).to(x.dtype)


def act_scale(xn: Tensor) -> Tensor:
    """Per-row 8-bit scale 127 / max|xn|, keepdim."""
    return ACT_LEVELS / xn.abs().amax(-1, keepdim=True).clamp(min=SCALE_FLOOR)


def act_quant(xn: Tensor, scale: Tensor) -> Tensor:
    """Quantize to int8 levels and back: round(xn * s).clamp(-128, 127) / s."""
    return (xn * scale).round().clamp(-128, 127) / scale


def weight_quant(w: Tensor) -> Tensor:
    """Ternary weights with one scale per tensor: round(W / mean|W|).clamp(-1, 1) * mean|W|."""
    scale = 1.0 / w.abs().mean().clamp(min=SCALE_FLOOR)
    return (w * scale).round().clamp(-1, 1) / scale


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype active for this device type, or None. Meta has no autocast: there it is the
    dtype of the torch-function mode standing in for it (workloads/precision.py `MetaAutocast`, found
    by its `meta_autocast_dtype`), so that an op choosing its own matmul dtype on meta chooses what it
    would on a GPU under autocast."""
    if device_type == "meta":
        for mode in reversed(torch.overrides._get_current_function_mode_stack()):
            dtype = getattr(mode, "meta_autocast_dtype", None)
            if dtype is not None:
                return dtype
        return None
    return _real_autocast_dtype(device_type)


def _real_autocast_dtype(device_type: str) -> torch.dtype | None:
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except RuntimeError:  # a device type autocast does not know
        return None
    return None


def matmul_dtype(x: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype BitLinear's matmul runs in: autocast's if on, else promote(x, W)."""
    cast = autocast_dtype(x.device.type)
    return cast if cast is not None else torch.promote_types(x.dtype, weight.dtype)


@contextlib.contextmanager
def autocast_off(device_type: str):
    """Run inner ops in exactly the dtypes they are given (the op chose its matmul dtype)."""
    if _real_autocast_dtype(device_type) is None:
        yield
    else:
        with torch.autocast(device_type=device_type, enabled=False):
            yield


def bitlinear_naive(x: Tensor, norm_weight: Tensor, weight: Tensor, eps: float = NORM_EPS) -> Tensor:
    """The textbook BitLinear: every step a plain op in fp32, straight-through estimators via detach;
    autograd keeps x, fp32 x * rstd, the fp32 normalised and quantised x and the matmul operands."""
    xf = x.float()
    xn = xf * rms_inv(xf, eps) * norm_weight.float()
    xq = xn + (act_quant(xn, act_scale(xn)) - xn).detach()
    wq = weight + (weight_quant(weight) - weight).detach()
    mm = matmul_dtype(x, weight)
    return F.linear(xq.to(mm), wq.to(mm))
