"""Cross-entropy of x @ weight.T computed chunk by chunk, never holding the [tokens, vocab] logits;
and `cross_entropy_inplace`, the reference's fused cross-entropy over given logits.

`linear_cross_entropy` is the custom op `mmprof::linear_cross_entropy_fwd` (backward
`mmprof::linear_cross_entropy_bwd`) with fake implementations. Forward walks the tokens in chunks:
one chunk's logits (in the inputs' dtype), its per-token logsumexp in fp32 and its target logits;
only x, weight, labels and the per-token logsumexp are saved. Backward recomputes each chunk's
logits, turns them in place into softmax - onehot, and accumulates grad_x and an fp32 grad_weight
chunk by chunk (scaled by grad / n_valid after the matmuls). The matmuls are cuBLAS (torch); on
CUDA the row-wise logsumexp and the in-place softmax gradient are Triton kernels that read each
logit once in its own dtype, where PyTorch would make fp32 copies of the chunk.

For the ternary lm_head, x and weight are the already fake-quantized activations and weights
(BitLinear's norm, quantization and straight-through estimator are applied by the caller).
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from mmprof.kernels._triton_util import device_guard, interpreting, select_backend
from mmprof.kernels.ternary import autocast_off, matmul_dtype


def linear_cross_entropy_ref(x, weight, labels, *, ignore_index=-100):
    """The twin: full fp32 logits, then F.cross_entropy (mean over tokens whose label is not ignored)."""
    logits = x.reshape(-1, x.shape[-1]).float() @ weight.float().T
    return F.cross_entropy(logits, labels.reshape(-1), ignore_index=ignore_index)


# ---------------------------------------------------------------------------------------------
# Triton kernels: one program per row of a chunk's logits, walking the vocabulary in blocks
# ---------------------------------------------------------------------------------------------


@triton.jit
def _logsumexp_kernel(logits_ptr, lse_ptr, V, stride, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride
    cols = tl.arange(0, BLOCK_V)
    x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
    running_max = tl.max(x, axis=0)
    running_sum = tl.sum(tl.exp(x - running_max), axis=0)
    for v0 in range(BLOCK_V, V, BLOCK_V):
        x = tl.load(base + v0 + cols, mask=v0 + cols < V, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, axis=0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
        running_max = new_max
    tl.store(lse_ptr + row, running_max + tl.log(running_sum))


@triton.jit
def _softmax_grad_kernel(logits_ptr, labels_ptr, lse_ptr, V, stride, ignore_index, BLOCK_V: tl.constexpr):
    # logits <- softmax(logits) - onehot(label), in place; zero on ignored rows
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride
    label = tl.load(labels_ptr + row)
    lse = tl.load(lse_ptr + row)
    keep = tl.where(label != ignore_index, 1.0, 0.0)
    cols = tl.arange(0, BLOCK_V)
    for v0 in range(0, V, BLOCK_V):
        ok = v0 + cols < V
        x = tl.load(base + v0 + cols, mask=ok, other=0.0).to(tl.float32)
        p = tl.exp(x - lse)
        p = tl.where(v0 + cols == label, p - 1.0, p)
        tl.store(base + v0 + cols, (p * keep).to(logits_ptr.dtype.element_ty), mask=ok)


def _block_and_warps(vocab):
    if interpreting():
        return min(triton.next_power_of_2(vocab), 32), 1
    return min(triton.next_power_of_2(vocab), 4096), 8


def _logsumexp_triton(logits, out):
    block, warps = _block_and_warps(logits.shape[1])
    _logsumexp_kernel[(logits.shape[0],)](
        logits, out, logits.shape[1], logits.stride(0), BLOCK_V=block, num_warps=warps
    )


def _softmax_grad_triton(logits, labels, lse, ignore_index):
    block, warps = _block_and_warps(logits.shape[1])
    _softmax_grad_kernel[(logits.shape[0],)](
        logits, labels, lse, logits.shape[1], logits.stride(0), ignore_index, BLOCK_V=block, num_warps=warps
    )


# ---------------------------------------------------------------------------------------------
# The same row-wise steps in plain PyTorch (CPU, or backend="torch")
# ---------------------------------------------------------------------------------------------


def _logsumexp_torch(logits, out):
    out.copy_(torch.logsumexp(logits.float(), dim=-1))


def _softmax_grad_torch(logits, labels, lse, ignore_index):
    valid = labels != ignore_index
    grad = torch.exp(logits.float() - lse[:, None])
    grad.scatter_add_(1, torch.where(valid, labels, 0)[:, None], -valid.float()[:, None])
    grad *= valid[:, None]
    logits.copy_(grad)


# ---------------------------------------------------------------------------------------------
# Chunked forward and backward, and the custom ops
# ---------------------------------------------------------------------------------------------


def _chunks(tokens, chunk_tokens):
    return [(start, min(start + chunk_tokens, tokens)) for start in range(0, tokens, chunk_tokens)]


@torch.library.custom_op("mmprof::linear_cross_entropy_fwd", mutates_args=())
def _linear_ce_fwd(
    x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int, ignore_index: int, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, H], weight [V, H], labels [N] -> (mean loss fp32 scalar, logsumexp [N] fp32)."""
    logsumexp = _logsumexp_triton if select_backend(backend, x) == "triton" else _logsumexp_torch
    lse = torch.empty(x.shape[0], device=x.device, dtype=torch.float32)
    total = torch.zeros((), device=x.device, dtype=torch.float32)
    with device_guard(x), autocast_off(x.device.type):
        for start, end in _chunks(x.shape[0], chunk_tokens):
            logits = x[start:end] @ weight.T
            logsumexp(logits, lse[start:end])
            labels_c = labels[start:end]
            valid = labels_c != ignore_index
            target = logits.gather(1, torch.where(valid, labels_c, 0)[:, None])[:, 0].float()
            total += torch.where(valid, lse[start:end] - target, 0.0).sum()
            del logits
    return total / (labels != ignore_index).sum(), lse


@_linear_ce_fwd.register_fake
def _(x, weight, labels, chunk_tokens, ignore_index, backend):
    return x.new_empty((), dtype=torch.float32), x.new_empty(x.shape[0], dtype=torch.float32)


@torch.library.custom_op("mmprof::linear_cross_entropy_bwd", mutates_args=())
def _linear_ce_bwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad_loss: torch.Tensor,
    chunk_tokens: int,
    ignore_index: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (grad_x in x's dtype, grad_weight in weight's dtype, accumulated in fp32)."""
    softmax_grad = _softmax_grad_triton if select_backend(backend, x) == "triton" else _softmax_grad_torch
    # grad / n_valid is applied to the matmul results, not to the logits gradient, whose small
    # entries (about 1 / vocab) would underflow in fp16 if scaled down first
    scale = grad_loss.float() / (labels != ignore_index).sum().clamp(min=1)
    grad_x = torch.empty_like(x)
    grad_w = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32)
    with device_guard(x), autocast_off(x.device.type):
        for start, end in _chunks(x.shape[0], chunk_tokens):
            x_c = x[start:end]
            grad_logits = x_c @ weight.T
            softmax_grad(grad_logits, labels[start:end], lse[start:end], ignore_index)
            torch.mm(grad_logits, weight, out=grad_x[start:end])
            grad_x[start:end] *= scale
            if grad_logits.dtype == torch.float32:
                grad_w.addmm_(grad_logits.T, x_c)
            else:
                grad_w += grad_logits.T @ x_c
            del grad_logits
    grad_w *= scale
    return grad_x, grad_w.to(weight.dtype)


@_linear_ce_bwd.register_fake
def _(x, weight, labels, lse, grad_loss, chunk_tokens, ignore_index, backend):
    return torch.empty_like(x), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, weight, labels, chunk_tokens, ignore_index, backend = inputs
    _, lse = output
    ctx.save_for_backward(x, weight, labels, lse)
    ctx.options = (chunk_tokens, ignore_index, backend)


def _backward(ctx, grad_loss, _grad_lse):
    x, weight, labels, lse = ctx.saved_tensors
    grad_x, grad_w = _linear_ce_bwd(x, weight, labels, lse, grad_loss, *ctx.options)
    return grad_x, grad_w, None, None, None, None


_linear_ce_fwd.register_autograd(_backward, setup_context=_setup_context)




def linear_cross_entropy(x, weight, labels, *, chunk_tokens=4096, ignore_index=-100, backend="auto"):
    """Mean cross-entropy of x @ weight.T against labels, over tokens whose label is not ignore_index.

    x [..., H], weight [V, H], labels [...] (int64). Peak extra memory is one chunk of
    chunk_tokens x V logits instead of all of them. Returns an fp32 scalar (NaN when every label is
    ignored, as F.cross_entropy). backend: "auto" (Triton on CUDA) | "triton" | "torch".
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    hidden = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != hidden:
        raise ValueError(f"weight must be [vocab, {hidden}], got {tuple(weight.shape)}")
    x = x.reshape(-1, hidden)
    labels = labels.reshape(-1)
    if labels.shape[0] != x.shape[0]:
        raise ValueError(f"labels give {labels.shape[0]} tokens, x gives {x.shape[0]}")
    dtype = matmul_dtype(x, weight)
    x, weight = x.to(dtype).contiguous(), weight.to(dtype).contiguous()
    loss, _ = _linear_ce_fwd(x, weight, labels.contiguous(), int(chunk_tokens), int(ignore_index), backend)
    return loss


# ---------------------------------------------------------------------------------------------
# Cross-entropy over given logits, gradient written into them (the reference's FusedCrossEntropyLoss)
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("mmprof::logsumexp_rows", mutates_args=("out",))
def _logsumexp_rows(logits: torch.Tensor, out: torch.Tensor, chunk_rows: int, backend: str) -> None:
    """out [N] fp32 <- logsumexp of each row of logits [N, V]: one Triton launch reading the logits in
    their dtype, or PyTorch on `chunk_rows` rows at a time (fp32 copies of one chunk)."""
    with device_guard(logits), autocast_off(logits.device.type):
        if select_backend(backend, logits) == "triton" and logits.numel() > 0:
            _logsumexp_triton(logits, out)
        else:
            for start, end in _chunks(logits.shape[0], chunk_rows):
                _logsumexp_torch(logits[start:end], out[start:end])


@_logsumexp_rows.register_fake
def _(logits, out, chunk_rows, backend):
    # what the GPU's Triton kernel allocates (nothing): the memory of a meta or fake-tensor trace must
    # not depend on PyTorch's chunk loop, whose number of fp32 chunk copies grows with the rows
    return None


@torch.library.custom_op("mmprof::softmax_grad_rows_", mutates_args=("logits",))
def _softmax_grad_rows(
    logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, ignore_index: int, chunk_rows: int, backend: str
) -> None:
    """logits [N, V] <- softmax(logits) - onehot(labels) in place (zero on ignored rows), as above."""
    with device_guard(logits), autocast_off(logits.device.type):
        if select_backend(backend, logits) == "triton" and logits.numel() > 0:
            _softmax_grad_triton(logits, labels, lse, ignore_index)
        else:
            for start, end in _chunks(logits.shape[0], chunk_rows):
                _softmax_grad_torch(logits[start:end], labels[start:end], lse[start:end], ignore_index)


@_softmax_grad_rows.register_fake
def _(logits, labels, lse, ignore_index, chunk_rows, backend):
    return None


class _CrossEntropyInplace(torch.autograd.Function):
    """Keeps the logits (in their own dtype), one fp32 logsumexp per row and the labels, as the
    reference's `CrossEntropyLossFunction` with `inplace_backward=True`; backward overwrites the
    logits with their gradient and returns them. The row-wise steps are the custom ops above."""

    @staticmethod
    def forward(ctx, logits, labels, ignore_index, chunk_rows, backend):
        lse = torch.empty(logits.shape[0], device=logits.device, dtype=torch.float32)
        valid = labels != ignore_index
        target = logits.gather(1, torch.where(valid, labels, 0)[:, None])[:, 0].float()
        _logsumexp_rows(logits, lse, chunk_rows, backend)
        loss = torch.where(valid, lse - target, 0.0).sum() / valid.sum()
        ctx.save_for_backward(logits, lse, labels)
        ctx.options = (ignore_index, chunk_rows, backend)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits, lse, labels = ctx.saved_tensors
        ignore_index, chunk_rows, backend = ctx.options
        scale = grad_loss.float() / (labels != ignore_index).sum().clamp(min=1)
        _softmax_grad_rows(logits, labels, lse, ignore_index, chunk_rows, backend)
        with autocast_off(logits.device.type):
            logits.mul_(scale.to(logits.dtype))
        return logits, None, None, None, None


def cross_entropy_inplace(logits, labels, *, ignore_index=-100, chunk_rows=1024, backend="auto"):
    """Mean cross-entropy of logits [N, V] against labels [N]; keeps the logits and writes their
    gradient into them in backward (no second [N, V] tensor). The logits must not be needed after
    backward. Without Triton, rows are processed `chunk_rows` at a time (fp32 copies of one chunk)."""
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"need logits [N, V] and labels [N]; got {tuple(logits.shape)} and {tuple(labels.shape)}")
    return _CrossEntropyInplace.apply(logits.contiguous(), labels.contiguous(), int(ignore_index),
                                      int(chunk_rows), backend)

