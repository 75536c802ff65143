"""Our own stacked LSTM and the character language model built on it.

Design, from the inside out:

* ``lstm_cell`` is the classic LSTM cell written gate by gate. It is the
  reference and the documentation: every faster path is tested against it.
* ``lstm_layer`` runs one layer over a whole chunk. Training uses
  ``FusedLSTMLayer``, an autograd Function in the style of torch-rnn: the input
  projection of all time steps is one matrix product, the per-step work is one
  small recurrent product plus in-place pointwise gates, and the backward pass
  computes the gates' local derivatives for all steps at once before its time
  loop (which keeps only the truly sequential work, five operations a step)
  and sums the weight gradients in one large product at the end instead of one
  per step. It computes exactly the same function as the cell. On the CPU, in
  float32, each step's pointwise work (gates, cell, hidden; or their gradients)
  is one call into a small C kernel (lstm_kernel.c, compiled on first use by
  native_kernel.py; PyTorch ops where there is no compiler), the recurrent
  weight is packed once per chunk for oneDNN, and the large products go to
  oneDNN too; optionally
  (``StackedLSTM.matmul_dtype = torch.bfloat16`` or ``torch.float16``) the
  matrix products run in that dtype while the cell state and all pointwise
  work stay float32.
* ``Stepper`` runs one character at a time for generation, with the embedding
  folded into layer 0's input weights.
* ``StackedLSTM`` owns the parameters, named and shaped exactly like
  ``torch.nn.LSTM`` (``weight_ih_l{k}``, ``weight_hh_l{k}``, ``bias_ih_l{k}``,
  ``bias_hh_l{k}``, gate order i, f, g, o), so ``nn.LSTM.load_state_dict`` takes
  our state dict as it is. Dropout sits between layers (CharLSTM adds one
  before the output layer).
* ``CharLSTM`` is embedding -> stacked LSTM -> linear to the vocabulary.

State is explicit: a tuple with one ``(h, c)`` pair per layer, each ``(B, H)``,
goes into ``forward`` and comes out of it. Nothing is hidden on the module, so
the caller decides when a state carries on (across chunks, prompts, turns) and
when it is detached (``detach_state``) or reset (``None``).

Internally the stack runs time-major, ``(T, B, ...)``, so that the slice for one
time step is contiguous memory.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import native_kernel
from .native_kernel import KernelUnavailable  # noqa: F401  (raised through model; entry points catch it)

State = tuple[tuple[torch.Tensor, torch.Tensor], ...]


@dataclass
class ModelConfig:
    vocab_size: int
    embed_size: int = 64
    hidden_size: int = 512
    layers: int = 2
    dropout: float = 0.2

    def validate(self) -> None:
        for name in ("vocab_size", "embed_size", "hidden_size", "layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def num_parameters(self) -> int:
        """What CharLSTM(self).num_parameters() will be, known before anything is allocated."""
        E, H, V, L = self.embed_size, self.hidden_size, self.vocab_size, self.layers
        per_layer = 4 * H * (H + H) + 8 * H                 # layers after the first read H inputs
        lstm = 4 * H * (E + H) + 8 * H + (L - 1) * per_layer
        return V * E + lstm + H * V + V


# ---------------------------------------------------------------------------
# The cell: the reference
# ---------------------------------------------------------------------------

def lstm_cell(x, h, c, weight_ih, weight_hh, bias_ih, bias_hh):
    """One LSTM step. x (B, I), h and c (B, H); returns the new (h, c)."""
    gates = x @ weight_ih.t() + bias_ih + h @ weight_hh.t() + bias_hh  # (B, 4H)
    i, f, g, o = gates.chunk(4, dim=1)
    input_gate = torch.sigmoid(i)     # how much of the candidate to write
    forget_gate = torch.sigmoid(f)    # how much of the old cell to keep
    candidate = torch.tanh(g)         # what to write
    output_gate = torch.sigmoid(o)    # how much of the cell to expose
    c = forget_gate * c + input_gate * candidate
    h = output_gate * torch.tanh(c)
    return h, c


def lstm_layer_reference(x, h, c, weight_ih, weight_hh, bias_ih, bias_hh):
    """One layer over a chunk, one cell call per step. x (T, B, I) -> (T, B, H)."""
    outputs = []
    for x_t in x:
        h, c = lstm_cell(x_t, h, c, weight_ih, weight_hh, bias_ih, bias_hh)
        outputs.append(h)
    return torch.stack(outputs), h, c


# ---------------------------------------------------------------------------
# The fused layer: same function, fast
# ---------------------------------------------------------------------------

def _has_packed_linear() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


_PACKED_LINEAR = _has_packed_linear()
_SMALL_PRODUCT = 1 << 20


def _packed_weight(weight: torch.Tensor, batch: int):
    """weight reordered once into oneDNN's blocked layout for products with `batch` rows."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, batch)


def _recurrent_product(weight: torch.Tensor, batch: int, low_precision: torch.dtype | None = None,
                       overwrite_add: bool = False):
    """A function (x, add) -> add + x @ weight^T for a weight reused at every step.

    With overwrite_add the function may write the result into `add`, a buffer
    the caller no longer needs (saves a copy and an allocation per step).

    The per-step products are small and the same weight is used T times, so on
    the CPU the weight is packed once per chunk into oneDNN's blocked layout,
    faster than a plain matmul (which repacks the weight on every call) except
    for the smallest products. float64 and other devices use a plain addmm. With
    low_precision (bfloat16 or float16) the product runs in that dtype and its
    result is added to `add` in float32.
    """
    weight = weight.detach()
    # Below about a million multiply-adds MKL's plain float32 addmm is the fastest product on
    # the CPU here (16x128 by 128x512: 23 us packed 31, bf16 30 with its casts); above it
    # packing wins (32x256: 157 plain, 113 packed, 74 packed bf16).
    small = weight.device.type == "cpu" and batch * weight.numel() <= _SMALL_PRODUCT
    if small:
        low_precision = None
    if low_precision is not None:
        weight = weight.to(low_precision)
    if _PACKED_LINEAR and not small and weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16):
        packed = _packed_weight(weight, batch)
        linear = torch.ops.mkldnn._linear_pointwise
        if low_precision is not None:
            def product(x, add=None):
                out = linear(x.to(low_precision), packed, None, "none", [], "").float()
                return out if add is None else out.add_(add)
            return product

        def product(x, add=None):
            if add is None:
                return linear(x, packed, None, "none", [], "")
            return linear.binary(x, add, packed, None, "add")
        return product
    weight_t = weight.t()
    if low_precision is not None:
        def product(x, add=None):
            out = torch.mm(x.to(low_precision), weight_t).float()
            return out if add is None else out.add_(add)
        return product

    def product(x, add=None):
        if add is None:
            return torch.mm(x, weight_t)
        return add.addmm_(x, weight_t) if overwrite_add else torch.addmm(add, x, weight_t)
    return product


def _mm(a: torch.Tensor, b: torch.Tensor, low_precision: torch.dtype | None, dtype: torch.dtype) -> torch.Tensor:
    """a @ b as dtype, computed in low_precision when given."""
    if low_precision is None:
        return a @ b
    return (a.to(low_precision) @ b.to(low_precision)).to(dtype)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight^T (+ bias) for the large once-per-chunk products.

    On the CPU, in float32, oneDNN's product is 10-20% faster than MKL's (the
    default for torch.mm) on these shapes here: 4096x256 by 256x1024 takes
    10.3 ms against 12.4, 4096x1024 by 1024x256 10.0 against 11.6.
    """
    if (_PACKED_LINEAR and x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and not torch.compiler.is_compiling()):     # inductor lowers this op only with packed weights
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def _input_projection(x, weight_ih, bias_ih, bias_hh, low_precision):
    """x @ W_ih^T + biases for every step at once: (T, B, I) -> (T, B, 4H)."""
    T, B, I = x.shape
    bias = bias_ih + bias_hh
    if low_precision is None:
        return _linear(x.reshape(T * B, I), weight_ih, bias).view(T, B, -1)
    return _mm(x.reshape(T * B, I), weight_ih.t(), low_precision, x.dtype).add_(bias).view(T, B, -1)


def pointwise_kernel(*tensors: torch.Tensor) -> native_kernel.Kernel | None:
    """The compiled C kernel for a step's pointwise work on these tensors, or None: PyTorch ops do it.

    The kernel takes CPU float32 only (and is not even built for other devices). None under
    torch.compile too: a ctypes call cannot be traced, PyTorch ops can be fused.
    """
    if torch.compiler.is_compiling() or any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return None
    return native_kernel.load()


def describe_step_path(device: torch.device | str) -> str:
    """For logs: what does each time step's pointwise work on this device."""
    if torch.device(device).type != "cpu":
        return "LSTM steps: PyTorch ops"
    return "LSTM steps: " + native_kernel.describe()


def _recurrent_forward(x_proj, h, c, weight_hh, keep_for_backward, low_precision=None):
    """The time loop shared by training and inference.

    x_proj (T, B, 4H) holds x @ W_ih^T + biases on entry. Each step's gate
    activations overwrite its slice, which is spent by then, so on return
    x_proj holds the activations (i, f, g, o) of every step. Returns h for
    every step (T, B, H), the final c, and, when the backward pass will need
    it, c for every step (T, B, H).
    """
    kernel = pointwise_kernel(x_proj, h, c)
    if kernel is not None:
        return _recurrent_forward_native(kernel, x_proj, h, c, weight_hh, keep_for_backward, low_precision)
    T, B, four_h = x_proj.shape
    H = four_h // 4
    hs = x_proj.new_empty(T, B, H)
    cs = x_proj.new_empty(T, B, H) if keep_for_backward else None
    # tanh(x) = 2 sigmoid(2x) - 1, and sigmoid runs about 3x faster per element than tanh on
    # CPUs here: with the g pre-activations doubled (exact in floating point) one sigmoid over
    # all four gates and a fix-up of g replace a sigmoid and a tanh.
    x_proj[:, :, 2 * H : 3 * H].mul_(2)
    weight_hh = weight_hh.detach().clone()
    weight_hh[2 * H : 3 * H].mul_(2)
    recurrent = _recurrent_product(weight_hh, B, low_precision, overwrite_add=True)   # x_proj[t] is spent
    # 0-dim tensors made once: a Python number is wrapped into a new tensor at every call.
    minus_one, two = (torch.tensor(v, dtype=x_proj.dtype, device=x_proj.device) for v in (-1.0, 2.0))
    # Views made once for all steps: per-step indexing is Python overhead on small shapes.
    gate_views = x_proj.unbind(0)
    i_, f_, g_, o_ = (gate.unbind(0) for gate in x_proj.unflatten(2, (4, H)).unbind(2))
    h_out, c_out = hs.unbind(0), (cs.unbind(0) if cs is not None else None)
    for t in range(T):
        gates, g_slot = gate_views[t], g_[t]
        pre = recurrent(h, gates)                           # (B, 4H) pre-activations
        torch.sigmoid(pre, out=gates)                       # i, f, o, and sigmoid(2 g_pre)
        torch.addcmul(minus_one, g_slot, two, out=g_slot)   # g = 2 sigmoid(2 g_pre) - 1 = tanh(g_pre)
        fc = f_[t] * c
        c = torch.addcmul(fc, i_[t], g_slot, out=c_out[t]) if c_out is not None else fc.addcmul_(i_[t], g_slot)
        h = torch.mul(o_[t], torch.tanh(c), out=h_out[t])   # h = o*tanh(c)
    return hs, c, cs


def _recurrent_forward_native(kernel, x_proj, h, c, weight_hh, keep_for_backward, low_precision):
    """_recurrent_forward with each step's pointwise work done by the C kernel in one call."""
    T, B, four_h = x_proj.shape
    H = four_h // 4
    hs = x_proj.new_empty(T, B, H)
    # Without a backward pass one cell-state buffer, updated in place, is enough.
    cs = x_proj.new_empty(T if keep_for_backward else 1, B, H)
    recurrent = _recurrent_product(weight_hh, B, low_precision, overwrite_add=True)   # x_proj[t] is spent
    c_prev = c.contiguous()
    h = h.contiguous()
    gate_views, h_views = x_proj.unbind(0), hs.unbind(0)
    # The kernel takes raw pointers: each buffer is checked whole here, and step t's slices
    # lie at fixed strides inside it (t < T), so every offset below stays in bounds.
    pointer = native_kernel.pointer
    gates_at, hs_at = pointer(x_proj, (T, B, four_h), "gates"), pointer(hs, (T, B, H), "hs")
    cs_at, c_prev_at = pointer(cs, (cs.shape[0], B, H), "cs"), pointer(c_prev, (B, H), "c0")
    gate_bytes, state_bytes = B * four_h * 4, B * H * 4
    cs_step = state_bytes if keep_for_backward else 0
    forward_step, slices, pre_shape = kernel.forward_step, native_kernel.step_slices(B, H), (B, four_h)
    for t in range(T):
        pre = recurrent(h, gate_views[t])                  # (B, 4H) pre-activations, maybe in x_proj[t]
        c_at = cs_at + t * cs_step
        forward_step(B, H, slices, pointer(pre, pre_shape, "pre-activations"), gates_at + t * gate_bytes,
                     c_prev_at, c_at, hs_at + t * state_bytes)
        c_prev_at, h = c_at, h_views[t]
    return hs, cs[-1], (cs if keep_for_backward else None)


# Blocks of steps whose gate derivatives the backward pass computes together: large
# enough to amortise per-operation overhead on small shapes, small enough to stay in cache.
_CACHE_BYTES = 1 << 20


def _local_derivatives(gates, c, c_prev, local):
    """Gate derivatives for a block of steps, all (k, B, ...): fills local (k, B, 4H).

    With c = f*c_prev + i*g and h = o*tanh(c), sigmoid' = s(1-s), tanh' = 1-t^2:
    local = [g*i', c_prev*f', i*g', tanh(c)*o'] per gate, so that dL/dpre = local
    times dL/dc (i, f, g) or dL/dh (o). Returns o*tanh'(c), which carries dL/dh
    into dL/dc. Nothing saved is modified: backward may run more than once.
    """
    H = c.shape[-1]
    i, f, g, o = gates.unflatten(-1, (4, H)).unbind(-2)
    local_i, local_f, local_g, local_o = local.unflatten(-1, (4, H)).unbind(-2)
    torch.mul(i, 1 - i, out=local_i).mul_(g)
    torch.mul(f, 1 - f, out=local_f).mul_(c_prev)
    torch.mul(g, g, out=local_g).neg_().add_(1).mul_(i)
    tanh_c = torch.tanh(c)
    torch.mul(o, 1 - o, out=local_o).mul_(tanh_c)
    return tanh_c.square_().neg_().add_(1).mul_(o)


def _recurrent_backward(gates, cs, c0, grad_hs, grad_h, grad_c, recurrent_t):
    """The backward time loop in PyTorch ops: returns dL/d(pre-activations) (T, B, 4H), dL/dh0, dL/dc0."""
    T, B, four_h = gates.shape
    H = four_h // 4
    # local[t] holds, gate by gate, the factor that turns dL/dc_t (for i, f, g) or
    # dL/dh_t (for o) into the gradient of that gate's pre-activation. It does not depend
    # on the incoming gradient, so it is computed for a block of steps at a time (sized
    # to stay in cache), leaving the time loop only the truly sequential work; the loop
    # multiplies it in place, so local ends as the pre-activation gradients of all steps.
    local = torch.empty_like(gates)
    f_steps, grad_hs_steps, local_steps = gates[:, :, H : 2 * H].unbind(0), grad_hs.unbind(0), local.unbind(0)
    block = max(1, _CACHE_BYTES // (gates[0].numel() * gates.element_size()))
    for end in range(T, 0, -block):
        start = max(0, end - block)
        c_prev = cs[start - 1 : end - 1] if start > 0 else torch.cat([c0.unsqueeze(0), cs[: end - 1]])
        through_h = _local_derivatives(gates[start:end], cs[start:end], c_prev, local[start:end])
        local_ifg = local[start:end].unflatten(2, (4, H))[:, :, :3].unbind(0)
        local_o, through_h = local[start:end, :, 3 * H :].unbind(0), through_h.unbind(0)
        for k in range(end - start - 1, -1, -1):
            t = start + k
            grad_c = torch.addcmul(grad_c, grad_h, through_h[k])    # dL/dc_t
            local_ifg[k].mul_(grad_c.unsqueeze(1))                  # dL/d(pre-activation) of i, f, g
            local_o[k].mul_(grad_h)                                 # ... and of o
            grad_c = grad_c * f_steps[t]                            # on to c_{t-1}
            if t > 0:
                grad_h = recurrent_t(local_steps[t], grad_hs_steps[t - 1])
            else:
                grad_h = recurrent_t(local_steps[t])
    return local, grad_h, grad_c, local.sum((0, 1))


def _recurrent_backward_native(kernel, gates, cs, c0, grad_hs, grad_h, grad_c, recurrent_t):
    """_recurrent_backward with each step's pointwise work done by the C kernel in one call."""
    T, B, four_h = gates.shape
    H = four_h // 4
    grad_gates, grad_bias = torch.empty_like(gates), gates.new_zeros(four_h)   # the kernel sums into grad_bias
    grad_c = grad_c.clone(memory_format=torch.contiguous_format)   # the kernel updates it in place
    grad_h, c0 = grad_h.contiguous(), c0.contiguous()
    grad_gates_steps, grad_hs_steps = grad_gates.unbind(0), grad_hs.unbind(0)
    # Raw pointers, as in the forward loop: each buffer checked whole, step t's slices at fixed strides.
    pointer = native_kernel.pointer
    gates_at, grad_gates_at = pointer(gates, (T, B, four_h), "gates"), pointer(grad_gates, (T, B, four_h), "grad_gates")
    cs_at, c0_at = pointer(cs, (T, B, H), "cs"), pointer(c0, (B, H), "c0")
    grad_c_at, grad_bias_at = pointer(grad_c, (B, H), "grad_c"), pointer(grad_bias, (four_h,), "grad_bias")
    gate_bytes, state_bytes = B * four_h * 4, B * H * 4
    backward_step, slices, state_shape = kernel.backward_step, native_kernel.step_slices(B, H), (B, H)
    for t in range(T - 1, -1, -1):
        c_prev_at = cs_at + (t - 1) * state_bytes if t > 0 else c0_at
        backward_step(B, H, slices, gates_at + t * gate_bytes, cs_at + t * state_bytes, c_prev_at,
                      pointer(grad_h, state_shape, "grad_h"), grad_c_at, grad_gates_at + t * gate_bytes, grad_bias_at)
        if t > 0:
            grad_h = recurrent_t(grad_gates_steps[t], grad_hs_steps[t - 1])
        else:
            grad_h = recurrent_t(grad_gates_steps[t])
    return grad_gates, grad_h, grad_c, grad_bias


class FusedLSTMLayer(torch.autograd.Function):
    """One LSTM layer over a chunk with a hand-written backward pass."""

    @staticmethod
    def forward(ctx, x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, low_precision=None):
        x_proj = _input_projection(x, weight_ih, bias_ih, bias_hh, low_precision)
        hs, c_last, cs = _recurrent_forward(x_proj, h0, c0, weight_hh, True, low_precision)
        ctx.save_for_backward(x, h0, c0, weight_ih, weight_hh, hs)
        ctx.gates, ctx.cs = x_proj, cs                      # intermediates, not inputs or outputs
        ctx.low_precision = low_precision
        # Outputs are copies: h_last must not be a view of another output, and c_last
        # must not be a view of the tensor ctx.cs holds, or output -> grad_fn -> ctx.cs ->
        # output is a cycle that keeps every chunk's graph alive (a memory leak).
        return hs, hs[-1].clone(), c_last.clone()

    @staticmethod
    @once_differentiable       # the backward is hand-written: a second derivative through it would be wrong
    def backward(ctx, grad_hs, grad_h_last, grad_c_last):
        x, h0, c0, weight_ih, weight_hh, hs = ctx.saved_tensors
        gates, cs = ctx.gates, ctx.cs                       # activations (T, B, 4H), cell states (T, B, H)
        T, B, I = x.shape
        H = hs.shape[2]
        if grad_hs is None:
            grad_hs = torch.zeros_like(hs)
        grad_h = grad_hs[-1] if grad_h_last is None else grad_hs[-1] + grad_h_last
        grad_c = torch.zeros_like(c0) if grad_c_last is None else grad_c_last
        low = ctx.low_precision
        recurrent_t = _recurrent_product(weight_hh.t(), B, low)  # dh_prev = dgates @ W_hh
        kernel = pointwise_kernel(gates, grad_h, grad_c)
        if kernel is not None:
            grad_gates, grad_h, grad_c, grad_bias = _recurrent_backward_native(
                kernel, gates, cs, c0, grad_hs.contiguous(), grad_h, grad_c, recurrent_t)
        else:
            grad_gates, grad_h, grad_c, grad_bias = _recurrent_backward(
                gates, cs, c0, grad_hs, grad_h, grad_c, recurrent_t)
        flat = grad_gates.view(T * B, 4 * H)
        h_prev = torch.cat([h0.unsqueeze(0), hs[:-1]]).view(T * B, H)
        if low is not None:
            flat = flat.to(low)                             # cast once for the three products
        # the weight gradients of all steps in one product each
        dtype = hs.dtype
        grad_weight_hh = _mm(flat.t(), h_prev, low, dtype)
        grad_weight_ih = _mm(flat.t(), x.reshape(T * B, I), low, dtype)
        grad_x = (_mm(flat, weight_ih, low, dtype) if low is not None else _linear(flat, weight_ih.t())).view(T, B, I)
        return grad_x, grad_h, grad_c, grad_weight_ih, grad_weight_hh, grad_bias, grad_bias, None


def lstm_layer(x, h, c, weight_ih, weight_hh, bias_ih, bias_hh, low_precision=None):
    """One layer over a chunk, x (T, B, I) -> outputs (T, B, H), final h, c.

    low_precision (torch.bfloat16, torch.float16 or None) runs the matrix
    products in that dtype; the cell state and every pointwise operation stay
    in float32. float16 gradients need loss scaling (the trainer's GradScaler).
    """
    if torch.is_grad_enabled() and any(
        t.requires_grad for t in (x, h, c, weight_ih, weight_hh, bias_ih, bias_hh)
    ):
        return FusedLSTMLayer.apply(x, h, c, weight_ih, weight_hh, bias_ih, bias_hh, low_precision)
    x_proj = _input_projection(x, weight_ih, bias_ih, bias_hh, low_precision)
    hs, c, _ = _recurrent_forward(x_proj, h, c, weight_hh, False, low_precision)
    return hs, hs[-1], c


# ---------------------------------------------------------------------------
# What goes in: checked at the public edge, on every path
# ---------------------------------------------------------------------------

def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor shaped {tuple(value.shape)} on {value.device}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of length {len(value)}"
    return f"a {type(value).__name__}"


def check_state(state, layers: int, batch: int, hidden: int, device: torch.device, dtype: torch.dtype) -> State:
    """The state as the layers take it: one (h, c) pair per layer, each (batch, hidden), on device, in dtype.

    Anything else is a ValueError that names the layer, the expected shape and what came.
    Harmless differences are mended, not refused: another floating dtype is converted
    (float64 gives exactly what its float32 values give) and non-contiguous views are copied.
    """
    if not isinstance(state, (tuple, list)) or len(state) != layers:
        raise ValueError(f"the state must hold one (h, c) pair per layer ({layers}), each tensor shaped "
                         f"(batch, hidden) = ({batch}, {hidden}); got {_describe(state)}")
    checked = []
    for k, pair in enumerate(state):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"the state of layer {k} must be a pair (h, c) of tensors shaped (batch, hidden) = "
                             f"({batch}, {hidden}); got {_describe(pair)}")
        tensors = []
        for name, t in zip("hc", pair):
            if not isinstance(t, torch.Tensor) or t.shape != (batch, hidden) or not t.is_floating_point():
                raise ValueError(f"{name} of layer {k} must be a floating-point tensor shaped (batch, hidden) = "
                                 f"({batch}, {hidden}); got {_describe(t)}")
            if t.device != device:
                raise ValueError(f"{name} of layer {k} is on {t.device}, but the model is on {device}")
            tensors.append(t.to(dtype).contiguous())
        checked.append(tuple(tensors))
    return tuple(checked)


def _check_batch(batch: int, time: int | None = None) -> None:
    if batch < 1:
        raise ValueError("the batch is empty: at least one stream is needed")
    if time is not None and time < 1:
        raise ValueError("the input has no time steps: at least one character is needed")


# ---------------------------------------------------------------------------
# The stack and the language model
# ---------------------------------------------------------------------------

class StackedLSTM(nn.Module):
    """Layers of LSTM with dropout between them; parameters named like nn.LSTM."""

    def __init__(self, input_size: int, hidden_size: int, layers: int, dropout: float = 0.0):
        super().__init__()
        self.input_size, self.hidden_size, self.layers, self.dropout = input_size, hidden_size, layers, dropout
        # A run-time choice, not architecture: torch.bfloat16 (or torch.float16) runs the
        # matrix products in that dtype (faster on CPUs with avx512_bf16 and on GPUs); None is float32.
        self.matmul_dtype: torch.dtype | None = None
        for k in range(layers):
            in_size = input_size if k == 0 else hidden_size
            self.register_parameter(f"weight_ih_l{k}", nn.Parameter(torch.empty(4 * hidden_size, in_size)))
            self.register_parameter(f"weight_hh_l{k}", nn.Parameter(torch.empty(4 * hidden_size, hidden_size)))
            self.register_parameter(f"bias_ih_l{k}", nn.Parameter(torch.empty(4 * hidden_size)))
            self.register_parameter(f"bias_hh_l{k}", nn.Parameter(torch.empty(4 * hidden_size)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size)  # nn.LSTM's own initialisation
        H = self.hidden_size
        with torch.no_grad():
            for p in self.parameters():
                p.uniform_(-bound, bound)
            for k in range(self.layers):
                # Forget-gate bias 1 (split over the two bias vectors) so that the
                # cell starts out remembering instead of forgetting (Jozefowicz et al. 2015).
                getattr(self, f"bias_ih_l{k}")[H : 2 * H].fill_(0.5)
                getattr(self, f"bias_hh_l{k}")[H : 2 * H].fill_(0.5)

    def layer_weights(self, k: int):
        return tuple(getattr(self, f"{name}_l{k}") for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))

    def initial_state(self, batch_size: int, device=None, dtype=None) -> State:
        zeros = lambda: torch.zeros(batch_size, self.hidden_size, device=device, dtype=dtype)  # noqa: E731
        return tuple((zeros(), zeros()) for _ in range(self.layers))

    def forward(self, x: torch.Tensor, state: State | None = None, reference: bool = False):
        """x (T, B, I) time-major -> outputs (T, B, H) and the new state."""
        weight = self.weight_ih_l0
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[2] != self.input_size or not x.is_floating_point():
            raise ValueError(f"the input must be a floating-point tensor shaped (time, batch, input) = "
                             f"(T, B, {self.input_size}); got {_describe(x)}")
        if x.device != weight.device:
            raise ValueError(f"the input is on {x.device}, but the model is on {weight.device}")
        _check_batch(x.shape[1], x.shape[0])
        x = x.to(weight.dtype)
        if state is None:
            state = self.initial_state(x.shape[1], device=x.device, dtype=x.dtype)
        else:
            state = check_state(state, self.layers, x.shape[1], self.hidden_size, weight.device, weight.dtype)
        new_state = []
        for k in range(self.layers):
            if k > 0 and self.dropout > 0:
                x = F.dropout(x, self.dropout, self.training)
            h, c = state[k]
            if reference:
                x, h, c = lstm_layer_reference(x, h, c, *self.layer_weights(k))
            else:
                x, h, c = lstm_layer(x, h, c, *self.layer_weights(k), low_precision=self.matmul_dtype)
            new_state.append((h, c))
        return x, tuple(new_state)


class CharLSTM(nn.Module):
    """Character language model: embedding -> stacked LSTM -> linear to the vocabulary."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.embed_size)
        self.lstm = StackedLSTM(config.embed_size, config.hidden_size, config.layers, config.dropout)
        self.head = nn.Linear(config.hidden_size, config.vocab_size)
        self.dropout = config.dropout

    def forward(self, tokens: torch.Tensor, state: State | None = None, reference: bool = False):
        """tokens (B, T) int64 -> logits (B, T, vocab_size) and the new state."""
        self._check_tokens(tokens, 2, "(batch, time)")      # the stack checks batch and time
        try:
            x = self.embedding(tokens.t())                               # (T, B, E)
        except IndexError:
            raise ValueError(f"tokens must be ids in [0, {self.config.vocab_size}); got values from "
                             f"{int(tokens.min())} to {int(tokens.max())}") from None
        out, state = self.lstm(x, state, reference=reference)           # (T, B, H)
        out = F.dropout(out, self.dropout, self.training)
        logits = self.head(out)                                          # (T, B, V)
        return logits.transpose(0, 1), state

    def _check_tokens(self, tokens, dims: int, shape: str) -> None:
        if (not isinstance(tokens, torch.Tensor) or tokens.dim() != dims or tokens.dtype == torch.bool
                or tokens.is_floating_point() or tokens.is_complex()):
            raise ValueError(f"tokens must be an integer tensor shaped {shape}; got {_describe(tokens)}")
        if tokens.device != self.head.weight.device:
            raise ValueError(f"the tokens are on {tokens.device}, but the model is on {self.head.weight.device}")

    def initial_state(self, batch_size: int, device=None) -> State:
        p = self.head.weight
        return self.lstm.initial_state(batch_size, device=device or p.device, dtype=p.dtype)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def detach_state(state: State | None) -> State | None:
    """Cut the graph between chunks while keeping the values: truncated BPTT."""
    if state is None:
        return None
    return tuple((h.detach(), c.detach()) for h, c in state)


class Stepper:
    """One character at a time, for generation: the same function as CharLSTM.forward.

    Weights are prepared once: the embedding is folded into layer 0's input
    projection (a one-hot input times E times W_ih0^T is one row of E W_ih0^T),
    so layer 0 costs a row lookup and one recurrent product per character. The
    stepper copies nothing from the model's later weight updates: make a new one
    after training further.
    """

    @torch.no_grad()
    def __init__(self, model: CharLSTM):
        lstm = model.lstm
        self.model, self.hidden_size, self.vocab_size = model, lstm.hidden_size, model.config.vocab_size
        w_ih0, _, b_ih0, b_hh0 = lstm.layer_weights(0)
        self.token_gates = torch.addmm(b_ih0 + b_hh0, model.embedding.weight, w_ih0.t())  # (V, 4H)
        self.layers = []
        for k in range(lstm.layers):
            w_ih, w_hh, b_ih, b_hh = lstm.layer_weights(k)
            self.layers.append((w_ih.t().contiguous(), w_hh.t().contiguous(), b_ih + b_hh))
        self.head_weight_t = model.head.weight.t().contiguous()
        self.head_bias = model.head.bias.detach().clone()

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """tokens (N,) int64 -> logits (N, V) and the new state."""
        H = self.hidden_size
        self.model._check_tokens(tokens, 1, "(batch,)")
        N = len(tokens)
        _check_batch(N)
        weight = self.token_gates
        state = check_state(state, len(self.layers), N, H, weight.device, weight.dtype)
        new_state = []
        x = None
        for k, (w_ih_t, w_hh_t, bias) in enumerate(self.layers):
            h, c = state[k]
            if k == 0:
                try:
                    gates = torch.index_select(self.token_gates, 0, tokens)      # (N, 4H)
                except IndexError:
                    raise ValueError(f"tokens must be ids in [0, {self.vocab_size}); got values from "
                                     f"{int(tokens.min())} to {int(tokens.max())}") from None
                gates.addmm_(h, w_hh_t)
            else:
                gates = torch.addmm(bias, x, w_ih_t).addmm_(h, w_hh_t)
            kernel = pointwise_kernel(gates, c)
            if kernel is not None:
                c_prev, c, x = c.contiguous(), gates.new_empty(N, H), gates.new_empty(N, H)
                pointer, gates_at = native_kernel.pointer, native_kernel.pointer(gates, (N, 4 * H), "gates")
                kernel.forward_step(N, H, native_kernel.step_slices(N, H), gates_at, gates_at,
                                    pointer(c_prev, (N, H), "c_prev"), pointer(c, (N, H), "c"), pointer(x, (N, H), "h"))
                new_state.append((x, c))
                continue
            torch.sigmoid_(gates[:, : 2 * H])
            torch.tanh_(gates[:, 2 * H : 3 * H])
            torch.sigmoid_(gates[:, 3 * H :])
            i, f, g, o = gates.chunk(4, dim=1)
            c = torch.addcmul(f * c, i, g)
            x = o * torch.tanh(c)
            new_state.append((x, c))
        return torch.addmm(self.head_bias, x, self.head_weight_t), tuple(new_state)
