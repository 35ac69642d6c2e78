/* NOT the CUDA runtime: the few declarations selectiveScanKernel.h / selectiveScanPlugin.cpp use, so the
 * TensorRT plugin's host logic compiles and runs without a CUDA toolkit (test_trt_plugin_host.py). */
#pragma once

typedef enum cudaError { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorLaunchFailure = 719 } cudaError_t;
typedef struct CUstream_st* cudaStream_t;

inline const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : e == cudaErrorInvalidValue ? "invalid argument" : "unspecified launch failure";
}
