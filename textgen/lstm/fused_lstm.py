"""The LSTM layer's fast path: the same function as model.lstm_cell, step by step, computed fast.

Only textgen.lstm.model imports this file (model.py keeps the reference cell and the modules); it
takes its matrix products from products.py, a step's pointwise work from steps.py, and from
native_kernel the C kernel, which also runs a small layer's whole time loop.

One layer over a chunk of T steps, in the style of torch-rnn:

* the input projection of all steps is one matrix product (``input_projection``);
* a forward time loop (``recurrent_forward``) does, per step, one small recurrent product
  (``recurrent_product``: on the CPU, oneDNN with the weight packed once per chunk, or MKL's
  addmm for small products) and the step's pointwise work;
* a backward time loop (``recurrent_backward``) does the same in reverse, and the weight
  gradients of all steps are then three large products (``FusedLSTMLayer.backward``);
* for a small layer (a product of a few million multiply-adds or less) the C kernel runs
  the whole time loop, forward or backward, in one call with its own products.

A step's pointwise work has two backends behind one interface (steps.py). Optionally the matrix
products run in bfloat16 or float16 (``low_precision``) while the cell state and all pointwise work
stay float32.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

from . import buffers, native_kernel, products
from .products import (_linear, _onednn_float32, _steps_before, _weight_gradients, input_projection,
                       low_precision_mm, low_precision_product, recurrent_product)
from .steps import _kernel_backward_steps_bf16, _kernel_forward_steps_bf16, backward_steps, forward_steps


# ---------------------------------------------------------------------------
# The time loops and the autograd Function
# ---------------------------------------------------------------------------

# The input projection's block of steps on the blocked path: a few MB, still in cache when its steps read it.
_PROJECTION_BLOCK_BYTES = 4 << 20
# Gates of this size or more take the blocked path (glibc maps them afresh at every chunk); below it the
# whole projection at once is as fast and holds a block's 4 MB less (2x256, 2x512 64x50: 16 and 26 MB).
_BLOCKED_FROM_BYTES = 32 << 20


class LayerForward(NamedTuple):
    """What one layer's forward pass over a chunk leaves. With bfloat16 products and a backward pass to come,
    what that pass reads is kept in bfloat16 (``keeps_bf16``): the activations, and h and x as its
    weight-gradient products read them anyway, so that the float32 h (the output) and x need not be kept."""
    gates: torch.Tensor                 # (T, B, 4H) the activations i, f, g, o: float32, or bfloat16 (keeps_bf16)
    hs: torch.Tensor                    # (T, B, H) h of every step, float32: the layer's output
    c_last: torch.Tensor                # (B, H) the final c
    cs: torch.Tensor | None             # (T, B, H) c of every step, float32, where a backward pass will need it
    h_low: torch.Tensor | None = None   # (T + 1, B, H) h0 and every step's h in bfloat16 (keeps_bf16)
    x_low: torch.Tensor | None = None   # (T, B, I) the input in bfloat16 (keeps_bf16)


def keeps_bf16(keep_for_backward, low_precision) -> bool:
    """Whether a layer keeps what its backward pass reads in bfloat16: with bfloat16 products, in training.

    The cell state stays float32 (its rounding would reach every later step); the activations are kept so
    that each of a and 1 - |a| keeps 8 significant bits (native_kernel.kept_bf16: rounded plainly, a gate
    above 0.998 reads as 1 and its derivative as 0, and a forget gate biased to 7 lost 14% of its bias
    gradient), and the backward's pointwise work reads them back in float32; h and x are rounded just as
    the weight-gradient products round them (the same numbers). Half the bytes of each: at 3x512, 64
    streams of 128 steps, a layer keeps 64 MB instead of 112 (nn.LSTM under bf16 autocast ~59 MB)."""
    return keep_for_backward and low_precision is torch.bfloat16


def layer_forward(x, h, c, weight_ih, weight_hh, bias_ih, bias_hh, keep_for_backward,
                  low_precision=None) -> LayerForward:
    """One layer's forward over a chunk: the input projection and the time loop (LayerForward).

    A float32 layer whose gates take 32 MB or more, with the C kernel's steps, projects its input a block of
    steps at a time (each block a few MB, read while still in cache) instead of into one (T, B, 4H) tensor,
    and writes the activations into a buffer of buffers.py: such a tensor came from pages glibc mapped
    afresh at every chunk, which the kernel had to fault in and zero (3x512, 64 streams of 128 steps:
    9,420 -> 10,904 chars/s; AMD EPYC, benchmarks/README.md). The C kernel's bfloat16 steps always do so."""
    T, B, I = x.shape
    H = weight_hh.shape[1]
    keep_low = keeps_bf16(keep_for_backward, low_precision)
    x_low = x.to(torch.bfloat16) if keep_low else None         # what the weight gradient of W_ih reads
    product = _bf16_kernel_product(x, c, weight_hh, low_precision)
    if product is not None:
        return _bf16_forward(x if x_low is None else x_low, h, c, weight_ih, product, bias_ih + bias_hh,
                             keep_for_backward, x_low)
    kernel = native_kernel.for_tensors(x, c, weight_hh) if low_precision is None else None
    if (kernel is None or _chunk_kernel(x, c, weight_hh, None) is not None
            or T * B * 4 * H * 4 < _BLOCKED_FROM_BYTES):
        if low_precision is not None and x.device.type == "cpu":
            x_proj = _low_precision_projection(x if x_low is None else x_low, weight_ih, bias_ih + bias_hh,
                                               low_precision, keep_for_backward)
        else:
            x_proj = input_projection(x, weight_ih, bias_ih, bias_hh, low_precision)
        return recurrent_forward(x_proj, h, c, weight_hh, keep_for_backward, low_precision)._replace(x_low=x_low)
    keep = keep_for_backward                # (training's sizes repeat; a prompt's vary: its buffers are not kept)
    gates, hs = buffers.empty((T, B, 4 * H), x, keep=keep), buffers.empty((T, B, H), x, keep=keep)
    cs = buffers.empty((T if keep_for_backward else 1, B, H), x, keep=keep)
    step, _ = forward_steps(gates, c, hs, cs)               # the C kernel's: it scales nothing (g_scale 1)
    recurrent = recurrent_product(weight_hh, B, None, overwrite_add=True)
    bias, block = bias_ih + bias_hh, max(1, _PROJECTION_BLOCK_BYTES // (B * 4 * H * 4))
    for start in range(0, T, block):
        projected = _linear(x[start : start + block].reshape(-1, I), weight_ih, bias).view(-1, B, 4 * H)
        for t, pre in enumerate(projected.unbind(0), start):
            h = step(t, recurrent(h, pre))
    return LayerForward(gates, hs, cs[-1], cs if keep_for_backward else None)


def _bf16_forward(x, h, c, weight_ih, product, bias, keep_for_backward, x_low):
    """layer_forward with the C kernel's bfloat16 steps: each block of steps (a few MB) projected in bfloat16
    (widened, the bias added in float32: input_projection's numbers) into one float32 buffer, then its steps
    run, each adding h_{t-1} W_hh^T in bfloat16 (product: _bf16_kernel_product's, its weight packed once).
    In training the activations and h are kept in bfloat16."""
    T, B, I = x.shape
    H = c.shape[1]
    bf16, keep = torch.bfloat16, keep_for_backward
    kept_steps = T if keep_for_backward else 1
    hs = c.new_empty(T, B, H)          # the output, kept by nothing here: its memory serves other work after it
    cs = buffers.empty((kept_steps, B, H), c, keep=keep)
    gates = buffers.empty((kept_steps, B, 4 * H), c, bf16, keep=keep)      # one slot where nothing reads them
    h_low = buffers.empty((T + 1 if keep_for_backward else 2, B, H), c, bf16, keep=keep)
    h_low[0].copy_(h)
    block = max(1, _PROJECTION_BLOCK_BYTES // (B * 4 * H * 4))
    pre, weight_t = c.new_empty(min(block, T), B, 4 * H), weight_ih.t().to(bf16)
    step, h = _kernel_forward_steps_bf16(native_kernel.load(), gates, c, hs, cs, h_low), h_low[0]
    for start in range(0, T, block):
        steps = pre[: min(block, T - start)]
        steps.view(-1, 4 * H).copy_(x[start : start + block].reshape(-1, I).to(bf16) @ weight_t).add_(bias)
        for t, pre_t in enumerate(steps.unbind(0), start):
            h = step(t, pre_t, product(h))
    if not keep_for_backward:
        return LayerForward(gates, hs, cs[-1], None)
    return LayerForward(gates, hs, cs[-1], cs, h_low, x_low)


def _low_precision_projection(x, weight_ih, bias, low_precision, keep):
    """input_projection with low-precision products, rounded as it rounds (_low_precision_rows), into a buffer
    of buffers.py: without a (T, B, 4H) tensor and its low-precision twin from fresh pages. x may come in low
    precision already."""
    T, B, I = x.shape
    four_h = weight_ih.shape[0]
    gates = buffers.empty((T, B, four_h), bias, keep=keep)
    _low_precision_rows(x.reshape(T * B, I), weight_ih.t().to(low_precision), gates.view(T * B, four_h), bias)
    return gates


def _low_precision_rows(rows, weight, out, bias=None):
    """out (float32) = rows @ weight (+ bias), the product in weight's low precision and widened a few MB of
    rows at a time, so that the whole product's low-precision twin never exists (grad x at 3x512, 64 streams
    of 128 steps: 8 MB); the bias added in float32 after widening, as low_precision_mm and input_projection
    round. (A block of one or two rows may round a value one bf16 step apart from the whole product.)"""
    block = max(1, _PROJECTION_BLOCK_BYTES // (out.shape[1] * 4))
    for start in range(0, rows.shape[0], block):
        part = out[start : start + block].copy_(rows[start : start + block].to(weight.dtype) @ weight)
        if bias is not None:        # (torch.add(out=) of a bfloat16 and a float32 tensor gives the same numbers
            part.add_(bias)         # in one pass, but 2-5 times slower here)
    return out


def recurrent_forward(x_proj, h, c, weight_hh, keep_for_backward, low_precision=None) -> LayerForward:
    """The forward time loop, shared by training and inference, over the whole chunk's projection.

    x_proj (T, B, 4H) holds x W_ih^T + biases on entry and each step's activations on return (its slice is
    spent once the step's product has read it), unless they are kept in bfloat16 (keeps_bf16): then in a
    tensor of their own, the LayerForward's gates.
    """
    T, B, four_h = x_proj.shape
    H = four_h // 4
    keep_low = keeps_bf16(keep_for_backward, low_precision)
    hs = buffers.empty((T, B, H), x_proj, keep=keep_for_backward and not keep_low)     # (as in _bf16_forward)
    cs = buffers.empty((T if keep_for_backward else 1, B, H), x_proj, keep=keep_for_backward)
    kept_cs = cs if keep_for_backward else None
    kernel = _chunk_kernel(x_proj, c, weight_hh, low_precision)
    if kernel is not None:              # a small layer: the whole time loop in one C call
        h, c = h.contiguous(), c.contiguous()          # held here: the kernel reads them after pointer() returns
        pointer, threads, bf16 = native_kernel.pointer, int(native_kernel.threads_pay_here()), torch.bfloat16
        gates = buffers.empty((T, B, four_h), x_proj, bf16) if keep_low else x_proj
        common = (pointer(x_proj, (T, B, four_h), "gates"),
                  pointer(gates, (T, B, four_h), "gates kept", bf16) if keep_low else None,
                  pointer(h, (B, H), "h0"), pointer(c, (B, H), "c0"),
                  pointer(hs, (T, B, H), "hs"), pointer(cs, (cs.shape[0], B, H), "cs"),
                  B * H if keep_for_backward else 0)
        if _bf16_chunk(kernel, weight_hh, low_precision):      # h0 and every h in bfloat16, as the products read them
            slots = T + 1 if keep_low else 2                   # (else the steps take turns in two)
            panels, h_low = native_kernel.panels_bf16(weight_hh), h.new_empty(slots, B, H, dtype=bf16)
            kernel.forward_chunk_bf16(T, B, H, pointer(panels, tuple(panels.shape), "W_hh panels", bf16),
                                      *common, pointer(h_low, (slots, B, H), "h in bfloat16", bf16), slots, threads)
            return LayerForward(gates, hs, cs[-1], kept_cs, h_low if keep_low else None)
        panels = native_kernel.panels(weight_hh)
        kernel.forward_chunk(T, B, H, pointer(panels, tuple(panels.shape), "W_hh panels"), *common, threads)
        return LayerForward(gates, hs, cs[-1], kept_cs, _rounded_steps(h, hs) if keep_low else None)
    step, g_scale = forward_steps(x_proj, c, hs, cs)
    if g_scale != 1:                                          # the backend scaled x_proj's g rows: scale ours
        weight_hh = weight_hh.detach().clone()
        weight_hh[2 * H : 3 * H].mul_(g_scale)
    recurrent = recurrent_product(weight_hh, B, low_precision, overwrite_add=True)   # x_proj[t] is spent
    pre_activations, h0 = x_proj.unbind(0), h
    for t in range(T):
        h = step(t, recurrent(h, pre_activations[t]))      # (B, 4H) pre-activations, then the pointwise work
    if keep_low:
        return LayerForward(native_kernel.kept_bf16(x_proj), hs, cs[-1], cs, _rounded_steps(h0, hs))
    return LayerForward(x_proj, hs, cs[-1], kept_cs)


def _rounded_steps(h0, hs):
    """h0 and every step's h in bfloat16, (T + 1, B, H): what the bfloat16 weight-gradient products read."""
    out = hs.new_empty(hs.shape[0] + 1, *hs.shape[1:], dtype=torch.bfloat16)
    out[0].copy_(h0)
    out[1:].copy_(hs)
    return out


# Float32 recurrent products of at most this many multiply-adds run their chunk's time loop in C, with the
# kernel's own products. Since the loops' threads share the hidden units (one wait a step), side by side
# against oneDNN's product and the Python loop: 2x256 at 32 streams (8.4M) 1.20x, 2x128 at 128 (8.4M) 1.14x,
# 2x256 at 48 (12.6M) 1.10x, 2x512 at 16 (16.8M) 1.03x; at 33.5M (2x512 at 32, 2x256 at 128) 0.95x and
# 0.89x (AMD EPYC; benchmarks/README.md). Before that the loops won only up to 4.2M.
_CHUNK_PRODUCT = 1 << 24


def _chunk_kernel(gates, c, weight_hh, low_precision):
    """The C kernel where a chunk's whole time loop runs in it (lstm_forward_chunk, lstm_backward_chunk), else
    None: where the pointwise kernel runs and the recurrent product is float32 and small (_CHUNK_PRODUCT),
    so that a library's product costs more in dispatch than in arithmetic and the Python loop as much again.
    With low precision asked for, only where a library's product would stay float32 (_SMALL_PRODUCT): the
    loops' products are then float32 too, or bfloat16 where the kernel has AVX512-BF16 (_bf16_chunk)."""
    limit = _CHUNK_PRODUCT if low_precision is None else min(_CHUNK_PRODUCT, products._SMALL_PRODUCT)
    if gates.shape[1] * weight_hh.numel() > limit:
        return None
    return native_kernel.for_tensors(gates, c, weight_hh)


def _bf16_chunk(kernel, weight_hh, low_precision) -> bool:
    """Whether the whole-chunk loops run their recurrent products in bfloat16 (lstm_forward_chunk_bf16):
    bfloat16 asked, the kernel built for a CPU with AVX512-BF16, H a whole number of panels. Elsewhere the
    chunk loops' products stay float32, as a product this small does on the bf16 path."""
    return low_precision is torch.bfloat16 and kernel.bf16_dot and weight_hh.shape[1] % native_kernel.PANEL == 0


def recurrent_backward_chunk(kernel, gates, cs, c0, grad_hs, grad_h, grad_c, weight_hh, low_precision=None,
                             overwrite=False):
    """recurrent_backward in one C call (lstm_backward_chunk): dL/d(pre-activations) (T, B, 4H), dL/dh0,
    dL/dc0 and dL/dbias. The activations may come in bfloat16 (keeps_bf16); the pre-activation gradients go
    out in bfloat16 where the loop's products are bfloat16 (_bf16_chunk), what every product that reads them
    would round them to, else in float32: over the activations where overwrite and the dtypes agree."""
    T, B, four_h = gates.shape
    H = four_h // 4
    pointer, bf16, threads = native_kernel.pointer, torch.bfloat16, int(native_kernel.threads_pay_here())
    grad_bias = cs.new_zeros(four_h)
    grad_h = grad_h.clone(memory_format=torch.contiguous_format)          # the kernel updates both in place
    grad_c = grad_c.clone(memory_format=torch.contiguous_format)
    c0 = c0.contiguous()
    low_gates = gates.dtype is bf16                         # kept in bfloat16 (keeps_bf16)
    gates_at = pointer(gates, (T, B, four_h), "gates", bf16 if low_gates else torch.float32)
    state = (pointer(cs, (T, B, H), "cs"), pointer(c0, (B, H), "c0"), pointer(grad_hs, (T, B, H), "grad_hs"),
             pointer(grad_h, (B, H), "grad_h"), pointer(grad_c, (B, H), "grad_c"))
    # dh_prev = dgates @ W_hh: W_hh^T's rows are the outputs
    if _bf16_chunk(kernel, weight_hh, low_precision):
        grad_gates, panels = _gradient_buffer(gates, cs, bf16, overwrite), native_kernel.panels_bf16(weight_hh.t())
        kernel.backward_chunk_bf16(T, B, H, pointer(panels, tuple(panels.shape), "W_hh^T panels", bf16),
                                   gates_at, *state,
                                   pointer(grad_gates, (T, B, four_h), "grad_gates", bf16),
                                   pointer(grad_bias, (four_h,), "grad_bias"), threads)
    else:
        grad_gates, panels = _gradient_buffer(gates, cs, cs.dtype, overwrite), native_kernel.panels(weight_hh.t())
        scratch = cs.new_empty(B, H)
        kernel.backward_chunk(T, B, H, pointer(panels, tuple(panels.shape), "W_hh^T panels"),
                              None if low_gates else gates_at, gates_at if low_gates else None, *state,
                              pointer(grad_gates, (T, B, four_h), "grad_gates"),
                              pointer(grad_bias, (four_h,), "grad_bias"),
                              pointer(scratch, (B, H), "scratch"), threads)
    return grad_gates, grad_h, grad_c, grad_bias


def _gradient_buffer(gates, like, dtype, overwrite):
    """Where the gate gradients go: over the activations themselves where overwrite and the dtypes agree (the
    C kernel reads each of a row's activations before it writes that row's gradients, at the same index, and
    nothing reads them after), else a buffer of their own."""
    return gates if overwrite and gates.dtype is dtype else buffers.empty(gates.shape, like, dtype)


def _bf16_kernel_product(gates, c, weight, low_precision):
    """The bfloat16 step product for the C kernel's bfloat16 steps (x -> x @ weight^T, all bfloat16),
    or None where those steps do not run: no kernel, another precision, or a product small enough to
    stay float32 (low_precision_product)."""
    if low_precision is not torch.bfloat16 or native_kernel.for_tensors(gates, c) is None:
        return None
    return low_precision_product(weight, gates.shape[1], low_precision)


def recurrent_backward_bf16(gates, cs, c0, grad_hs, grad_h, grad_c, product_t, overwrite=False):
    """recurrent_backward for the C kernel's bfloat16 steps, from the activations they kept in bfloat16:
    dL/d(pre-activations) (T, B, 4H) in bfloat16 (over the activations where overwrite), dL/dh0, dL/dc0 and
    dL/dbias. product_t: x -> x @ W_hh in bfloat16 (low_precision_product)."""
    T = gates.shape[0]
    grad_gates = _gradient_buffer(gates, cs, torch.bfloat16, overwrite)
    step, finish = _kernel_backward_steps_bf16(native_kernel.load(), gates, cs, c0, grad_gates, grad_c)
    grad_gate_steps, grad_hs_steps = grad_gates.unbind(0), grad_hs.unbind(0)
    step(T - 1, grad_h, None)
    for t in range(T - 2, -1, -1):
        step(t, grad_hs_steps[t], product_t(grad_gate_steps[t + 1]))    # dL/dh_t: from above and from step t+1
    grad_c0, grad_bias = finish()
    return grad_gates, product_t(grad_gate_steps[0]).float(), grad_c0, grad_bias


def recurrent_backward(gates, cs, c0, grad_hs, grad_h, grad_c, recurrent_t, overwrite=False):
    """The backward time loop: dL/d(pre-activations) (T, B, 4H), dL/dh0, dL/dc0 and dL/dbias. Over the
    activations where overwrite and the C kernel's steps run (PyTorch's read a block's activations after
    writing its gradients)."""
    T = gates.shape[0]
    overwrite = overwrite and native_kernel.for_tensors(gates, grad_c) is not None
    grad_gates = _gradient_buffer(gates, cs, cs.dtype, overwrite)     # (float32 also where gates are bfloat16)
    step, finish = backward_steps(gates, cs, c0, grad_gates, grad_c)
    grad_gate_steps, grad_hs_steps = grad_gates.unbind(0), grad_hs.unbind(0)
    for t in range(T - 1, -1, -1):
        step(t, grad_h)
        # dL/dh_{t-1}: through the recurrent weight, plus what reached h_{t-1} from above
        grad_h = recurrent_t(grad_gate_steps[t], grad_hs_steps[t - 1]) if t > 0 else recurrent_t(grad_gate_steps[t])
    grad_c0, grad_bias = finish()
    return grad_gates, grad_h, grad_c0, grad_bias


def _graph_let_go() -> bool:
    """Whether the backward pass running now is its graph's last (neither retain_graph nor create_graph), so
    that what a layer saved may be overwritten: PyTorch's own flag where it has one, else taken as not. (A
    post-hook on the layer's node that reads its saved tensors then finds gate gradients in the activations.)"""
    try:
        return not torch._C._autograd._get_current_graph_task_keep_graph()
    except (AttributeError, RuntimeError):
        return False


class FusedLSTMLayer(torch.autograd.Function):
    """One LSTM layer over a chunk with a hand-written backward pass."""

    @staticmethod
    def forward(ctx, x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, low_precision=None, residual=False):
        run = layer_forward(x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, True, low_precision)
        # The activations, c and the bfloat16 h and x are intermediates; saved here, not kept on ctx, autograd
        # lets them go as soon as this backward has run (unless the graph is retained), so that the layers
        # below reuse their memory for their own backward (buffers.py). With bfloat16 kept, the float32 x and
        # h are not: backward reads their roundings.
        keeps_low = run.h_low is not None
        ctx.save_for_backward(None if keeps_low else x, h0, c0, weight_ih, weight_hh, None if keeps_low else run.hs,
                              run.gates, run.cs, run.h_low, run.x_low)
        ctx.low_precision, ctx.residual = low_precision, residual
        # Outputs are copies: h_last must not be a view of another output, and c_last must not
        # be a view of the saved cs, or output -> grad_fn -> cs -> output is a cycle that keeps
        # every chunk's graph alive (a memory leak).
        h_last, c_last = run.hs[-1].clone(), run.c_last.clone()
        return _with_residual(run.hs, x, residual, in_place=keeps_low), h_last, c_last

    @staticmethod
    @once_differentiable       # the backward is hand-written: a second derivative through it would be wrong
    def backward(ctx, grad_out, grad_h_last, grad_c_last):
        grad_hs = grad_out                  # (with residual, out = hs + x: hs's gradient is out's)
        x, h0, c0, weight_ih, weight_hh, hs, gates, cs, h_low, x_low = ctx.saved_tensors
        # (gates: the activations (T, B, 4H); cs: the cell states (T, B, H))
        T, B, four_h = gates.shape
        H, I = four_h // 4, weight_ih.shape[1]
        grad_hs = cs.new_zeros(T, B, H) if grad_hs is None else grad_hs.contiguous()
        grad_h = grad_hs[-1] if grad_h_last is None else grad_hs[-1] + grad_h_last
        grad_c = torch.zeros_like(c0) if grad_c_last is None else grad_c_last
        low = ctx.low_precision
        # Where this pass is the graph's last, the gate gradients overwrite the activations: one (T, B, 4H)
        # buffer fewer at the backward's peak (3x512, 64 streams of 128 steps: 32 MB in bfloat16, 64 in float32).
        overwrite = _graph_let_go()
        low_product_t = _bf16_kernel_product(cs, grad_c, weight_hh.t(), low)      # dh_prev = dgates @ W_hh
        chunk_kernel = _chunk_kernel(cs, grad_c, weight_hh, low)
        if chunk_kernel is not None:
            grad_gates, grad_h, grad_c, grad_bias = recurrent_backward_chunk(chunk_kernel, gates, cs, c0, grad_hs,
                                                                             grad_h, grad_c, weight_hh, low, overwrite)
        elif low_product_t is not None:
            grad_gates, grad_h, grad_c, grad_bias = recurrent_backward_bf16(gates, cs, c0, grad_hs, grad_h, grad_c,
                                                                            low_product_t, overwrite)
        else:
            recurrent_t = recurrent_product(weight_hh.t(), B, low)
            grad_gates, grad_h, grad_c, grad_bias = recurrent_backward(gates, cs, c0, grad_hs, grad_h, grad_c,
                                                                       recurrent_t, overwrite)
        flat = grad_gates.view(T * B, 4 * H)
        dtype = cs.dtype
        if low is None and _onednn_float32(flat):
            grad_weight_hh, grad_weight_ih = _weight_gradients(flat, h0, hs, x)
        else:
            if h_low is not None:                           # kept rounded as these products round them
                h_prev, x_rows = h_low[:T].view(T * B, H), x_low.reshape(T * B, I)
            else:
                h_prev, x_rows = _steps_before(h0, hs).view(T * B, H), x.reshape(T * B, I)
            if low is not None:
                flat = flat.to(low)                         # cast once for the three products
            grad_weight_hh = low_precision_mm(flat.t(), h_prev, low, dtype)
            grad_weight_ih = low_precision_mm(flat.t(), x_rows, low, dtype)
        grad_x = (_low_precision_rows(flat, weight_ih.to(low), cs.new_empty(T * B, I)) if low is not None
                  else _linear(flat, weight_ih.t())).view(T, B, I)
        if ctx.residual and grad_out is not None:
            grad_x.add_(grad_out)           # (into grad_x, made here: autograd would sum the two in new memory)
        return grad_x, grad_h, grad_c, grad_weight_ih, grad_weight_hh, grad_bias, grad_bias, None, None


def _with_residual(hs, x, residual, in_place):
    """The layer's output: hs, or hs + x with residual, added into hs where nothing else keeps it (in_place)."""
    if not residual:
        return hs
    return hs.add_(x) if in_place else hs + x


def lstm_layer(x, h, c, weight_ih, weight_hh, bias_ih, bias_hh, low_precision=None, residual=False):
    """One layer over a chunk, x (T, B, I) -> outputs (T, B, H), final h, c.

    low_precision (torch.bfloat16, torch.float16 or None) runs the matrix products in that
    dtype; the cell state and every pointwise operation stay in float32. float16 gradients
    need loss scaling (the trainer's GradScaler). In training with bfloat16 products, what the
    backward pass reads is kept in bfloat16 (keeps_bf16). With residual (I = H), the outputs are
    x + each step's h (StackedLSTM's residual layers; h and c are the LSTM's own): summed in the
    memory of h where nothing else keeps h, and in the backward pass into the gradient of x.
    """
    if residual and x.shape[-1] != weight_hh.shape[1]:
        raise ValueError(f"a residual layer adds its input to its output, so the input size must equal the hidden "
                         f"size ({weight_hh.shape[1]}); got {x.shape[-1]}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, h, c, weight_ih, weight_hh, bias_ih, bias_hh)):
        return FusedLSTMLayer.apply(x, h, c, weight_ih, weight_hh, bias_ih, bias_hh, low_precision, residual)
    run = layer_forward(x, h, c, weight_ih, weight_hh, bias_ih, bias_hh, False, low_precision)
    h_last = run.hs[-1].clone() if residual else run.hs[-1]      # (hs is the layer's own: nothing else keeps it)
    return _with_residual(run.hs, x, residual, in_place=True), h_last, run.c_last
