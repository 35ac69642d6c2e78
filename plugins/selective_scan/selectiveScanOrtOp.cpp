/*
 * selectiveScanOrtOp.cpp — ONNX Runtime custom-op library for com.emrrg::SelectiveScan (CPU EP).
 *
 * Load it with SessionOptions.register_custom_ops_library(path) (Python) or
 * RegisterCustomOpsLibrary / RegisterCustomOps (C/C++). It registers, in domain "com.emrrg" from
 * version 1, the op "SelectiveScan" twice — once for f32 and once for f16 activations — so ORT picks the
 * kernel by the type of u.
 *
 * Inputs (index: name, shape, dtype); T = f32 | f16. Optional inputs may be absent or empty-named:
 *   0 u          (batch, D, L)     T
 *   1 delta      (batch, D, L)     T
 *   2 A          (D, N)            f32
 *   3 B          (batch, G, N, L)  T
 *   4 C          (batch, G, N, L)  T
 *   5 D          (D)               f32   optional
 *   6 z          (batch, D, L)     T     optional
 *   7 delta_bias (D)               f32   optional
 * Output:
 *   0 y          (batch, D, L)     T
 * Attributes:
 *   delta_softplus  int, 0 or 1, default 1
 *   plugin_version, plugin_namespace (strings for TensorRT's plugin lookup): ignored here.
 *
 * Threads: ORT's intra-op thread pool (SessionOptions.intra_op_num_threads), unless EMRRG_SCAN_THREADS
 * is set, which makes the op use that many threads of its own.
 *
 * Needs ONNX Runtime >= 1.17 at run time (KernelContext_ParallelFor); built against any headers >= 1.17.
 */
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <exception>
#include <new>
#include <string>
#include <type_traits>
#include <vector>

#include "selectiveScanCpu.h"

namespace {

constexpr const char* kOpName = "SelectiveScan";
constexpr const char* kOpDomain = "com.emrrg";
constexpr int kOpVersion = 1;
constexpr uint32_t kMinOrtApiVersion = 17;  // KernelContext_ParallelFor, ShapeInferContext_*

enum InputIndex : size_t {
  kInU = 0,
  kInDelta = 1,
  kInA = 2,
  kInB = 3,
  kInC = 4,
  kInD = 5,
  kInZ = 6,
  kInDeltaBias = 7,
  kNumInputs = 8,
};

const OrtApi* gApi = nullptr;  // set once in RegisterCustomOps

OrtStatus* makeError(OrtErrorCode code, const std::string& msg) {
  return gApi->CreateStatus(code, (std::string(kOpDomain) + "::" + kOpName + ": " + msg).c_str());
}

std::string shapeStr(const std::vector<int64_t>& s) {
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + (s.size() == 1 ? ",)" : ")");
}

// Shape and element type of an input, or present == false for an absent optional input.
struct InputInfo {
  bool present = false;
  const OrtValue* value = nullptr;
  std::vector<int64_t> shape;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
};

OrtStatus* readInput(OrtKernelContext* ctx, size_t count, size_t index, InputInfo* out) {
  *out = InputInfo{};
  if (index >= count) return nullptr;
  const OrtValue* v = nullptr;
  if (OrtStatus* st = gApi->KernelContext_GetInput(ctx, index, &v)) return st;
  if (v == nullptr) return nullptr;
  OrtTensorTypeAndShapeInfo* info = nullptr;
  if (OrtStatus* st = gApi->GetTensorTypeAndShape(v, &info)) return st;
  size_t rank = 0;
  OrtStatus* st = gApi->GetDimensionsCount(info, &rank);
  if (st == nullptr) {
    out->shape.resize(rank);
    st = gApi->GetDimensions(info, out->shape.data(), rank);
  }
  if (st == nullptr) st = gApi->GetTensorElementType(info, &out->type);
  gApi->ReleaseTensorTypeAndShapeInfo(info);
  if (st != nullptr) return st;
  out->present = true;
  out->value = v;
  return nullptr;
}

const void* tensorData(const OrtValue* v) {
  void* p = nullptr;
  OrtStatus* st = gApi->GetTensorMutableData(const_cast<OrtValue*>(v), &p);
  if (st != nullptr) {
    gApi->ReleaseStatus(st);
    return nullptr;
  }
  return p;
}

// Adapter from the CPU implementation's parallel-for to ORT's intra-op thread pool.
struct OrtRunner {
  OrtKernelContext* ctx;
  bool fellBack = false;
};

void ortParallelFor(void* runnerCtx, size_t total, void (*fn)(void*, size_t), void* ctx) {
  auto* runner = static_cast<OrtRunner*>(runnerCtx);
  OrtStatus* st = gApi->KernelContext_ParallelFor(runner->ctx, fn, total, 0, ctx);
  if (st != nullptr) {  // no pool available: run on our own threads
    gApi->ReleaseStatus(st);
    runner->fellBack = true;
    emrrg::scan::cpuParallelForThreads(emrrg::scan::cpuScanDefaultThreads(), total, fn, ctx);
  }
}

struct ScanKernel {
  bool deltaSoftplus = true;
  emrrg::scan::CpuElemType elemType;
  ONNXTensorElementDataType onnxType;

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
    // Element types (ORT already matched the kernel; this guards direct C API misuse).
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

    OrtValue* yValue = nullptr;
    if (OrtStatus* st = gApi->KernelContext_GetOutput(ctx, 0, su.data(), su.size(), &yValue)) return st;

    emrrg::scan::CpuScanArgs args;
    args.batch = batch;
    args.dim = dim;
    args.seqlen = seqlen;
    args.dstate = dstate;
    args.groups = groups;
    args.deltaSoftplus = deltaSoftplus;
    args.type = elemType;
    args.u = tensorData(in[kInU].value);
    args.delta = tensorData(in[kInDelta].value);
    args.A = static_cast<const float*>(tensorData(in[kInA].value));
    args.B = tensorData(in[kInB].value);
    args.C = tensorData(in[kInC].value);
    args.D = in[kInD].present ? static_cast<const float*>(tensorData(in[kInD].value)) : nullptr;
    args.z = in[kInZ].present ? tensorData(in[kInZ].value) : nullptr;
    args.deltaBias = in[kInDeltaBias].present ? static_cast<const float*>(tensorData(in[kInDeltaBias].value)) : nullptr;
    args.y = const_cast<void*>(tensorData(yValue));
    if (batch * dim * seqlen == 0) return nullptr;  // empty output, nothing to compute

    std::string err;
    if (emrrg::scan::cpuScanThreadsFromEnv() > 0) {
      err = emrrg::scan::selectiveScanCpu(args);
    } else {
      OrtRunner runner{ctx};
      err = emrrg::scan::selectiveScanCpu(args, ortParallelFor, &runner);
    }
    return err.empty() ? nullptr : makeError(ORT_FAIL, err);
  }
};

template <typename T>
constexpr ONNXTensorElementDataType onnxTypeOf() {
  return std::is_same<T, float>::value ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
}

// Output shape = u's shape, element type = u's type (best effort: unknown shapes are left unknown).
OrtStatus* ORT_API_CALL inferOutputShape(const OrtCustomOp*, OrtShapeInferContext* ctx) {
  OrtTensorTypeAndShapeInfo* info = nullptr;  // owned by ctx
  if (OrtStatus* st = gApi->ShapeInferContext_GetInputTypeShape(ctx, kInU, &info)) {
    gApi->ReleaseStatus(st);
    return nullptr;
  }
  if (OrtStatus* st = gApi->ShapeInferContext_SetOutputTypeShape(ctx, 0, info)) gApi->ReleaseStatus(st);
  return nullptr;
}

template <typename T>
struct ScanOp : Ort::CustomOpBase<ScanOp<T>, ScanKernel, /*WithStatus=*/true> {
  ScanOp() {
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
    auto* k = new (std::nothrow) ScanKernel;
    if (k == nullptr) return makeError(ORT_FAIL, "out of memory");
    k->deltaSoftplus = softplus == 1;
    k->onnxType = onnxTypeOf<T>();
    k->elemType = std::is_same<T, float>::value ? emrrg::scan::CpuElemType::kFloat32 : emrrg::scan::CpuElemType::kFloat16;
    *kernel = k;
    return nullptr;
  }

  const char* GetName() const { return kOpName; }
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

// The library's only exported symbol (ORT_EXPORT is empty on Linux, and the build hides everything else).
extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) api = api_base->GetApi(kMinOrtApiVersion);
  if (api == nullptr) {
    const OrtApi* v1 = api_base->GetApi(1);
    const std::string msg = std::string("libemrrg_ops: ONNX Runtime ") + api_base->GetVersionString() +
                            " is too old; com.emrrg::SelectiveScan needs ONNX Runtime >= 1.17";
    return v1 != nullptr ? v1->CreateStatus(ORT_FAIL, msg.c_str()) : nullptr;
  }
  Ort::InitApi(api);
  gApi = api;

  // The ops and the domain must outlive every session made from these options; they are process-wide
  // and deliberately never freed (releasing them at exit can race ORT's own teardown).
  static ScanOp<float> opF32;
  static ScanOp<Ort::Float16_t> opF16;
  OrtCustomOpDomain* domain = nullptr;
  if (OrtStatus* st = api->CreateCustomOpDomain(kOpDomain, &domain)) return st;
  if (OrtStatus* st = api->CustomOpDomain_Add(domain, &opF32)) return st;
  if (OrtStatus* st = api->CustomOpDomain_Add(domain, &opF16)) return st;
  return api->AddCustomOpDomain(options, domain);
}
