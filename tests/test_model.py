"""Our LSTM against references: torch.nn.LSTM with copied weights, the gate-by-gate cell, gradcheck."""
import pytest
import torch
import torch.nn.functional as F

import textgen.lstm.fused_lstm
from conftest import NNLSTMStack, c_kernel_or_skip, ran_the_chosen_path
from textgen.lstm import native_kernel
from textgen.lstm.fused_lstm import FusedLSTMLayer, lstm_layer
from textgen.lstm import Stepper
from textgen.lstm.model import CharLSTM, ModelConfig, StackedLSTM, detach_state


def random_state(layers, batch, hidden, dtype=torch.float32):
    return tuple((torch.randn(batch, hidden, dtype=dtype), torch.randn(batch, hidden, dtype=dtype))
                 for _ in range(layers))


def as_nn_state(state):
    return torch.stack([h for h, _ in state]), torch.stack([c for _, c in state])


@pytest.mark.parametrize("residual,inputs,hidden,steps,batch", [(False, 12, 24, 9, 5), (True, 7, 13, 11, 4)])
def test_stack_equals_nn_lstm_outputs_final_state_and_gradients(pointwise, residual, inputs, hidden, steps, batch):
    """Plain: one 3-layer nn.LSTM takes our state dict as it is (same names, shapes, gate order).
    Residual: one nn.LSTM per layer (NNLSTMStack), layer k >= 1 handing up its input plus its output,
    the first (input size differs) its output alone; the states are each layer's own LSTM state. With
    autograd and without."""
    torch.manual_seed(0)
    ours = StackedLSTM(inputs, hidden, layers=3, residual=residual)
    if residual:
        ref = NNLSTMStack(ours)
        ref_grad = ref.grad
    else:
        ref = torch.nn.LSTM(inputs, hidden, num_layers=3)
        ref.load_state_dict(ours.state_dict())
        ref_grad = lambda name: dict(ref.named_parameters())[name].grad  # noqa: E731
    x = torch.randn(steps, batch, inputs)
    state = random_state(3, batch, hidden)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, new_state = ours(x1, state)
    ref_out, (ref_h, ref_c) = ref(x2, as_nn_state(state))
    h, c = as_nn_state(new_state)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(h, ref_h, atol=1e-5, rtol=0)
    torch.testing.assert_close(c, ref_c, atol=1e-5, rtol=0)
    with torch.no_grad():                     # inference: the layers run without autograd (and sum in place)
        inferred, inferred_state = ours(x, state)
    for name, a, b in [("out", inferred, ref_out), *zip(("h", "c"), as_nn_state(inferred_state), (ref_h, ref_c))]:
        torch.testing.assert_close(a, b.detach(), atol=1e-5, rtol=0, msg=f"{name} without autograd")
    weights = torch.randn_like(out)
    ((out * weights).sum() + h.sum() + 2 * c.sum()).backward()
    ((ref_out * weights).sum() + ref_h.sum() + 2 * ref_c.sum()).backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=0)
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, ref_grad(name), atol=1e-5, rtol=1e-5)
    assert ran_the_chosen_path(pointwise)


def test_fused_layer_matches_gate_by_gate_reference(pointwise):
    torch.manual_seed(1)
    model = CharLSTM(ModelConfig(vocab_size=11, embed_size=6, hidden_size=10, layers=2, dropout=0.0))
    tokens = torch.randint(0, 11, (3, 13))
    fast, fast_state = model(tokens)
    ref, ref_state = model(tokens, reference=True)
    torch.testing.assert_close(fast, ref, atol=1e-6, rtol=0)
    fast.square().sum().backward()
    fast_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref.square().sum().backward()
    for g, p in zip(fast_grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, atol=1e-5, rtol=1e-5)
    assert ran_the_chosen_path(pointwise)


def test_a_residual_layer_refuses_an_input_it_cannot_add():
    """A residual layer adds its input to its output: an input of another width (even one that would
    broadcast) is refused in one sentence, with autograd and without, not summed into the wrong shape."""
    T, B, H = 4, 3, 8
    for I in (1, 5):
        args = [torch.randn(T, B, I), torch.zeros(B, H), torch.zeros(B, H), torch.randn(4 * H, I),
                torch.randn(4 * H, H), torch.zeros(4 * H), torch.zeros(4 * H)]
        for grad in (True, False):
            with torch.set_grad_enabled(grad):
                leaves = [a.clone().requires_grad_(grad) for a in args]
                with pytest.raises(ValueError, match=f"input size must equal the hidden size \\({H}\\); got {I}"):
                    lstm_layer(*leaves, residual=True)


def test_gradcheck_fused_layer_float64():
    torch.manual_seed(2)
    T, B, I, H = 4, 3, 5, 6
    args = [torch.randn(T, B, I), torch.randn(B, H), torch.randn(B, H), torch.randn(4 * H, I) * 0.5,
            torch.randn(4 * H, H) * 0.5, torch.randn(4 * H), torch.randn(4 * H)]
    args = [a.double().requires_grad_() for a in args]
    assert torch.autograd.gradcheck(FusedLSTMLayer.apply, args, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("residual", [False, True])
def test_gradcheck_stacked_model_float64(residual):
    """Inputs, initial state and every weight of a 2-layer stack, through the fused path."""
    torch.manual_seed(3)
    stack = StackedLSTM(4, 5, layers=2, residual=residual).double()
    names = [n for n, _ in stack.named_parameters()]
    x = torch.randn(3, 2, 4, dtype=torch.double, requires_grad=True)
    h0 = torch.randn(2, 5, dtype=torch.double, requires_grad=True)
    c0 = torch.randn(2, 5, dtype=torch.double, requires_grad=True)
    weights = [p.detach().clone().requires_grad_() for p in stack.parameters()]

    def f(x, h0, c0, *weights):
        out, state = torch.func.functional_call(stack, dict(zip(names, weights)),
                                                (x, ((h0, c0), (h0 * 0.5, c0 * 0.5))))
        return out, state[1][1]

    assert torch.autograd.gradcheck(f, (x, h0, c0, *weights), eps=1e-6, atol=1e-5)


def test_three_chunks_with_carried_state_equal_the_whole_sequence(pointwise):
    torch.manual_seed(4)
    model = CharLSTM(ModelConfig(vocab_size=20, embed_size=8, hidden_size=16, layers=3, dropout=0.0)).eval()
    tokens = torch.randint(0, 20, (4, 30))
    whole, whole_state = model(tokens)
    state, pieces = None, []
    for chunk in tokens.split([7, 11, 12], dim=1):
        logits, state = model(chunk, state)
        state = detach_state(state)
        pieces.append(logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, atol=1e-5, rtol=0)
    for (h, c), (wh, wc) in zip(state, whole_state):
        torch.testing.assert_close(h, wh, atol=1e-5, rtol=0)
        torch.testing.assert_close(c, wc, atol=1e-5, rtol=0)
    assert ran_the_chosen_path(pointwise)


@pytest.mark.parametrize("layers,residual", [(2, False), (3, True)])
def test_stepper_equals_forward_one_character_at_a_time(pointwise, layers, residual):
    torch.manual_seed(5)
    model = CharLSTM(ModelConfig(vocab_size=17, embed_size=8, hidden_size=16, layers=layers, dropout=0.3,
                                 residual=residual)).eval()
    assert_steps_equal_forward(Stepper(model), model, torch.randint(0, 17, (3, 12)))
    assert ran_the_chosen_path(pointwise)


def assert_steps_equal_forward(step, model, tokens):
    """The stepper, one character at a time, gives the logits and final state of CharLSTM.forward over tokens."""
    logits, final = model(tokens)
    state, outs = model.initial_state(tokens.shape[0]), []
    for t in range(tokens.shape[1]):
        out, state = step(tokens[:, t], state)
        outs.append(out)
    torch.testing.assert_close(torch.stack(outs, 1), logits, atol=1e-5, rtol=0)
    for (h, c), (final_h, final_c) in zip(state, final):
        torch.testing.assert_close(h, final_h, atol=1e-5, rtol=0)
        torch.testing.assert_close(c, final_c, atol=1e-5, rtol=0)


def test_forget_gate_bias_starts_at_one_and_shapes_match_config():
    model = CharLSTM(ModelConfig(vocab_size=30, embed_size=8, hidden_size=16, layers=2))
    for k in range(2):
        bias = getattr(model.lstm, f"bias_ih_l{k}") + getattr(model.lstm, f"bias_hh_l{k}")
        assert torch.allclose(bias[16:32], torch.ones(16))
    logits, state = model(torch.zeros(2, 5, dtype=torch.long))
    assert logits.shape == (2, 5, 30)
    assert len(state) == 2 and state[0][0].shape == (2, 16)


def test_each_gates_recurrent_matrix_starts_orthogonal_and_the_rest_uniform():
    """W_hh's four (H, H) gate blocks are orthogonal (Q Q^T = I), each a different draw; W_ih keeps
    nn.LSTM's uniform draw within 1/sqrt(H)."""
    torch.manual_seed(2)
    H = 24
    lstm = StackedLSTM(input_size=10, hidden_size=H, layers=3)
    for k in range(3):
        w_hh = getattr(lstm, f"weight_hh_l{k}").detach()
        blocks = [w_hh[g * H:(g + 1) * H] for g in range(4)]
        for q in blocks:
            torch.testing.assert_close(q @ q.t(), torch.eye(H), atol=1e-5, rtol=0)
        assert not torch.allclose(blocks[0], blocks[1])
        w_ih = getattr(lstm, f"weight_ih_l{k}").detach()
        assert w_ih.abs().max() <= H ** -0.5 and w_ih.abs().max() > 0.9 * H ** -0.5


def test_overfitting_one_batch_drives_the_loss_near_zero():
    torch.manual_seed(6)
    model = CharLSTM(ModelConfig(vocab_size=10, embed_size=16, hidden_size=64, layers=2, dropout=0.0))
    x = torch.randint(0, 10, (4, 20))
    y = torch.randint(0, 10, (4, 20))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(250):
        logits, _ = model(x)
        loss = F.cross_entropy(logits.reshape(-1, 10), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05, loss.item()


def test_fused_layer_frees_its_graph_after_backward(pointwise):
    """Intermediates kept for backward die by reference counting alone: as soon as the backward pass has
    run, while the outputs still live (the layers below then reuse their memory), or with the graph where
    it is retained.

    A cycle through the autograd node (output -> grad_fn -> ctx -> output) would only
    be freed by Python's cyclic GC, which rarely runs in a training loop: memory grew
    by ~40 MB per step before this was fixed.
    """
    import gc
    import weakref
    stack = StackedLSTM(4, 8, layers=1)
    gc.disable()
    try:
        for retain in (False, True):
            out, state = stack(torch.randn(5, 2, 4))
            kept = weakref.ref(state[0][1].grad_fn.saved_tensors[7])   # the cell states the backward pass needs
            (out.sum() + state[0][1].sum()).backward(retain_graph=retain)
            carried = tuple((h.detach(), c.detach()) for h, c in state)   # what training keeps
            assert (kept() is None) == (not retain)
            del out, state
            assert kept() is None
    finally:
        gc.enable()
    assert carried[0][1].shape == (2, 8)
    assert ran_the_chosen_path(pointwise)


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_low_precision_matmuls_stay_close_to_float32(low, pointwise):
    """bf16 (8-bit mantissa) or fp16 (11-bit) products with float32 cell state: close, not equal."""
    torch.manual_seed(8)
    model = CharLSTM(ModelConfig(vocab_size=30, embed_size=16, hidden_size=64, layers=2, dropout=0.0))
    tokens = torch.randint(0, 30, (8, 40))
    target = torch.randint(0, 30, (8, 40))
    results = {}
    for dtype in (None, low):
        model.zero_grad()
        model.lstm.matmul_dtype = dtype
        logits, state = model(tokens)
        F.cross_entropy(logits.reshape(-1, 30), target.reshape(-1)).backward()
        results[dtype] = logits.detach(), [p.grad.clone() for p in model.parameters()], state
    model.lstm.matmul_dtype = None
    (l32, g32, _), (l16, g16, s16) = results[None], results[low]
    assert l16.dtype == torch.float32 and s16[1][1].dtype == torch.float32
    assert not torch.equal(l32, l16)                                   # it really ran in low precision
    torch.testing.assert_close(l16, l32, atol=3e-2, rtol=3e-2)
    # Against float32 (test_fast_path holds the layer to a bf16-aware reference): bf16 rounds a product
    # by up to 2**-9 of itself, fp16 by 2**-12; the figures seen were 1.0e-3 and 1.4e-4 for the logits,
    # 3.1e-3 and 5.3e-4 for the worst gradient, 1.8e-4 and 6.2e-5 for a gradient's norm.
    mantissa_step = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}[low]
    assert (l16 - l32).norm() <= mantissa_step * l32.norm()
    for a, b in zip(g32, g16):
        cosine = F.cosine_similarity(a.flatten(), b.flatten(), dim=0)
        assert cosine > 0.99, cosine
        assert (b - a).norm() <= 4 * mantissa_step * a.norm()
        assert abs(b.norm() - a.norm()) <= mantissa_step * a.norm() / 2      # scale: doubled gradients fail
    assert ran_the_chosen_path(pointwise)


def test_c_kernel_and_torch_ops_train_to_the_same_weights(monkeypatch):
    """Ten AdamW steps with carried state: both pointwise paths end at the same weights."""
    kernel = c_kernel_or_skip()
    weights = {}
    for path in ("torch-ops", "c-kernel"):
        monkeypatch.setattr(native_kernel, "load", (lambda: None) if path == "torch-ops" else (lambda: kernel))
        torch.manual_seed(9)
        model = CharLSTM(ModelConfig(vocab_size=25, embed_size=8, hidden_size=48, layers=2, dropout=0.0))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        data = torch.randint(0, 25, (6, 10 * 12 + 1))
        state = None
        for k in range(10):
            x, y = data[:, k * 12 : (k + 1) * 12], data[:, k * 12 + 1 : (k + 1) * 12 + 1]
            logits, state = model(x, state)
            loss = F.cross_entropy(logits.reshape(-1, 25), y.reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            state = detach_state(state)
        weights[path] = [p.detach().clone() for p in model.parameters()]
    for a, b in zip(weights["torch-ops"], weights["c-kernel"]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_c_kernel_splits_large_steps_over_threads_correctly(monkeypatch):
    """A step of 64 x 300 cells (over the kernel's threshold for threads; 300 is not a multiple of
    the slice width) gives the same outputs and gradients as PyTorch ops."""
    c_kernel = c_kernel_or_skip()
    torch.manual_seed(10)
    stack = StackedLSTM(7, 300, layers=1)
    x, state = torch.randn(5, 64, 7), random_state(1, 64, 300)
    results = {}
    for path, kernel in (("torch-ops", None), ("c-kernel", c_kernel)):
        monkeypatch.setattr(native_kernel, "load", lambda: kernel)
        stack.zero_grad()
        out, ((h, c),) = stack(x, state)
        (out.square().sum() + c.sum()).backward()
        results[path] = out.detach(), c.detach(), [p.grad.clone() for p in stack.parameters()]
    (out_t, c_t, grads_t), (out_c, c_c, grads_c) = results["torch-ops"], results["c-kernel"]
    torch.testing.assert_close(out_c, out_t, atol=1e-5, rtol=0)
    torch.testing.assert_close(c_c, c_t, atol=1e-5, rtol=0)
    for a, b in zip(grads_c, grads_t):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


def test_the_kernel_is_neither_built_nor_used_for_tensors_it_cannot_take(monkeypatch):
    """float64 (gradcheck) and non-CPU tensors go to PyTorch ops without compiling anything."""
    def no_build():
        raise AssertionError("the kernel was loaded for tensors it cannot take")
    monkeypatch.setattr(native_kernel, "load", no_build)
    assert native_kernel.for_tensors(torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, 3)) is None
    assert native_kernel.for_tensors(torch.zeros(2, 3, device="meta")) is None


def test_a_nan_in_the_weights_reaches_the_output_on_both_paths(pointwise):
    """The C kernel's exp works on bit patterns; it must not turn NaN into a number (divergence must show)."""
    model = CharLSTM(ModelConfig(vocab_size=12, embed_size=8, hidden_size=16, layers=1, dropout=0.0))
    with torch.no_grad():
        model.lstm.weight_ih_l0[3, 2] = float("nan")
    logits, _ = model(torch.arange(12).view(2, 6))
    assert torch.isnan(logits).any()
    assert ran_the_chosen_path(pointwise)


def test_c_kernel_keeps_every_nan_a_nan():
    """NaNs with payload bits too: the exponent arithmetic in exp_approx could turn those into numbers."""
    kernel = c_kernel_or_skip()
    patterns = [0x7FC00000, 0x7FC00001, 0x7FC12345, 0xFFC00007, 0x7F800001, 0x7FFFFFFF, 0xFFFFFFFF]
    B, H = 1, len(patterns)
    for gate in range(4):
        pre = torch.zeros(B, 4 * H)
        pre[0, gate * H : (gate + 1) * H] = torch.tensor(patterns, dtype=torch.int64).to(torch.int32).view(torch.float32)
        gates, c, h = torch.empty(B, 4 * H), torch.empty(B, H), torch.empty(B, H)
        c_prev = torch.zeros(B, H)
        p = native_kernel.pointer
        kernel.forward_step(B, H, 1, p(pre, (B, 4 * H), "pre"), p(gates, (B, 4 * H), "gates"),
                            p(c_prev, (B, H), "c_prev"), p(c, (B, H), "c"), p(h, (B, H), "h"))
        assert torch.isnan(gates[0, gate * H : (gate + 1) * H]).all(), (gate, gates)
        assert torch.isnan(h).all(), (gate, h)


def test_c_kernel_saturates_like_torch_at_extreme_pre_activations(pointwise):
    """Pre-activations of +-1e4 (and inf) give gates of exactly 0/1 and finite states, as in PyTorch."""
    layer_in = torch.tensor([[[1e4], [-1e4], [float("inf")]]])             # (T=1, B=3, I=1)
    stack = StackedLSTM(1, 4, layers=1)
    with torch.no_grad():
        stack.weight_ih_l0.fill_(1.0)
        stack.weight_hh_l0.zero_()
        stack.bias_ih_l0.zero_()
        stack.bias_hh_l0.zero_()
    out, ((h, c),) = stack(layer_in)
    # i = f = o = sigmoid(x), g = tanh(x): +1e4 -> c = 1, h = tanh(1); -1e4 -> 0, 0; inf -> as +1e4
    expected_c = torch.tensor([1.0, 0.0, 1.0]).unsqueeze(1).expand(3, 4)
    torch.testing.assert_close(c, expected_c, atol=1e-6, rtol=0)
    torch.testing.assert_close(h, torch.tanh(expected_c), atol=1e-6, rtol=0)
    assert ran_the_chosen_path(pointwise)


def test_a_second_derivative_through_the_fused_layer_raises_instead_of_being_wrong(pointwise):
    """The backward pass is hand-written and not itself differentiable: double backward must refuse."""
    torch.manual_seed(12)
    stack = StackedLSTM(3, 4, layers=1)
    x = torch.randn(2, 2, 3, requires_grad=True)
    out, _ = stack(x)
    (grad_x,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad_x.sum().backward()


def test_the_parameter_count_is_known_before_the_model_is_built():
    for config in (ModelConfig(65), ModelConfig(11, 6, 10, 1, 0.0), ModelConfig(30, 8, 17, 3)):
        assert config.num_parameters() == CharLSTM(config).num_parameters()


def test_the_stepper_gives_the_same_answer_for_the_same_state_and_never_overwrites_kept_states(pointwise):
    """It reuses its own buffers between calls; a state from an earlier call must still mean what it did."""
    torch.manual_seed(13)
    model = CharLSTM(ModelConfig(vocab_size=9, embed_size=4, hidden_size=12, layers=2, dropout=0.0)).eval()
    step, tokens = Stepper(model), torch.tensor([3, 5])
    start = model.initial_state(2)
    first, after_one = step(tokens, start)
    kept = [(h.clone(), c.clone()) for h, c in after_one]
    second, after_two = step(tokens, after_one)
    assert all(torch.equal(h, kh) and torch.equal(c, kc) for (h, c), (kh, kc) in zip(after_one, kept))
    again, _ = step(tokens, start)                                    # back to the first state
    assert torch.equal(again, first) and not torch.equal(second, first)
    assert ran_the_chosen_path(pointwise)


@pytest.mark.parametrize("head", ["full", "adaptive"])
def test_the_c_step_equals_forward_with_either_output_layer(head, monkeypatch):
    """Generation's one-call C step (lstm_rows_step) against CharLSTM.forward, with the output layer in C
    (full) or left to the model (adaptive), over hidden sizes off the vector widths (37: tails)."""
    counting = c_kernel_or_skip()
    torch.manual_seed(11)
    model = CharLSTM(ModelConfig(vocab_size=40, embed_size=8, hidden_size=37, layers=3, residual=True,
                                 head=head, cutoffs=(20,) if head == "adaptive" else ())).eval()
    step = Stepper(model)
    assert step.rows_step is not None and counting is not None
    assert_steps_equal_forward(step, model, torch.randint(0, 40, (5, 9)))


@pytest.mark.parametrize("hidden", [32, 37, 64])
def test_a_row_of_the_c_step_has_the_same_bits_at_every_batch_size(hidden):
    """Each row alone, and in batches of 2 to 11 rows (four at a time in the kernel, and the rest one by one),
    gives the same logits and state, bit for bit: the batching server's promise, by the kernel's construction."""
    c_kernel_or_skip()
    torch.manual_seed(3)
    model = CharLSTM(ModelConfig(vocab_size=30, embed_size=8, hidden_size=hidden, layers=2)).eval()
    step = Stepper(model, rows_agree=True, most_rows=11)
    assert step.rows_step is not None and step.rows_agree
    tokens = torch.randint(0, 30, (11,))
    state = tuple((torch.randn(11, hidden), torch.randn(11, hidden)) for _ in range(2))
    whole_logits, whole_state = step(tokens, state)
    for n in range(1, 11):
        for first in (0, 11 - n):
            rows = slice(first, first + n)
            logits, part = step(tokens[rows].clone(), tuple((h[rows].clone(), c[rows].clone()) for h, c in state))
            assert torch.equal(logits, whole_logits[rows])
            assert all(torch.equal(a, b[rows]) for pair, whole in zip(part, whole_state) for a, b in zip(pair, whole))


def test_a_layer_reads_a_state_that_is_not_contiguous(pointwise, monkeypatch):
    """h0 and c0 as expanded views (no storage of their own per row), on the whole-chunk C path and the
    step-by-step ones, against the reference cell fed contiguous copies."""
    import textgen.lstm.fused_lstm as fused
    from textgen.lstm.fused_lstm import lstm_layer
    from textgen.lstm.model import lstm_layer_reference
    torch.manual_seed(9)
    T, B, I, H = 3, 8, 5, 16
    x = torch.randn(T, B, I)
    weights = [torch.randn(4 * H, I) * 0.3, torch.randn(4 * H, H) * 0.3, torch.randn(4 * H) * 0.1, torch.randn(4 * H) * 0.1]
    h, c = torch.randn(1, H).expand(B, H), torch.randn(1, H).expand(B, H)
    expected = lstm_layer_reference(x, h.contiguous(), c.contiguous(), *weights)
    for chunk in (1 << 62, -1):
        monkeypatch.setattr(fused, "_CHUNK_PRODUCT", chunk)
        for ours, ref in zip(lstm_layer(x, h, c, *weights), expected):
            torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
