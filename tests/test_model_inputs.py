"""Malformed states and inputs at every public door of the model: CharLSTM.forward (fast and
reference paths), the Stepper, and a Generator from textgen.load(). Each one is a ValueError
that names the layer, the expected (batch, hidden) shape and what came, before any pointer
reaches the C kernel; a harmless difference (float64, a non-contiguous view) gives exactly
the result of the well-formed input instead.
"""
import pytest
import torch

import textgen
from conftest import ran_the_chosen_path
from textgen.lstm import CharLSTM, ModelConfig, Stepper
from textgen.generation.sampling import SampleConfig

V, LAYERS, B, H = 11, 2, 3, 10


@pytest.fixture
def model():
    torch.manual_seed(0)
    return CharLSTM(ModelConfig(vocab_size=V, embed_size=6, hidden_size=H, layers=LAYERS, dropout=0.0)).eval()


def good_state(batch=B):
    gen = torch.Generator().manual_seed(1)
    return tuple((torch.randn(batch, H, generator=gen), torch.randn(batch, H, generator=gen)) for _ in range(LAYERS))


def replace(state, layer, which, tensor):
    pairs = [list(pair) for pair in state]
    pairs[layer][which] = tensor
    return tuple(tuple(pair) for pair in pairs)


def malformed_states():
    """(name, state, fragments the message must hold)."""
    s = good_state()
    shape = f"(batch, hidden) = ({B}, {H})"
    h0, c1 = s[0][0], s[1][1]
    return [
        ("a (1, H) pair", replace(replace(s, 0, 0, h0[:1]), 0, 1, s[0][1][:1]), ["h of layer 0", shape, "(1, 10)"]),
        ("a wrong hidden size", replace(s, 1, 1, torch.zeros(B, H + 1)), ["c of layer 1", shape, "(3, 11)"]),
        ("a wrong batch", replace(s, 1, 0, torch.zeros(B + 2, H)), ["h of layer 1", shape, "(5, 10)"]),
        ("a missing layer", s[:1], ["one (h, c) pair per layer (2)", shape, "tuple of length 1"]),
        ("an extra layer", s + s[:1], ["one (h, c) pair per layer (2)", "tuple of length 3"]),
        ("nn.LSTM's stacked (h, c)", (torch.stack([p[0] for p in s]), torch.stack([p[1] for p in s])),
         ["state of layer 0 must be a pair (h, c)", shape, "shaped (2, 3, 10)"]),
        ("a pair of three", ((h0, h0, h0), s[1]), ["state of layer 0 must be a pair", "tuple of length 3"]),
        ("a lone tensor per layer", (h0, c1), ["state of layer 0 must be a pair", "shaped (3, 10)"]),
        ("None for h", replace(s, 0, 0, None), ["h of layer 0", shape, "NoneType"]),
        ("a number for c", replace(s, 1, 1, 0.0), ["c of layer 1", shape, "float"]),
        ("integer tensors", replace(s, 0, 1, torch.zeros(B, H, dtype=torch.int64)), ["c of layer 0", "torch.int64"]),
        ("a 1-D h", replace(s, 0, 0, torch.zeros(H)), ["h of layer 0", shape, "(10,)"]),
        ("a 3-D h", replace(s, 0, 0, torch.zeros(1, B, H)), ["h of layer 0", shape, "(1, 3, 10)"]),
        ("another device", replace(s, 1, 0, torch.zeros(B, H, device="meta")), ["h of layer 1 is on meta", "cpu"]),
        ("not a tuple at all", "state", ["one (h, c) pair per layer", "str"]),
    ]


STATE_CASES = malformed_states()


@pytest.mark.parametrize("reference", [False, True])
@pytest.mark.parametrize("name,state,fragments", STATE_CASES, ids=[c[0] for c in STATE_CASES])
def test_a_malformed_state_is_a_value_error_naming_what_is_wrong(model, pointwise, name, state, fragments, reference):
    tokens = torch.randint(0, V, (B, 4))
    with pytest.raises(ValueError) as raised:
        model(tokens, state, reference=reference)
    for fragment in fragments:
        assert fragment in str(raised.value), (fragment, str(raised.value))
    assert pointwise is None or pointwise.calls == 0      # refused before any kernel call


@pytest.mark.parametrize("name,state,fragments", STATE_CASES, ids=[c[0] for c in STATE_CASES])
def test_a_malformed_state_is_refused_by_the_stepper(model, pointwise, name, state, fragments):
    with pytest.raises(ValueError) as raised:
        Stepper(model)(torch.randint(0, V, (B,)), state)
    for fragment in fragments:
        assert fragment in str(raised.value), (fragment, str(raised.value))
    assert pointwise is None or pointwise.calls == 0


def test_the_stepper_checks_a_state_it_returned_once_the_caller_changed_it(model, pointwise):
    """The stepper reads the state it returned last without checking it again, but only while it is still
    what it returned: None is refused, a tensor resized is refused, one whose storage was replaced is read
    (its values, as a fresh state would be), each as a state from elsewhere would be."""
    tokens = torch.randint(0, V, (B,))
    with pytest.raises(ValueError, match="one .h, c. pair per layer"):
        Stepper(model)(tokens, None)
    step = Stepper(model)
    _, returned = step(tokens, good_state())
    returned[1][1].resize_(2, 4000)
    with pytest.raises(ValueError, match="c of layer 1"):
        step(tokens, returned)
    step = Stepper(model)
    _, returned = step(tokens, good_state())
    replaced = torch.randn(B, H)
    returned[0][0].data = replaced.clone()
    logits, _ = step(tokens, returned)
    fresh, _ = Stepper(model)(tokens, ((replaced, returned[0][1].clone()), tuple(t.clone() for t in returned[1])))
    assert torch.equal(logits, fresh)


BAD_TOKENS = [
    ("an empty batch", torch.zeros(0, 4, dtype=torch.long), "the batch is empty"),
    ("no time steps", torch.zeros(B, 0, dtype=torch.long), "no time steps"),
    ("float tokens", torch.zeros(B, 4), "integer tensor shaped (batch, time)"),
    ("bool tokens", torch.zeros(B, 4, dtype=torch.bool), "integer tensor shaped (batch, time)"),
    ("1-D tokens", torch.zeros(4, dtype=torch.long), "integer tensor shaped (batch, time)"),
    ("ids past the vocabulary", torch.full((B, 4), V), f"ids in [0, {V})"),
    ("negative ids", torch.full((B, 4), -1), f"ids in [0, {V})"),
    ("tokens on another device", torch.zeros(B, 4, dtype=torch.long, device="meta"), "on meta"),
    ("a list", [[1, 2]], "integer tensor"),
]


@pytest.mark.parametrize("name,tokens,fragment", BAD_TOKENS, ids=[c[0] for c in BAD_TOKENS])
def test_malformed_tokens_are_a_value_error(model, pointwise, name, tokens, fragment):
    with pytest.raises(ValueError, match=None) as raised:
        model(tokens)
    assert fragment in str(raised.value), str(raised.value)


def test_malformed_tokens_are_refused_by_the_stepper(model):
    step, state = Stepper(model), good_state()
    for tokens, fragment in ((torch.zeros(0, dtype=torch.long), "the batch is empty"),
                             (torch.zeros(B, 1, dtype=torch.long), "integer tensor shaped (batch,)"),
                             (torch.full((B,), V), f"ids in [0, {V})"),
                             (torch.zeros(B + 1, dtype=torch.long), "(batch, hidden) = (4, 10)")):
        with pytest.raises(ValueError) as raised:
            step(tokens, state)
        assert fragment in str(raised.value), str(raised.value)


def test_a_malformed_layer_input_is_a_value_error(model):
    for x, fragment in ((torch.zeros(4, B, 7), "(time, batch, input) = (T, B, 6)"),
                        (torch.zeros(B, 6), "(time, batch, input)"),
                        (torch.zeros(4, B, 6, dtype=torch.long), "floating-point"),
                        (torch.zeros(4, 0, 6), "the batch is empty")):
        with pytest.raises(ValueError) as raised:
            model.lstm(x)
        assert fragment in str(raised.value), str(raised.value)


def harmless_variants():
    s = good_state()
    transposed = tuple((h.t().contiguous().t(), c.t().contiguous().t()) for h, c in s)   # same values, strided
    assert not transposed[0][0].is_contiguous()
    return [("float64", tuple((h.double(), c.double()) for h, c in s)),
            ("non-contiguous views", transposed),
            ("lists instead of tuples", [list(pair) for pair in s])]


@pytest.mark.parametrize("name,variant", harmless_variants(), ids=[v[0] for v in harmless_variants()])
def test_a_harmless_difference_gives_exactly_the_well_formed_result(model, pointwise, name, variant):
    tokens = torch.randint(0, V, (B, 6))
    expected, expected_state = model(tokens, good_state())
    got, got_state = model(tokens, variant)
    assert torch.equal(got, expected)
    for (h, c), (eh, ec) in zip(got_state, expected_state):
        assert torch.equal(h, eh) and torch.equal(c, ec) and h.dtype == torch.float32
    step = Stepper(model)
    logits, _ = step(tokens[:, 0], good_state())
    assert torch.equal(step(tokens[:, 0], variant)[0], logits)
    assert ran_the_chosen_path(pointwise)


def test_gradients_reach_a_float64_initial_state(model):
    """Converting a float64 state keeps it in the graph: h0 still gets its gradient."""
    state = tuple((h.double().requires_grad_(), c.double().requires_grad_()) for h, c in good_state())
    logits, _ = model(torch.randint(0, V, (B, 5)), state)
    logits.sum().backward()
    assert all(h.grad is not None and h.grad.dtype == torch.float64 for h, _ in state)


def test_a_generator_with_a_malformed_state_raises_value_error(tiny_run):
    run_dir, _ = tiny_run
    loaded = textgen.load(run_dir)
    gen = loaded.generator(seed=1)
    hidden = loaded.config.hidden_size
    gen.state = tuple((torch.zeros(1, hidden - 1), torch.zeros(1, hidden)) for _ in range(loaded.config.layers))
    with pytest.raises(ValueError, match=rf"h of layer 0 must be .* \(batch, hidden\) = \(1, {hidden}\); got .*\(1, {hidden - 1}\)"):
        gen.generate(SampleConfig(length=5))
    with pytest.raises(ValueError, match=r"\(batch, hidden\)"):
        gen.feed("the sea")
    gen.reset()
    assert len(gen.generate(SampleConfig(length=5))[0]) == 5           # reset mends it
