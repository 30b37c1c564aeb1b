// Torch-free interface of the CUDA EMA kernel (csrc/cuda/ema_kernel.cu).
#pragma once
#include <cstdint>

#ifdef __CUDACC__
#include <cuda_runtime.h>
#else
typedef struct CUstream_st* cudaStream_t;
typedef int cudaError_t;
#endif

enum IwmDType : int { kIwmFloat32 = 0, kIwmBFloat16 = 1, kIwmFloat16 = 2, kIwmFloat64 = 3 };

struct IwmEmaLaunch {
  const int64_t* target_ptrs;
  const int64_t* online_ptrs;
  const int64_t* numels;
  const int32_t* block_tensor;
  const int64_t* block_start;
  int64_t n_blocks;
  int64_t chunk;
  int target_dtype;
  int online_dtype;
  double momentum;                // used when both momentum pointers are null (validated on the host)
  const float* momentum_f32;      // at most one of the two is set: the momentum is read on the device
  const double* momentum_f64;
  int32_t* error_flag;            // set to 1 when a momentum read on the device is invalid (may be null)
};

cudaError_t iwm_ema_launch(const IwmEmaLaunch& args, cudaStream_t stream);
