/*
 * selectiveScanCpu.h — the SelectiveScan CPU implementation (no ONNX Runtime dependency).
 *
 * Inputs, shapes and semantics: see selectiveScanCore.h (the contract). This file adds only the CPU
 * schedule:
 *   - work is split into tasks of (batch, group, block of kCpuChannelBlock channels of that group);
 *   - a task transposes its channels' u / delta / z to time-major scratch [L][block], runs the shared
 *     scanStep() over t with the block as the contiguous inner loop (g++ -O3 vectorizes it), then applies
 *     the D skip and the silu(z) gate and transposes y back;
 *   - tasks run through a caller-supplied parallel-for (the ORT op passes ORT's intra-op thread pool) or,
 *     when none is given or EMRRG_SCAN_THREADS is set, through a small std::thread pool.
 * f16 inputs are converted to f32 per block; accumulation is always f32. Any N (the CUDA kernel: N <= 64).
 */
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace emrrg {
namespace scan {

// Channels per task: two AVX2 vectors (one AVX-512 vector) of f32.
constexpr int kCpuChannelBlock = 16;

enum class CpuElemType { kFloat32, kFloat16 };

struct CpuScanArgs {
  int64_t batch = 0, dim = 0, seqlen = 0, dstate = 0, groups = 0;  // b, D, L, N, G
  bool deltaSoftplus = true;
  CpuElemType type = CpuElemType::kFloat32;  // of u, delta, B, C, z and y
  const void* u = nullptr;              // (b, D, L)
  const void* delta = nullptr;          // (b, D, L)
  const float* A = nullptr;             // (D, N)
  const void* B = nullptr;              // (b, G, N, L)
  const void* C = nullptr;              // (b, G, N, L)
  const float* D = nullptr;             // (D) or null
  const void* z = nullptr;              // (b, D, L) or null
  const float* deltaBias = nullptr;     // (D) or null
  void* y = nullptr;                    // (b, D, L), out
};

// Runs fn(ctx, i) for every i in [0, total), possibly concurrently, and returns when all are done.
using CpuParallelForFn = void (*)(void* runnerCtx, size_t total, void (*fn)(void*, size_t), void* ctx);

// "" when the sizes are consistent, else a message naming the offending size.
std::string checkCpuScanArgs(const CpuScanArgs& args);

// Number of independent tasks selectiveScanCpu() splits the work into.
size_t cpuScanTaskCount(const CpuScanArgs& args);

// Runs one task (exposed so any thread pool can drive the work).
void cpuScanRunTask(const CpuScanArgs& args, size_t task);

// The whole scan; returns "" on success, else what went wrong (y is then unspecified).
// parallelFor == nullptr: run on cpuScanDefaultThreads() std::threads.
std::string selectiveScanCpu(const CpuScanArgs& args, CpuParallelForFn parallelFor = nullptr, void* runnerCtx = nullptr);

// EMRRG_SCAN_THREADS if set to a positive integer, else 0 (meaning: let the caller decide).
int cpuScanThreadsFromEnv();

// cpuScanThreadsFromEnv() if set, else std::thread::hardware_concurrency() (at least 1).
int cpuScanDefaultThreads();

// A simple fork-join parallel-for on `threads` std::threads (the calling thread is one of them).
void cpuParallelForThreads(int threads, size_t total, void (*fn)(void*, size_t), void* ctx);

}  // namespace scan
}  // namespace emrrg
