"""Our LSTM against references: torch.nn.LSTM with copied weights, the gate-by-gate cell, gradcheck."""
import pytest
import torch
import torch.nn.functional as F

from textgen.model import CharLSTM, FusedLSTMLayer, ModelConfig, StackedLSTM, Stepper, detach_state


def random_state(layers, batch, hidden, dtype=torch.float32):
    return tuple((torch.randn(batch, hidden, dtype=dtype), torch.randn(batch, hidden, dtype=dtype))
                 for _ in range(layers))


def as_nn_state(state):
    return torch.stack([h for h, _ in state]), torch.stack([c for _, c in state])


def test_stack_equals_nn_lstm_outputs_final_state_and_gradients():
    torch.manual_seed(0)
    ours = StackedLSTM(12, 24, layers=3)
    ref = torch.nn.LSTM(12, 24, num_layers=3)
    ref.load_state_dict(ours.state_dict())          # same names, same shapes, same gate order
    x = torch.randn(9, 5, 12)
    state = random_state(3, 5, 24)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, new_state = ours(x1, state)
    ref_out, (ref_h, ref_c) = ref(x2, as_nn_state(state))
    h, c = as_nn_state(new_state)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(h, ref_h, atol=1e-5, rtol=0)
    torch.testing.assert_close(c, ref_c, atol=1e-5, rtol=0)
    weights = torch.randn_like(out)
    ((out * weights).sum() + h.sum() + 2 * c.sum()).backward()
    ((ref_out * weights).sum() + ref_h.sum() + 2 * ref_c.sum()).backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=0)
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, dict(ref.named_parameters())[name].grad, atol=1e-5, rtol=1e-5)


def test_fused_layer_matches_gate_by_gate_reference():
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


def test_gradcheck_fused_layer_float64():
    torch.manual_seed(2)
    T, B, I, H = 4, 3, 5, 6
    args = [torch.randn(T, B, I), torch.randn(B, H), torch.randn(B, H), torch.randn(4 * H, I) * 0.5,
            torch.randn(4 * H, H) * 0.5, torch.randn(4 * H), torch.randn(4 * H)]
    args = [a.double().requires_grad_() for a in args]
    assert torch.autograd.gradcheck(FusedLSTMLayer.apply, args, eps=1e-6, atol=1e-5)


def test_gradcheck_stacked_model_float64():
    """Inputs, initial state and every weight of a 2-layer stack, through the fused path."""
    torch.manual_seed(3)
    stack = StackedLSTM(4, 5, layers=2).double()
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


def test_three_chunks_with_carried_state_equal_the_whole_sequence():
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


def test_stepper_equals_forward_one_character_at_a_time():
    torch.manual_seed(5)
    model = CharLSTM(ModelConfig(vocab_size=17, embed_size=8, hidden_size=16, layers=2, dropout=0.3)).eval()
    tokens = torch.randint(0, 17, (3, 12))
    logits, final = model(tokens)
    step, state, outs = Stepper(model), model.initial_state(3), []
    for t in range(tokens.shape[1]):
        out, state = step(tokens[:, t], state)
        outs.append(out)
    torch.testing.assert_close(torch.stack(outs, 1), logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(state[-1][1], final[-1][1], atol=1e-5, rtol=0)


def test_forget_gate_bias_starts_at_one_and_shapes_match_config():
    model = CharLSTM(ModelConfig(vocab_size=30, embed_size=8, hidden_size=16, layers=2))
    for k in range(2):
        bias = getattr(model.lstm, f"bias_ih_l{k}") + getattr(model.lstm, f"bias_hh_l{k}")
        assert torch.allclose(bias[16:32], torch.ones(16))
    logits, state = model(torch.zeros(2, 5, dtype=torch.long))
    assert logits.shape == (2, 5, 30)
    assert len(state) == 2 and state[0][0].shape == (2, 16)


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


def test_fused_layer_frees_its_graph_after_backward():
    """Intermediates kept for backward die with the graph by reference counting alone.

    A cycle through the autograd node (output -> grad_fn -> ctx -> output) would only
    be freed by Python's cyclic GC, which rarely runs in a training loop: memory grew
    by ~40 MB per step before this was fixed.
    """
    import gc
    import weakref
    stack = StackedLSTM(4, 8, layers=1)
    gc.disable()
    try:
        out, state = stack(torch.randn(5, 2, 4))
        kept = weakref.ref(state[0][1].grad_fn.cs)   # the cell states the backward pass needs
        (out.sum() + state[0][1].sum()).backward()
        carried = tuple((h.detach(), c.detach()) for h, c in state)   # what training keeps
        del out, state
        assert kept() is None
    finally:
        gc.enable()
    assert carried[0][1].shape == (2, 8)


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_low_precision_matmuls_stay_close_to_float32(low):
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
    for a, b in zip(g32, g16):
        cosine = F.cosine_similarity(a.flatten(), b.flatten(), dim=0)
        assert cosine > 0.99, cosine
