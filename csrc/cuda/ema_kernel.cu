// Multi-tensor EMA for CUDA, torch-free (raw pointers + a stream) so nvcc can compile it anywhere.
// One block per CHUNK-element slice of one tensor; the slice -> tensor map is a table built once on
// the host (iwm_kernels/ema/plan.py) and kept on the device.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cstdint>

#include "ema_kernel.h"

namespace {

template <typename T> __device__ __forceinline__ float to_f32(T v);
template <> __device__ __forceinline__ float to_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f32<double>(double v) { return static_cast<float>(v); }
template <> __device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_f32<double>(float v) { return static_cast<double>(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }

constexpr int kThreads = 256;

template <typename T, typename O>
__global__ void __launch_bounds__(kThreads) ema_multi_tensor_kernel(
    const int64_t* __restrict__ target_ptrs, const int64_t* __restrict__ online_ptrs,
    const int64_t* __restrict__ numels, const int32_t* __restrict__ block_tensor,
    const int64_t* __restrict__ block_start, int64_t chunk, float momentum,
    const float* __restrict__ momentum_ptr) {
  const int32_t tensor = block_tensor[blockIdx.x];
  const int64_t start = block_start[blockIdx.x];
  const int64_t end = min(start + chunk, numels[tensor]);
  T* t = reinterpret_cast<T*>(target_ptrs[tensor]);
  const O* o = reinterpret_cast<const O*>(online_ptrs[tensor]);
  const float m = momentum_ptr != nullptr ? *momentum_ptr : momentum;
  const float w = 1.0f - m;
  const bool from_target = w < 0.5f;  // two-sided lerp (torch.lerp's form): exact at m == 1 and m == 0
  // Unrolled by 4 so each thread keeps several independent loads in flight.
  constexpr int kUnroll = 4;
  for (int64_t base = start + threadIdx.x; base < end; base += kThreads * kUnroll) {
    float tv[kUnroll], ov[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * kThreads;
      if (i < end) {
        tv[u] = to_f32(t[i]);
        ov[u] = to_f32(o[i]);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * kThreads;
      if (i < end) {
        t[i] = from_f32<T>(from_target ? fmaf(w, ov[u] - tv[u], tv[u]) : fmaf(-m, ov[u] - tv[u], ov[u]));
      }
    }
  }
}

template <typename T>
cudaError_t launch_online(const IwmEmaLaunch& a, cudaStream_t stream) {
  dim3 grid(static_cast<unsigned>(a.n_blocks));
  switch (a.online_dtype) {
    case kIwmFloat32:
      ema_multi_tensor_kernel<T, float><<<grid, kThreads, 0, stream>>>(a.target_ptrs, a.online_ptrs, a.numels,
          a.block_tensor, a.block_start, a.chunk, a.momentum, a.momentum_ptr);
      break;
    case kIwmBFloat16:
      ema_multi_tensor_kernel<T, __nv_bfloat16><<<grid, kThreads, 0, stream>>>(a.target_ptrs, a.online_ptrs,
          a.numels, a.block_tensor, a.block_start, a.chunk, a.momentum, a.momentum_ptr);
      break;
    case kIwmFloat16:
      ema_multi_tensor_kernel<T, __half><<<grid, kThreads, 0, stream>>>(a.target_ptrs, a.online_ptrs, a.numels,
          a.block_tensor, a.block_start, a.chunk, a.momentum, a.momentum_ptr);
      break;
    case kIwmFloat64:
      ema_multi_tensor_kernel<T, double><<<grid, kThreads, 0, stream>>>(a.target_ptrs, a.online_ptrs, a.numels,
          a.block_tensor, a.block_start, a.chunk, a.momentum, a.momentum_ptr);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t iwm_ema_launch(const IwmEmaLaunch& a, cudaStream_t stream) {
  if (a.n_blocks == 0) return cudaSuccess;
  switch (a.target_dtype) {
    case kIwmFloat32: return launch_online<float>(a, stream);
    case kIwmBFloat16: return launch_online<__nv_bfloat16>(a, stream);
    case kIwmFloat16: return launch_online<__half>(a, stream);
    case kIwmFloat64: return launch_online<double>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}
