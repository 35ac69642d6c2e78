/*
 * selectiveScanOrtOp.h — what the two ONNX Runtime op libraries for com.emrrg::SelectiveScan share:
 * libemrrg_ops.so (selectiveScanOrtOp.cpp: CPU-EP kernels) and libemrrg_ops_cuda.so
 * (selectiveScanOrtCudaOp.cpp: the same CPU-EP kernels and CUDA-EP ones, in one domain).
 *
 * Here, once: the op's identity and input layout, reading the inputs and checking them against the
 * contract (ScanInputs::read: element types, shapes, group count), filling the launch struct (fillParams),
 * the kernels' error wrapper, the custom-op class (one template over the kernel: f32 / f16, CPU / CUDA),
 * the CPU kernel, and the ORT API version check of the entry points. Each library includes it from exactly one translation unit
 * (everything is in an anonymous namespace, so each library has its own gApi).
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
 * Needs ONNX Runtime >= 1.17 at run time (KernelContext_ParallelFor); built against any headers >= 1.17.
 */
#pragma once

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

const OrtApi* gApi = nullptr;  // set once in RegisterCustomOps (initOrtApi)

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

// The node's inputs, read and checked against the contract; the sizes; the output y allocated.
struct ScanInputs {
  InputInfo in[kNumInputs];
  int64_t batch = 0, dim = 0, seqlen = 0, dstate = 0, groups = 0;

  const void* data(size_t i) const { return in[i].present ? tensorData(in[i].value) : nullptr; }
  const float* f32(size_t i) const { return static_cast<const float*>(data(i)); }

  OrtStatus* read(OrtKernelContext* ctx, ONNXTensorElementDataType onnxType) {
    size_t count = 0;
    if (OrtStatus* st = gApi->KernelContext_GetInputCount(ctx, &count)) return st;
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
    batch = su[0];
    dim = su[1];
    seqlen = su[2];
    if (in[kInDelta].shape != su) {
      return makeError(ORT_INVALID_ARGUMENT, "delta " + shapeStr(in[kInDelta].shape) + " must match u " + shapeStr(su));
    }
    const auto& sa = in[kInA].shape;
    if (sa.size() != 2 || sa[0] != dim || sa[1] <= 0) {
      return makeError(ORT_INVALID_ARGUMENT, "A must be (D=" + std::to_string(dim) + ", N), got " + shapeStr(sa));
    }
    dstate = sa[1];
    const auto& sb = in[kInB].shape;
    if (sb.size() != 4 || sb[0] != batch || sb[1] <= 0 || sb[2] != dstate || sb[3] != seqlen) {
      return makeError(ORT_INVALID_ARGUMENT, "B must be (batch=" + std::to_string(batch) + ", G, N=" +
                                                 std::to_string(dstate) + ", L=" + std::to_string(seqlen) +
                                                 "), got " + shapeStr(sb));
    }
    if (in[kInC].shape != sb) {
      return makeError(ORT_INVALID_ARGUMENT, "C " + shapeStr(in[kInC].shape) + " must match B " + shapeStr(sb));
    }
    groups = sb[1];
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
    return nullptr;
  }

  // y, shaped like u (call after read and after any kernel-specific limit checks).
  OrtStatus* output(OrtKernelContext* ctx, void** y) const {
    const auto& su = in[kInU].shape;
    OrtValue* yValue = nullptr;
    if (OrtStatus* st = gApi->KernelContext_GetOutput(ctx, 0, su.data(), su.size(), &yValue)) return st;
    *y = const_cast<void*>(tensorData(yValue));
    return nullptr;
  }

  bool empty() const { return batch * dim * seqlen == 0; }
};

// Sizes, flags and pointers into a launch struct with the contract's field names (emrrg::scan::CpuScanArgs,
// emrrg::scan::SelectiveScanParams); y comes from ScanInputs::output.
template <typename Params>
void fillParams(const ScanInputs& s, bool deltaSoftplus, Params* p) {
  using Size = decltype(p->batch);
  p->batch = static_cast<Size>(s.batch);
  p->dim = static_cast<Size>(s.dim);
  p->seqlen = static_cast<Size>(s.seqlen);
  p->dstate = static_cast<Size>(s.dstate);
  p->groups = static_cast<Size>(s.groups);
  p->deltaSoftplus = deltaSoftplus;
  p->u = s.data(kInU);
  p->delta = s.data(kInDelta);
  p->A = s.f32(kInA);
  p->B = s.data(kInB);
  p->C = s.data(kInC);
  p->D = s.f32(kInD);
  p->z = s.data(kInZ);
  p->deltaBias = s.f32(kInDeltaBias);
}

// The kernels' shared part: the attribute, the activation type, reading and checking the inputs, and the
// error wrapper. Derived provides kExecutionProvider and run(ctx, inputs), which allocates y and computes.
template <typename Derived>
struct ScanKernelBase {
  bool deltaSoftplus = true;
  bool f32 = true;  // activations f32, else f16
  ONNXTensorElementDataType onnxType = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;

  OrtStatus* ComputeV2(OrtKernelContext* ctx) noexcept {
    try {
      ScanInputs s;
      if (OrtStatus* st = s.read(ctx, onnxType)) return st;
      return static_cast<Derived*>(this)->run(ctx, s);
    } catch (const Ort::Exception& e) {
      return makeError(e.GetOrtErrorCode(), e.what());
    } catch (const std::exception& e) {
      return makeError(ORT_FAIL, e.what());
    } catch (...) {
      return makeError(ORT_FAIL, "unknown error");
    }
  }
};

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

// The CPU-EP kernel (selectiveScanCpu.h). Threads: ORT's intra-op thread pool
// (SessionOptions.intra_op_num_threads), unless EMRRG_SCAN_THREADS is set, which makes the op use that
// many threads of its own.
struct CpuScanKernel : ScanKernelBase<CpuScanKernel> {
  static constexpr const char* kExecutionProvider = nullptr;  // nullptr = the CPU EP (ORT's default)

  OrtStatus* run(OrtKernelContext* ctx, const ScanInputs& s) {
    emrrg::scan::CpuScanArgs args;
    if (OrtStatus* st = s.output(ctx, &args.y)) return st;
    fillParams(s, deltaSoftplus, &args);
    args.type = f32 ? emrrg::scan::CpuElemType::kFloat32 : emrrg::scan::CpuElemType::kFloat16;
    if (s.empty()) return nullptr;  // empty output, nothing to compute

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

// The op for activations of type T (float or Ort::Float16_t) on the EP of Kernel.
template <typename T, typename Kernel>
struct ScanOp : Ort::CustomOpBase<ScanOp<T, Kernel>, Kernel, /*WithStatus=*/true> {
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
    auto* k = new (std::nothrow) Kernel;
    if (k == nullptr) return makeError(ORT_FAIL, "out of memory");
    k->deltaSoftplus = softplus == 1;
    k->onnxType = onnxTypeOf<T>();
    k->f32 = std::is_same<T, float>::value;
    *kernel = k;
    return nullptr;
  }

  const char* GetName() const { return kOpName; }
  const char* GetExecutionProviderType() const { return Kernel::kExecutionProvider; }
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

// The entry points' first step: the newest ORT API both sides know (>= 1.17), set as gApi and for the C++
// wrappers; nullptr with *err set (a status, or nullptr when not even API 1 answers) when ORT is too old.
const OrtApi* initOrtApi(const OrtApiBase* api_base, const char* library, OrtStatus** err) {
  *err = nullptr;
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) api = api_base->GetApi(kMinOrtApiVersion);
  if (api == nullptr) {
    const OrtApi* v1 = api_base->GetApi(1);
    const std::string msg = std::string(library) + ": ONNX Runtime " + api_base->GetVersionString() +
                            " is too old; com.emrrg::SelectiveScan needs ONNX Runtime >= 1.17";
    *err = v1 != nullptr ? v1->CreateStatus(ORT_FAIL, msg.c_str()) : nullptr;
    return nullptr;
  }
  Ort::InitApi(api);
  gApi = api;
  return api;
}

}  // namespace
