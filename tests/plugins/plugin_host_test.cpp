// Host-side checks of the TensorRT plugin's logic (selectiveScanPlugin.cpp), compiled against NVIDIA's
// public TensorRT headers (10.x and 11.x) and the CUDA toolkit's headers, linked against neither library:
// a recording stub stands in for the CUDA launcher and the test defines the one CUDA runtime function the
// plugin calls (cudaGetErrorString). Driven by test_trt_plugin_host.py.
// What it covers: creator identity and fields, attribute validation, input-layout resolution for 5..8
// inputs (by count and by has_* flags), output type/shape, format combinations, shape validation,
// serialization round trip, the pointer/dtype mapping that enqueue hands to the launcher, and error
// reporting (error recorder and logger). What it cannot cover: TensorRT itself (parsing, building,
// the real ABI) and the kernel on a GPU.
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "selectiveScanPlugin.h"

using namespace nvinfer1;
using emrrg::trt::ScanInputLayout;
using emrrg::trt::SelectiveScanPlugin;

// ---- the recording launcher ------------------------------------------------------------------------
static int gLaunches = 0;
static emrrg::scan::SelectiveScanParams gLast;
static cudaError_t gLaunchResult = cudaSuccess;
namespace emrrg {
namespace scan {
cudaError_t launchSelectiveScan(const SelectiveScanParams& params, cudaStream_t) {
  ++gLaunches;
  gLast = params;
  return gLaunchResult;
}
}  // namespace scan
}  // namespace emrrg

// The plugin's only CUDA runtime call (the error text of a failed launch); defined here so that the test
// links without libcudart. The three codes are the ones the recording launcher returns.
extern "C" char const* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : e == cudaErrorInvalidValue ? "invalid argument" : "unspecified launch failure";
}

// ---- test helpers ----------------------------------------------------------------------------------
static int gChecks = 0, gFailures = 0;
#define CHECK(cond)                                                                   \
  do {                                                                                \
    ++gChecks;                                                                        \
    if (!(cond)) {                                                                    \
      ++gFailures;                                                                    \
      std::printf("FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond);                     \
    }                                                                                 \
  } while (0)

struct Recorder : IErrorRecorder {
  std::vector<std::pair<ErrorCode, std::string>> errors;
  RefCount refs = 0;
  bool reportError(ErrorCode val, ErrorDesc desc) noexcept override {
    errors.emplace_back(val, desc);
    return true;
  }
  int32_t getNbErrors() const noexcept override { return static_cast<int32_t>(errors.size()); }
  ErrorCode getErrorCode(int32_t i) const noexcept override { return errors[static_cast<size_t>(i)].first; }
  ErrorDesc getErrorDesc(int32_t i) const noexcept override { return errors[static_cast<size_t>(i)].second.c_str(); }
  bool hasOverflowed() const noexcept override { return false; }
  void clear() noexcept override { errors.clear(); }
  RefCount incRefCount() noexcept override { return ++refs; }
  RefCount decRefCount() noexcept override { return --refs; }
};

struct Logger : ILogger {
  std::vector<std::string> errors, warnings;
  void log(Severity s, AsciiChar const* msg) noexcept override {
    if (s <= Severity::kERROR) errors.emplace_back(msg);
    else if (s == Severity::kWARNING) warnings.emplace_back(msg);
  }
};
struct Finder : ILoggerFinder {
  Logger logger;
  ILogger* findLogger() override { return &logger; }
};

struct Context : IPluginResourceContext {
  Recorder* rec;
  explicit Context(Recorder* r) : rec(r) {}
  IGpuAllocator* getGpuAllocator() const noexcept override { return nullptr; }
  IErrorRecorder* getErrorRecorder() const noexcept override { return rec; }
};

// TensorRT's IDimensionExpr and IExprBuilder are handles whose methods forward to an implementation object
// (apiv::VDimensionExpr, apiv::VExprBuilder in NvInferImpl.h) that only libnvinfer creates. The test
// provides the implementation of a dimension (a constant, or -1 for a dynamic extent) and sets the
// handle's mImpl to it.
struct ExprImpl : apiv::VDimensionExpr {
  int64_t v = 0;
  bool isConstant() const override { return v >= 0; }
  int64_t getConstantValue() const override { return v; }
  bool isSizeTensor() const override { return false; }
};
struct Expr : IDimensionExpr {
  ExprImpl impl;
  Expr(int64_t x) {  // NOLINT(google-explicit-constructor): lets `Expr e[] = {1, 2}` build in place (INoCopy)
    impl.v = x;
    mImpl = &impl;
  }
};
// The plugin's output shape is u's own expressions, so it never calls the builder: a handle without an
// implementation (a call would crash the test, which is the failure wanted).
struct Builder : IExprBuilder {
  Builder() { mImpl = nullptr; }
};

static Dims dims(std::vector<int64_t> const& v) {
  Dims d{};
  d.nbDims = static_cast<int32_t>(v.size());
  for (size_t i = 0; i < v.size(); ++i) d.d[i] = v[i];
  return d;
}

static PluginTensorDesc desc(std::vector<int64_t> const& shape, DataType t) {
  PluginTensorDesc d{};
  d.dims = dims(shape);
  d.type = t;
  d.format = TensorFormat::kLINEAR;
  d.scale = -1.f;
  return d;
}

// A node's input descriptors: b, D, L, N, G and which optional inputs are present.
struct Node {
  std::vector<PluginTensorDesc> in;
  ScanInputLayout layout;
  Node(int64_t b, int64_t D, int64_t L, int64_t N, int64_t G, bool hasD, bool hasZ, bool hasBias, DataType t) {
    in = {desc({b, D, L}, t), desc({b, D, L}, t), desc({D, N}, DataType::kFLOAT), desc({b, G, N, L}, t),
          desc({b, G, N, L}, t)};
    if (hasD) in.push_back(desc({D}, DataType::kFLOAT));
    if (hasZ) in.push_back(desc({b, D, L}, t));
    if (hasBias) in.push_back(desc({D}, DataType::kFLOAT));
    ScanInputLayout::resolve(hasD, hasZ, hasBias, static_cast<int32_t>(in.size()), layout);
  }
  int32_t n() const { return static_cast<int32_t>(in.size()); }
  std::vector<DynamicPluginTensorDesc> dyn() const {
    std::vector<DynamicPluginTensorDesc> out;
    for (auto const& d : in) {
      DynamicPluginTensorDesc x{};
      x.desc = d;
      x.desc.dims.d[0] = -1;  // dynamic batch at build time
      if (d.dims.nbDims == 1 || d.dims.nbDims == 2) x.desc.dims = d.dims;  // weights: static
      x.min = x.max = x.opt = d.dims;
      out.push_back(x);
    }
    return out;
  }
};

static IPluginCreatorV3One* creator() {
  int32_t n = 0;
  IPluginCreatorInterface* const* list = getCreators(n);
  return n == 1 ? static_cast<IPluginCreatorV3One*>(list[0]) : nullptr;
}

static std::unique_ptr<SelectiveScanPlugin> make(std::vector<PluginField> const& fields,
                                                 TensorRTPhase phase = TensorRTPhase::kBUILD) {
  PluginFieldCollection fc;
  fc.nbFields = static_cast<int32_t>(fields.size());
  fc.fields = fields.data();
  return std::unique_ptr<SelectiveScanPlugin>(
      static_cast<SelectiveScanPlugin*>(creator()->createPlugin("scan_layer", &fc, phase)));
}

static int32_t runEnqueue(SelectiveScanPlugin& p, Node const& node, std::vector<void const*> const& ptrs, void* y) {
  std::vector<PluginTensorDesc> outDesc = {node.in[0]};
  void* outs[] = {y};
  return p.enqueue(node.in.data(), outDesc.data(), ptrs.data(), outs, nullptr, nullptr);
}

int main() {
  Finder finder;
  setLoggerFinder(&finder);

  // ---- creator identity and fields ----
  IPluginCreatorV3One* c = creator();
  CHECK(c != nullptr);
  CHECK(std::strcmp(c->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") == 0);
  CHECK(std::strcmp(c->getPluginName(), "SelectiveScan") == 0);
  CHECK(std::strcmp(c->getPluginVersion(), "1") == 0);
  CHECK(std::strcmp(c->getPluginNamespace(), "emrrg") == 0);
  PluginFieldCollection const* names = c->getFieldNames();
  CHECK(names != nullptr && names->nbFields == 4);
  std::vector<std::string> fieldNames;
  for (int32_t i = 0; names && i < names->nbFields; ++i) {
    fieldNames.emplace_back(names->fields[i].name);
    CHECK(names->fields[i].type == PluginFieldType::kINT32);
  }
  CHECK(fieldNames == (std::vector<std::string>{"delta_softplus", "has_D", "has_z", "has_delta_bias"}));

  // ---- attribute validation (the ONNX parser passes int attributes as kINT32) ----
  int32_t zero = 0, one = 1, two = 2, minus1 = -1;
  int64_t one64 = 1;
  float onef = 1.f;
  {
    auto p = make({});
    CHECK(p && p->deltaSoftplus() == 1);  // default: softplus on
    CHECK(p && std::strcmp(p->getPluginNamespace(), "emrrg") == 0);
  }
  CHECK(make({{"delta_softplus", &zero, PluginFieldType::kINT32, 1}})->deltaSoftplus() == 0);
  CHECK(make({{"delta_softplus", &one64, PluginFieldType::kINT64, 1}})->deltaSoftplus() == 1);
  size_t logged = finder.logger.errors.size();
  CHECK(make({{"delta_softplus", &two, PluginFieldType::kINT32, 1}}) == nullptr);
  CHECK(finder.logger.errors.size() == logged + 1 &&
        finder.logger.errors.back().find("delta_softplus must be 0 or 1, got 2") != std::string::npos);
  CHECK(make({{"delta_softplus", &onef, PluginFieldType::kFLOAT32, 1}}) == nullptr);
  CHECK(make({{"delta_softplus", &one, PluginFieldType::kINT32, 2}}) == nullptr);
  CHECK(make({{"has_D", &one, PluginFieldType::kINT32, 1}}) == nullptr);  // all three or none
  CHECK(make({{"has_D", &two, PluginFieldType::kINT32, 1}, {"has_z", &one, PluginFieldType::kINT32, 1},
              {"has_delta_bias", &one, PluginFieldType::kINT32, 1}}) == nullptr);
  {
    // A serialized plugin without the layout fields: onShapeChange resolves it from the input count.
    auto p = make({}, TensorRTPhase::kRUNTIME);
    CHECK(p != nullptr);
    Node node(1, 88, 10, 16, 4, true, true, false, DataType::kFLOAT);  // 7 inputs -> D and z by count
    std::vector<PluginTensorDesc> out = {node.in[0]};
    CHECK(p && p->onShapeChange(node.in.data(), node.n(), out.data(), 1) == 0);
    PluginFieldCollection const* f = p ? p->getFieldsToSerialize() : nullptr;
    CHECK(f && *static_cast<int32_t const*>(f->fields[1].data) == 1 && *static_cast<int32_t const*>(f->fields[2].data) == 1 &&
          *static_cast<int32_t const*>(f->fields[3].data) == 0);
  }
  size_t warned = finder.logger.warnings.size();
  CHECK(make({{"something_else", &one, PluginFieldType::kINT32, 1}}) != nullptr);  // ignored, with a warning
  CHECK(finder.logger.warnings.size() == warned + 1);

  // ---- layout resolution ----
  {
    ScanInputLayout l;
    CHECK(ScanInputLayout::resolve(-1, -1, -1, 5, l).empty() && !l.hasD() && !l.hasZ() && !l.hasDeltaBias());
    CHECK(ScanInputLayout::resolve(-1, -1, -1, 6, l).empty() && l.d == 5 && !l.hasZ() && !l.hasDeltaBias());
    CHECK(ScanInputLayout::resolve(-1, -1, -1, 7, l).empty() && l.d == 5 && l.z == 6 && !l.hasDeltaBias());
    CHECK(ScanInputLayout::resolve(-1, -1, -1, 8, l).empty() && l.d == 5 && l.z == 6 && l.deltaBias == 7);
    CHECK(ScanInputLayout::resolve(0, 1, 1, 7, l).empty() && !l.hasD() && l.z == 5 && l.deltaBias == 6);
    CHECK(ScanInputLayout::resolve(1, 0, 1, 7, l).empty() && l.d == 5 && !l.hasZ() && l.deltaBias == 6);
    CHECK(ScanInputLayout::resolve(0, 0, 1, 6, l).empty() && l.deltaBias == 5);
    CHECK(!ScanInputLayout::resolve(1, 1, 1, 7, l).empty());
    CHECK(!ScanInputLayout::resolve(-1, -1, -1, 4, l).empty());
    CHECK(!ScanInputLayout::resolve(-1, -1, -1, 9, l).empty());
    CHECK(l.u() == 0 && l.delta() == 1 && l.a() == 2 && l.b() == 3 && l.c() == 4);
  }

  // ---- capabilities ----
  {
    auto p = make({});
    auto* core = p->getCapabilityInterface(PluginCapabilityType::kCORE);
    auto* build = p->getCapabilityInterface(PluginCapabilityType::kBUILD);
    auto* rt = p->getCapabilityInterface(PluginCapabilityType::kRUNTIME);
    CHECK(core && build && rt);
    CHECK(std::strcmp(core->getInterfaceInfo().kind, "PLUGIN_V3ONE_CORE") == 0);
    CHECK(std::strcmp(build->getInterfaceInfo().kind, "PLUGIN_V3ONE_BUILD") == 0);
    CHECK(std::strcmp(rt->getInterfaceInfo().kind, "PLUGIN_V3ONE_RUNTIME") == 0);
    CHECK(p->getNbOutputs() == 1);
  }

  // ---- output type and shape ----
  {
    auto p = make({});
    DataType in8[8] = {DataType::kHALF, DataType::kHALF, DataType::kFLOAT, DataType::kHALF, DataType::kHALF,
                       DataType::kFLOAT, DataType::kHALF, DataType::kFLOAT};
    DataType out = DataType::kFLOAT;
    CHECK(p->getOutputDataTypes(&out, 1, in8, 8) == 0 && out == DataType::kHALF);
    in8[0] = DataType::kBF16;
    CHECK(p->getOutputDataTypes(&out, 1, in8, 8) == 0 && out == DataType::kBF16);
    in8[0] = DataType::kINT32;
    CHECK(p->getOutputDataTypes(&out, 1, in8, 8) != 0);
    CHECK(p->getOutputDataTypes(&out, 1, in8, 4) != 0);

    Expr e[6] = {-1, 3072, 197, 16, 4, -1};
    DimsExprs ins[8];
    auto set = [&](DimsExprs& d, std::vector<int> idx) {
      d.nbDims = static_cast<int32_t>(idx.size());
      for (size_t i = 0; i < idx.size(); ++i) d.d[i] = &e[idx[i]];
    };
    set(ins[0], {0, 1, 2}); set(ins[1], {0, 1, 2}); set(ins[2], {1, 3}); set(ins[3], {0, 4, 3, 2});
    set(ins[4], {0, 4, 3, 2}); set(ins[5], {1}); set(ins[6], {0, 1, 2}); set(ins[7], {1});
    DimsExprs outs[1];
    Builder builder;
    CHECK(p->getOutputShapes(ins, 8, nullptr, 0, outs, 1, builder) == 0);
    CHECK(outs[0].nbDims == 3 && outs[0].d[0] == &e[0] && outs[0].d[1] == &e[1] && outs[0].d[2] == &e[2]);
    PluginFieldCollection const* fs = p->getFieldsToSerialize();  // the layout is fixed once shapes are asked
    CHECK(fs && *static_cast<int32_t const*>(fs->fields[1].data) == 1 && *static_cast<int32_t const*>(fs->fields[2].data) == 1 &&
          *static_cast<int32_t const*>(fs->fields[3].data) == 1);
    set(ins[3], {0, 4, 3});  // B of rank 3
    CHECK(p->getOutputShapes(ins, 8, nullptr, 0, outs, 1, builder) != 0);
  }

  // ---- format combinations ----
  {
    auto p = make({});
    Node node(1, 88, 7, 16, 4, true, true, false, DataType::kHALF);  // 7 inputs: D at 5, z at 6
    auto io = node.dyn();
    DynamicPluginTensorDesc y{};
    y.desc = node.in[0];
    io.push_back(y);
    for (int32_t pos = 0; pos < 8; ++pos) CHECK(p->supportsFormatCombination(pos, io.data(), 7, 1));
    io[2].desc.type = DataType::kHALF;  // A must stay f32
    CHECK(!p->supportsFormatCombination(2, io.data(), 7, 1));
    io[2].desc.type = DataType::kFLOAT;
    io[5].desc.type = DataType::kHALF;  // D must stay f32
    CHECK(!p->supportsFormatCombination(5, io.data(), 7, 1));
    io[5].desc.type = DataType::kFLOAT;
    io[6].desc.type = DataType::kFLOAT;  // z must have u's type
    CHECK(!p->supportsFormatCombination(6, io.data(), 7, 1));
    io[6].desc.type = DataType::kHALF;
    io[7].desc.type = DataType::kFLOAT;  // y must have u's type
    CHECK(!p->supportsFormatCombination(7, io.data(), 7, 1));
    io[7].desc.type = DataType::kHALF;
    io[1].desc.format = TensorFormat::kCHW4;
    CHECK(!p->supportsFormatCombination(1, io.data(), 7, 1));
    io[1].desc.format = TensorFormat::kLINEAR;
    io[0].desc.type = DataType::kINT8;
    CHECK(!p->supportsFormatCombination(0, io.data(), 7, 1));
    io[0].desc.type = DataType::kFLOAT;
    CHECK(p->supportsFormatCombination(0, io.data(), 7, 1));
  }

  // ---- configure -> serialize -> deserialize; enqueue maps every input ----
  struct Case { bool d, z, bias; DataType t; emrrg::scan::ScanDataType want; int32_t softplus; };
  Case const cases[] = {{true, true, true, DataType::kFLOAT, emrrg::scan::ScanDataType::kFloat32, 1},
                        {true, true, false, DataType::kHALF, emrrg::scan::ScanDataType::kFloat16, 0},
                        {false, false, false, DataType::kBF16, emrrg::scan::ScanDataType::kBFloat16, 1},
                        {true, false, false, DataType::kFLOAT, emrrg::scan::ScanDataType::kFloat32, 1}};
  for (Case const& k : cases) {
    Node node(2, 88, 37, 16, 4, k.d, k.z, k.bias, k.t);
    auto build = make({{"delta_softplus", &k.softplus, PluginFieldType::kINT32, 1}});
    auto dyn = node.dyn();
    DynamicPluginTensorDesc yd{};
    yd.desc = node.in[0];
    CHECK(build->configurePlugin(dyn.data(), node.n(), &yd, 1) == 0);
    PluginFieldCollection const* ser = build->getFieldsToSerialize();
    CHECK(ser != nullptr && ser->nbFields == 4);
    std::vector<PluginField> copy(ser->fields, ser->fields + ser->nbFields);
    auto rt = make(copy, TensorRTPhase::kRUNTIME);  // what deserialization does
    CHECK(rt != nullptr);
    if (!rt) continue;
    CHECK(rt->deltaSoftplus() == k.softplus);
    Recorder rec;
    Context ctx(&rec);
    std::unique_ptr<SelectiveScanPlugin> exec(static_cast<SelectiveScanPlugin*>(rt->attachToContext(&ctx)));
    std::vector<PluginTensorDesc> out = {node.in[0]};
    CHECK(exec->onShapeChange(node.in.data(), node.n(), out.data(), 1) == 0);
    // Distinct fake device pointers, one per input.
    static char buffers[9][16];
    std::vector<void const*> ptrs;
    for (int32_t i = 0; i < node.n(); ++i) ptrs.push_back(buffers[i]);
    int before = gLaunches;
    CHECK(runEnqueue(*exec, node, ptrs, buffers[8]) == 0);
    CHECK(gLaunches == before + 1);
    CHECK(gLast.batch == 2 && gLast.dim == 88 && gLast.seqlen == 37 && gLast.dstate == 16 && gLast.groups == 4);
    CHECK(gLast.dataType == k.want && gLast.deltaSoftplus == (k.softplus == 1));
    CHECK(gLast.u == buffers[0] && gLast.delta == buffers[1] && gLast.A == static_cast<void const*>(buffers[2]) &&
          gLast.B == buffers[3] && gLast.C == buffers[4] && gLast.y == buffers[8]);
    int32_t next = 5;
    CHECK(static_cast<void const*>(gLast.D) == (k.d ? buffers[next++] : nullptr));
    CHECK(gLast.z == (k.z ? buffers[next++] : nullptr));
    CHECK(static_cast<void const*>(gLast.deltaBias) == (k.bias ? buffers[next++] : nullptr));
    CHECK(rec.errors.empty());

    // A launch failure is reported through the context's error recorder, not swallowed.
    gLaunchResult = cudaErrorInvalidValue;
    CHECK(runEnqueue(*exec, node, ptrs, buffers[8]) != 0);
    gLaunchResult = cudaSuccess;
    CHECK(rec.errors.size() == 1 && rec.errors[0].first == ErrorCode::kFAILED_EXECUTION &&
          rec.errors[0].second.find("kernel launch failed: invalid argument") != std::string::npos &&
          rec.errors[0].second.find("scan_layer") != std::string::npos);
  }

  // ---- shape errors never reach the launcher ----
  {
    Node good(1, 88, 10, 16, 4, true, true, true, DataType::kFLOAT);
    std::vector<PluginTensorDesc> out = {good.in[0]};
    struct Bad { char const* what; int32_t input; std::vector<int64_t> shape; };
    Bad const bads[] = {{"B must be", 3, {1, 4, 15, 10}},      {"C (1, 4, 16, 9) must match B", 4, {1, 4, 16, 9}},
                        {"D must be (88,)", 5, {87}},          {"z (1, 88, 9) must match u", 6, {1, 88, 9}},
                        {"A must be (D=88, N)", 2, {87, 16}},  {"exceeds the kernel's limit", 2, {88, 65}},
                        {"delta (1, 87, 10) must match u", 1, {1, 87, 10}}};
    for (Bad const& bad : bads) {
      Node node = good;
      node.in[static_cast<size_t>(bad.input)].dims = dims(bad.shape);
      if (bad.input == 2 && bad.shape[1] == 65) {  // N = 65: B and C follow so only N is wrong
        node.in[3].dims = dims({1, 4, 65, 10});
        node.in[4].dims = dims({1, 4, 65, 10});
      }
      auto p = make({});
      Recorder rec;
      Context ctx(&rec);
      std::unique_ptr<SelectiveScanPlugin> exec(static_cast<SelectiveScanPlugin*>(p->attachToContext(&ctx)));
      CHECK(exec->onShapeChange(node.in.data(), node.n(), out.data(), 1) != 0);
      CHECK(!rec.errors.empty() && rec.errors.back().second.find(bad.what) != std::string::npos);
      if (rec.errors.empty() || rec.errors.back().second.find(bad.what) == std::string::npos) {
        std::printf("  expected '%s', got '%s'\n", bad.what, rec.errors.empty() ? "" : rec.errors.back().second.c_str());
      }
    }
    // G not dividing D
    Node node(1, 90, 10, 16, 4, true, true, true, DataType::kFLOAT);
    auto p = make({});
    Recorder rec;
    Context ctx(&rec);
    std::unique_ptr<SelectiveScanPlugin> exec(static_cast<SelectiveScanPlugin*>(p->attachToContext(&ctx)));
    std::vector<PluginTensorDesc> out90 = {node.in[0]};
    CHECK(exec->onShapeChange(node.in.data(), node.n(), out90.data(), 1) != 0);
    CHECK(!rec.errors.empty() && rec.errors.back().second.find("not a multiple of the group count") != std::string::npos);
  }

  // ---- enqueue on an unconfigured plugin is refused (layout unknown) ----
  {
    Node node(1, 88, 10, 16, 4, true, true, true, DataType::kFLOAT);
    auto p = make({});
    Recorder rec;
    Context ctx(&rec);
    std::unique_ptr<SelectiveScanPlugin> exec(static_cast<SelectiveScanPlugin*>(p->attachToContext(&ctx)));
    static char buf[9][4];
    std::vector<void const*> ptrs(buf, buf + 8);
    int before = gLaunches;
    CHECK(runEnqueue(*exec, node, ptrs, buf[8]) != 0);
    CHECK(gLaunches == before);
    CHECK(!rec.errors.empty() && rec.errors.back().first == ErrorCode::kINVALID_STATE);
  }

  // ---- build-time errors without a context go to TensorRT's logger ----
  {
    auto p = make({});
    DataType t[4] = {};
    DataType out{};
    size_t n = finder.logger.errors.size();
    CHECK(p->getOutputDataTypes(&out, 1, t, 4) != 0);
    CHECK(finder.logger.errors.size() == n + 1 &&
          finder.logger.errors.back().find("5 to 8 inputs") != std::string::npos);
  }

  // ---- clone keeps the attributes ----
  {
    auto p = make({{"delta_softplus", &zero, PluginFieldType::kINT32, 1}, {"has_D", &one, PluginFieldType::kINT32, 1},
                   {"has_z", &zero, PluginFieldType::kINT32, 1}, {"has_delta_bias", &minus1, PluginFieldType::kINT32, 1}});
    CHECK(p == nullptr);  // -1 mixed with explicit flags is "not all given"
    auto q = make({{"delta_softplus", &zero, PluginFieldType::kINT32, 1}, {"has_D", &one, PluginFieldType::kINT32, 1},
                   {"has_z", &zero, PluginFieldType::kINT32, 1}, {"has_delta_bias", &one, PluginFieldType::kINT32, 1}});
    CHECK(q != nullptr);
    if (q) {
      std::unique_ptr<SelectiveScanPlugin> cl(static_cast<SelectiveScanPlugin*>(q->clone()));
      CHECK(cl && cl->deltaSoftplus() == 0);
      PluginFieldCollection const* f = cl->getFieldsToSerialize();
      CHECK(f && f->nbFields == 4 && *static_cast<int32_t const*>(f->fields[1].data) == 1 &&
            *static_cast<int32_t const*>(f->fields[2].data) == 0 && *static_cast<int32_t const*>(f->fields[3].data) == 1);
    }
  }

  std::printf("%d checks, %d failures\n", gChecks, gFailures);
  return gFailures == 0 ? 0 : 1;
}
