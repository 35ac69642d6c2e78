/*
 * selectiveScanOrtCudaOp.cpp — libemrrg_ops_cuda.so: the ONNX Runtime op library for
 * com.emrrg::SelectiveScan with kernels for BOTH the CPU EP (the CPU op's kernel, CpuScanKernel in
 * selectiveScanOrtOp.h) and the CUDA EP (the CUDA kernel of selectiveScanKernel.h), f32 and f16 each.
 *
 * Use it instead of libemrrg_ops.so with onnxruntime-gpu:
 *     so.register_custom_ops_library("build/plugins/libemrrg_ops_cuda.so")
 *     ort.InferenceSession(path, so, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
 * ONNX Runtime assigns each SelectiveScan node to the CUDA kernel when the node runs on the CUDA EP (its
 * inputs then live on the device) and to the CPU kernel otherwise, so the same library also serves a
 * CPU-only session. The kernel runs on the EP's compute stream (KernelContext_GetGPUComputeStream), so
 * it is ordered with ORT's own kernels and needs no synchronization.
 *
 * Why one library and not a second one next to libemrrg_ops.so: ONNX Runtime builds one schema per
 * (domain, op) from all the custom-op domains of a session, and two libraries that each register
 * domain "com.emrrg" clash ("domain already registered"). All kernels must come from one
 * OrtCustomOpDomain, so this library registers the CPU op's kernels (CpuScanKernel, selectiveScanOrtOp.h)
 * next to the CUDA ones below.
 *
 * Inputs, attributes and shape checks: the CPU op's, from selectiveScanOrtOp.h (ScanInputs::read). CUDA
 * limits: N <= 64, batch <= 65535, G <= 65535 (checked; an ORT INVALID_ARGUMENT status otherwise).
 * Built by CMake only when a CUDA toolkit and ONNX Runtime headers are found (target emrrg_ops_cuda).
 */
#include "selectiveScanOrtOp.h"  // first: it includes the ORT C++ API with ORT_API_MANUAL_INIT

#include <cuda_runtime_api.h>

#include "selectiveScanKernel.h"

namespace {

constexpr const char* kCudaExecutionProvider = "CUDAExecutionProvider";
constexpr int64_t kCudaMaxState = 64;  // emrrg::scan::kMaxStateDim (the kernel keeps h in registers)

struct CudaScanKernel : ScanKernelBase<CudaScanKernel> {
  static constexpr const char* kExecutionProvider = kCudaExecutionProvider;

  OrtStatus* run(OrtKernelContext* ctx, const ScanInputs& s) {
    if (s.dstate > kCudaMaxState || s.batch > 65535 || s.groups > 65535 || s.dim > INT32_MAX || s.seqlen > INT32_MAX) {
      return makeError(ORT_INVALID_ARGUMENT, "beyond the CUDA kernel's limits (N <= 64, batch <= 65535, G <= 65535): "
                                             "u " + shapeStr(s.in[kInU].shape) + ", B " + shapeStr(s.in[kInB].shape));
    }
    emrrg::scan::SelectiveScanParams p;
    if (OrtStatus* st = s.output(ctx, &p.y)) return st;
    if (s.empty()) return nullptr;
    fillParams(s, deltaSoftplus, &p);
    p.dataType = f32 ? emrrg::scan::ScanDataType::kFloat32 : emrrg::scan::ScanDataType::kFloat16;

    void* stream = nullptr;
    if (OrtStatus* st = gApi->KernelContext_GetGPUComputeStream(ctx, &stream)) return st;
    const cudaError_t status = emrrg::scan::launchSelectiveScan(p, static_cast<cudaStream_t>(stream));
    if (status != cudaSuccess) {
      return makeError(ORT_FAIL, std::string("CUDA kernel launch failed: ") + cudaGetErrorString(status));
    }
    return nullptr;
  }
};

}  // namespace

// The library's only exported symbol: one "com.emrrg" domain with the CPU and the CUDA kernels.
extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                                          const OrtApiBase* api_base) {
  OrtStatus* err = nullptr;
  const OrtApi* api = initOrtApi(api_base, "libemrrg_ops_cuda", &err);
  if (api == nullptr) return err;

  // Process-wide and never freed, as in the CPU library (sessions may outlive any scope here).
  static ScanOp<float, CpuScanKernel> cpuF32;
  static ScanOp<Ort::Float16_t, CpuScanKernel> cpuF16;
  static ScanOp<float, CudaScanKernel> cudaF32;
  static ScanOp<Ort::Float16_t, CudaScanKernel> cudaF16;
  OrtCustomOpDomain* domain = nullptr;
  if (OrtStatus* st = api->CreateCustomOpDomain(kOpDomain, &domain)) return st;
  for (OrtCustomOp* op : {static_cast<OrtCustomOp*>(&cpuF32), static_cast<OrtCustomOp*>(&cpuF16),
                          static_cast<OrtCustomOp*>(&cudaF32), static_cast<OrtCustomOp*>(&cudaF16)}) {
    if (OrtStatus* st = api->CustomOpDomain_Add(domain, op)) return st;
  }
  return api->AddCustomOpDomain(options, domain);
}
