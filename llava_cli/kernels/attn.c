/* Attention over a whole sequence (the vision tower's patches, a prompt's prefill), called through ctypes.
 *   attn_bf16: out = softmax(q k^T * scale) v per head, q (B, H, Tq, D), k and v (B, Hkv, Tk, D) bfloat16 with
 *              any strides but a contiguous last dimension, out (B, Tq, H * D) contiguous bfloat16; D even, at most
 *              128. Causal: query i sees keys 0 .. i + Tk - Tq. Heads share key-value heads in groups of H / Hkv.
 * The rounding is torch's CPU flash attention's: scores accumulated in float32 (vdpbf16ps), softmax in float32, the
 * unnormalised probabilities rounded to bfloat16 for the product with v, float32 sums, division by the float32 sum
 * at the end and one rounding to bfloat16. Only the order of the float32 sums differs.
 * Why: on CPUs whose vdpbf16ps runs at an FMA's rate (AMD Zen 4/5), torch's flash attention takes these shapes at
 * 40-150 GFLOP/s (SigLIP's 16 heads of 72 over 729 patches, Qwen2's causal 16 heads of 64 over ~750 tokens): a
 * third of the vision tower and of the prefill. All scores of a block of 16 queries fit in L2 at these lengths
 * (16 x 4096 float32 = 256 KB), so each block takes one exact softmax instead of flash attention's running rescale.
 * Layouts: the keys of each key-value head are packed first as 32-bit pairs of dimensions, one word per key (the
 * transposed K), the values as pairs of keys per dimension, padding zeros; then every product is a vdpbf16ps of a
 * broadcast pair of q (or of probabilities) against 16 keys (or 16 dimensions). Each (head, 16-query block) is one
 * task: the block's scores into float32 rows, softmax, product with the values.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

#define QS 128 /* the query block's row stride in its copy: D <= 128 */
#define KB 64  /* keys per score block: 4 rows x 4 vectors of 16 keys in 16 accumulators */

static int64_t up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

/* keys of one head as 32-bit pairs of dimensions, transposed: kp[r * n16 + key] = (k[key][2r], k[key][2r + 1]),
 * zeros past n; 16 keys a gather, so each store is one whole cache line of kp */
static void pack_keys(const uint16_t* k, int64_t ts, int64_t n, int64_t n16, int64_t d, uint32_t* kp) {
  const __m512i rows = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                          _mm512_set1_epi32((int)ts));
  for (int64_t key = 0; key < n16; key += 16) {
    const __mmask16 m = (__mmask16)(n - key >= 16 ? 0xffff : n > key ? (1u << (n - key)) - 1 : 0);
    const uint16_t* block = k + key * ts;
    for (int64_t r = 0; r < d / 2; r++)
      _mm512_storeu_si512(kp + r * n16 + key,
                          _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, rows, block + 2 * r, 2));
  }
}

/* values of one head as 32-bit pairs of keys: vp[r * d16 + j] = (v[2r][j], v[2r + 1][j]), zeros past n and d */
static void pack_values(const uint16_t* v, int64_t ts, int64_t n, int64_t n32, int64_t d, int64_t d16,
                        uint32_t* vp) {
  for (int64_t r = 0; r < n32 / 2; r++) {
    const uint16_t* a = v + 2 * r * ts;
    for (int64_t j = 0; j < d16; j += 16) {
      const __mmask16 m = (__mmask16)(d - j >= 16 ? 0xffff : (1u << (d - j)) - 1); /* j < d16: d - j > 0 */
      const __m512i lo = _mm512_cvtepu16_epi32(2 * r < n ? _mm256_maskz_loadu_epi16(m, a + j) : _mm256_setzero_si256());
      const __m512i hi = _mm512_cvtepu16_epi32(2 * r + 1 < n ? _mm256_maskz_loadu_epi16(m, a + ts + j)
                                                               : _mm256_setzero_si256());
      _mm512_storeu_si512(vp + r * d16 + j, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
    }
  }
}

/* one row of scores s[0, lim) -> unnormalised bfloat16 probabilities p[0, lim), zeros up to width; returns 1/sum */
static float softmax_row(const float* s, uint16_t* p, int64_t lim, int64_t width, float scale) {
  const int64_t n16 = lim & ~(int64_t)15;
  const __mmask16 tm = (__mmask16)((1u << (lim - n16)) - 1);
  const __m512 m = _mm512_set1_ps(max_ps(s, lim) * scale), sc = _mm512_set1_ps(scale);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t l = 0; l < n16; l += 16) {
    const __m512 e = exp_ps(_mm512_fmsub_ps(_mm512_loadu_ps(s + l), sc, m));
    _mm256_storeu_si256((__m256i*)(p + l), (__m256i)_mm512_cvtneps_pbh(e));
    sum = _mm512_add_ps(sum, e);
  }
  int64_t l = n16;
  if (tm) {
    const __m512 e = _mm512_maskz_mov_ps(tm, exp_ps(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(tm, s + n16), sc, m)));
    _mm256_storeu_si256((__m256i*)(p + n16), (__m256i)_mm512_cvtneps_pbh(e)); /* zeros past lim */
    sum = _mm512_add_ps(sum, e);
    l += 16;
  }
  for (; l < width; l += 16) _mm256_storeu_si256((__m256i*)(p + l), _mm256_setzero_si256());
  return 1.f / _mm512_reduce_add_ps(sum);
}

typedef struct {
  int64_t Tq, Tk, D, nk, n32, d16; /* nk, n32: keys padded to KB and 32; d16: D padded to 16 */
  int causal;
  float scale;
} shape_t;

static inline __m512 pair(const uint16_t* x) { int32_t w; memcpy(&w, x, 4); return _mm512_castsi512_ps(_mm512_set1_epi32(w)); }

/* s[i][n0 .. n0 + 64) = q_i . k_n for 4 query rows at qb (stride QS), keys from kp (stride nk words a pair) */
static void scores4(const uint16_t* qb, const uint32_t* kp, int64_t nk, int64_t D, float* s, int64_t ss) {
  __m512 a[4][4];
  for (int i = 0; i < 4; i++)
    for (int c = 0; c < 4; c++) a[i][c] = _mm512_setzero_ps();
  for (int64_t r = 0; r < D / 2; r++) {
    const uint32_t* kr = kp + r * nk;
    const __m512bh k0 = BH(_mm512_loadu_si512(kr)), k1 = BH(_mm512_loadu_si512(kr + 16)),
                   k2 = BH(_mm512_loadu_si512(kr + 32)), k3 = BH(_mm512_loadu_si512(kr + 48));
    for (int i = 0; i < 4; i++) {
      const __m512bh x = BH(pair(qb + i * QS + 2 * r));
      a[i][0] = _mm512_dpbf16_ps(a[i][0], x, k0);
      a[i][1] = _mm512_dpbf16_ps(a[i][1], x, k1);
      a[i][2] = _mm512_dpbf16_ps(a[i][2], x, k2);
      a[i][3] = _mm512_dpbf16_ps(a[i][3], x, k3);
    }
  }
  for (int i = 0; i < 4; i++)
    for (int c = 0; c < 4; c++) _mm512_storeu_ps(s + i * ss + 16 * c, a[i][c]);
}

/* o[i][0 .. 16 NV) = sum over key pairs r < pairs of p_i[2r, 2r + 1] . vp[r], R rows of probabilities at p */
static inline __attribute__((always_inline)) void values(const uint16_t* p, int64_t ps, const uint32_t* vp,
                                                         int64_t d16, int64_t pairs, float* o, const int R,
                                                         const int NV) {
  __m512 a[4][8];
  for (int i = 0; i < R; i++)
    for (int c = 0; c < NV; c++) a[i][c] = _mm512_setzero_ps();
  for (int64_t r = 0; r < pairs; r++) {
    __m512bh w[8];
    for (int c = 0; c < NV; c++) w[c] = BH(_mm512_loadu_si512(vp + r * d16 + 16 * c));
    for (int i = 0; i < R; i++) {
      const __m512bh x = BH(pair(p + i * ps + 2 * r));
      for (int c = 0; c < NV; c++) a[i][c] = _mm512_dpbf16_ps(a[i][c], x, w[c]);
    }
  }
  for (int i = 0; i < R; i++)
    for (int c = 0; c < NV; c++) _mm512_storeu_ps(o + i * 128 + 16 * c, a[i][c]);
}

/* all 16 rows of the block through values(), in register blocks that fit 32 vector registers */
static void values16(const uint16_t* p, int64_t ps, const uint32_t* vp, int64_t d16, int64_t pairs, float* o) {
  switch (d16 / 16) {
#define CASE(NV, R) case NV: for (int i = 0; i < 16; i += R) values(p + i * ps, ps, vp, d16, pairs, o + i * 128, R, NV); break;
    CASE(1, 4) CASE(2, 4) CASE(3, 4) CASE(4, 4) CASE(5, 4) CASE(6, 4) CASE(7, 2) CASE(8, 2)
#undef CASE
  }
}

/* one (head, 16-query block) task: q0 the block's first query, rows of them valid, q/out at that head's columns */
static void block(const shape_t* sh, const uint16_t* q, int64_t qts, const uint32_t* kp, const uint32_t* vp,
                  uint16_t* out, int64_t ots, int64_t q0, int64_t rows, uint16_t* qb, float* s, uint16_t* p,
                  float* o) {
  const int64_t D = sh->D;
  for (int64_t i = 0; i < 16; i++) {
    if (i < rows) memcpy(qb + i * QS, q + (q0 + i) * qts, (size_t)D * 2);
    else memset(qb + i * QS, 0, (size_t)D * 2);
  }
  const int64_t off = sh->Tk - sh->Tq, end = sh->causal ? q0 + rows + off : sh->Tk; /* keys any row sees */
  for (int64_t i = 0; i < rows; i += 4)
    for (int64_t n0 = 0; n0 < end; n0 += KB) scores4(qb + i * QS, kp + n0, sh->nk, D, s + i * sh->nk + n0, sh->nk);
  const int64_t width = up(end, 16);
  float inv[16];
  for (int64_t i = 0; i < 16; i++) {
    if (i < rows) inv[i] = softmax_row(s + i * sh->nk, p + i * sh->n32, sh->causal ? q0 + i + off + 1 : end,
                                       width, sh->scale);
    else memset(p + i * sh->n32, 0, (size_t)width * 2);
  }
  values16(p, sh->n32, vp, sh->d16, width / 2, o);
  const __mmask16 tail = (__mmask16)((1u << (D % 16)) - 1);
  for (int64_t i = 0; i < rows; i++) {
    const __m512 f = _mm512_set1_ps(inv[i]);
    for (int64_t c0 = 0; c0 < D; c0 += 16) {
      const __m256i y = (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(o + i * 128 + c0), f));
      _mm256_mask_storeu_epi16(out + (q0 + i) * ots + c0, D - c0 >= 16 ? (__mmask16)0xffff : tail, y);
    }
  }
}

/* q, k, v: base pointers and strides (elements) of batch, head and token; returns 1 where memory ran out */
int attn_bf16(const uint16_t* q, const int64_t* qst, const uint16_t* k, const int64_t* kst, const uint16_t* v,
              const int64_t* vst, uint16_t* out, int64_t B, int64_t H, int64_t Hkv, int64_t Tq, int64_t Tk, int64_t D,
              int causal, float scale, int nthreads) {
  shape_t sh = {Tq, Tk, D, up(Tk, KB), up(Tk, 32), up(D, 16), causal, scale};
  const int64_t kwords = D / 2 * sh.nk, vwords = sh.n32 / 2 * sh.d16, nqb = (Tq + 15) / 16;
  uint32_t* kp = aligned_alloc(64, (size_t)(B * Hkv * (kwords + vwords)) * 4);
  if (!kp) return 1;
  uint32_t* vp = kp + B * Hkv * kwords;
  int failed = 0;
#pragma omp parallel num_threads(nthreads)
  {
    /* per thread: the query block (16 x QS), scores (16 x nk float32), probabilities (16 x n32), the products */
    const size_t qbytes = 16 * QS * 2, sbytes = (size_t)(16 * sh.nk * 4), pbytes = (size_t)(16 * sh.n32 * 2);
    char* scratch = aligned_alloc(64, qbytes + sbytes + pbytes + 16 * 128 * 4);
#pragma omp for schedule(static)
    for (int64_t bg = 0; bg < B * Hkv; bg++) {
      const int64_t b = bg / Hkv, g = bg % Hkv;
      pack_keys(k + b * kst[0] + g * kst[1], kst[2], Tk, sh.nk, D, kp + bg * kwords);
      pack_values(v + b * vst[0] + g * vst[1], vst[2], Tk, sh.n32, D, sh.d16, vp + bg * vwords);
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < B * H * nqb; task++) {
      if (!scratch) { /* every thread takes part in the loop; this one's tasks are left undone */
#pragma omp atomic write
        failed = 1;
        continue;
      }
      const int64_t qb0 = task % nqb, h = task / nqb % H, b = task / nqb / H, bg = b * Hkv + h / (H / Hkv);
      block(&sh, q + b * qst[0] + h * qst[1], qst[2], kp + bg * kwords, vp + bg * vwords, out + (b * Tq * H + h) * D,
            H * D, 16 * qb0, Tq - 16 * qb0 < 16 ? Tq - 16 * qb0 : 16, (uint16_t*)scratch,
            (float*)(scratch + qbytes), (uint16_t*)(scratch + qbytes + sbytes),
            (float*)(scratch + qbytes + sbytes + pbytes));
    }
    free(scratch);
  }
  free(kp);
  return failed;
}
