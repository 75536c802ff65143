/* One LSTM time step's pointwise work, forward and backward, in one pass over memory.
 *
 * textgen/model.py keeps the time loop and the matrix products (oneDNN and MKL do those
 * best); these two functions replace the ten or so tensor operations that each step
 * otherwise dispatches one by one, which on small shapes cost more than the arithmetic.
 * textgen/native_kernel.py compiles this file with the machine's C compiler on first use
 * and calls it through ctypes; without a compiler the pure-PyTorch path runs instead.
 *
 * Layouts are those of model.py: row-major float32, one row per stream (B rows), gates
 * in nn.LSTM's order i, f, g, o, each H wide. The same pointer may be passed for an input
 * and an output (pre-activations overwritten by activations, a cell state updated in
 * place): every element is read before it is written, and only at its own index, which
 * is what `#pragma GCC ivdep` tells the compiler so that it vectorises the loops anyway.
 */
#include <stdint.h>
#include <string.h>

/* The work is split by columns (hidden units) into `slices` slices of whole vectors: each
 * slice owns its columns of every row, and of grad_bias, so no two slices write the same
 * memory, and each column's arithmetic (the bias sums too) is the same whatever the split.
 * Built with OpenMP (see native_kernel.py), the slices run on the threads of PyTorch's own
 * pool; built without it, one after another. native_kernel.py chooses how many.
 *
 * Slice k covers [slice_bound(k), slice_bound(k + 1)). The width is ceil(H / slices)
 * rounded up to 16 floats (whole AVX-512 vectors), so slices * width >= H and every column
 * falls in exactly one slice; the last bound is H whatever the width, and slices past the
 * end are empty. (Rounding floor(H / slices) up instead lost the last columns whenever
 * that floor was already a multiple of 16: H = 129 on 2 slices, H = 100 on 6.) */
static inline int64_t slice_bound(int64_t k, int64_t slices, int64_t H)
{
    if (k >= slices)
        return H;
    int64_t width = ((H + slices - 1) / slices + 15) / 16 * 16;
    int64_t bound = k * width;
    return bound < H ? bound : H;
}

/* 1 where the slices run on OpenMP threads, 0 where they run one after another. */
int lstm_kernel_threaded(void)
{
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* exp(x) in float32: x = n ln2 + r with |r| <= ln2/2, exp(r) by a degree-7 polynomial
 * (Cephes' coefficients), 2^n put into the exponent bits. Written without branches or
 * library calls so that it vectorises; libm's expf does not. Measured against float64 over
 * [-100, 100]: the sigmoid below is within 5.6e-8 (as torch.sigmoid), the tanh within 1.8e-7. */
static inline float exp_approx(float x)
{
    x = x < -87.0f ? -87.0f : x;        /* keeps 2^n a normal float; the results round to 0 or inf */
    x = x > 88.0f ? 88.0f : x;          /* ... anyway in the sigmoid and tanh below */
    const float round_magic = 12582912.0f;               /* 1.5 * 2^23: adding it rounds to an integer */
    float shifted = x * 1.44269504088896341f + round_magic;
    float n = shifted - round_magic;
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;  /* ln2 in two parts: r stays exact */
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    uint32_t shifted_bits, p_bits;                        /* unsigned: wrap-around is defined */
    memcpy(&shifted_bits, &shifted, sizeof shifted_bits);
    memcpy(&p_bits, &p, sizeof p_bits);
    p_bits += (shifted_bits - 0x4B400000u) << 23;          /* low bits of `shifted` hold n */
    memcpy(&p, &p_bits, sizeof p);
    return x == x ? p : x;       /* NaN stays NaN (the bit arithmetic could make it a number) */
}

static inline float sigmoid(float x) { return 1.0f / (1.0f + exp_approx(-x)); }

/* tanh(x) = 2 sigmoid(2x) - 1: absolute error about 1e-7, like float32 rounding near 1. */
static inline float tanh_approx(float x) { return 2.0f / (1.0f + exp_approx(-2.0f * x)) - 1.0f; }

/* Forward step. pre (B, 4H): the gates' pre-activations x W_ih^T + h W_hh^T + biases.
 * Writes the activations i, f, g, o to gates (B, 4H), and
 *   c = f * c_prev + i * g,   h = o * tanh(c)   to c and h (B, H). */
void lstm_forward_step(int64_t B, int64_t H, int64_t slices, const float *pre, float *gates,
                       const float *c_prev, float *c, float *h)
{
    slices = slices < 1 ? 1 : slices;
#pragma omp parallel for schedule(static) if (slices > 1)
    for (int64_t slice = 0; slice < slices; slice++)
    for (int64_t b = 0; b < B; b++) {
        const float *p = pre + b * 4 * H;
        float *a = gates + b * 4 * H;
        const float *cp = c_prev + b * H;
        float *cb = c + b * H, *hb = h + b * H;
        int64_t end = slice_bound(slice + 1, slices, H);
#pragma GCC ivdep
        for (int64_t j = slice_bound(slice, slices, H); j < end; j++) {
            float i = sigmoid(p[j]);               /* input gate: how much of the candidate to write */
            float f = sigmoid(p[H + j]);           /* forget gate: how much of the old cell to keep */
            float g = tanh_approx(p[2 * H + j]);   /* candidate: what to write */
            float o = sigmoid(p[3 * H + j]);       /* output gate: how much of the cell to expose */
            a[j] = i;
            a[H + j] = f;
            a[2 * H + j] = g;
            a[3 * H + j] = o;
            float cn = f * cp[j] + i * g;
            cb[j] = cn;
            hb[j] = o * tanh_approx(cn);
        }
    }
}

/* Backward step. gates (B, 4H) are the step's activations, c and c_prev its new and old
 * cell state, grad_h the gradient reaching h (from above and from the next step).
 * grad_c holds dL/dc from the next step on entry and dL/dc_prev on return; grad_pre
 * (B, 4H) receives the gradient of each gate's pre-activation:
 *   dc = grad_c + grad_h * o * (1 - tanh(c)^2)
 *   d pre_i = dc * g * i(1-i),   d pre_f = dc * c_prev * f(1-f)
 *   d pre_g = dc * i * (1-g^2),  d pre_o = grad_h * tanh(c) * o(1-o)
 *   grad_c  = dc * f
 * and adds grad_pre's column sums to grad_bias (4H). */
void lstm_backward_step(int64_t B, int64_t H, int64_t slices, const float *gates, const float *c,
                        const float *c_prev, const float *grad_h, float *grad_c, float *grad_pre,
                        float *grad_bias)
{
    slices = slices < 1 ? 1 : slices;
#pragma omp parallel for schedule(static) if (slices > 1)
    for (int64_t slice = 0; slice < slices; slice++)
    for (int64_t b = 0; b < B; b++) {
        const float *a = gates + b * 4 * H;
        float *d = grad_pre + b * 4 * H;
        const float *cb = c + b * H, *cp = c_prev + b * H, *gh = grad_h + b * H;
        float *gc = grad_c + b * H;
        int64_t end = slice_bound(slice + 1, slices, H);
#pragma GCC ivdep
        for (int64_t j = slice_bound(slice, slices, H); j < end; j++) {
            float i = a[j], f = a[H + j], g = a[2 * H + j], o = a[3 * H + j];
            float tc = tanh_approx(cb[j]);
            float dc = gc[j] + gh[j] * o * (1.0f - tc * tc);
            float d_i = dc * g * i * (1.0f - i), d_f = dc * cp[j] * f * (1.0f - f);
            float d_g = dc * i * (1.0f - g * g), d_o = gh[j] * tc * o * (1.0f - o);
            d[j] = d_i;
            d[H + j] = d_f;
            d[2 * H + j] = d_g;
            d[3 * H + j] = d_o;
            grad_bias[j] += d_i;               /* the bias gradient is the sum over steps and rows */
            grad_bias[H + j] += d_f;
            grad_bias[2 * H + j] += d_g;
            grad_bias[3 * H + j] += d_o;
            gc[j] = dc * f;
        }
    }
}
