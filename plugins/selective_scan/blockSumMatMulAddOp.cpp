/*
 * blockSumMatMulAddOp.cpp — com.emrrg::BlockSumMatMulAdd, CPU EP, f32 (contract: blockSumMatMulAddOp.h).
 *
 * Y = A + S @ C with S (rows, nb) the block sums of X (f32, k in order), computed first. Then tasks of
 * kColTile = 64 output columns: for each row, 8 vector accumulators start from A and take sum_b S[r, b] * C[b, tile]
 * (b in order), the C tile (nb x 256 B) staying in L1 across rows. Decode (one row, N*nb ~ 10k-55k multiply-adds)
 * runs on the calling thread and reads C front to back (runOneRow: the memory-bound case, C comes from DRAM
 * every token); larger calls (prefill) spread the tiles over ORT's intra-op pool
 * (KernelContext_ParallelFor, ORT >= 1.17). Compiled with -ffp-contract=fast (CMake): multiply-adds may fuse.
 */
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include "blockSumMatMulAddOp.h"

#include <algorithm>
#include <cstring>
#include <exception>
#include <new>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace emrrg {
namespace affine {
namespace {

constexpr const char* kOpName = "BlockSumMatMulAdd";
constexpr int kOpVersion = 1;
constexpr int64_t kSerialWork = int64_t(1) << 17;  // multiply-adds below which threads cost more than they save

const OrtApi* gApi = nullptr;

OrtStatus* makeError(OrtErrorCode code, const std::string& msg) {
  return gApi->CreateStatus(code, (std::string("com.emrrg::") + kOpName + ": " + msg).c_str());
}

std::string shapeStr(const std::vector<int64_t>& s) {
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + (s.size() == 1 ? ",)" : ")");
}

OrtStatus* inputShape(OrtKernelContext* ctx, size_t index, const OrtValue** value, std::vector<int64_t>* shape) {
  if (OrtStatus* st = gApi->KernelContext_GetInput(ctx, index, value)) return st;
  if (*value == nullptr) return makeError(ORT_INVALID_ARGUMENT, "input " + std::to_string(index) + " is missing");
  OrtTensorTypeAndShapeInfo* info = nullptr;
  if (OrtStatus* st = gApi->GetTensorTypeAndShape(*value, &info)) return st;
  size_t rank = 0;
  OrtStatus* st = gApi->GetDimensionsCount(info, &rank);
  if (st == nullptr) {
    shape->resize(rank);
    st = gApi->GetDimensions(info, shape->data(), rank);
  }
  gApi->ReleaseTensorTypeAndShapeInfo(info);
  return st;
}

void* tensorData(const OrtValue* v) {
  void* p = nullptr;
  if (OrtStatus* st = gApi->GetTensorMutableData(const_cast<OrtValue*>(v), &p)) {
    gApi->ReleaseStatus(st);
    return nullptr;
  }
  return p;
}

typedef float v8f __attribute__((vector_size(32)));   // GCC/Clang vector extension: AVX on x86, 2 x NEON on arm64
constexpr int64_t kVec = 8;
constexpr int64_t kColTile = 8 * kVec;                 // columns per task: 8 accumulators, a C tile in L1

// IEEE binary16 bits -> float (C stored as f16; no reliance on a compiler _Float16 type).
inline float halfToFloat(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1fu) {
    bits = sign | 0x7f800000u | (man << 13);           // inf / nan
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (man << 13);  // normal: rebias 15 -> 127
  } else if (man == 0) {
    bits = sign;                                       // +-0
  } else {                                             // subnormal: man * 2^-24
    float f = static_cast<float>(man) * 5.9604644775390625e-8f;
    std::memcpy(&bits, &f, sizeof bits);
    bits |= sign;
  }
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

inline float loadC(const float* p) { return *p; }
inline float loadC(const uint16_t* p) { return halfToFloat(*p); }

inline v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline v8f load8(const uint16_t* p) {
#if defined(__F16C__)
  const __m256 f = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  v8f v;
  std::memcpy(&v, &f, sizeof v);
  return v;
#else
  v8f v;
  for (int i = 0; i < 8; ++i) v[i] = halfToFloat(p[i]);
  return v;
#endif
}

inline void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof v); }

template <typename TC>
struct Work {
  const float* a;
  const float* sums;                                   // (rows, nb) block sums of X
  const TC* c;
  float* y;
  int64_t rows, N, nb;
};

// Columns [n0, n0 + kColTile) of every row: Y = A + sums @ C, the C tile re-read from L1 for each row.
template <typename TC>
void runTile(const Work<TC>& w, int64_t n0) {
  const int64_t n1 = std::min(n0 + kColTile, w.N);
  for (int64_t r = 0; r < w.rows; ++r) {
    const float* s = w.sums + r * w.nb;
    const float* a = w.a + r * w.N;
    float* y = w.y + r * w.N;
    if (n1 - n0 == kColTile) {
      v8f acc[8];
      for (int j = 0; j < 8; ++j) acc[j] = load8(a + n0 + j * kVec);
      for (int64_t b = 0; b < w.nb; ++b) {
        const TC* c = w.c + b * w.N + n0;
        const v8f sb = v8f{} + s[b];
        for (int j = 0; j < 8; ++j) acc[j] += sb * load8(c + j * kVec);
      }
      for (int j = 0; j < 8; ++j) store8(y + n0 + j * kVec, acc[j]);
    } else {                                            // the last, partial tile
      for (int64_t n = n0; n < n1; ++n) {
        float acc = a[n];
        for (int64_t b = 0; b < w.nb; ++b) acc += s[b] * loadC(w.c + b * w.N + n);
        y[n] = acc;
      }
    }
  }
}

// One row (decode): C read once, front to back (b outer), so it streams from memory at full speed; Y (N floats)
// stays in L1.
template <typename TC>
void runOneRow(const Work<TC>& w) {
  const int64_t nv = w.N / kVec * kVec;
  if (w.y != w.a) std::memcpy(w.y, w.a, sizeof(float) * w.N);
  for (int64_t b = 0; b < w.nb; ++b) {
    const TC* c = w.c + b * w.N;
    const float s = w.sums[b];
    const v8f sb = v8f{} + s;
    for (int64_t n = 0; n < nv; n += kVec) store8(w.y + n, load8(w.y + n) + sb * load8(c + n));
    for (int64_t n = nv; n < w.N; ++n) w.y[n] += s * loadC(c + n);
  }
}

template <typename TC>
void runIndex(void* ctx, size_t i) {
  const Work<TC>& w = *static_cast<const Work<TC>*>(ctx);
  runTile(w, static_cast<int64_t>(i) * kColTile);
}

template <typename TC>
struct Kernel {
  int64_t blockSize = 32;

  OrtStatus* ComputeV2(OrtKernelContext* ctx) noexcept {
    try {
      return compute(ctx);
    } catch (const std::exception& e) {
      return makeError(ORT_FAIL, e.what());
    } catch (...) {
      return makeError(ORT_FAIL, "unknown error");
    }
  }

  OrtStatus* compute(OrtKernelContext* ctx) {
    const OrtValue *va = nullptr, *vx = nullptr, *vc = nullptr;
    std::vector<int64_t> sa, sx, sc;
    if (OrtStatus* st = inputShape(ctx, 0, &va, &sa)) return st;
    if (OrtStatus* st = inputShape(ctx, 1, &vx, &sx)) return st;
    if (OrtStatus* st = inputShape(ctx, 2, &vc, &sc)) return st;
    if (sa.empty() || sx.size() != sa.size() || !std::equal(sa.begin(), sa.end() - 1, sx.begin())) {
      return makeError(ORT_INVALID_ARGUMENT, "A " + shapeStr(sa) + " and X " + shapeStr(sx) +
                                                 " must have the same leading dimensions (..., N) and (..., K)");
    }
    const int64_t N = sa.back(), K = sx.back(), nb = (K + blockSize - 1) / blockSize;
    if (sc.size() != 2 || sc[0] != nb || sc[1] != N) {
      return makeError(ORT_INVALID_ARGUMENT, "C must be (ceil(K/block_size)=" + std::to_string(nb) + ", N=" +
                                                 std::to_string(N) + "), got " + shapeStr(sc));
    }
    OrtValue* vy = nullptr;
    if (OrtStatus* st = gApi->KernelContext_GetOutput(ctx, 0, sa.data(), sa.size(), &vy)) return st;
    int64_t rows = 1;
    for (size_t i = 0; i + 1 < sa.size(); ++i) rows *= sa[i];
    if (rows == 0 || N == 0) return nullptr;
    const float* x = static_cast<const float*>(tensorData(vx));
    std::vector<float> sums(static_cast<size_t>(rows * nb));
    for (int64_t r = 0; r < rows; ++r) {               // block sums, k in order (f32)
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t k0 = b * blockSize, k1 = std::min(k0 + blockSize, K);
        float acc = 0.f;
        for (int64_t k = k0; k < k1; ++k) acc += x[r * K + k];
        sums[r * nb + b] = acc;
      }
    }
    Work<TC> w{static_cast<const float*>(tensorData(va)), sums.data(), static_cast<const TC*>(tensorData(vc)),
               static_cast<float*>(tensorData(vy)), rows, N, nb};
    if (rows == 1) {
      runOneRow(w);
      return nullptr;
    }
    const size_t tiles = static_cast<size_t>((N + kColTile - 1) / kColTile);
    if (rows * N * nb >= kSerialWork && tiles > 1) {
      OrtStatus* st = gApi->KernelContext_ParallelFor(ctx, runIndex<TC>, tiles, 0, &w);
      if (st == nullptr) return nullptr;
      gApi->ReleaseStatus(st);                       // no pool: run here
    }
    for (size_t i = 0; i < tiles; ++i) runIndex<TC>(&w, i);
    return nullptr;
  }
};

OrtStatus* ORT_API_CALL inferOutputShape(const OrtCustomOp*, OrtShapeInferContext* ctx) {
  OrtTensorTypeAndShapeInfo* info = nullptr;  // owned by ctx
  if (OrtStatus* st = gApi->ShapeInferContext_GetInputTypeShape(ctx, 0, &info)) {
    gApi->ReleaseStatus(st);
    return nullptr;
  }
  if (OrtStatus* st = gApi->ShapeInferContext_SetOutputTypeShape(ctx, 0, info)) gApi->ReleaseStatus(st);
  return nullptr;
}

size_t ORT_API_CALL mayInplace(int** input_index, int** output_index) {
  *input_index = new int[1]{0};
  *output_index = new int[1]{0};
  return 1;
}

void ORT_API_CALL releaseMayInplace(int* input_index, int* output_index) {
  delete[] input_index;
  delete[] output_index;
}

template <typename TC>
constexpr ONNXTensorElementDataType onnxTypeOfC() {
  return std::is_same<TC, float>::value ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
}

// TC: the element type of C (float, or uint16_t holding IEEE f16 bits); A, X and Y are always f32.
template <typename TC>
struct Op : Ort::CustomOpBase<Op<TC>, Kernel<TC>, /*WithStatus=*/true> {
  Op() {
    this->start_ver_ = kOpVersion;
    this->InferOutputShapeFn = inferOutputShape;
    OrtCustomOp::GetMayInplace = mayInplace;          // Y may reuse A's buffer (ORT >= 1.18 reads it)
    OrtCustomOp::ReleaseMayInplace = releaseMayInplace;
  }

  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const noexcept {
    *kernel = nullptr;
    int64_t bs = 0;
    if (OrtStatus* st = api.KernelInfoGetAttribute_int64(info, "block_size", &bs)) {
      api.ReleaseStatus(st);
      return makeError(ORT_INVALID_ARGUMENT, "attribute block_size is required");
    }
    if (bs < 1) return makeError(ORT_INVALID_ARGUMENT, "attribute block_size must be >= 1, got " + std::to_string(bs));
    auto* k = new (std::nothrow) Kernel<TC>;
    if (k == nullptr) return makeError(ORT_FAIL, "out of memory");
    k->blockSize = bs;
    *kernel = k;
    return nullptr;
  }

  const char* GetName() const { return kOpName; }
  size_t GetInputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    return index == 2 ? onnxTypeOfC<TC>() : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

}  // namespace

OrtStatus* addBlockSumMatMulAdd(const OrtApi* api, OrtCustomOpDomain* domain) {
  gApi = api;
  static Op<float> opF32;     // process-wide, never freed (as the scan ops)
  static Op<uint16_t> opF16;
  if (OrtStatus* st = api->CustomOpDomain_Add(domain, &opF32)) return st;
  return api->CustomOpDomain_Add(domain, &opF16);
}

}  // namespace affine
}  // namespace emrrg
