"""Every execution path of the fused LSTM layer against the gate-by-gate cell, over many shapes.

The paths: PyTorch ops; the C kernel with its step split into 1 to 31 column slices (as many
as threads would take: the split is what decides which columns each thread computes); the
same slices run on real OpenMP threads; oneDNN's packed recurrent products; bf16 products.
Each is compared in outputs, final (h, c) and the gradients of every weight, the input and
the initial h0 and c0, against the gate-by-gate cell run in float64 on the same values; the bf16
products against that cell with each product's operands and result rounded to bf16 as the layer
rounds them (``bf16_reference``), and nothing else.
Sizes include ones that divide by nothing (17, 129, 257, 513), ones smaller than the slice
count and batch sizes of one. T is small so that the whole grid stays fast.
"""
import pytest
import torch
import torch.nn.functional as F

import textgen.lstm.fused_lstm as fused
import textgen.lstm.products as lstm_products
from conftest import CountingKernel, NNLSTMStack, c_kernel_or_skip
from textgen.lstm import buffers, kernel_build, native_kernel
from textgen.lstm.fused_lstm import lstm_layer
from textgen.lstm.model import CharLSTM, ModelConfig, lstm_layer_reference

HIDDEN = [1, 2, 15, 16, 17, 63, 64, 65, 100, 127, 128, 129, 255, 256, 257, 300, 511, 512, 513]
BATCH = [1, 3, 8, 32, 128]
SLICES = [1, 2, 3, 4, 6, 8, 16, 31]
T, INPUT = 3, 5
# float32 paths against the float64 cell: errors relative to the largest magnitude of each tensor.
FLOAT32_TOLERANCE = 2e-5
# bf16 products, float32 cell state and pointwise work, against bf16_reference: per tensor, the
# error's norm at most BF16_RMS of the reference's norm (forward values and gradients apart), its own
# norm within BF16_NORM of the reference's, and no element further off than BF16_MAX of the tensor's
# largest magnitude. What is left between the two: a product whose float32 sums round to the other
# side of a bf16 step than the exact sum (a few elements in 10,000, each off by 2**-8 of itself), and
# in the backward pass those few differences again rounded into bf16 operands. Over this grid (AMD
# EPYC with AVX512-BF16) the worst were 2.2e-4 (forward), 2.1e-3 (gradients), 4.5e-4 (a gradient's
# norm) and 7.2e-3 (one element); the cell state rounded to bf16 (README promises float32) puts 99%
# of the cases past BF16_RMS, and doubled gradients are off by 1.
BF16_RMS = {"forward": 5e-4, "gradient": 4e-3}
BF16_NORM = 1e-3
BF16_MAX = 1.5e-2


@pytest.fixture(scope="module")
def c_kernel():
    """The compiled kernel; a skip where there is none (no compiler, TEXTGEN_NATIVE=0)."""
    return c_kernel_or_skip()


@pytest.fixture(scope="module")
def c_kernel_if_any():
    """The compiled kernel, or None where there is none: the grid then runs its PyTorch-op cases only."""
    try:
        return c_kernel_or_skip()
    except pytest.skip.Exception:
        return None


def make_case(B, H, seed):
    gen = torch.Generator().manual_seed(seed)
    scale = 1.0 / H**0.5

    def rand(*shape, s=1.0):
        return torch.randn(*shape, generator=gen) * s
    inputs = {"x": rand(T, B, INPUT), "h0": rand(B, H, s=0.5), "c0": rand(B, H),
              "weight_ih": rand(4 * H, INPUT, s=scale), "weight_hh": rand(4 * H, H, s=2 * scale),
              "bias_ih": rand(4 * H, s=0.5), "bias_hh": rand(4 * H, s=0.5)}
    upstream = {"out": rand(T, B, H), "h": rand(B, H), "c": rand(B, H)}   # weights of the loss
    return inputs, upstream


def run_layer(layer, inputs, upstream, dtype=torch.float32, **kwargs):
    """Outputs and gradients of every input of one layer, as float64 for comparison."""
    leaves = {k: v.to(dtype, copy=True).requires_grad_() for k, v in inputs.items()}   # fresh leaves each run
    out, h, c = layer(leaves["x"], leaves["h0"], leaves["c0"], leaves["weight_ih"], leaves["weight_hh"],
                      leaves["bias_ih"], leaves["bias_hh"], **kwargs)
    loss = sum((t * upstream[name].to(dtype)).sum() for name, t in (("out", out), ("h", h), ("c", c)))
    loss.backward()
    results = {"out": out, "h": h, "c": c, **{f"grad {k}": v.grad for k, v in leaves.items()}}
    return {k: v.detach().double() for k, v in results.items()}


def reference(inputs, upstream):
    return run_layer(lstm_layer_reference, inputs, upstream, dtype=torch.float64)


def bf16(t: torch.Tensor) -> torch.Tensor:
    """t rounded to bfloat16 and held in float64: what a bf16 product reads, or returns."""
    return t.to(torch.bfloat16).double()


class Product(torch.autograd.Function):
    """a @ b in float64 as the layer computes it. With in_bf16 (a product the layer runs in bf16) its
    operands and its result are rounded to bf16, and so are those of the product that carries the
    gradient back to a; without, it is exact. The gradient of b (a weight) is always the exact product
    of the bf16-rounded operands, unrounded: the layer sums it over the whole chunk in one bf16 product
    whatever the size, so the reference rounds the sum once, after backward (bf16_reference)."""

    @staticmethod
    def forward(ctx, a, b, in_bf16):
        ctx.save_for_backward(a, b)
        ctx.in_bf16 = in_bf16
        return bf16(bf16(a) @ bf16(b)) if in_bf16 else a @ b

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        grad_a = bf16(bf16(grad) @ bf16(b).t()) if ctx.in_bf16 else grad @ b.t()
        return grad_a, bf16(a).t() @ bf16(grad), None


def kept(a: torch.Tensor) -> torch.Tensor:
    """An activation as a bf16 layer's backward reads it (fused_lstm.keeps_bf16), in float64: rounded to bf16
    as it is where |a| <= 1/2, else as 1 / (1 - |a|) with its sign, so that 1 - |a| keeps 8 significant bits."""
    m = a.abs()
    rounded = bf16(torch.where(m <= 0.5, a, torch.copysign(1 / (1 - m), a)))
    m = rounded.abs()
    return torch.where(m <= 0.5, rounded, torch.copysign(1 - 1 / m, rounded))


class KeptActivation(torch.autograd.Function):
    """sigmoid or tanh whose backward reads its output as the layer keeps it for its backward pass (kept)."""

    @staticmethod
    def forward(ctx, pre, kind):
        out = torch.sigmoid(pre) if kind == "sigmoid" else torch.tanh(pre)
        ctx.save_for_backward(kept(out))
        ctx.kind = kind
        return out

    @staticmethod
    def backward(ctx, grad):
        kept, = ctx.saved_tensors
        return grad * (kept * (1 - kept) if ctx.kind == "sigmoid" else 1 - kept * kept), None


class KeptProduct(torch.autograd.Function):
    """a * b (elementwise) whose backward reads each factor as the layer keeps it: an activation as kept
    says (round_a, round_b), the cell state and tanh of it exact (float32 in the layer)."""

    @staticmethod
    def forward(ctx, a, b, round_a, round_b):
        ctx.save_for_backward(kept(a) if round_a else a, kept(b) if round_b else b)
        return a * b

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        return grad * b, grad * a, None, None


def bf16_reference(inputs, upstream, recurrent_in_bf16):
    """The gate-by-gate cell in float64 with the layer's bf16 products as Product computes them: the
    input projection (one product over the chunk), the recurrent product where recurrent_in_bf16 (the
    layer keeps small ones float32: lstm_products._SMALL_PRODUCT), the weight gradients rounded once;
    and its backward reading the activations i, f, g, o as the layer keeps them (kept)."""
    leaves = {k: v.double().requires_grad_() for k, v in inputs.items()}
    x, h, c = leaves["x"], leaves["h0"], leaves["c0"]
    steps, B, I = x.shape
    projected = Product.apply(x.reshape(steps * B, I), leaves["weight_ih"].t(), True).view(steps, B, -1)
    projected = projected + leaves["bias_ih"] + leaves["bias_hh"]
    outputs = []
    for t in range(steps):
        i, f, g, o = (projected[t] + Product.apply(h, leaves["weight_hh"].t(), recurrent_in_bf16)).chunk(4, dim=1)
        i, f, o = (KeptActivation.apply(gate, "sigmoid") for gate in (i, f, o))
        g = KeptActivation.apply(g, "tanh")
        c = KeptProduct.apply(f, c, True, False) + KeptProduct.apply(i, g, True, True)
        h = KeptProduct.apply(o, torch.tanh(c), True, False)
        outputs.append(h)
    out = torch.stack(outputs)
    loss = sum((t * upstream[name].double()).sum() for name, t in (("out", out), ("h", h), ("c", c)))
    loss.backward()
    results = {"out": out, "h": h, "c": c, **{f"grad {k}": v.grad for k, v in leaves.items()}}
    for name in ("grad weight_ih", "grad weight_hh"):
        results[name] = bf16(results[name])
    return {k: v.detach() for k, v in results.items()}


def assert_matches(ours, ref, label, tolerance=FLOAT32_TOLERANCE):
    for name, r in ref.items():
        error = (ours[name] - r).abs().max().item()
        limit = tolerance * max(1.0, r.abs().max().item())
        assert error <= limit, f"{label}: {name} differs by {error:.3g} (limit {limit:.3g})"


def assert_close_in_bf16(ours, ref, label):
    for name, r in ref.items():
        kind = "forward" if name in ("out", "h", "c") else "gradient"
        norm = r.norm().item()
        error = (ours[name] - r).norm().item()
        assert error <= BF16_RMS[kind] * norm, f"{label}: {name} off by {error / norm:.3g} of its norm"
        # the scale alone, stated apart: a gradient twice as long fails here whatever its direction
        assert abs(ours[name].norm().item() - norm) <= BF16_NORM * norm, f"{label}: {name}'s norm"
        worst = (ours[name] - r).abs().max().item()
        assert worst <= BF16_MAX * r.abs().max().item(), f"{label}: {name} differs by {worst:.3g}"
        # the earlier, looser bounds, kept: within 0.05 for values, cosine 0.99 for gradients
        if kind == "forward":
            assert worst <= 5e-2, f"{label}: {name} differs by {worst:.3g}"
        elif r.abs().max() > 0:
            assert F.cosine_similarity(ours[name].flatten(), r.flatten(), dim=0).item() >= 0.99, f"{label}: {name}"


DEFAULT_CHUNK, DEFAULT_BLOCK, DEFAULT_BLOCKED = fused._CHUNK_PRODUCT, fused._PROJECTION_BLOCK_BYTES, fused._BLOCKED_FROM_BYTES
DEFAULT_KEEP = buffers.KEEP_FROM_BYTES


@pytest.fixture
def paths(monkeypatch, c_kernel_if_any):
    """Sets up one named execution path at a time; returns a function path -> what it must have run."""
    spy = {"packed": 0}
    real_pack = lstm_products._packed_weight

    def packed(weight, batch):
        spy["packed"] += 1
        return real_pack(weight, batch)
    monkeypatch.setattr(lstm_products, "_packed_weight", packed)

    def use(pointwise, slices=1, products="default"):
        counting = CountingKernel(c_kernel_if_any) if pointwise == "c-kernel" else None
        monkeypatch.setattr(native_kernel, "load", lambda: counting)
        monkeypatch.setattr(native_kernel, "step_slices", lambda B, H: slices)
        # "packed": oneDNN's packed product at every size; "plain": never (MKL's, a step at a time); "chunk":
        # never, and the C kernel runs the whole time loop with its own products; "default": the model's choice.
        # "blocks": packed, the input projection a step at a time, every chunk buffer a kept one (buffers.py).
        small = {"packed": -1, "blocks": -1, "plain": 1 << 62, "chunk": 1 << 62, "default": 1 << 20}[products]
        monkeypatch.setattr(lstm_products, "_SMALL_PRODUCT", small)
        monkeypatch.setattr(fused, "_CHUNK_PRODUCT", {"chunk": 1 << 62, "default": DEFAULT_CHUNK}.get(products, -1))
        monkeypatch.setattr(fused, "_PROJECTION_BLOCK_BYTES", 1 if products == "blocks" else DEFAULT_BLOCK)
        monkeypatch.setattr(buffers, "KEEP_FROM_BYTES", 0 if products == "blocks" else DEFAULT_KEEP)
        monkeypatch.setattr(fused, "_BLOCKED_FROM_BYTES", 0 if products == "blocks" else DEFAULT_BLOCKED)
        spy["packed"] = 0
        return counting
    use.spy, use.has_kernel = spy, c_kernel_if_any is not None
    use.bf16_dot = c_kernel_if_any is not None and c_kernel_if_any.bf16_dot
    return use


@pytest.mark.parametrize("H", HIDDEN)
def test_every_path_equals_the_gate_by_gate_cell(H, paths):
    for B in BATCH:
        inputs, upstream = make_case(B, H, seed=H * 1000 + B)
        ref = reference(inputs, upstream)
        for pointwise, slices, products in [("torch-ops", 1, "plain"), ("torch-ops", 1, "packed"),
                                            *[("c-kernel", n, "plain") for n in SLICES],
                                            ("c-kernel", 2, "packed"), ("c-kernel", 2, "blocks"),
                                            ("c-kernel", 1, "chunk")]:
            if pointwise == "c-kernel" and not paths.has_kernel:
                continue
            label = f"H={H} B={B} {pointwise} slices={slices} {products}"
            counting = paths(pointwise, slices, products)
            assert_matches(run_layer(lstm_layer, inputs, upstream), ref, label)
            if counting is not None:
                assert counting.slices and set(counting.slices) == {slices}, label
            if products in ("packed", "blocks") and lstm_products._PACKED_LINEAR:
                assert paths.spy["packed"] >= 2, label     # forward and backward products were packed
        # "packed": every recurrent product in bf16; "plain": all of them small, so float32 (the layer's rule)
        bf16_refs = {products: bf16_reference(inputs, upstream, recurrent_in_bf16=products == "packed")
                     for products in ("packed", "plain")}
        for pointwise in ("torch-ops", "c-kernel") if paths.has_kernel else ("torch-ops",):
            for products in ("packed", "plain", "blocks") + (("chunk",) if pointwise == "c-kernel" else ()):
                label = f"H={H} B={B} {pointwise} bf16 {products}"
                counting = paths(pointwise, 2, products)
                # The whole-chunk loops' products are bf16 where the kernel has AVX512-BF16 and H is whole panels.
                chunk_in_bf16 = paths.has_kernel and paths.bf16_dot and H % native_kernel.PANEL == 0
                assert_close_in_bf16(run_layer(lstm_layer, inputs, upstream, low_precision=torch.bfloat16),
                                     bf16_refs[{"chunk": "packed" if chunk_in_bf16 else "plain",
                                                "blocks": "packed"}.get(products, products)], label)
                if products == "chunk":
                    assert counting.calls == 2, label          # the forward and the backward loop, one call each
                # Packed in bf16 only where oneDNN can (not on AVX2-only CPUs): there "packed" runs plain.
                assert (paths.spy["packed"] >= 2) == (products in ("packed", "blocks")
                                                      and lstm_products.packs(torch.bfloat16)), label


def test_a_bf16_layer_keeps_what_its_backward_reads_in_bf16(paths):
    """In training with bf16 products every path keeps the activations, h (h0 first) and x for the backward
    pass in bf16, h and x exactly as the weight-gradient products round them, and keeps neither the float32
    x nor the float32 h: under two thirds of the bytes a float32 layer keeps (nn.LSTM's bf16 keeps about as few)."""
    B, H = 8, 64
    inputs, _ = make_case(B, H, seed=5)

    def kept(low_precision):
        """What the layer saved for its backward pass, by name, its output, and the bytes of the per-step part."""
        leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        out, _, _ = lstm_layer(*(leaves[k] for k in ("x", "h0", "c0", "weight_ih", "weight_hh", "bias_ih", "bias_hh")),
                               low_precision=low_precision)
        saved = dict(zip(("x", "h0", "c0", "weight_ih", "weight_hh", "hs", "gates", "cs", "h_low", "x_low"),
                         out.grad_fn.saved_tensors))
        per_step = [saved[k] for k in ("x", "hs", "gates", "cs", "h_low", "x_low") if saved[k] is not None]
        return saved, out, sum(t.numel() * t.element_size() for t in per_step)   # (the weights, h0, c0: alike)

    paths("torch-ops", 1, "plain")
    _, _, float32_bytes = kept(None)
    for pointwise, products in [("torch-ops", "plain"), ("torch-ops", "packed"), ("c-kernel", "packed"),
                                ("c-kernel", "blocks"), ("c-kernel", "plain"), ("c-kernel", "chunk")]:
        if pointwise == "c-kernel" and not paths.has_kernel:
            continue
        label = f"{pointwise} {products}"
        paths(pointwise, 2, products)
        saved, out, kept_bytes = kept(torch.bfloat16)
        assert saved["gates"].dtype == torch.bfloat16 and saved["gates"].shape == (T, B, 4 * H), label
        assert saved["cs"].dtype == torch.float32, label                # the cell state stays float32
        assert torch.equal(saved["h_low"], torch.cat([inputs["h0"].unsqueeze(0), out.detach()]).to(torch.bfloat16)), label
        assert torch.equal(saved["x_low"], inputs["x"].to(torch.bfloat16)), label
        assert saved["x"] is None and saved["hs"] is None, label
        # per step and stream 14H + 2I bytes against 24H + 4I (and h0 once): 0.61 of them here, at T = 3
        assert kept_bytes < 0.65 * float32_bytes, f"{label}: {kept_bytes} of {float32_bytes} bytes"
        assert native_kernel.from_kept_bf16(saved["gates"]).abs().max() <= 1, label    # activations, not sums
    paths("torch-ops", 1, "plain")
    saved, _, _ = kept(torch.float16)            # float16 keeps float32 activations, as before
    assert saved["gates"].dtype == torch.float32 and saved["h_low"] is None


def test_gate_gradients_overwrite_the_activations_only_once_the_graph_is_let_go(paths, monkeypatch):
    """On the C kernel's paths a backward pass that is its graph's last writes the gate gradients over the
    activations it reads them from (no (T, B, 4H) buffer of their own: one fewer at the backward's peak); under
    retain_graph it leaves what the layer saved as it was, so that a second pass gives the same gradients bit for
    bit. The PyTorch-op backend never overwrites (it reads a block's activations after writing its gradients)."""
    B, H = 8, 64
    inputs, upstream = make_case(B, H, seed=6)
    gate_sized, real_empty = [], buffers.empty

    def empty(shape, like, dtype=None, keep=True):
        if tuple(shape) == (T, B, 4 * H):
            gate_sized.append(dtype)
        return real_empty(shape, like, dtype, keep)
    monkeypatch.setattr(buffers, "empty", empty)
    # (the bf16 "plain" path keeps bf16 activations but computes float32 gradients: nothing to overwrite)
    for low, pointwise, products, overwrites in [
            (None, "torch-ops", "plain", False), (None, "c-kernel", "plain", True), (None, "c-kernel", "blocks", True),
            (None, "c-kernel", "chunk", True), (torch.bfloat16, "torch-ops", "packed", False),
            (torch.bfloat16, "c-kernel", "packed", True), (torch.bfloat16, "c-kernel", "plain", False),
            (torch.bfloat16, "c-kernel", "chunk", paths.bf16_dot)]:
        if pointwise == "c-kernel" and not paths.has_kernel:
            continue
        label = f"{low} {pointwise} {products}"
        paths(pointwise, 2, products)
        leaves = [inputs[k].clone().requires_grad_() for k in ("x", "h0", "c0", "weight_ih", "weight_hh",
                                                                 "bias_ih", "bias_hh")]
        out, h, c = lstm_layer(*leaves, low_precision=low)
        loss = (out * upstream["out"]).sum() + (h * upstream["h"]).sum() + (c * upstream["c"]).sum()
        gate_sized.clear()
        retained = torch.autograd.grad(loss, leaves, retain_graph=True)
        assert len(gate_sized) == 1, f"{label}: under retain_graph the gradients need a buffer of their own"
        gate_sized.clear()
        last = torch.autograd.grad(loss, leaves)
        assert len(gate_sized) == (0 if overwrites else 1), label
        for name, a, b in zip(("x", "h0", "c0", "weight_ih", "weight_hh", "bias_ih", "bias_hh"), retained, last):
            assert torch.equal(a, b), f"{label}: grad {name} differs after a pass under retain_graph"


def test_saturated_gates_keep_their_gradient_in_bf16(paths):
    """A forget gate biased to stay open (bias 7: f above 0.999) has a small derivative f(1 - f) that a bf16
    layer must not round away: its bias gradient stays as close to the float64 cell's as with float32
    activations (0.24% of its norm here; activations rounded plainly to bf16 read f as 1: 14%), and so
    does the gradient reaching c0 (0.9%; plainly rounded 2.8%)."""
    T_, B, H, I = 64, 16, 64, 32
    gen = torch.Generator().manual_seed(0)
    inputs = {"x": torch.randn(T_, B, I, generator=gen), "h0": torch.randn(B, H, generator=gen) * 0.5,
              "c0": torch.randn(B, H, generator=gen), "weight_ih": torch.randn(4 * H, I, generator=gen) / I**0.5,
              "weight_hh": torch.randn(4 * H, H, generator=gen) / H**0.5,
              "bias_ih": torch.randn(4 * H, generator=gen) * 0.5, "bias_hh": torch.randn(4 * H, generator=gen) * 0.5}
    inputs["bias_ih"][H : 2 * H] += 7
    upstream = {"out": torch.zeros(T_, B, H), "h": torch.zeros(B, H), "c": torch.randn(B, H, generator=gen)}
    ref = reference(inputs, upstream)
    forget_bias = ref["grad bias_ih"][H : 2 * H]
    for pointwise, products in [("torch-ops", "packed"), ("c-kernel", "packed"), ("c-kernel", "chunk")]:
        if pointwise == "c-kernel" and not paths.has_kernel:
            continue
        paths(pointwise, 2, products)
        ours = run_layer(lstm_layer, inputs, upstream, low_precision=torch.bfloat16)
        label = f"{pointwise} {products}"
        error = (ours["grad bias_ih"][H : 2 * H] - forget_bias).norm() / forget_bias.norm()
        assert error < 0.01, f"{label}: the forget gates' bias gradient is off by {error:.3g} of its norm"
        error = (ours["grad c0"] - ref["grad c0"]).norm() / ref["grad c0"].norm()
        assert error < 0.02, f"{label}: dL/dc0 is off by {error:.3g} of its norm"


def test_a_kept_buffer_is_lent_again_only_once_nothing_holds_it(paths):
    """buffers.py lends a chunk's large buffers again: never while a graph (or anything else) still holds
    one. Three chunks' forward passes with every buffer a kept one, their graphs all alive, then their
    backward passes in another order: each equals its own reference; and a buffer let go is lent again."""
    if not paths.has_kernel:
        pytest.skip("the blocked path runs with the C kernel's steps")
    paths("c-kernel", 2, "blocks")
    cases = [make_case(8, 37, seed=k) for k in range(3)]
    leaves, outputs = [], []
    for inputs, upstream in cases:
        leaf = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        outputs.append(lstm_layer(leaf["x"], leaf["h0"], leaf["c0"], leaf["weight_ih"], leaf["weight_hh"],
                                  leaf["bias_ih"], leaf["bias_hh"]))
        leaves.append(leaf)
    for k in (1, 2, 0):
        upstream = cases[k][1]
        loss = sum((t * upstream[name].float()).sum() for name, t in zip(("out", "h", "c"), outputs[k]))
        loss.backward()
        ours = {"out": outputs[k][0], "h": outputs[k][1], "c": outputs[k][2],
                **{f"grad {name}": v.grad for name, v in leaves[k].items()}}
        assert_matches({n: t.detach().double() for n, t in ours.items()}, reference(*cases[k]), f"chunk {k}")
    held = buffers.empty((3, 5), torch.empty(0))
    other = buffers.empty((3, 5), torch.empty(0))
    assert held.data_ptr() != other.data_ptr()              # held: not lent twice
    address = held.data_ptr()
    del held
    assert buffers.empty((5, 3), torch.empty(0)).data_ptr() == address     # let go: lent again


def test_kept_buffers_are_a_training_steps_only_and_make_room(paths, monkeypatch):
    """buffers.py keeps a training step's buffers, not those of text read without a backward pass (a prompt's
    lengths vary) nor those made under inference mode (they could not be saved for a backward pass later);
    with as many kept as it may hold, a free one makes room for a new size even while another is lent."""
    if not paths.has_kernel:
        pytest.skip("the blocked path runs with the C kernel's steps")
    paths("c-kernel", 2, "blocks")
    buffers.release()
    inputs, upstream = make_case(8, 37, seed=4)
    with torch.inference_mode():
        lstm_layer(*(inputs[k] for k in ("x", "h0", "c0", "weight_ih", "weight_hh", "bias_ih", "bias_hh")))
    with torch.no_grad():
        lstm_layer(*(inputs[k] for k in ("x", "h0", "c0", "weight_ih", "weight_hh", "bias_ih", "bias_hh")))
    with torch.inference_mode():
        buffers.empty((5, 7), torch.empty(0))
    assert buffers._kept == []
    assert_matches(run_layer(lstm_layer, inputs, upstream), reference(inputs, upstream), "after inference mode")
    monkeypatch.setattr(buffers, "MOST_KEPT", 3)
    buffers.release()
    like = torch.empty(0)
    held = [buffers.empty((n,), like) for n in (10, 11, 12)]
    del held[1]
    newer = buffers.empty((13,), like)            # the free one (11) makes room, the lent ones stay
    assert [base.numel() for base in buffers._kept] == [10, 12, 13] and newer.numel() == 13
    buffers.release()


def test_bf16_runs_unpacked_where_onednn_cannot_pack_it(paths, monkeypatch):
    """As on an AVX2-only CPU (AMD Zen 3), where oneDNN's bf16 reorder raises: the products run
    as plain bf16 matrix products, float32 ones stay packed, and the layer still matches the cell."""
    monkeypatch.setattr(lstm_products, "packs", lambda dtype: dtype == torch.float32 and lstm_products._PACKED_LINEAR)
    inputs, upstream = make_case(32, 129, seed=5)
    ref = reference(inputs, upstream)
    paths("torch-ops", 1, "packed")
    assert_close_in_bf16(run_layer(lstm_layer, inputs, upstream, low_precision=torch.bfloat16),
                         bf16_reference(inputs, upstream, recurrent_in_bf16=True), "bf16")
    assert paths.spy["packed"] == 0
    assert_matches(run_layer(lstm_layer, inputs, upstream), ref, "float32")
    assert paths.spy["packed"] >= 2 or not lstm_products._PACKED_LINEAR


def test_the_packing_probe_agrees_with_the_cpu():
    """oneDNN packs bf16 weights given avx512bw+vl+dq or avx_ne_convert (its own error message says
    so on CPUs without them); the probe must say the same, or training in bf16 raises mid-run."""
    from textgen.machine import cpu_flags
    if not lstm_products._PACKED_LINEAR:
        pytest.skip("this PyTorch has no oneDNN packed products")
    flags = cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo flags to compare with")
    can = {"avx512bw", "avx512vl", "avx512dq"} <= flags or "avx_ne_convert" in flags
    assert lstm_products.packs(torch.float32)
    assert lstm_products.packs(torch.bfloat16) == can
    assert not lstm_products.packs(torch.float16)


@pytest.mark.parametrize("threads", [1, 3, 4, 8, 31])
def test_the_kernel_on_real_threads_equals_the_cell(threads, c_kernel, monkeypatch):
    """The model's own choice of slices (PyTorch's thread count) with that many OpenMP threads running; and
    the whole-chunk loops, whose products share their panels among those threads."""
    counting = CountingKernel(c_kernel)
    monkeypatch.setattr(native_kernel, "load", lambda: counting)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for chunk, shapes in ((False, ((32, 129), (16, 257), (48, 100), (64, 300), (128, 513), (4096, 1))),
                              (True, ((16, 128), (3, 37), (4096, 1), (40, 70), (5, 256)))):
            monkeypatch.setattr(fused, "_CHUNK_PRODUCT", 1 << 62 if chunk else -1)
            monkeypatch.setattr(lstm_products, "_SMALL_PRODUCT", 1 << 62 if chunk else 1 << 20)
            for B, H in shapes:
                inputs, upstream = make_case(B, H, seed=B + H)
                counting.slices.clear()
                assert_matches(run_layer(lstm_layer, inputs, upstream), reference(inputs, upstream),
                               f"B={B} H={H} on {threads} threads{', whole chunk' if chunk else ''}")
                assert set(counting.slices) == ({1} if chunk else {threads})
                assert len(counting.slices) == (2 if chunk else 2 * T)
                if chunk and c_kernel.bf16_dot and H % native_kernel.PANEL == 0:     # the bf16 chunk loops too
                    assert_close_in_bf16(run_layer(lstm_layer, inputs, upstream, low_precision=torch.bfloat16),
                                         bf16_reference(inputs, upstream, recurrent_in_bf16=True),
                                         f"B={B} H={H} bf16 on {threads} threads")
    finally:
        torch.set_num_threads(before)


def test_the_default_configuration_equals_nn_lstm(c_kernel, monkeypatch):
    """2x512, 128 streams x 50 characters, as training runs it: threaded kernel, packed products."""
    counting = CountingKernel(c_kernel)
    monkeypatch.setattr(native_kernel, "load", lambda: counting)
    packs = []
    real_pack = lstm_products._packed_weight
    monkeypatch.setattr(lstm_products, "_packed_weight", lambda w, b: packs.append(b) or real_pack(w, b))
    torch.manual_seed(11)
    config = ModelConfig(vocab_size=65, dropout=0.0)       # the default sizes: 2 layers of 512, embedding 64
    ours = CharLSTM(config)
    assert ours.lstm.residual                               # the default stack, compared as it is
    ref = NNLSTMStack(ours.lstm)
    x = torch.randn(50, 128, config.embed_size)
    state = tuple((torch.randn(128, 512) * 0.5, torch.randn(128, 512)) for _ in range(2))
    h0 = [torch.stack([s[i] for s in state]).requires_grad_() for i in (0, 1)]
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, new_state = ours.lstm(x1, ((h0[0][0], h0[1][0]), (h0[0][1], h0[1][1])))
    ref_out, (ref_h, ref_c) = ref(x2, (h0[0].detach().requires_grad_(), h0[1].detach().requires_grad_()))
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=0)
    torch.testing.assert_close(torch.stack([h for h, _ in new_state]), ref_h, atol=2e-5, rtol=0)
    torch.testing.assert_close(torch.stack([c for _, c in new_state]), ref_c, atol=2e-5, rtol=0)
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    (ref_out * upstream).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-4)
    for name, p in ours.lstm.named_parameters():
        # Each gradient sums 6,400 positions (bias gradients reach ~440 here), so float32's rounding of
        # that sum is relative to the tensor's scale, not to each element: an element near zero among
        # large ones differs by up to ~1e-6 of the largest.
        expected = ref.grad(name)
        torch.testing.assert_close(p.grad, expected, atol=max(1e-4, 2e-6 * float(expected.abs().max())), rtol=1e-4)
    assert counting.slices and set(counting.slices) == {torch.get_num_threads()}
    if lstm_products._PACKED_LINEAR:
        assert 128 in packs


def test_the_self_check_rejects_a_kernel_with_the_old_column_split(c_kernel, tmp_path):
    """lstm_kernel.c built with the earlier slice width (floor(H / slices) rounded up to 16, which lost
    the last columns of H = 129 on 2 slices): the self-check that runs after every build must reject it."""
    import ctypes
    import subprocess
    source = open(kernel_build.SOURCE).read()
    fixes = {"int64_t width = ((H + slices - 1) / slices + 15) / 16 * 16;": "int64_t width = (H / slices + 15) / 16 * 16;",
             "if (k >= slices)\n        return H;\n": ""}       # the last bound was not pinned to H either
    for fixed, old in fixes.items():
        assert fixed in source
        source = source.replace(fixed, old)
    broken = tmp_path / "broken.c"
    broken.write_text(source)
    library = tmp_path / "broken.so"
    subprocess.run([kernel_build.compiler(), "-O2", "-shared", "-fPIC", str(broken), "-o", str(library)], check=True)
    problem = native_kernel._self_check(native_kernel.Kernel(ctypes.CDLL(str(library)), str(library), []))
    assert problem is not None and "129, 2 slices" in problem, problem
    assert native_kernel._self_check(c_kernel) is None


@pytest.mark.parametrize("ci", [None, "true"])
@pytest.mark.parametrize("missing", ["compiler", "TEXTGEN_NATIVE=0"])
def test_the_c_kernel_tests_skip_without_a_compiler_but_fail_under_ci(monkeypatch, ci, missing):
    """A machine without a compiler (or with the kernel turned off) skips the C kernel's tests; CI must
    not: there they fail, naming why, instead of leaving half of this file's paths untested."""
    from conftest import c_kernel_or_skip, need_c_compiler
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    if missing == "compiler":
        monkeypatch.setattr(kernel_build, "compiler", lambda: None)
    else:
        monkeypatch.setenv("TEXTGEN_NATIVE", "0")
    expected = pytest.fail.Exception if ci else pytest.skip.Exception
    for check in (c_kernel_or_skip, need_c_compiler):
        try:                                 # caught here: a skip escaping pytest.raises would skip this test
            check()
            outcome = None
        except (pytest.fail.Exception, pytest.skip.Exception) as e:
            outcome = e
        assert type(outcome) is expected, (check.__name__, outcome)
        assert ("C compiler" if missing == "compiler" else "TEXTGEN_NATIVE=0") in str(outcome)


def test_a_step_function_keeps_alive_every_tensor_it_points_into():
    """The C kernel's step functions hold raw pointers, so every tensor they write into lives as long as they
    do: also dL/dc and the bias gradient of the backward steps, which the steps update in place and only
    finish() hands back. (A benchmark harness that dropped finish() had its steps write into freed memory:
    "free(): corrupted unsorted chunks".)"""
    import weakref

    from textgen.lstm.steps import _kernel_backward_steps, _kernel_backward_steps_bf16
    kernel = c_kernel_or_skip()
    T_, B, H = 3, 2, 16
    gates, cs, c0, grad_c = torch.rand(T_, B, 4 * H), torch.randn(T_, B, H), torch.randn(B, H), torch.randn(B, H)
    for make, activations, grad_gates in [
            (_kernel_backward_steps, gates, torch.empty(T_, B, 4 * H)),
            (_kernel_backward_steps_bf16, native_kernel.kept_bf16(gates), torch.empty(T_, B, 4 * H, dtype=torch.bfloat16))]:
        step, finish = make(kernel, activations, cs, c0, grad_gates, grad_c)
        written = [weakref.ref(t) for t in finish()]
        del finish
        assert all(ref() is not None for ref in written), f"{make.__name__}: a tensor its step writes into was freed"
        del step


def test_pointer_refuses_any_tensor_the_kernel_would_misread():
    good = torch.zeros(3, 8)
    assert native_kernel.pointer(good, (3, 8), "h") == good.data_ptr()
    for bad in (torch.zeros(3, 8, dtype=torch.float64), torch.zeros(8, 3).t(), torch.zeros(3, 9),
                torch.zeros(2, 8), torch.zeros(3, 8, device="meta"), torch.zeros(24)):
        with pytest.raises(RuntimeError, match=r"C kernel: h must be a contiguous CPU float32 tensor of shape \(3, 8\)"):
            native_kernel.pointer(bad, (3, 8), "h")
