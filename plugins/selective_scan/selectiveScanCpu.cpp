// selectiveScanCpu.cpp — CPU schedule around the shared recurrence core. See selectiveScanCpu.h.
#include "selectiveScanCpu.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <type_traits>
#include <vector>

#include "selectiveScanCore.h"

#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace emrrg {
namespace scan {
namespace {

// ---- f16 <-> f32 (IEEE binary16, round to nearest even), bit-exact with CUDA's __half2float /
// __float2half_rn. Plain integer/float code so it vectorizes and needs no F16C. ----
inline float halfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;
  // Shifting exponent+mantissa into f32 position gives value * 2^-112 (normals and subnormals alike);
  // the multiply by 2^112 is exact.
  const float scaled = bitsToFloat(em << 13) * 5.192296858534828e33f;  // 2^112
  const uint32_t finite = floatToBits(scaled);
  const uint32_t special = 0x7f800000u | ((em & 0x3ffu) << 13);  // inf / nan (payload kept)
  return bitsToFloat(sign | (em >= 0x7c00u ? special : finite));
}

inline uint16_t floatToHalf(float f) {
  uint32_t x = floatToBits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  x &= 0x7fffffffu;
  uint32_t out;
  if (x >= 0x7f800000u) {
    out = x > 0x7f800000u ? 0x7e00u : 0x7c00u;  // nan -> quiet nan, inf -> inf
  } else if (x >= 0x477ff000u) {
    out = 0x7c00u;  // >= 65520 rounds to inf
  } else if (x < 0x38800000u) {
    // Result is a half subnormal (or zero): adding 0.5f lines the half ulp (2^-24) up with the f32 ulp
    // of 0.5, so the addition itself rounds to nearest even.
    const float v = bitsToFloat(x) + 0.5f;
    out = floatToBits(v) - 0x3f000000u;
  } else {
    const uint32_t mantOdd = (x >> 13) & 1u;
    x += 0xc8000fffu + mantOdd;  // rebias the exponent (-112 << 23) and round half to even
    out = x >> 13;
  }
  return static_cast<uint16_t>(sign | out);
}

template <typename T>
struct Elem;
template <>
struct Elem<float> {
  static float load(float v) { return v; }
  static float store(float v) { return v; }
};
template <>
struct Elem<uint16_t> {
  static float load(uint16_t v) { return halfToFloat(v); }
  static uint16_t store(float v) { return floatToHalf(v); }
};

// ---- Layout changes between the (channel, time) rows of the tensors and the time-major block. ----
// transpose(src, ss, dst, ds, rows, cols): dst[j * ds + i] = src[i * ss + j] for i < rows, j < cols.
#if defined(__AVX__)
inline void transpose8x8(const float* src, size_t ss, float* dst, size_t ds) {
  const __m256 r0 = _mm256_loadu_ps(src + 0 * ss), r1 = _mm256_loadu_ps(src + 1 * ss);
  const __m256 r2 = _mm256_loadu_ps(src + 2 * ss), r3 = _mm256_loadu_ps(src + 3 * ss);
  const __m256 r4 = _mm256_loadu_ps(src + 4 * ss), r5 = _mm256_loadu_ps(src + 5 * ss);
  const __m256 r6 = _mm256_loadu_ps(src + 6 * ss), r7 = _mm256_loadu_ps(src + 7 * ss);
  const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
  const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
  const __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
  const __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  _mm256_storeu_ps(dst + 0 * ds, _mm256_permute2f128_ps(s0, s4, 0x20));
  _mm256_storeu_ps(dst + 1 * ds, _mm256_permute2f128_ps(s1, s5, 0x20));
  _mm256_storeu_ps(dst + 2 * ds, _mm256_permute2f128_ps(s2, s6, 0x20));
  _mm256_storeu_ps(dst + 3 * ds, _mm256_permute2f128_ps(s3, s7, 0x20));
  _mm256_storeu_ps(dst + 4 * ds, _mm256_permute2f128_ps(s0, s4, 0x31));
  _mm256_storeu_ps(dst + 5 * ds, _mm256_permute2f128_ps(s1, s5, 0x31));
  _mm256_storeu_ps(dst + 6 * ds, _mm256_permute2f128_ps(s2, s6, 0x31));
  _mm256_storeu_ps(dst + 7 * ds, _mm256_permute2f128_ps(s3, s7, 0x31));
}
#endif

void transpose(const float* src, size_t ss, float* dst, size_t ds, size_t rows, size_t cols) {
  size_t i0 = 0;
#if defined(__AVX__)
  for (; i0 + 8 <= rows; i0 += 8) {
    size_t j0 = 0;
    for (; j0 + 8 <= cols; j0 += 8) transpose8x8(src + i0 * ss + j0, ss, dst + j0 * ds + i0, ds);
    for (size_t i = i0; i < i0 + 8; ++i)
      for (size_t j = j0; j < cols; ++j) dst[j * ds + i] = src[i * ss + j];
  }
#endif
  for (size_t i = i0; i < rows; ++i)
    for (size_t j = 0; j < cols; ++j) dst[j * ds + i] = src[i * ss + j];
}

// dst[t * kC + c] = src row c at t, for the block's nc valid channels (rows of length L, stride L);
// rows c >= nc become 0. f16 rows are widened row by row into `wide` first.
template <typename T>
void gatherBlock(const T* src, size_t L, int nc, int kC, float* wide, float* dst) {
  const float* rows = nullptr;
  if (std::is_same<T, float>::value) {
    rows = reinterpret_cast<const float*>(src);
  } else {
    for (size_t i = 0; i < static_cast<size_t>(nc) * L; ++i) wide[i] = Elem<T>::load(src[i]);
    rows = wide;
  }
  transpose(rows, L, dst, kC, static_cast<size_t>(nc), L);
  for (size_t t = 0; t < L; ++t)
    for (int c = nc; c < kC; ++c) dst[t * kC + c] = 0.0f;
}

// Per-thread scratch, grown on demand and reused across tasks and calls.
struct Scratch {
  std::vector<float> buf;
  float* get(size_t n) {
    if (buf.size() < n) buf.resize(n);
    return buf.data();
  }
};
thread_local Scratch tScratch;

struct TaskLayout {
  int64_t perGroup, blocksPerGroup;
};

inline TaskLayout layoutOf(const CpuScanArgs& a) {
  const int64_t perGroup = a.dim / a.groups;
  return {perGroup, (perGroup + kCpuChannelBlock - 1) / kCpuChannelBlock};
}

template <typename T>
void runTask(const CpuScanArgs& a, size_t task) {
  constexpr int kC = kCpuChannelBlock;
  const TaskLayout lay = layoutOf(a);
  const int64_t L = a.seqlen, N = a.dstate, G = a.groups, Dm = a.dim;
  const int64_t block = static_cast<int64_t>(task) % lay.blocksPerGroup;
  const int64_t g = (static_cast<int64_t>(task) / lay.blocksPerGroup) % G;
  const int64_t b = static_cast<int64_t>(task) / (lay.blocksPerGroup * G);
  const int64_t c0 = g * lay.perGroup + block * kC;                                    // first channel
  const int nc = static_cast<int>(std::min<int64_t>(kC, lay.perGroup - block * kC));  // valid channels

  const bool isFloat = std::is_same<T, float>::value;
  const size_t Ls = static_cast<size_t>(L);
  const size_t tl = Ls * kC, nk = static_cast<size_t>(N) * kC;
  const size_t groupBC = isFloat ? 0 : 2 * static_cast<size_t>(N) * Ls;
  float* base = tScratch.get(4 * tl + 2 * nk + groupBC + 2 * kC);
  float* dtS = base;             // [L][kC] delta, then dt
  float* uS = dtS + tl;          // [L][kC]
  float* yS = uS + tl;           // [L][kC] C_t . h_t
  float* rowS = yS + tl;         // [kC][L] y back in row layout (also the f16 widening buffer)
  float* hS = rowS + tl;         // [N][kC]
  float* aS = hS + nk;           // [N][kC]
  float* bcS = aS + nk;          // [2][N][L] (f16 only: the group's B and C in f32)
  float* biasS = bcS + groupBC;  // [kC]
  float* skipS = biasS + kC;     // [kC]

  const size_t row0 = static_cast<size_t>((b * Dm + c0) * L);  // the block's first row in (b, D, L)
  const T* u = static_cast<const T*>(a.u) + row0;
  const T* delta = static_cast<const T*>(a.delta) + row0;
  const T* z = a.z != nullptr ? static_cast<const T*>(a.z) + row0 : nullptr;
  T* y = static_cast<T*>(a.y) + row0;

  // Time-major copies of the block; padded channels get u = 0, a = 0 so their state stays 0.
  gatherBlock<T>(u, Ls, nc, kC, rowS, uS);
  gatherBlock<T>(delta, Ls, nc, kC, rowS, dtS);
  for (int c = 0; c < kC; ++c) {
    const bool valid = c < nc;
    biasS[c] = (valid && a.deltaBias != nullptr) ? a.deltaBias[c0 + c] : 0.0f;
    skipS[c] = (valid && a.D != nullptr) ? a.D[c0 + c] : 0.0f;
    for (int64_t n = 0; n < N; ++n) {
      aS[n * kC + c] = valid ? a.A[(c0 + c) * N + n] : 0.0f;
      hS[n * kC + c] = 0.0f;
    }
  }
  // dt = softplus(delta + bias): contiguous over the block, vectorized.
  const bool sp = a.deltaSoftplus;
  for (size_t t = 0; t < Ls; ++t) {
    float* __restrict__ r = dtS + t * kC;
    for (int c = 0; c < kC; ++c) r[c] = discretizeDelta(r[c], biasS[c], sp);
  }

  // B_t, C_t of group g: element n at ptr[n * L + t].
  const size_t bcOffset = static_cast<size_t>((b * G + g) * N * L);
  const float* Bg;
  const float* Cg;
  if (isFloat) {
    Bg = static_cast<const float*>(a.B) + bcOffset;
    Cg = static_cast<const float*>(a.C) + bcOffset;
  } else {
    const T* Bh = static_cast<const T*>(a.B) + bcOffset;
    const T* Ch = static_cast<const T*>(a.C) + bcOffset;
    float* Bf = bcS;
    float* Cf = bcS + static_cast<size_t>(N) * Ls;
    for (size_t i = 0; i < static_cast<size_t>(N) * Ls; ++i) {
      Bf[i] = Elem<T>::load(Bh[i]);
      Cf[i] = Elem<T>::load(Ch[i]);
    }
    Bg = Bf;
    Cg = Cf;
  }

  // The recurrence: the shared core, kC channels at a time. N is unbounded on the CPU.
  const int n = static_cast<int>(N);
  const int stride = static_cast<int>(L);
  for (size_t t = 0; t < Ls; ++t) {
    scanStep<kC, 0x7fffffff>(n, hS, aS, dtS + t * kC, uS + t * kC, Bg + t, stride, Cg + t, stride, yS + t * kC);
  }

  // Back to row layout, then the D skip and the silu(z) gate row by row (u and z read in place).
  transpose(yS, kC, rowS, Ls, Ls, static_cast<size_t>(nc));
  const bool hasD = a.D != nullptr;
  for (int c = 0; c < nc; ++c) {
    const float skip = skipS[c];
    const float* __restrict__ yr = rowS + c * Ls;
    const T* __restrict__ ur = u + c * Ls;
    T* __restrict__ out = y + c * Ls;
    if (z != nullptr) {  // two copies so neither has a conditional load (both vectorize)
      const T* __restrict__ zr = z + c * Ls;
      for (size_t t = 0; t < Ls; ++t)
        out[t] = Elem<T>::store(finishOutput(yr[t], Elem<T>::load(ur[t]), hasD, skip, true, Elem<T>::load(zr[t])));
    } else {
      for (size_t t = 0; t < Ls; ++t)
        out[t] = Elem<T>::store(finishOutput(yr[t], Elem<T>::load(ur[t]), hasD, skip, false, 0.0f));
    }
  }
}

}  // namespace

std::string checkCpuScanArgs(const CpuScanArgs& a) {
  if (a.batch < 0 || a.dim <= 0 || a.seqlen < 0 || a.dstate <= 0 || a.groups <= 0) {
    return "sizes must be batch >= 0, D > 0, L >= 0, N > 0, G > 0; got batch=" + std::to_string(a.batch) +
           " D=" + std::to_string(a.dim) + " L=" + std::to_string(a.seqlen) + " N=" + std::to_string(a.dstate) +
           " G=" + std::to_string(a.groups);
  }
  if (a.dim % a.groups != 0) {
    return "D=" + std::to_string(a.dim) + " is not a multiple of the group count G=" + std::to_string(a.groups);
  }
  if (a.seqlen > 0x7fffffff || a.dstate > 0x7fffffff) return "L and N must fit in int32";
  return "";
}

size_t cpuScanTaskCount(const CpuScanArgs& a) {
  const TaskLayout lay = layoutOf(a);
  return static_cast<size_t>(a.batch * a.groups * lay.blocksPerGroup);
}

void cpuScanRunTask(const CpuScanArgs& a, size_t task) {
  if (a.type == CpuElemType::kFloat32) {
    runTask<float>(a, task);
  } else {
    runTask<uint16_t>(a, task);
  }
}

int cpuScanThreadsFromEnv() {
  const char* env = std::getenv("EMRRG_SCAN_THREADS");
  if (env == nullptr || *env == '\0') return 0;
  char* end = nullptr;
  const long v = std::strtol(env, &end, 10);
  return (end != env && *end == '\0' && v > 0 && v <= 1024) ? static_cast<int>(v) : 0;
}

int cpuScanDefaultThreads() {
  const int env = cpuScanThreadsFromEnv();
  if (env > 0) return env;
  const unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : static_cast<int>(hw);
}

void cpuParallelForThreads(int threads, size_t total, void (*fn)(void*, size_t), void* ctx) {
  const size_t workers = std::min<size_t>(static_cast<size_t>(std::max(threads, 1)), total);
  if (workers <= 1) {
    for (size_t i = 0; i < total; ++i) fn(ctx, i);
    return;
  }
  std::atomic<size_t> next{0};
  auto worker = [&]() {
    for (size_t i = next.fetch_add(1); i < total; i = next.fetch_add(1)) fn(ctx, i);
  };
  std::vector<std::thread> pool;
  pool.reserve(workers - 1);
  for (size_t w = 1; w < workers; ++w) pool.emplace_back(worker);
  worker();
  for (auto& th : pool) th.join();
}

namespace {
struct RunCtx {
  const CpuScanArgs* args;
  std::atomic<bool> failed{false};
};
// Tasks run on foreign thread pools: no exception may escape (the only one possible is bad_alloc).
void taskTrampoline(void* ctx, size_t i) {
  auto* run = static_cast<RunCtx*>(ctx);
  if (run->failed.load(std::memory_order_relaxed)) return;
  try {
    cpuScanRunTask(*run->args, i);
  } catch (...) {
    run->failed.store(true);
  }
}
}  // namespace

std::string selectiveScanCpu(const CpuScanArgs& args, CpuParallelForFn parallelFor, void* runnerCtx) {
  std::string err = checkCpuScanArgs(args);
  if (!err.empty()) return err;
  const size_t total = cpuScanTaskCount(args);
  if (total == 0 || args.seqlen == 0) return "";
  RunCtx run;
  run.args = &args;
  if (parallelFor != nullptr) {
    parallelFor(runnerCtx, total, taskTrampoline, &run);
  } else {
    cpuParallelForThreads(cpuScanDefaultThreads(), total, taskTrampoline, &run);
  }
  return run.failed.load() ? "out of memory for the scan's scratch buffers" : "";
}

}  // namespace scan
}  // namespace emrrg
