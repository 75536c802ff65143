"""The LSTM layer's fast path: the same function as model.lstm_cell, step by step, computed fast.

Only textgen.lstm.model imports this file (model.py keeps the reference cell and the modules); it
imports native_kernel, which builds the C kernel, and nothing else of ours.

One layer over a chunk of T steps, in the style of torch-rnn:

* the input projection of all steps is one matrix product (``input_projection``);
* a forward time loop (``recurrent_forward``) does, per step, one small recurrent product
  (``recurrent_product``: on the CPU, oneDNN with the weight packed once per chunk, or MKL's
  addmm for small products) and the step's pointwise work;
* a backward time loop (``recurrent_backward``) does the same in reverse, and the weight
  gradients of all steps are then three large products (``FusedLSTMLayer.backward``).

A step's pointwise work (gates, cell and hidden state; or their gradients) has two backends
behind one interface: the compiled C kernel (CPU, float32; see native_kernel.py) and PyTorch
operations (any device or dtype, and traceable by torch.compile). ``forward_steps`` and
``backward_steps`` prepare a chunk for the chosen backend and return its step function; the
C backend checks every buffer in that same function before any pointer into it is taken.
Optionally the matrix products run in bfloat16 or float16 (``low_precision``) while the cell
state and all pointwise work stay float32.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import native_kernel
from .native_kernel import KernelUnavailable  # noqa: F401  (raised through here; entry points catch it)

# ---------------------------------------------------------------------------
# Matrix products
# ---------------------------------------------------------------------------


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
        packed = _packed_weight(weight, batch)
        linear = torch.ops.mkldnn._linear_pointwise

        def product(x, add=None):
            if add is None:
                return linear(x, packed, None, "none", [], "")
            return linear.binary(x, add, packed, None, "add")
        return product
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
    packed = _packed_weight(weight, ROW_STABLE_PACK)
    bias = None if bias is None else bias.detach().clone()
    linear = torch.ops.mkldnn._linear_pointwise

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
    kernel = pointwise_kernel(*blocks)
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


# ---------------------------------------------------------------------------
# A step's pointwise work: two backends, one interface
# ---------------------------------------------------------------------------

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


def forward_steps(gates, c0, hs, cs):
    """The forward step function for a chunk and how it wants the g rows scaled: (step(t, pre) -> h_t, g_scale).

    gates (T, B, 4H) receives each step's activations i, f, g, o (it may be the buffer the
    pre-activations came in: every element is read before it is written); c0 (B, H) is the
    cell state before the chunk; hs (T, B, H) receives h; cs (T, B, H) receives c, or with a
    single slot (1, B, H) is updated in place when no backward pass needs every step's c.
    pre (B, 4H) is step t's pre-activations x W_ih^T + h W_hh^T + biases, with the g rows
    scaled by g_scale: a backend may scale the g pre-activations already in gates when it
    prepares (the PyTorch one does, see _torch_forward_steps), and the caller scales what it
    adds after that (the recurrent product's g rows) alike.
    """
    kernel = pointwise_kernel(gates, c0)
    if kernel is not None:
        return _kernel_forward_steps(kernel, gates, c0, hs, cs)
    return _torch_forward_steps(gates, c0, hs, cs)


def backward_steps(gates, cs, c0, grad_gates, grad_c):
    """The backward step function for a chunk, and its end: (step(t, grad_h), finish() -> (dL/dc0, dL/dbias)).

    Called for t = T-1 down to 0 with grad_h = dL/dh_t (from above and from step t+1), step t
    writes dL/d(pre-activations) of step t to grad_gates[t] and carries dL/dc back to step t-1;
    grad_c is dL/dc of the chunk's last step. The formulas, with sigmoid' = s(1-s), tanh' = 1-t^2:
      dc = grad_c + grad_h * o * (1 - tanh(c)^2)
      d pre_i = dc * g * i(1-i),   d pre_f = dc * c_prev * f(1-f)
      d pre_g = dc * i * (1-g^2),  d pre_o = grad_h * tanh(c) * o(1-o),   dc_prev = dc * f
    """
    kernel = pointwise_kernel(gates, grad_c)
    if kernel is not None:
        return _kernel_backward_steps(kernel, gates, cs, c0, grad_gates, grad_c)
    return _torch_backward_steps(gates, cs, c0, grad_gates, grad_c)


def _kernel_forward_steps(kernel, gates, c0, hs, cs):
    T, B, four_h = gates.shape
    H = four_h // 4
    c0 = c0.contiguous()
    # The kernel takes raw pointers: each buffer is checked whole here, and step t's slices lie at
    # fixed strides inside it (t < T), so every offset below stays in bounds. The per-step
    # pre-activations come from a product and are checked at every step.
    pointer = native_kernel.pointer
    gates_at, hs_at = pointer(gates, (T, B, four_h), "gates"), pointer(hs, (T, B, H), "hs")
    cs_at, c0_at = pointer(cs, (cs.shape[0], B, H), "cs"), pointer(c0, (B, H), "c0")
    gate_bytes, state_bytes = B * four_h * 4, B * H * 4
    cs_bytes = state_bytes if cs.shape[0] == T else 0          # one slot: c is updated in place
    kernel_step, slices, pre_shape, h_views = kernel.forward_step, native_kernel.step_slices(B, H), (B, four_h), hs.unbind(0)

    def step(t, pre):                  # stateless: step 0 may run again (the Stepper's one-step chunk)
        c_prev_at = c0_at if t == 0 else cs_at + (t - 1) * cs_bytes
        kernel_step(B, H, slices, pointer(pre, pre_shape, "pre-activations"), gates_at + t * gate_bytes,
                    c_prev_at, cs_at + t * cs_bytes, hs_at + t * state_bytes)
        return h_views[t]
    step.keep_alive = (gates, c0, hs, cs)       # the tensors behind the pointers live as long as the step
    return step, 1


def _kernel_backward_steps(kernel, gates, cs, c0, grad_gates, grad_c):
    T, B, four_h = gates.shape
    H = four_h // 4
    c0 = c0.contiguous()
    grad_c = grad_c.clone(memory_format=torch.contiguous_format)     # the kernel updates it in place
    grad_bias = gates.new_zeros(four_h)                                 # ... and sums into this
    pointer = native_kernel.pointer                                     # checked whole, as in the forward
    gates_at, grad_gates_at = pointer(gates, (T, B, four_h), "gates"), pointer(grad_gates, (T, B, four_h), "grad_gates")
    cs_at, c0_at = pointer(cs, (T, B, H), "cs"), pointer(c0, (B, H), "c0")
    grad_c_at, grad_bias_at = pointer(grad_c, (B, H), "grad_c"), pointer(grad_bias, (four_h,), "grad_bias")
    gate_bytes, state_bytes = B * four_h * 4, B * H * 4
    kernel_step, slices, state_shape = kernel.backward_step, native_kernel.step_slices(B, H), (B, H)

    def step(t, grad_h):
        c_prev_at = cs_at + (t - 1) * state_bytes if t > 0 else c0_at
        kernel_step(B, H, slices, gates_at + t * gate_bytes, cs_at + t * state_bytes, c_prev_at,
                    pointer(grad_h, state_shape, "grad_h"), grad_c_at, grad_gates_at + t * gate_bytes, grad_bias_at)
    step.keep_alive = (gates, cs, c0, grad_gates)
    return step, lambda: (grad_c, grad_bias)


def _kernel_forward_steps_bf16(kernel, gates, c0, hs, cs):
    """The C forward step whose recurrent product is in bfloat16: (step(t, product) -> h in bfloat16, h0 in it).

    gates holds x W_ih^T + biases; step t adds product (B, 4H), h_{t-1} W_hh^T in bfloat16, in
    float32 itself and returns h_t in bfloat16, the next product's input: no casts or additions left
    to PyTorch between steps. Bit for bit what the float32 step gives after those casts and additions
    (the kernel's self-check holds it to that).
    """
    T, B, four_h = gates.shape
    H = four_h // 4
    c0 = c0.contiguous()
    pointer, bf16 = native_kernel.pointer, torch.bfloat16                # checked whole, as in the float32 steps
    gates_at, hs_at = pointer(gates, (T, B, four_h), "gates"), pointer(hs, (T, B, H), "hs")
    cs_at, c0_at = pointer(cs, (cs.shape[0], B, H), "cs"), pointer(c0, (B, H), "c0")
    h_low = hs.new_empty(B, H, dtype=bf16)           # one buffer: each step's product has read it before the step
    h_low_at = pointer(h_low, (B, H), "h_low", bf16)
    gate_bytes, state_bytes = B * four_h * 4, B * H * 4
    cs_bytes = state_bytes if cs.shape[0] == T else 0
    kernel_step, slices, product_shape = kernel.forward_step_bf16, native_kernel.step_slices(B, H), (B, four_h)

    def step(t, product):
        c_prev_at = c0_at if t == 0 else cs_at + (t - 1) * cs_bytes
        kernel_step(B, H, slices, pointer(product, product_shape, "product", bf16), gates_at + t * gate_bytes,
                    c_prev_at, cs_at + t * cs_bytes, hs_at + t * state_bytes, h_low_at)
        return h_low
    step.keep_alive = (gates, c0, hs, cs)
    return step


def _kernel_backward_steps_bf16(kernel, gates, cs, c0, grad_gates_low, grad_c):
    """The C backward step with bfloat16 products: (step(t, grad_h, product), finish() -> (dL/dc0, dL/dbias)).

    grad_h is dL/dh_t from above; product (or None at the chunk's last step) is step t+1's bfloat16
    product grad_gates(t+1) W_hh, which the step adds in float32. grad_gates_low (T, B, 4H) receives
    the pre-activation gradients in bfloat16, what the products that read them take; the bias
    gradient is summed in float32 before that rounding.
    """
    T, B, four_h = gates.shape
    H = four_h // 4
    c0 = c0.contiguous()
    grad_c = grad_c.clone(memory_format=torch.contiguous_format)
    grad_bias = gates.new_zeros(four_h)
    pointer, bf16 = native_kernel.pointer, torch.bfloat16
    gates_at, grad_low_at = pointer(gates, (T, B, four_h), "gates"), pointer(grad_gates_low, (T, B, four_h), "grad_gates", bf16)
    cs_at, c0_at = pointer(cs, (T, B, H), "cs"), pointer(c0, (B, H), "c0")
    grad_c_at, grad_bias_at = pointer(grad_c, (B, H), "grad_c"), pointer(grad_bias, (four_h,), "grad_bias")
    gate_bytes, low_bytes, state_bytes = B * four_h * 4, B * four_h * 2, B * H * 4
    kernel_step, slices, state_shape = kernel.backward_step_bf16, native_kernel.step_slices(B, H), (B, H)

    def step(t, grad_h, product):
        c_prev_at = cs_at + (t - 1) * state_bytes if t > 0 else c0_at
        product_at = None if product is None else pointer(product, state_shape, "product", bf16)
        kernel_step(B, H, slices, gates_at + t * gate_bytes, cs_at + t * state_bytes, c_prev_at,
                    pointer(grad_h, state_shape, "grad_h"), product_at, grad_c_at, grad_low_at + t * low_bytes,
                    grad_bias_at)
    step.keep_alive = (gates, cs, c0, grad_gates_low)
    return step, lambda: (grad_c, grad_bias)


@functools.cache
def _constants(dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """-1 and 2 as 0-dim tensors, made once: a Python number is wrapped into a new tensor at every call."""
    return torch.tensor(-1.0, dtype=dtype, device=device), torch.tensor(2.0, dtype=dtype, device=device)


def _torch_forward_steps(gates, c0, hs, cs):
    H = hs.shape[2]
    # tanh(x) = 2 sigmoid(2x) - 1, and sigmoid costs ~0.5 ns an element on CPUs here against ~3 for
    # tanh: with the g pre-activations doubled (exact in floating point) one sigmoid over all four
    # gates and a fix-up of g replace a sigmoid and a tanh. What gates holds is doubled here; the
    # caller doubles the g rows of what it adds (g_scale).
    gates[:, :, 2 * H : 3 * H].mul_(2)
    if torch.compiler.is_compiling():        # traced once into the graph: no cache needed (or wanted by Dynamo)
        minus_one, two = _constants.__wrapped__(gates.dtype, gates.device)
    else:
        minus_one, two = _constants(gates.dtype, gates.device)
    # Views made once for all steps: per-step indexing is Python overhead on small shapes.
    gate_steps = gates.unbind(0)
    i_, f_, g_, o_ = (gate.unbind(0) for gate in gates.unflatten(2, (4, H)).unbind(2))
    h_out, c_out, last = hs.unbind(0), cs.unbind(0), cs.shape[0] - 1

    def step(t, pre):                  # stateless: step 0 may run again (the Stepper's one-step chunk)
        c_prev = c0 if t == 0 else c_out[min(t - 1, last)]
        torch.sigmoid(pre, out=gate_steps[t])                    # i, f, o, and sigmoid(2 g_pre)
        torch.addcmul(minus_one, g_[t], two, out=g_[t])          # g = 2 sigmoid(2 g_pre) - 1 = tanh(g_pre)
        c = torch.addcmul(f_[t] * c_prev, i_[t], g_[t], out=c_out[min(t, last)])      # c = f c_prev + i g
        return torch.mul(o_[t], torch.tanh(c), out=h_out[t])                         # h = o tanh(c)
    return step, 2


# Blocks of steps whose gate derivatives the PyTorch backward computes together: large enough to
# amortise per-operation overhead on small shapes, small enough to stay in cache.
_CACHE_BYTES = 1 << 20


def _local_derivatives(gates, c, c_prev, local):
    """Gate derivatives for a block of steps, all (k, B, ...): fills local (k, B, 4H).

    local = [g*i', c_prev*f', i*g', tanh(c)*o'] per gate, so that dL/dpre = local times dL/dc
    (i, f, g) or dL/dh (o). Returns o*tanh'(c), which carries dL/dh into dL/dc. Nothing saved
    is modified: backward may run more than once.
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


def _torch_backward_steps(gates, cs, c0, grad_gates, grad_c):
    T, B, four_h = gates.shape
    H = four_h // 4
    # grad_gates[t] first holds, gate by gate, the local factor that turns dL/dc_t (i, f, g) or
    # dL/dh_t (o) into that gate's pre-activation gradient. It does not depend on the incoming
    # gradient, so it is computed for a cache-sized block of steps at once, leaving each step
    # only the truly sequential work; the step multiplies it in place into the gradient.
    block = max(1, _CACHE_BYTES // (B * four_h * gates.element_size()))
    f_steps = gates[:, :, H : 2 * H].unbind(0)
    local_ifg, local_o = grad_gates.unflatten(2, (4, H))[:, :, :3].unbind(0), grad_gates[:, :, 3 * H :].unbind(0)
    carry = {"grad_c": grad_c, "start": T, "through_h": ()}

    def step(t, grad_h):
        if t < carry["start"]:                               # entering a new block of steps
            start = max(0, t + 1 - block)
            c_prev = cs[start - 1 : t] if start > 0 else torch.cat([c0.unsqueeze(0), cs[:t]])
            carry["through_h"] = _local_derivatives(gates[start : t + 1], cs[start : t + 1], c_prev,
                                                    grad_gates[start : t + 1]).unbind(0)
            carry["start"] = start
        dc = torch.addcmul(carry["grad_c"], grad_h, carry["through_h"][t - carry["start"]])   # dL/dc_t
        local_ifg[t].mul_(dc.unsqueeze(1))                   # dL/d(pre-activation) of i, f, g
        local_o[t].mul_(grad_h)                              # ... and of o
        carry["grad_c"] = dc * f_steps[t]                    # on to c_{t-1}
    return step, lambda: (carry["grad_c"], grad_gates.sum((0, 1)))


# ---------------------------------------------------------------------------
# The time loops and the autograd Function
# ---------------------------------------------------------------------------

def recurrent_forward(x_proj, h, c, weight_hh, keep_for_backward, low_precision=None):
    """The forward time loop, shared by training and inference.

    x_proj (T, B, 4H) holds x W_ih^T + biases on entry and each step's activations on return
    (its slice is spent once the step's product has read it). Returns h of every step
    (T, B, H), the final c, and c of every step when the backward pass will need it.
    """
    T, B, four_h = x_proj.shape
    H = four_h // 4
    hs = x_proj.new_empty(T, B, H)
    cs = x_proj.new_empty(T if keep_for_backward else 1, B, H)
    kernel = _chunk_kernel(x_proj, c, weight_hh, low_precision)
    if kernel is not None:              # a small layer: the whole time loop in one C call
        c = c.contiguous()
        pointer = native_kernel.pointer
        panels = native_kernel.panels(weight_hh)
        kernel.forward_chunk(T, B, H, pointer(panels, tuple(panels.shape), "W_hh panels"),
                             pointer(x_proj, (T, B, four_h), "gates"), pointer(h.contiguous(), (B, H), "h0"),
                             pointer(c, (B, H), "c0"), pointer(hs, (T, B, H), "hs"),
                             pointer(cs, (cs.shape[0], B, H), "cs"), B * H if keep_for_backward else 0,
                             int(native_kernel.threads_pay_here()))
        return hs, cs[-1], (cs if keep_for_backward else None)
    low_product = _bf16_kernel_product(x_proj, c, weight_hh, low_precision)
    if low_product is not None:         # the C step takes the bfloat16 product as it comes and gives h in bfloat16
        step, h = _kernel_forward_steps_bf16(native_kernel.load(), x_proj, c, hs, cs), h.to(torch.bfloat16)
        for t in range(T):
            h = step(t, low_product(h))
        return hs, cs[-1], (cs if keep_for_backward else None)
    step, g_scale = forward_steps(x_proj, c, hs, cs)
    if g_scale != 1:                                          # the backend scaled x_proj's g rows: scale ours
        weight_hh = weight_hh.detach().clone()
        weight_hh[2 * H : 3 * H].mul_(g_scale)
    recurrent = recurrent_product(weight_hh, B, low_precision, overwrite_add=True)   # x_proj[t] is spent
    pre_activations = x_proj.unbind(0)
    for t in range(T):
        h = step(t, recurrent(h, pre_activations[t]))      # (B, 4H) pre-activations, then the pointwise work
    return hs, cs[-1], (cs if keep_for_backward else None)


# Float32 recurrent products of at most this many multiply-adds run their chunk's time loop in C, with the
# kernel's own products: 2x128 at 16 streams (1M) trains 1.29x faster so, 2x256 at 16 streams (4.2M) 1.14x;
# at 32 streams (8.4M) oneDNN's product and the Python loop are as fast (AMD EPYC; benchmarks/README.md).
_CHUNK_PRODUCT = 1 << 22


def _chunk_kernel(gates, c, weight_hh, low_precision):
    """The C kernel where a chunk's whole time loop runs in it (lstm_forward_chunk, lstm_backward_chunk), else
    None: where the pointwise kernel runs and the recurrent product is float32 and small (_CHUNK_PRODUCT),
    so that a library's product costs more in dispatch than in arithmetic and the Python loop as much again.
    With low precision asked for, only where the product stays float32 anyway (_SMALL_PRODUCT)."""
    limit = _CHUNK_PRODUCT if low_precision is None else min(_CHUNK_PRODUCT, _SMALL_PRODUCT)
    if gates.shape[1] * weight_hh.numel() > limit:
        return None
    return pointwise_kernel(gates, c, weight_hh)


def recurrent_backward_chunk(kernel, gates, cs, c0, grad_hs, grad_h, grad_c, weight_hh):
    """recurrent_backward in one C call (lstm_backward_chunk): dL/d(pre-activations) (T, B, 4H), dL/dh0,
    dL/dc0 and dL/dbias."""
    T, B, four_h = gates.shape
    H = four_h // 4
    pointer = native_kernel.pointer
    panels = native_kernel.panels(weight_hh.t())             # dh_prev = dgates @ W_hh: W_hh^T's rows are outputs
    grad_gates, grad_bias = torch.empty_like(gates), gates.new_zeros(four_h)
    grad_h = grad_h.clone(memory_format=torch.contiguous_format)          # the kernel updates both in place
    grad_c = grad_c.clone(memory_format=torch.contiguous_format)
    c0, scratch = c0.contiguous(), gates.new_empty(B, H)
    kernel.backward_chunk(T, B, H, pointer(panels, tuple(panels.shape), "W_hh^T panels"),
                          pointer(gates, (T, B, four_h), "gates"), pointer(cs, (T, B, H), "cs"),
                          pointer(c0, (B, H), "c0"), pointer(grad_hs, (T, B, H), "grad_hs"),
                          pointer(grad_h, (B, H), "grad_h"), pointer(grad_c, (B, H), "grad_c"),
                          pointer(grad_gates, (T, B, four_h), "grad_gates"), pointer(grad_bias, (four_h,), "grad_bias"),
                          pointer(scratch, (B, H), "scratch"), int(native_kernel.threads_pay_here()))
    return grad_gates, grad_h, grad_c, grad_bias


def _bf16_kernel_product(gates, c, weight, low_precision):
    """The bfloat16 step product for the C kernel's bfloat16 steps (x -> x @ weight^T, all bfloat16),
    or None where those steps do not run: no kernel, another precision, or a product small enough to
    stay float32 (low_precision_product)."""
    if low_precision is not torch.bfloat16 or pointwise_kernel(gates, c) is None:
        return None
    return low_precision_product(weight, gates.shape[1], low_precision)


def recurrent_backward_bf16(gates, cs, c0, grad_hs, grad_h, grad_c, product_t):
    """recurrent_backward for the C kernel's bfloat16 steps: dL/d(pre-activations) (T, B, 4H) in bfloat16,
    dL/dh0, dL/dc0 and dL/dbias. product_t: x -> x @ W_hh in bfloat16 (low_precision_product)."""
    T = gates.shape[0]
    grad_gates = gates.new_empty(gates.shape, dtype=torch.bfloat16)
    step, finish = _kernel_backward_steps_bf16(native_kernel.load(), gates, cs, c0, grad_gates, grad_c)
    grad_gate_steps, grad_hs_steps = grad_gates.unbind(0), grad_hs.unbind(0)
    step(T - 1, grad_h, None)
    for t in range(T - 2, -1, -1):
        step(t, grad_hs_steps[t], product_t(grad_gate_steps[t + 1]))    # dL/dh_t: from above and from step t+1
    grad_c0, grad_bias = finish()
    return grad_gates, product_t(grad_gate_steps[0]).float(), grad_c0, grad_bias


def recurrent_backward(gates, cs, c0, grad_hs, grad_h, grad_c, recurrent_t):
    """The backward time loop: dL/d(pre-activations) (T, B, 4H), dL/dh0, dL/dc0 and dL/dbias."""
    T = gates.shape[0]
    grad_gates = torch.empty_like(gates)
    step, finish = backward_steps(gates, cs, c0, grad_gates, grad_c)
    grad_gate_steps, grad_hs_steps = grad_gates.unbind(0), grad_hs.unbind(0)
    for t in range(T - 1, -1, -1):
        step(t, grad_h)
        # dL/dh_{t-1}: through the recurrent weight, plus what reached h_{t-1} from above
        grad_h = recurrent_t(grad_gate_steps[t], grad_hs_steps[t - 1]) if t > 0 else recurrent_t(grad_gate_steps[t])
    grad_c0, grad_bias = finish()
    return grad_gates, grad_h, grad_c0, grad_bias


class FusedLSTMLayer(torch.autograd.Function):
    """One LSTM layer over a chunk with a hand-written backward pass."""

    @staticmethod
    def forward(ctx, x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, low_precision=None):
        x_proj = input_projection(x, weight_ih, bias_ih, bias_hh, low_precision)
        hs, c_last, cs = recurrent_forward(x_proj, h0, c0, weight_hh, True, low_precision)
        ctx.save_for_backward(x, h0, c0, weight_ih, weight_hh, hs)
        ctx.gates, ctx.cs = x_proj, cs                      # intermediates, not inputs or outputs
        ctx.low_precision = low_precision
        # Outputs are copies: h_last must not be a view of another output, and c_last must not
        # be a view of the tensor ctx.cs holds, or output -> grad_fn -> ctx.cs -> output is a
        # cycle that keeps every chunk's graph alive (a memory leak).
        return hs, hs[-1].clone(), c_last.clone()

    @staticmethod
    @once_differentiable       # the backward is hand-written: a second derivative through it would be wrong
    def backward(ctx, grad_hs, grad_h_last, grad_c_last):
        x, h0, c0, weight_ih, weight_hh, hs = ctx.saved_tensors
        gates, cs = ctx.gates, ctx.cs                       # activations (T, B, 4H), cell states (T, B, H)
        T, B, I = x.shape
        H = hs.shape[2]
        grad_hs = torch.zeros_like(hs) if grad_hs is None else grad_hs.contiguous()
        grad_h = grad_hs[-1] if grad_h_last is None else grad_hs[-1] + grad_h_last
        grad_c = torch.zeros_like(c0) if grad_c_last is None else grad_c_last
        low = ctx.low_precision
        low_product_t = _bf16_kernel_product(gates, grad_c, weight_hh.t(), low)      # dh_prev = dgates @ W_hh
        chunk_kernel = _chunk_kernel(gates, grad_c, weight_hh, low)
        if chunk_kernel is not None:
            grad_gates, grad_h, grad_c, grad_bias = recurrent_backward_chunk(chunk_kernel, gates, cs, c0, grad_hs,
                                                                             grad_h, grad_c, weight_hh)
        elif low_product_t is not None:
            grad_gates, grad_h, grad_c, grad_bias = recurrent_backward_bf16(gates, cs, c0, grad_hs, grad_h, grad_c,
                                                                            low_product_t)
        else:
            recurrent_t = recurrent_product(weight_hh.t(), B, low)
            grad_gates, grad_h, grad_c, grad_bias = recurrent_backward(gates, cs, c0, grad_hs, grad_h, grad_c,
                                                                       recurrent_t)
        flat = grad_gates.view(T * B, 4 * H)
        dtype = hs.dtype
        if low is None and _onednn_float32(flat):
            grad_weight_hh, grad_weight_ih = _weight_gradients(flat, h0, hs, x)
        else:
            h_prev = _steps_before(h0, hs).view(T * B, H)
            if low is not None:
                flat = flat.to(low)                         # cast once for the three products
            grad_weight_hh = low_precision_mm(flat.t(), h_prev, low, dtype)
            grad_weight_ih = low_precision_mm(flat.t(), x.reshape(T * B, I), low, dtype)
        grad_x = (low_precision_mm(flat, weight_ih, low, dtype) if low is not None
                  else _linear(flat, weight_ih.t())).view(T, B, I)
        return grad_x, grad_h, grad_c, grad_weight_ih, grad_weight_hh, grad_bias, grad_bias, None


def lstm_layer(x, h, c, weight_ih, weight_hh, bias_ih, bias_hh, low_precision=None):
    """One layer over a chunk, x (T, B, I) -> outputs (T, B, H), final h, c.

    low_precision (torch.bfloat16, torch.float16 or None) runs the matrix products in that
    dtype; the cell state and every pointwise operation stay in float32. float16 gradients
    need loss scaling (the trainer's GradScaler).
    """
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, h, c, weight_ih, weight_hh, bias_ih, bias_hh)):
        return FusedLSTMLayer.apply(x, h, c, weight_ih, weight_hh, bias_ih, bias_hh, low_precision)
    x_proj = input_projection(x, weight_ih, bias_ih, bias_hh, low_precision)
    hs, c, _ = recurrent_forward(x_proj, h, c, weight_hh, False, low_precision)
    return hs, hs[-1], c
