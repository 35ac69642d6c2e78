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
 * exp is a short Cephes-style polynomial (plain C, no libm: libm's expf does not vectorize without
 * -ffast-math). Channels are split across threads with OpenMP when built with -fopenmp.
 *
 * Independent of plugins/selective_scan on purpose: it shares no code with the op it bounds.
 */
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

static inline float lb_exp(float x) {
  /* exp(x) = 2^k * exp(r), r = x - k ln2; valid on [-87, 88], clamped outside. */
  if (x < -87.0f) x = -87.0f;
  if (x > 88.0f) x = 88.0f;
  float k = x * 1.44269504f + 12582912.0f;
  k -= 12582912.0f;
  float r = x - k * 0.693359375f;
  r = r + k * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = ((int32_t)k + 127) << 23;
  float s;
  memcpy(&s, &bits, sizeof s);
  return p * s;
}

/*
 * dt, u, y: (L, D) time-major. A: (N, D) (transposed). B, C: (L, G, N). h: scratch (N, D), zeroed here.
 * Channel d belongs to group d / (D / G).
 */
void lower_bound_scan(int L, int D, int N, int G, const float* dt, const float* u, const float* A,
                      const float* B, const float* C, float* h, float* y, int threads) {
  const int per_group = D / G;
  const int block = 64; /* channels per work item: h and A rows of the block stay in L1 */
  const int blocks_per_group = (per_group + block - 1) / block;
  const int items = G * blocks_per_group;
#ifdef _OPENMP
  if (threads > 0) omp_set_num_threads(threads);
#pragma omp parallel for schedule(static)
#else
  (void)threads;
#endif
  for (int item = 0; item < items; ++item) {
    const int g = item / blocks_per_group;
    const int d0 = g * per_group + (item % blocks_per_group) * block;
    const int d_end = (g + 1) * per_group;
    const int d1 = d0 + block < d_end ? d0 + block : d_end;
    for (int n = 0; n < N; ++n)
      for (int d = d0; d < d1; ++d) h[n * D + d] = 0.0f;
    for (int t = 0; t < L; ++t) {
      const float* dtt = dt + (size_t)t * D;
      const float* ut = u + (size_t)t * D;
      float* yt = y + (size_t)t * D;
      for (int d = d0; d < d1; ++d) yt[d] = 0.0f;
      const float* Bt = B + ((size_t)t * G + g) * N;
      const float* Ct = C + ((size_t)t * G + g) * N;
      for (int n = 0; n < N; ++n) {
        const float b = Bt[n], c = Ct[n];
        float* hn = h + (size_t)n * D;
        const float* an = A + (size_t)n * D;
        for (int d = d0; d < d1; ++d) {
          const float hv = lb_exp(dtt[d] * an[d]) * hn[d] + dtt[d] * ut[d] * b;
          hn[d] = hv;
          yt[d] += c * hv;
        }
      }
    }
  }
}
