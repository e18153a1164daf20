"""BitLinear's row steps in plain PyTorch: the same functions, arguments and results as the Triton
launchers of `bitlinear_triton.py` (see there for what each computes), used on CPU and with
backend="torch". Each rounds where the unfused model's ops round."""

import torch
import torch.nn.functional as F

from mmprof.kernels.ternary import act_quant, act_scale, rms_inv, weight_quant


def _input(prologue, x, aux, pre_weight, pre_eps, r0=None):
    """u in fp32 (rounded as the unfused ops round it), x2 or None, the prologue's rstd [N] or None."""
    if prologue == "none":
        return x.float(), None, None
    if prologue == "glu":
        a, b = x.chunk(2, dim=-1)
        return (F.silu(a) * b).float(), None, None
    src = x + aux if prologue == "add_norm" else x
    sf = src.float()
    r0 = rms_inv(sf, pre_eps).squeeze(-1) if r0 is None else r0
    u = sf * r0[:, None] * pre_weight.float()
    if prologue == "norm_gate":
        u = u * F.silu(aux.float())
    return u.to(src.dtype).float(), src if prologue == "add_norm" else None, r0


def quantize_rows(prologue, x, aux, pre_weight, norm_weights, pre_eps, eps, out_dtype, stats=None):
    r0, r, s = stats if stats is not None else (None, None, None)
    u, x2, r0 = _input(prologue, x, aux, pre_weight, pre_eps, r0)
    r = rms_inv(u, eps).squeeze(-1) if r is None else r
    uhat = u * r[:, None]
    xq, scales = [], []
    for k, g in enumerate(norm_weights):
        xn = uhat * g.float()
        scale = act_scale(xn).squeeze(-1) if s is None else s[k]
        xq.append(act_quant(xn, scale[:, None]).to(out_dtype))
        scales.append(scale)
    return torch.stack(xq), x2 if stats is None else None, r0, r, torch.stack(scales)


def quantize_rows_backward(prologue, x, aux, pre_weight, norm_weights, r0, r, d_xn, d_x2, pre_eps):
    u, _, _ = _input(prologue, x, aux, pre_weight, pre_eps, r0)
    r = r[:, None]
    uhat = u * r
    d = d_xn.float()
    v = (d * norm_weights.float()[:, None, :]).sum(0)
    d_norm = (d * uhat).sum(1)
    du = r * (v - uhat * (v * uhat).mean(-1, keepdim=True))
    if prologue == "none":
        return du.to(x.dtype), None, None, d_norm
    if prologue == "glu":
        a, b = x.float().chunk(2, dim=-1)
        sig = torch.sigmoid(a)
        silu = (a * sig).to(x.dtype).float()
        dx = torch.cat((du * b * sig * (1 + a * (1 - sig)), du * silu), dim=-1)
        return dx.to(x.dtype), None, None, d_norm
    r0, w = r0[:, None], pre_weight.float()
    if prologue == "norm_gate":
        c = aux.float()
        normed = x.float() * r0
        sc = torch.sigmoid(c)
        gate = c * sc
        dn = du * w * gate
        dg = r0 * (dn - normed * (dn * normed).mean(-1, keepdim=True))
        dc = du * normed * w * sc * (1 + c * (1 - sc))
        return dg.to(x.dtype), dc.to(aux.dtype), (du * normed * gate).sum(0), d_norm
    src = (x + aux if prologue == "add_norm" else x).float()
    xhat = src * r0
    t = du * w
    d_src = r0 * (t - xhat * (t * xhat).mean(-1, keepdim=True))
    if prologue == "add_norm":
        d_src = d_src + d_x2.float()
        return d_src.to(x.dtype), d_src.to(aux.dtype, copy=True), (du * xhat).sum(0), d_norm
    return d_src.to(x.dtype), None, (du * xhat).sum(0), d_norm


def ternary_weight(weight, dtype):
    return weight_quant(weight).to(dtype)
