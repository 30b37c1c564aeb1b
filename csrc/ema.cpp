// Multi-tensor EMA on the CPU: target <- target * m + online * (1 - m), every tensor in one parallel
// region. Work is split into fixed-size chunks across all tensors (not per tensor), so the many tiny
// tensors of a ViT (biases, norms) do not each pay a parallel-region start. Arithmetic follows
// iwm_kernels/ema/reference.py: fp64 when either side is fp64, else fp32; exact endpoints.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kChunk = 1 << 15;  // 32K elements: large enough to amortise scheduling

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

// t*m + o*(1-m): a convex combination, so finite inputs stay finite (the lerp form o - t overflows near
// the fp32 maximum). m == 1 writes nothing (bit-identical target); m == 0 copies the online values.
template <typename T, typename O>
void blend_range(T* __restrict t, const O* __restrict o, int64_t n, double momentum) {
  using C = std::conditional_t<std::is_same_v<T, double> || std::is_same_v<O, double>, double, float>;
  if (momentum == 1.0) return;
  if (momentum == 0.0) {
    for (int64_t i = 0; i < n; ++i) t[i] = static_cast<T>(static_cast<C>(o[i]));
    return;
  }
  const C m = static_cast<C>(momentum);
  const C w = static_cast<C>(1.0 - momentum);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    t[i] = static_cast<T>(static_cast<C>(t[i]) * m + static_cast<C>(o[i]) * w);
  }
}

template <typename T>
void dispatch_online(const at::Tensor& target, const at::Tensor& online, int64_t b, int64_t e, double m) {
  T* t = target.data_ptr<T>() + b;
  switch (online.scalar_type()) {
    case at::kFloat: blend_range(t, online.const_data_ptr<float>() + b, e - b, m); break;
    case at::kBFloat16: blend_range(t, online.const_data_ptr<c10::BFloat16>() + b, e - b, m); break;
    case at::kHalf: blend_range(t, online.const_data_ptr<c10::Half>() + b, e - b, m); break;
    case at::kDouble: blend_range(t, online.const_data_ptr<double>() + b, e - b, m); break;
    default: TORCH_CHECK(false, "onlines: unsupported dtype ", online.scalar_type());
  }
}

void update_range(const at::Tensor& target, const at::Tensor& online, int64_t b, int64_t e, double m) {
  switch (target.scalar_type()) {
    case at::kFloat: dispatch_online<float>(target, online, b, e, m); break;
    case at::kBFloat16: dispatch_online<c10::BFloat16>(target, online, b, e, m); break;
    case at::kHalf: dispatch_online<c10::Half>(target, online, b, e, m); break;
    case at::kDouble: dispatch_online<double>(target, online, b, e, m); break;
    default: TORCH_CHECK(false, "targets: unsupported dtype ", target.scalar_type());
  }
}

// Inputs were validated in Python (iwm_kernels.ema): same lengths, shapes and device, contiguous,
// floating point, no overlapping memory. The checks here only guard against misuse of the raw op.
void ema_update_cpu(at::TensorList targets, at::TensorList onlines, double momentum,
                    const std::optional<at::Tensor>& momentum_tensor) {
  TORCH_CHECK(targets.size() == onlines.size(), "targets and onlines differ in length");
  double m = momentum;
  if (momentum_tensor.has_value()) {
    TORCH_CHECK(momentum_tensor->numel() == 1 && momentum_tensor->is_cpu(), "momentum_tensor: one value on the CPU");
    m = momentum_tensor->item<double>();
  }
  TORCH_CHECK(std::isfinite(m) && m >= 0.0 && m <= 1.0, "momentum: must be finite and within [0, 1], got ", m);
  std::vector<Chunk> chunks;
  for (size_t i = 0; i < targets.size(); ++i) {
    TORCH_CHECK(targets[i].is_cpu() && onlines[i].is_cpu(), "tensor ", i, " is not on the CPU");
    TORCH_CHECK(targets[i].is_contiguous() && onlines[i].is_contiguous(), "tensor ", i, " is not contiguous");
    TORCH_CHECK(targets[i].numel() == onlines[i].numel(), "tensor ", i, " sizes differ");
    const int64_t n = targets[i].numel();
    for (int64_t b = 0; b < n; b += kChunk) chunks.push_back({static_cast<int64_t>(i), b, std::min(n, b + kChunk)});
  }
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      const Chunk& ch = chunks[c];
      update_range(targets[ch.tensor], onlines[ch.tensor], ch.begin, ch.end, m);
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(iwm_native, m) {
  m.def("ema_update_(Tensor(a!)[] targets, Tensor[] onlines, float momentum, Tensor? momentum_tensor) -> ()");
}

TORCH_LIBRARY_IMPL(iwm_native, CPU, m) {
  m.impl("ema_update_", &ema_update_cpu);
}
