// Binding of the CUDA EMA launcher. Compiled only when the extension is built with CUDA; it needs no
// CUDA headers itself (the stream arrives from Python as an integer), so it also compiles here.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda/ema_kernel.h"

namespace {

void ema_update_table_cuda(const at::Tensor& target_ptrs, const at::Tensor& online_ptrs, const at::Tensor& numels,
                           const at::Tensor& block_tensor, const at::Tensor& block_start, int64_t n_blocks,
                           int64_t chunk, int64_t target_dtype, int64_t online_dtype, double momentum,
                           const std::optional<at::Tensor>& momentum_tensor, int64_t stream) {
  TORCH_CHECK(target_ptrs.scalar_type() == at::kLong && online_ptrs.scalar_type() == at::kLong &&
              numels.scalar_type() == at::kLong && block_start.scalar_type() == at::kLong &&
              block_tensor.scalar_type() == at::kInt, "ema_update_table_: table dtypes");
  TORCH_CHECK(block_tensor.numel() == n_blocks && block_start.numel() == n_blocks, "ema_update_table_: n_blocks");
  TORCH_CHECK(n_blocks < (int64_t{1} << 31), "ema_update_table_: too many blocks for one launch");
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
  args.momentum = static_cast<float>(momentum);
  args.momentum_ptr = nullptr;
  if (momentum_tensor.has_value()) {
    TORCH_CHECK(momentum_tensor->scalar_type() == at::kFloat && momentum_tensor->device() == target_ptrs.device(),
                "momentum_tensor: fp32 on the tables' device");
    args.momentum_ptr = momentum_tensor->const_data_ptr<float>();
  }
  const auto err = iwm_ema_launch(args, reinterpret_cast<cudaStream_t>(stream));
  TORCH_CHECK(err == 0, "iwm_ema_launch failed with CUDA error ", static_cast<int>(err));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(iwm_native, m) {
  m.def("ema_update_table_(Tensor target_ptrs, Tensor online_ptrs, Tensor numels, Tensor block_tensor, "
        "Tensor block_start, int n_blocks, int chunk, int target_dtype, int online_dtype, float momentum, "
        "Tensor? momentum_tensor, int stream) -> ()");
}

TORCH_LIBRARY_IMPL(iwm_native, CUDA, m) {
  m.impl("ema_update_table_", &ema_update_table_cuda);
}
