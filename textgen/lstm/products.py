"""The fast path's matrix products: which library multiplies what, on which layout.

On the CPU: oneDNN with weights packed once per chunk for the per-step recurrent products (MKL's plain
addmm below about a million multiply-adds, where packing does not pay), optionally in bfloat16; oneDNN for
the large once-per-chunk products (the input projection, the weight gradients over operands the C kernel
transposes); and, for the batching server, a product whose rows agree at every batch size. fused_lstm.py,
steps.py's callers and the stepper take their products from here.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import native_kernel



def _has_packed_linear() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


_PACKED_LINEAR = _has_packed_linear()
# Below about a million multiply-adds MKL's plain float32 addmm is the fastest product on the CPU
# here (16x128 by 128x512: 23 us, packed 31, bf16 30 with its casts); above it packing wins
# (32x256: 157 plain, 113 packed, 74 packed bf16).
_SMALL_PRODUCT = 1 << 20


@functools.cache
def packs(dtype: torch.dtype) -> bool:
    """Whether oneDNN packs weights of this dtype on this CPU.

    float32 packs wherever oneDNN runs; bfloat16 needs avx512bw/vl/dq or avx_ne_convert, and
    on a CPU without them (AMD Zen 3, say) the reorder raises. So ask oneDNN once, on a tiny weight.
    """
    if not _PACKED_LINEAR or dtype not in (torch.float32, torch.bfloat16):
        return False
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(torch.zeros(4, 4, dtype=dtype), 2)
        torch.ops.mkldnn._linear_pointwise(torch.zeros(2, 4, dtype=dtype), packed, None, "none", [], "")
    except RuntimeError:
        return False
    return True


def _packed_weight(weight: torch.Tensor, batch: int):
    """weight reordered once into oneDNN's blocked layout for products with `batch` rows."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, batch)


def low_precision_product(weight: torch.Tensor, batch: int, low_precision: torch.dtype | None):
    """A function x -> x @ weight^T with x, the weight and the result in low_precision (bfloat16 or
    float16), for a weight reused at every step; None where there is no low precision, or where the
    product is small enough on the CPU that the casts would cost more than low precision saves."""
    weight = weight.detach()
    if low_precision is None or (weight.device.type == "cpu" and batch * weight.numel() <= _SMALL_PRODUCT):
        return None
    weight = weight.to(low_precision)
    if weight.device.type == "cpu" and packs(weight.dtype):
        packed, linear = _packed_weight(weight, batch), torch.ops.mkldnn._linear_pointwise
        return lambda x: linear(x, packed, None, "none", [], "")
    weight_t = weight.t()
    return lambda x: torch.mm(x, weight_t)


def recurrent_product(weight: torch.Tensor, batch: int, low_precision: torch.dtype | None = None,
                      overwrite_add: bool = False, transposed_copy: bool = False):
    """A function (x, add) -> add + x @ weight^T for a weight reused at every step.

    With overwrite_add the function may write the result into `add`, a buffer the caller
    no longer needs (saves a copy and an allocation per step). With low_precision (bfloat16
    or float16) the product runs in that dtype and its result is added in float32. With
    transposed_copy a small product uses a contiguous copy of weight^T, which MKL multiplies
    faster at one row (256x1024: 19 us against 27 for the transposed view); the generation
    stepper asks for it, the chunk loop (whose numbers resume must reproduce) does not.
    """
    weight = weight.detach()
    low = low_precision_product(weight, batch, low_precision)
    if low is not None:
        def product(x, add=None):
            out = low(x.to(low_precision)).float()
            return out if add is None else out.add_(add)
        return product
    small = weight.device.type == "cpu" and batch * weight.numel() <= _SMALL_PRODUCT
    if weight.device.type == "cpu" and not small and packs(weight.dtype):
        return _packed_product(weight, batch)
    weight_t = weight.t().contiguous() if transposed_copy and small else weight.t()

    def product(x, add=None):
        if add is None:
            return torch.mm(x, weight_t)
        return add.addmm_(x, weight_t) if overwrite_add else torch.addmm(add, x, weight_t)
    return product


# oneDNN's product with weights packed once for this many rows gave each row the same bits whatever the
# number of rows it was called with (1 to 40, measured at 2x32, 2x256 and 2x512: benchmarks/README.md,
# "Serving"), where MKL's torch.mm, and oneDNN packed for one row, change their algorithm, and a row's
# last bits, with the batch. Stepper(rows_agree=True) checks it again on its own weights.
ROW_STABLE_PACK = 16


def row_stable_product(weight: torch.Tensor, bias: torch.Tensor | None = None):
    """A function (x, add=None) -> x @ weight^T (+ bias) (+ add) whose every row has the same bits at any
    number of rows, for the batching server; None where no such product is known here (a GPU, a dtype or
    CPU oneDNN does not pack)."""
    weight = weight.detach()
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or not packs(torch.float32):
        return None
    return _packed_product(weight, ROW_STABLE_PACK, None if bias is None else bias.detach().clone())


def _packed_product(weight: torch.Tensor, rows: int, bias: torch.Tensor | None = None):
    """(x, add=None) -> x @ weight^T (+ bias) (+ add) by oneDNN, the weight packed once for `rows` rows."""
    packed, linear = _packed_weight(weight, rows), torch.ops.mkldnn._linear_pointwise

    def product(x, add=None):
        if add is None:
            return linear(x, packed, bias, "none", [], "")
        return linear.binary(x, add, packed, bias, "add")
    return product


def low_precision_mm(a: torch.Tensor, b: torch.Tensor, low_precision: torch.dtype | None,
                     dtype: torch.dtype) -> torch.Tensor:
    """a @ b as dtype, computed in low_precision when given."""
    if low_precision is None:
        return a @ b
    return (a.to(low_precision) @ b.to(low_precision)).to(dtype)


def _onednn_float32(*tensors: torch.Tensor) -> bool:
    """Whether oneDNN's float32 product serves these tensors (CPU float32, outside torch.compile)."""
    return (_PACKED_LINEAR and not torch.compiler.is_compiling()
            and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors))


def _transposed(*blocks: torch.Tensor) -> torch.Tensor:
    """The rows of the blocks (each (rows, cols), float32) one after another, transposed: (cols, all rows),
    contiguous. The C kernel's tiled transpose where it runs (three times PyTorch's copy here), else PyTorch."""
    kernel = native_kernel.for_tensors(*blocks)
    if kernel is None:
        return torch.cat(blocks).t().contiguous()
    cols, rows = blocks[0].shape[1], sum(block.shape[0] for block in blocks)
    out = blocks[0].new_empty(cols, rows)
    out_at, done = native_kernel.pointer(out, (cols, rows), "transposed"), 0
    for block in blocks:
        block = block.contiguous()
        kernel.transpose(block.shape[0], cols, native_kernel.pointer(block, (block.shape[0], cols), "block"),
                         out_at + done * 4, rows)              # its rows become columns done.. of out
        done += block.shape[0]
    return out


# Rows of grad_gates transposed at a time for the weight gradients: the block stays in cache between its
# transpose and its products, and the copies add this much to the step's peak memory, not a chunk's worth.
_WEIGHT_GRADIENT_BLOCK_BYTES = 4 << 20


def _weight_gradients(flat, h0, hs, x):
    """dL/dW_hh and dL/dW_ih in float32 on oneDNN: the sums over the T*B rows of grad_gates^T @ inputs.

    oneDNN wants that inner dimension contiguous, so blocks of rows are transposed (_transposed) and
    their products summed: at 2x256 the two take 4.4 ms a layer against 10.6 for MKL's mm on the
    transposed views (AMD EPYC; benchmarks/README.md, "Speed close to the chip").
    """
    rows, four_h = flat.shape
    B, H = h0.shape
    x_rows, hs_rows = x.reshape(rows, -1), hs.reshape(rows, H)
    block = max(1, _WEIGHT_GRADIENT_BLOCK_BYTES // (four_h * 4 * B)) * B      # whole steps: h0 starts block 0
    grad_hh = grad_ih = None
    for start in range(0, rows, block):
        end = min(rows, start + block)
        grad_t = _transposed(flat[start:end])
        h_prev_t = _transposed(h0, hs_rows[: end - B]) if start == 0 else _transposed(hs_rows[start - B : end - B])
        hh, ih = _linear(grad_t, h_prev_t), _linear(grad_t, _transposed(x_rows[start:end]))
        grad_hh, grad_ih = (hh, ih) if grad_hh is None else (grad_hh.add_(hh), grad_ih.add_(ih))
    return grad_hh, grad_ih


def _steps_before(h0: torch.Tensor, hs: torch.Tensor) -> torch.Tensor:
    """h of the step before each step, (T, B, H): h0, then hs without its last step."""
    return torch.cat([h0.unsqueeze(0), hs[:-1]])


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight^T (+ bias) for the large once-per-chunk products.

    On the CPU, in float32, oneDNN's product is 10-20% faster than MKL's (the default for
    torch.mm) on these shapes here: 4096x256 by 256x1024 takes 10.3 ms against 12.4.
    """
    if _onednn_float32(x, weight):     # (not under torch.compile: inductor lowers this op only with packed weights)
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def input_projection(x, weight_ih, bias_ih, bias_hh, low_precision):
    """x @ W_ih^T + biases for every step at once: (T, B, I) -> (T, B, 4H)."""
    T, B, I = x.shape
    bias = bias_ih + bias_hh
    if low_precision is None:
        return _linear(x.reshape(T * B, I), weight_ih, bias).view(T, B, -1)
    return low_precision_mm(x.reshape(T * B, I), weight_ih.t(), low_precision, x.dtype).add_(bias).view(T, B, -1)


