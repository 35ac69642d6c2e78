/*
 * scan_lower_bound.c — the compute floor for the SelectiveScan benchmark (benchmarks/scan_op.py).
 *
 * The smallest plain-C loop of the recurrence, vectorized across channels, that a C compiler turns into
 * good SIMD code with the same flags as the op (-O3 -ffp-contract=off -fno-trapping-math -march=...):
 *
 *     h[n][d] = exp(dt[t][d] * A[n][d]) * h[n][d] + dt[t][d] * u[t][d] * B[t][g(d)][n]
 *     y[t][d] = sum_n C[t][g(d)][n] * h[n][d]
 *
 * It is deliberately given every advantage the op does not have: inputs already time-major (L, D),
 * dt already discretized (no softplus), no D skip, no silu(z) gate, no f16, no layout transposes, no
 * ONNX Runtime call. So op time / lower-bound time is the price of everything except the recurrence.
 * exp is a short Cephes-style polynomial with fmaf (plain C, no libm: libm's expf does not vectorize without
 * -ffast-math); fmaf is an explicit fused multiply-add, so -ffp-contract=off does not split it.
 * Channels are split across threads with OpenMP when built with -fopenmp.
 *
 * Independent of plugins/selective_scan on purpose: it shares no code with the op it bounds.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

static inline float lb_exp(float x) {
  /* exp(x) = 2^k * exp(r), r = x - k ln2; valid on [-87, 88], clamped (branch-free selects). */
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float t = fmaf(x, 1.44269504f, 12582912.0f);
  const float k = t - 12582912.0f;
  float r = fmaf(k, -0.693359375f, x);
  r = fmaf(k, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = fmaf(p, r, 1.3981999507e-3f);
  p = fmaf(p, r, 8.3334519073e-3f);
  p = fmaf(p, r, 4.1665795894e-2f);
  p = fmaf(p, r, 1.6666665459e-1f);
  p = fmaf(p, r, 5.0000001201e-1f);
  p = fmaf(p, r * r, r + 1.0f);
  int32_t bits = ((int32_t)k + 127) << 23;
  float s;
  memcpy(&s, &bits, sizeof s);
  return p * s;
}

/*
 * dt, u, y: (L, D) time-major. A: (N, D) (transposed). B, C: (L, G, N). h: unused scratch (kept for the
 * ctypes signature). Channel d belongs to group d / (D / G).
 *
 * Work item = LB_VEC adjacent channels of one group (two AVX2 vectors); their N states stay in a local
 * array (registers when N is the compile-time 16) across all L steps, so each step reads only dt, u,
 * one row of A per state and writes y once. A group whose width is not a multiple of LB_VEC ends in a
 * scalar tail. N <= LB_NMAX.
 */
#define LB_VEC 16
#define LB_NMAX 64

/* One item, full width (LB_VEC channels). Inlined with a constant n_state where the caller knows N, so
 * the state array is unrolled into registers. */
static inline __attribute__((always_inline)) void lb_item(const int n_state, int L, int D, int G, int g, int d0,
                                                          const float* dt, const float* u, const float* A,
                                                          const float* B, const float* C, float* y) {
  float hs[LB_NMAX][LB_VEC];
  for (int n = 0; n < n_state; ++n)
    for (int j = 0; j < LB_VEC; ++j) hs[n][j] = 0.0f;
  for (int t = 0; t < L; ++t) {
    const float* dtt = dt + (size_t)t * D + d0;
    const float* ut = u + (size_t)t * D + d0;
    const float* Bt = B + ((size_t)t * G + g) * n_state;
    const float* Ct = C + ((size_t)t * G + g) * n_state;
    float xv[LB_VEC], yv[LB_VEC];
    for (int j = 0; j < LB_VEC; ++j) {
      xv[j] = dtt[j] * ut[j];
      yv[j] = 0.0f;
    }
    for (int n = 0; n < n_state; ++n) {
      const float b = Bt[n], c = Ct[n];
      const float* an = A + (size_t)n * D + d0;
      for (int j = 0; j < LB_VEC; ++j) {
        const float hv = fmaf(lb_exp(dtt[j] * an[j]), hs[n][j], xv[j] * b);
        hs[n][j] = hv;
        yv[j] = fmaf(c, hv, yv[j]);
      }
    }
    float* yt = y + (size_t)t * D + d0;
    for (int j = 0; j < LB_VEC; ++j) yt[j] = yv[j];
  }
}

/* The tail of a group narrower than LB_VEC: plain scalar loop. */
static void lb_tail(int n_state, int L, int D, int G, int g, int d0, int w, const float* dt, const float* u,
                    const float* A, const float* B, const float* C, float* y) {
  for (int d = d0; d < d0 + w; ++d) {
    float hs[LB_NMAX] = {0};
    for (int t = 0; t < L; ++t) {
      const float a = dt[(size_t)t * D + d], x = a * u[(size_t)t * D + d];
      float acc = 0.0f;
      for (int n = 0; n < n_state; ++n) {
        hs[n] = lb_exp(a * A[(size_t)n * D + d]) * hs[n] + x * B[((size_t)t * G + g) * n_state + n];
        acc += C[((size_t)t * G + g) * n_state + n] * hs[n];
      }
      y[(size_t)t * D + d] = acc;
    }
  }
}

void lower_bound_scan(int L, int D, int N, int G, const float* dt, const float* u, const float* A,
                      const float* B, const float* C, float* h, float* y, int threads) {
  (void)h;
  const int per_group = D / G;
  const int blocks_per_group = (per_group + LB_VEC - 1) / LB_VEC;
  const int items = G * blocks_per_group;
  if (N > LB_NMAX) return;
#ifdef _OPENMP
  if (threads > 0) omp_set_num_threads(threads);
#pragma omp parallel for schedule(static)
#else
  (void)threads;
#endif
  for (int item = 0; item < items; ++item) {
    const int g = item / blocks_per_group;
    const int d0 = g * per_group + (item % blocks_per_group) * LB_VEC;
    const int d_end = (g + 1) * per_group;
    if (d0 + LB_VEC > d_end)
      lb_tail(N, L, D, G, g, d0, d_end - d0, dt, u, A, B, C, y);
    else if (N == 16)
      lb_item(16, L, D, G, g, d0, dt, u, A, B, C, y);
    else
      lb_item(N, L, D, G, g, d0, dt, u, A, B, C, y);
  }
}
