"""The SelectiveScan CUDA kernel compiles warning-free for Jetson Orin (sm_87) and Hopper (sm_90).

No GPU is needed: `nvcc -c` only. Running the kernel is tested where a GPU exists (the TensorRT plugin's
tests); nothing here pretends to. Skips when nvcc is not on PATH
(the plain C++ check of the shared core header runs everywhere).

A third test needs no nvcc: it compiles the kernel's source region with g++ and runs every CUDA thread
of each block as a std::thread (a host emulation: shared memory = a static array, __syncthreads = a
std::barrier), then checks the result against the CPU op bit for bit. That exercises the kernel's
indexing, padding and B/C chunk staging (N = 64 makes L = 150 span three chunks) on the shared core. It
is not a GPU test: device codegen, the f16/bf16 instantiations and the launch itself are unverified here.

The flags are the ones plugins/selective_scan/CMakeLists.txt uses: --fmad=false keeps the shared core's
explicit fmaF calls the only fused operations, so the GPU rounds exactly like the CPU op that the CPU
tests check. Warnings fail the test: nvcc's own (-Werror all-warnings) and the host compiler's
(-Xcompiler -Wall,-Wextra, checked in the output since nvcc cannot pass -Werror to every host pass).
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.plugins import toolchain

NVCC = shutil.which("nvcc")
PLUGIN_DIR = Path(__file__).resolve().parents[2] / "plugins" / "selective_scan"
KERNEL = PLUGIN_DIR / "selectiveScanKernel.cu"

needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH (the CUDA compile check needs it, not a GPU)")


@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_87", "sm_90"])
def test_kernel_compiles_without_warnings(tmp_path, arch):
    obj = tmp_path / f"selectiveScanKernel_{arch}.o"
    cmd = [NVCC, "-c", f"-arch={arch}", "-O3", "-std=c++17", "--fmad=false",
           "-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra",
           "-Xptxas", "-v",  # register / spill report, checked below
           "-I", str(PLUGIN_DIR), "-o", str(obj), str(KERNEL)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    print(" ".join(cmd))
    assert proc.returncode == 0, f"nvcc failed:\n{out}"
    assert obj.stat().st_size > 0
    warnings = [ln for ln in out.splitlines() if "warning" in ln.lower()]
    assert not warnings, "compiler warnings:\n" + "\n".join(warnings)
    # The state h must live in registers: a spill would mean local memory traffic on every step.
    spills = [ln for ln in out.splitlines() if "spill" in ln and not ln.strip().startswith("0 bytes stack frame, 0 bytes spill")]
    assert not spills, "register spills:\n" + "\n".join(spills)


def test_core_header_compiles_as_plain_cpp(tmp_path):
    """selectiveScanCore.h must also build without nvcc (the CPU op's side), with warnings as errors."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    src = tmp_path / "core_only.cpp"
    src.write_text('#include "selectiveScanCore.h"\n'
                   "float f(float* h, const float* a, const float* dt, const float* u, const float* b, float* y) {\n"
                   "  emrrg::scan::scanStep<8, 16>(16, h, a, dt, u, b, 1, b, 1, y);\n"
                   "  return emrrg::scan::softplusF(y[0]) + emrrg::scan::siluF(y[1]);\n}\n")
    proc = subprocess.run([cxx, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", "-c", "-I", str(PLUGIN_DIR),
                           "-o", str(tmp_path / "core_only.o"), str(src)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


@needs_nvcc
def test_core_header_after_cuda_headers_in_a_host_tu(tmp_path):
    """The plugin and the ORT CUDA op are g++ TUs that include cuda_runtime.h before the core header: its
    __host__/__device__ fallbacks must leave CUDA's macros alone (no redefinition, warnings as errors)."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    cuda_inc = toolchain.cuda_include_dir()
    if cuda_inc is None:
        pytest.skip("no CUDA toolkit headers (cuda_runtime_api.h): set CUDA_HOME")
    src = tmp_path / "host_tu.cpp"
    src.write_text('#include <cuda_runtime.h>\n#include "selectiveScanCore.h"\n'
                   "float g(float x) { return emrrg::scan::expF(x); }\n")
    proc = subprocess.run([cxx, "-std=c++17", "-Wall", "-Wextra", "-Werror", "-c", "-I", str(cuda_inc), "-I",
                           str(PLUGIN_DIR), "-o", str(tmp_path / "host_tu.o"), str(src)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# ---- host emulation of the kernel region ------------------------------------------------------
EMULATOR = r"""
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <thread>
#include <vector>
#include "selectiveScanCore.h"
#include "selectiveScanCpu.h"
#include "selectiveScanKernel.h"   // the real params struct (cuda_runtime_api.h is a stub here)

struct EmuDim3 { unsigned x = 0, y = 0, z = 0; };
thread_local EmuDim3 threadIdx, blockIdx;
std::barrier<>* gBarrier = nullptr;
#define __global__
#define __launch_bounds__(n)
#define __shared__ static
#define __syncthreads() gBarrier->arrive_and_wait()

namespace emrrg { namespace scan {
using std::min;
inline float toFloat(float v) { return v; }
template <typename T> T fromFloat(float v) { return v; }
#include "constants.inc"
#include "kernel.inc"

template <int kMaxN>
void emulate(const SelectiveScanParams& p) {
  const int perGroup = p.dim / p.groups;
  const int gx = (perGroup + kThreadsPerBlock - 1) / kThreadsPerBlock;
  for (int bz = 0; bz < p.batch; ++bz)
    for (int by = 0; by < p.groups; ++by)
      for (int bx = 0; bx < gx; ++bx) {
        std::barrier<> bar(kThreadsPerBlock);
        gBarrier = &bar;
        std::vector<std::thread> threads;
        for (int tx = 0; tx < kThreadsPerBlock; ++tx)
          threads.emplace_back([&, tx] {
            threadIdx.x = tx; blockIdx.x = bx; blockIdx.y = by; blockIdx.z = bz;
            selectiveScanKernel<float, kMaxN>(p);
          });
        for (auto& t : threads) t.join();
      }
}
}}  // namespace emrrg::scan

using namespace emrrg::scan;
int main() {
  struct Cfg { int b, D, G, N, L; bool sp, hasD, hasZ, hasBias; };
  const Cfg cfgs[] = {{2, 88, 4, 16, 197, true, true, true, true},    // padded block, one chunk
                      {1, 300, 1, 5, 70, false, false, true, false},  // 3 blocks of 128, odd N
                      {1, 256, 2, 64, 150, true, true, false, true},  // N = 64: chunks of 64 steps
                      {2, 384, 4, 16, 197, true, true, true, true}};
  int failures = 0;
  for (const Cfg& c : cfgs) {
    std::mt19937 rng(1);
    std::normal_distribution<float> nd;
    std::uniform_real_distribution<float> ud(0.01f, 1.f);
    const size_t nu = size_t(c.b) * c.D * c.L, nb = size_t(c.b) * c.G * c.N * c.L;
    std::vector<float> u(nu), dl(nu), z(nu), A(size_t(c.D) * c.N), B(nb), C(nb), Dv(c.D), bias(c.D), yGpu(nu), yCpu(nu);
    for (auto& x : u) x = nd(rng);
    for (auto& x : dl) x = c.sp ? nd(rng) * 0.5f - 1.f : ud(rng);
    for (auto& x : z) x = nd(rng);
    for (auto& x : A) x = -std::exp(nd(rng) * 0.5f);
    for (auto& x : B) x = nd(rng);
    for (auto& x : C) x = nd(rng);
    for (auto& x : Dv) x = nd(rng);
    for (auto& x : bias) x = c.sp ? nd(rng) * 0.5f : 0.05f;
    SelectiveScanParams p;
    p.batch = c.b; p.dim = c.D; p.seqlen = c.L; p.dstate = c.N; p.groups = c.G; p.deltaSoftplus = c.sp;
    p.u = u.data(); p.delta = dl.data(); p.A = A.data(); p.B = B.data(); p.C = C.data();
    p.D = c.hasD ? Dv.data() : nullptr; p.z = c.hasZ ? z.data() : nullptr;
    p.deltaBias = c.hasBias ? bias.data() : nullptr; p.y = yGpu.data();
    if (c.N <= 16) emulate<16>(p); else if (c.N <= 32) emulate<32>(p); else emulate<64>(p);
    CpuScanArgs a;
    a.batch = c.b; a.dim = c.D; a.seqlen = c.L; a.dstate = c.N; a.groups = c.G; a.deltaSoftplus = c.sp;
    a.u = u.data(); a.delta = dl.data(); a.A = A.data(); a.B = B.data(); a.C = C.data();
    a.D = p.D; a.z = p.z; a.deltaBias = p.deltaBias; a.y = yCpu.data();
    if (!selectiveScanCpu(a).empty()) return 2;
    size_t diff = 0;
    float maxd = 0;
    for (size_t i = 0; i < nu; ++i)
      if (std::memcmp(&yGpu[i], &yCpu[i], 4) != 0) { ++diff; maxd = std::max(maxd, std::fabs(yGpu[i] - yCpu[i])); }
    std::printf("b=%d D=%d G=%d N=%d L=%d: %zu of %zu elements differ in bits (max |diff| %g)\n",
                c.b, c.D, c.G, c.N, c.L, diff, nu, maxd);
    failures += diff != 0;
  }
  return failures;
}
"""


def _region(text: str, name: str) -> str:
    begin, end = f"// [emrrg:{name}-begin]", f"// [emrrg:{name}-end]"
    assert begin in text and end in text, f"markers {begin} / {end} missing from {KERNEL.name}"
    return text[text.index(begin):text.index(end)]


def test_kernel_logic_host_emulation(tmp_path):
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ not found (needed for the host emulation)")
    text = KERNEL.read_text()
    (tmp_path / "constants.inc").write_text(_region(text, "constants"))
    (tmp_path / "kernel.inc").write_text(_region(text, "kernel"))
    (tmp_path / "cuda_runtime_api.h").write_text(
        "#pragma once\ntypedef int cudaError_t;\ntypedef struct CUstream_st* cudaStream_t;\n")
    (tmp_path / "emulate.cpp").write_text(EMULATOR)
    exe = tmp_path / "emulate"
    # The CPU op's flags (plugins/CMakeLists.txt) minus -march: bit equality must not depend on the ISA.
    cmd = [cxx, "-std=c++20", "-O2", "-ffp-contract=off", "-fno-trapping-math", "-I", str(tmp_path), "-I", str(PLUGIN_DIR),
           str(tmp_path / "emulate.cpp"), str(PLUGIN_DIR / "selectiveScanCpu.cpp"), "-o", str(exe), "-pthread"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"emulator build failed:\n{proc.stderr}"
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    print(run.stdout)
    assert run.returncode == 0, f"kernel (host emulation) and CPU op disagree:\n{run.stdout}{run.stderr}"
