// selectiveScanKernel.cu — CUDA kernel and launcher for SelectiveScan. Design: selectiveScanKernel.h.
#include "selectiveScanKernel.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "selectiveScanCore.h"

namespace emrrg {
namespace scan {
namespace {

// [emrrg:constants-begin]
constexpr int kThreadsPerBlock = 128;
constexpr int kStageFloats = 4096;  // per staged array (B and C): 16 KB each
// [emrrg:constants-end]

__device__ __forceinline__ float toFloat(float v) { return v; }
__device__ __forceinline__ float toFloat(__half v) { return __half2float(v); }
__device__ __forceinline__ float toFloat(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T fromFloat(float v);
template <>
__device__ __forceinline__ float fromFloat<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half fromFloat<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 fromFloat<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// [emrrg:kernel-begin] tests/plugins/test_cuda_compile.py also compiles this region with g++, running
// every CUDA thread of a block as a std::thread (host emulation), to check the indexing and the
// B/C staging against the CPU op bit for bit. Keep it free of device-only intrinsics.
template <typename T, int kMaxN>
__global__ void __launch_bounds__(kThreadsPerBlock) selectiveScanKernel(SelectiveScanParams p) {
  __shared__ float sB[kStageFloats];  // [n][chunk]: B of this block's group for the current time chunk
  __shared__ float sC[kStageFloats];

  const int n = p.dstate;
  const int L = p.seqlen;
  const int perGroup = p.dim / p.groups;
  const int g = blockIdx.y;
  const int b = blockIdx.z;
  const int local = blockIdx.x * kThreadsPerBlock + threadIdx.x;
  const bool active = local < perGroup;  // inactive threads still help stage and sync
  const int d = g * perGroup + (active ? local : 0);

  const T* __restrict__ u = static_cast<const T*>(p.u);
  const T* __restrict__ delta = static_cast<const T*>(p.delta);
  const T* __restrict__ z = static_cast<const T*>(p.z);
  const T* __restrict__ B = static_cast<const T*>(p.B);
  const T* __restrict__ C = static_cast<const T*>(p.C);
  T* __restrict__ y = static_cast<T*>(p.y);

  float h[kMaxN];
  float a[kMaxN];
#pragma unroll
  for (int i = 0; i < kMaxN; ++i) {
    h[i] = 0.0f;
    a[i] = (i < n) ? p.A[static_cast<size_t>(d) * n + i] : 0.0f;
  }
  const float bias = p.deltaBias != nullptr ? p.deltaBias[d] : 0.0f;
  const bool hasD = p.D != nullptr;
  const bool hasZ = z != nullptr;
  const float dSkip = hasD ? p.D[d] : 0.0f;
  const size_t row = (static_cast<size_t>(b) * p.dim + d) * L;
  const size_t bcBase = (static_cast<size_t>(b) * p.groups + g) * static_cast<size_t>(n) * L;
  const int chunk = kStageFloats / n;  // n <= 64, so chunk >= 64

  for (int t0 = 0; t0 < L; t0 += chunk) {
    const int len = min(chunk, L - t0);
    __syncthreads();  // the previous chunk has been consumed
    for (int idx = threadIdx.x; idx < len * n; idx += kThreadsPerBlock) {
      const int i = idx / len;
      const int t = idx - i * len;
      const size_t src = bcBase + static_cast<size_t>(i) * L + t0 + t;  // coalesced along t
      sB[i * chunk + t] = toFloat(B[src]);
      sC[i * chunk + t] = toFloat(C[src]);
    }
    __syncthreads();
    if (active) {
      for (int t = 0; t < len; ++t) {
        const size_t at = row + t0 + t;
        const float ut = toFloat(u[at]);
        const float dt = discretizeDelta(toFloat(delta[at]), bias, p.deltaSoftplus);
        float yt;
        scanStep<1, kMaxN>(n, h, a, &dt, &ut, sB + t, chunk, sC + t, chunk, &yt);
        y[at] = fromFloat<T>(finishOutput(yt, ut, hasD, dSkip, hasZ, hasZ ? toFloat(z[at]) : 0.0f));
      }
    }
  }
}

// [emrrg:kernel-end]

template <typename T, int kMaxN>
cudaError_t launchTyped(const SelectiveScanParams& p, cudaStream_t stream) {
  const int perGroup = p.dim / p.groups;
  const dim3 grid((perGroup + kThreadsPerBlock - 1) / kThreadsPerBlock, p.groups, p.batch);
  selectiveScanKernel<T, kMaxN><<<grid, kThreadsPerBlock, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launchForN(const SelectiveScanParams& p, cudaStream_t stream) {
  if (p.dstate <= 16) return launchTyped<T, 16>(p, stream);
  if (p.dstate <= 32) return launchTyped<T, 32>(p, stream);
  return launchTyped<T, kMaxStateDim>(p, stream);
}

}  // namespace

cudaError_t launchSelectiveScan(const SelectiveScanParams& p, cudaStream_t stream) {
  if (p.batch < 0 || p.dim <= 0 || p.seqlen < 0 || p.groups <= 0 || p.dim % p.groups != 0) {
    return cudaErrorInvalidValue;
  }
  if (p.dstate <= 0 || p.dstate > kMaxStateDim || p.groups > 65535 || p.batch > 65535) return cudaErrorInvalidValue;
  if (p.batch == 0 || p.seqlen == 0) return cudaSuccess;
  if (p.u == nullptr || p.delta == nullptr || p.A == nullptr || p.B == nullptr || p.C == nullptr || p.y == nullptr) {
    return cudaErrorInvalidValue;
  }
  switch (p.dataType) {
    case ScanDataType::kFloat32:
      return launchForN<float>(p, stream);
    case ScanDataType::kFloat16:
      return launchForN<__half>(p, stream);
    case ScanDataType::kBFloat16:
      return launchForN<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace scan
}  // namespace emrrg
