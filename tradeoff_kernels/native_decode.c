/* One batch-1 model step of a Llama-family transformer in one call: int4 weights, fp32 activations.
 *
 * Built by tradeoff_kernels/native.py with the machine's C compiler and loaded with ctypes; it uses no Python or torch
 * headers. tradeoff_forward runs T rows (a decode step, a speculative verify of k + 1 tokens, or a prompt
 * chunk) through every layer and the head. Rows go through the weights in blocks of up to MAX_ROWS: each
 * weight group is unpacked once and used for every row of the block, so a verify step reads the weights once.
 * tradeoff_head runs the head alone, on rows normed elsewhere (a prompt prefilled by dense GEMMs gets its logits
 * from the same int8 head as every decode step).
 *
 * Weight packing (one matrix [n, k], k a multiple of 32, groups of 32 consecutive k): w = d * q + m, q in
 * 0..15, d and m fp32 per group. qs [n, k / 2] uint8 holds each group as 16 bytes in the GGUF Q4_1 order:
 * byte j of a group has element j in its low nibble and element j + 16 in its high nibble, so one widening load
 * and two ANDs (0x0f, 0xf0) give elements 0..15 and 16 * elements 16..31 (the GEMV's input rows are stored with
 * those elements divided by 16 to match: see struct rows). d and m are [n, k / 32] fp32, row-major.
 *
 * The output head is int8 instead (the GGUF's Q8_0 embedding, exactly: int4 costs the head accuracy): w = d * q,
 * q in -127..127, qs [n, k] int8 and d [n, k / 32] fp32, groups of 32 along k as above. Its rows are the
 * vocabulary, or the subset a draft model's head covers; the caller maps them back to token ids.
 *
 * KV cache: k_cache, v_cache fp32 [n_layers, n_kv_heads, cache_len, head_dim], contiguous (the engine's
 * StaticKVCache storage, whose batch dimension is 1), read and written in place. Row t of a call sits at
 * position start + t: its k/v are stored there and it attends to positions 0..start + t.
 *
 * Threads: a pool of n_threads - 1 workers plus the calling thread. A call wakes the workers once; inside,
 * the phases of a layer are separated by a spinning barrier, and each phase hands out its work units
 * (a head, a chunk of output rows, a chunk of keys) from one atomic ticket counter, so a thread that was
 * descheduled for a while delays a phase by at most one unit. After a call the workers spin for
 * IDLE_SPIN_NS (back-to-back decode steps never sleep), then sleep on a condition variable. Not OpenMP: under
 * OMP_WAIT_POLICY=PASSIVE (how tradeoff runs) a parallel region per call sleeps and wakes its threads every step
 * (measured 8% slower per decode step), and the pool needs no OpenMP runtime beside torch's. A process whose torch
 * threads spin actively (OMP_WAIT_POLICY=ACTIVE) takes the workers' core away from them: 2.5x slower steps.
 *
 * Instruction sets: AVX2 + FMA kernels (what an AVX2-only CPU such as AMD Zen 3 runs), AVX-512 GEMV kernels where
 * the compiler targets it, and plain C that compilers vectorize elsewhere.
 */

#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#ifdef __AVX2__
#include <immintrin.h>
#endif

#define GROUP 32
#define MAX_ROWS 8
#define MAX_THREADS 64
#define UNIT_GROUPS 2048      /* weight groups per GEMV work unit: ~2-5 us, far above the cost of a ticket */
#define MIN_KEY_CHUNK 64      /* keys per attention work unit, at least */
#define KEY_TILE 32           /* keys per attention tile: its K and V rows stay in L1 while every query uses them */
#define IDLE_SPIN_NS 2000000  /* how long idle workers spin before sleeping: longer than the engine's gap between steps */
#define YIELD_AFTER_NS 50000  /* a barrier wait this long means a descheduled thread: let it run */

struct q4 {
    const uint8_t *qs;
    const float *d, *m;
    int32_t n, k;
};

struct q8 {
    const int8_t *qs;
    const float *d;
    int32_t n, k;
};

struct layer {
    const float *attn_norm, *ffn_norm, *qkv_bias; /* qkv_bias may be NULL */
    struct q4 qkv, o, gate_up, down;               /* qkv rows: q heads, k heads, v heads; gate_up: gate rows, then up rows */
};

struct model {
    int32_t n_layers, dim, n_heads, n_kv_heads, head_dim, ffn_dim, vocab, max_pos; /* vocab: the head's rows */
    float eps;
    const float *norm, *rope_cos, *rope_sin; /* rope tables [max_pos, head_dim], rotate-half layout */
    const struct layer *layers;
    struct q8 head;
};

/* ---- small vector helpers ---------------------------------------------------------------------------- */

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

#ifdef __AVX2__
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* The 8 horizontal sums of a[0..7], as one vector. */
static inline __m256 hsum8(const __m256 *a) {
    __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
    __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
    t0 = _mm256_hadd_ps(t0, t1);
    t2 = _mm256_hadd_ps(t2, t3);
    return _mm256_add_ps(_mm256_permute2f128_ps(t0, t2, 0x20), _mm256_permute2f128_ps(t0, t2, 0x31));
}

/* exp(x), Cephes' single-precision polynomial (about 1 ulp); inputs are clamped so 2^n stays a normal float. */
static inline __m256 exp256(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
#endif

/* ---- int4 GEMV: y[t][n - n0] (+)= sum_k w[n][k] x[t][k] for rows n0..n1 ---------------------------------- */

/* The activation rows a GEMV reads, prepared by prepare_rows: x [T, ld] with elements 16..31 of every group of 32
 * divided by 16 (exact in floating point), so a high nibble is used as 16 q, masked but never shifted (shifts and
 * int-to-float conversions share two ports with the FMAs on Intel cores); sums [T, k / 32], each row's sum over
 * every group, of the values before that scaling. */
struct rows {
    const float *x;
    int ld;
    const float *sums;
};

static void prepare_rows(const float *src, int lds, int T, int k, float *dst, int ldd, float *sums) {
    for (int t = 0; t < T; t++)
        for (int g = 0; g < k / GROUP; g++) {
            const float *s = src + t * lds + GROUP * g;
            float *d = dst + t * ldd + GROUP * g, sum;
#ifdef __AVX2__
            const __m256 v0 = _mm256_loadu_ps(s), v1 = _mm256_loadu_ps(s + 8), v2 = _mm256_loadu_ps(s + 16),
                         v3 = _mm256_loadu_ps(s + 24), sixteenth = _mm256_set1_ps(1.0f / 16);
            sum = hsum(_mm256_add_ps(_mm256_add_ps(v0, v1), _mm256_add_ps(v2, v3)));
            _mm256_storeu_ps(d, v0);
            _mm256_storeu_ps(d + 8, v1);
            _mm256_storeu_ps(d + 16, _mm256_mul_ps(v2, sixteenth));
            _mm256_storeu_ps(d + 24, _mm256_mul_ps(v3, sixteenth));
#else
            sum = 0;
            for (int i = 0; i < GROUP; i++) {
                sum += s[i];
                d[i] = i < GROUP / 2 ? s[i] : s[i] * (1.0f / 16);
            }
#endif
            sums[t * (k / GROUP) + g] = sum;
        }
}

#ifdef __AVX2__
/* One group's q as 4 x 8 floats: elements 0-7, 8-15 as q, 16-23, 24-31 as 16 q. Bytes 0..7 and 8..15 are
 * widened to 32 bits; their low nibbles are elements 0..15, their high nibbles 16..31. */
static inline __attribute__((always_inline)) void unpack_group(const uint8_t *qs, __m256 *q) {
    const __m256i low = _mm256_set1_epi32(0x0f), high = _mm256_set1_epi32(0xf0);
    const __m256i b0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)qs));
    const __m256i b1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(qs + 8)));
    q[0] = _mm256_cvtepi32_ps(_mm256_and_si256(b0, low));
    q[1] = _mm256_cvtepi32_ps(_mm256_and_si256(b1, low));
    q[2] = _mm256_cvtepi32_ps(_mm256_and_si256(b0, high));
    q[3] = _mm256_cvtepi32_ps(_mm256_and_si256(b1, high));
}

static inline float dot(const float *a, const float *b, int n) {
    __m256 acc = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float s = hsum(acc);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

#define FEW_ROWS 3

/* Two kernels for one weight row against T activation rows (AVX-512 and AVX2 versions below):
 * - row_dot_few, 1-3 rows: sum_g d_g (q_g . x_g) + sum_g m_g sums_g. One FMA per group and row applies d, and m
 *   costs a short dot product per row at the end: 5 FMAs (AVX2) per group and row instead of 4 + 4 for
 *   dequantizing first. Two accumulators per row (even and odd groups): the FMA latency exceeds a group's work.
 * - row_dot_many, 4+ rows: dequantize each group once (w = d q + m, or 16 w for the high half, whose x is divided
 *   by 16), then 4 FMAs per row; 1-2 accumulators per row keep enough independent FMA chains in flight. */

#ifdef __AVX512F__
/* 16 lanes: one widening load gives a whole group, low nibbles elements 0..15 and high nibbles (as 16 q) 16..31.
 * Measured on a Sapphire Rapids core: 20-30% less time per group than the AVX2 kernels below (a decode step 16%,
 * a verify step of 4-8 rows 27% faster). */
static inline __attribute__((always_inline)) void unpack_group16(const uint8_t *qs, __m512 *q) {
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)qs));
    q[0] = _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(0x0f)));
    q[1] = _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(0xf0)));
}

static inline __attribute__((always_inline)) void group_few(const uint8_t *qs, const float *d, int g, const struct rows *a,
                                                            const int T, __m512 *acc) {
    __m512 q[2];
    unpack_group16(qs + 16 * g, q);
    const __m512 dd = _mm512_set1_ps(d[g]);
    for (int t = 0; t < T; t++) {
        const float *xg = a->x + t * a->ld + GROUP * g;
        const __m512 s = _mm512_fmadd_ps(q[1], _mm512_loadu_ps(xg + 16), _mm512_mul_ps(q[0], _mm512_loadu_ps(xg)));
        acc[t] = _mm512_fmadd_ps(dd, s, acc[t]);
    }
}

static inline __attribute__((always_inline)) void row_dot_few(const uint8_t *qs, const float *d, const float *m, int groups,
                                                              const struct rows *a, const int T, float *out) {
    __m512 even[FEW_ROWS], odd[FEW_ROWS];
    for (int t = 0; t < T; t++) even[t] = odd[t] = _mm512_setzero_ps();
    int g = 0;
    for (; g + 2 <= groups; g += 2) {
        group_few(qs, d, g, a, T, even);
        group_few(qs, d, g + 1, a, T, odd);
    }
    if (g < groups) group_few(qs, d, g, a, T, even);
    for (int t = 0; t < T; t++) out[t] = _mm512_reduce_add_ps(_mm512_add_ps(even[t], odd[t])) + dot(m, a->sums + t * groups, groups);
}

static inline __attribute__((always_inline)) void row_dot_many(const uint8_t *qs, const float *d, const float *m, int groups,
                                                               const struct rows *a, const int T, float *out) {
    const int na = T <= 4 ? 2 : 1;
    __m512 acc[MAX_ROWS][2];
    for (int t = 0; t < T; t++) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
    for (int g = 0; g < groups; g++) {
        __m512 w[2];
        unpack_group16(qs + 16 * g, w);
        const __m512 dd = _mm512_set1_ps(d[g]), mm = _mm512_set1_ps(m[g]);
        w[0] = _mm512_fmadd_ps(w[0], dd, mm);
        w[1] = _mm512_fmadd_ps(w[1], dd, _mm512_mul_ps(mm, _mm512_set1_ps(16)));
        for (int t = 0; t < T; t++) {
            const float *xg = a->x + t * a->ld + GROUP * g;
            for (int i = 0; i < 2; i++) acc[t][i % na] = _mm512_fmadd_ps(w[i], _mm512_loadu_ps(xg + 16 * i), acc[t][i % na]);
        }
    }
    for (int t = 0; t < T; t++) out[t] = _mm512_reduce_add_ps(_mm512_add_ps(acc[t][0], acc[t][1]));
}
#else
static inline __attribute__((always_inline)) void group_few(const uint8_t *qs, const float *d, int g, const struct rows *a,
                                                            const int T, __m256 *acc) {
    __m256 q[4];
    unpack_group(qs + 16 * g, q);
    const __m256 dd = _mm256_broadcast_ss(d + g);
    for (int t = 0; t < T; t++) {
        const float *xg = a->x + t * a->ld + GROUP * g;
        __m256 s = _mm256_mul_ps(q[0], _mm256_loadu_ps(xg));
        s = _mm256_fmadd_ps(q[1], _mm256_loadu_ps(xg + 8), s);
        s = _mm256_fmadd_ps(q[2], _mm256_loadu_ps(xg + 16), s);
        s = _mm256_fmadd_ps(q[3], _mm256_loadu_ps(xg + 24), s);
        acc[t] = _mm256_fmadd_ps(dd, s, acc[t]);
    }
}

static inline __attribute__((always_inline)) void row_dot_few(const uint8_t *qs, const float *d, const float *m, int groups,
                                                              const struct rows *a, const int T, float *out) {
    __m256 even[FEW_ROWS], odd[FEW_ROWS];
    for (int t = 0; t < T; t++) even[t] = odd[t] = _mm256_setzero_ps();
    int g = 0;
    for (; g + 2 <= groups; g += 2) {
        group_few(qs, d, g, a, T, even);
        group_few(qs, d, g + 1, a, T, odd);
    }
    if (g < groups) group_few(qs, d, g, a, T, even);
    for (int t = 0; t < T; t++) out[t] = hsum(_mm256_add_ps(even[t], odd[t])) + dot(m, a->sums + t * groups, groups);
}

static inline __attribute__((always_inline)) void row_dot_many(const uint8_t *qs, const float *d, const float *m, int groups,
                                                               const struct rows *a, const int T, float *out) {
    const int na = T <= 4 ? 2 : 1;
    __m256 acc[MAX_ROWS][2];
    for (int t = 0; t < T; t++) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
    for (int g = 0; g < groups; g++) {
        __m256 w[4];
        unpack_group(qs + 16 * g, w);
        const __m256 dd = _mm256_broadcast_ss(d + g), mm = _mm256_broadcast_ss(m + g);
        const __m256 mm16 = _mm256_mul_ps(mm, _mm256_set1_ps(16));
        for (int i = 0; i < 4; i++) w[i] = _mm256_fmadd_ps(w[i], dd, i < 2 ? mm : mm16);
        for (int t = 0; t < T; t++) {
            const float *xg = a->x + t * a->ld + GROUP * g;
            for (int i = 0; i < 4; i++) acc[t][i % na] = _mm256_fmadd_ps(w[i], _mm256_loadu_ps(xg + 8 * i), acc[t][i % na]);
        }
    }
    for (int t = 0; t < T; t++) out[t] = hsum(_mm256_add_ps(acc[t][0], acc[t][1]));
}
#endif

#define ROW_DOT(qs, d, m, groups, a, T, out) \
    ((T) <= FEW_ROWS ? row_dot_few(qs, d, m, groups, a, T, out) : row_dot_many(qs, d, m, groups, a, T, out))
#else
/* Plain C: per-lane accumulators keep the loops vectorizable without reassociating floating-point sums. */
static inline __attribute__((always_inline)) void row_dot(const uint8_t *qs, const float *d, const float *m, int groups,
                                                          const struct rows *a, const int T, float *out) {
    float acc[MAX_ROWS][GROUP];
    memset(acc, 0, sizeof acc);
    for (int g = 0; g < groups; g++) {
        float w[GROUP];
        for (int j = 0; j < GROUP / 2; j++) {
            w[j] = (float)(qs[16 * g + j] & 15) * d[g] + m[g];
            w[j + GROUP / 2] = (float)(qs[16 * g + j] & 0xf0) * d[g] + 16 * m[g]; /* 16 w: its x is divided by 16 */
        }
        for (int t = 0; t < T; t++)
            for (int j = 0; j < GROUP; j++) acc[t][j] += w[j] * a->x[t * a->ld + GROUP * g + j];
    }
    for (int t = 0; t < T; t++) {
        float s = 0;
        for (int j = 0; j < GROUP; j++) s += acc[t][j];
        out[t] = s;
    }
}
#define ROW_DOT row_dot
#endif

/* Software prefetch of the row PREFETCH_ROWS ahead (its qs, d and m): the hardware prefetchers stop at page
 * boundaries, and at T = 1 the kernel would wait on those misses (measured: ~10% faster decode steps). */
#define PREFETCH_ROWS 4
static inline void prefetch_row(const struct q4 *w, int n) {
    const int groups = w->k / GROUP;
    const char *qs = (const char *)(w->qs + (int64_t)n * (w->k / 2));
    for (int i = 0; i < w->k / 2; i += 64) __builtin_prefetch(qs + i);
    __builtin_prefetch(w->d + (int64_t)n * groups);
    __builtin_prefetch(w->m + (int64_t)n * groups);
}

/* One function per row count, so each kernel's loops over rows unroll and its accumulators stay in registers. */
#define DEFINE_GEMV(TT)                                                                                            \
    static void gemv_##TT(const struct q4 *w, int n0, int n1, const struct rows *a, float *y, int ldy, int add) {  \
        const int groups = w->k / GROUP;                                                                           \
        for (int n = n0; n < n1; n++) {                                                                            \
            float r[MAX_ROWS];                                                                                     \
            if (n + PREFETCH_ROWS < n1) prefetch_row(w, n + PREFETCH_ROWS);                                        \
            ROW_DOT(w->qs + (int64_t)n * (w->k / 2), w->d + (int64_t)n * groups, w->m + (int64_t)n * groups, groups, \
                    a, TT, r);                                                                                     \
            for (int t = 0; t < TT; t++) y[t * ldy + n - n0] = add ? y[t * ldy + n - n0] + r[t] : r[t];            \
        }                                                                                                          \
    }
DEFINE_GEMV(1)
DEFINE_GEMV(2)
DEFINE_GEMV(3)
DEFINE_GEMV(4)
DEFINE_GEMV(5)
DEFINE_GEMV(6)
DEFINE_GEMV(7)
DEFINE_GEMV(8)

/* T (1..MAX_ROWS) activation rows through rows n0..n1 of w into y [T, ldy] (offset to row n0); add: y +=. */
static void gemv(const struct q4 *w, int n0, int n1, const struct rows *a, int T, float *y, int ldy, int add) {
    static void (*const by_rows[MAX_ROWS])(const struct q4 *, int, int, const struct rows *, float *, int, int) = {
        gemv_1, gemv_2, gemv_3, gemv_4, gemv_5, gemv_6, gemv_7, gemv_8};
    by_rows[T - 1](w, n0, n1, a, y, ldy, add);
}

/* ---- int8 GEMV (the head): y[t][n - n0] = sum_k w[n][k] x[t][k] for rows n0..n1 --------------------------- */

/* x [T, ldx] are the normed rows as they are (no scaling: there are no nibbles). The kernels mirror the int4 ones:
 * 1-3 rows take d out of the group's dot product (one FMA per group and row), 4+ rows scale the group once. */
#ifdef __AVX2__
#ifdef __AVX512F__
/* 16 lanes: a group is two sign-extending loads of 16 codes. Measured on a Sapphire Rapids-class Xeon against the AVX2
 * kernels below, the default model's head and one layer, 2 threads: 10% less time at 1 row, 25% at 8. */
static inline __attribute__((always_inline)) void unpack_q8_16(const int8_t *qs, __m512 *q) {
    q[0] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)qs)));
    q[1] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(qs + 16))));
}

static inline __attribute__((always_inline)) void group8_few(const int8_t *qs, const float *d, int g, const float *x, int ldx,
                                                             const int T, __m512 *acc) {
    __m512 q[2];
    unpack_q8_16(qs + GROUP * g, q);
    const __m512 dd = _mm512_set1_ps(d[g]);
    for (int t = 0; t < T; t++) {
        const float *xg = x + t * ldx + GROUP * g;
        const __m512 s = _mm512_fmadd_ps(q[1], _mm512_loadu_ps(xg + 16), _mm512_mul_ps(q[0], _mm512_loadu_ps(xg)));
        acc[t] = _mm512_fmadd_ps(dd, s, acc[t]);
    }
}

static inline __attribute__((always_inline)) void row_dot8_few(const int8_t *qs, const float *d, int groups, const float *x,
                                                               int ldx, const int T, float *out) {
    __m512 even[FEW_ROWS], odd[FEW_ROWS];
    for (int t = 0; t < T; t++) even[t] = odd[t] = _mm512_setzero_ps();
    int g = 0;
    for (; g + 2 <= groups; g += 2) {
        group8_few(qs, d, g, x, ldx, T, even);
        group8_few(qs, d, g + 1, x, ldx, T, odd);
    }
    if (g < groups) group8_few(qs, d, g, x, ldx, T, even);
    for (int t = 0; t < T; t++) out[t] = _mm512_reduce_add_ps(_mm512_add_ps(even[t], odd[t]));
}

static inline __attribute__((always_inline)) void row_dot8_many(const int8_t *qs, const float *d, int groups, const float *x,
                                                                int ldx, const int T, float *out) {
    const int na = T <= 4 ? 2 : 1;
    __m512 acc[MAX_ROWS][2];
    for (int t = 0; t < T; t++) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
    for (int g = 0; g < groups; g++) {
        __m512 w[2];
        unpack_q8_16(qs + GROUP * g, w);
        const __m512 dd = _mm512_set1_ps(d[g]);
        w[0] = _mm512_mul_ps(w[0], dd);
        w[1] = _mm512_mul_ps(w[1], dd);
        for (int t = 0; t < T; t++) {
            const float *xg = x + t * ldx + GROUP * g;
            for (int i = 0; i < 2; i++) acc[t][i % na] = _mm512_fmadd_ps(w[i], _mm512_loadu_ps(xg + 16 * i), acc[t][i % na]);
        }
    }
    for (int t = 0; t < T; t++) out[t] = _mm512_reduce_add_ps(_mm512_add_ps(acc[t][0], acc[t][1]));
}
#else
/* 8 lanes: a group is four sign-extending loads of 8 codes (each folds into one vpmovsxbd). */
static inline __attribute__((always_inline)) void unpack_q8(const int8_t *qs, __m256 *q) {
    for (int i = 0; i < 4; i++) q[i] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(qs + 8 * i))));
}

static inline __attribute__((always_inline)) void group8_few(const int8_t *qs, const float *d, int g, const float *x, int ldx,
                                                             const int T, __m256 *acc) {
    __m256 q[4];
    unpack_q8(qs + GROUP * g, q);
    const __m256 dd = _mm256_broadcast_ss(d + g);
    for (int t = 0; t < T; t++) {
        const float *xg = x + t * ldx + GROUP * g;
        __m256 s = _mm256_mul_ps(q[0], _mm256_loadu_ps(xg));
        s = _mm256_fmadd_ps(q[1], _mm256_loadu_ps(xg + 8), s);
        s = _mm256_fmadd_ps(q[2], _mm256_loadu_ps(xg + 16), s);
        s = _mm256_fmadd_ps(q[3], _mm256_loadu_ps(xg + 24), s);
        acc[t] = _mm256_fmadd_ps(dd, s, acc[t]);
    }
}

static inline __attribute__((always_inline)) void row_dot8_few(const int8_t *qs, const float *d, int groups, const float *x,
                                                               int ldx, const int T, float *out) {
    __m256 even[FEW_ROWS], odd[FEW_ROWS];
    for (int t = 0; t < T; t++) even[t] = odd[t] = _mm256_setzero_ps();
    int g = 0;
    for (; g + 2 <= groups; g += 2) {
        group8_few(qs, d, g, x, ldx, T, even);
        group8_few(qs, d, g + 1, x, ldx, T, odd);
    }
    if (g < groups) group8_few(qs, d, g, x, ldx, T, even);
    for (int t = 0; t < T; t++) out[t] = hsum(_mm256_add_ps(even[t], odd[t]));
}

static inline __attribute__((always_inline)) void row_dot8_many(const int8_t *qs, const float *d, int groups, const float *x,
                                                                int ldx, const int T, float *out) {
    const int na = T <= 4 ? 2 : 1;
    __m256 acc[MAX_ROWS][2];
    for (int t = 0; t < T; t++) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
    for (int g = 0; g < groups; g++) {
        __m256 w[4];
        unpack_q8(qs + GROUP * g, w);
        const __m256 dd = _mm256_broadcast_ss(d + g);
        for (int i = 0; i < 4; i++) w[i] = _mm256_mul_ps(w[i], dd);
        for (int t = 0; t < T; t++) {
            const float *xg = x + t * ldx + GROUP * g;
            for (int i = 0; i < 4; i++) acc[t][i % na] = _mm256_fmadd_ps(w[i], _mm256_loadu_ps(xg + 8 * i), acc[t][i % na]);
        }
    }
    for (int t = 0; t < T; t++) out[t] = hsum(_mm256_add_ps(acc[t][0], acc[t][1]));
}
#endif

#define ROW_DOT8(qs, d, groups, x, ldx, T, out) \
    ((T) <= FEW_ROWS ? row_dot8_few(qs, d, groups, x, ldx, T, out) : row_dot8_many(qs, d, groups, x, ldx, T, out))
#else
static inline __attribute__((always_inline)) void row_dot8(const int8_t *qs, const float *d, int groups, const float *x, int ldx,
                                                           const int T, float *out) {
    float acc[MAX_ROWS][GROUP];
    memset(acc, 0, sizeof acc);
    for (int g = 0; g < groups; g++) {
        float w[GROUP];
        for (int j = 0; j < GROUP; j++) w[j] = (float)qs[GROUP * g + j] * d[g];
        for (int t = 0; t < T; t++)
            for (int j = 0; j < GROUP; j++) acc[t][j] += w[j] * x[t * ldx + GROUP * g + j];
    }
    for (int t = 0; t < T; t++) {
        float s = 0;
        for (int j = 0; j < GROUP; j++) s += acc[t][j];
        out[t] = s;
    }
}
#define ROW_DOT8 row_dot8
#endif

/* No software prefetch here, unlike the int4 GEMV: measured on the default model (its head after all 30 layers, and
 * after one), AVX2 and AVX-512, 1-8 rows, prefetching 4, 8 or 16 rows ahead made no difference beyond the noise. */
#define DEFINE_GEMV8(TT)                                                                                             \
    static void gemv8_##TT(const struct q8 *w, int n0, int n1, const float *x, int ldx, float *y, int ldy) {        \
        const int groups = w->k / GROUP;                                                                             \
        for (int n = n0; n < n1; n++) {                                                                              \
            float r[MAX_ROWS];                                                                                       \
            ROW_DOT8(w->qs + (int64_t)n * w->k, w->d + (int64_t)n * groups, groups, x, ldx, TT, r);                  \
            for (int t = 0; t < TT; t++) y[t * ldy + n - n0] = r[t];                                                 \
        }                                                                                                            \
    }
DEFINE_GEMV8(1)
DEFINE_GEMV8(2)
DEFINE_GEMV8(3)
DEFINE_GEMV8(4)
DEFINE_GEMV8(5)
DEFINE_GEMV8(6)
DEFINE_GEMV8(7)
DEFINE_GEMV8(8)

/* T (1..MAX_ROWS) rows x [T, ldx] through rows n0..n1 of the int8 matrix w into y [T, ldy] (offset to row n0). */
static void gemv8(const struct q8 *w, int n0, int n1, const float *x, int ldx, int T, float *y, int ldy) {
    static void (*const by_rows[MAX_ROWS])(const struct q8 *, int, int, const float *, int, float *, int) = {
        gemv8_1, gemv8_2, gemv8_3, gemv8_4, gemv8_5, gemv8_6, gemv8_7, gemv8_8};
    by_rows[T - 1](w, n0, n1, x, ldx, y, ldy);
}

/* ---- per-row pieces -------------------------------------------------------------------------------------- */

static void rms_norm(const float *x, const float *w, int n, float eps, float *out) {
    float ss = 0;
#ifdef __AVX2__
    int i = 0;
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(x + i), acc);
    ss = hsum(acc);
    for (; i < n; i++) ss += x[i] * x[i];
#else
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
#endif
    const float inv = 1.0f / sqrtf(ss / n + eps);
    for (int i = 0; i < n; i++) out[i] = x[i] * inv * w[i];
}

/* Rotate-half RoPE of one head in place: pairs (j, j + D/2), angles from the tables' row for this position. */
static void rope(float *x, const float *cos, const float *sin, int D) {
    const int half = D / 2;
    for (int j = 0; j < half; j++) {
        const float a = x[j], b = x[j + half];
        x[j] = a * cos[j] - b * sin[j];
        x[j + half] = b * cos[j + half] + a * sin[j + half];
    }
}

/* max(mx, s[0..n)) */
static float max_of(const float *s, int n, float mx) {
    int j = 0;
#ifdef __AVX2__
    if (n >= 8) { /* vector max: a scalar one is a chain of dependent compares */
        __m256 v = _mm256_set1_ps(mx);
        for (; j + 8 <= n; j += 8) v = _mm256_max_ps(v, _mm256_loadu_ps(s + j));
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        mx = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
    }
#endif
    for (; j < n; j++) mx = s[j] > mx ? s[j] : mx;
    return mx;
}

/* s[j] = exp(s[j] - mx) for j < n; returns their sum. */
static float exp_sum(float *s, int n, float mx) {
    float sum = 0;
    int j = 0;
#ifdef __AVX2__
    __m256 acc = _mm256_setzero_ps(), vmx = _mm256_set1_ps(mx);
    for (; j + 8 <= n; j += 8) {
        __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + j), vmx));
        _mm256_storeu_ps(s + j, e);
        acc = _mm256_add_ps(acc, e);
    }
    sum = hsum(acc);
#endif
    for (; j < n; j++) sum += (s[j] = expf(s[j] - mx));
    return sum;
}

/* h[j] = silu(g[j]) * u[j] */
static void silu_mul(const float *g, const float *u, int n, float *h) {
    int j = 0;
#ifdef __AVX2__
    for (; j + 8 <= n; j += 8) {
        __m256 gv = _mm256_loadu_ps(g + j);
        __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), gv));
        __m256 s = _mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
        _mm256_storeu_ps(h + j, _mm256_mul_ps(s, _mm256_loadu_ps(u + j)));
    }
#endif
    for (; j < n; j++) h[j] = g[j] / (1.0f + expf(-g[j])) * u[j];
}

/* s[j] = scale * (q . K[j]) for n keys of D floats (D a multiple of 8 on AVX2). */
static void dot_keys(const float *q, const float *K, int n, int D, float scale, float *s) {
    int j = 0;
#ifdef __AVX2__
    if (D % 8 == 0) {
        for (; j + 8 <= n; j += 8) {
            __m256 a[8];
            for (int r = 0; r < 8; r++) a[r] = _mm256_setzero_ps();
            for (int i = 0; i < D; i += 8) {
                const __m256 qv = _mm256_loadu_ps(q + i);
                for (int r = 0; r < 8; r++) a[r] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(K + (int64_t)(j + r) * D + i), a[r]);
            }
            _mm256_storeu_ps(s + j, _mm256_mul_ps(hsum8(a), _mm256_set1_ps(scale)));
        }
    }
#endif
    for (; j < n; j++) {
        float acc = 0;
        for (int i = 0; i < D; i++) acc += q[i] * K[(int64_t)j * D + i];
        s[j] = scale * acc;
    }
}

/* acc[0..D) = rescale * acc + sum_j p[j] V[j] over n rows of D floats. */
static void accumulate_rows(const float *p, const float *V, int n, int D, float rescale, float *acc) {
    int i = 0;
#ifdef __AVX2__
    for (; i + 64 <= D; i += 64) { /* 8 independent FMA chains */
        __m256 a[8];
        for (int c = 0; c < 8; c++) a[c] = _mm256_mul_ps(_mm256_loadu_ps(acc + i + 8 * c), _mm256_set1_ps(rescale));
        for (int j = 0; j < n; j++) {
            const __m256 pj = _mm256_broadcast_ss(p + j);
            for (int c = 0; c < 8; c++) a[c] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(V + (int64_t)j * D + i + 8 * c), a[c]);
        }
        for (int c = 0; c < 8; c++) _mm256_storeu_ps(acc + i + 8 * c, a[c]);
    }
#endif
    for (; i < D; i++) {
        float a = acc[i] * rescale;
        for (int j = 0; j < n; j++) a += p[j] * V[(int64_t)j * D + i];
        acc[i] = a;
    }
}

/* ---- thread pool: barrier, work tickets, wake-up ---------------------------------------------------------- */

static struct {
    int n;                         /* threads, the caller included */
    pthread_t threads[MAX_THREADS];
    atomic_int work;               /* bumped once per call: workers start the step */
    int work_at_start;             /* its value when the workers were created */
    atomic_int sleepers;
    atomic_int quit;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    _Alignas(64) atomic_int bar_count;
    atomic_int bar_gen;
    _Alignas(64) atomic_long tickets;
} pool = {.n = 1, .mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};

static pthread_mutex_t call_lock = PTHREAD_MUTEX_INITIALIZER; /* one step at a time: the pool and workspace are shared */

static void barrier(void) {
    if (pool.n == 1) return;
    const int gen = atomic_load_explicit(&pool.bar_gen, memory_order_acquire);
    if (atomic_fetch_add_explicit(&pool.bar_count, 1, memory_order_acq_rel) == pool.n - 1) {
        atomic_store_explicit(&pool.bar_count, 0, memory_order_relaxed);
        atomic_store_explicit(&pool.bar_gen, gen + 1, memory_order_release);
        return;
    }
    int64_t since = 0;
    for (unsigned spins = 1; atomic_load_explicit(&pool.bar_gen, memory_order_acquire) == gen; spins++) {
        cpu_relax();
        if (spins % 1024 == 0) {
            const int64_t t = now_ns();
            if (!since) since = t;
            else if (t - since > YIELD_AFTER_NS) sched_yield();
        }
    }
}

/* Work units come from one counter that only grows during a step. Every thread runs the same sequence of
 * phases, so each knows where a phase's tickets start (base); a ticket drawn past the end of a phase is kept
 * for the phase it belongs to, so no ticket is lost and no counter needs resetting between phases. */
struct cursor {
    long ticket, base;
};

static inline long unit_of(struct cursor *c, long n_units) {
    if (c->ticket < c->base + n_units) return c->ticket - c->base;
    c->base += n_units;
    return -1;
}

static inline void draw(struct cursor *c) { c->ticket = atomic_fetch_add_explicit(&pool.tickets, 1, memory_order_relaxed); }

#define FOR_EACH_UNIT(u, cur, n_units) for (long u; (u = unit_of(cur, n_units)) >= 0; draw(cur))

/* ---- the step ------------------------------------------------------------------------------------------ */

struct job {
    const struct model *m;
    const float *x;
    int T, start, cache_len, n_logit_rows;
    float *k_cache, *v_cache, *logits;
    int head_only; /* x are T final-normed rows; logits [T, vocab] are the head's, and no layer runs */
};
static struct job job; /* the current call's arguments, set before the workers are released */

/* Scratch memory, grown when a call needs more: buffers all threads share, and each thread's own. */
struct scratch {
    float *xn;     /* [MAX_ROWS, ldxn]: the rows the next GEMV reads (normed, attention output or silu(gate) * up) */
    float *sums;   /* [MAX_ROWS, ldxn / 32]: their group sums */
    float *scores; /* [KEY_TILE] */
    float *tmp;    /* [2, MAX_ROWS, gate_up rows per unit] */
};
static struct {
    size_t bytes;
    void *mem;
    float *x, *qkv, *att, *h, *part; /* residual stream, qkv, attention output, silu(gate) * up, partial softmaxes */
    int ldxn;
    struct scratch own[MAX_THREADS];
} ws;

static int ceil_div(int a, int b) { return (a + b - 1) / b; }

/* Attention work units per kv head, at most: enough to share the heads evenly between threads. */
static int max_key_chunks(int n_kv_heads, int nth) { return ceil_div(8 * nth, n_kv_heads); }

/* Rows per GEMV work unit: about UNIT_GROUPS groups, a multiple of 8, and at least 4 units per thread. */
static int unit_rows(int k, int n_rows, int nth) {
    int units = (int)(((int64_t)n_rows * (k / GROUP) + UNIT_GROUPS - 1) / UNIT_GROUPS);
    if (units < 4 * nth) units = 4 * nth;
    return (ceil_div(n_rows, units) + 7) & ~7;
}

static void layer_step(const struct job *j, const struct layer *L, int l, int T, int pos0, int tid, int nth,
                       struct cursor *cur) {
    const struct model *m = j->m;
    const int D = m->head_dim, H = m->n_heads, KV = m->n_kv_heads, G = H / KV, dim = m->dim, ffn = m->ffn_dim;
    const int q_size = H * D, qkv_n = L->qkv.n, S = j->cache_len;
    const struct scratch *own = &ws.own[tid];
    float *xn = own->xn, *scores = own->scores;
    const int ldxn = ws.ldxn;
    const struct rows normed = {xn, ldxn, own->sums};
    float *k_layer = j->k_cache + (int64_t)l * KV * S * D, *v_layer = j->v_cache + (int64_t)l * KV * S * D;

    /* 1. norm (each thread, its own copy) -> qkv, one head per unit: + bias, RoPE, k/v into the cache */
    for (int t = 0; t < T; t++) rms_norm(ws.x + t * dim, L->attn_norm, dim, m->eps, xn + t * ldxn);
    prepare_rows(xn, ldxn, T, dim, xn, ldxn, own->sums);
    FOR_EACH_UNIT(u, cur, H + 2 * KV) {
        const int r0 = (int)u * D;
        float *y = ws.qkv + r0;
        gemv(&L->qkv, r0, r0 + D, &normed, T, y, qkv_n, 0);
        for (int t = 0; t < T; t++) {
            float *row = y + t * qkv_n;
            if (L->qkv_bias)
                for (int i = 0; i < D; i++) row[i] += L->qkv_bias[r0 + i];
            if (u < H + KV) rope(row, m->rope_cos + (int64_t)(pos0 + t) * D, m->rope_sin + (int64_t)(pos0 + t) * D, D);
            if (u >= H) {
                const int g = (int)(u < H + KV ? u - H : u - H - KV);
                float *dst = (u < H + KV ? k_layer : v_layer) + ((int64_t)g * S + pos0 + t) * D;
                memcpy(dst, row, D * sizeof(float));
            }
        }
    }
    barrier();

    /* 2. attention: units are (kv head, chunk of keys); each covers the G query heads of that kv head and all rows,
     * tile by tile (an online softmax per query), so a tile of K and V is read from memory once and from L1 by every
     * query. The partial results (max, sum, unnormalized output) are merged in step 3, or normalized here when a head
     * has one chunk. */
    const int n_keys = pos0 + T;
    int n_chunks = ceil_div(n_keys, MIN_KEY_CHUNK);
    if (n_chunks > max_key_chunks(KV, nth)) n_chunks = max_key_chunks(KV, nth);
    const int chunk = ceil_div(n_keys, n_chunks);
    const float scale = 1.0f / sqrtf((float)D);
    FOR_EACH_UNIT(u, cur, KV * n_chunks) {
        const int g = (int)u / n_chunks, k0 = (int)u % n_chunks * chunk, k1 = k0 + chunk < n_keys ? k0 + chunk : n_keys;
        const float *K = k_layer + ((int64_t)g * S + k0) * D, *V = v_layer + ((int64_t)g * S + k0) * D;
        float *parts = ws.part + (int64_t)u * G * T * (D + 2); /* [G * T][max, sum, D outputs] */
        for (int i = 0; i < G * T; i++) {
            parts[i * (D + 2)] = -INFINITY;
            memset(parts + i * (D + 2) + 1, 0, (D + 1) * sizeof(float));
        }
        for (int j0 = 0; j0 < k1 - k0; j0 += KEY_TILE) {
            /* the next tile, while this one is computed: at one row per step the keys stream from memory */
            const int next = j0 + KEY_TILE, n_next = k1 - k0 - next < KEY_TILE ? k1 - k0 - next : KEY_TILE;
            for (int i = 0; i < n_next * D; i += 16) {
                __builtin_prefetch(K + (int64_t)next * D + i);
                __builtin_prefetch(V + (int64_t)next * D + i);
            }
            for (int hq = 0; hq < G; hq++) {
                const int h = g * G + hq;
                for (int t = 0; t < T; t++) {
                    int n = pos0 + t + 1 - (k0 + j0); /* row t sees keys 0..pos0 + t */
                    n = n < KEY_TILE ? n : KEY_TILE;
                    n = n < k1 - k0 - j0 ? n : k1 - k0 - j0;
                    if (n <= 0) continue;
                    float *part = parts + (hq * T + t) * (D + 2);
                    dot_keys(ws.qkv + t * qkv_n + h * D, K + (int64_t)j0 * D, n, D, scale, scores);
                    const float mx = max_of(scores, n, part[0]);
                    const float rescale = expf(part[0] - mx); /* 0 on the first tile */
                    part[1] = part[1] * rescale + exp_sum(scores, n, mx);
                    accumulate_rows(scores, V + (int64_t)j0 * D, n, D, rescale, part + 2);
                    part[0] = mx;
                }
            }
        }
        if (n_chunks == 1)
            for (int hq = 0; hq < G; hq++)
                for (int t = 0; t < T; t++) {
                    const float *part = parts + (hq * T + t) * (D + 2);
                    float *out = ws.att + t * q_size + (g * G + hq) * D;
                    for (int i = 0; i < D; i++) out[i] = part[2 + i] / part[1];
                }
    }
    barrier();

    /* 3. merge the chunks' partial softmaxes, one (head, row) per unit */
    if (n_chunks > 1) {
        FOR_EACH_UNIT(u, cur, H * T) {
            const int h = (int)u / T, t = (int)u % T, g = h / G, hq = h % G;
            float mx = -INFINITY, sum = 0, *out = ws.att + t * q_size + h * D;
            for (int c = 0; c < n_chunks; c++) {
                const float cm = ws.part[((int64_t)(g * n_chunks + c) * G * T + hq * T + t) * (D + 2)];
                mx = cm > mx ? cm : mx;
            }
            memset(out, 0, D * sizeof(float));
            for (int c = 0; c < n_chunks; c++) {
                const float *part = ws.part + ((int64_t)(g * n_chunks + c) * G * T + hq * T + t) * (D + 2);
                if (part[1] == 0) continue;
                const float e = expf(part[0] - mx);
                sum += e * part[1];
                for (int i = 0; i < D; i++) out[i] += e * part[2 + i];
            }
            for (int i = 0; i < D; i++) out[i] /= sum;
        }
        barrier();
    }

    /* 4. o projection + residual */
    prepare_rows(ws.att, q_size, T, q_size, xn, ldxn, own->sums);
    const int o_rows = unit_rows(L->o.k, dim, nth);
    FOR_EACH_UNIT(u, cur, ceil_div(dim, o_rows)) {
        const int n0 = (int)u * o_rows, n1 = n0 + o_rows < dim ? n0 + o_rows : dim;
        gemv(&L->o, n0, n1, &normed, T, ws.x + n0, dim, 1);
    }
    barrier();

    /* 5. norm (each thread) -> gate and up rows of the same ffn columns in one unit -> silu(gate) * up */
    for (int t = 0; t < T; t++) rms_norm(ws.x + t * dim, L->ffn_norm, dim, m->eps, xn + t * ldxn);
    prepare_rows(xn, ldxn, T, dim, xn, ldxn, own->sums);
    const int f_rows = unit_rows(L->gate_up.k, ffn, nth);
    FOR_EACH_UNIT(u, cur, ceil_div(ffn, f_rows)) {
        const int n0 = (int)u * f_rows, n1 = n0 + f_rows < ffn ? n0 + f_rows : ffn, n = n1 - n0;
        float *gate = own->tmp, *up = own->tmp + MAX_ROWS * f_rows;
        gemv(&L->gate_up, n0, n1, &normed, T, gate, n, 0);
        gemv(&L->gate_up, ffn + n0, ffn + n1, &normed, T, up, n, 0);
        for (int t = 0; t < T; t++) silu_mul(gate + t * n, up + t * n, n, ws.h + t * ffn + n0);
    }
    barrier();

    /* 6. down projection + residual */
    prepare_rows(ws.h, ffn, T, ffn, xn, ldxn, own->sums);
    const int d_rows = unit_rows(L->down.k, dim, nth);
    FOR_EACH_UNIT(u, cur, ceil_div(dim, d_rows)) {
        const int n0 = (int)u * d_rows, n1 = n0 + d_rows < dim ? n0 + d_rows : dim;
        gemv(&L->down, n0, n1, &normed, T, ws.x + n0, dim, 1);
    }
    barrier();
}

/* The head's rows n0..n1 for T (1..MAX_ROWS) normed rows x [T, ldx]: out [T, vocab], shared out in work units. */
static void head_rows(const struct model *m, const float *x, int ldx, int T, float *out, int nth, struct cursor *cur) {
    const int rows = unit_rows(m->head.k, m->vocab, nth);
    FOR_EACH_UNIT(u, cur, ceil_div(m->vocab, rows)) {
        const int n0 = (int)u * rows, n1 = n0 + rows < m->vocab ? n0 + rows : m->vocab;
        gemv8(&m->head, n0, n1, x, ldx, T, out + n0, m->vocab);
    }
    barrier(); /* before the caller returns */
}

static void run_step(int tid) {
    /* a copy: after this thread's last barrier the caller may already be setting up the next call */
    const struct job j = job;
    const struct model *m = j.m;
    const int n_rows = j.T, first_logit_row = j.T - j.n_logit_rows;
    const int nth = pool.n, dim = m->dim;
    struct cursor cur = {0, 0};
    draw(&cur);
    if (j.head_only) {
        for (int b0 = 0; b0 < n_rows; b0 += MAX_ROWS)
            head_rows(m, j.x + (int64_t)b0 * dim, dim, n_rows - b0 < MAX_ROWS ? n_rows - b0 : MAX_ROWS,
                      j.logits + (int64_t)b0 * m->vocab, nth, &cur);
        return;
    }
    for (int b0 = 0; b0 < n_rows; b0 += MAX_ROWS) {
        const int T = n_rows - b0 < MAX_ROWS ? n_rows - b0 : MAX_ROWS, pos0 = j.start + b0;
        if (tid == 0) memcpy(ws.x, j.x + (int64_t)b0 * dim, (size_t)T * dim * sizeof(float));
        barrier();
        for (int l = 0; l < m->n_layers; l++) layer_step(&j, &m->layers[l], l, T, pos0, tid, nth, &cur);
        /* final norm and head for the rows of this block that want logits */
        const int r0 = first_logit_row > b0 ? first_logit_row - b0 : 0;
        if (r0 >= T) continue;
        const struct scratch *own = &ws.own[tid];
        for (int t = r0; t < T; t++) rms_norm(ws.x + t * dim, m->norm, dim, m->eps, own->xn + (t - r0) * ws.ldxn);
        /* its barrier also keeps the next block from overwriting ws.x too soon */
        head_rows(m, own->xn, ws.ldxn, T - r0, j.logits + (int64_t)(b0 + r0 - first_logit_row) * m->vocab, nth, &cur);
    }
}

static void *worker(void *arg) {
    const int tid = (int)(intptr_t)arg;
    int seen = pool.work_at_start;
    for (;;) {
        int w = atomic_load(&pool.work);
        const int64_t t0 = now_ns();
        for (unsigned spins = 1; w == seen && !atomic_load(&pool.quit); spins++) {
            cpu_relax();
            if (spins % 256 == 0 && now_ns() - t0 < IDLE_SPIN_NS) {
                sched_yield(); /* the caller's torch ops between steps may want this core */
            } else if (spins % 256 == 0) {
                pthread_mutex_lock(&pool.mu);
                atomic_fetch_add(&pool.sleepers, 1);
                while ((w = atomic_load(&pool.work)) == seen && !atomic_load(&pool.quit)) pthread_cond_wait(&pool.cv, &pool.mu);
                atomic_fetch_sub(&pool.sleepers, 1);
                pthread_mutex_unlock(&pool.mu);
                break;
            }
            w = atomic_load(&pool.work);
        }
        if (atomic_load(&pool.quit)) return NULL;
        seen = w;
        run_step(tid);
    }
}

static void stop_pool(void) {
    if (pool.n == 1) return;
    pthread_mutex_lock(&pool.mu);
    atomic_store(&pool.quit, 1);
    pthread_cond_broadcast(&pool.cv);
    pthread_mutex_unlock(&pool.mu);
    for (int i = 1; i < pool.n; i++) pthread_join(pool.threads[i], NULL);
    atomic_store(&pool.quit, 0);
    pool.n = 1;
}

static void start_pool(int n) {
    stop_pool();
    pool.work_at_start = atomic_load(&pool.work);
    for (pool.n = 1; pool.n < n; pool.n++) /* fewer threads if the system refuses more */
        if (pthread_create(&pool.threads[pool.n], NULL, worker, (void *)(intptr_t)pool.n) != 0) break;
}

/* A forked child has none of the workers: it starts single-threaded and builds its own pool when asked. */
static void after_fork_in_child(void) {
    pool.n = 1;
    atomic_store(&pool.sleepers, 0);
    atomic_store(&pool.quit, 0);
    pthread_mutex_init(&pool.mu, NULL);
    pthread_cond_init(&pool.cv, NULL);
    pthread_mutex_init(&call_lock, NULL);
}

static void register_fork_handler(void) { pthread_atfork(NULL, NULL, after_fork_in_child); }

static int reserve_workspace(const struct model *m, int nth) {
    const int D = m->head_dim, KV = m->n_kv_heads, G = m->n_heads / KV, q_size = m->n_heads * D, qkv_n = m->layers[0].qkv.n;
    int max_k = m->dim > q_size ? m->dim : q_size;
    max_k = max_k > m->ffn_dim ? max_k : m->ffn_dim;
    ws.ldxn = max_k;
    const int f_rows = unit_rows(m->layers[0].gate_up.k, m->ffn_dim, nth);
    /* sizes in floats, each rounded up to 64 bytes so threads' buffers share no cache line */
    const size_t shared[5] = {MAX_ROWS * m->dim, MAX_ROWS * qkv_n, MAX_ROWS * q_size, MAX_ROWS * m->ffn_dim,
                              (size_t)KV * max_key_chunks(KV, nth) * G * MAX_ROWS * (D + 2)};
    const size_t own[4] = {MAX_ROWS * ws.ldxn, MAX_ROWS * (ws.ldxn / GROUP), KEY_TILE, 2 * MAX_ROWS * f_rows};
    size_t total = 0;
    for (int i = 0; i < 5; i++) total += (shared[i] + 15) & ~(size_t)15;
    for (int i = 0; i < 4; i++) total += nth * ((own[i] + 15) & ~(size_t)15);
    if (total * sizeof(float) > ws.bytes) {
        free(ws.mem);
        ws.mem = aligned_alloc(64, total * sizeof(float));
        ws.bytes = ws.mem ? total * sizeof(float) : 0;
        if (!ws.mem) return -1;
    }
    float *p = ws.mem;
    float **shared_ptr[5] = {&ws.x, &ws.qkv, &ws.att, &ws.h, &ws.part};
    for (int i = 0; i < 5; i++) {
        *shared_ptr[i] = p;
        p += (shared[i] + 15) & ~(size_t)15;
    }
    for (int t = 0; t < nth; t++) {
        float **own_ptr[4] = {&ws.own[t].xn, &ws.own[t].sums, &ws.own[t].scores, &ws.own[t].tmp};
        for (int i = 0; i < 4; i++) {
            *own_ptr[i] = p;
            p += (own[i] + 15) & ~(size_t)15;
        }
    }
    return 0;
}

/* Run `set` on the pool (the calling thread included); 0, or -2 if memory for the scratch buffers could not be had. */
static int run_job(const struct job *set, int n_threads) {
    if (n_threads < 1) n_threads = 1;
    if (n_threads > MAX_THREADS) n_threads = MAX_THREADS;
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, register_fork_handler);
    pthread_mutex_lock(&call_lock);
    if (n_threads != pool.n) start_pool(n_threads);
    int rc = reserve_workspace(set->m, pool.n);
    if (rc == 0) {
        job = *set;
        atomic_store(&pool.tickets, 0);
        atomic_fetch_add(&pool.work, 1);
        if (atomic_load(&pool.sleepers) > 0) {
            pthread_mutex_lock(&pool.mu);
            pthread_cond_broadcast(&pool.cv);
            pthread_mutex_unlock(&pool.mu);
        }
        run_step(0);
    }
    pthread_mutex_unlock(&call_lock);
    return rc == 0 ? 0 : -2;
}

/* Run T rows (embeddings x [T, dim]) at positions start..start + T - 1 through the model: their k/v go into
 * the cache, and logits [n_logit_rows, vocab] are those of the last n_logit_rows rows. Returns 0, or -1 for
 * arguments out of range, -2 if memory for the scratch buffers could not be had. */
int tradeoff_forward(const struct model *m, const float *x, int T, int start, float *k_cache, float *v_cache, int cache_len,
                     float *logits, int n_logit_rows, int n_threads) {
    if (T < 1 || start < 0 || start + T > cache_len || start + T > m->max_pos || n_logit_rows < 0 || n_logit_rows > T)
        return -1;
    const struct job set = {.m = m, .x = x, .T = T, .start = start, .cache_len = cache_len, .n_logit_rows = n_logit_rows,
                            .k_cache = k_cache, .v_cache = v_cache, .logits = logits};
    return run_job(&set, n_threads);
}

/* The head's logits [T, vocab] of T final-normed rows x [T, dim] (the norm already applied). Returns as above. */
int tradeoff_head(const struct model *m, const float *x, int T, float *logits, int n_threads) {
    if (T < 1) return -1;
    const struct job set = {.m = m, .x = x, .T = T, .n_logit_rows = T, .logits = logits, .head_only = 1};
    return run_job(&set, n_threads);
}
