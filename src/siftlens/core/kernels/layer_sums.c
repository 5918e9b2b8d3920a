/* The O(h N^2) reductions of one layer's attention (siftlens.core.reductions.layer_sums, one weight map per image)
 * in one pass over each query row, for x86-64 CPUs with AVX2 and FMA (8 lanes) or AVX-512 (16 lanes, -DVW=16).
 *
 * Built by siftlens.core.fused with the system's C compiler on first use and called through ctypes. The eager
 * PyTorch path makes about twelve passes over every (h, N, N) block; here each row of the attention is read
 * from memory once (into a zero-padded buffer in the L1 cache when N is not a multiple of the lanes), and
 * everything the analysis needs from it is accumulated in registers: the row sum, Bt = row / row sum, the
 * diagonal, the distance row sum sum_j Bt_ij D_ij, the entropy -sum_j Bt_ij log Bt_ij, the contraction
 * Bt [w | one-hot]^T, and, of the centred matrix Y = Bt - c (c = 1/n as a float, given by the caller), the
 * row sums, the column sums and (for the exact null) sum Y^2 and sum Y * Y^T of every head and of the head
 * mean.
 *
 * Shapes (float32, row-major): attn (nb, nh, n, n) with any image, head and row strides and unit column
 * stride; lhs (nb, r, np) and dmat (n, np) zero-padded to np columns (np: n rounded up to a multiple of VW);
 * rowsum, colsum (of Y), diag, dist, ent (nb, nh, n); qk (nb, nh, n, r); xx, xxt (nb, nh + 1) double (of Y);
 * work: 2 np + 3 n np floats.
 *
 * Why Y: the null variance takes differences of nearly equal numbers near uniform attention, where every
 * entry of Bt is close to 1/n. The sums of Y are sums of the small deviations, so their float32 rounding is
 * relative to the deviations, not to 1/n (and Y = Bt - c itself is exact where Bt is within a factor 2 of c).
 * The caller adds the constant parts back in double. sum Y^2 and sum Y * Y^T are float32 per row, added
 * across rows in double.
 */
#include <stdint.h>
#include <string.h>

#ifndef VW
#define VW 8 /* floats per vector: 8 (AVX2, the default build) or 16 (AVX-512, built with -DVW=16) */
#endif
#define MAX_R 8 /* contraction rows (the weight row and up to 7 levels) */

/* 1 when this CPU runs this build (compiled without the ISA, so that it is safe to call anywhere) */
int siftlens_supported(void) {
    __builtin_cpu_init();
    int ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#if VW == 16
    ok = ok && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
#endif
    return ok;
}

#if defined(__clang__) && VW == 16
#pragma clang attribute push(__attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma"))), \
                             apply_to = function)
#elif defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#elif VW == 16
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

typedef float vf __attribute__((vector_size(VW * 4)));
typedef int32_t vi __attribute__((vector_size(VW * 4)));

static inline vf load(const float *p) {
    vf x;
    memcpy(&x, p, sizeof x);
    return x;
}

static inline void store(float *p, vf x) { memcpy(p, &x, sizeof x); }

typedef float vh __attribute__((vector_size(VW * 2)));

/* the sum of the lanes: adds of halves down to 4 lanes, then three scalar adds */
static inline float total(vf x) {
    vh lo, hi;
    memcpy(&lo, &x, sizeof lo);
    memcpy(&hi, (const char *)&x + sizeof lo, sizeof hi);
    vh s = lo + hi;
#if VW == 16
    return (s[0] + s[4] + s[2] + s[6]) + (s[1] + s[5] + s[3] + s[7]);
#else
    return (s[0] + s[2]) + (s[1] + s[3]);
#endif
}

/* natural log of positive normal floats to about 1 ulp: x = m 2^e with m in [sqrt(1/2), sqrt(2)), and the
 * Cephes logf polynomial for log(m). log_pos(0) is finite (about -88), so 0 * log_pos(0) = 0 as the entropy
 * needs; subnormal inputs get a finite wrong log whose product with them is below 1e-36. */
static inline vf log_pos(vf x) {
    vi u = (vi)x;
    vi e = (u >> 23) - 127;
    vf m = (vf)((u & 0x007fffff) | 0x3f800000);
    vi big = m > 1.41421356f; /* -1 in the lanes where m >= sqrt 2: halve m, add 1 to e */
    m = (vf)(((vi)(0.5f * m) & big) | ((vi)m & ~big));
    vf fe = __builtin_convertvector(e - big, vf);
    vf f = m - 1.0f, z = f * f;
    vf y = 7.0376836292E-2f * f - 1.1514610310E-1f;
    y = y * f + 1.1676998740E-1f;
    y = y * f - 1.2420140846E-1f;
    y = y * f + 1.4249322787E-1f;
    y = y * f - 1.6668057665E-1f;
    y = y * f + 2.0000714765E-1f;
    y = y * f - 2.4999993993E-1f;
    y = y * f + 3.3333331174E-1f;
    y = y * f * z - 2.12194440E-4f * fe - 0.5f * z;
    return f + y + 0.693359375f * fe;
}

/* One query row (row: np floats, zero-padded) scaled by iv = 1 / row sum, v = Bt. cpad: c in the first n
 * columns, 0 in the padding, so that y = v - cpad is Y in the row and 0 in the padding. Writes the row of Y
 * into b, adds it to the column sums and to the head sum hs; out = [distance sum, entropy, sum Y^2, sum Y, R
 * contraction sums]. R is a compile-time constant at every call, so the R accumulators stay in registers. */
static inline __attribute__((always_inline)) void row_pass(const float *row, float iv, const float *cpad,
                                                           const float *d, const float *lhs, int64_t np, const int R,
                                                           float *b, float *colsum, float *hs, float *out) {
    vf ds = {0}, es = {0}, sq = {0}, ys = {0}, acc[MAX_R] = {{0}};
    for (int64_t j = 0; j < np; j += VW) {
        vf v = load(row + j) * iv;
        vf y = v - load(cpad + j);
        store(b + j, y);
        store(colsum + j, load(colsum + j) + y);
        store(hs + j, load(hs + j) + y);
        ds += v * load(d + j);
        es += v * log_pos(v);
        sq += y * y;
        ys += y;
        for (int k = 0; k < R; k++) acc[k] += v * load(lhs + k * np + j);
    }
    out[0] = total(ds);
    out[1] = -total(es);
    out[2] = total(sq);
    out[3] = total(ys);
    for (int k = 0; k < R; k++) out[4 + k] = total(acc[k]);
}

/* sum_ij x_ij x_ji of an (n, np) matrix: float32 per row, double across rows */
static double sum_x_xt(const float *x, int64_t n, int64_t np) {
    double t = 0.0;
    for (int64_t i = 0; i < n; i++) {
        const float *row = x + i * np;
        float a = 0.0f;
#pragma omp simd reduction(+ : a)
        for (int64_t j = i + 1; j < n; j++) a += row[j] * x[j * np + i]; /* a gather: column i */
        t += 2.0 * (double)a + (double)row[i] * (double)row[i];
    }
    return t;
}

/* sum_ij x_ij^2 of an (n, np) matrix: float32 per row, double across rows */
static double sum_sq(const float *x, int64_t n, int64_t np) {
    double t = 0.0;
    for (int64_t i = 0; i < n; i++) {
        vf s = {0};
        for (int64_t j = 0; j < np; j += VW) {
            vf v = load(x + i * np + j);
            s += v * v;
        }
        t += (double)total(s);
    }
    return t;
}

/* One head of one image: returns 1 (and stops) at a query row whose sum is not positive. */
static int image_head(const float *p, int64_t n, int64_t np, int64_t s_row, const float *lhs, int64_t r,
                      const float *dmat, const float *cpad, float *rowbuf, float *bt, float *hs, float *colsum,
                      float *rowsum, float *diag, float *dist, float *ent, float *qk, double *xx) {
    double sq = 0.0; /* sum Y^2: float32 per row, double across rows */
    float o[4 + MAX_R];
    for (int64_t i = 0; i < n; i++) {
        const float *row = p + i * s_row;
        if (np != n) row = memcpy(rowbuf, row, n * sizeof(float)); /* into the zero-padded buffer */
        vf sv = {0};
        for (int64_t j = 0; j < np; j += VW) sv += load(row + j);
        const float s = total(sv);
        if (!(s > 0.0f)) return 1;
        const float iv = 1.0f / s;
        const float *d = dmat + i * np;
        float *b = bt + i * np, *h = hs + i * np;
        diag[i] = row[i] * iv;
        switch (r) {
            case 1: row_pass(row, iv, cpad, d, lhs, np, 1, b, colsum, h, o); break;
            case 2: row_pass(row, iv, cpad, d, lhs, np, 2, b, colsum, h, o); break;
            case 3: row_pass(row, iv, cpad, d, lhs, np, 3, b, colsum, h, o); break;
            case 4: row_pass(row, iv, cpad, d, lhs, np, 4, b, colsum, h, o); break;
            case 5: row_pass(row, iv, cpad, d, lhs, np, 5, b, colsum, h, o); break;
            case 6: row_pass(row, iv, cpad, d, lhs, np, 6, b, colsum, h, o); break;
            case 7: row_pass(row, iv, cpad, d, lhs, np, 7, b, colsum, h, o); break;
            default: row_pass(row, iv, cpad, d, lhs, np, 8, b, colsum, h, o); break;
        }
        dist[i] = o[0];
        ent[i] = o[1];
        sq += (double)o[2];
        rowsum[i] = o[3];
        for (int64_t k = 0; k < r; k++) qk[i * r + k] = o[4 + k];
    }
    *xx = sq;
    return 0;
}

/* Images 0 .. nb-1 (see the top of the file), centred by c; pattern: also xx and xxt. Returns 0, or 1 at a
 * query row whose sum is not positive (the caller then renormalises the attention and uses its own path). */
int siftlens_layer_sums(const float *attn, int64_t nb, int64_t nh, int64_t n, int64_t np, int64_t s_img,
                        int64_t s_head, int64_t s_row, const float *lhs, int64_t r, const float *dmat, int pattern,
                        float c, float *rowsum, float *colsum, float *diag, float *dist, float *ent, float *qk,
                        double *xx, double *xxt, float *work) {
    if (r < 1 || r > MAX_R || np % VW != 0 || np < n) return 2;
    float *rowbuf = work, *cpad = work + np, *bt = cpad + np, *hs = bt + n * np, *cs = hs + n * np;
    memset(rowbuf, 0, np * sizeof(float)); /* the padding columns stay 0 */
    for (int64_t j = 0; j < np; j++) cpad[j] = j < n ? c : 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        memset(hs, 0, n * np * sizeof(float));
        double *xb = xx + b * (nh + 1), *xtb = xxt + b * (nh + 1);
        for (int64_t a = 0; a < nh; a++) {
            const int64_t o = (b * nh + a) * n;
            memset(cs, 0, np * sizeof(float));
            if (image_head(attn + b * s_img + a * s_head, n, np, s_row, lhs + b * r * np, r, dmat, cpad, rowbuf, bt,
                           hs, cs, rowsum + o, diag + o, dist + o, ent + o, qk + o * r, xb + a))
                return 1;
            memcpy(colsum + o, cs, n * sizeof(float));
            xtb[a] = pattern ? sum_x_xt(bt, n, np) : 0.0;
        }
        const double hh = (double)nh * (double)nh; /* the head mean's Y is hs / nh */
        xb[nh] = pattern ? sum_sq(hs, n, np) / hh : 0.0;
        xtb[nh] = pattern ? sum_x_xt(hs, n, np) / hh : 0.0;
    }
    return 0;
}

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
