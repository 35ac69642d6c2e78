/*
 * selectiveScanOrtCudaOp.cpp — libemrrg_ops_cuda.so: the ONNX Runtime op library for
 * com.emrrg::SelectiveScan with kernels for BOTH the CPU EP (the CPU op of selectiveScanOrtOp.cpp,
 * unchanged) and the CUDA EP (the CUDA kernel of selectiveScanKernel.h), f32 and f16 each.
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
 * OrtCustomOpDomain. To reuse the CPU op without copying or editing it, this file compiles
 * selectiveScanOrtOp.cpp into the same translation unit (its RegisterCustomOps renamed, unused) and
 * registers its ScanOp<float> / ScanOp<Ort::Float16_t> next to the CUDA ops below.
 *
 * Inputs, attributes and shape checks: as the CPU op (selectiveScanOrtOp.cpp, README.md). CUDA limits:
 * N <= 64, batch <= 65535, G <= 65535 (checked; an ORT INVALID_ARGUMENT status otherwise).
 * Built by CMake only when a CUDA toolkit and ONNX Runtime headers are found (target emrrg_ops_cuda).
 */
#define RegisterCustomOps emrrgRegisterCpuOnlyCustomOps  // the CPU library's entry point, renamed
#include "selectiveScanOrtOp.cpp"
#undef RegisterCustomOps

#include <cuda_runtime_api.h>

#include "selectiveScanKernel.h"

namespace {

constexpr const char* kCudaExecutionProvider = "CUDAExecutionProvider";
constexpr int64_t kCudaMaxState = 64;  // emrrg::scan::kMaxStateDim (the kernel keeps h in registers)

struct CudaScanKernel {
  bool deltaSoftplus = true;
  ONNXTensorElementDataType onnxType = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  emrrg::scan::ScanDataType scanType = emrrg::scan::ScanDataType::kFloat32;

  OrtStatus* ComputeV2(OrtKernelContext* ctx) noexcept {
    try {
      return compute(ctx);
    } catch (const Ort::Exception& e) {
      return makeError(e.GetOrtErrorCode(), e.what());
    } catch (const std::exception& e) {
      return makeError(ORT_FAIL, e.what());
    } catch (...) {
      return makeError(ORT_FAIL, "unknown error");
    }
  }

  OrtStatus* compute(OrtKernelContext* ctx) {
    size_t count = 0;
    if (OrtStatus* st = gApi->KernelContext_GetInputCount(ctx, &count)) return st;
    InputInfo in[kNumInputs];
    for (size_t i = 0; i < kNumInputs; ++i) {
      if (OrtStatus* st = readInput(ctx, count, i, &in[i])) return st;
    }
    static const char* const names[kNumInputs] = {"u", "delta", "A", "B", "C", "D", "z", "delta_bias"};
    for (size_t i = 0; i <= kInC; ++i) {
      if (!in[i].present) return makeError(ORT_INVALID_ARGUMENT, std::string("required input '") + names[i] + "' is missing");
    }
    for (size_t i : {kInU, kInDelta, kInB, kInC, kInZ}) {
      if (in[i].present && in[i].type != onnxType) {
        return makeError(ORT_INVALID_ARGUMENT, std::string("input '") + names[i] + "' must have the element type of u");
      }
    }
    for (size_t i : {kInA, kInD, kInDeltaBias}) {
      if (in[i].present && in[i].type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
        return makeError(ORT_INVALID_ARGUMENT, std::string("input '") + names[i] + "' must be float32");
      }
    }
    const auto& su = in[kInU].shape;
    if (su.size() != 3) return makeError(ORT_INVALID_ARGUMENT, "u must be (batch, D, L), got " + shapeStr(su));
    const int64_t batch = su[0], dim = su[1], seqlen = su[2];
    if (in[kInDelta].shape != su) {
      return makeError(ORT_INVALID_ARGUMENT, "delta " + shapeStr(in[kInDelta].shape) + " must match u " + shapeStr(su));
    }
    const auto& sa = in[kInA].shape;
    if (sa.size() != 2 || sa[0] != dim || sa[1] <= 0) {
      return makeError(ORT_INVALID_ARGUMENT, "A must be (D=" + std::to_string(dim) + ", N), got " + shapeStr(sa));
    }
    const int64_t dstate = sa[1];
    const auto& sb = in[kInB].shape;
    if (sb.size() != 4 || sb[0] != batch || sb[1] <= 0 || sb[2] != dstate || sb[3] != seqlen) {
      return makeError(ORT_INVALID_ARGUMENT, "B must be (batch=" + std::to_string(batch) + ", G, N=" +
                                                 std::to_string(dstate) + ", L=" + std::to_string(seqlen) +
                                                 "), got " + shapeStr(sb));
    }
    if (in[kInC].shape != sb) {
      return makeError(ORT_INVALID_ARGUMENT, "C " + shapeStr(in[kInC].shape) + " must match B " + shapeStr(sb));
    }
    const int64_t groups = sb[1];
    if (dim % groups != 0) {
      return makeError(ORT_INVALID_ARGUMENT, "D=" + std::to_string(dim) + " is not a multiple of the group count G=" +
                                                 std::to_string(groups));
    }
    for (size_t i : {kInD, kInDeltaBias}) {
      if (in[i].present && in[i].shape != std::vector<int64_t>{dim}) {
        return makeError(ORT_INVALID_ARGUMENT, std::string(names[i]) + " must be (" + std::to_string(dim) + ",), got " +
                                                   shapeStr(in[i].shape));
      }
    }
    if (in[kInZ].present && in[kInZ].shape != su) {
      return makeError(ORT_INVALID_ARGUMENT, "z " + shapeStr(in[kInZ].shape) + " must match u " + shapeStr(su));
    }
    if (dstate > kCudaMaxState || batch > 65535 || groups > 65535 || dim > INT32_MAX || seqlen > INT32_MAX) {
      return makeError(ORT_INVALID_ARGUMENT, "beyond the CUDA kernel's limits (N <= 64, batch <= 65535, G <= 65535): "
                                             "u " + shapeStr(su) + ", B " + shapeStr(sb));
    }

    OrtValue* yValue = nullptr;
    if (OrtStatus* st = gApi->KernelContext_GetOutput(ctx, 0, su.data(), su.size(), &yValue)) return st;
    if (batch * dim * seqlen == 0) return nullptr;

    void* stream = nullptr;
    if (OrtStatus* st = gApi->KernelContext_GetGPUComputeStream(ctx, &stream)) return st;

    emrrg::scan::SelectiveScanParams p;
    p.batch = static_cast<int>(batch);
    p.dim = static_cast<int>(dim);
    p.seqlen = static_cast<int>(seqlen);
    p.dstate = static_cast<int>(dstate);
    p.groups = static_cast<int>(groups);
    p.deltaSoftplus = deltaSoftplus;
    p.dataType = scanType;
    p.u = tensorData(in[kInU].value);
    p.delta = tensorData(in[kInDelta].value);
    p.A = static_cast<const float*>(tensorData(in[kInA].value));
    p.B = tensorData(in[kInB].value);
    p.C = tensorData(in[kInC].value);
    p.D = in[kInD].present ? static_cast<const float*>(tensorData(in[kInD].value)) : nullptr;
    p.z = in[kInZ].present ? tensorData(in[kInZ].value) : nullptr;
    p.deltaBias = in[kInDeltaBias].present ? static_cast<const float*>(tensorData(in[kInDeltaBias].value)) : nullptr;
    p.y = const_cast<void*>(tensorData(yValue));
    const cudaError_t status = emrrg::scan::launchSelectiveScan(p, static_cast<cudaStream_t>(stream));
    if (status != cudaSuccess) {
      return makeError(ORT_FAIL, std::string("CUDA kernel launch failed: ") + cudaGetErrorString(status));
    }
    return nullptr;
  }
};

template <typename T>
struct CudaScanOp : Ort::CustomOpBase<CudaScanOp<T>, CudaScanKernel, /*WithStatus=*/true> {
  CudaScanOp() {
    this->start_ver_ = kOpVersion;
    this->InferOutputShapeFn = inferOutputShape;
  }

  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const noexcept {
    *kernel = nullptr;
    int64_t softplus = 1;
    if (OrtStatus* st = api.KernelInfoGetAttribute_int64(info, "delta_softplus", &softplus)) {
      api.ReleaseStatus(st);  // absent: the default
      softplus = 1;
    }
    if (softplus != 0 && softplus != 1) {
      return makeError(ORT_INVALID_ARGUMENT, "attribute delta_softplus must be 0 or 1, got " + std::to_string(softplus));
    }
    auto* k = new (std::nothrow) CudaScanKernel;
    if (k == nullptr) return makeError(ORT_FAIL, "out of memory");
    k->deltaSoftplus = softplus == 1;
    k->onnxType = onnxTypeOf<T>();
    k->scanType = std::is_same<T, float>::value ? emrrg::scan::ScanDataType::kFloat32 : emrrg::scan::ScanDataType::kFloat16;
    *kernel = k;
    return nullptr;
  }

  const char* GetName() const { return kOpName; }
  const char* GetExecutionProviderType() const { return kCudaExecutionProvider; }
  size_t GetInputTypeCount() const { return kNumInputs; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    return (index == kInA || index == kInD || index == kInDeltaBias) ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT
                                                                    : onnxTypeOf<T>();
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index >= kInD ? OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_OPTIONAL
                         : OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return onnxTypeOf<T>(); }
};

}  // namespace

// The library's only exported symbol: one "com.emrrg" domain with the CPU and the CUDA kernels.
extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                                          const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) api = api_base->GetApi(kMinOrtApiVersion);
  if (api == nullptr) {
    const OrtApi* v1 = api_base->GetApi(1);
    const std::string msg = std::string("libemrrg_ops_cuda: ONNX Runtime ") + api_base->GetVersionString() +
                            " is too old; com.emrrg::SelectiveScan needs ONNX Runtime >= 1.17";
    return v1 != nullptr ? v1->CreateStatus(ORT_FAIL, msg.c_str()) : nullptr;
  }
  Ort::InitApi(api);
  gApi = api;

  // Process-wide and never freed, as in the CPU library (sessions may outlive any scope here).
  static ScanOp<float> cpuF32;
  static ScanOp<Ort::Float16_t> cpuF16;
  static CudaScanOp<float> cudaF32;
  static CudaScanOp<Ort::Float16_t> cudaF16;
  OrtCustomOpDomain* domain = nullptr;
  if (OrtStatus* st = api->CreateCustomOpDomain(kOpDomain, &domain)) return st;
  for (OrtCustomOp* op : {static_cast<OrtCustomOp*>(&cpuF32), static_cast<OrtCustomOp*>(&cpuF16),
                          static_cast<OrtCustomOp*>(&cudaF32), static_cast<OrtCustomOp*>(&cudaF16)}) {
    if (OrtStatus* st = api->CustomOpDomain_Add(domain, op)) return st;
  }
  return api->AddCustomOpDomain(options, domain);
}
