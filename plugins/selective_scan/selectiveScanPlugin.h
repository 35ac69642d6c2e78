/*
 * selectiveScanPlugin.h — TensorRT plugin "SelectiveScan" (version "1", namespace "emrrg"): the
 * com.emrrg::SelectiveScan ONNX node on TensorRT 10.x (JetPack 6 = 10.3) and 11.x, wrapping the CUDA
 * kernel of selectiveScanKernel.h. IPluginV3 only (IPluginV3OneCore / IPluginV3OneBuild /
 * IPluginV3OneRuntime, creator IPluginCreatorV3One): no deprecated IPluginV2 API.
 *
 * Inputs (index: name, shape, dtype); T = f32 | f16 | bf16, all tensors linear (row-major):
 *   0 u          (batch, D, L)     T
 *   1 delta      (batch, D, L)     T
 *   2 A          (D, N)            f32
 *   3 B          (batch, G, N, L)  T     channel d uses group d / (D / G)
 *   4 C          (batch, G, N, L)  T
 *   . D          (D)               f32   optional
 *   . z          (batch, D, L)     T     optional
 *   . delta_bias (D)               f32   optional
 * Output:
 *   0 y          (batch, D, L)     T     (the type of u)
 *
 * The optional inputs follow C in this order, each only when present, so a node has 5 to 8 inputs.
 * Which ones are present comes from the plugin fields has_D / has_z / has_delta_bias when they are set
 * (0 or 1), else from the input count: 5 = none, 6 = D, 7 = D and z, 8 = all three. The index of each
 * input is resolved once (ScanInputLayout) and read through named accessors, never as a literal.
 * (TensorRT's ONNX parser passes only the present inputs for trailing absent ones; for an absent input
 * in the middle — an empty name in the ONNX node — runtime/tensorrt.py::prepare_onnx_for_tensorrt, which
 * build_engine runs before parsing, drops the gap and writes the has_* attributes.)
 *
 * Plugin fields (ONNX attributes of the node; the parser passes those named in getFieldNames()):
 *   delta_softplus  int32  0 or 1, default 1   dt = softplus(delta + delta_bias) when 1
 *   has_D           int32  -1 (by count), 0, 1 default -1
 *   has_z           int32  -1, 0, 1            default -1
 *   has_delta_bias  int32  -1, 0, 1            default -1
 * getFieldsToSerialize() writes all four, with the has_* resolved, so a deserialized engine never
 * depends on the input-count rule.
 *
 * Batch (and L) are dynamic: getOutputShapes returns the shape of u. Accumulation is f32 whatever T is.
 * Limits (the kernel's): N <= 64, D % G == 0, batch <= 65535, G <= 65535.
 *
 * Loading: the library exports the plugin-library entry points getCreators() and setLoggerFinder()
 * (TensorRT >= 10.0), so trt.get_plugin_registry().load_library(path), IPluginRegistry::loadLibrary and
 * `trtexec --dynamicPlugins=path` register it without initLibNvInferPlugins. It does not self-register
 * at load time (no REGISTER_TENSORRT_PLUGIN): loading it twice through the registry would otherwise
 * clash with the static registration.
 */
#pragma once

#include <NvInferRuntime.h>

#include <cstdint>
#include <string>
#include <vector>

#include "selectiveScanKernel.h"

namespace emrrg {
namespace trt {

// The plugin's identity. export/onnx_ops.py writes the same values as the node's op_type and its
// plugin_version / plugin_namespace attributes; tests/plugins/test_trt_plugin_host.py reads this block
// and fails when the two drift apart.
// [emrrg:plugin-constants-begin]
constexpr char const* kSELECTIVE_SCAN_PLUGIN_NAME = "SelectiveScan";
constexpr char const* kSELECTIVE_SCAN_PLUGIN_VERSION = "1";
constexpr char const* kSELECTIVE_SCAN_PLUGIN_NAMESPACE = "emrrg";
// [emrrg:plugin-constants-end]

// Plugin field names (= ONNX attribute names).
constexpr char const* kFIELD_DELTA_SOFTPLUS = "delta_softplus";
constexpr char const* kFIELD_HAS_D = "has_D";
constexpr char const* kFIELD_HAS_Z = "has_z";
constexpr char const* kFIELD_HAS_DELTA_BIAS = "has_delta_bias";

constexpr int32_t kREQUIRED_INPUTS = 5;  // u, delta, A, B, C
constexpr int32_t kMAX_INPUTS = 8;
constexpr int32_t kUNSET = -1;  // has_* not given: decide by the input count
// The kernel's largest state size N: emrrg::scan::kMaxStateDim of selectiveScanCore.h, which cannot be
// included here (its __host__/__device__ fallbacks clash with the CUDA headers in a g++ translation
// unit). test_trt_plugin_host.py checks that the two values agree; the launcher refuses a larger N anyway.
constexpr int64_t kKERNEL_MAX_STATE = 64;

// Where each input sits for a given node (-1 = absent). Built by ScanInputLayout::resolve().
struct ScanInputLayout {
  int32_t nbInputs = 0;
  int32_t d = -1, z = -1, deltaBias = -1;

  static constexpr int32_t u() { return 0; }
  static constexpr int32_t delta() { return 1; }
  static constexpr int32_t a() { return 2; }
  static constexpr int32_t b() { return 3; }
  static constexpr int32_t c() { return 4; }
  bool hasD() const { return d >= 0; }
  bool hasZ() const { return z >= 0; }
  bool hasDeltaBias() const { return deltaBias >= 0; }
  // Inputs whose element type must be f32 whatever T is.
  bool isF32Input(int32_t i) const { return i == a() || i == d || i == deltaBias; }
  // Inputs shaped (batch, D, L) like u.
  bool isActivation(int32_t i) const { return i == u() || i == delta() || i == z; }

  // Resolve from the declared flags (kUNSET, 0 or 1 each) and the actual input count. Returns an empty
  // string on success, else why the count and the flags disagree.
  static std::string resolve(int32_t hasD, int32_t hasZ, int32_t hasDeltaBias, int32_t nbInputs, ScanInputLayout& out);
};

class SelectiveScanPlugin final : public nvinfer1::IPluginV3,
                                  public nvinfer1::IPluginV3OneCore,
                                  public nvinfer1::IPluginV3OneBuild,
                                  public nvinfer1::IPluginV3OneRuntime {
 public:
  SelectiveScanPlugin(std::string layerName, int32_t deltaSoftplus, int32_t hasD, int32_t hasZ, int32_t hasDeltaBias);
  SelectiveScanPlugin(SelectiveScanPlugin const& other);
  SelectiveScanPlugin& operator=(SelectiveScanPlugin const&) = delete;
  ~SelectiveScanPlugin() override = default;

  // IPluginV3
  nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
  nvinfer1::IPluginV3* clone() noexcept override;

  // IPluginV3OneCore
  char const* getPluginName() const noexcept override;
  char const* getPluginVersion() const noexcept override;
  char const* getPluginNamespace() const noexcept override;

  // IPluginV3OneBuild
  int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
                          nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
  int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs, nvinfer1::DataType const* inputTypes,
                             int32_t nbInputs) const noexcept override;
  int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
                          int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
                          nvinfer1::IExprBuilder& exprBuilder) noexcept override;
  bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
                                 int32_t nbOutputs) noexcept override;
  int32_t getNbOutputs() const noexcept override;
  size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
                          nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;

  // IPluginV3OneRuntime
  int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
                        int32_t nbOutputs) noexcept override;
  int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
                  void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
  nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
  nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

  int32_t deltaSoftplus() const { return mDeltaSoftplus; }

 private:
  // Resolve the layout for nbInputs, reporting a mismatch through the error recorder / logger.
  bool layoutFor(int32_t nbInputs, ScanInputLayout& layout) const;
  // Full shape check for concrete dims (onShapeChange / enqueue); an empty string when consistent.
  std::string checkShapes(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, ScanInputLayout const& layout) const;
  void reportError(nvinfer1::ErrorCode code, std::string const& msg) const noexcept;

  std::string mLayerName;
  int32_t mDeltaSoftplus;
  int32_t mHasD, mHasZ, mHasDeltaBias;  // kUNSET until the input count is known (getOutputShapes, configure, onShapeChange)
  nvinfer1::IErrorRecorder* mErrorRecorder = nullptr;  // set by attachToContext (execution contexts only)

  std::vector<nvinfer1::PluginField> mSerializeFields;
  nvinfer1::PluginFieldCollection mSerializeFC{};
};

class SelectiveScanPluginCreator final : public nvinfer1::IPluginCreatorV3One {
 public:
  SelectiveScanPluginCreator();
  ~SelectiveScanPluginCreator() override = default;

  nvinfer1::IPluginV3* createPlugin(char const* name, nvinfer1::PluginFieldCollection const* fc,
                                    nvinfer1::TensorRTPhase phase) noexcept override;
  nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
  char const* getPluginName() const noexcept override;
  char const* getPluginVersion() const noexcept override;
  char const* getPluginNamespace() const noexcept override;

 private:
  std::vector<nvinfer1::PluginField> mFields;
  nvinfer1::PluginFieldCollection mFC{};
};

// Maps TensorRT's element type to the kernel's; false for types the kernel does not take.
bool toScanDataType(nvinfer1::DataType type, scan::ScanDataType& out);

}  // namespace trt
}  // namespace emrrg

// Plugin-library entry points (TensorRT >= 10.0: IPluginRegistry::loadLibrary, trtexec --dynamicPlugins).
extern "C" {
__attribute__((visibility("default"))) void setLoggerFinder(nvinfer1::ILoggerFinder* finder);
__attribute__((visibility("default"))) nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators);
}
