// Multi-tensor EMA for CUDA, torch-free (raw pointers + a stream) so nvcc can compile it anywhere.
// One block per CHUNK-element slice of one tensor; the slice -> tensor map is a table built once on
// the host (iwm_kernels/ema/plan.py) and kept on the device.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cstdint>

#include "ema_kernel.h"

namespace {

// Loads widen to the compute type C (fp64 when either side is fp64, else fp32); stores round once.
template <typename C, typename T> __device__ __forceinline__ C load_as(const T* p) { return static_cast<C>(*p); }
template <> __device__ __forceinline__ float load_as<float, __nv_bfloat16>(const __nv_bfloat16* p) {
  return __bfloat162float(*p);
}
template <> __device__ __forceinline__ double load_as<double, __nv_bfloat16>(const __nv_bfloat16* p) {
  return static_cast<double>(__bfloat162float(*p));
}
template <> __device__ __forceinline__ float load_as<float, __half>(const __half* p) { return __half2float(*p); }
template <> __device__ __forceinline__ double load_as<double, __half>(const __half* p) {
  return static_cast<double>(__half2float(*p));
}

template <typename T, typename C> __device__ __forceinline__ T store_as(C v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __nv_bfloat16 store_as<__nv_bfloat16, float>(float v) {
  return __float2bfloat16_rn(v);
}
template <> __device__ __forceinline__ __nv_bfloat16 store_as<__nv_bfloat16, double>(double v) {
  return __double2bfloat16(v);
}
template <> __device__ __forceinline__ __half store_as<__half, float>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __half store_as<__half, double>(double v) { return __double2half(v); }

template <typename T, typename O> struct ComputeType { using type = float; };
template <typename O> struct ComputeType<double, O> { using type = double; };
template <typename T> struct ComputeType<T, double> { using type = double; };
template <> struct ComputeType<double, double> { using type = double; };

constexpr int kThreads = 256;

template <typename T, typename O>
__global__ void __launch_bounds__(kThreads) ema_multi_tensor_kernel(
    const int64_t* __restrict__ target_ptrs, const int64_t* __restrict__ online_ptrs,
    const int64_t* __restrict__ numels, const int32_t* __restrict__ block_tensor,
    const int64_t* __restrict__ block_start, int64_t chunk, double momentum,
    const float* __restrict__ momentum_f32, const double* __restrict__ momentum_f64,
    int32_t* __restrict__ error_flag) {
  using C = typename ComputeType<T, O>::type;
  const double m64 = momentum_f64 != nullptr ? *momentum_f64
                     : momentum_f32 != nullptr ? static_cast<double>(*momentum_f32) : momentum;
  if (!(m64 >= 0.0 && m64 <= 1.0)) {  // not finite or outside [0, 1]: leave every target as it is
    if (error_flag != nullptr && threadIdx.x == 0) *error_flag = 1;
    return;
  }
  if (m64 == 1.0) return;  // exact endpoint: the target stays bit-identical
  const int32_t tensor = block_tensor[blockIdx.x];
  const int64_t start = block_start[blockIdx.x];
  const int64_t end = min(start + chunk, numels[tensor]);
  T* t = reinterpret_cast<T*>(target_ptrs[tensor]);
  const O* o = reinterpret_cast<const O*>(online_ptrs[tensor]);
  const C m = static_cast<C>(m64);
  const C w = static_cast<C>(1.0 - m64);
  const bool copy_online = m64 == 0.0;  // exact endpoint: the target becomes the online values
  // Unrolled by 4 so each thread keeps several independent loads in flight.
  constexpr int kUnroll = 4;
  for (int64_t base = start + threadIdx.x; base < end; base += kThreads * kUnroll) {
    C tv[kUnroll], ov[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * kThreads;
      if (i < end) {
        tv[u] = load_as<C>(t + i);
        ov[u] = load_as<C>(o + i);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * kThreads;
      if (i < end) {
        // t*m + o*(1-m), a convex combination: finite inputs stay finite (o - t can overflow).
        t[i] = store_as<T>(copy_online ? ov[u] : tv[u] * m + ov[u] * w);
      }
    }
  }
}

template <typename T, typename O>
void launch_pair(const IwmEmaLaunch& a, cudaStream_t stream) {
  ema_multi_tensor_kernel<T, O><<<dim3(static_cast<unsigned>(a.n_blocks)), kThreads, 0, stream>>>(
      a.target_ptrs, a.online_ptrs, a.numels, a.block_tensor, a.block_start, a.chunk, a.momentum,
      a.momentum_f32, a.momentum_f64, a.error_flag);
}

template <typename T>
cudaError_t launch_online(const IwmEmaLaunch& a, cudaStream_t stream) {
  switch (a.online_dtype) {
    case kIwmFloat32: launch_pair<T, float>(a, stream); break;
    case kIwmBFloat16: launch_pair<T, __nv_bfloat16>(a, stream); break;
    case kIwmFloat16: launch_pair<T, __half>(a, stream); break;
    case kIwmFloat64: launch_pair<T, double>(a, stream); break;
    default: return cudaErrorInvalidValue;
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
