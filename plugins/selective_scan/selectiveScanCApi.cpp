/*
 * selectiveScanCApi.cpp — libemrrg_scan_shim.so: a plain C entry point to the CUDA kernel, so that
 * Python (ctypes) can run it on device pointers without TensorRT or ONNX Runtime. Used by the GPU tests
 * (tests/gpu/test_scan_cuda.py) and the GPU benchmark (benchmarks/scan_gpu.py) with torch.cuda tensors'
 * data_ptr(). Not part of the runtime.
 *
 *   int emrrg_scan_capi_version(void)                 -> EMRRG_SCAN_CAPI_VERSION
 *   int emrrg_selective_scan_cuda(batch, dim, seqlen, dstate, groups, delta_softplus, dtype,
 *                                 u, delta, A, B, C, D, z, delta_bias, y, stream)
 *        dtype: 0 = f32, 1 = f16, 2 = bf16 (of u, delta, B, C, z, y); A, D, delta_bias are f32.
 *        D, z, delta_bias may be NULL. stream: a cudaStream_t (NULL = the legacy default stream).
 *        Returns the cudaError_t of the launch (0 = cudaSuccess); nothing is synchronized.
 *   const char* emrrg_cuda_error_string(int code)     -> cudaGetErrorString(code)
 *
 * All tensors contiguous and on the current device; see selectiveScanKernel.h for the shapes.
 */
#include <cuda_runtime_api.h>

#include "selectiveScanKernel.h"

#define EMRRG_SCAN_CAPI_VERSION 1
#define EMRRG_CAPI extern "C" __attribute__((visibility("default")))

EMRRG_CAPI int emrrg_scan_capi_version(void) { return EMRRG_SCAN_CAPI_VERSION; }

EMRRG_CAPI int emrrg_selective_scan_cuda(int batch, int dim, int seqlen, int dstate, int groups, int delta_softplus,
                                         int dtype, const void* u, const void* delta, const float* A, const void* B,
                                         const void* C, const float* D, const void* z, const float* delta_bias,
                                         void* y, void* stream) {
  using emrrg::scan::ScanDataType;
  if (dtype < static_cast<int>(ScanDataType::kFloat32) || dtype > static_cast<int>(ScanDataType::kBFloat16) ||
      (delta_softplus != 0 && delta_softplus != 1)) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  emrrg::scan::SelectiveScanParams p;
  p.batch = batch;
  p.dim = dim;
  p.seqlen = seqlen;
  p.dstate = dstate;
  p.groups = groups;
  p.deltaSoftplus = delta_softplus == 1;
  p.dataType = static_cast<ScanDataType>(dtype);
  p.u = u;
  p.delta = delta;
  p.A = A;
  p.B = B;
  p.C = C;
  p.D = D;
  p.z = z;
  p.deltaBias = delta_bias;
  p.y = y;
  return static_cast<int>(emrrg::scan::launchSelectiveScan(p, static_cast<cudaStream_t>(stream)));
}

EMRRG_CAPI const char* emrrg_cuda_error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }
