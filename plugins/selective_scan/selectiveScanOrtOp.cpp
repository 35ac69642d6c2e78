/*
 * selectiveScanOrtOp.cpp — ONNX Runtime custom-op library for com.emrrg::SelectiveScan (CPU EP).
 *
 * Load it with SessionOptions.register_custom_ops_library(path) (Python) or
 * RegisterCustomOpsLibrary / RegisterCustomOps (C/C++). It registers, in domain "com.emrrg" from
 * version 1, the op "SelectiveScan" twice — once for f32 and once for f16 activations — so ORT picks the
 * kernel by the type of u.
 *
 * The op's contract (inputs, attributes), its input checks, the custom-op class and the CPU kernel are in
 * selectiveScanOrtOp.h, which libemrrg_ops_cuda.so (selectiveScanOrtCudaOp.cpp) includes as well.
 *
 * Threads: ORT's intra-op thread pool (SessionOptions.intra_op_num_threads), unless EMRRG_SCAN_THREADS
 * is set, which makes the op use that many threads of its own.
 *
 * Needs ONNX Runtime >= 1.17 at run time (KernelContext_ParallelFor); built against any headers >= 1.17.
 */
#include "selectiveScanOrtOp.h"  // first: it includes the ORT C++ API with ORT_API_MANUAL_INIT

#include "blockSumMatMulAddOp.h"

// The library's only exported symbol (ORT_EXPORT is empty on Linux, and the build hides everything else).
extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  OrtStatus* err = nullptr;
  const OrtApi* api = initOrtApi(api_base, "libemrrg_ops", &err);
  if (api == nullptr) return err;

  // The ops and the domain must outlive every session made from these options; they are process-wide
  // and deliberately never freed (releasing them at exit can race ORT's own teardown).
  static ScanOp<float, CpuScanKernel> opF32;
  static ScanOp<Ort::Float16_t, CpuScanKernel> opF16;
  OrtCustomOpDomain* domain = nullptr;
  if (OrtStatus* st = api->CreateCustomOpDomain(kOpDomain, &domain)) return st;
  if (OrtStatus* st = api->CustomOpDomain_Add(domain, &opF32)) return st;
  if (OrtStatus* st = api->CustomOpDomain_Add(domain, &opF16)) return st;
  // The affine 4-bit decoder's correction (blockSumMatMulAddOp.h): CPU library only; the CUDA library leaves
  // it out so that a CUDA session runs the node's standard-ONNX function body on the device.
  if (OrtStatus* st = emrrg::affine::addBlockSumMatMulAdd(api, domain)) return st;
  return api->AddCustomOpDomain(options, domain);
}
