/* Fused rational-quadratic spline kernels of bgflow_mini (CPU).
 *
 * One loop over elements computes what bgflow_mini/flows/spline.py (knot_positions,
 * knot_derivatives, rq_spline, bounded_spline) and circular.py (circular_spline) compute
 * with some fifty tensor operations per call, and the exact reverse-mode gradients of the
 * same formulas (their adjoints written out by hand, clamps and all), so a coupling layer's
 * spline costs two kernel calls instead of ~150 small PyTorch operations.
 *
 * Compiled twice by bgflow_mini/flows/native.py: -DREAL=float -DSUFFIX=_f32 and
 * -DREAL=double -DSUFFIX=_f64; both objects are linked into one shared library.
 *
 * Layout: x is (B, F) with strides (sxb, sxf); params (B, F, P) with strides (spb, spf, spp);
 * outputs and gradients are contiguous: y, ld, gx (B, F) and gp (B, F, P).
 *   circular: P = 3K + 1 = [widths K, heights K, derivatives K, shift 1] on [-pi, pi]
 *   bounded:  P = 3K - 1 = [widths K, heights K, inner derivatives K - 1] on [-B, B]
 */
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <tgmath.h>

#define CAT2(a, b) a##b
#define CAT(a, b) CAT2(a, b)
#define FN(name) CAT(name, SUFFIX)

typedef REAL io;    /* the tensors' dtype */
typedef double real; /* arithmetic: double for both, so float32 loses nothing inside */

/* the knot loops also as AVX2 code, chosen at load time where the CPU has it (GCC, x86-64
 * Linux; elsewhere the portable build only) */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define VECTOR_CLONES
#endif

#define MAX_BINS 512
static const double MIN_BIN = 1.0 / 1024.0;   /* spline.MIN_BIN = 2**-10 */
static const double MIN_DERIV = 1.0 / 1024.0; /* spline.MIN_DERIV = 2**-10 */
static const double PI = 3.14159265358979323846;
static const double LOG2 = 0.69314718055994530942;

/* units.wrap_angle: [-pi, pi), values inside returned unchanged */
static inline real wrap(real a) {
    const real pi = (real)PI, two_pi = (real)(2.0 * PI);
    if (a >= -pi && a < pi) return a;
    real w = a + pi;
    w = w - two_pi * floor(w / two_pi); /* torch.remainder */
    if (w >= two_pi) w -= two_pi;
    return w - pi;
}

/* the same in the tensors' dtype, for outputs: < pi after rounding to it */
static inline io wrap_io(real a) {
    const io v = (io)a, pi = (io)PI, two_pi = (io)(2.0 * PI);
    if (v >= -pi && v < pi) return v;
    io w = v + pi;
    w = w - two_pi * floor(w / two_pi);
    if (w >= two_pi) w -= two_pi;
    return w - pi;
}

/* torch.nn.functional.softplus (beta 1, threshold 20) and its derivative */
static inline real softplus(real v) { return v > (real)20 ? v : log1p(exp(v)); }
static inline real dsoftplus(real v) {
    if (v > (real)20) return (real)1;
    const real z = exp(v);
    return z / (z + (real)1);
}

/* exp(x) for -708 <= x <= 0 without branches, so that loops of it vectorise: x = k ln 2 + r
 * with |r| <= ln 2 / 2, exp(r) by its Taylor polynomial to degree 13 (truncation < 1e-17
 * relative), times 2^k built in the exponent bits; within 1 ulp of libm's exp. */
static inline real exp_nonpos(real x) {
    const real shifter = 6755399441055744.0; /* 1.5 * 2^52: adding it rounds to an integer */
    const real ln2_hi = 6.93147180369123816490e-01, ln2_lo = 1.90821492927058770002e-10;
    const real t = x * 1.4426950408889634074 + shifter;
    const real kd = t - shifter;
    const real r = (x - kd * ln2_hi) - kd * ln2_lo;
    real q = 1.0 / 6227020800.0;
    q = q * r + 1.0 / 479001600.0;
    q = q * r + 1.0 / 39916800.0;
    q = q * r + 1.0 / 3628800.0;
    q = q * r + 1.0 / 362880.0;
    q = q * r + 1.0 / 40320.0;
    q = q * r + 1.0 / 5040.0;
    q = q * r + 1.0 / 720.0;
    q = q * r + 1.0 / 120.0;
    q = q * r + 1.0 / 24.0;
    q = q * r + 1.0 / 6.0;
    q = q * r + 0.5;
    q = q * r + 1.0;
    q = q * r + 1.0;
    int64_t bits, kbits;
    memcpy(&kbits, &t, sizeof kbits); /* t's low mantissa bits hold k + 2^51 + 2^52 */
    const real sh = shifter;
    int64_t shbits;
    memcpy(&shbits, &sh, sizeof shbits);
    bits = (kbits - shbits + 1023) << 52; /* 2^k */
    real scale;
    memcpy(&scale, &bits, sizeof scale);
    return q * scale;
}

/* exp(x) in float for -87 <= x <= 0, as exp_nonpos: degree-7 Taylor polynomial on
 * |r| <= ln 2 / 2 (truncation < 1e-8 relative), 2^k in the exponent bits; about 1 ulp of
 * float, the precision of the float32 tensors the probabilities are made from. */
static inline float expf_nonpos(float x) {
    const float shifter = 12582912.0f; /* 1.5 * 2^23 */
    const float t = x * 1.44269504f + shifter;
    const float kd = t - shifter;
    const float r = (x - kd * 0.693359375f) + kd * 2.12194440e-4f; /* ln 2 = hi - lo */
    float q = 1.0f / 5040.0f;
    q = q * r + 1.0f / 720.0f;
    q = q * r + 1.0f / 120.0f;
    q = q * r + 1.0f / 24.0f;
    q = q * r + 1.0f / 6.0f;
    q = q * r + 0.5f;
    q = q * r + 1.0f;
    q = q * r + 1.0f;
    int32_t kbits, shbits;
    memcpy(&kbits, &t, sizeof kbits);
    memcpy(&shbits, &shifter, sizeof shbits);
    const int32_t bits = (kbits - shbits + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return q * scale;
}

/* knot positions (K + 1) on [-hw, hw] from K raw values (spline.knot_positions), and the
 * softmax probabilities the backward needs. The loops are either independent (vectorised)
 * or short chains with several accumulators: this is most of a spline's arithmetic. */
static inline __attribute__((always_inline)) void knots_body(const io *raw, int64_t stride,
                                                             const int K, real hw, real *knot,
                                                             real *prob) {
    real v[MAX_BINS], cum[MAX_BINS];
    for (int j = 0; j < K; j++) v[j] = raw[j * stride];
    const real first = raw[0]; /* K >= 1 */
    real m0 = first, m1 = first, m2 = first, m3 = first;
    int j = 0;
    for (; j + 4 <= K; j += 4) {
        m0 = v[j] > m0 ? v[j] : m0;
        m1 = v[j + 1] > m1 ? v[j + 1] : m1;
        m2 = v[j + 2] > m2 ? v[j + 2] : m2;
        m3 = v[j + 3] > m3 ? v[j + 3] : m3;
    }
    for (; j < K; j++) m0 = v[j] > m0 ? v[j] : m0;
    m0 = m1 > m0 ? m1 : m0;
    m2 = m3 > m2 ? m3 : m2;
    const real m = m2 > m0 ? m2 : m0;
    /* the exponentials: in the tensors' precision (float: 8 per AVX2 instruction), by libm
     * where a weight falls below the polynomial's range (e^-87 float, e^-708 double) */
    const int single = sizeof(io) == sizeof(float);
    const real floor_x = single ? (real)-87 : (real)-708;
    int far = 0;
    for (j = 0; j < K; j++) far |= v[j] - m < floor_x;
    if (far) {
        for (j = 0; j < K; j++) prob[j] = exp(v[j] - m);
    } else if (single) {
        float vf[MAX_BINS], ef[MAX_BINS];
        for (j = 0; j < K; j++) vf[j] = (float)(v[j] - m);
        for (j = 0; j < K; j++) ef[j] = expf_nonpos(vf[j]); /* vectorised */
        for (j = 0; j < K; j++) prob[j] = ef[j];
    } else {
        for (j = 0; j < K; j++) prob[j] = exp_nonpos(v[j] - m); /* vectorised */
    }
    real s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (j = 0; j + 4 <= K; j += 4) {
        s0 += prob[j];
        s1 += prob[j + 1];
        s2 += prob[j + 2];
        s3 += prob[j + 3];
    }
    for (; j < K; j++) s0 += prob[j];
    const real inv_s = (real)1 / ((s0 + s1) + (s2 + s3));
    const real scale = (real)(1.0 - MIN_BIN * K), two_hw = (real)2 * hw;
    for (j = 0; j < K; j++) {
        prob[j] *= inv_s;
        cum[j] = prob[j] * scale + (real)MIN_BIN; /* the bin's fraction of the interval */
    }
    for (j = 1; j < K - 1; j++) cum[j] += cum[j - 1]; /* the chain: adds only */
    knot[0] = -hw;
    for (j = 1; j < K; j++) knot[j] = cum[j - 1] * two_hw - hw;
    knot[K] = two_hw - hw;
}

/* knots_body with the bin counts of the shipped flows (8, 16) as constants, so that its
 * short loops compile without remainder handling; any other count takes the general code */
VECTOR_CLONES static void knots(const io *raw, int64_t stride, int K, real hw, real *knot,
                                real *prob) {
    if (K == 16)
        knots_body(raw, stride, 16, hw, knot, prob);
    else if (K == 8)
        knots_body(raw, stride, 8, hw, knot, prob);
    else
        knots_body(raw, stride, K, hw, knot, prob);
}

/* adjoint of knots(): the adjoints of knots lo and lo + 1 -> the K raw values' gradients */
static inline __attribute__((always_inline)) void knots_grad_body(const real *prob, const int K,
                                                                  real hw, int lo, real a_lo,
                                                                  real a_hi, io *g) {
    const real scale = (real)(1.0 - MIN_BIN * K), two_hw = (real)2 * hw;
    /* knot j (1 <= j <= K - 1) = two_hw * sum_{i < j} frac_i - hw; frac_i = scale p_i + MIN_BIN,
     * so a_frac_i = c_lo [i < lo] + c_hi [i <= lo]; softmax: g_i = p_i (scale a_frac_i - dot) */
    const real c_lo = (lo >= 1 && lo <= K - 1) ? a_lo * two_hw : (real)0;
    const real c_hi = (lo + 1 <= K - 1) ? a_hi * two_hw : (real)0;
    real below = 0; /* sum_{i < lo} p_i */
    for (int i = 0; i < lo; i++) below += prob[i];
    const real dot = scale * (c_lo * below + c_hi * (below + prob[lo]));
    for (int i = 0; i < K; i++) {
        const real a_frac = (real)(i < lo) * c_lo + (real)(i <= lo) * c_hi;
        g[i] = (io)(prob[i] * (scale * a_frac - dot));
    }
}

VECTOR_CLONES static void knots_grad(const real *prob, int K, real hw, int lo, real a_lo,
                                     real a_hi, io *g) {
    if (K == 16)
        knots_grad_body(prob, 16, hw, lo, a_lo, a_hi, g);
    else if (K == 8)
        knots_grad_body(prob, 8, hw, lo, a_lo, a_hi, g);
    else
        knots_grad_body(prob, K, hw, lo, a_lo, a_hi, g);
}

/* number of inner knots (1 .. K - 1) at or below v: the bin index 0 .. K - 1 */
static inline int bin_of(const real *knot, int K, real v) {
    int i = 0;
    for (int j = 1; j < K; j++) i += (v >= knot[j]);
    return i;
}

/* one bin of the RQ spline (spline.rq_spline), value and log-derivative */
typedef struct {
    real xl, xh, yl, yh, dl, dh;
} bin_t;

typedef struct { /* adjoints of the bin's inputs */
    real xin, xl, xh, yl, yh, dl, dh;
} bin_grad_t;

static inline real clamp01(real v) { return v < (real)0 ? (real)0 : (v > (real)1 ? (real)1 : v); }

static void rq_eval(real xin, const bin_t *b, int inverse, real *out, real *L) {
    const real w = b->xh - b->xl, h = b->yh - b->yl, s = h / w;
    const real delta = b->dl + b->dh - (real)2 * s;
    real xi;
    if (inverse) {
        const real dy = xin - b->yl;
        const real a = h * (s - b->dl) + dy * delta, bq = h * b->dl - dy * delta, c = -s * dy;
        real disc = bq * bq - (real)4 * a * c;
        if (disc < (real)0) disc = 0;
        xi = clamp01((real)2 * c / (-bq - sqrt(disc)));
        *out = b->xl + xi * w;
    } else {
        xi = clamp01((xin - b->xl) / w);
    }
    const real om = (real)1 - xi, t = xi * om, denom = s + delta * t;
    if (!inverse) *out = b->yl + h * (xi + t * ((b->dl - s) - delta * xi) / denom);
    const real num = b->dh * xi * xi + (real)2 * s * t + b->dl * om * om;
    *L = (real)2 * log(s / denom) + log(num);
}

/* reverse mode of rq_eval: g_out, g_L -> adjoints of xin and the bin's knots */
static void rq_grad(real xin, const bin_t *b, int inverse, real g_out, real g_L, bin_grad_t *g) {
    const real w = b->xh - b->xl, h = b->yh - b->yl, s = h / w;
    const real dl = b->dl, dh = b->dh;
    const real delta = dl + dh - (real)2 * s;
    real xir, xi, dy = 0, a = 0, bq = 0, c = 0, discr = 0, sq = 0, den2 = 0;
    if (inverse) {
        dy = xin - b->yl;
        a = h * (s - dl) + dy * delta;
        bq = h * dl - dy * delta;
        c = -s * dy;
        discr = bq * bq - (real)4 * a * c;
        sq = sqrt(discr < (real)0 ? (real)0 : discr);
        den2 = -bq - sq;
        xir = (real)2 * c / den2;
    } else {
        xir = (xin - b->xl) / w;
    }
    xi = clamp01(xir);
    const real om = (real)1 - xi, t = xi * om, denom = s + delta * t;
    const real num = dh * xi * xi + (real)2 * s * t + dl * om * om;
    real a_xi = 0, a_s = 0, a_t = 0, a_om = 0, a_delta = 0, a_h = 0, a_w = 0;
    real a_xl = 0, a_yl = 0, a_dl = 0, a_dh = 0, a_xin = 0;
    real a_denom = 0;
    if (inverse) { /* out = xl + xi w */
        a_xl = g_out;
        a_xi = g_out * w;
        a_w = g_out * xi;
    } else { /* out = yl + h (xi + r), r = t q / denom, q = (dl - s) - delta xi */
        const real q = (dl - s) - delta * xi, r = t * q / denom;
        a_yl = g_out;
        a_h = g_out * (xi + r);
        a_xi = g_out * h;
        const real a_r = g_out * h;
        a_t = a_r * q / denom;
        const real a_q = a_r * t / denom;
        a_denom = -a_r * r / denom;
        a_dl = a_q;
        a_s = -a_q;
        a_delta = -a_q * xi;
        a_xi -= a_q * delta;
    }
    /* L = 2 log(s / denom) + log(num) */
    a_s += (real)2 * g_L / s;
    a_denom -= (real)2 * g_L / denom;
    const real a_num = g_L / num;
    a_dh += a_num * xi * xi;
    a_xi += a_num * (real)2 * dh * xi;
    a_s += a_num * (real)2 * t;
    a_t += a_num * (real)2 * s;
    a_dl += a_num * om * om;
    a_om += a_num * (real)2 * dl * om;
    /* denom = s + delta t; t = xi om; om = 1 - xi */
    a_s += a_denom;
    a_delta += a_denom * t;
    a_t += a_denom * delta;
    a_xi += a_t * om;
    a_om += a_t * xi;
    a_xi -= a_om;
    const real a_xir = (xir >= (real)0 && xir <= (real)1) ? a_xi : (real)0; /* clamp */
    if (inverse) {
        /* xir = 2 c / den2; den2 = -b - sq; sq = sqrt(max(discr, 0)); discr = b^2 - 4 a c */
        real a_c = (real)2 * a_xir / den2;
        const real a_den2 = -a_xir * xir / den2;
        real a_b = -a_den2;
        const real a_sq = -a_den2;
        const real a_disc = a_sq / ((real)2 * sq);
        const real a_discr = discr >= (real)0 ? a_disc : (real)0;
        a_b += (real)2 * bq * a_discr;
        const real a_a = -(real)4 * c * a_discr;
        a_c -= (real)4 * a * a_discr;
        /* c = -s dy; b = h dl - dy delta; a = h (s - dl) + dy delta */
        a_s -= a_c * dy;
        real a_dy = -a_c * s;
        a_h += a_b * dl;
        a_dl += a_b * h;
        a_dy -= a_b * delta;
        a_delta -= a_b * dy;
        a_h += a_a * (s - dl);
        a_s += a_a * h;
        a_dl -= a_a * h;
        a_dy += a_a * delta;
        a_delta += a_a * dy;
        a_xin = a_dy; /* dy = xin - yl */
        a_yl -= a_dy;
    } else { /* xir = (xin - xl) / w */
        a_xin = a_xir / w;
        a_xl -= a_xir / w;
        a_w -= a_xir * xir / w;
    }
    /* delta = dl + dh - 2 s; s = h / w; h = yh - yl; w = xh - xl */
    a_dl += a_delta;
    a_dh += a_delta;
    a_s -= (real)2 * a_delta;
    a_h += a_s / w;
    a_w -= a_s * s / w;
    g->xin = a_xin;
    g->yh = a_h;
    g->yl = a_yl - a_h;
    g->xh = a_w;
    g->xl = a_xl - a_w;
    g->dl = a_dl;
    g->dh = a_dh;
}

/* one element's spline: x and y knots (K + 1 each) with their softmax probabilities, the bin
 * of the input and the derivatives at its two ends */
typedef struct {
    real kx[MAX_BINS + 1], ky[MAX_BINS + 1];
    real px[MAX_BINS], py[MAX_BINS];
} table_t;

/* saved per element by the forward for the backward: bin index, spline input, the bin's six
 * knot values, the derivatives of its two end slopes by their raw values, then the 2 K
 * softmax probabilities (widths, heights) */
#define SAVED_HEAD 10
#define SAVED(K) (SAVED_HEAD + 2 * (int64_t)(K))

/* knot derivative MIN_DERIV + gain softplus(raw) and its derivative by raw, one exp */
static inline real deriv(real raw, real *grad) {
    const real gain = (real)((1.0 - MIN_DERIV) / LOG2);
    if (raw > (real)20) { /* softplus = raw (torch's threshold) */
        *grad = gain;
        return raw * gain + (real)MIN_DERIV;
    }
    const real e = exp(raw);
    *grad = gain * e / (e + (real)1);
    return log1p(e) * gain + (real)MIN_DERIV;
}

/* index into the raw derivatives of knot j, or -1 where it is fixed to 1 (bounded ends) */
static inline int deriv_index(int j, int K, int circular) {
    if (circular) return j % K; /* derivative K is derivative 0 */
    return (j >= 1 && j <= K - 1) ? j - 1 : -1;
}

/* knots, bin and bin values of one element; writes the saved record if sv is not NULL */
static bin_t prepare(const io *pe, int64_t spp, int K, real hw, int circular, int inverse,
                     real xin, table_t *tb, int *bin, real *sv) {
    knots(pe, spp, K, hw, tb->kx, tb->px);
    knots(pe + K * spp, spp, K, hw, tb->ky, tb->py);
    const int i = bin_of(inverse ? tb->ky : tb->kx, K, xin);
    const io *raw_d = pe + 2 * K * spp;
    const int jl = deriv_index(i, K, circular), jh = deriv_index(i + 1, K, circular);
    real ddl = 0, ddh = 0; /* fixed end slopes (bounded): 1, no gradient */
    bin_t b = {tb->kx[i], tb->kx[i + 1], tb->ky[i], tb->ky[i + 1],
               jl < 0 ? (real)1 : deriv(raw_d[jl * spp], &ddl),
               jh < 0 ? (real)1 : deriv(raw_d[jh * spp], &ddh)};
    *bin = i;
    if (sv) {
        sv[0] = (real)i;
        sv[1] = xin;
        sv[2] = b.xl, sv[3] = b.xh, sv[4] = b.yl, sv[5] = b.yh, sv[6] = b.dl, sv[7] = b.dh;
        sv[8] = ddl, sv[9] = ddh;
        memcpy(sv + SAVED_HEAD, tb->px, sizeof(real) * K);
        memcpy(sv + SAVED_HEAD + K, tb->py, sizeof(real) * K);
    }
    return b;
}

/* the raw-parameter gradients of one element (all its 3 K -+ 1 entries but a circular
 * spline's shift, which the caller writes) from its saved record */
static real element_grad(int K, real hw, int circular, int inverse, const real *sv, real g_out,
                         real g_L, io *gp) {
    const int i = (int)sv[0];
    const bin_t b = {sv[2], sv[3], sv[4], sv[5], sv[6], sv[7]};
    bin_grad_t g;
    rq_grad(sv[1], &b, inverse, g_out, g_L, &g);
    knots_grad(sv + SAVED_HEAD, K, hw, i, g.xl, g.xh, gp);
    knots_grad(sv + SAVED_HEAD + K, K, hw, i, g.yl, g.yh, gp + K);
    const int jl = deriv_index(i, K, circular), jh = deriv_index(i + 1, K, circular);
    io *gd = gp + 2 * K;
    for (int j = 0; j < (circular ? K : K - 1); j++) gd[j] = 0;
    if (jl >= 0) gd[jl] += (io)(g.dl * sv[8]);
    if (jh >= 0) gd[jh] += (io)(g.dh * sv[9]); /* jh == jl when K == 1 (circular) */
    return g.xin;
}

/* ---- one call's arguments, and its rows split over threads ----
 * Every entry point fills an args_t and runs rows() on [0, B) split into n_threads chunks
 * (pthreads; the calling thread takes the first). Rows are independent; the coupling
 * backward's per-feature sums go to one buffer per thread (ga + thread * n_lin). */

typedef struct args_s args_t;
struct args_s {
    void (*rows)(const args_t *, int64_t b0, int64_t b1, int thread);
    int64_t B, F; /* rows; features per row (D for a coupling) */
    int K, inverse;
    real bound;
    const io *x, *p, *sb, *gy, *gld; /* sb: the couplings' log-scale bounds */
    int64_t sxb, sxf, spb, spf, spp, sa, sgb, sgd, sgl;
    io *y, *ld, *gx, *gp;
    real *sv, *ga;
    int64_t n_lin, n_circ;
    const int64_t *idx_lin, *idx_circ;
};

typedef struct {
    const args_t *a;
    int64_t b0, b1;
    int thread;
} chunk_t;

static void *run_chunk(void *arg) {
    const chunk_t *c = (const chunk_t *)arg;
    c->a->rows(c->a, c->b0, c->b1, c->thread);
    return 0;
}

#define MAX_THREADS 64
static int run(const args_t *a, int n_threads) {
    if (n_threads > MAX_THREADS) n_threads = MAX_THREADS;
    if (n_threads > a->B) n_threads = (int)a->B;
    if (n_threads <= 1) {
        a->rows(a, 0, a->B, 0);
        return 0;
    }
    chunk_t chunks[MAX_THREADS];
    pthread_t tid[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int t = 0; t < n_threads; t++) {
        chunks[t].a = a;
        chunks[t].b0 = a->B * t / n_threads;
        chunks[t].b1 = a->B * (t + 1) / n_threads;
        chunks[t].thread = t;
    }
    for (int t = 1; t < n_threads; t++)
        started[t] = pthread_create(&tid[t], 0, run_chunk, &chunks[t]) == 0;
    run_chunk(&chunks[0]);
    for (int t = 1; t < n_threads; t++) {
        if (started[t])
            pthread_join(tid[t], 0);
        else
            run_chunk(&chunks[t]); /* no thread to be had: do it here */
    }
    return 0;
}

/* ---- elementwise splines: x (B, F) strided, params (B, F, P) strided; outputs contiguous;
 * sv (may be NULL): (B, F, SAVED(K)) records for the backward, written by the forward ---- */

static void circular_forward_rows(const args_t *a, int64_t b0, int64_t b1, int thread) {
    (void)thread;
    const int K = a->K, inverse = a->inverse;
    const int64_t F = a->F, spp = a->spp;
    table_t tb;
    for (int64_t b = b0; b < b1; b++) {
        for (int64_t f = 0; f < F; f++) {
            const int64_t e = b * F + f;
            const io *pe = a->p + b * a->spb + f * a->spf;
            const real xv = a->x[b * a->sxb + f * a->sxf], shift = pe[3 * K * spp];
            const real xin = inverse ? wrap(xv - shift) : wrap(xv);
            int i;
            const bin_t bn = prepare(pe, spp, K, (real)PI, 1, inverse, xin, &tb, &i,
                                     a->sv ? a->sv + e * SAVED(K) : 0);
            real out, L;
            rq_eval(xin, &bn, inverse, &out, &L);
            a->y[e] = inverse ? wrap_io(out) : wrap_io(out + shift);
            a->ld[e] = inverse ? -L : L;
        }
    }
}

static void circular_backward_rows(const args_t *a, int64_t b0, int64_t b1, int thread) {
    (void)thread;
    const int K = a->K, inverse = a->inverse;
    const int64_t F = a->F, P = 3 * (int64_t)K + 1; /* every gradient entry is written */
    for (int64_t b = b0; b < b1; b++) {
        for (int64_t f = 0; f < F; f++) {
            const int64_t e = b * F + f;
            const real g_out = a->gy ? a->gy[b * a->sgb + f * a->sgd] : (real)0;
            const real g_ld = a->gld ? a->gld[b * a->sgl + f * a->sgd] : (real)0;
            io *ge = a->gp + e * P;
            const real a_xin = element_grad(K, (real)PI, 1, inverse, a->sv + e * SAVED(K), g_out,
                                            inverse ? -g_ld : g_ld, ge);
            a->gx[e] = (io)a_xin;                   /* wrap has derivative 1 */
            ge[3 * K] = (io)(inverse ? -a_xin : g_out); /* the shift */
        }
    }
}

static void bounded_forward_rows(const args_t *a, int64_t b0, int64_t b1, int thread) {
    (void)thread;
    const int K = a->K, inverse = a->inverse;
    const int64_t F = a->F;
    const real bound = a->bound;
    table_t tb;
    for (int64_t b = b0; b < b1; b++) {
        for (int64_t f = 0; f < F; f++) {
            const int64_t e = b * F + f;
            const real xv = a->x[b * a->sxb + f * a->sxf];
            if (!(xv >= -bound && xv <= bound)) { /* identity tails (and NaN) */
                a->y[e] = (io)xv;
                a->ld[e] = 0;
                if (a->sv) a->sv[e * SAVED(K)] = -1; /* no bin: identity */
                continue;
            }
            int i;
            const bin_t bn = prepare(a->p + b * a->spb + f * a->spf, a->spp, K, bound, 0, inverse,
                                     xv, &tb, &i, a->sv ? a->sv + e * SAVED(K) : 0);
            real out, L;
            rq_eval(xv, &bn, inverse, &out, &L);
            a->y[e] = (io)out;
            a->ld[e] = (io)(inverse ? -L : L);
        }
    }
}

static void bounded_backward_rows(const args_t *a, int64_t b0, int64_t b1, int thread) {
    (void)thread;
    const int K = a->K, inverse = a->inverse;
    const int64_t F = a->F, P = 3 * (int64_t)K - 1;
    for (int64_t b = b0; b < b1; b++) {
        for (int64_t f = 0; f < F; f++) {
            const int64_t e = b * F + f;
            const real g_out = a->gy ? a->gy[b * a->sgb + f * a->sgd] : (real)0;
            const real g_ld = a->gld ? a->gld[b * a->sgl + f * a->sgd] : (real)0;
            const real *se = a->sv + e * SAVED(K);
            if (se[0] < (real)0) { /* a tail: the identity, no parameter gradient */
                a->gx[e] = (io)g_out;
                memset(a->gp + e * P, 0, sizeof(io) * P);
                continue;
            }
            a->gx[e] = (io)element_grad(K, a->bound, 0, inverse, se, g_out, inverse ? -g_ld : g_ld,
                                        a->gp + e * P);
        }
    }
}

/* tanh, its derivative and exp of the affine features, LIN_CHUNK at a time in loops without
 * calls or branches (vectorised; AVX2 clone where the CPU has it): with q = e^-2|v|,
 * tanh(v) = sign(v) (1 - q) / (1 + q) and 1 - tanh^2 = 4 q / (1 + q)^2 (exact where tanh
 * rounds to 1); e^c = 1 / e^-|c| for c > 0; all from exp_nonpos (double for both dtypes;
 * absolute errors ~1e-16, what the log-scale and the log-det need). Arguments are clamped
 * to exp_nonpos's range (tanh is +-1 there to double precision; a log-scale beyond 708
 * would overflow anyway); NaN stays NaN. */
#define LIN_CHUNK 64
VECTOR_CLONES static void affine_scales(int n, const real *raw, const real *bound, int inverse,
                                        real *th, real *dth, real *e) {
    const real sign = inverse ? (real)-1 : (real)1;
    for (int i = 0; i < n; i++) {
        const real v = raw[i];
        real x2 = (real)2 * fabs(v);
        x2 = x2 > (real)708 ? (real)708 : x2;
        const real q = exp_nonpos(-x2);
        const real r = (real)1 / ((real)1 + q), t = copysign(((real)1 - q) * r, v);
        const real c = sign * bound[i] * t; /* the exponent: s forward, -s inverse */
        real ac = fabs(c);
        ac = ac > (real)708 ? (real)708 : ac;
        const real m = exp_nonpos(-ac), inv = (real)1 / m; /* both: no branch */
        th[i] = t;
        dth[i] = (real)4 * q * r * r;
        e[i] = c > (real)0 ? inv : m;
    }
}

/* one chunk of a row's affine features: raw log-scales and bounds gathered, tanh (dth its
 * derivative) and exp */
static inline int affine_chunk(const args_t *a, const io *pr, int64_t j0, real *bnd, real *th,
                               real *dth, real *e) {
    const int n = (int)(a->n_lin - j0 < LIN_CHUNK ? a->n_lin - j0 : LIN_CHUNK);
    real raw[LIN_CHUNK];
    for (int i = 0; i < n; i++) {
        raw[i] = (real)pr[2 * (j0 + i) * a->spp];
        bnd[i] = (real)a->sb[(j0 + i) * a->sa];
    }
    affine_scales(n, raw, bnd, a->inverse, th, dth, e);
    return n;
}

/* ---- a whole affine coupling transform (coupling.AffineCoupling) in one call ----
 * z (B, D) strided (x, sxb, sxf); params (B, O) strided (spb, spp), per row [n_lin x (raw
 * log-scale, shift)] then [n_circ x circular spline (3 K + 1)]; idx_lin / idx_circ the
 * transformed features; a (n_lin, stride sa) the log-scale bounds, s = a tanh(raw).
 * Forward: out (B, D) contiguous (the untransformed features copied), logdet (B); sv
 * (B, n_circ, SAVED(K)). Backward: gout (B, D) and gld (B) strided (either may be NULL);
 * gz (B, D) and gp (B, O) contiguous; ga (threads, n_lin) per-thread sums over rows. */

static void coupling_forward_rows(const args_t *a, int64_t b0, int64_t b1, int thread) {
    (void)thread;
    const int K = a->K, inverse = a->inverse;
    const int64_t D = a->F, spo = a->spp, P = 3 * (int64_t)K + 1;
    table_t tb;
    for (int64_t b = b0; b < b1; b++) {
        const io *zr = a->x + b * a->sxb, *pr = a->p + b * a->spb;
        io *o = a->y + b * D;
        for (int64_t d = 0; d < D; d++) o[d] = zr[d * a->sxf];
        real ld = 0;
        for (int64_t j0 = 0; j0 < a->n_lin; j0 += LIN_CHUNK) {
            real bnd[LIN_CHUNK], th[LIN_CHUNK], dth[LIN_CHUNK], e[LIN_CHUNK];
            const int n = affine_chunk(a, pr, j0, bnd, th, dth, e);
            for (int i = 0; i < n; i++) {
                const int64_t j = j0 + i, d = a->idx_lin[j];
                const real s = bnd[i] * th[i], t = pr[(2 * j + 1) * spo], zv = zr[d * a->sxf];
                o[d] = inverse ? (io)((zv - t) * e[i]) : (io)(zv * e[i] + t);
                ld += inverse ? -s : s;
            }
        }
        for (int64_t j = 0; j < a->n_circ; j++) {
            const int64_t d = a->idx_circ[j];
            const io *pe = pr + (2 * a->n_lin + j * P) * spo;
            const real xv = zr[d * a->sxf], shift = pe[3 * K * spo];
            const real xin = inverse ? wrap(xv - shift) : wrap(xv);
            int i;
            const bin_t bn = prepare(pe, spo, K, (real)PI, 1, inverse, xin, &tb, &i,
                                     a->sv ? a->sv + (b * a->n_circ + j) * SAVED(K) : 0);
            real y, L;
            rq_eval(xin, &bn, inverse, &y, &L);
            o[d] = inverse ? wrap_io(y) : wrap_io(y + shift);
            ld += inverse ? -L : L;
        }
        a->ld[b] = (io)ld;
    }
}

static void coupling_backward_rows(const args_t *a, int64_t b0, int64_t b1, int thread) {
    const int K = a->K, inverse = a->inverse;
    const int64_t D = a->F, spo = a->spp, P = 3 * (int64_t)K + 1;
    const int64_t n_lin = a->n_lin, O = 2 * n_lin + a->n_circ * P;
    real *ga = a->ga + thread * n_lin; /* every entry of gp is written below */
    for (int64_t j = 0; j < n_lin; j++) ga[j] = 0;
    for (int64_t b = b0; b < b1; b++) {
        const io *zr = a->x + b * a->sxb, *pr = a->p + b * a->spb;
        io *gzr = a->gx + b * D, *gpr = a->gp + b * O;
        const real g_ld = a->gld ? (real)a->gld[b * a->sgl] : (real)0;
        for (int64_t d = 0; d < D; d++) gzr[d] = a->gy ? a->gy[b * a->sgb + d * a->sgd] : (io)0;
        for (int64_t j0 = 0; j0 < n_lin; j0 += LIN_CHUNK) {
            real bnd[LIN_CHUNK], th[LIN_CHUNK], dth[LIN_CHUNK], ex[LIN_CHUNK];
            const int n = affine_chunk(a, pr, j0, bnd, th, dth, ex);
            for (int i = 0; i < n; i++) {
                const int64_t j = j0 + i, d = a->idx_lin[j];
                const real g = a->gy ? (real)a->gy[b * a->sgb + d * a->sgd] : (real)0;
                const real t = pr[(2 * j + 1) * spo], zv = zr[d * a->sxf], e = ex[i];
                real g_s;
                gzr[d] = (io)(g * e);
                if (inverse) { /* y = (z - t) e^-s, ld = -s */
                    gpr[2 * j + 1] = (io)(-g * e);
                    g_s = -g * (zv - t) * e - g_ld;
                } else { /* y = z e^s + t, ld = s */
                    gpr[2 * j + 1] = (io)g;
                    g_s = g * zv * e + g_ld;
                }
                gpr[2 * j] = (io)(g_s * bnd[i] * dth[i]);
                ga[j] += g_s * th[i];
            }
        }
        for (int64_t j = 0; j < a->n_circ; j++) {
            const int64_t d = a->idx_circ[j];
            const real g = a->gy ? (real)a->gy[b * a->sgb + d * a->sgd] : (real)0;
            io *ge = gpr + 2 * n_lin + j * P;
            const real a_xin = element_grad(K, (real)PI, 1, inverse,
                                            a->sv + (b * a->n_circ + j) * SAVED(K), g,
                                            inverse ? -g_ld : g_ld, ge);
            gzr[d] = (io)a_xin;
            ge[3 * K] = (io)(inverse ? -a_xin : g);
        }
    }
}

/* ---- exported entry points: 0, or -1 for an unsupported number of bins ---- */

int FN(circular_forward)(int64_t B, int64_t F, int K, const io *x, int64_t sxb, int64_t sxf,
                         const io *p, int64_t spb, int64_t spf, int64_t spp, int inverse,
                         io *y, io *ld, real *sv, int n_threads) {
    if (K < 1 || K > MAX_BINS) return -1;
    const args_t a = {.rows = circular_forward_rows, .B = B, .F = F, .K = K, .inverse = inverse,
                      .x = x, .sxb = sxb, .sxf = sxf, .p = p, .spb = spb, .spf = spf, .spp = spp,
                      .y = y, .ld = ld, .sv = sv};
    return run(&a, n_threads);
}

int FN(circular_backward)(int64_t B, int64_t F, int K, const io *p, int64_t spb, int64_t spf,
                          int64_t spp, int inverse, const real *sv, const io *gy, int64_t sgb,
                          int64_t sgd, const io *gld, int64_t sgl, io *gx, io *gp,
                          int n_threads) {
    if (K < 1 || K > MAX_BINS) return -1;
    const args_t a = {.rows = circular_backward_rows, .B = B, .F = F, .K = K, .inverse = inverse,
                      .p = p, .spb = spb, .spf = spf, .spp = spp, .sv = (real *)sv, .gy = gy,
                      .sgb = sgb, .sgd = sgd, .gld = gld, .sgl = sgl, .gx = gx, .gp = gp};
    return run(&a, n_threads);
}

int FN(bounded_forward)(int64_t B, int64_t F, int K, real bound, const io *x, int64_t sxb,
                        int64_t sxf, const io *p, int64_t spb, int64_t spf, int64_t spp,
                        int inverse, io *y, io *ld, real *sv, int n_threads) {
    if (K < 1 || K > MAX_BINS) return -1;
    const args_t a = {.rows = bounded_forward_rows, .B = B, .F = F, .K = K, .inverse = inverse,
                      .bound = bound, .x = x, .sxb = sxb, .sxf = sxf, .p = p, .spb = spb,
                      .spf = spf, .spp = spp, .y = y, .ld = ld, .sv = sv};
    return run(&a, n_threads);
}

int FN(bounded_backward)(int64_t B, int64_t F, int K, real bound, const io *p, int64_t spb,
                         int64_t spf, int64_t spp, int inverse, const real *sv, const io *gy,
                         int64_t sgb, int64_t sgd, const io *gld, int64_t sgl, io *gx, io *gp,
                         int n_threads) {
    if (K < 1 || K > MAX_BINS) return -1;
    const args_t a = {.rows = bounded_backward_rows, .B = B, .F = F, .K = K, .inverse = inverse,
                      .bound = bound, .p = p, .spb = spb, .spf = spf, .spp = spp,
                      .sv = (real *)sv, .gy = gy, .sgb = sgb, .sgd = sgd, .gld = gld,
                      .sgl = sgl, .gx = gx, .gp = gp};
    return run(&a, n_threads);
}

int FN(affine_coupling_forward)(int64_t B, int64_t D, const io *z, int64_t szb, int64_t szd,
                                const io *p, int64_t spb, int64_t spo, int64_t n_lin,
                                const int64_t *idx_lin, int64_t n_circ, const int64_t *idx_circ,
                                int K, const io *sbound, int64_t sa, int inverse, io *out,
                                io *logdet, real *sv, int n_threads) {
    if (n_circ > 0 && (K < 1 || K > MAX_BINS)) return -1;
    const args_t a = {.rows = coupling_forward_rows, .B = B, .F = D, .K = K, .inverse = inverse,
                      .x = z, .sxb = szb, .sxf = szd, .p = p, .spb = spb, .spp = spo,
                      .sb = sbound, .sa = sa, .n_lin = n_lin, .idx_lin = idx_lin,
                      .n_circ = n_circ, .idx_circ = idx_circ, .y = out, .ld = logdet, .sv = sv};
    return run(&a, n_threads);
}

int FN(affine_coupling_backward)(int64_t B, int64_t D, const io *z, int64_t szb, int64_t szd,
                                 const io *p, int64_t spb, int64_t spo, int64_t n_lin,
                                 const int64_t *idx_lin, int64_t n_circ,
                                 const int64_t *idx_circ, int K, const io *sbound, int64_t sa,
                                 int inverse, const real *sv, const io *gout, int64_t sgb,
                                 int64_t sgd, const io *gld, int64_t sgl, io *gz, io *gp,
                                 real *ga, int n_threads) {
    if (n_circ > 0 && (K < 1 || K > MAX_BINS)) return -1;
    const args_t a = {.rows = coupling_backward_rows, .B = B, .F = D, .K = K, .inverse = inverse,
                      .x = z, .sxb = szb, .sxf = szd, .p = p, .spb = spb, .spp = spo,
                      .sb = sbound, .sa = sa, .n_lin = n_lin, .idx_lin = idx_lin,
                      .n_circ = n_circ, .idx_circ = idx_circ, .sv = (real *)sv, .gy = gout,
                      .sgb = sgb, .sgd = sgd, .gld = gld, .sgl = sgl, .gx = gz, .gp = gp,
                      .ga = ga};
    return run(&a, n_threads);
}
