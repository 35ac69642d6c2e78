// selectiveScanPlugin.cpp — TensorRT IPluginV3 "SelectiveScan" and its creator. Contract and layout:
// selectiveScanPlugin.h. Every override is noexcept; exceptions (std::bad_alloc from strings) are caught
// where they can arise and reported through the execution context's error recorder when one is
// attached, else through the logger TensorRT hands the library (setLoggerFinder), else on stderr.
#include "selectiveScanPlugin.h"

#include <cstdio>
#include <cstring>
#include <exception>
#include <limits>
#include <mutex>
#include <new>
#include <sstream>

namespace emrrg {
namespace trt {
namespace {

using nvinfer1::DataType;
using nvinfer1::ErrorCode;
using nvinfer1::PluginField;
using nvinfer1::PluginFieldType;

// ---- logging: TensorRT's logger when the library was loaded through the registry ---------------
std::mutex gLoggerMutex;
nvinfer1::ILoggerFinder* gLoggerFinder = nullptr;

void logMessage(nvinfer1::ILogger::Severity severity, std::string const& msg) noexcept {
  nvinfer1::ILogger* logger = nullptr;
  {
    std::lock_guard<std::mutex> lock(gLoggerMutex);
    if (gLoggerFinder != nullptr) logger = gLoggerFinder->findLogger();
  }
  std::string const line = std::string("[emrrg SelectiveScan plugin] ") + msg;
  if (logger != nullptr) {
    logger->log(severity, line.c_str());
  } else if (severity <= nvinfer1::ILogger::Severity::kWARNING) {
    std::fprintf(stderr, "%s\n", line.c_str());
  }
}

char const* typeName(DataType t) {
  switch (t) {
    case DataType::kFLOAT: return "float32";
    case DataType::kHALF: return "float16";
    case DataType::kBF16: return "bfloat16";
    case DataType::kINT8: return "int8";
    case DataType::kINT32: return "int32";
    case DataType::kINT64: return "int64";
    case DataType::kBOOL: return "bool";
    default: return "another type";
  }
}

char const* inputName(ScanInputLayout const& layout, int32_t i) {
  static char const* const kRequired[] = {"u", "delta", "A", "B", "C"};
  if (i >= 0 && i < kREQUIRED_INPUTS) return kRequired[i];
  if (i == layout.d) return "D";
  if (i == layout.z) return "z";
  if (i == layout.deltaBias) return "delta_bias";
  return "?";
}

template <typename DimsT>
std::string dimsStr(DimsT const& d) {
  std::ostringstream s;
  s << "(";
  for (int32_t i = 0; i < d.nbDims; ++i) s << (i ? ", " : "") << d.d[i];
  s << (d.nbDims == 1 ? ",)" : ")");
  return s.str();
}

// Reads one int-valued plugin field: any integer width, exactly one element.
bool readIntField(PluginField const& f, int32_t& out, std::string& err) {
  if (f.data == nullptr || f.length != 1) {
    err = std::string("attribute ") + f.name + " must be a single integer (got " + std::to_string(f.length) + " values)";
    return false;
  }
  int64_t v = 0;
  switch (f.type) {
    case PluginFieldType::kINT32: v = *static_cast<int32_t const*>(f.data); break;
    case PluginFieldType::kINT64: v = *static_cast<int64_t const*>(f.data); break;
    case PluginFieldType::kINT16: v = *static_cast<int16_t const*>(f.data); break;
    case PluginFieldType::kINT8: v = *static_cast<int8_t const*>(f.data); break;
    default:
      err = std::string("attribute ") + f.name + " must be an integer (ONNX int attribute), got plugin field type " +
            std::to_string(static_cast<int32_t>(f.type));
      return false;
  }
  if (v < std::numeric_limits<int32_t>::min() || v > std::numeric_limits<int32_t>::max()) {
    err = std::string("attribute ") + f.name + " is out of range: " + std::to_string(v);
    return false;
  }
  out = static_cast<int32_t>(v);
  return true;
}

bool isScanType(DataType t) { return t == DataType::kFLOAT || t == DataType::kHALF || t == DataType::kBF16; }

}  // namespace

// ---------------------------------------------------------------------------------------------------
// ScanInputLayout
// ---------------------------------------------------------------------------------------------------
std::string ScanInputLayout::resolve(int32_t hasD, int32_t hasZ, int32_t hasDeltaBias, int32_t nbInputs,
                                     ScanInputLayout& out) {
  out = ScanInputLayout{};
  if (nbInputs < kREQUIRED_INPUTS || nbInputs > kMAX_INPUTS) {
    return "SelectiveScan takes 5 to 8 inputs (u, delta, A, B, C[, D][, z][, delta_bias]), got " +
           std::to_string(nbInputs);
  }
  int32_t const declared[3] = {hasD, hasZ, hasDeltaBias};
  bool present[3];
  bool const anySet = hasD != kUNSET || hasZ != kUNSET || hasDeltaBias != kUNSET;
  if (anySet) {
    // Flags given (all three are written together by getFieldsToSerialize and by the ONNX rewrite).
    int32_t count = 0;
    for (int32_t k = 0; k < 3; ++k) {
      present[k] = declared[k] == 1;
      count += present[k] ? 1 : 0;
    }
    if (kREQUIRED_INPUTS + count != nbInputs) {
      return "has_D=" + std::to_string(hasD) + ", has_z=" + std::to_string(hasZ) + ", has_delta_bias=" +
             std::to_string(hasDeltaBias) + " declare " + std::to_string(kREQUIRED_INPUTS + count) +
             " inputs, but the node has " + std::to_string(nbInputs);
    }
  } else {
    // By count: optional inputs are dropped from the end (D, z, delta_bias order).
    for (int32_t k = 0; k < 3; ++k) present[k] = k < nbInputs - kREQUIRED_INPUTS;
  }
  out.nbInputs = nbInputs;
  int32_t next = kREQUIRED_INPUTS;
  out.d = present[0] ? next++ : -1;
  out.z = present[1] ? next++ : -1;
  out.deltaBias = present[2] ? next++ : -1;
  return {};
}

bool toScanDataType(DataType type, scan::ScanDataType& out) {
  switch (type) {
    case DataType::kFLOAT: out = scan::ScanDataType::kFloat32; return true;
    case DataType::kHALF: out = scan::ScanDataType::kFloat16; return true;
    case DataType::kBF16: out = scan::ScanDataType::kBFloat16; return true;
    default: return false;
  }
}

// ---------------------------------------------------------------------------------------------------
// SelectiveScanPlugin
// ---------------------------------------------------------------------------------------------------
SelectiveScanPlugin::SelectiveScanPlugin(std::string layerName, int32_t deltaSoftplus, int32_t hasD, int32_t hasZ,
                                         int32_t hasDeltaBias)
    : mLayerName(std::move(layerName)),
      mDeltaSoftplus(deltaSoftplus),
      mHasD(hasD),
      mHasZ(hasZ),
      mHasDeltaBias(hasDeltaBias) {}

SelectiveScanPlugin::SelectiveScanPlugin(SelectiveScanPlugin const& other)
    : nvinfer1::IPluginV3(other),
      nvinfer1::IPluginV3OneCore(other),
      nvinfer1::IPluginV3OneBuild(other),
      nvinfer1::IPluginV3OneRuntime(other),
      mLayerName(other.mLayerName),
      mDeltaSoftplus(other.mDeltaSoftplus),
      mHasD(other.mHasD),
      mHasZ(other.mHasZ),
      mHasDeltaBias(other.mHasDeltaBias),
      mErrorRecorder(other.mErrorRecorder) {}  // the serialization buffers are rebuilt on demand

void SelectiveScanPlugin::reportError(ErrorCode code, std::string const& msg) const noexcept {
  try {
    std::string const full = "SelectiveScan plugin (layer '" + mLayerName + "'): " + msg;
    if (mErrorRecorder != nullptr) {
      mErrorRecorder->reportError(code, full.c_str());
    }
    logMessage(nvinfer1::ILogger::Severity::kERROR, full);
  } catch (...) {
    std::fprintf(stderr, "[emrrg SelectiveScan plugin] error (and out of memory while formatting it)\n");
  }
}

bool SelectiveScanPlugin::layoutFor(int32_t nbInputs, ScanInputLayout& layout) const {
  std::string const err = ScanInputLayout::resolve(mHasD, mHasZ, mHasDeltaBias, nbInputs, layout);
  if (!err.empty()) {
    reportError(ErrorCode::kINVALID_ARGUMENT, err);
    return false;
  }
  return true;
}

nvinfer1::IPluginCapability* SelectiveScanPlugin::getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept {
  switch (type) {
    case nvinfer1::PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
    case nvinfer1::PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
    case nvinfer1::PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
  }
  return nullptr;
}

nvinfer1::IPluginV3* SelectiveScanPlugin::clone() noexcept {
  try {
    return new SelectiveScanPlugin(*this);
  } catch (std::exception const& e) {
    reportError(ErrorCode::kFAILED_ALLOCATION, std::string("clone failed: ") + e.what());
  } catch (...) {
    reportError(ErrorCode::kFAILED_ALLOCATION, "clone failed");
  }
  return nullptr;
}

char const* SelectiveScanPlugin::getPluginName() const noexcept { return kSELECTIVE_SCAN_PLUGIN_NAME; }
char const* SelectiveScanPlugin::getPluginVersion() const noexcept { return kSELECTIVE_SCAN_PLUGIN_VERSION; }
char const* SelectiveScanPlugin::getPluginNamespace() const noexcept { return kSELECTIVE_SCAN_PLUGIN_NAMESPACE; }

int32_t SelectiveScanPlugin::getNbOutputs() const noexcept { return 1; }

int32_t SelectiveScanPlugin::getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes,
                                                int32_t nbInputs) const noexcept {
  ScanInputLayout layout;
  if (!layoutFor(nbInputs, layout)) return 1;
  if (nbOutputs != 1 || outputTypes == nullptr || inputTypes == nullptr) {
    reportError(ErrorCode::kINVALID_ARGUMENT, "expected exactly one output, got " + std::to_string(nbOutputs));
    return 1;
  }
  if (!isScanType(inputTypes[layout.u()])) {
    reportError(ErrorCode::kINVALID_ARGUMENT, std::string("u must be float32, float16 or bfloat16, got ") +
                                                  typeName(inputTypes[layout.u()]));
    return 1;
  }
  outputTypes[0] = inputTypes[layout.u()];  // y has the type of u
  return 0;
}

int32_t SelectiveScanPlugin::getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs,
                                             nvinfer1::DimsExprs const* /*shapeInputs*/, int32_t nbShapeInputs,
                                             nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
                                             nvinfer1::IExprBuilder& /*exprBuilder*/) noexcept {
  ScanInputLayout layout;
  if (!layoutFor(nbInputs, layout)) return 1;
  if (nbOutputs != 1 || nbShapeInputs != 0 || inputs == nullptr || outputs == nullptr) {
    reportError(ErrorCode::kINVALID_ARGUMENT, "expected one output and no shape inputs");
    return 1;
  }
  // Ranks are known when the network is built; the extents are checked when they are (onShapeChange).
  struct Rank { int32_t index, rank; };
  Rank const ranks[] = {{layout.u(), 3}, {layout.delta(), 3}, {layout.a(), 2}, {layout.b(), 4}, {layout.c(), 4},
                        {layout.d, 1},   {layout.z, 3},       {layout.deltaBias, 1}};
  for (Rank const& r : ranks) {
    if (r.index >= 0 && inputs[r.index].nbDims != r.rank) {
      reportError(ErrorCode::kINVALID_ARGUMENT, std::string("input ") + std::to_string(r.index) + " (" +
                                                    inputName(layout, r.index) + ") must have rank " +
                                                    std::to_string(r.rank) + ", got " +
                                                    std::to_string(inputs[r.index].nbDims));
      return 1;
    }
  }
  outputs[0] = inputs[layout.u()];  // y: (batch, D, L), dynamic batch and L pass through
  // The input count is known from here on; fix the layout now (deterministic, so every later clone, and
  // getFieldsToSerialize on whichever instance TensorRT serializes, carries it).
  mHasD = layout.hasD() ? 1 : 0;
  mHasZ = layout.hasZ() ? 1 : 0;
  mHasDeltaBias = layout.hasDeltaBias() ? 1 : 0;
  return 0;
}

bool SelectiveScanPlugin::supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut,
                                                    int32_t nbInputs, int32_t nbOutputs) noexcept {
  ScanInputLayout layout;
  if (inOut == nullptr || nbOutputs != 1 || pos < 0 || pos >= nbInputs + nbOutputs) return false;
  if (!layoutFor(nbInputs, layout)) return false;
  nvinfer1::PluginTensorDesc const& desc = inOut[pos].desc;
  if (desc.format != nvinfer1::TensorFormat::kLINEAR) return false;
  if (pos < nbInputs && layout.isF32Input(pos)) return desc.type == DataType::kFLOAT;  // A, D, delta_bias
  if (pos == layout.u()) return isScanType(desc.type);
  // delta, B, C, z and the output y: the type of u (inOut[0] is already fixed when pos > 0).
  return desc.type == inOut[layout.u()].desc.type;
}

int32_t SelectiveScanPlugin::configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
                                             nvinfer1::DynamicPluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept {
  ScanInputLayout layout;
  if (!layoutFor(nbInputs, layout)) return 1;
  if (nbOutputs != 1 || in == nullptr) return 1;
  // Extents that are already fixed (not -1) must agree; the rest is checked in onShapeChange.
  auto known = [](int64_t a, int64_t b) { return a < 0 || b < 0 || a == b; };
  nvinfer1::Dims const& u = in[layout.u()].desc.dims;
  nvinfer1::Dims const& a = in[layout.a()].desc.dims;
  nvinfer1::Dims const& b = in[layout.b()].desc.dims;
  bool ok = u.nbDims == 3 && a.nbDims == 2 && b.nbDims == 4 && known(a.d[0], u.d[1]) && known(b.d[0], u.d[0]) &&
            known(b.d[2], a.d[1]) && known(b.d[3], u.d[2]);
  if (ok && a.d[1] > kKERNEL_MAX_STATE) {
    reportError(ErrorCode::kINVALID_ARGUMENT, "state size N = " + std::to_string(a.d[1]) + " exceeds the kernel's limit " +
                                                  std::to_string(kKERNEL_MAX_STATE));
    return 1;
  }
  if (ok && b.d[1] > 0 && u.d[1] > 0 && u.d[1] % b.d[1] != 0) {
    reportError(ErrorCode::kINVALID_ARGUMENT, "D = " + std::to_string(u.d[1]) +
                                                  " is not a multiple of the group count G = " + std::to_string(b.d[1]));
    return 1;
  }
  if (!ok) {
    reportError(ErrorCode::kINVALID_ARGUMENT, "inconsistent input shapes: u " + dimsStr(u) + ", A " + dimsStr(a) +
                                                  ", B " + dimsStr(b));
    return 1;
  }
  // From here on the layout is fixed: it is what getFieldsToSerialize writes.
  mHasD = layout.hasD() ? 1 : 0;
  mHasZ = layout.hasZ() ? 1 : 0;
  mHasDeltaBias = layout.hasDeltaBias() ? 1 : 0;
  return 0;
}

size_t SelectiveScanPlugin::getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* /*inputs*/, int32_t /*nbInputs*/,
                                             nvinfer1::DynamicPluginTensorDesc const* /*outputs*/,
                                             int32_t /*nbOutputs*/) const noexcept {
  return 0;  // the state lives in registers, B/C chunks in shared memory
}

std::string SelectiveScanPlugin::checkShapes(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs,
                                             ScanInputLayout const& layout) const {
  if (in == nullptr || nbInputs != layout.nbInputs) return "input descriptors missing";
  nvinfer1::Dims const& u = in[layout.u()].dims;
  if (u.nbDims != 3) return "u must be (batch, D, L), got " + dimsStr(u);
  int64_t const batch = u.d[0], dim = u.d[1], seqlen = u.d[2];
  auto same = [](nvinfer1::Dims const& x, nvinfer1::Dims const& y) {
    if (x.nbDims != y.nbDims) return false;
    for (int32_t i = 0; i < x.nbDims; ++i)
      if (x.d[i] != y.d[i]) return false;
    return true;
  };
  if (!same(in[layout.delta()].dims, u)) return "delta " + dimsStr(in[layout.delta()].dims) + " must match u " + dimsStr(u);
  nvinfer1::Dims const& a = in[layout.a()].dims;
  if (a.nbDims != 2 || a.d[0] != dim || a.d[1] <= 0) return "A must be (D=" + std::to_string(dim) + ", N), got " + dimsStr(a);
  int64_t const dstate = a.d[1];
  if (dstate > kKERNEL_MAX_STATE) {
    return "state size N = " + std::to_string(dstate) + " exceeds the kernel's limit " + std::to_string(kKERNEL_MAX_STATE);
  }
  nvinfer1::Dims const& b = in[layout.b()].dims;
  if (b.nbDims != 4 || b.d[0] != batch || b.d[1] <= 0 || b.d[2] != dstate || b.d[3] != seqlen) {
    return "B must be (batch=" + std::to_string(batch) + ", G, N=" + std::to_string(dstate) + ", L=" +
           std::to_string(seqlen) + "), got " + dimsStr(b);
  }
  if (!same(in[layout.c()].dims, b)) return "C " + dimsStr(in[layout.c()].dims) + " must match B " + dimsStr(b);
  int64_t const groups = b.d[1];
  if (dim % groups != 0) {
    return "D=" + std::to_string(dim) + " is not a multiple of the group count G=" + std::to_string(groups);
  }
  for (int32_t i : {layout.d, layout.deltaBias}) {
    if (i >= 0 && (in[i].dims.nbDims != 1 || in[i].dims.d[0] != dim)) {
      return std::string(inputName(layout, i)) + " must be (" + std::to_string(dim) + ",), got " + dimsStr(in[i].dims);
    }
  }
  if (layout.hasZ() && !same(in[layout.z].dims, u)) return "z " + dimsStr(in[layout.z].dims) + " must match u " + dimsStr(u);
  int64_t const kIntMax = std::numeric_limits<int32_t>::max();
  if (batch > 65535 || groups > 65535 || dim > kIntMax || seqlen > kIntMax) {
    return "sizes beyond the kernel's limits (batch <= 65535, G <= 65535, D and L < 2^31): u " + dimsStr(u) +
           ", B " + dimsStr(b);
  }
  // Types: TensorRT honours supportsFormatCombination, so a mismatch here is an internal error.
  for (int32_t i = 0; i < nbInputs; ++i) {
    DataType const want = layout.isF32Input(i) ? DataType::kFLOAT : in[layout.u()].type;
    if (in[i].type != want) {
      return std::string("input ") + inputName(layout, i) + " has type " + typeName(in[i].type) + ", expected " +
             typeName(want);
    }
  }
  return {};
}

int32_t SelectiveScanPlugin::onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs,
                                           nvinfer1::PluginTensorDesc const* out, int32_t nbOutputs) noexcept {
  try {
    ScanInputLayout layout;
    if (!layoutFor(nbInputs, layout)) return 1;
    std::string err = checkShapes(in, nbInputs, layout);
    if (err.empty() && (nbOutputs != 1 || out == nullptr || out[0].type != in[layout.u()].type)) {
      err = "the output must be one tensor of the type of u";
    }
    if (!err.empty()) {
      reportError(ErrorCode::kINVALID_ARGUMENT, err);
      return 1;
    }
    mHasD = layout.hasD() ? 1 : 0;
    mHasZ = layout.hasZ() ? 1 : 0;
    mHasDeltaBias = layout.hasDeltaBias() ? 1 : 0;
    return 0;
  } catch (std::exception const& e) {
    reportError(ErrorCode::kINTERNAL_ERROR, e.what());
  } catch (...) {
    reportError(ErrorCode::kINTERNAL_ERROR, "unknown exception in onShapeChange");
  }
  return 1;
}

int32_t SelectiveScanPlugin::enqueue(nvinfer1::PluginTensorDesc const* inputDesc,
                                     nvinfer1::PluginTensorDesc const* outputDesc, void const* const* inputs,
                                     void* const* outputs, void* /*workspace*/, cudaStream_t stream) noexcept {
  try {
    if (inputDesc == nullptr || outputDesc == nullptr || inputs == nullptr || outputs == nullptr) {
      reportError(ErrorCode::kINVALID_ARGUMENT, "enqueue: null descriptors or buffers");
      return 1;
    }
    // The input count is fixed once configured; recover it from the flags configure/onShapeChange set
    // (or that the engine deserialized). Unset flags here would mean guessing where D, z and delta_bias are.
    if (mHasD == kUNSET || mHasZ == kUNSET || mHasDeltaBias == kUNSET) {
      reportError(ErrorCode::kINVALID_STATE, "enqueue before configurePlugin / onShapeChange fixed the input layout");
      return 1;
    }
    int32_t const nbInputs = kREQUIRED_INPUTS + (mHasD == 1) + (mHasZ == 1) + (mHasDeltaBias == 1);
    ScanInputLayout layout;
    if (!layoutFor(nbInputs, layout)) return 1;
    std::string const err = checkShapes(inputDesc, nbInputs, layout);
    if (!err.empty()) {
      reportError(ErrorCode::kINVALID_ARGUMENT, err);
      return 1;
    }
    nvinfer1::Dims const& u = inputDesc[layout.u()].dims;
    scan::SelectiveScanParams p;
    p.batch = static_cast<int>(u.d[0]);
    p.dim = static_cast<int>(u.d[1]);
    p.seqlen = static_cast<int>(u.d[2]);
    p.dstate = static_cast<int>(inputDesc[layout.a()].dims.d[1]);
    p.groups = static_cast<int>(inputDesc[layout.b()].dims.d[1]);
    p.deltaSoftplus = mDeltaSoftplus == 1;
    // Dispatch on the element type: the launcher instantiates the kernel for float, __half and
    // __nv_bfloat16 (selectiveScanKernel.cu) and picks the state-size variant from N.
    if (!toScanDataType(inputDesc[layout.u()].type, p.dataType) || outputDesc[0].type != inputDesc[layout.u()].type) {
      reportError(ErrorCode::kINVALID_ARGUMENT, std::string("unsupported element type ") +
                                                    typeName(inputDesc[layout.u()].type));
      return 1;
    }
    p.u = inputs[layout.u()];
    p.delta = inputs[layout.delta()];
    p.A = static_cast<float const*>(inputs[layout.a()]);
    p.B = inputs[layout.b()];
    p.C = inputs[layout.c()];
    p.D = layout.hasD() ? static_cast<float const*>(inputs[layout.d]) : nullptr;
    p.z = layout.hasZ() ? inputs[layout.z] : nullptr;
    p.deltaBias = layout.hasDeltaBias() ? static_cast<float const*>(inputs[layout.deltaBias]) : nullptr;
    p.y = outputs[0];
    cudaError_t const status = scan::launchSelectiveScan(p, stream);
    if (status != cudaSuccess) {
      reportError(ErrorCode::kFAILED_EXECUTION, std::string("kernel launch failed: ") + cudaGetErrorString(status) +
                                                    " (u " + dimsStr(u) + ", N=" + std::to_string(p.dstate) +
                                                    ", G=" + std::to_string(p.groups) + ")");
      return 1;
    }
    return 0;
  } catch (std::exception const& e) {
    reportError(ErrorCode::kINTERNAL_ERROR, std::string("enqueue: ") + e.what());
  } catch (...) {
    reportError(ErrorCode::kINTERNAL_ERROR, "enqueue: unknown exception");
  }
  return 1;
}

nvinfer1::IPluginV3* SelectiveScanPlugin::attachToContext(nvinfer1::IPluginResourceContext* context) noexcept {
  try {
    auto* p = new SelectiveScanPlugin(*this);
    p->mErrorRecorder = context != nullptr ? context->getErrorRecorder() : nullptr;
    return p;
  } catch (std::exception const& e) {
    reportError(ErrorCode::kFAILED_ALLOCATION, std::string("attachToContext: ") + e.what());
  } catch (...) {
    reportError(ErrorCode::kFAILED_ALLOCATION, "attachToContext failed");
  }
  return nullptr;
}

nvinfer1::PluginFieldCollection const* SelectiveScanPlugin::getFieldsToSerialize() noexcept {
  try {
    mSerializeFields.clear();
    mSerializeFields.emplace_back(kFIELD_DELTA_SOFTPLUS, &mDeltaSoftplus, PluginFieldType::kINT32, 1);
    mSerializeFields.emplace_back(kFIELD_HAS_D, &mHasD, PluginFieldType::kINT32, 1);
    mSerializeFields.emplace_back(kFIELD_HAS_Z, &mHasZ, PluginFieldType::kINT32, 1);
    mSerializeFields.emplace_back(kFIELD_HAS_DELTA_BIAS, &mHasDeltaBias, PluginFieldType::kINT32, 1);
    mSerializeFC.nbFields = static_cast<int32_t>(mSerializeFields.size());
    mSerializeFC.fields = mSerializeFields.data();
    return &mSerializeFC;
  } catch (std::exception const& e) {
    reportError(ErrorCode::kFAILED_ALLOCATION, std::string("getFieldsToSerialize: ") + e.what());
  } catch (...) {
    reportError(ErrorCode::kFAILED_ALLOCATION, "getFieldsToSerialize failed");
  }
  return nullptr;
}

// ---------------------------------------------------------------------------------------------------
// SelectiveScanPluginCreator
// ---------------------------------------------------------------------------------------------------
SelectiveScanPluginCreator::SelectiveScanPluginCreator() {
  mFields.emplace_back(kFIELD_DELTA_SOFTPLUS, nullptr, PluginFieldType::kINT32, 1);
  mFields.emplace_back(kFIELD_HAS_D, nullptr, PluginFieldType::kINT32, 1);
  mFields.emplace_back(kFIELD_HAS_Z, nullptr, PluginFieldType::kINT32, 1);
  mFields.emplace_back(kFIELD_HAS_DELTA_BIAS, nullptr, PluginFieldType::kINT32, 1);
  mFC.nbFields = static_cast<int32_t>(mFields.size());
  mFC.fields = mFields.data();
}

nvinfer1::PluginFieldCollection const* SelectiveScanPluginCreator::getFieldNames() noexcept { return &mFC; }
char const* SelectiveScanPluginCreator::getPluginName() const noexcept { return kSELECTIVE_SCAN_PLUGIN_NAME; }
char const* SelectiveScanPluginCreator::getPluginVersion() const noexcept { return kSELECTIVE_SCAN_PLUGIN_VERSION; }
char const* SelectiveScanPluginCreator::getPluginNamespace() const noexcept { return kSELECTIVE_SCAN_PLUGIN_NAMESPACE; }

nvinfer1::IPluginV3* SelectiveScanPluginCreator::createPlugin(char const* name, nvinfer1::PluginFieldCollection const* fc,
                                                              nvinfer1::TensorRTPhase /*phase*/) noexcept {
  std::string const layer = name != nullptr ? name : "";
  try {
    int32_t deltaSoftplus = 1;
    int32_t has[3] = {kUNSET, kUNSET, kUNSET};
    char const* const hasNames[3] = {kFIELD_HAS_D, kFIELD_HAS_Z, kFIELD_HAS_DELTA_BIAS};
    std::string err;
    for (int32_t i = 0; fc != nullptr && i < fc->nbFields && err.empty(); ++i) {
      PluginField const& f = fc->fields[i];
      if (f.name == nullptr) continue;
      if (std::strcmp(f.name, kFIELD_DELTA_SOFTPLUS) == 0) {
        if (readIntField(f, deltaSoftplus, err) && deltaSoftplus != 0 && deltaSoftplus != 1) {
          err = "attribute delta_softplus must be 0 or 1, got " + std::to_string(deltaSoftplus);
        }
        continue;
      }
      bool matched = false;
      for (int32_t k = 0; k < 3; ++k) {
        if (std::strcmp(f.name, hasNames[k]) != 0) continue;
        matched = true;
        if (readIntField(f, has[k], err) && has[k] != kUNSET && has[k] != 0 && has[k] != 1) {
          err = std::string("attribute ") + hasNames[k] + " must be 0, 1 or -1 (decide by the input count), got " +
                std::to_string(has[k]);
        }
      }
      if (!matched) {
        logMessage(nvinfer1::ILogger::Severity::kWARNING,
                   "layer '" + layer + "': ignoring unknown plugin field '" + f.name + "'");
      }
    }
    bool const anySet = has[0] != kUNSET || has[1] != kUNSET || has[2] != kUNSET;
    bool const allSet = has[0] != kUNSET && has[1] != kUNSET && has[2] != kUNSET;
    if (err.empty() && anySet && !allSet) {
      err = "has_D, has_z and has_delta_bias must be given together (or none of them)";
    }
    // Both phases take the same fields. kRUNTIME without the has_* fields (or with -1) is still well
    // defined: onShapeChange, which always precedes enqueue, resolves the layout from the input count.
    if (!err.empty()) {
      logMessage(nvinfer1::ILogger::Severity::kERROR, "layer '" + layer + "': " + err);
      return nullptr;
    }
    return new SelectiveScanPlugin(layer, deltaSoftplus, has[0], has[1], has[2]);
  } catch (std::exception const& e) {
    logMessage(nvinfer1::ILogger::Severity::kERROR, "layer '" + layer + "': createPlugin failed: " + e.what());
  } catch (...) {
    logMessage(nvinfer1::ILogger::Severity::kERROR, "createPlugin failed");
  }
  return nullptr;
}

}  // namespace trt
}  // namespace emrrg

// ---------------------------------------------------------------------------------------------------
// Plugin-library entry points
// ---------------------------------------------------------------------------------------------------
extern "C" void setLoggerFinder(nvinfer1::ILoggerFinder* finder) {
  std::lock_guard<std::mutex> lock(emrrg::trt::gLoggerMutex);
  emrrg::trt::gLoggerFinder = finder;
}

extern "C" nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
  static emrrg::trt::SelectiveScanPluginCreator sCreator;
  static nvinfer1::IPluginCreatorInterface* const kCreators[] = {&sCreator};
  nbCreators = 1;
  return kCreators;
}
