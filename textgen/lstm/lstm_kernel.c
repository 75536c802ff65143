/* The LSTM's C kernel: what costs more in dispatch than in arithmetic when PyTorch does it.
 *
 * - One time step's pointwise work, forward and backward, in one pass over memory (also with the
 *   recurrent product in bfloat16); the time loop and the large products stay in Python, on oneDNN.
 * - A small layer's whole time loop, forward or backward, with its own products (lstm_forward_chunk),
 *   in bfloat16 where the CPU has AVX512-BF16 dot products (lstm_forward_chunk_bf16).
 * - Generation's whole step for a few rows (lstm_rows_step), the draw of each row's next character
 *   (lstm_sample_rows), and many characters of both in one call (lstm_decode_rows); the tiled
 *   transpose the weight gradients' products want (lstm_transpose).
 * textgen/lstm/native_kernel.py compiles this file with the machine's C compiler on first use and
 * calls it through ctypes; without a compiler the pure-PyTorch path runs instead.
 *
 * Layouts are those of model.py: row-major float32, one row per stream (B rows), gates
 * in nn.LSTM's order i, f, g, o, each H wide. The same pointer may be passed for an input
 * and an output (pre-activations overwritten by activations, activations by their gradients
 * in the backward pass, a cell state updated in place): every element is read before it is
 * written, and only at its own index, which is what `#pragma GCC ivdep` tells the compiler
 * so that it vectorises the loops anyway.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
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

/* bfloat16 is the top half of a float32. To it: rounded to nearest, ties to even, NaN to the quiet
 * NaN 0x7FC0, exactly as PyTorch's float -> bfloat16 conversion (c10::BFloat16), so that h written
 * here in bfloat16 has the bits h.to(torch.bfloat16) would give it. */
static inline float bf16_to_float(uint16_t v)
{
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t float_to_bf16(float f)
{
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    uint16_t rounded = (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
    return f == f ? rounded : (uint16_t)0x7FC0;
}

/* An activation (a sigmoid in (0, 1) or a tanh in (-1, 1)) as a bf16 layer keeps it for its backward pass,
 * which reads a(1 - a) or 1 - a^2: rounded to bf16 as it is where |a| <= 1/2, else as 1 / (1 - |a|) with
 * a's sign, so that 1 - |a| keeps 8 significant bits however close |a| comes to 1. (Rounded plainly, every
 * gate above 0.998 would read as 1 and its derivative as 0: a forget gate biased to stay open lost half its
 * gradient.) The two ranges never meet: |a| <= 1/2 rounds to at most 1/2, the rest to at least 2. */
static inline uint16_t kept_to_bf16(float a)
{
    const float m = fabsf(a);
    return float_to_bf16(m <= 0.5f ? a : copysignf(1.0f / (1.0f - m), a));
}

static inline float kept_from_bf16(uint16_t kept)
{
    const float v = bf16_to_float(kept), m = fabsf(v);
    return m <= 0.5f ? v : copysignf(1.0f - 1.0f / m, v);
}

/* One slice of one row of the forward step. With a bfloat16 product (low != 0), the pre-activations
 * are pre + product, added in float32 (pre holds x W_ih^T + biases, product h W_hh^T), and h is also
 * written in bfloat16 to h_low, the next step's product input. With low_gates != 0 the activations go to
 * a_low in bfloat16 (kept_to_bf16: what the backward pass of a bf16 layer reads), else to a in float32.
 * `low` and `low_gates` are constants at each call, so the compiler makes one vectorised loop of each kind
 * (a test of a pointer inside the loop kept it from vectorising: the bf16 training step 25% slower). */
static inline void forward_row(int64_t H, int64_t begin, int64_t end, const float *p, const uint16_t *product,
                               float *a, uint16_t *a_low, const float *cp, float *cb, float *hb, uint16_t *h_low,
                               const int low, const int low_gates)
{
#pragma GCC ivdep
    for (int64_t j = begin; j < end; j++) {
        float pi = p[j], pf = p[H + j], pg = p[2 * H + j], po = p[3 * H + j];
        if (low) {
            pi += bf16_to_float(product[j]);
            pf += bf16_to_float(product[H + j]);
            pg += bf16_to_float(product[2 * H + j]);
            po += bf16_to_float(product[3 * H + j]);
        }
        float i = sigmoid(pi);                 /* input gate: how much of the candidate to write */
        float f = sigmoid(pf);                 /* forget gate: how much of the old cell to keep */
        float g = tanh_approx(pg);             /* candidate: what to write */
        float o = sigmoid(po);                 /* output gate: how much of the cell to expose */
        if (low_gates) {
            a_low[j] = kept_to_bf16(i);
            a_low[H + j] = kept_to_bf16(f);
            a_low[2 * H + j] = kept_to_bf16(g);
            a_low[3 * H + j] = kept_to_bf16(o);
        } else {
            a[j] = i;
            a[H + j] = f;
            a[2 * H + j] = g;
            a[3 * H + j] = o;
        }
        float cn = f * cp[j] + i * g;
        cb[j] = cn;
        float hn = o * tanh_approx(cn);
        hb[j] = hn;
        if (low)
            h_low[j] = float_to_bf16(hn);
    }
}

/* Forward step. pre (B, 4H): the gates' pre-activations x W_ih^T + h W_hh^T + biases.
 * Writes the activations i, f, g, o to gates (B, 4H), and
 *   c = f * c_prev + i * g,   h = o * tanh(c)   to c and h (B, H). */
void lstm_forward_step(int64_t B, int64_t H, int64_t slices, const float *pre, float *gates,
                       const float *c_prev, float *c, float *h)
{
    slices = slices < 1 ? 1 : slices;
#pragma omp parallel for schedule(static) if (slices > 1)
    for (int64_t slice = 0; slice < slices; slice++)
    for (int64_t b = 0; b < B; b++)
        forward_row(H, slice_bound(slice, slices, H), slice_bound(slice + 1, slices, H), pre + b * 4 * H, NULL,
                    gates + b * 4 * H, NULL, c_prev + b * H, c + b * H, h + b * H, NULL, 0, 0);
}

/* Forward step with the recurrent product in bfloat16: pre (B, 4H) holds x W_ih^T + biases; product (B, 4H)
 * is h_prev W_hh^T in bfloat16, added here in float32 (what product.float() + pre would give); the
 * activations go to gates_low (B, 4H) in bfloat16, what the backward pass reads; h is written in float32
 * and in bfloat16 (h_low, B x H). */
void lstm_forward_step_bf16(int64_t B, int64_t H, int64_t slices, const uint16_t *product, const float *pre,
                            uint16_t *gates_low, const float *c_prev, float *c, float *h, uint16_t *h_low)
{
    slices = slices < 1 ? 1 : slices;
#pragma omp parallel for schedule(static) if (slices > 1)
    for (int64_t slice = 0; slice < slices; slice++)
    for (int64_t b = 0; b < B; b++)
        forward_row(H, slice_bound(slice, slices, H), slice_bound(slice + 1, slices, H), pre + b * 4 * H,
                    product + b * 4 * H, NULL, gates_low + b * 4 * H, c_prev + b * H, c + b * H, h + b * H,
                    h_low + b * H, 1, 1);
}

/* One slice of one row of the backward step. With low != 0, grad_h is the float32 gradient from above
 * plus, where product is not NULL, the bfloat16 product grad_pre(t+1) W_hh (added in float32), and the
 * pre-activation gradients are written in bfloat16 only (grad_pre_low), as the next products take them.
 * The activations come from a_low (kept_from_bf16) with low_gates != 0, else from a. Both switches are
 * constants at each call, as in forward_row. */
static inline void backward_row(int64_t H, int64_t begin, int64_t end, const float *a, const uint16_t *a_low,
                                const float *cb, const float *cp, const float *gh, const uint16_t *product, float *gc,
                                float *d, uint16_t *d_low, float *grad_bias, const int low, const int low_gates)
{
#pragma GCC ivdep
    for (int64_t j = begin; j < end; j++) {
        float i, f, g, o;
        if (low_gates) {
            i = kept_from_bf16(a_low[j]);
            f = kept_from_bf16(a_low[H + j]);
            g = kept_from_bf16(a_low[2 * H + j]);
            o = kept_from_bf16(a_low[3 * H + j]);
        } else {
            i = a[j];
            f = a[H + j];
            g = a[2 * H + j];
            o = a[3 * H + j];
        }
        float grad_h = gh[j];
        if (low && product)
            grad_h = bf16_to_float(product[j]) + grad_h;
        float tc = tanh_approx(cb[j]);
        float dc = gc[j] + grad_h * o * (1.0f - tc * tc);
        float d_i = dc * g * i * (1.0f - i), d_f = dc * cp[j] * f * (1.0f - f);
        float d_g = dc * i * (1.0f - g * g), d_o = grad_h * tc * o * (1.0f - o);
        if (low) {
            d_low[j] = float_to_bf16(d_i);
            d_low[H + j] = float_to_bf16(d_f);
            d_low[2 * H + j] = float_to_bf16(d_g);
            d_low[3 * H + j] = float_to_bf16(d_o);
        } else {
            d[j] = d_i;
            d[H + j] = d_f;
            d[2 * H + j] = d_g;
            d[3 * H + j] = d_o;
        }
        grad_bias[j] += d_i;                   /* the bias gradient is the sum over steps and rows */
        grad_bias[H + j] += d_f;
        grad_bias[2 * H + j] += d_g;
        grad_bias[3 * H + j] += d_o;
        gc[j] = dc * f;
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
    for (int64_t b = 0; b < B; b++)
        backward_row(H, slice_bound(slice, slices, H), slice_bound(slice + 1, slices, H), gates + b * 4 * H, NULL,
                     c + b * H, c_prev + b * H, grad_h + b * H, NULL, grad_c + b * H, grad_pre + b * 4 * H, NULL,
                     grad_bias, 0, 0);
}

/* Backward step with the recurrent products in bfloat16: gates_low (B, 4H) are the step's activations in
 * bfloat16, as the forward step kept them; grad_h (B, H) is the gradient from above, to which product
 * (B, H), the bfloat16 product grad_pre(t+1) W_hh, is added in float32 (NULL at the chunk's last step);
 * the pre-activation gradients go to grad_pre_low (B, 4H) in bfloat16 only (the products that read them
 * cast to bfloat16 anyway); grad_bias sums them in float32, before rounding. */
void lstm_backward_step_bf16(int64_t B, int64_t H, int64_t slices, const uint16_t *gates_low, const float *c,
                             const float *c_prev, const float *grad_h, const uint16_t *product, float *grad_c,
                             uint16_t *grad_pre_low, float *grad_bias)
{
    slices = slices < 1 ? 1 : slices;
#pragma omp parallel for schedule(static) if (slices > 1)
    for (int64_t slice = 0; slice < slices; slice++)
    for (int64_t b = 0; b < B; b++)
        backward_row(H, slice_bound(slice, slices, H), slice_bound(slice + 1, slices, H), NULL,
                     gates_low + b * 4 * H, c + b * H, c_prev + b * H, grad_h + b * H,
                     product ? product + b * H : NULL, grad_c + b * H, NULL, grad_pre_low + b * 4 * H, grad_bias, 1, 1);
}

/* dst[c * dst_stride + r] = src[r * cols + c]: the transpose of src (rows x cols) into columns of dst, so
 * that the weight-gradient products find the steps' rows contiguous (model.py's backward). In tiles of
 * 16 rows by 64 columns, which stay in cache: 1.3 ms for 4096 x 1024, against 4.1 for PyTorch's copy
 * of the transposed view (AMD EPYC, 2 threads). The tiles write disjoint memory, so threads share them. */
void lstm_transpose(int64_t rows, int64_t cols, const float *src, float *dst, int64_t dst_stride)
{
#pragma omp parallel for schedule(static) if (rows * cols >= 65536)
    for (int64_t c0 = 0; c0 < cols; c0 += 64)
    for (int64_t r0 = 0; r0 < rows; r0 += 16) {
        int64_t r1 = r0 + 16 < rows ? r0 + 16 : rows, c1 = c0 + 64 < cols ? c0 + 64 : cols;
        for (int64_t c = c0; c < c1; c++)
#pragma GCC ivdep
            for (int64_t r = r0; r < r1; r++)
                dst[c * dst_stride + r] = src[r * cols + c];
    }
}

/* ------------------------------------------------------------------------------------------------
 * Generation's step: every layer and the output layer for a few rows (streams), in one call.
 *
 * At one to a few rows a step's products are matrix-vector products, bound by reading the weights;
 * a library's matrix product pays more in setting up than in arithmetic there (MKL takes 12.5 us
 * for one row by a 256 x 1024 weight here, this loop 5.8). Each output element is one weight row's
 * dot product with one input row, in the same order of operations whatever the number of rows:
 * a row gets the same bits alone or among others, which the batching server needs (a request's
 * text must not depend on who else is served), by construction rather than by measurement.
 * ------------------------------------------------------------------------------------------------ */
typedef float lanes16 __attribute__((vector_size(64)));     /* lowered to whatever vectors the CPU has */

static inline lanes16 load16(const float *p)
{
    lanes16 v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* The products read their weight packed in panels of PANEL output columns (see rows_step.py):
 * panel p holds columns p*PANEL.. for every k, k-major, so a panel streams through memory in order,
 * and the padding columns past N hold zeros. Each output element is
 *   sum = 0; for k = 0 .. K-1: sum += w[k][n] * x[k];   then y = sum + bias (or addend)
 * in that order whatever the number of rows or which kernel below computes it: the bits of a row do
 * not depend on the rows beside it. The lanes of a vector are 16 output columns, so no lanes are
 * summed across, and four rows (or four panels, for a row alone) keep eight accumulators busy. */
#define PANEL 32
#define GROUP 4                                        /* panels a thread takes at a time */

/* Four rows (x, stride K) by one panel: out[r][0..PANEL). */
static inline void panel_rows4(const float *panel, const float *x, int64_t K, float out[4][PANEL])
{
    lanes16 a0 = {0}, b0 = {0}, a1 = {0}, b1 = {0}, a2 = {0}, b2 = {0}, a3 = {0}, b3 = {0};
    for (int64_t k = 0; k < K; k++) {
        lanes16 low = load16(panel + k * PANEL), high = load16(panel + k * PANEL + 16);
        float x0 = x[k], x1 = x[K + k], x2 = x[2 * K + k], x3 = x[3 * K + k];
        a0 += low * x0;
        b0 += high * x0;
        a1 += low * x1;
        b1 += high * x1;
        a2 += low * x2;
        b2 += high * x2;
        a3 += low * x3;
        b3 += high * x3;
    }
    memcpy(out[0], &a0, 64), memcpy(out[0] + 16, &b0, 64);
    memcpy(out[1], &a1, 64), memcpy(out[1] + 16, &b1, 64);
    memcpy(out[2], &a2, 64), memcpy(out[2] + 16, &b2, 64);
    memcpy(out[3], &a3, 64), memcpy(out[3] + 16, &b3, 64);
}

/* One row by GROUP consecutive panels: out[0 .. GROUP * PANEL). */
static inline void panels_row1(const float *panels, const float *x, int64_t K, float *out)
{
    const int64_t stride = K * PANEL;
    lanes16 a0 = {0}, b0 = {0}, a1 = {0}, b1 = {0}, a2 = {0}, b2 = {0}, a3 = {0}, b3 = {0};
    for (int64_t k = 0; k < K; k++) {
        const float *w = panels + k * PANEL;
        float xk = x[k];
        a0 += load16(w) * xk;
        b0 += load16(w + 16) * xk;
        a1 += load16(w + stride) * xk;
        b1 += load16(w + stride + 16) * xk;
        a2 += load16(w + 2 * stride) * xk;
        b2 += load16(w + 2 * stride + 16) * xk;
        a3 += load16(w + 3 * stride) * xk;
        b3 += load16(w + 3 * stride + 16) * xk;
    }
    memcpy(out, &a0, 64), memcpy(out + 16, &b0, 64), memcpy(out + 32, &a1, 64), memcpy(out + 48, &b1, 64);
    memcpy(out + 64, &a2, 64), memcpy(out + 80, &b2, 64), memcpy(out + 96, &a3, 64), memcpy(out + 112, &b3, 64);
}

/* y[b][n] = dot + add[b][n] (or bias[n], or 0) for b < rows, n < N; panels: the weight packed as
 * above, N rounded up to GROUP * PANEL columns. Threads share the groups of panels. */
static void rows_product(int64_t rows, int64_t N, int64_t K, const float *x, const float *panels, const float *bias,
                         const float *add, float *y, int64_t threaded)
{
    const int64_t group_columns = GROUP * PANEL, groups = (N + group_columns - 1) / group_columns;
#pragma omp parallel for schedule(static) if (threaded && N * K >= 65536)
    for (int64_t g = 0; g < groups; g++) {
        float block[4][PANEL], row[GROUP * PANEL];
        int64_t n0 = g * group_columns, b = 0;
        for (; b + 4 <= rows; b += 4)
            for (int64_t p = 0; p < GROUP; p++) {
                int64_t n_first = n0 + p * PANEL;
                panel_rows4(panels + (n_first / PANEL) * K * PANEL, x + b * K, K, block);
                for (int64_t r = 0; r < 4; r++)
                    for (int64_t j = 0; j < PANEL && n_first + j < N; j++) {
                        int64_t n = n_first + j;
                        y[(b + r) * N + n] = block[r][j] + (add ? add[(b + r) * N + n] : (bias ? bias[n] : 0.0f));
                    }
            }
        for (; b < rows; b++) {
            panels_row1(panels + (n0 / PANEL) * K * PANEL, x + b * K, K, row);
            for (int64_t j = 0; j < group_columns && n0 + j < N; j++) {
                int64_t n = n0 + j;
                y[b * N + n] = row[j] + (add ? add[b * N + n] : (bias ? bias[n] : 0.0f));
            }
        }
    }
}

/* One character for `rows` streams through `layers` layers of width H and an output layer of V.
 *   layer0_gates (rows, 4H): layer 0's input part, x W_ih^T + both biases (a row of a table per token);
 *   weights[k]: layer 0's W_hh (4H x H); above it [W_ih | W_hh] (4H x 2H), with biases[k] (4H);
 *   head_w (V x H): all weights packed in panels (rows_product);
 *   states: 4 * layers pointers, h_in[k], c_in[k] (rows, H), the state before, then h_out[k], c_out[k],
 *   the state after (h_in[0..layers), then c_in, h_out and c_out);
 *   x_out (rows, H): the top layer's output (plus its input, with residual), what the output layer reads;
 *   head_w (V x H), head_b (V), logits (rows, V): the output layer, skipped where head_w is NULL;
 *   gates (rows, 4H) and joined (rows, 2H): scratch. */
void lstm_rows_step(int64_t rows, int64_t layers, int64_t H, int64_t V, int64_t residual, int64_t threaded,
                    const float *layer0_gates, const float *const *weights, const float *const *biases,
                    float *const *states, float *x_out, const float *head_w, const float *head_b, float *logits,
                    float *gates, float *joined)
{
    float *const *h_in = states, *const *c_in = states + layers;
    float *const *h_out = states + 2 * layers, *const *c_out = states + 3 * layers;
    for (int64_t k = 0; k < layers; k++) {
        if (k == 0) {
            rows_product(rows, 4 * H, H, h_in[0], weights[0], NULL, layer0_gates, gates, threaded);
        } else {
            for (int64_t b = 0; b < rows; b++) {
                memcpy(joined + b * 2 * H, x_out + b * H, H * sizeof(float));
                memcpy(joined + b * 2 * H + H, h_in[k] + b * H, H * sizeof(float));
            }
            rows_product(rows, 4 * H, 2 * H, joined, weights[k], biases[k], NULL, gates, threaded);
        }
        for (int64_t b = 0; b < rows; b++)
            forward_row(H, 0, H, gates + b * 4 * H, NULL, gates + b * 4 * H, NULL, c_in[k] + b * H,
                        c_out[k] + b * H, h_out[k] + b * H, NULL, 0, 0);
        for (int64_t b = 0; b < rows; b++)
#pragma GCC ivdep
            for (int64_t j = 0; j < H; j++)
                x_out[b * H + j] = residual && k > 0 ? h_out[k][b * H + j] + x_out[b * H + j] : h_out[k][b * H + j];
    }
    if (head_w)
        rows_product(rows, V, H, x_out, head_w, head_b, NULL, logits, threaded);
}

/* ------------------------------------------------------------------------------------------------
 * Drawing the next character of each row: what generation/sampling.py's next_token_probs and draw
 * compute (its reference, tested against it), in one call instead of a dozen PyTorch operations:
 *   z = logits / T;  p = softmax(z) in float32;  top-k: keep p >= the k-th largest;
 *   top-p: keep the most likely tokens while the mass before them is under top_p times the total,
 *   and always the most likely;  p /= sum(p);  then the first token whose float64 cumulative sum
 *   exceeds u times the total. T = 0 is the argmax (the first, a NaN counting as the largest).
 * exp here is the kernel's own, so a probability may differ from PyTorch's in its last bit, and a draw
 * within that distance of a boundary between two tokens may fall the other way.
 * Settings are per row, or one for every row where their stride is 0.
 * ------------------------------------------------------------------------------------------------ */
/* order[0..n) by p descending, ties by id: a merge sort (stable, no shared state: rows of different
 * models may be drawn on different threads at once), using spare (n more) as room. */
static void sort_by_probability(int32_t *order, int32_t *spare, int64_t n, const float *p)
{
    for (int64_t width = 1; width < n; width *= 2) {
        for (int64_t lo = 0; lo < n; lo += 2 * width) {
            int64_t mid = lo + width < n ? lo + width : n, hi = lo + 2 * width < n ? lo + 2 * width : n;
            int64_t i = lo, j = mid, out = lo;
            while (i < mid && j < hi)
                spare[out++] = p[order[j]] > p[order[i]] ? order[j++] : order[i++];
            while (i < mid)
                spare[out++] = order[i++];
            while (j < hi)
                spare[out++] = order[j++];
        }
        memcpy(order, spare, (size_t)n * sizeof *order);
    }
}

static int64_t sample_row(int64_t V, const float *logits, float T, int64_t top_k, float top_p, double u,
                          float *p, int32_t *order, int32_t *spare, double *cdf, int64_t *nan_seen)
{
    if (T == 0.0f) {
        int64_t best = 0;
        for (int64_t j = 0; j < V; j++) {
            if (logits[j] != logits[j])
                return j;                                       /* NaN: the largest, as torch.argmax has it */
            if (logits[j] > logits[best])
                best = j;
        }
        return best;
    }
    float m = -INFINITY;
    for (int64_t j = 0; j < V; j++) {
        p[j] = logits[j] / T;
        if (p[j] != p[j])
            *nan_seen = 1;
        m = p[j] > m ? p[j] : m;
    }
    float sum = 0.0f;
    for (int64_t j = 0; j < V; j++) {
        p[j] = p[j] == -INFINITY ? 0.0f : exp_approx(p[j] - m);     /* a token at -inf (--max-copy's) stays at 0 */
        sum += p[j];
    }
    for (int64_t j = 0; j < V; j++)
        p[j] /= sum;
    int cut_k = top_k < V, cut_p = top_p < 1.0f;
    if (cut_k || cut_p) {
        for (int64_t j = 0; j < V; j++)
            order[j] = (int32_t)j;
        sort_by_probability(order, spare, V, p);
        float kth = cut_k ? p[order[(top_k < 1 ? 1 : top_k) - 1]] : 0.0f, total = 0.0f, before = 0.0f;
        for (int64_t r = 0; r < V; r++)
            total += p[order[r]];
        for (int64_t r = 0; r < V; r++) {
            float q = p[order[r]];
            int keep = r == 0 || ((!cut_k || q >= kth) && (!cut_p || before < top_p * total));
            before += q;
            if (!keep)
                p[order[r]] = 0.0f;
        }
    }
    float kept = 0.0f;
    for (int64_t j = 0; j < V; j++)
        kept += p[j];
    double cumulative = 0.0;
    for (int64_t j = 0; j < V; j++) {
        cumulative += (double)(p[j] / kept);
        cdf[j] = cumulative;
    }
    double target = u * cdf[V - 1];
    if (target != target || *nan_seen)
        return V - 1;
    for (int64_t j = 0; j < V; j++)
        if (cdf[j] > target)
            return j;
    return V - 1;
}

/* ids[r] for r < rows; temperature, top_k, top_p: arrays read at r * their stride (0: one for all).
 * Returns 0, or -1 where memory for the scratch could not be had (the caller then draws another way). */
int lstm_sample_rows(int64_t rows, int64_t V, const float *logits, const float *temperature, int64_t t_stride,
                     const int64_t *top_k, int64_t k_stride, const float *top_p, int64_t p_stride, const double *u,
                     int64_t *ids)
{
    double *cdf = malloc((size_t)V * sizeof(double));             /* then p (V floats), order and spare (V int32 each) */
    float *p = malloc((size_t)V * sizeof(float));
    int32_t *order = malloc((size_t)V * 2 * sizeof(int32_t));
    if (!cdf || !p || !order) {
        free(cdf), free(p), free(order);
        return -1;
    }
    for (int64_t r = 0; r < rows; r++) {
        int64_t nan_seen = 0;
        ids[r] = sample_row(V, logits + r * V, temperature[r * t_stride], top_k[r * k_stride], top_p[r * p_stride],
                            u[r], p, order, order + V, cdf, &nan_seen);
    }
    free(cdf), free(p), free(order);
    return 0;
}

/* ------------------------------------------------------------------------------------------------
 * Generation's loop: many characters of a few rows in one call, each step what one lstm_sample_rows
 * and one lstm_rows_step compute (the same functions, in the same order), so a seed gives the same text
 * whether its characters come one call each or many. Between characters nothing returns to Python.
 * ------------------------------------------------------------------------------------------------ */
/* Up to `steps` times: draw each row's next character from logits (rows, V) at u[s * rows + r] with the
 * row's settings (as lstm_sample_rows), write it to ids[s * rows + r], and step every layer and the
 * output layer on it (as lstm_rows_step), the new logits replacing the old in place.
 *   token_gates (V, 4H): layer 0's input part per token, both biases in; style_gates (rows, 4H) added to
 *   each row's, or NULL; state_in: 2 * layers pointers, h[0..layers) then c, each (rows, H);
 *   state_out and spare: (2 * layers, rows, H) each, h then c: the state after the last step lands in
 *   state_out, spare is scratch; the rest as lstm_rows_step's and lstm_sample_rows' arguments.
 * Returns the number of steps taken: `steps`, or fewer where a watched row (watch[r] != 0) drew one of
 * the n_ends ids in `ends` (the last character of a stop string, which the caller checks there); -1
 * where memory for scratch could not be had (nothing was drawn or stepped). */
int64_t lstm_decode_rows(int64_t steps, int64_t rows, int64_t layers, int64_t H, int64_t V, int64_t residual,
                         int64_t threaded, const float *token_gates, const float *style_gates,
                         const float *const *weights, const float *const *biases, float *const *state_in,
                         float *state_out, float *spare, const float *head_w, const float *head_b, float *logits,
                         const float *temperature, int64_t t_stride, const int64_t *top_k, int64_t k_stride,
                         const float *top_p, int64_t p_stride, const double *u, int64_t *ids,
                         const int64_t *ends, int64_t n_ends, const int64_t *watch)
{
    const int64_t G = 4 * H, state_size = rows * H;
    float *floats = malloc((size_t)(rows * (2 * G + 3 * H) + V) * sizeof(float));
    double *cdf = malloc((size_t)V * sizeof(double));
    int32_t *order = malloc((size_t)V * 2 * sizeof(int32_t));
    float **states = malloc((size_t)(4 * layers) * sizeof(float *));
    if (!floats || !cdf || !order || !states) {
        free(floats), free(cdf), free(order), free(states);
        return -1;
    }
    float *layer0 = floats, *gates = layer0 + rows * G, *joined = gates + rows * G, *x_out = joined + rows * 2 * H;
    float *p = x_out + rows * H;
    float *written = NULL;                              /* the buffer holding the latest state */
    int64_t taken = 0;
    while (taken < steps) {
        const int64_t s = taken;
        int64_t *drawn = ids + s * rows, stop = 0;
        for (int64_t r = 0; r < rows; r++) {
            int64_t nan_seen = 0;
            drawn[r] = sample_row(V, logits + r * V, temperature[r * t_stride], top_k[r * k_stride],
                                  top_p[r * p_stride], u[s * rows + r], p, order, order + V, cdf, &nan_seen);
            const float *row = token_gates + drawn[r] * G, *style = style_gates ? style_gates + r * G : NULL;
#pragma GCC ivdep
            for (int64_t j = 0; j < G; j++)
                layer0[r * G + j] = style ? row[j] + style[j] : row[j];
            for (int64_t e = 0; e < n_ends && watch[r]; e++)
                stop |= drawn[r] == ends[e];
        }
        float *target = written == state_out ? spare : state_out;
        for (int64_t k = 0; k < 2 * layers; k++) {
            states[k] = written ? written + k * state_size : state_in[k];
            states[2 * layers + k] = target + k * state_size;
        }
        lstm_rows_step(rows, layers, H, V, residual, threaded, layer0, weights, biases, states, x_out, head_w,
                       head_b, logits, gates, joined);
        written = target;
        taken++;
        if (stop)
            break;
    }
    if (written == spare)
        memcpy(state_out, spare, (size_t)(2 * layers * state_size) * sizeof(float));
    free(floats), free(cdf), free(order), free(states);
    return taken;
}

/* ------------------------------------------------------------------------------------------------
 * A chunk's whole time loop in one call, for small layers: each step's recurrent product on the
 * weights packed in panels and its pointwise work, with no return to Python between steps. Below
 * about a million multiply-adds a step, a library's product costs more in dispatch than in
 * arithmetic, and the Python loop around it as much again (fused_lstm.py chooses). Where the CPU has
 * AVX512-BF16 dot products (vdpbf16ps) the loops also run with the products in bfloat16: their
 * inputs rounded to bfloat16 (h or the gate gradients, and the weight), summed in float32, and the
 * result rounded to bfloat16 before it is added, as the bf16 path's library products do.
 * ------------------------------------------------------------------------------------------------ */

/* One panel (output columns p*PANEL..) for every row: y[b][n] = dot + add[b][n] (or 0) for n < N, each
 * element summed over k in order, as rows_product sums it. add may be y (updated in place). */
static void panel_every_row(int64_t rows, int64_t N, int64_t K, const float *x, const float *panels, int64_t p,
                            const float *add, float *y)
{
    const float *panel = panels + p * K * PANEL;
    float block[4][PANEL];
    const int64_t n0 = p * PANEL, width = N - n0 < PANEL ? N - n0 : PANEL;
    int64_t b = 0;
    for (; b + 4 <= rows; b += 4) {
        panel_rows4(panel, x + b * K, K, block);
        for (int64_t r = 0; r < 4; r++)
            for (int64_t j = 0; j < width; j++)
                y[(b + r) * N + n0 + j] = block[r][j] + (add ? add[(b + r) * N + n0 + j] : 0.0f);
    }
    for (; b < rows; b++) {
        lanes16 low = {0}, high = {0};
        for (int64_t k = 0; k < K; k++) {
            low += load16(panel + k * PANEL) * x[b * K + k];
            high += load16(panel + k * PANEL + 16) * x[b * K + k];
        }
        memcpy(block[0], &low, 64), memcpy(block[0] + 16, &high, 64);
        for (int64_t j = 0; j < width; j++)
            y[b * N + n0 + j] = block[0][j] + (add ? add[b * N + n0 + j] : 0.0f);
    }
}

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#define BF16_DOT 1

/* One panel for every row, as panel_every_row, in bfloat16: panels are (panels, K / 2, PANEL, 2) bfloat16
 * (a k pair of each column side by side), x (rows, K) bfloat16 with K even; y = bf16(dot) + add. */
static void panel_every_row_bf16(int64_t rows, int64_t N, int64_t K, const uint16_t *x, const uint16_t *panels,
                                 int64_t p, const float *add, float *y)
{
    const uint16_t *panel = panels + p * K * PANEL;
    const int64_t n0 = p * PANEL, width = N - n0 < PANEL ? N - n0 : PANEL, pairs = K / 2;
    float block[4][PANEL];
    int64_t b = 0;
    while (b < rows) {
        const int64_t count = rows - b < 4 ? rows - b : 4;
        __m512 acc[4][2];
        for (int64_t r = 0; r < 4; r++)
            acc[r][0] = acc[r][1] = _mm512_setzero_ps();
        for (int64_t q = 0; q < pairs; q++) {
            __m512bh low = (__m512bh)_mm512_loadu_si512(panel + q * 2 * PANEL);
            __m512bh high = (__m512bh)_mm512_loadu_si512(panel + q * 2 * PANEL + PANEL);
            for (int64_t r = 0; r < count; r++) {
                uint32_t pair;
                memcpy(&pair, x + (b + r) * K + 2 * q, sizeof pair);
                __m512bh xr = (__m512bh)_mm512_set1_epi32((int)pair);
                acc[r][0] = _mm512_dpbf16_ps(acc[r][0], low, xr);
                acc[r][1] = _mm512_dpbf16_ps(acc[r][1], high, xr);
            }
        }
        for (int64_t r = 0; r < count; r++) {
            _mm512_storeu_ps(block[r], acc[r][0]);
            _mm512_storeu_ps(block[r] + 16, acc[r][1]);
            for (int64_t j = 0; j < width; j++)
                y[(b + r) * N + n0 + j] = bf16_to_float(float_to_bf16(block[r][j]))
                                          + (add ? add[(b + r) * N + n0 + j] : 0.0f);
        }
        b += count;
    }
}

#else
#define BF16_DOT 0
#endif

/* 1 where this build has the bfloat16 chunk loops (the compiler targets a CPU with AVX512-BF16). */
int lstm_kernel_bf16_dot(void) { return BF16_DOT; }

#ifdef _OPENMP
#include <omp.h>
#define THREAD_NUMBER omp_get_thread_num()
#define THREAD_COUNT omp_get_num_threads()
#else
#define THREAD_NUMBER 0
#define THREAD_COUNT 1
#endif

/* The hidden units [*begin, *end) a thread owns in the whole-chunk loops: whole panels, so that no two
 * threads write the same panel's columns. */
static inline void units_of_thread(int64_t H, int64_t *begin, int64_t *end)
{
    const int64_t count = THREAD_COUNT, width = ((H / PANEL + count - 1) / count) * PANEL;
    *begin = THREAD_NUMBER * width < H ? THREAD_NUMBER * width : H;
    *end = *begin + width < H ? *begin + width : H;
}

/* The forward loop where H is a whole number of panels: the threads share the hidden units, each computing
 * its units' gate columns and their pointwise work, and wait for one another once a step (h is then whole).
 * With w_low (W_hh packed for panel_every_row_bf16) the product is in bfloat16 and reads h_low (h_slots, B, H):
 * with T + 1 slots h0 and then every step's h rounded to bfloat16, written here (what the weight gradients
 * read too); with 2 the steps take turns (a thread writes one while another still reads the other); else
 * float32 on w_panels. The activations go to gates_low in bfloat16 where it is given, else over gates. */
static void forward_chunk_units(int64_t T, int64_t B, int64_t H, const float *w_panels, const uint16_t *w_low,
                                float *gates, uint16_t *gates_low, const float *h0, const float *c0, float *hs,
                                float *cs, int64_t cs_stride, uint16_t *h_low, int64_t h_slots, int64_t threaded)
{
#pragma omp parallel if (threaded && 4 * H * H >= 65536)
    {
        int64_t begin, end;
        units_of_thread(H, &begin, &end);
        if (w_low) {
            for (int64_t b = 0; b < B; b++)
                for (int64_t j = begin; j < end; j++)
                    h_low[b * H + j] = float_to_bf16(h0[b * H + j]);
#pragma omp barrier
        }
        for (int64_t t = 0; t < T; t++) {
            float *pre = gates + t * B * 4 * H, *h_t = hs + t * B * H;
            uint16_t *a_low = gates_low ? gates_low + t * B * 4 * H : NULL;
            const float *h_prev = t == 0 ? h0 : hs + (t - 1) * B * H;
            const float *c_prev = t == 0 ? c0 : cs + (t - 1) * cs_stride;
            uint16_t *h_next = w_low ? h_low + ((t + 1) % h_slots) * B * H : NULL;
            for (int64_t gate = 0; gate < 4; gate++)                        /* pre += h_prev W_hh^T, own units */
                for (int64_t p = (gate * H + begin) / PANEL; p < (gate * H + end) / PANEL; p++) {
#if BF16_DOT
                    if (w_low) {
                        panel_every_row_bf16(B, 4 * H, H, h_low + (t % h_slots) * B * H, w_low, p, pre, pre);
                        continue;
                    }
#endif
                    panel_every_row(B, 4 * H, H, h_prev, w_panels, p, pre, pre);
                }
            for (int64_t b = 0; b < B; b++) {
                if (a_low)
                    forward_row(H, begin, end, pre + b * 4 * H, NULL, NULL, a_low + b * 4 * H, c_prev + b * H,
                                cs + t * cs_stride + b * H, h_t + b * H, NULL, 0, 1);
                else
                    forward_row(H, begin, end, pre + b * 4 * H, NULL, pre + b * 4 * H, NULL, c_prev + b * H,
                                cs + t * cs_stride + b * H, h_t + b * H, NULL, 0, 0);
                for (int64_t j = begin; h_next && j < end; j++)
                    h_next[b * H + j] = float_to_bf16(h_t[b * H + j]);
            }
#pragma omp barrier
        }
    }
}

/* The backward loop where H is a whole number of panels: the threads share the hidden units (their gate
 * columns' pointwise work, then their units of the product through W_hh), waiting once a step. The
 * activations come from gates_low (bfloat16) where given, else from gates. With wt_low (W_hh^T packed for
 * panel_every_row_bf16) the gate gradients are written in bfloat16 only (grad_low, T x B x 4H: what the
 * product through W_hh and the weight gradients read) and the product is in bfloat16; else float32, on
 * wt_panels, into grad_gates. */
static void backward_chunk_units(int64_t T, int64_t B, int64_t H, const float *wt_panels, const uint16_t *wt_low,
                                 const float *gates, const uint16_t *gates_low, const float *cs, const float *c0,
                                 const float *grad_hs, float *grad_h, float *grad_c, float *grad_gates,
                                 uint16_t *grad_low, float *grad_bias, int64_t threaded)
{
#pragma omp parallel if (threaded && 4 * H * H >= 65536)
    {
        int64_t begin, end;
        units_of_thread(H, &begin, &end);
        for (int64_t t = T - 1; t >= 0; t--) {
            const int64_t at = t * B * 4 * H;
            const float *c_t = cs + t * B * H, *c_prev = t > 0 ? cs + (t - 1) * B * H : c0;
            float *d = wt_low ? NULL : grad_gates + at;
            uint16_t *d_low = wt_low ? grad_low + at : NULL;
            for (int64_t b = 0; b < B; b++) {
                const int64_t row = at + b * 4 * H, state = b * H;
                if (wt_low)             /* (with gates_low: the bfloat16 loops keep their activations so) */
                    backward_row(H, begin, end, NULL, gates_low + row, c_t + state, c_prev + state, grad_h + state,
                                 NULL, grad_c + state, NULL, grad_low + row, grad_bias, 1, 1);
                else if (gates_low)
                    backward_row(H, begin, end, NULL, gates_low + row, c_t + state, c_prev + state, grad_h + state,
                                 NULL, grad_c + state, grad_gates + row, NULL, grad_bias, 0, 1);
                else
                    backward_row(H, begin, end, gates + row, NULL, c_t + state, c_prev + state, grad_h + state,
                                 NULL, grad_c + state, grad_gates + row, NULL, grad_bias, 0, 0);
            }
#pragma omp barrier
            /* dL/dh_{t-1} of the own units: through W_hh (all of step t's d, now whole), plus what reached
             * h_{t-1} from above (none before the chunk); only this thread reads them next */
            const float *above = t > 0 ? grad_hs + (t - 1) * B * H : NULL;
            for (int64_t p = begin / PANEL; p < end / PANEL; p++) {
#if BF16_DOT
                if (wt_low) {
                    panel_every_row_bf16(B, H, 4 * H, d_low, wt_low, p, above, grad_h);
                    continue;
                }
#endif
                panel_every_row(B, H, 4 * H, d, wt_panels, p, above, grad_h);
            }
        }
    }
}

/* Forward: gates (T, B, 4H) holds x W_ih^T + biases on entry, and the activations on return unless
 * gates_low is given, which then receives them in bfloat16; w_panels is W_hh (4H x H) packed; h0, c0 (B, H)
 * the state before; hs (T, B, H) receives h; cs receives c at every step (cs_stride = B * H) or, with
 * cs_stride 0, is one (B, H) slot updated in place. Where H is a whole number of panels the threads share
 * the hidden units (forward_chunk_units); else the products' panels are shared step by step and the
 * pointwise work runs on one thread. */
void lstm_forward_chunk(int64_t T, int64_t B, int64_t H, const float *w_panels, float *gates, uint16_t *gates_low,
                        const float *h0, const float *c0, float *hs, float *cs, int64_t cs_stride, int64_t threaded)
{
    if (H % PANEL == 0) {
        forward_chunk_units(T, B, H, w_panels, NULL, gates, gates_low, h0, c0, hs, cs, cs_stride, NULL, 2, threaded);
        return;
    }
    for (int64_t t = 0; t < T; t++) {
        float *pre = gates + t * B * 4 * H;
        uint16_t *a_low = gates_low ? gates_low + t * B * 4 * H : NULL;
        const float *h_prev = t == 0 ? h0 : hs + (t - 1) * B * H;
        const float *c_prev = t == 0 ? c0 : cs + (t - 1) * cs_stride;
        rows_product(B, 4 * H, H, h_prev, w_panels, NULL, pre, pre, threaded);       /* pre += h_prev W_hh^T */
        for (int64_t b = 0; b < B; b++)
            if (a_low)
                forward_row(H, 0, H, pre + b * 4 * H, NULL, NULL, a_low + b * 4 * H, c_prev + b * H,
                            cs + t * cs_stride + b * H, hs + t * B * H + b * H, NULL, 0, 1);
            else
                forward_row(H, 0, H, pre + b * 4 * H, NULL, pre + b * 4 * H, NULL, c_prev + b * H,
                            cs + t * cs_stride + b * H, hs + t * B * H + b * H, NULL, 0, 0);
    }
}

/* Backward: the gradient of the chunk's pre-activations (grad_gates, T x B x 4H) and their sum over steps
 * and streams (grad_bias, 4H, added to), from the activations (gates, or gates_low in bfloat16 where given),
 * c of every step (cs) and before (c0), the gradient reaching each step's h from above (grad_hs), and
 * grad_h, grad_c (B, H): the gradient reaching the last step's h and c on entry, h0's and c0's on return.
 * wt_panels is W_hh^T (H x 4H) packed; scratch (B, H). Where H is a whole number of panels the threads
 * share the hidden units (backward_chunk_units). */
void lstm_backward_chunk(int64_t T, int64_t B, int64_t H, const float *wt_panels, const float *gates,
                         const uint16_t *gates_low, const float *cs, const float *c0, const float *grad_hs,
                         float *grad_h, float *grad_c, float *grad_gates, float *grad_bias, float *scratch,
                         int64_t threaded)
{
    if (H % PANEL == 0) {
        backward_chunk_units(T, B, H, wt_panels, NULL, gates, gates_low, cs, c0, grad_hs, grad_h, grad_c, grad_gates,
                             NULL, grad_bias, threaded);
        return;
    }
    for (int64_t t = T - 1; t >= 0; t--) {
        const int64_t at = t * B * 4 * H;
        const float *c_t = cs + t * B * H, *c_prev = t > 0 ? cs + (t - 1) * B * H : c0;
        float *d = grad_gates + at;
        for (int64_t b = 0; b < B; b++) {
            if (gates_low)
                backward_row(H, 0, H, NULL, gates_low + at + b * 4 * H, c_t + b * H, c_prev + b * H, grad_h + b * H,
                             NULL, grad_c + b * H, d + b * 4 * H, NULL, grad_bias, 0, 1);
            else
                backward_row(H, 0, H, gates + at + b * 4 * H, NULL, c_t + b * H, c_prev + b * H, grad_h + b * H,
                             NULL, grad_c + b * H, d + b * 4 * H, NULL, grad_bias, 0, 0);
        }
        /* dL/dh_{t-1}: through W_hh, plus what reached h_{t-1} from above (none before the chunk) */
        rows_product(B, H, 4 * H, d, wt_panels, NULL, t > 0 ? grad_hs + (t - 1) * B * H : NULL, scratch, threaded);
        memcpy(grad_h, scratch, (size_t)(B * H) * sizeof(float));
    }
}

#if BF16_DOT
/* lstm_forward_chunk with the recurrent product in bfloat16 (H a whole number of panels): w_panels is W_hh
 * packed for panel_every_row_bf16; h_low (h_slots, B, H), T + 1 or 2 slots, as forward_chunk_units says. */
void lstm_forward_chunk_bf16(int64_t T, int64_t B, int64_t H, const uint16_t *w_panels, float *gates,
                             uint16_t *gates_low, const float *h0, const float *c0, float *hs, float *cs,
                             int64_t cs_stride, uint16_t *h_low, int64_t h_slots, int64_t threaded)
{
    forward_chunk_units(T, B, H, NULL, w_panels, gates, gates_low, h0, c0, hs, cs, cs_stride, h_low, h_slots,
                        threaded);
}

/* lstm_backward_chunk with the product through W_hh in bfloat16 (H a whole number of panels): wt_panels is
 * W_hh^T packed for panel_every_row_bf16; the activations come in bfloat16 (gates_low) and the gate
 * gradients go out in bfloat16 only (grad_low, T x B x 4H), the bias gradient summed in float32 before
 * that rounding. */
void lstm_backward_chunk_bf16(int64_t T, int64_t B, int64_t H, const uint16_t *wt_panels, const uint16_t *gates_low,
                              const float *cs, const float *c0, const float *grad_hs, float *grad_h, float *grad_c,
                              uint16_t *grad_low, float *grad_bias, int64_t threaded)
{
    backward_chunk_units(T, B, H, NULL, wt_panels, NULL, gates_low, cs, c0, grad_hs, grad_h, grad_c, NULL, grad_low,
                         grad_bias, threaded);
}
#endif
