/* Matrix-vector products for llava-cli's one-token decode, called through ctypes (see __init__.py).
 *   bf16mv: y = W x, W bfloat16 (M, K) row-major contiguous, x bfloat16 (K), y bfloat16 (M); float32 accumulation
 *           (AVX512-BF16 vdpbf16ps), one round-to-nearest-even to bfloat16 at the end, as torch.mv.
 *   int8mv: y = (Q x) * s, Q int8 (M, K), s bfloat16 (M) per-row scales, x bfloat16 (K); each weight converted to
 *           float32 and multiplied-added in float32, the scale applied to the row sum, as torch's _weight_int8pack_mm.
 * Only unaligned and masked loads: no alignment is assumed (memory-mapped safetensors are 2-byte aligned), and the
 * tail of a row (K not a multiple of 32 or 16) is read with a mask, never past the row.
 * Rows are split across OpenMP threads in blocks of 8, one parallel region per call; the library is linked against
 * the libgomp torch already has mapped, so the threads are torch's pool, not a second one.
 * Why: a few rows per iteration and a software prefetch into L2 16 KB ahead stream the weights at ~26 GB/s on
 * 2 cores (torch.mv: ~20; _weight_int8pack_mm: ~12), measured on the interleave-qwen-0.5b shapes.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define PF_BYTES 16384 /* software prefetch distance into L2: plateau from ~1 row-block to 64 KB */

int mv_cpu_ok(void) {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
}

static inline uint16_t f32_to_bf16(float f) {
  uint32_t u; memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}
static inline float bf16_to_f32(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
#define BH(v) ((__m512bh)(v))

/* bfloat16: 4 rows per iteration share each load of x */
static void bf16_rows(const uint16_t* restrict W, const uint16_t* restrict x, uint16_t* restrict y,
                 int64_t r0, int64_t r1, int64_t K) {
  const int64_t K32 = K & ~(int64_t)31;
  const __mmask32 tm = (__mmask32)((K - K32) ? ((1ull << (K - K32)) - 1) : 0);
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) {
    const uint16_t* w = W + r * K;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t k = 0; k < K32; k += 32) {
      __m512bh xv = BH(_mm512_loadu_si512(x + k));
      _mm_prefetch((const char*)(w + k) + PF_BYTES, _MM_HINT_T1);
      _mm_prefetch((const char*)(w + K + k) + PF_BYTES, _MM_HINT_T1);
      _mm_prefetch((const char*)(w + 2 * K + k) + PF_BYTES, _MM_HINT_T1);
      _mm_prefetch((const char*)(w + 3 * K + k) + PF_BYTES, _MM_HINT_T1);
      a0 = _mm512_dpbf16_ps(a0, BH(_mm512_loadu_si512(w + k)), xv);
      a1 = _mm512_dpbf16_ps(a1, BH(_mm512_loadu_si512(w + K + k)), xv);
      a2 = _mm512_dpbf16_ps(a2, BH(_mm512_loadu_si512(w + 2 * K + k)), xv);
      a3 = _mm512_dpbf16_ps(a3, BH(_mm512_loadu_si512(w + 3 * K + k)), xv);
    }
    if (tm) {
      __m512bh xv = BH(_mm512_maskz_loadu_epi16(tm, x + K32));
      a0 = _mm512_dpbf16_ps(a0, BH(_mm512_maskz_loadu_epi16(tm, w + K32)), xv);
      a1 = _mm512_dpbf16_ps(a1, BH(_mm512_maskz_loadu_epi16(tm, w + K + K32)), xv);
      a2 = _mm512_dpbf16_ps(a2, BH(_mm512_maskz_loadu_epi16(tm, w + 2 * K + K32)), xv);
      a3 = _mm512_dpbf16_ps(a3, BH(_mm512_maskz_loadu_epi16(tm, w + 3 * K + K32)), xv);
    }
    y[r] = f32_to_bf16(_mm512_reduce_add_ps(a0));
    y[r + 1] = f32_to_bf16(_mm512_reduce_add_ps(a1));
    y[r + 2] = f32_to_bf16(_mm512_reduce_add_ps(a2));
    y[r + 3] = f32_to_bf16(_mm512_reduce_add_ps(a3));
  }
  for (; r < r1; r++) {
    const uint16_t* w = W + r * K;
    __m512 a = _mm512_setzero_ps();
    for (int64_t k = 0; k < K32; k += 32)
      a = _mm512_dpbf16_ps(a, BH(_mm512_loadu_si512(w + k)), BH(_mm512_loadu_si512(x + k)));
    if (tm)
      a = _mm512_dpbf16_ps(a, BH(_mm512_maskz_loadu_epi16(tm, w + K32)), BH(_mm512_maskz_loadu_epi16(tm, x + K32)));
    y[r] = f32_to_bf16(_mm512_reduce_add_ps(a));
  }
}

/* int8: 2 rows per iteration (measured: 1-3 rows alike, 4 and 8 ~5% slower), 16 weights per float32 vector */
#define CV(p) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(p))))
#define CVM(m, p) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8((m), (p))))

static void int8_rows(const int8_t* restrict W, const float* restrict x, const uint16_t* restrict s,
                      uint16_t* restrict y, int64_t r0, int64_t r1, int64_t K) {
  const int64_t K64 = K & ~(int64_t)63, K16 = K & ~(int64_t)15;
  const __mmask16 tm = (__mmask16)((K - K16) ? ((1u << (K - K16)) - 1) : 0);
  int64_t r = r0;
  for (; r + 2 <= r1; r += 2) {
    const int8_t* w = W + r * K;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0;
    int64_t k = 0;
    for (; k < K64; k += 64) {
      _mm_prefetch((const char*)(w + k) + PF_BYTES, _MM_HINT_T1);
      _mm_prefetch((const char*)(w + K + k) + PF_BYTES, _MM_HINT_T1);
      for (int j = 0; j < 64; j += 16) {
        __m512 xv = _mm512_loadu_ps(x + k + j);
        a0 = _mm512_fmadd_ps(CV(w + k + j), xv, a0);
        a1 = _mm512_fmadd_ps(CV(w + K + k + j), xv, a1);
      }
    }
    for (; k < K16; k += 16) {
      __m512 xv = _mm512_loadu_ps(x + k);
      a0 = _mm512_fmadd_ps(CV(w + k), xv, a0);
      a1 = _mm512_fmadd_ps(CV(w + K + k), xv, a1);
    }
    if (tm) {
      __m512 xv = _mm512_maskz_loadu_ps(tm, x + K16);
      a0 = _mm512_fmadd_ps(CVM(tm, w + K16), xv, a0);
      a1 = _mm512_fmadd_ps(CVM(tm, w + K + K16), xv, a1);
    }
    y[r] = f32_to_bf16(_mm512_reduce_add_ps(a0) * bf16_to_f32(s[r]));
    y[r + 1] = f32_to_bf16(_mm512_reduce_add_ps(a1) * bf16_to_f32(s[r + 1]));
  }
  for (; r < r1; r++) {
    const int8_t* w = W + r * K;
    __m512 a = _mm512_setzero_ps();
    for (int64_t k = 0; k < K16; k += 16) a = _mm512_fmadd_ps(CV(w + k), _mm512_loadu_ps(x + k), a);
    if (tm) a = _mm512_fmadd_ps(CVM(tm, w + K16), _mm512_maskz_loadu_ps(tm, x + K16), a);
    y[r] = f32_to_bf16(_mm512_reduce_add_ps(a) * bf16_to_f32(s[r]));
  }
}

/* Thread t of nt takes rows [start(t), start(t + 1)): equal shares rounded to blocks of 8 rows. */
static int64_t start(int t, int nt, int64_t M) {
  if (t >= nt) return M;
  int64_t r = ((M * t / nt) + 4) & ~(int64_t)7;
  return r < M ? r : M;
}

#define SMALL (1 << 16) /* weights: below this one thread is faster than waking the others */

void bf16mv(const uint16_t* W, const uint16_t* x, uint16_t* y, int64_t M, int64_t K, int nthreads) {
  if (nthreads <= 1 || M * K < SMALL) {
    bf16_rows(W, x, y, 0, M, K);
    return;
  }
#pragma omp parallel num_threads(nthreads)
  {
    int t = omp_get_thread_num(), nt = omp_get_num_threads();
    int64_t r0 = start(t, nt, M), r1 = start(t + 1, nt, M);
    if (r1 > r0) bf16_rows(W, x, y, r0, r1, K);
  }
}

/* Returns 0, or -1 when the float32 copy of x cannot be allocated (the caller falls back to torch). */
int int8mv(const int8_t* Q, const uint16_t* xb, const uint16_t* s, uint16_t* y, int64_t M, int64_t K, int nthreads) {
  float* x = (float*)malloc((size_t)K * sizeof(float));
  if (!x) return -1;
  for (int64_t k = 0; k < K; k++) x[k] = bf16_to_f32(xb[k]);
  if (nthreads <= 1 || M * K < SMALL) {
    int8_rows(Q, x, s, y, 0, M, K);
  } else {
#pragma omp parallel num_threads(nthreads)
    {
      int t = omp_get_thread_num(), nt = omp_get_num_threads();
      int64_t r0 = start(t, nt, M), r1 = start(t + 1, nt, M);
      if (r1 > r0) int8_rows(Q, x, s, y, r0, r1, K);
    }
  }
  free(x);
  return 0;
}
