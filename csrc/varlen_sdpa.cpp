// Variable-length attention on the CPU: ATen's flash-attention kernel run once per run of equal-length
// sequences, the runs spread over the threads in one parallel region.
//
// Why: the packed sequences of a ragged batch (I-JEPA's masks without truncation) are short (50-250
// tokens, 3-12 heads), and one flash call per sequence from Python leaves the threads idle: a call has
// heads x query-blocks work items (3 for a ViT-Ti sequence), so two threads get 2 and 1, and each call
// pays Python, dispatch, split and cat. Here each thread takes whole runs, assigned longest-first to the
// least loaded thread by their cost (sequences x length^2), and inside a parallel region ATen's own
// parallel_for runs inline, so each call is single-threaded and its buffers are its own.
//
// Semantics are ATen's flash kernel's (the same numbers as F.scaled_dot_product_attention on each
// sequence): fp32 accumulation, the log-sum-exp kept for the backward, no dropout, no mask.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <tuple>
#include <vector>

namespace {

struct Run {
  int64_t start;  // first packed row
  int64_t count;  // sequences in the run
  int64_t length; // tokens per sequence
};

std::vector<Run> equal_length_runs(at::IntArrayRef lengths, int64_t total) {
  std::vector<Run> runs;
  int64_t start = 0;
  for (int64_t n : lengths) {
    TORCH_CHECK(n >= 0, "varlen_sdpa: lengths must be non-negative, got ", n);
    if (n > 0) {
      if (!runs.empty() && runs.back().length == n && runs.back().start + runs.back().count * n == start) {
        runs.back().count += 1;
      } else {
        runs.push_back({start, 1, n});
      }
    }
    start += n;
  }
  TORCH_CHECK(start == total, "varlen_sdpa: lengths sum to ", start, " but the tensors have ", total, " rows");
  return runs;
}

// Runs per thread: longest processing time first, each to the least loaded thread.
std::vector<std::vector<int64_t>> assign(const std::vector<Run>& runs, int64_t threads) {
  std::vector<int64_t> order(runs.size());
  std::iota(order.begin(), order.end(), 0);
  auto cost = [&](int64_t i) { return runs[i].count * runs[i].length * runs[i].length; };
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return cost(a) > cost(b); });
  std::vector<std::vector<int64_t>> bins(static_cast<size_t>(threads));
  std::vector<int64_t> load(static_cast<size_t>(threads), 0);
  for (int64_t i : order) {
    const auto t = std::min_element(load.begin(), load.end()) - load.begin();
    bins[t].push_back(i);
    load[t] += cost(i);
  }
  return bins;
}

// [rows, H, D] rows [start, start + count * length) as [count, H, length, D] (a view).
at::Tensor heads_view(const at::Tensor& x, const Run& r) {
  return x.narrow(0, r.start, r.count * r.length).unflatten(0, {r.count, r.length}).transpose(1, 2);
}

// [rows, H] rows of a run as [count, H, length] (a view).
at::Tensor lse_view(const at::Tensor& lse, const Run& r) {
  return lse.narrow(0, r.start, r.count * r.length).unflatten(0, {r.count, r.length}).transpose(1, 2);
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "varlen_sdpa: q, k, v must be on the CPU");
  TORCH_CHECK(q.dim() == 3 && q.sizes() == k.sizes() && q.sizes() == v.sizes(),
              "varlen_sdpa: q, k, v must be [T, H, D] of one shape, got ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "varlen_sdpa: q, k, v dtypes differ");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1, "varlen_sdpa: q, k, v need a unit last-dim stride");
}

template <typename F>
void for_each_run(const std::vector<Run>& runs, const F& fn) {
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), runs.size()));
  const auto bins = assign(runs, threads);
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    // Below autograd on every thread: a worker's thread-local grad mode is not the caller's, and the views
    // made here are plain storage slices, never part of a graph (the Python autograd Function is).
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    c10::AutoGradMode no_grad(false);
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t i : bins[t]) fn(runs[i]);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> varlen_sdpa_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                   at::IntArrayRef lengths, double scale) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_qkv(q, k, v);
  const auto runs = equal_length_runs(lengths, q.size(0));
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1)}, q.options().dtype(at::kFloat));
  for_each_run(runs, [&](const Run& r) {
    auto [o, l] = at::_scaled_dot_product_flash_attention_for_cpu(heads_view(q, r), heads_view(k, r), heads_view(v, r),
                                                                 0.0, false, std::nullopt, scale);
    heads_view(out, r).copy_(o);
    lse_view(lse, r).copy_(l);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_sdpa_bwd(const at::Tensor& grad_out, const at::Tensor& q,
                                                               const at::Tensor& k, const at::Tensor& v,
                                                               const at::Tensor& out, const at::Tensor& lse,
                                                               at::IntArrayRef lengths, double scale) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_qkv(q, k, v);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes() && grad_out.stride(2) == 1 && out.stride(2) == 1,
              "varlen_sdpa_bwd: grad_out and out must be shaped like q with a unit last-dim stride");
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) && lse.scalar_type() == at::kFloat,
              "varlen_sdpa_bwd: lse must be float32 [T, H]");
  const auto runs = equal_length_runs(lengths, q.size(0));
  // One [T, 3, H, D] buffer: the gradient of the qkv projection's output, dq, dk, dv its views.
  at::Tensor grads = at::empty({q.size(0), 3, q.size(1), q.size(2)}, q.options());
  at::Tensor dq = grads.select(1, 0), dk = grads.select(1, 1), dv = grads.select(1, 2);
  for_each_run(runs, [&](const Run& r) {
    auto [gq, gk, gv] = at::_scaled_dot_product_flash_attention_for_cpu_backward(
        heads_view(grad_out, r), heads_view(q, r), heads_view(k, r), heads_view(v, r), heads_view(out, r),
        lse_view(lse, r), 0.0, false, std::nullopt, scale);
    heads_view(dq, r).copy_(gq);
    heads_view(dk, r).copy_(gk);
    heads_view(dv, r).copy_(gv);
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(iwm_native, m) {
  m.def("varlen_sdpa_fwd(Tensor q, Tensor k, Tensor v, int[] lengths, float scale) -> (Tensor, Tensor)");
  m.def("varlen_sdpa_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, int[] lengths, "
        "float scale) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(iwm_native, CPU, m) {
  m.impl("varlen_sdpa_fwd", &varlen_sdpa_fwd);
  m.impl("varlen_sdpa_bwd", &varlen_sdpa_bwd);
}
