/*
 * selectiveScanCore.h — the one SelectiveScan recurrence, shared by every implementation.
 *
 * This header is compiled twice: by g++ for the CPU op (selectiveScanCpu.cpp) and by nvcc for the CUDA
 * kernel (selectiveScanKernel.cu). Both call scanStep() below for every state update, so the CPU tests
 * exercise the arithmetic that runs on the GPU. Nothing here may use libm or CUDA intrinsics for the
 * maths: exp and log are our own polynomials built from +, *, fma and bit casts, which round the same
 * way on both sides (see "Bit-level agreement" below).
 *
 * Contract (the Python side: emrrg/ops/scan_contract.py; mamba-ssm selective_scan_ref with real A and
 * grouped B/C, arXiv 2312.00752):
 *
 *   dt_t = softplus(delta_t + delta_bias)       (softplus only if delta_softplus)
 *   h_t  = exp(dt_t * A) * h_{t-1} + (dt_t * u_t) * B_t      per state n in [0, N)
 *   y_t  = C_t . h_t + D * u_t
 *   y_t *= silu(z_t)                            (if z is given)
 *
 * Inputs (index: name, shape, dtype) — the same numbering as the ONNX node com.emrrg::SelectiveScan:
 *   0 u          (batch, D, L)     f32 | f16 (| bf16 on CUDA)
 *   1 delta      (batch, D, L)     like u
 *   2 A          (D, N)            f32
 *   3 B          (batch, G, N, L)  like u; channel d uses group d / (D / G)
 *   4 C          (batch, G, N, L)  like u
 *   5 D          (D)               f32, optional
 *   6 z          (batch, D, L)     like u, optional
 *   7 delta_bias (D)               f32, optional
 *   output y     (batch, D, L)     like u. Accumulation is always f32.
 *
 * Bit-level agreement: every multiply-add in this file is an explicit fmaF(). With FMA hardware
 * (x86-64-v3, aarch64, every CUDA GPU) fmaF is a single rounding on both sides; compile the CPU side
 * with -ffp-contract=off and the CUDA side with --fmad=false and the two produce the same bits for the
 * same inputs and the same summation order (n = 0..N-1). Without FMA hardware fmaF falls back to a*b+c
 * (two roundings): results then differ from the GPU by an ulp or so, which the tests tolerate anyway.
 */
#pragma once

#include <stdint.h>
#include <string.h>

// Plain C++ TUs see the qualifiers as nothing. A host TU that included the CUDA headers first (the TensorRT
// plugin, the ORT CUDA op) already has them as macros (host_defines.h): keep those, do not redefine them.
#if !defined(__CUDACC__) && !defined(__host__)
#define __host__
#endif
#if !defined(__CUDACC__) && !defined(__device__)
#define __device__
#endif

#if defined(__CUDA_ARCH__)
#define EMRRG_SCAN_UNROLL _Pragma("unroll")
#else
#define EMRRG_SCAN_UNROLL
#endif

namespace emrrg {
namespace scan {

// Largest state size N any implementation supports (the CUDA kernel keeps h in registers).
constexpr int kMaxStateDim = 64;

// ---------------------------------------------------------------------------------------------
// Scalar helpers. All __host__ __device__, all branch-free selects, so g++ vectorizes them.
// ---------------------------------------------------------------------------------------------

__host__ __device__ inline float fmaF(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#elif defined(__FMA__) || defined(__ARM_FEATURE_FMA)
  return __builtin_fmaf(a, b, c);
#else
  return a * b + c;  // no FMA hardware: two roundings (see the header comment)
#endif
}

__host__ __device__ inline float bitsToFloat(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
#endif
}

__host__ __device__ inline uint32_t floatToBits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t bits;
  memcpy(&bits, &f, sizeof bits);
  return bits;
#endif
}

// exp(x) in f32, within ~1.3 ulp of the correctly rounded result on [-87.3, 88.3].
// Range reduction x = k ln2 + r (Cody–Waite, two-part ln2), |r| <= ln2/2, then a degree-6 polynomial
// (the classic Cephes expf coefficients) and a scale by 2^k built from the exponent bits.
// Below -87.3 (result < FLT_MIN) it returns 0 (no denormals); above 88.3 it returns +inf (the true
// value is finite up to 88.72: a deviation only where the state has already blown up). NaN stays NaN.
// The input is not clamped: out of range the arithmetic yields garbage (never UB: the bit work is
// unsigned) that the two final selects replace, which keeps the vectorized loop short.
__host__ __device__ inline float expF(float x) {
  const float kLo = -87.3f, kHi = 88.3f;
  const float kLog2e = 1.44269504088896341f;
  const float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  const float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer in the low mantissa
  const float t = fmaF(x, kLog2e, kRound);
  const float k = t - kRound;                                  // round(x / ln2), exact
  const uint32_t kBits = floatToBits(t) - floatToBits(kRound);  // k as a (two's complement) integer
  float r = fmaF(k, -kLn2Hi, x);
  r = fmaF(k, -kLn2Lo, r);
  float p = 1.9875691500e-4f;
  p = fmaF(p, r, 1.3981999507e-3f);
  p = fmaF(p, r, 8.3334519073e-3f);
  p = fmaF(p, r, 4.1665795894e-2f);
  p = fmaF(p, r, 1.6666665459e-1f);
  p = fmaF(p, r, 5.0000001201e-1f);
  p = fmaF(p, r * r, r + 1.0f);
  const float scale = bitsToFloat((kBits + 127u) << 23);  // 2^k, k in [-126, 127] when in range
  const float e = p * scale;
  const float inf = bitsToFloat(0x7f800000u);
  const float capped = x > kHi ? inf : e;
  return x < kLo ? 0.0f : capped;
}

// log(v) for v in [1, 2] (all this file needs): v = m * 2^e with m in [sqrt(1/2), sqrt(2)), then the
// Cephes logf polynomial in f = m - 1 and a two-part ln2.
__host__ __device__ inline float logOneToTwoF(float v) {
  const float kSqrt2 = 1.41421356237f;
  const bool big = v > kSqrt2;
  const float m = big ? v * 0.5f : v;
  const float e = big ? 1.0f : 0.0f;
  const float f = m - 1.0f;
  const float f2 = f * f;
  float p = 7.0376836292e-2f;
  p = fmaF(p, f, -1.1514610310e-1f);
  p = fmaF(p, f, 1.1676998740e-1f);
  p = fmaF(p, f, -1.2420140846e-1f);
  p = fmaF(p, f, 1.4249322787e-1f);
  p = fmaF(p, f, -1.6668057665e-1f);
  p = fmaF(p, f, 2.0000714765e-1f);
  p = fmaF(p, f, -2.4999993993e-1f);
  p = fmaF(p, f, 3.3333331174e-1f);
  float y = p * f * f2;
  y = fmaF(e, -2.12194440e-4f, y);
  y = fmaF(f2, -0.5f, y);
  return fmaF(e, 0.693359375f, f + y);
}

// log1p(x) for x in [0, 1]: log(1 + x) * x / ((1 + x) - 1) cancels the rounding of 1 + x, so tiny x
// keep full relative precision (Goldberg's trick).
__host__ __device__ inline float log1pUnitF(float x) {
  const float v = 1.0f + x;
  const float d = v - 1.0f;
  const float ratio = x / (d == 0.0f ? 1.0f : d);
  return d == 0.0f ? x : logOneToTwoF(v) * ratio;
}

// softplus with torch's default threshold: x > 20 -> x, else log1p(exp(x)).
// Computed as max(x, 0) + log1p(exp(-|x|)) so exp never overflows.
__host__ __device__ inline float softplusF(float x) {
  const float ax = x < 0.0f ? -x : x;
  const float pos = x > 0.0f ? x : 0.0f;
  const float s = pos + log1pUnitF(expF(-ax));
  return x > 20.0f ? x : s;
}

// silu(z) = z * sigmoid(z) = z / (1 + exp(-z)); for z < -88.3 exp(-z) = inf and the result is -0.
__host__ __device__ inline float siluF(float z) { return z / (1.0f + expF(-z)); }

// dt = softplus(delta + bias) or delta + bias.
__host__ __device__ inline float discretizeDelta(float delta, float bias, bool deltaSoftplus) {
  const float d = delta + bias;
  return deltaSoftplus ? softplusF(d) : d;
}

// The element update: h' = exp(dt * a) * h + dtu * b, with dtu = dt * u.
__host__ __device__ inline float stateUpdate(float h, float dt, float a, float dtu, float b) {
  return fmaF(expF(dt * a), h, dtu * b);
}

// ---------------------------------------------------------------------------------------------
// scanStep: one time step for kChannels channels of one group (the recurrence core).
//   The CUDA kernel calls it with kChannels = 1 (one thread per channel, h in registers);
//   the CPU op with kChannels = a SIMD-friendly block (h laid out [N][kChannels], the inner loop runs
//   over contiguous channels and g++ vectorizes it).
//
//   n             state size N (<= kMaxN)
//   h   [n][kC]   state, updated in place
//   a   [n][kC]   A of these channels, transposed
//   dt  [kC]      discretized delta at t;   u [kC]   u at t
//   bt, ct        B_t, C_t of the group: element i at bt[i * bStride], ct[i * cStride]
//   y   [kC]      out: C_t . h_t (no D skip, no gate: see finishOutput)
//   y accumulates over n = 0..n-1 in order on every implementation.
// ---------------------------------------------------------------------------------------------
template <int kChannels, int kMaxN>
__host__ __device__ inline void scanStep(int n, float* __restrict__ h, const float* __restrict__ a,
                                         const float* __restrict__ dt, const float* __restrict__ u,
                                         const float* __restrict__ bt, int bStride, const float* __restrict__ ct,
                                         int cStride, float* __restrict__ y) {
  float dtu[kChannels];
  float acc[kChannels];
  for (int c = 0; c < kChannels; ++c) {
    dtu[c] = dt[c] * u[c];
    acc[c] = 0.0f;
  }
  EMRRG_SCAN_UNROLL
  for (int i = 0; i < kMaxN; ++i) {
    if (i >= n) break;
    const float b = bt[i * bStride];
    const float cc = ct[i * cStride];
    for (int c = 0; c < kChannels; ++c) {
      const float hn = stateUpdate(h[i * kChannels + c], dt[c], a[i * kChannels + c], dtu[c], b);
      h[i * kChannels + c] = hn;
      acc[c] = fmaF(cc, hn, acc[c]);
    }
  }
  for (int c = 0; c < kChannels; ++c) y[c] = acc[c];
}

// y = (y + D * u) * silu(z): the skip connection and the gate, applied after scanStep.
__host__ __device__ inline float finishOutput(float y, float u, bool hasD, float dSkip, bool hasZ, float z) {
  const float withSkip = hasD ? fmaF(u, dSkip, y) : y;
  return hasZ ? withSkip * siluF(z) : withSkip;
}

}  // namespace scan
}  // namespace emrrg
