/* int8 and int4 weights to and from their formats (quant_layers.py), called through ctypes (codec.py).
 *   int8_quantize: per row, s = bf16(max(max |w|, 1e-8) / 127), q = clamp(rint(w / s), -127, 127).
 *   int4_quantize: per group of G inputs of a row, scale = bf16(max((hi - lo) / 15, 1e-8)), zero = bf16(lo + 8 scale),
 *                  q = clamp(rint((w - zero) / scale + 8), 0, 15), two a byte (low nibble first).
 *   int8_tile:     int8 rows (M, K) rearranged in place into tiles of 4 rows (kernels.int8_tiles).
 *   int8_dequant:  W[r][k] = bf16(q[r][k] * s[r]), q int8 rows (M, K) or in tiles of 4 rows.
 *   int4_dequant:  W[r][k] = bf16(bf16((q - 8) * scale) + zero), (scale, zero) per group (row_scales, (M, K / G, 2)).
 * Each follows quant_layers' torch operations step by step in float32 (the weights read as float32 from bfloat16,
 * float16 or float32; every division and product rounded as torch rounds it, rint to nearest even), so finite weights
 * give the same bits. Why: those torch operations take 4-8 passes over a matrix, each into a new tensor, and a tensor
 * over glibc's 32 MB mmap threshold comes back as fresh pages to fault in: quantizing a 7B model at load took ~40 s,
 * and dequantizing it for a prefill made its first token 1.5x (int8) and 2x (int4) as slow as bfloat16's. One pass
 * each here, the prefill's into a buffer that is used again.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

#define NEAREST (_MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC) /* torch's round(): half to even */

/* 16 weights from w[i..] as float32, exactly: type 0 float32, 1 bfloat16, 2 float16; m: which are there (0 past) */
static inline __m512 load16(const void* w, int type, int64_t i, __mmask16 m) {
  if (type == 0) return _mm512_maskz_loadu_ps(m, (const float*)w + i);
  const __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t*)w + i);
  return type == 1 ? bf16_widen(_mm512_cvtepu16_epi32(h)) : _mm512_cvtph_ps(h);
}

static inline __mmask16 first(int64_t n) { return n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1); }
static inline float rounded(float f) { return bf16_to_f32(f32_to_bf16(f)); } /* through bfloat16 and back */

/* 16 int8 times the row's scale, rounded, stored as 16 bfloat16; m: which of the 16 are there */
static inline void int8_16(const int8_t* q, __m512 s, uint16_t* out, __mmask16 m) {
  const __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, q)));
  _mm256_mask_storeu_epi16(out, m, _mm512_cvtepi32_epi16(bf16_bits(_mm512_mul_ps(f, s))));
}

void int8_dequant(const int8_t* Q, const uint16_t* s, uint16_t* W, int64_t M, int64_t K, int tiled, int nthreads) {
  if (tiled) { /* M a multiple of 4, K of 32: tile (r / 4, k / 32) holds 4 rows' 32 inputs in turn */
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < M; r += 4) {
      const int8_t* t = Q + r * K;
      __m512 sc[4];
      for (int i = 0; i < 4; i++) sc[i] = _mm512_set1_ps(bf16_to_f32(s[r + i]));
      for (int64_t k = 0; k < K; k += 32, t += 128)
        for (int i = 0; i < 4; i++) {
          int8_16(t + i * 32, sc[i], W + (r + i) * K + k, 0xffff);
          int8_16(t + i * 32 + 16, sc[i], W + (r + i) * K + k + 16, 0xffff);
        }
    }
    return;
  }
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t r = 0; r < M; r++) {
    const __m512 sc = _mm512_set1_ps(bf16_to_f32(s[r]));
    for (int64_t k = 0; k < K; k += 16) int8_16(Q + r * K + k, sc, W + r * K + k, first(K - k));
  }
}

/* G a multiple of 32 (quant_layers.GROUP_SIZES), so a group's bytes are whole 16s */
void int4_dequant(const uint8_t* Q, const uint16_t* sz, uint16_t* W, int64_t M, int64_t K, int64_t G, int nthreads) {
  const int64_t groups = K / G;
#pragma omp parallel for num_threads(nthreads) schedule(static) /* contiguous shares of the rows */
  for (int64_t r = 0; r < M; r++)
    for (int64_t g = 0; g < groups; g++) {
      const __m512 scale = _mm512_set1_ps(bf16_to_f32(sz[(r * groups + g) * 2]));
      const __m512 zero = _mm512_set1_ps(bf16_to_f32(sz[(r * groups + g) * 2 + 1]));
      const uint8_t* q = Q + r * (K / 2) + g * (G / 2);
      uint16_t* out = W + r * K + g * G;
      for (int64_t j = 0; j < G / 2; j += 16) { /* 16 bytes: 32 weights, q[2j] low nibble, q[2j + 1] high */
        const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(q + j)));
        __m512i w[2];
        for (int h = 0; h < 2; h++) {
          const __m512i n = h ? _mm512_srli_epi32(b, 4) : _mm512_and_si512(b, _mm512_set1_epi32(15));
          const __m512 p = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(n, _mm512_set1_epi32(8))), scale);
          w[h] = bf16_bits(_mm512_add_ps(bf16_widen(bf16_bits(p)), zero));
        }
        _mm512_storeu_si512(out + 2 * j, _mm512_or_si512(w[0], _mm512_slli_epi32(w[1], 16)));
      }
    }
}

void int8_quantize(const void* w, int type, int64_t M, int64_t K, int8_t* Q, uint16_t* S, int nthreads) {
  const size_t size = type == 0 ? 4 : 2;
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t r = 0; r < M; r++) {
    const void* row = (const char*)w + r * K * size;
    __m512 mx = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(load16(row, type, k, first(K - k))));
    const float amax = _mm512_reduce_max_ps(mx);
    S[r] = f32_to_bf16((amax > 1e-8f ? amax : 1e-8f) / 127.f);
    const __m512 s = _mm512_set1_ps(bf16_to_f32(S[r]));
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 m = first(K - k);
      __m512 q = _mm512_roundscale_ps(_mm512_div_ps(load16(row, type, k, m), s), NEAREST);
      q = _mm512_min_ps(_mm512_max_ps(q, _mm512_set1_ps(-127.f)), _mm512_set1_ps(127.f));
      _mm_mask_storeu_epi8(Q + r * K + k, m, _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(q)));
    }
  }
}

/* G a multiple of 32 (quant_layers.GROUP_SIZES); SZ (M, K / G, 2): each group's scale and zero */
void int4_quantize(const void* w, int type, int64_t M, int64_t K, int64_t G, uint8_t* Q, uint16_t* SZ,
                   int nthreads) {
  const size_t size = type == 0 ? 4 : 2;
  const int64_t groups = K / G;
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t r = 0; r < M; r++)
    for (int64_t g = 0; g < groups; g++) {
      const void* at = (const char*)w + (r * K + g * G) * size;
      __m512 lo = _mm512_set1_ps(INFINITY), hi = _mm512_set1_ps(-INFINITY);
      for (int64_t k = 0; k < G; k += 16) {
        const __m512 v = load16(at, type, k, 0xffff);
        lo = _mm512_min_ps(lo, v);
        hi = _mm512_max_ps(hi, v);
      }
      const float l = _mm512_reduce_min_ps(lo), step = (_mm512_reduce_max_ps(hi) - l) / 15.f;
      const float scale = rounded(step > 1e-8f ? step : 1e-8f), zero = rounded(l + 8.f * scale);
      SZ[(r * groups + g) * 2] = f32_to_bf16(scale);
      SZ[(r * groups + g) * 2 + 1] = f32_to_bf16(zero);
      const __m512 s = _mm512_set1_ps(scale), z = _mm512_set1_ps(zero), eight = _mm512_set1_ps(8.f);
      for (int64_t k = 0; k < G; k += 32) { /* 32 weights -> 16 bytes */
        __m512i q[2];
        for (int h = 0; h < 2; h++) {
          const __m512 v = load16(at, type, k + 16 * h, 0xffff);
          const __m512 n = _mm512_roundscale_ps(_mm512_add_ps(_mm512_div_ps(_mm512_sub_ps(v, z), s), eight), NEAREST);
          q[h] = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(n, _mm512_setzero_ps()), _mm512_set1_ps(15.f)));
        }
        /* as 32-bit lanes of 16-bit q: (q[2j], q[2j + 1]) -> q[2j] | q[2j + 1] << 4 */
        const __m512i p = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi32_epi16(q[0])),
                                             _mm512_cvtepi32_epi16(q[1]), 1);
        const __m512i b = _mm512_or_si512(_mm512_and_si512(p, _mm512_set1_epi32(15)), _mm512_srli_epi32(p, 12));
        _mm_storeu_si128((__m128i*)(Q + r * (K / 2) + (g * G + k) / 2), _mm512_cvtepi32_epi8(b));
      }
    }
}

/* rows a multiple of 4, K of 32: each 4 rows' bytes become their tiles, (K / 32, 4, 32), in place; -1 where a
 * thread's copy of 4 rows cannot be allocated (nothing changed in that block's rows: the caller falls back) */
int int8_tile(int8_t* Q, int64_t M, int64_t K, int nthreads) {
  int failed = 0;
#pragma omp parallel num_threads(nthreads)
  {
    int8_t* rows = malloc((size_t)(4 * K));
    if (!rows) {
#pragma omp atomic write
      failed = 1;
    }
#pragma omp barrier
    if (!failed)
#pragma omp for schedule(static)
      for (int64_t r = 0; r < M; r += 4) {
        int8_t* block = Q + r * K;
        memcpy(rows, block, (size_t)(4 * K));
        for (int64_t k = 0; k < K; k += 32)
          for (int i = 0; i < 4; i++) memcpy(block + k * 4 + i * 32, rows + i * K + k, 32);
      }
    free(rows);
  }
  return failed ? -1 : 0;
}
