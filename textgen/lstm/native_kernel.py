"""The LSTM's C kernel (lstm_kernel.c): its bindings, its numerical self-check, and loading it.

Only the fast path's modules in lstm/ import this (fused_lstm, products, steps, rows_step); it imports
only kernel_build.py, which compiles the kernel safely into a private cache. On small shapes one LSTM
step's ten or so pointwise tensor operations cost more in dispatch than in arithmetic, and torch.tanh is
slow on some CPUs; lstm_kernel.c does a step's pointwise work, forward or backward, in one vectorised pass,
and a small layer's whole time loop, generation's whole step and its draw in one call each (see the
file's head). It is compiled with the machine's C compiler (``$CC``, ``cc``, ``gcc`` or ``clang``;
``-march=native``, since it is built where it runs), once per source, compiler and CPU, and called
through ctypes, so it needs neither PyTorch headers nor a build step at install time.

What this module promises (kernel_build.py promises the rest: the private folder, the sha256, the deadline):

* A new build is checked numerically against PyTorch (every column of every split, each entry point)
  before first use.
* Every pointer handed to the kernel comes from ``pointer()``, which checks the tensor's device, dtype,
  shape and contiguity first.

``TEXTGEN_NATIVE=0`` turns the kernel off; ``TEXTGEN_NATIVE=1`` demands it
(``load()`` then raises ``KernelUnavailable`` with the compiler's first error
lines instead of falling back). Unset, a failure falls back to the PyTorch-op
path and ``describe()`` says why in one line. ``TEXTGEN_CACHE_DIR`` moves the
cache (default ``$XDG_CACHE_HOME/textgen`` or ``~/.cache/textgen``); the kernel
lives in its ``kernels`` folder.
"""
from __future__ import annotations

import ctypes
import functools
import os
import threading

import torch

from . import kernel_build

# Steps with fewer cells than this run as one slice: waking other threads costs more.
PARALLEL_MIN_CELLS = 4096


class KernelUnavailable(RuntimeError):
    """TEXTGEN_NATIVE=1 asked for the C kernel and it cannot be had; the message says why."""


def step_slices(batch: int, hidden: int) -> int:
    """How many column slices one step is split into: PyTorch's thread count for large steps, else 1.

    Any count gives the same numbers (each column is computed by one slice, the same way);
    it only decides how many threads share the work.
    """
    return torch.get_num_threads() if batch * hidden >= PARALLEL_MIN_CELLS else 1


def for_tensors(*tensors: torch.Tensor) -> Kernel | None:
    """The compiled kernel for work on these tensors, or None: PyTorch ops do it.

    The kernel takes CPU float32 only (and is not even built for other devices). None under
    torch.compile too: a ctypes call cannot be traced, PyTorch ops can be fused.
    """
    if torch.compiler.is_compiling() or any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return None
    return load()


def threads_pay_here() -> bool:
    """Whether the kernel's products (lstm_rows_step, the chunk loops) share their work among OpenMP's
    threads from this thread: on the main thread only. On another (a server's), a second team of OpenMP
    threads makes libgomp stop spinning between parallel regions, and waking its threads at every product
    costs more than they save: a row of generation 5,745 chars/s against 10,207 one-threaded, 16 rows 60k
    rows/s against 59k (2x256, AMD EPYC, 2 cores; benchmarks/README.md)."""
    return threading.current_thread() is threading.main_thread()


def pointer(tensor: torch.Tensor, shape: tuple[int, ...], name: str, dtype: torch.dtype = torch.float32) -> int:
    """tensor.data_ptr(), once the tensor is known to be what the kernel will read or write there.

    The kernel trusts the sizes it is given, so a tensor of any other device, dtype, shape
    or layout would make it read or write past the buffer: that is a bug in the caller,
    raised here before the pointer can leave Python.
    """
    # Written for speed (it runs twice per time step): 0.3 us a call here, against 0.8 us with device.type and ==.
    if tensor.is_cpu and tensor.dtype is dtype and tensor.shape == shape and tensor.is_contiguous():
        return tensor.data_ptr()
    raise RuntimeError(f"C kernel: {name} must be a contiguous CPU {str(dtype)[6:]} tensor of shape {shape}, got "
                       f"{'a non-contiguous ' if not tensor.is_contiguous() else ''}{tensor.device.type} "
                       f"{tensor.dtype} tensor of shape {tuple(tensor.shape)}")


class Kernel:
    """ctypes bindings of lstm_kernel.c. Arguments: sizes, the slice count, then data pointers from pointer().

    lib's calls give up the GIL while they run; quick's (the same library, as ctypes.PyDLL) keep it. The
    calls of a few microseconds to a millisecond (a step, a generation step, a draw) go through quick:
    giving the GIL up around each lets a server's threads take it, and the step then waits to get it back
    (16 served clients 44,692 chars/s keeping it, 38,992 giving it up). The calls that run a whole chunk,
    many characters of generation or transpose a block (a long prompt read in a server's thread: 463 ms)
    give it up.
    """

    def __init__(self, lib: ctypes.CDLL, path: str, flags: list[str], quick: ctypes.PyDLL | None = None):
        self.path, self.flags = path, flags
        size, ptr = ctypes.c_int64, ctypes.c_void_p
        long_calls, lib = lib, quick or lib
        self.forward_step = lib.lstm_forward_step
        self.forward_step.argtypes = [size, size, size, ptr, ptr, ptr, ptr, ptr]
        self.forward_step.restype = None
        self.backward_step = lib.lstm_backward_step
        self.backward_step.argtypes = [size, size, size, ptr, ptr, ptr, ptr, ptr, ptr, ptr]
        self.backward_step.restype = None
        self.forward_step_bf16 = lib.lstm_forward_step_bf16      # the recurrent product in bfloat16
        self.forward_step_bf16.argtypes = [size, size, size] + [ptr] * 7
        self.forward_step_bf16.restype = None
        self.backward_step_bf16 = lib.lstm_backward_step_bf16
        self.backward_step_bf16.argtypes = [size, size, size, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr]
        self.backward_step_bf16.restype = None
        self.rows_step = lib.lstm_rows_step                       # generation's step, every layer and the head
        self.rows_step.argtypes = [size] * 6 + [ptr] * 10
        self.rows_step.restype = None
        self.sample_rows = lib.lstm_sample_rows                   # each row's next character drawn
        self.sample_rows.argtypes = [size, size, ptr, ptr, size, ptr, size, ptr, size, ptr, ptr]
        self.sample_rows.restype = ctypes.c_int
        self.forward_chunk = long_calls.lstm_forward_chunk        # a small layer's whole time loop
        self.forward_chunk.argtypes = [size] * 3 + [ptr] * 7 + [size, size]
        self.forward_chunk.restype = None
        self.backward_chunk = long_calls.lstm_backward_chunk
        self.backward_chunk.argtypes = [size] * 3 + [ptr] * 11 + [size]
        self.backward_chunk.restype = None
        lib.lstm_kernel_bf16_dot.restype = ctypes.c_int
        self.bf16_dot = bool(lib.lstm_kernel_bf16_dot())          # built for a CPU with AVX512-BF16
        if self.bf16_dot:                                         # the whole-chunk loops, bf16 products
            self.forward_chunk_bf16 = long_calls.lstm_forward_chunk_bf16
            self.forward_chunk_bf16.argtypes = [size] * 3 + [ptr] * 7 + [size, ptr, size, size]
            self.forward_chunk_bf16.restype = None
            self.backward_chunk_bf16 = long_calls.lstm_backward_chunk_bf16
            self.backward_chunk_bf16.argtypes = [size] * 3 + [ptr] * 8 + [size]
            self.backward_chunk_bf16.restype = None
        self.decode_rows = long_calls.lstm_decode_rows            # many characters: draws and steps
        self.decode_rows.argtypes = [size] * 7 + [ptr] * 10 + [ptr, size] * 3 + [ptr, ptr, ptr, size, ptr]
        self.decode_rows.restype = ctypes.c_int64
        self.transpose = long_calls.lstm_transpose
        self.transpose.argtypes = [size, size, ptr, ptr, size]
        self.transpose.restype = None
        lib.lstm_kernel_threaded.restype = ctypes.c_int
        self.threaded = bool(lib.lstm_kernel_threaded())


# ---------------------------------------------------------------------------
# The self-check
# ---------------------------------------------------------------------------

# (B, H, slices): loop tails (H not a multiple of a vector width), and splits that caught the lost
# columns of an earlier slice width: H = 129 on 2 slices, H = 100 on 6, H smaller than the slice count.
SELF_CHECK_SHAPES = ((3, 37, 1), (4, 129, 2), (5, 100, 6), (2, 17, 31), (48, 101, 3))


def _self_check(kernel: Kernel) -> str | None:
    """The compiled kernel against the same formulas in PyTorch; None if it agrees, else what differs."""
    for B, H, slices in SELF_CHECK_SHAPES:
        problem = check_step(kernel, B, H, slices)
        if problem:
            return f"B={B}, H={H}, {slices} slices: {problem}"
    return check_rows_step(kernel)


# lstm_kernel.c's PANEL and GROUP: the step products' weight layout (panels)
PANEL, GROUP = 32, 4


def panels(weight: torch.Tensor) -> torch.Tensor:
    """weight (N, K) as lstm_rows_step's products read it: (panels, K, PANEL), panel p holding output columns
    p*PANEL.. for every k (so a panel streams through memory in order), N padded with zero columns to a
    whole number of GROUP panels."""
    N, K = weight.shape
    columns = -(-N // (PANEL * GROUP)) * PANEL * GROUP
    padded = torch.cat([weight.detach(), weight.new_zeros(columns - N, K)])
    return padded.view(columns // PANEL, PANEL, K).transpose(1, 2).contiguous()


def panels_bf16(weight: torch.Tensor) -> torch.Tensor:
    """weight (N, K), K even, as the bfloat16 chunk loops' products read it: rounded to bfloat16, (panels,
    K / 2, PANEL, 2), each k pair of a column side by side (what one AVX512-BF16 dot product takes), N padded
    with zero columns to a whole number of panels."""
    N, K = weight.shape
    columns = -(-N // PANEL) * PANEL
    padded = torch.cat([weight.detach(), weight.new_zeros(columns - N, K)]).to(torch.bfloat16)
    return padded.view(columns // PANEL, PANEL, K // 2, 2).transpose(1, 2).contiguous()


def kept_bf16(activations: torch.Tensor) -> torch.Tensor:
    """Activations (sigmoids and tanhs) as a bf16 layer keeps them for its backward pass, in bfloat16: as they
    are where |a| <= 1/2, else 1 / (1 - |a|) with a's sign, so that 1 - |a| (which a(1 - a) and 1 - a^2 need)
    keeps 8 significant bits near 1. Bit for bit lstm_kernel.c's kept_to_bf16."""
    m = activations.abs()
    return torch.where(m <= 0.5, activations, torch.copysign(1 / (1 - m), activations)).to(torch.bfloat16)


def from_kept_bf16(kept: torch.Tensor) -> torch.Tensor:
    """The activations kept_bf16 kept, in float32 (lstm_kernel.c's kept_from_bf16)."""
    v = kept.float()
    m = v.abs()
    return torch.where(m <= 0.5, v, torch.copysign(1 - 1 / m, v))


def check_rows_step(kernel: Kernel, rows: int = 6, H: int = 37, V: int = 11) -> str | None:
    """lstm_rows_step (two residual layers and the output layer, rows and H off the vector widths) against
    the same step in PyTorch: None, or what differs."""
    gen = torch.Generator().manual_seed(1)
    r = lambda *shape: torch.randn(*shape, generator=gen)        # noqa: E731
    layer0_gates, w0, w1, b1, head_w, head_b = r(rows, 4 * H) * 2, r(4 * H, H) / 4, r(4 * H, 2 * H) / 4, r(4 * H), \
        r(V, H), r(V)
    h_in, c_in = [r(rows, H) for _ in range(2)], [r(rows, H) for _ in range(2)]
    out, x, logits = torch.full((2, 2, rows, H), float("nan")), torch.full((rows, H), float("nan")), \
        torch.full((rows, V), float("nan"))

    def cell(pre, c):
        i, f, g, o = pre.chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
    h0, c0 = cell(layer0_gates + h_in[0] @ w0.t(), c_in[0])
    h1, c1 = cell(torch.cat([h0, h_in[1]], 1) @ w1.t() + b1, c_in[1])
    expected = {"h": torch.stack([h0, h1]), "c": torch.stack([c0, c1]), "x": h1 + h0, "logits": (h1 + h0) @ head_w.t() + head_b}
    address = lambda t: pointer(t, tuple(t.shape), "rows step")          # noqa: E731
    scratch = torch.empty(rows, 4 * H), torch.empty(rows, 2 * H)         # alive until the call returns
    states = [address(t) for t in (*h_in, *c_in)] + [address(out[i, k]) for i in range(2) for k in range(2)]
    weights = [panels(w) for w in (w0, w1, head_w)]
    kernel.rows_step(rows, 2, H, V, 1, 0, address(layer0_gates),
                     (ctypes.c_void_p * 2)(address(weights[0]), address(weights[1])),
                     (ctypes.c_void_p * 2)(None, address(b1)), (ctypes.c_void_p * 8)(*states), address(x),
                     address(weights[2]), address(head_b), address(logits), address(scratch[0]), address(scratch[1]))
    for name, ours in {"h": out[0], "c": out[1], "x": x, "logits": logits}.items():
        if not torch.allclose(ours, expected[name], atol=1e-4, rtol=1e-4):
            return f"the rows step's {name} differs by {(ours - expected[name]).abs().nan_to_num(float('inf')).max().item():.3g}"
    return None


def check_step(kernel: Kernel, B: int, H: int, slices: int, seed: int = 0) -> str | None:
    """One forward and backward step of the kernel against PyTorch: None, or the first output that differs.

    The outputs start as NaN, so a column the kernel never writes cannot pass.
    """
    gen = torch.Generator().manual_seed(seed)
    pre = torch.randn(B, 4 * H, generator=gen) * 4
    c_prev, grad_h, grad_c = (torch.randn(B, H, generator=gen) for _ in range(3))
    nan = float("nan")
    gates, c, h = torch.full((B, 4 * H), nan), torch.full((B, H), nan), torch.full((B, H), nan)
    grad_pre = torch.full((B, 4 * H), nan)
    kernel.forward_step(B, H, slices, pointer(pre, (B, 4 * H), "pre"), pointer(gates, (B, 4 * H), "gates"),
                        pointer(c_prev, (B, H), "c_prev"), pointer(c, (B, H), "c"), pointer(h, (B, H), "h"))
    i, f, g, o = pre.chunk(4, 1)
    i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
    c_ref = f * c_prev + i * g
    tanh_c = torch.tanh(c_ref)
    dc = grad_c + grad_h * o * (1 - tanh_c**2)
    grad_pre_ref = torch.cat([dc * g * i * (1 - i), dc * c_prev * f * (1 - f), dc * i * (1 - g**2),
                              grad_h * tanh_c * o * (1 - o)], 1)
    grad_c_in, grad_bias = grad_c.clone(), torch.ones(4 * H)
    kernel.backward_step(B, H, slices, pointer(gates, (B, 4 * H), "gates"), pointer(c, (B, H), "c"),
                         pointer(c_prev, (B, H), "c_prev"), pointer(grad_h, (B, H), "grad_h"),
                         pointer(grad_c_in, (B, H), "grad_c"), pointer(grad_pre, (B, 4 * H), "grad_pre"),
                         pointer(grad_bias, (4 * H,), "grad_bias"))
    pairs = {"gates": (gates, torch.cat([i, f, g, o], 1)), "c": (c, c_ref), "h": (h, o * tanh_c),
             "grad_pre": (grad_pre, grad_pre_ref), "grad_c": (grad_c_in, dc * f),
             "grad_bias": (grad_bias, 1 + grad_pre_ref.sum(0))}
    for name, (ours, ref) in pairs.items():
        if not torch.allclose(ours, ref, atol=1e-5, rtol=1e-5):
            return f"{name} differs by {(ours - ref).abs().nan_to_num(float('inf')).max().item():.3g}"
    return _check_bf16_steps(kernel, B, H, slices, gen) or _check_transpose(kernel, B * 7 + 3, H, gen)


def _check_transpose(kernel: Kernel, rows: int, cols: int, gen: torch.Generator) -> str | None:
    """lstm_transpose of two blocks of rows into one matrix against PyTorch's transpose: bit for bit."""
    first, second = torch.randn(3, cols, generator=gen), torch.randn(rows, cols, generator=gen)
    out = torch.full((cols, rows + 3), float("nan"))
    kernel.transpose(3, cols, pointer(first, (3, cols), "src"), pointer(out, (cols, rows + 3), "dst"), rows + 3)
    kernel.transpose(rows, cols, pointer(second, (rows, cols), "src"), pointer(out, (cols, rows + 3), "dst") + 3 * 4,
                     rows + 3)
    return None if torch.equal(out, torch.cat([first, second]).t()) else "transpose differs"


def _check_bf16_steps(kernel: Kernel, B: int, H: int, slices: int, gen: torch.Generator) -> str | None:
    """The bfloat16 steps against the float32 ones fed what PyTorch's casts and additions give: bit for bit.

    The bf16 forward adds a bfloat16 product to the float32 pre-activations, writes the activations in
    bfloat16 and h in bfloat16 too; the bf16 backward reads those activations, adds a bfloat16 product to
    grad_h and writes the gradients in bfloat16 only.
    """
    f32, bf16, nan = torch.float32, torch.bfloat16, float("nan")
    x_proj = torch.randn(B, 4 * H, generator=gen) * 3
    product = (torch.randn(B, 4 * H, generator=gen) * 3).to(bf16)
    c_prev, grad_h, grad_c = (torch.randn(B, H, generator=gen) for _ in range(3))
    grad_h_product = torch.randn(B, H, generator=gen).to(bf16)
    outputs = {}
    for low in (False, True):
        c, h, h_low = torch.full((B, H), nan), torch.full((B, H), nan), torch.zeros(B, H, dtype=bf16)
        grad_c_io, grad_bias = grad_c.clone(), torch.zeros(4 * H)
        grad_pre, grad_pre_low = torch.full((B, 4 * H), nan), torch.zeros(B, 4 * H, dtype=bf16)
        if low:
            gates = torch.zeros(B, 4 * H, dtype=bf16)
            kernel.forward_step_bf16(B, H, slices, pointer(product, (B, 4 * H), "product", bf16),
                                     pointer(x_proj, (B, 4 * H), "pre"), pointer(gates, (B, 4 * H), "gates", bf16),
                                     pointer(c_prev, (B, H), "c_prev"), pointer(c, (B, H), "c"), pointer(h, (B, H), "h"),
                                     pointer(h_low, (B, H), "h_low", bf16))
            kernel.backward_step_bf16(B, H, slices, pointer(gates, (B, 4 * H), "gates", bf16), pointer(c, (B, H), "c"),
                                      pointer(c_prev, (B, H), "c_prev"), pointer(grad_h, (B, H), "grad_h"),
                                      pointer(grad_h_product, (B, H), "product", bf16), pointer(grad_c_io, (B, H), "grad_c"),
                                      pointer(grad_pre_low, (B, 4 * H), "grad_pre", bf16),
                                      pointer(grad_bias, (4 * H,), "grad_bias"))
            grad_pre = grad_pre_low
        else:
            pre, whole_grad_h = product.to(f32) + x_proj, grad_h_product.to(f32) + grad_h
            gates = torch.full((B, 4 * H), nan)
            kernel.forward_step(B, H, slices, pointer(pre, (B, 4 * H), "pre"), pointer(gates, (B, 4 * H), "gates"),
                                pointer(c_prev, (B, H), "c_prev"), pointer(c, (B, H), "c"), pointer(h, (B, H), "h"))
            gates = kept_bf16(gates)                        # kept for the backward pass in bfloat16
            read_back = from_kept_bf16(gates)
            kernel.backward_step(B, H, slices, pointer(read_back, (B, 4 * H), "gates"), pointer(c, (B, H), "c"),
                                 pointer(c_prev, (B, H), "c_prev"), pointer(whole_grad_h, (B, H), "grad_h"),
                                 pointer(grad_c_io, (B, H), "grad_c"), pointer(grad_pre, (B, 4 * H), "grad_pre"),
                                 pointer(grad_bias, (4 * H,), "grad_bias"))
            h_low, grad_pre = h.to(bf16), grad_pre.to(bf16)
        outputs[low] = {"bf16 gates": gates, "bf16 c": c, "bf16 h": h, "bf16 h_low": h_low,
                        "bf16 grad_pre": grad_pre, "bf16 grad_c": grad_c_io, "bf16 grad_bias": grad_bias}
    for name, ours in outputs[True].items():
        if not torch.equal(ours, outputs[False][name]):
            return f"{name} differs from the float32 step's by {(ours.float() - outputs[False][name].float()).abs().max().item():.3g}"
    return None


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------

def _setting() -> str:
    """TEXTGEN_NATIVE: "off", "on" (required) or "auto" (unset: use it where it can be had)."""
    value = os.environ.get("TEXTGEN_NATIVE", "").strip().lower()
    if value in ("0", "false", "no", "off"):
        return "off"
    if value in ("1", "true", "yes", "on"):
        return "on"
    return "auto"


def _disabled() -> bool:
    return _setting() == "off"


@functools.cache
def _load() -> tuple[Kernel | None, str]:
    """(kernel, note): the kernel and what to say about where it came from, or None and why not."""
    if _disabled():
        return None, "TEXTGEN_NATIVE=0"
    compiler = kernel_build.compiler()
    if compiler is None:
        return None, "no C compiler found (install gcc or clang, or set CC)"
    try:
        built, note = kernel_build.build(compiler)
    except kernel_build.BuildFailed as e:
        return None, str(e)
    except OSError as e:
        return None, f"the kernel could not be built or loaded ({e})"
    kernel = Kernel(built.library, built.path, built.flags, built.quick)
    problem = _self_check(kernel)
    if problem:
        return None, f"the built kernel failed its numerical self-check ({problem})"
    return kernel, note or ""


def load() -> Kernel | None:
    """The compiled kernel, or None when it is turned off or cannot be had here.

    Raises KernelUnavailable instead of returning None when TEXTGEN_NATIVE=1 demands it.
    """
    kernel, why = _load()
    if kernel is None and _setting() == "on":
        raise KernelUnavailable(f"TEXTGEN_NATIVE=1 asks for the C kernel, but {why}")
    return kernel


load.cache_clear = _load.cache_clear      # tests rebuild after changing the environment


def describe() -> str:
    """One line for logs: which LSTM pointwise path runs here, and why."""
    kernel = load()
    _, note = _load()
    if kernel is None:
        return f"PyTorch ops (no C kernel: {note})"
    threaded = kernel.threaded and torch.get_num_threads() > 1
    threads = f"threaded, up to {torch.get_num_threads()} threads" if threaded else "one thread"
    return f"C kernel ({threads}{'; ' + note if note else ''})"
