/* Matrix-vector products for llava-cli's one-token decode, called through ctypes (see __init__.py).
 *   bf16mv: y = W x, W bfloat16 (M, K) row-major contiguous, x bfloat16 (K), y bfloat16 (M); float32 accumulation
 *           (AVX512-BF16 vdpbf16ps), one round-to-nearest-even to bfloat16 at the end, as torch.mv.
 *   int8mv: y = (Q x) * s, Q int8 (M, K), s bfloat16 (M) per-row scales, x bfloat16 (K); x rounded to 16-bit
 *           integers per block of 256 (exact for inputs within 2^7 of the block's largest), exact integer sums
 *           (AVX512-VNNI vpdpwssd), scaled in float32, the scale applied to the row sum as torch's
 *           _weight_int8pack_mm applies it.
 *   int4mv: group-wise int4 (see int4_rows).
 * Only unaligned and masked loads: no alignment is assumed (memory-mapped safetensors are 2-byte aligned), and the
 * tail of a row (K not a multiple of 32 or 16) is read with a mask, never past the row.
 * Rows are shared out among OpenMP threads (share(): each its own half, then the others' rest), one parallel region
 * per call; the library is linked against the libgomp torch already has mapped, so the threads are torch's pool,
 * not a second one.
 * Why: the bfloat16 rows read front to back, one at a time, which the hardware prefetcher streams by itself
 * (bf16_rows); int8 and int4 read a few rows per iteration, sharing the work on x, with a software prefetch into L2
 * 16 KB ahead (~26 GB/s on 2 cores of the Intel machines, against torch.mv's ~20 and _weight_int8pack_mm's ~12, on
 * the interleave-qwen-0.5b shapes; read one at a time without it, int8 is no faster on Zen 4). On Intel CPUs
 * vdpbf16ps issues at a quarter of a float32 FMA's rate and vpdpwssd at an FMA's: the kernels keep the operations
 * per weight few where they are compute-bound (int8, int4).
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

#define PF_BYTES 16384 /* software prefetch distance into L2: plateau from ~1 row-block to 64 KB */

int mv_cpu_ok(void) {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16") &&
         __builtin_cpu_supports("avx512vnni");
}

/* bfloat16: one row at a time, front to back, so a thread's rows are one stream through memory, which the hardware
 * prefetcher follows by itself; two accumulators (even and odd 32s) keep two vdpbf16ps chains in flight. Reading
 * 4 rows side by side (sharing each load of x, prefetching each row 16 KB ahead) made 4 short streams of 1.8-9.5 KB:
 * 33-37 GB/s on Zen 4, against 40-42 front to back without prefetch (2 threads; torch.sum reads 47-53 there). */
static void bf16_rows(const uint16_t* restrict W, const uint16_t* restrict x, uint16_t* restrict y,
                 int64_t r0, int64_t r1, int64_t K) {
  const int64_t K64 = K & ~(int64_t)63, K32 = K & ~(int64_t)31;
  const __mmask32 tm = (__mmask32)((K - K32) ? ((1ull << (K - K32)) - 1) : 0);
  for (int64_t r = r0; r < r1; r++) {
    const uint16_t* w = W + r * K;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0;
    for (int64_t k = 0; k < K64; k += 64) {
      a0 = _mm512_dpbf16_ps(a0, BH(_mm512_loadu_si512(w + k)), BH(_mm512_loadu_si512(x + k)));
      a1 = _mm512_dpbf16_ps(a1, BH(_mm512_loadu_si512(w + k + 32)), BH(_mm512_loadu_si512(x + k + 32)));
    }
    if (K32 > K64) a0 = _mm512_dpbf16_ps(a0, BH(_mm512_loadu_si512(w + K64)), BH(_mm512_loadu_si512(x + K64)));
    if (tm)
      a1 = _mm512_dpbf16_ps(a1, BH(_mm512_maskz_loadu_epi16(tm, w + K32)), BH(_mm512_maskz_loadu_epi16(tm, x + K32)));
    y[r] = f32_to_bf16(_mm512_reduce_add_ps(_mm512_add_ps(a0, a1)));
  }
}

/* int8: y = (Q x) * s with x as 16-bit integers in blocks of I8_BLOCK inputs, each block in units of a power of 2
 * (int8_prepare): vpmovsxbw + vpdpwssd take 32 weights in two operations, where converting each weight to float32
 * for an FMA took six. The integer sums are exact; what differs from the float32 product is x's rounding to 16 bits
 * per block: exact for every input within 2^7 of the block's largest (bfloat16 has 8 significant bits), within
 * 2^-16 of that largest for the others; the block sums are scaled and added in float32. */
#define I8_BLOCK 256 /* int32 sums of 256 products of |q| <= 127 and |x| < 2^15 stay below 2^31 */
#define I8_ROWS 2 /* a decode step 22.5-23.2 ms, against 23.6-24.1 with 4 rows, which are faster only in cache
                     (48 against 39 G weights/s a core): more row streams at once cost more in memory */
#define I8_TILE 4 /* tiled int8 (kernels.int8_tiles): 4 rows read as one stream, sharing each load of x. On Zen 4
                     the kernel is bound by its own work about as much as by memory: more rows a load, fewer x loads,
                     but as separate streams they lose more in memory (4 rows untiled: 0.94-1.08x a step); tiled they
                     are one stream, read 10-13% faster than 2 untiled rows with prefetch (head and layer shapes) */

/* buf: the K inputs as int16 (rounded up to a multiple of 32, zero-padded), then per block the float32 unit they
 * are in; I8_BYTES(K) bytes. NaN or infinity in a block makes its unit NaN, so the outputs are NaN as in torch. */
#define I8_BYTES(K) ((size_t)(((K) + 31) & ~(int64_t)31) * 2 + (size_t)((K) / I8_BLOCK + 1) * 4)
static void int8_prepare(const uint16_t* restrict x, float* restrict buf, int64_t K) {
  const int64_t K32 = (K + 31) & ~(int64_t)31;
  int16_t* xq = (int16_t*)buf;
  float* unit = (float*)(xq + K32);
  for (int64_t b0 = 0; b0 < K; b0 += I8_BLOCK) {
    const int64_t b1 = b0 + I8_BLOCK < K ? b0 + I8_BLOCK : K;
    __m512i emax = _mm512_setzero_si512(); /* the largest exponent field, in every 16-bit lane */
    for (int64_t k = b0; k < b1; k += 32) {
      const __mmask32 m = b1 - k >= 32 ? ~(__mmask32)0 : (__mmask32)((1u << (b1 - k)) - 1);
      emax = _mm512_max_epu16(emax, _mm512_and_si512(_mm512_maskz_loadu_epi16(m, x + k), _mm512_set1_epi16(0x7F80)));
    }
    uint16_t lanes[32];
    _mm512_storeu_si512(lanes, emax);
    int e = 0;
    for (int i = 0; i < 32; i++) e = lanes[i] > e ? lanes[i] : e;
    e >>= 7; /* biased exponent of the largest |x|: integers in units of 2^(e - 127 - 14) are below 2^15 */
    if (e < 15) e = 15; /* |x| < 2^-112: rounds to 0, and 2^(141 - e) stays a float32 */
    const float u = e == 255 ? NAN : ldexpf(1.f, e - 141), inv = e == 255 ? 0.f : ldexpf(1.f, 141 - e);
    unit[b0 / I8_BLOCK] = u;
    for (int64_t k = b0; k < b1; k += 16) {
      const __mmask16 m = b1 - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (b1 - k)) - 1);
      const __m512i bits = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, x + k));
      const __m512 v = _mm512_mul_ps(bf16_widen(bits), _mm512_set1_ps(inv));
      _mm256_mask_storeu_epi16(xq + k, m, _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(v))); /* to nearest, even */
    }
  }
  for (int64_t k = K; k < K32; k++) xq[k] = 0; /* read with weights masked to 0: defined values, not garbage */
}

/* R (1..I8_TILE) rows: y[i] = (row i . x) * s[i]; tail: a mask of the last K % 32 bytes of each row.
 * tiled: the R = I8_TILE rows are stored in tiles (kernels.int8_tiles), row i's inputs k..k+31 at
 * w + k * R + i * 32; else row i starts at w + i * K. */
static inline __attribute__((always_inline)) void int8_block(const int8_t* restrict w, const float* restrict buf,
                                                             const uint16_t* restrict s, uint16_t* restrict y,
                                                             int64_t K, const int R, const int tiled) {
  const int64_t K32 = (K + 31) & ~(int64_t)31, full = K & ~(int64_t)31;
  const int16_t* xq = (const int16_t*)buf;
  const float* unit = (const float*)(xq + K32);
  const __mmask32 tm = (__mmask32)((K - full) ? ((1u << (K - full)) - 1) : 0);
  __m512 a[I8_TILE];
  for (int i = 0; i < R; i++) a[i] = _mm512_setzero_ps();
  for (int64_t b0 = 0; b0 < K; b0 += I8_BLOCK) {
    const int64_t b1 = b0 + I8_BLOCK < full ? b0 + I8_BLOCK : full;
    __m512i d[I8_TILE];
    for (int i = 0; i < R; i++) d[i] = _mm512_setzero_si512();
    for (int64_t k = b0; k < b1; k += 32) {
      const __m512i xv = _mm512_loadu_si512(xq + k);
      for (int i = 0; i < R; i++) {
        const int8_t* p = tiled ? w + k * R + i * 32 : w + i * K + k;
        if (!tiled && !(k & 63)) _mm_prefetch((const char*)p + PF_BYTES, _MM_HINT_T1);
        d[i] = _mm512_dpwssd_epi32(d[i], _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)p)), xv);
      }
    }
    if (tm && b1 == full && full < b0 + I8_BLOCK) { /* the row's last, partial 32 */
      const __m512i xv = _mm512_loadu_si512(xq + full);
      for (int i = 0; i < R; i++)
        d[i] = _mm512_dpwssd_epi32(d[i], _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(tm, w + i * K + full)), xv);
    }
    const __m512 ub = _mm512_set1_ps(unit[b0 / I8_BLOCK]);
    for (int i = 0; i < R; i++) a[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d[i]), ub, a[i]);
  }
  for (int i = 0; i < R; i++) y[i] = f32_to_bf16(_mm512_reduce_add_ps(a[i]) * bf16_to_f32(s[i]));
}

/* rows [r0, r1) of int8 W (M, K) times x prepared by int8_prepare in buf; tiled: W in tiles of I8_TILE rows (K a
 * multiple of 32, and r0, r1 multiples of I8_TILE) */
static void int8_rows(const int8_t* restrict W, const float* restrict buf, const uint16_t* restrict s,
                      uint16_t* restrict y, int64_t r0, int64_t r1, int64_t K, int tiled) {
  int64_t r = r0;
  if (tiled) {
    for (; r < r1; r += I8_TILE) int8_block(W + r * K, buf, s + r, y + r, K, I8_TILE, 1);
    return;
  }
  for (; r + I8_ROWS <= r1; r += I8_ROWS) int8_block(W + r * K, buf, s + r, y + r, K, I8_ROWS, 0);
  for (; r < r1; r++) int8_block(W + r * K, buf, s + r, y + r, K, 1, 0);
}

/* int4, group-wise asymmetric (quant.Int4Linear): w = (q - 8) * scale + zero, q in [0, 15], one scale and zero per
 * group of G inputs of a row (G a multiple of 64). W uint8 (M, K / 2), q[2j] in the low and q[2j + 1] in the high
 * nibble of byte j; sz bfloat16 (M, K / G, 2): scale and zero of each group of a row, next to each other.
 * y = sum over groups of scale * sum((q - 8) x) + zero * sum(x), in float32; the inner sums with vdpbf16ps: (q - 8)
 * and x are exact in bfloat16, so every product is exact, as in torch's _weight_int4pack_mm_for_cpu, which
 * dequantizes each weight to float32 and sums w x (the same value up to float32 reassociation; one bfloat16 rounding
 * at the end). sum(x) per group is computed once per call, the zero terms once per row, 16 groups a vector.
 * Unpacking 64 weights: their 32 bytes zero-extended to 16-bit lanes; the low nibbles (even weights) and the high
 * ones (odd weights) each mapped to bfloat16 q - 8 by one vpermw. x is split once per call the same way (xs: each
 * 64 inputs as their 32 even then 32 odd ones), so the pairs vdpbf16ps sums need no shuffle per row.
 * INT4_ROWS rows per iteration share the loads of x. */
static const uint16_t INT4_BF16[32] = {  /* bfloat16 of q - 8 for q = 0..15 (vpermw reads 5 index bits) */
    0xC100, 0xC0E0, 0xC0C0, 0xC0A0, 0xC080, 0xC040, 0xC000, 0xBF80, 0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0,
    0x40C0, 0x40E0};
#define INT4_ROWS 4
#define INT4_MAX_K 32768 /* x's split copy lives on the stack: DecodePlan and int4_mv decline longer inputs */

/* xs = x with each 64 inputs reordered as their 32 even then their 32 odd ones; xg[g] = the sum of group g */
static void int4_split(const uint16_t* restrict x, uint16_t* restrict xs, float* restrict xg, int64_t K, int64_t G) {
  uint16_t e[32], o[32];
  for (int j = 0; j < 32; j++) { e[j] = (uint16_t)(2 * j); o[j] = (uint16_t)(2 * j + 1); }
  const __m512i even = _mm512_loadu_si512(e), odd = _mm512_loadu_si512(o);
  const __m512bh one = BH(_mm512_set1_epi16((short)0x3F80));
  for (int64_t g = 0; g < K / G; g++) {
    __m512 sum = _mm512_setzero_ps();
    for (int64_t k = g * G; k < (g + 1) * G; k += 64) {
      const __m512i a = _mm512_loadu_si512(x + k), b = _mm512_loadu_si512(x + k + 32);
      sum = _mm512_dpbf16_ps(_mm512_dpbf16_ps(sum, one, BH(a)), one, BH(b));
      _mm512_storeu_si512(xs + k, _mm512_permutex2var_epi16(a, even, b));
      _mm512_storeu_si512(xs + k + 32, _mm512_permutex2var_epi16(a, odd, b));
    }
    xg[g] = _mm512_reduce_add_ps(sum);
  }
}

/* R (1..INT4_ROWS) rows from w: y[i] for row i, each row K / 2 bytes and K / G (scale, zero) pairs */
static inline __attribute__((always_inline)) void int4_block(const uint8_t* restrict w, const uint16_t* restrict xs,
                                                             const float* restrict xg, const uint16_t* restrict sz,
                                                             uint16_t* restrict y, int64_t K, int64_t G, const int R) {
  const __m512i table = _mm512_loadu_si512(INT4_BF16), low = _mm512_set1_epi16(15);
  const __m512i high16 = _mm512_set1_epi32((int)0xFFFF0000u);
  const int64_t ng = K / G, rb = K / 2, ng16 = ng & ~(int64_t)15;
  const __mmask16 tm = (__mmask16)((ng - ng16) ? ((1u << (ng - ng16)) - 1) : 0);
  __m512 t[INT4_ROWS];
  for (int i = 0; i < R; i++) { /* the zero terms: sum over groups of zero * sum(x) */
    const uint16_t* p = sz + i * ng * 2;
    t[i] = _mm512_setzero_ps();
    for (int64_t g = 0; g < ng16; g += 16)
      t[i] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(_mm512_loadu_si512(p + 2 * g), high16)),
                             _mm512_loadu_ps(xg + g), t[i]);
    if (tm)
      t[i] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(_mm512_maskz_loadu_epi32(tm, p + 2 * ng16),
                                                                  high16)), _mm512_maskz_loadu_ps(tm, xg + ng16), t[i]);
  }
  for (int64_t g = 0; g < ng; g++) {
    __m512 ae[INT4_ROWS], ao[INT4_ROWS]; /* even and odd weights: two chains a row */
    for (int i = 0; i < R; i++) ae[i] = ao[i] = _mm512_setzero_ps();
    for (int64_t k = g * G; k < (g + 1) * G; k += 64) {
      const __m512bh xe = BH(_mm512_loadu_si512(xs + k)), xo = BH(_mm512_loadu_si512(xs + k + 32));
      for (int i = 0; i < R; i++) {
        const uint8_t* p = w + i * rb + k / 2;
        if (!(k & 127)) _mm_prefetch((const char*)p + PF_BYTES, _MM_HINT_T1);
        const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)p));
        ae[i] = _mm512_dpbf16_ps(ae[i], BH(_mm512_permutexvar_epi16(_mm512_and_si512(b, low), table)), xe);
        ao[i] = _mm512_dpbf16_ps(ao[i], BH(_mm512_permutexvar_epi16(_mm512_srli_epi16(b, 4), table)), xo);
      }
    }
    for (int i = 0; i < R; i++) { /* scale: the low half of the (scale, zero) pair, broadcast from memory */
      uint32_t pair;
      memcpy(&pair, sz + (i * ng + g) * 2, 4);
      const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_set1_epi32((int)pair), 16));
      t[i] = _mm512_fmadd_ps(_mm512_add_ps(ae[i], ao[i]), scale, t[i]);
    }
  }
  for (int i = 0; i < R; i++) y[i] = f32_to_bf16(_mm512_reduce_add_ps(t[i]));
}

static void int4_rows(const uint8_t* restrict W, const uint16_t* restrict x, const uint16_t* restrict sz,
                      uint16_t* restrict y, int64_t r0, int64_t r1, int64_t K, int64_t G) {
  uint16_t xs[INT4_MAX_K];
  float xg[INT4_MAX_K / 64];
  int4_split(x, xs, xg, K, G);
  const int64_t ng = K / G;
  int64_t r = r0;
  for (; r + INT4_ROWS <= r1; r += INT4_ROWS)
    int4_block(W + r * (K / 2), xs, xg, sz + r * ng * 2, y + r, K, G, INT4_ROWS);
  for (; r < r1; r++) int4_block(W + r * (K / 2), xs, xg, sz + r * ng * 2, y + r, K, G, 1);
}

/* Thread t of nt takes rows [start(t), start(t + 1)): equal shares rounded to blocks of 8 rows. */
static int64_t start(int t, int nt, int64_t M) {
  if (t >= nt) return M;
  int64_t r = ((M * t / nt) + 4) & ~(int64_t)7;
  return r < M ? r : M;
}

#define SMALL (1 << 16) /* weights: below this one thread is faster than waking the others */

/* A matrix of any of the three formats: bfloat16 (M, K) without scales, int8 (M, K) with per-row scales, int4
 * (int4_rows' layout) with its group size g > 0, int8 in tiles of I8_TILE rows where g is -1; an optional bias. */
typedef struct { const void* w; const uint16_t* s; const uint16_t* b; int64_t g; } mat_t;

static inline int is_int8(mat_t m) { return m.s && m.g <= 0; } /* the one format that reads x prepared (int8_prepare) */

static inline uint16_t bf16_add(uint16_t a, uint16_t b) { return f32_to_bf16(bf16_to_f32(a) + bf16_to_f32(b)); }
static inline uint16_t bf16_mul(uint16_t a, uint16_t b) { return f32_to_bf16(bf16_to_f32(a) * bf16_to_f32(b)); }

/* rows [r0, r1) of y = W x (+ b), bfloat16 x for bfloat16 and int4 W, x prepared by int8_prepare (xf) for int8 W */
static void mat_rows(mat_t m, const uint16_t* x, const float* xf, uint16_t* y, int64_t r0, int64_t r1, int64_t K) {
  if (r1 <= r0) return;
  if (m.g > 0) int4_rows((const uint8_t*)m.w, x, m.s, y, r0, r1, K, m.g);
  else if (m.s) int8_rows((const int8_t*)m.w, xf, m.s, y, r0, r1, K, m.g < 0);
  else bf16_rows((const uint16_t*)m.w, x, y, r0, r1, K);
  if (m.b)
    for (int64_t r = r0; r < r1; r++) y[r] = bf16_add(y[r], m.b[r]);
}

/* Rows shared out among a team: thread t starts on its own share [start(t), start(t + 1)) and claims it front to back,
 * STEAL_BYTES of weights at a time, from its cursor cur[t] (set to start(t) before the team meets here); done with it,
 * it goes on claiming from the others' cursors. Why: a thread slowed (another process on its core, a busier memory
 * channel) then holds the others back by one claim at the next barrier, not by what is left of its half; and each
 * thread still reads its own share as one stream. Paired against halves in decode steps: 0.94-0.99x the layers' time in
 * bfloat16, 0.93-0.99x in int8 (claims of 64 KB: 0.97-1.00x; rows dealt out in chunks of 32-256 KB to whichever
 * thread is free, with no share of its own: 0.95-1.14x). */
#define STEAL_BYTES 262144

/* a job: y = m x (+ bias), then with m2 (gate and up) also y2 = m2 x and y = SiLU(y) * y2, then with acc acc += y */
typedef struct { mat_t m, m2; const uint16_t* x; const float* xf; uint16_t *y, *y2, *acc; int64_t M, K; } job_t;

static void job_rows(const job_t* j, int64_t r0, int64_t r1) {
  mat_rows(j->m, j->x, j->xf, j->y, r0, r1, j->K);
  if (j->m2.w) {
    mat_rows(j->m2, j->x, j->xf, j->y2, r0, r1, j->K);
    for (int64_t r = r0; r < r1; r++) {
      const float a = bf16_to_f32(j->y[r]);
      j->y[r] = bf16_mul(f32_to_bf16(a / (1.f + expf(-a))), j->y2[r]);
    }
  }
  if (j->acc)
    for (int64_t r = r0; r < r1; r++) j->acc[r] = bf16_add(j->acc[r], j->y[r]);
}

static void share(const job_t* j, int64_t* cur, int t, int nt) {
  const mat_t m = j->m;
  const int64_t row = m.g > 0 ? j->K / 2 : m.s ? j->K : 2 * j->K; /* bytes of weights a row */
  int64_t n = (STEAL_BYTES / row) & ~(int64_t)7;
  if (n < 8) n = 8; /* a multiple of 8 rows, as start(): int8 tiles of 4 rows stay whole */
  for (int i = 0; i < nt; i++) {
    const int u = (t + i) % nt;
    const int64_t end = start(u + 1, nt, j->M);
    for (;;) {
      const int64_t r0 = __atomic_fetch_add(&cur[u], n, __ATOMIC_RELAXED);
      if (r0 >= end) break;
      job_rows(j, r0, r0 + n < end ? r0 + n : end);
    }
  }
}

/* y = m x, rows shared out among nthreads (share(); one thread below SMALL weights, or where its cursors cannot be
 * allocated); -1 where int8's prepared copy of x cannot be allocated (the caller falls back to torch) */
static int matvec(mat_t m, const uint16_t* x, uint16_t* y, int64_t M, int64_t K, int nthreads) {
  float* xf = NULL;
  if (is_int8(m)) {
    if (!(xf = malloc(I8_BYTES(K)))) return -1;
    int8_prepare(x, xf, K);
  }
  int64_t* cur = nthreads > 1 && M * K >= SMALL ? malloc((size_t)nthreads * 8) : NULL;
  if (!cur) {
    mat_rows(m, x, xf, y, 0, M, K);
  } else {
    const job_t j = {m, {0}, x, xf, y, NULL, NULL, M, K};
#pragma omp parallel num_threads(nthreads)
    {
      const int t = omp_get_thread_num(), nt = omp_get_num_threads();
      cur[t] = start(t, nt, M);
#pragma omp barrier
      share(&j, cur, t, nt);
    }
  }
  free(xf); free(cur);
  return 0;
}

void bf16mv(const uint16_t* W, const uint16_t* x, uint16_t* y, int64_t M, int64_t K, int nthreads) {
  matvec((mat_t){W, NULL, NULL, 0}, x, y, M, K, nthreads);
}

int int8mv(const int8_t* Q, const uint16_t* x, const uint16_t* s, uint16_t* y, int64_t M, int64_t K, int tiled,
           int nthreads) {
  return matvec((mat_t){Q, s, NULL, tiled ? -1 : 0}, x, y, M, K, nthreads);
}

void int4mv(const uint8_t* W, const uint16_t* x, const uint16_t* sz, uint16_t* y, int64_t M, int64_t K, int64_t G,
            int nthreads) {
  matvec((mat_t){W, sz, NULL, G}, x, y, M, K, nthreads);
}

/* out[b] = the index of the largest of row b of x (rows of n float32): the first where several are equal, the first
 * NaN where there is one, as torch.argmax. Why: torch's argmax over a vocabulary of 152000 takes ~130 us on these
 * CPUs (its reduction keeps an index per element, one at a time), ~1% of a decode step; 16 lanes here take ~10. */
void argmax_rows(const float* x, int64_t rows, int64_t n, int64_t* out) {
  for (int64_t b = 0; b < rows; b++) {
    const float* r = x + b * n;
    __m512 best = _mm512_set1_ps(-INFINITY);
    __m512i at = _mm512_setzero_si512(), idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i step = _mm512_set1_epi32(16);
    __mmask16 nan = 0;
    for (int64_t k = 0; k < n; k += 16) {
      const __mmask16 m = n - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - k)) - 1);
      const __m512 v = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), m, r + k);
      nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      const __mmask16 gt = _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ); /* strictly: a lane keeps its first maximum */
      best = _mm512_mask_mov_ps(best, gt, v);
      at = _mm512_mask_mov_epi32(at, gt, idx);
      idx = _mm512_add_epi32(idx, step);
    }
    int64_t i = 0;
    if (nan) {
      while (r[i] == r[i]) i++; /* the first NaN */
    } else { /* of the lanes holding the maximum, the smallest index (every lane's index is 0 when all are -inf) */
      const __mmask16 top = _mm512_cmp_ps_mask(best, _mm512_set1_ps(_mm512_reduce_max_ps(best)), _CMP_EQ_OQ);
      i = _mm512_mask_reduce_min_epi32(top, at);
    }
    out[b] = i;
  }
}

/* ---- decode_layers: every decoder layer of one one-token decode step in one call and one parallel region ----
 * Why: at batch 1 a decode step is ~30 small torch operations per layer (norms, bias, RoPE, cache writes, SDPA over
 * a few hundred keys, SiLU, residuals), each a dispatch and most a wake-up of the thread pool: ~15 ms a step on the
 * interleave-qwen-0.5b shape, a quarter of it. Here the threads meet at barriers instead.
 * Numerics follow the torch path operation by operation: every result torch rounds to bfloat16 is rounded here at
 * the same point (matrix-vector outputs, bias, RoPE's two products and sum, residual adds, SiLU and its product,
 * the normalised hidden state and its scaled copy); RMSNorm and attention run in float32 as the reference's do
 * (attention keeps the probabilities in float32, where torch's flash kernel rounds them to bfloat16).
 *
 * desc: per layer LAYER_WORDS int64: ln1, ln2, then (weight, scales or 0, bias or 0, int4 group, -1 for tiled int8,
 *       or 0) for q, k, v, o, gate, up, down. A matrix is int4 (int4_rows' layout) where it has a group, else int8
 *       where it has scales ((M, K), or in tiles of I8_TILE rows), else bfloat16 (M, K); all contiguous.
 * x: the hidden state (hidden,) bfloat16, updated in place; with `norm` (hidden,) the model's final RMSNorm is
 *    applied to it after the last layer (one call fewer of ~0.2 ms of torch operations a step). cs, sn: RoPE cos and
 *    signed sin (head_dim,) bfloat16.
 * kc, vc: the caches (layers, 1, nkv, max_len, head_dim) bfloat16; position `pos` is written, 0..pos attended.
 * Returns 0, or -1 when a scratch buffer cannot be allocated (nothing was changed then).
 */
#define LAYER_WORDS 30

/* out = w * bf16(x * rsqrt(mean(x^2) + eps)), and out prepared into of (int8_prepare) when int8 weights read it */
static void rms_norm(const uint16_t* x, const uint16_t* w, uint16_t* out, float* of, int64_t n, float eps) {
  float ss = 0.f;
  for (int64_t i = 0; i < n; i++) { float v = bf16_to_f32(x[i]); ss += v * v; }
  float r = 1.f / sqrtf(ss / (float)n + eps);
  for (int64_t i = 0; i < n; i++) out[i] = bf16_mul(w[i], f32_to_bf16(bf16_to_f32(x[i]) * r));
  if (of) int8_prepare(out, of, n);
}

/* x * cos + roll(x, d/2) * signed_sin, each product and the sum rounded to bfloat16, for one head of d values */
static void rope_head(uint16_t* x, const uint16_t* cs, const uint16_t* sn, int64_t d) {
  uint16_t t[256]; /* head_dim <= 256: DecodePlan.build declines wider heads */
  memcpy(t, x, (size_t)d * 2);
  for (int64_t i = 0; i < d; i++) x[i] = bf16_add(bf16_mul(t[i], cs[i]), bf16_mul(t[(i + d / 2) % d], sn[i]));
}

/* softmax(q . k_l / sqrt(d)) over l in [0, n), times v: one query head, d a multiple of 32 (at most 256).
 * Three passes over float32 scores (n of them, in s): the keys, the exponentials, the values. The cache rows are
 * read once each, with the matrix-vector kernels' software prefetch: without it they stream at ~11 GB/s. */
static void attend(const uint16_t* q, const uint16_t* k, const uint16_t* v, uint16_t* out, float* s, int64_t n,
                   int64_t d) {
  const float scale = 1.f / sqrtf((float)d);
  const int64_t lines = d * 2 / 64; /* cache lines per row */
  for (int64_t l = 0; l < n; l++) {
    const uint16_t* kl = k + l * d;
    for (int64_t c = 0; c < lines; c++) _mm_prefetch((const char*)kl + PF_BYTES + 64 * c, _MM_HINT_T1);
    __m512 a = _mm512_setzero_ps();
    for (int64_t j = 0; j < d; j += 32)
      a = _mm512_dpbf16_ps(a, BH(_mm512_loadu_si512(q + j)), BH(_mm512_loadu_si512(kl + j)));
    s[l] = _mm512_reduce_add_ps(a) * scale;
  }
  const int64_t n16 = n & ~(int64_t)15;
  const __mmask16 tm = (__mmask16)((n - n16) ? ((1u << (n - n16)) - 1) : 0);
  const __m512 m = _mm512_set1_ps(max_ps(s, n));
  __m512 sum = _mm512_setzero_ps();
  for (int64_t l = 0; l < n16; l += 16) {
    const __m512 e = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(s + l), m));
    _mm512_storeu_ps(s + l, e);
    sum = _mm512_add_ps(sum, e);
  }
  if (tm) {
    const __m512 e = _mm512_maskz_mov_ps(tm, exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(tm, s + n16), m)));
    _mm512_mask_storeu_ps(s + n16, tm, e);
    sum = _mm512_add_ps(sum, e);
  }
  __m512 acc[16];
  const int64_t nv = d / 16;
  for (int64_t j = 0; j < nv; j++) acc[j] = _mm512_setzero_ps();
  for (int64_t l = 0; l < n; l++) {
    const uint16_t* vl = v + l * d;
    for (int64_t c = 0; c < lines; c++) _mm_prefetch((const char*)vl + PF_BYTES + 64 * c, _MM_HINT_T1);
    const __m512 p = _mm512_set1_ps(s[l]);
    for (int64_t j = 0; j < nv; j++) {
      const __m512 vv = _mm512_castsi512_ps(_mm512_slli_epi32(
          _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(vl + 16 * j))), 16));
      acc[j] = _mm512_fmadd_ps(p, vv, acc[j]);
    }
  }
  const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(sum));
  float o[256];
  for (int64_t j = 0; j < nv; j++) _mm512_storeu_ps(o + 16 * j, _mm512_mul_ps(acc[j], inv));
  for (int64_t i = 0; i < d; i++) out[i] = f32_to_bf16(o[i]);
}

static mat_t mat_at(const int64_t* L, int i) {
  const int64_t* M = L + 2 + 4 * i;
  mat_t m = {(const void*)M[0], (const uint16_t*)M[1], (const uint16_t*)M[2], M[3]};
  return m;
}

/* x += m in, shared out (share(); o: scratch); int8 m reads in prepared once (xf, int8_prepare) */
static void add_product(mat_t m, const uint16_t* in, int64_t K, float* xf, uint16_t* o, uint16_t* x, int64_t M,
                        int64_t* cur, int t, int nt) {
  if (is_int8(m)) {
#pragma omp single
    int8_prepare(in, xf, K);
  }
  const job_t j = {m, {0}, in, xf, o, NULL, x, M, K};
  share(&j, cur, t, nt);
}

#define JOBS 6 /* per layer: q, k, v, o, gate and up, down; each with a cursor a thread (share()) */

int decode_layers(const int64_t* desc, int64_t nlayers, uint16_t* x, const uint16_t* cs, const uint16_t* sn,
                  uint16_t* kc, uint16_t* vc, int64_t max_len, int64_t pos, int64_t hidden, int64_t nh, int64_t nkv,
                  int64_t hd, int64_t inter, float eps, const uint16_t* norm, int nthreads) {
  const int64_t qn = nh * hd, kn = nkv * hd, n = pos + 1, group = nh / nkv;
  int64_t widest = hidden; /* the longest input an int8 matrix reads prepared: hidden, qn or inter */
  if (qn > widest) widest = qn;
  if (inter > widest) widest = inter;
  if (nthreads < 1) nthreads = 1;
  uint16_t* hn = malloc((size_t)(hidden + qn + 2 * kn + qn + 2 * inter + hidden) * 2);
  float* xf = malloc(I8_BYTES(widest));
  float* sc = malloc((size_t)nthreads * (size_t)n * 4);
  int64_t* curs = malloc((size_t)nlayers * JOBS * (size_t)nthreads * 8);
  if (!hn || !xf || !sc || !curs) { free(hn); free(xf); free(sc); free(curs); return -1; }
  uint16_t *q = hn + hidden, *kk = q + qn, *vv = kk + kn, *ao = vv + kn, *g = ao + qn, *u = g + inter,
           *o = u + inter;
#pragma omp parallel num_threads(nthreads)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    float* s = sc + (int64_t)t * n;
    const int64_t rows[JOBS] = {qn, kn, kn, hidden, inter, hidden}; /* every layer's jobs have these rows */
    for (int64_t li = 0; li < nlayers; li++) { /* every cursor at the start of its thread's share */
      int64_t* c = curs + li * JOBS * nt;
      for (int i = 0; i < JOBS; i++) c[i * nt + t] = start(t, nt, rows[i]);
    }
#pragma omp barrier
    for (int64_t li = 0; li < nlayers; li++) {
      const int64_t* L = desc + li * LAYER_WORDS;
      int64_t* c = curs + li * JOBS * nt;
      const mat_t mq = mat_at(L, 0), mk = mat_at(L, 1), mv_ = mat_at(L, 2), mo = mat_at(L, 3), mg = mat_at(L, 4),
                  mu = mat_at(L, 5), md = mat_at(L, 6);
      uint16_t* kl = kc + li * nkv * max_len * hd;
      uint16_t* vl = vc + li * nkv * max_len * hd;
#pragma omp single
      rms_norm(x, (const uint16_t*)L[0], hn, (is_int8(mq) || is_int8(mk) || is_int8(mv_)) ? xf : NULL, hidden, eps);
      const job_t jq = {mq, {0}, hn, xf, q, NULL, NULL, qn, hidden}, jk = {mk, {0}, hn, xf, kk, NULL, NULL, kn, hidden},
                  jv = {mv_, {0}, hn, xf, vv, NULL, NULL, kn, hidden};
      share(&jq, c, t, nt);
      share(&jk, c + nt, t, nt);
      share(&jv, c + 2 * nt, t, nt);
#pragma omp barrier
#pragma omp single
      for (int64_t h = 0; h < nkv; h++) {
        rope_head(kk + h * hd, cs, sn, hd);
        memcpy(kl + (h * max_len + pos) * hd, kk + h * hd, (size_t)hd * 2);
        memcpy(vl + (h * max_len + pos) * hd, vv + h * hd, (size_t)hd * 2);
      }
#pragma omp for schedule(static)
      for (int64_t h = 0; h < nh; h++) {
        rope_head(q + h * hd, cs, sn, hd);
        const int64_t kh = h / group;
        attend(q + h * hd, kl + kh * max_len * hd, vl + kh * max_len * hd, ao + h * hd, s, n, hd);
      }
      add_product(mo, ao, qn, xf, o, x, hidden, c + 3 * nt, t, nt);
#pragma omp barrier
#pragma omp single
      rms_norm(x, (const uint16_t*)L[1], hn, (is_int8(mg) || is_int8(mu)) ? xf : NULL, hidden, eps);
      const job_t jgu = {mg, mu, hn, xf, g, u, NULL, inter, hidden};
      share(&jgu, c + 4 * nt, t, nt);
#pragma omp barrier
      add_product(md, g, inter, xf, o, x, hidden, c + 5 * nt, t, nt);
#pragma omp barrier
    }
  }
  if (norm) rms_norm(x, norm, x, NULL, hidden, eps); /* in place: x is read whole before the first write */
  free(hn); free(xf); free(sc); free(curs);
  return 0;
}
