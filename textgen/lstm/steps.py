"""A step's pointwise work (gates, cell and hidden state; or their gradients): two backends, one interface.

The compiled C kernel (CPU, float32; native_kernel.py) and PyTorch operations (any device or dtype, and
traceable by torch.compile). ``forward_steps`` and ``backward_steps`` prepare a chunk for the chosen backend
and return its step function; the C backend checks every buffer in that same function before any pointer
into it is taken. The C kernel's bfloat16 steps take the bfloat16 recurrent product as it comes.
"""
from __future__ import annotations

import functools

import torch

from . import native_kernel


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
    kernel = native_kernel.for_tensors(gates, c0)
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
    kernel = native_kernel.for_tensors(gates, grad_c)
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
    step.keep_alive = (gates, cs, c0, grad_gates, grad_c, grad_bias)
    return step, lambda: (grad_c, grad_bias)


def _kernel_forward_steps_bf16(kernel, gates_low, c0, hs, cs, h_low):
    """The C forward step whose recurrent product is in bfloat16: step(t, pre, product) -> h_t in bfloat16.

    pre (B, 4H) is step t's x W_ih^T + biases in float32, product h_{t-1} W_hh^T in bfloat16, added in
    float32 in the step; the activations go to gates_low (T, B, 4H) in bfloat16 (what the backward pass
    reads; with one slot, (1, B, 4H), overwritten at every step), h to hs in float32 and to h_low in
    bfloat16, the next product's input: h_low (T + 1, B, H) holds h0 (the caller's) and then every step's h,
    what the weight gradients read; with two slots, (2, B, H), the steps take turns. No casts or additions
    left to PyTorch between steps: bit for bit what the float32 step gives after those casts and additions
    (the kernel's self-check holds it to that).
    """
    T, B, H = hs.shape
    four_h = 4 * H
    c0 = c0.contiguous()
    pointer, bf16 = native_kernel.pointer, torch.bfloat16                # checked whole, as in the float32 steps
    gates_at, hs_at = pointer(gates_low, (gates_low.shape[0], B, four_h), "gates", bf16), pointer(hs, (T, B, H), "hs")
    cs_at, c0_at = pointer(cs, (cs.shape[0], B, H), "cs"), pointer(c0, (B, H), "c0")
    h_low_at, h_slots, h_views = pointer(h_low, (h_low.shape[0], B, H), "h_low", bf16), h_low.shape[0], h_low.unbind(0)
    gate_bytes = B * four_h * 2 if gates_low.shape[0] == T else 0
    state_bytes = B * H * 4
    cs_bytes = state_bytes if cs.shape[0] == T else 0
    kernel_step, slices, product_shape = kernel.forward_step_bf16, native_kernel.step_slices(B, H), (B, four_h)

    def step(t, pre, product):
        c_prev_at, slot = c0_at if t == 0 else cs_at + (t - 1) * cs_bytes, (t + 1) % h_slots
        kernel_step(B, H, slices, pointer(product, product_shape, "product", bf16),
                    pointer(pre, product_shape, "pre-activations"), gates_at + t * gate_bytes,
                    c_prev_at, cs_at + t * cs_bytes, hs_at + t * state_bytes, h_low_at + slot * B * H * 2)
        return h_views[slot]
    step.keep_alive = (gates_low, c0, hs, cs, h_low)
    return step


def _kernel_backward_steps_bf16(kernel, gates, cs, c0, grad_gates_low, grad_c):
    """The C backward step with bfloat16 products: (step(t, grad_h, product), finish() -> (dL/dc0, dL/dbias)).

    gates (T, B, 4H) are the activations in bfloat16, as the forward steps kept them; grad_h is dL/dh_t
    from above; product (or None at the chunk's last step) is step t+1's bfloat16 product
    grad_gates(t+1) W_hh, which the step adds in float32. grad_gates_low (T, B, 4H) receives
    the pre-activation gradients in bfloat16, what the products that read them take; the bias
    gradient is summed in float32 before that rounding.
    """
    T, B, four_h = gates.shape
    H = four_h // 4
    c0 = c0.contiguous()
    grad_c = grad_c.clone(memory_format=torch.contiguous_format)
    grad_bias = cs.new_zeros(four_h)
    pointer, bf16 = native_kernel.pointer, torch.bfloat16
    gates_at = pointer(gates, (T, B, four_h), "gates", bf16)
    grad_low_at = pointer(grad_gates_low, (T, B, four_h), "grad_gates", bf16)
    cs_at, c0_at = pointer(cs, (T, B, H), "cs"), pointer(c0, (B, H), "c0")
    grad_c_at, grad_bias_at = pointer(grad_c, (B, H), "grad_c"), pointer(grad_bias, (four_h,), "grad_bias")
    low_bytes, state_bytes = B * four_h * 2, B * H * 4
    kernel_step, slices, state_shape = kernel.backward_step_bf16, native_kernel.step_slices(B, H), (B, H)

    def step(t, grad_h, product):
        c_prev_at = cs_at + (t - 1) * state_bytes if t > 0 else c0_at
        product_at = None if product is None else pointer(product, state_shape, "product", bf16)
        kernel_step(B, H, slices, gates_at + t * low_bytes, cs_at + t * state_bytes, c_prev_at,
                    pointer(grad_h, state_shape, "grad_h"), product_at, grad_c_at, grad_low_at + t * low_bytes,
                    grad_bias_at)
    step.keep_alive = (gates, cs, c0, grad_gates_low, grad_c, grad_bias)
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
    block = max(1, _CACHE_BYTES // (B * four_h * grad_gates.element_size()))
    local_ifg, local_o = grad_gates.unflatten(2, (4, H))[:, :, :3].unbind(0), grad_gates[:, :, 3 * H :].unbind(0)
    kept = gates.dtype == torch.bfloat16                     # kept by a bf16 layer (native_kernel.kept_bf16)
    carry = {"grad_c": grad_c, "start": T, "through_h": (), "f": ()}

    def step(t, grad_h):
        if t < carry["start"]:                               # entering a new block of steps
            start = max(0, t + 1 - block)
            c_prev = cs[start - 1 : t] if start > 0 else torch.cat([c0.unsqueeze(0), cs[:t]])
            # (activations kept in bfloat16 are read back in float32 first: the derivatives are float32 work)
            activations = native_kernel.from_kept_bf16(gates[start : t + 1]) if kept else gates[start : t + 1]
            carry["through_h"] = _local_derivatives(activations, cs[start : t + 1], c_prev,
                                                    grad_gates[start : t + 1]).unbind(0)
            carry["f"], carry["start"] = activations[:, :, H : 2 * H].unbind(0), start
        dc = torch.addcmul(carry["grad_c"], grad_h, carry["through_h"][t - carry["start"]])   # dL/dc_t
        local_ifg[t].mul_(dc.unsqueeze(1))                   # dL/d(pre-activation) of i, f, g
        local_o[t].mul_(grad_h)                              # ... and of o
        carry["grad_c"] = dc * carry["f"][t - carry["start"]]     # on to c_{t-1}
    return step, lambda: (carry["grad_c"], grad_gates.sum((0, 1)))


