/*
 * selectiveScanKernel.h — CUDA launcher for com.emrrg::SelectiveScan (used by the TensorRT plugin and by
 * an ORT CUDA op where built). Plain C++ header: include it from host code compiled by any C++ compiler
 * that sees the CUDA runtime headers; only selectiveScanKernel.cu needs nvcc.
 *
 * Inputs (the contract, see selectiveScanCore.h), T = f32 | f16 | bf16, accumulation f32:
 *   0 u          (batch, D, L)     T
 *   1 delta      (batch, D, L)     T
 *   2 A          (D, N)            f32
 *   3 B          (batch, G, N, L)  T
 *   4 C          (batch, G, N, L)  T
 *   5 D          (D)               f32, optional (nullptr)
 *   6 z          (batch, D, L)     T,   optional (nullptr)
 *   7 delta_bias (D)               f32, optional (nullptr)
 *   y            (batch, D, L)     T,   output
 * All tensors contiguous (row-major), on the device, not aliasing y.
 *
 * Design: one thread per (batch, channel), each running the recurrence sequentially over L with its
 * N-element state h and its row of A in registers (scanStep<1, kMaxN> from the shared core, kMaxN in
 * {16, 32, 64} chosen from N). A block holds 128 channels of one group of one batch element
 * (grid = ceil(D/G / 128) x G x batch), so all its threads read the same B_t and C_t: the block stages
 * B and C for a chunk of time steps in shared memory (2 x 16 KB, 4096/N steps per chunk: all of L = 197
 * in one chunk for N = 16) and every thread reads them as broadcasts.
 * Why this and not mamba-ssm's chunked parallel scan: the encoder's sizes are small in L (197) and
 * large in channels (D·G = 3-4k per call, batch 1-8), so one thread per channel already gives 3k-32k
 * threads — enough to fill an Orin (16 SMs) — with no inter-thread combine step, and the code stays the
 * shared core verbatim. Costs: u / delta / z / y are accessed with a stride of L between neighbouring
 * threads (served by L1/L2 since each thread walks its row contiguously); a long L with few channels
 * would want the chunked scan instead (see README "Known issues").
 *
 * Limits: N <= 64 (emrrg::scan::kMaxStateDim), D % G == 0, G <= 65535, batch <= 65535; any L, any D.
 * Arithmetic: compile with --fmad=false and without --use_fast_math so the results match the CPU op bit
 * for bit (see selectiveScanCore.h, "Bit-level agreement").
 */
#pragma once

#include <cuda_runtime_api.h>

namespace emrrg {
namespace scan {

enum class ScanDataType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct SelectiveScanParams {
  int batch = 0, dim = 0, seqlen = 0, dstate = 0, groups = 0;  // b, D, L, N, G
  bool deltaSoftplus = true;
  ScanDataType dataType = ScanDataType::kFloat32;  // of u, delta, B, C, z and y
  const void* u = nullptr;
  const void* delta = nullptr;
  const float* A = nullptr;
  const void* B = nullptr;
  const void* C = nullptr;
  const float* D = nullptr;          // optional
  const void* z = nullptr;           // optional
  const float* deltaBias = nullptr;  // optional
  void* y = nullptr;
};

// Enqueues the scan on `stream`. Returns cudaErrorInvalidValue for inconsistent sizes, unsupported N or
// missing required pointers (nothing is launched then), else the launch's error status.
cudaError_t launchSelectiveScan(const SelectiveScanParams& params, cudaStream_t stream);

}  // namespace scan
}  // namespace emrrg
