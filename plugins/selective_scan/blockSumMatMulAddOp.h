/*
 * blockSumMatMulAddOp.h — com.emrrg::BlockSumMatMulAdd (CPU EP, f32), the affine 4-bit decoder's correction.
 *
 *     Y = A + BlockSum(X) @ C      BlockSum(X)[..., b] = sum of X[..., b*bs : (b+1)*bs]  (a last partial block
 *                                  sums what it has), bs = attribute block_size
 *
 * Inputs:  0 A (..., N) f32   the output of the MatMulNBits that holds the 4-bit codes
 *          1 X (..., K) f32   that MatMulNBits' input (same leading dims as A)
 *          2 C (nb, N)  f32   per-block offsets m + 2^(bits-1) s, nb = ceil(K / bs)
 * Output:  0 Y (..., N) f32   (may share A's buffer: declared MayInplace 0 -> 0)
 * Attribute: block_size int >= 1.
 *
 * One node per projection replaces the pure-ONNX MatMul(X, indicator) + MatMul(sums, C) + Add, which
 * stays in the graph as the node's model-local function body (export/decoder_builder.py) and runs when
 * this library is not registered. Registered by RegisterCustomOps (selectiveScanOrtOp.cpp) in the same
 * com.emrrg domain as SelectiveScan; CPU only (a CUDA session runs the function body on the device).
 */
#pragma once

#include <onnxruntime_c_api.h>

namespace emrrg {
namespace affine {

// Adds the op to `domain` (the library's one com.emrrg domain). `api` must outlive every session.
OrtStatus* addBlockSumMatMulAdd(const OrtApi* api, OrtCustomOpDomain* domain);

}  // namespace affine
}  // namespace emrrg
