/* What the kernels' C files share: bfloat16 conversions, a vector e^x and a row's maximum (AVX-512). */
#pragma once
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline uint16_t f32_to_bf16(float f) {
  uint32_t u; memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}
static inline float bf16_to_f32(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
#define BH(v) ((__m512bh)(v))

/* 16 float32 -> their bfloat16 bits in the low half of each 32-bit lane, to nearest even: f32_to_bf16's, which is
 * torch's for every finite value (vcvtneps2bf16 flushes denormals to zero) */
static inline __m512i bf16_bits(__m512 f) {
  const __m512i u = _mm512_castps_si512(f);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q);
  return _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
}

static inline __m512 bf16_widen(__m512i bits) { return _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16)); }

/* e^x for x <= 0, float32: Cephes' expf polynomial after a reduction by ln 2 (within 2 ulp of expf) */
static inline __m512 exp_ps(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));  /* below: e^x is under float32's normal range, taken as e^-87 */
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

/* the largest of s[0, n), for a softmax; -inf where n is 0 */
static inline float max_ps(const float* s, int64_t n) {
  const int64_t n16 = n & ~(int64_t)15;
  const __mmask16 tm = (__mmask16)((1u << (n - n16)) - 1);
  __m512 mx = _mm512_set1_ps(-INFINITY);
  for (int64_t l = 0; l < n16; l += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(s + l));
  mx = _mm512_mask_max_ps(mx, tm, mx, _mm512_maskz_loadu_ps(tm, s + n16));
  return _mm512_reduce_max_ps(mx);
}
