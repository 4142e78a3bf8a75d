/* int8 and int4 weights back to bfloat16 rows, for products of many rows (a prompt's prefill, a long chat turn), which
 * oneDNN's bfloat16 matmul runs near the machine's peak; called through ctypes (dequant.py).
 *   int8_dequant: W[r][k] = bf16(q[r][k] * s[r]), q int8 rows (M, K) or in tiles of 4 rows (kernels.int8_tiles).
 *   int4_dequant: W[r][k] = bf16(bf16((q - 8) * scale) + zero), q the nibbles of (M, K / 2) bytes (low first),
 *                 (scale, zero) per group of G inputs of a row (row_scales, (M, K / G, 2)).
 * The roundings are those of torch's `q.to(bfloat16) * scales` and `(q - 8) * scale + zero` in bfloat16 (each
 * operation in float32, rounded to nearest even), so the weights are the same bits as quant_layers' dequantize().
 * Why: those torch operations take 4-6 passes over the matrix, each into a new tensor, and a tensor over glibc's
 * 32 MB mmap threshold comes back as fresh pages to fault in: 11-22 s of a 7B model's first token. One pass into a
 * buffer that is used again is ~25x less.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

#include "simd.h"

#define ROWS 64 /* rows a task: a few tasks a thread even on the smallest matrices */

/* 16 float32 -> their bfloat16 bits in the low half of each 32-bit lane, to nearest even (f32_to_bf16's) */
static inline __m512i bf16_bits(__m512 f) {
  const __m512i u = _mm512_castps_si512(f);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q);
  return _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
}

static inline __m512 bf16_widen(__m512i bits) { return _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16)); }

/* 16 int8 times the row's scale, rounded, stored as 16 bfloat16; m: which of the 16 are there */
static inline void int8_16(const int8_t* q, __m512 s, uint16_t* out, __mmask16 m) {
  const __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, q)));
  _mm256_mask_storeu_epi16(out, m, _mm512_cvtepi32_epi16(bf16_bits(_mm512_mul_ps(f, s))));
}

void int8_dequant(const int8_t* Q, const uint16_t* s, uint16_t* W, int64_t M, int64_t K, int tiled, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t r0 = 0; r0 < M; r0 += ROWS) {
    const int64_t r1 = r0 + ROWS < M ? r0 + ROWS : M;
    if (tiled) { /* rows and ROWS multiples of 4, K of 32: tile (r / 4, k / 32) holds 4 rows' 32 inputs in turn */
      for (int64_t r = r0; r < r1; r += 4) {
        const int8_t* t = Q + r * K;
        __m512 sc[4];
        for (int i = 0; i < 4; i++) sc[i] = _mm512_set1_ps(bf16_to_f32(s[r + i]));
        for (int64_t k = 0; k < K; k += 32, t += 128)
          for (int i = 0; i < 4; i++) {
            int8_16(t + i * 32, sc[i], W + (r + i) * K + k, 0xffff);
            int8_16(t + i * 32 + 16, sc[i], W + (r + i) * K + k + 16, 0xffff);
          }
      }
    } else {
      for (int64_t r = r0; r < r1; r++) {
        const __m512 sc = _mm512_set1_ps(bf16_to_f32(s[r]));
        for (int64_t k = 0; k < K; k += 16)
          int8_16(Q + r * K + k, sc, W + r * K + k, K - k >= 16 ? 0xffff : (__mmask16)((1u << (K - k)) - 1));
      }
    }
  }
}

/* G a multiple of 32 (quant_layers.GROUP_SIZES), so a group's bytes are whole 16s */
void int4_dequant(const uint8_t* Q, const uint16_t* sz, uint16_t* W, int64_t M, int64_t K, int64_t G, int nthreads) {
  const int64_t groups = K / G;
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t r0 = 0; r0 < M; r0 += ROWS) {
    const int64_t r1 = r0 + ROWS < M ? r0 + ROWS : M;
    for (int64_t r = r0; r < r1; r++)
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
}
