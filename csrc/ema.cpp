// Multi-tensor EMA on the CPU: target <- target + (1 - m) * (online - target), every tensor in one
// parallel region. Work is split into fixed-size chunks across all tensors (not per tensor), so the
// many tiny tensors of a ViT (biases, norms) do not each pay a parallel-region start.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <vector>

namespace {

constexpr int64_t kChunk = 1 << 15;  // 32K elements: large enough to amortise scheduling

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

// t*m + o*(1-m) as a two-sided lerp (torch.lerp's form): exact at m == 1 and at m == 0.
template <typename T, typename O>
void lerp_range(T* __restrict t, const O* __restrict o, int64_t n, float w) {
  if (w < 0.5f) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float tv = static_cast<float>(t[i]);
      t[i] = static_cast<T>(tv + w * (static_cast<float>(o[i]) - tv));
    }
  } else {
    const float m = 1.0f - w;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float ov = static_cast<float>(o[i]);
      t[i] = static_cast<T>(ov - m * (ov - static_cast<float>(t[i])));
    }
  }
}

template <typename T>
void dispatch_online(const at::Tensor& target, const at::Tensor& online, int64_t b, int64_t e, float w) {
  T* t = target.data_ptr<T>() + b;
  switch (online.scalar_type()) {
    case at::kFloat: lerp_range(t, online.const_data_ptr<float>() + b, e - b, w); break;
    case at::kBFloat16: lerp_range(t, online.const_data_ptr<c10::BFloat16>() + b, e - b, w); break;
    case at::kHalf: lerp_range(t, online.const_data_ptr<c10::Half>() + b, e - b, w); break;
    case at::kDouble: lerp_range(t, online.const_data_ptr<double>() + b, e - b, w); break;
    default: TORCH_CHECK(false, "onlines: unsupported dtype ", online.scalar_type());
  }
}

void update_range(const at::Tensor& target, const at::Tensor& online, int64_t b, int64_t e, float w) {
  switch (target.scalar_type()) {
    case at::kFloat: dispatch_online<float>(target, online, b, e, w); break;
    case at::kBFloat16: dispatch_online<c10::BFloat16>(target, online, b, e, w); break;
    case at::kHalf: dispatch_online<c10::Half>(target, online, b, e, w); break;
    case at::kDouble: dispatch_online<double>(target, online, b, e, w); break;
    default: TORCH_CHECK(false, "targets: unsupported dtype ", target.scalar_type());
  }
}

// Inputs were validated in Python (iwm_kernels._validate): same lengths, shapes and device,
// contiguous, floating point, no aliasing. The checks here only guard against misuse of the raw op.
void ema_update_cpu(at::TensorList targets, at::TensorList onlines, double momentum,
                    const std::optional<at::Tensor>& momentum_tensor) {
  TORCH_CHECK(targets.size() == onlines.size(), "targets and onlines differ in length");
  const float m = momentum_tensor.has_value() ? momentum_tensor->item<float>() : static_cast<float>(momentum);
  const float w = 1.0f - m;
  std::vector<Chunk> chunks;
  for (size_t i = 0; i < targets.size(); ++i) {
    TORCH_CHECK(targets[i].is_contiguous() && onlines[i].is_contiguous(), "tensor ", i, " is not contiguous");
    TORCH_CHECK(targets[i].numel() == onlines[i].numel(), "tensor ", i, " sizes differ");
    const int64_t n = targets[i].numel();
    for (int64_t b = 0; b < n; b += kChunk) chunks.push_back({static_cast<int64_t>(i), b, std::min(n, b + kChunk)});
  }
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      const Chunk& ch = chunks[c];
      update_range(targets[ch.tensor], onlines[ch.tensor], ch.begin, ch.end, w);
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
