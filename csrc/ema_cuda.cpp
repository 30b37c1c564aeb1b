// Binding of the CUDA EMA launcher. Compiled only when the extension is built with CUDA; it needs no
// CUDA headers itself (the stream arrives from Python as an integer), so it also compiles here.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda/ema_kernel.h"

namespace {

// The kernel reads these tensors as flat arrays through raw pointers: each must be a contiguous CUDA
// tensor on the tables' device with the expected dtype and length.
void check_table(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t numel,
                 const at::Device& device) {
  TORCH_CHECK(t.is_cuda() && t.device() == device, "ema_update_table_: ", name, " must be on ", device);
  TORCH_CHECK(t.scalar_type() == dtype, "ema_update_table_: ", name, " must be ", dtype);
  TORCH_CHECK(t.is_contiguous(), "ema_update_table_: ", name, " must be contiguous");
  TORCH_CHECK(t.numel() == numel, "ema_update_table_: ", name, " has ", t.numel(), " entries, expected ", numel);
}

void ema_update_table_cuda(const at::Tensor& target_ptrs, const at::Tensor& online_ptrs, const at::Tensor& numels,
                           const at::Tensor& block_tensor, const at::Tensor& block_start, int64_t n_blocks,
                           int64_t chunk, int64_t target_dtype, int64_t online_dtype, double momentum,
                           const std::optional<at::Tensor>& momentum_tensor,
                           const std::optional<at::Tensor>& error_flag, int64_t stream) {
  const at::Device device = target_ptrs.device();
  const int64_t n_tensors = target_ptrs.numel();
  check_table(target_ptrs, "target_ptrs", at::kLong, n_tensors, device);
  check_table(online_ptrs, "online_ptrs", at::kLong, n_tensors, device);
  check_table(numels, "numels", at::kLong, n_tensors, device);
  check_table(block_tensor, "block_tensor", at::kInt, n_blocks, device);
  check_table(block_start, "block_start", at::kLong, n_blocks, device);
  TORCH_CHECK(n_blocks < (int64_t{1} << 31), "ema_update_table_: too many blocks for one launch");
  TORCH_CHECK(chunk > 0, "ema_update_table_: chunk must be positive");
  IwmEmaLaunch args{};
  args.target_ptrs = target_ptrs.const_data_ptr<int64_t>();
  args.online_ptrs = online_ptrs.const_data_ptr<int64_t>();
  args.numels = numels.const_data_ptr<int64_t>();
  args.block_tensor = block_tensor.const_data_ptr<int32_t>();
  args.block_start = block_start.const_data_ptr<int64_t>();
  args.n_blocks = n_blocks;
  args.chunk = chunk;
  args.target_dtype = static_cast<int>(target_dtype);
  args.online_dtype = static_cast<int>(online_dtype);
  args.momentum = momentum;
  args.momentum_f32 = nullptr;
  args.momentum_f64 = nullptr;
  args.error_flag = nullptr;
  if (momentum_tensor.has_value()) {
    // Read by the kernel, never by the host (no sync); the kernel skips the update when it is invalid.
    const at::Tensor& mt = *momentum_tensor;
    TORCH_CHECK(mt.is_cuda() && mt.device() == device && mt.numel() == 1,
                "momentum_tensor: one value on the tables' device");
    if (mt.scalar_type() == at::kFloat) {
      args.momentum_f32 = mt.const_data_ptr<float>();
    } else {
      TORCH_CHECK(mt.scalar_type() == at::kDouble, "momentum_tensor: must be float32 or float64");
      args.momentum_f64 = mt.const_data_ptr<double>();
    }
  } else {
    TORCH_CHECK(momentum >= 0.0 && momentum <= 1.0, "momentum: must be finite and within [0, 1], got ", momentum);
  }
  if (error_flag.has_value()) {
    check_table(*error_flag, "error_flag", at::kInt, 1, device);
    args.error_flag = error_flag->data_ptr<int32_t>();
  }
  const auto err = iwm_ema_launch(args, reinterpret_cast<cudaStream_t>(stream));
  TORCH_CHECK(err == 0, "iwm_ema_launch failed with CUDA error ", static_cast<int>(err));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(iwm_native, m) {
  m.def("ema_update_table_(Tensor target_ptrs, Tensor online_ptrs, Tensor numels, Tensor block_tensor, "
        "Tensor block_start, int n_blocks, int chunk, int target_dtype, int online_dtype, float momentum, "
        "Tensor? momentum_tensor, Tensor(a!)? error_flag, int stream) -> ()");
}

TORCH_LIBRARY_IMPL(iwm_native, CUDA, m) {
  m.impl("ema_update_table_", &ema_update_table_cuda);
}
