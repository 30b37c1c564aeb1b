// Masked-token gather on the CPU: out[r] = x[b, i] (+ pos[i]) (+ bias[b]) (then a no-affine layer
// norm), and its backward.
//
// Forward: rows are split across threads; a plain gather is one memcpy per row, the fused forms make
// one pass over the row in an fp32 (fp64 for fp64) scratch row. Outputs come from the output pool
// (cpu_output_pool.h), so a steady-state step does not page-fault on them.
//
// Backward, deterministic and without atomics: the rows that feed each destination row (a row of dx,
// of dpos, of dbias) are listed by a stable counting sort of their keys, then every destination row is
// written exactly once by one thread, summing its sources in row order. Untouched rows are written as
// zeros in the same pass, so dx needs no separate zero fill.
//
// Inputs were validated in Python (iwm_kernels/_validate.py and iwm_kernels/gather): index values in
// range, offsets monotone, shapes consistent. The checks here only guard against misuse of the raw ops.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu_output_pool.h"

namespace {

template <typename T>
using acc_of = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Which sample a packed row belongs to: rows [cu[s], cu[s+1]) of a packed index, or rows
// [s*row_len, (s+1)*row_len) of a rectangular one.
struct Segments {
  const int64_t* cu;  // [num_seqs + 1], or nullptr for rectangular
  int64_t row_len;
  int64_t num_seqs;

  int64_t begin(int64_t s) const { return cu ? cu[s] : s * row_len; }
  int64_t end(int64_t s) const { return cu ? cu[s + 1] : (s + 1) * row_len; }
  int64_t sample_of(int64_t r) const {
    if (!cu) return r / row_len;
    // Largest s with cu[s] <= r (empty segments share an offset; the row belongs to the last of them).
    return static_cast<int64_t>(std::upper_bound(cu, cu + num_seqs + 1, r) - cu) - 1;
  }
};

struct RowInputs {
  int64_t D;
  int64_t sxb, sxn;  // x strides (elements); the feature stride is 1
  bool x_batched;    // x is [B, N, D]; otherwise [1, N, D] shared by every sample
};

// v <- x[b, i] (+ pos[i]) (+ bias[b]) in the accumulation type, in one pass.
template <typename scalar_t, typename index_t, typename acc_t>
inline void load_row(const scalar_t* x, const acc_t* pos, const acc_t* bias, const RowInputs& in, int64_t b,
                     index_t i, acc_t* __restrict v) {
  const scalar_t* __restrict src = x + (in.x_batched ? b * in.sxb : 0) + static_cast<int64_t>(i) * in.sxn;
  const int64_t D = in.D;
  const acc_t* __restrict p = pos ? pos + static_cast<int64_t>(i) * D : nullptr;
  const acc_t* __restrict q = bias ? bias + b * D : nullptr;
  if (p && q) {
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) v[d] = static_cast<acc_t>(src[d]) + p[d] + q[d];
  } else if (p) {
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) v[d] = static_cast<acc_t>(src[d]) + p[d];
  } else if (q) {
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) v[d] = static_cast<acc_t>(src[d]) + q[d];
  } else {
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) v[d] = static_cast<acc_t>(src[d]);
  }
}

template <typename acc_t>
inline void row_stats(const acc_t* v, int64_t D, double eps, acc_t& mean, acc_t& rstd) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t d = 0; d < D; ++d) sum += v[d];
  mean = sum / static_cast<acc_t>(D);
  acc_t sq = 0;
#pragma omp simd reduction(+ : sq)
  for (int64_t d = 0; d < D; ++d) {
    const acc_t c = v[d] - mean;
    sq += c * c;
  }
  rstd = static_cast<acc_t>(1) / std::sqrt(sq / static_cast<acc_t>(D) + static_cast<acc_t>(eps));
}

int64_t row_grain(int64_t D) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1)); }

// Selected rows are scattered, so the hardware prefetcher restarts on every row; asking for the rows a
// few iterations ahead keeps enough cache misses in flight to run at copy speed.
constexpr int64_t kRowsAhead = 2;

inline void prefetch_bytes(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0, 1);
}

template <typename scalar_t, typename index_t>
void forward_impl(const at::Tensor& x, const index_t* idx, const Segments& seg, int64_t T, const RowInputs& in,
                  const acc_of<scalar_t>* pos, const acc_of<scalar_t>* bias, bool normalize, double eps,
                  scalar_t* out) {
  using acc_t = acc_of<scalar_t>;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const int64_t D = in.D;
  const bool plain = !pos && !bias && !normalize;
  at::parallel_for(0, T, row_grain(D), [&](int64_t lo, int64_t hi) {
    std::vector<acc_t> buf(plain ? 0 : D);
    int64_t b = seg.sample_of(lo);
    int64_t b_end = seg.end(b);
    int64_t ahead = std::min(lo + kRowsAhead, hi);
    int64_t b_ahead = seg.sample_of(std::min(ahead, T - 1));
    int64_t b_ahead_end = seg.end(b_ahead);
    for (int64_t r = lo; r < hi; ++r) {
      while (r >= b_end) b_end = seg.end(++b);
      if (ahead < hi) {
        while (ahead >= b_ahead_end) b_ahead_end = seg.end(++b_ahead);
        const int64_t tok = static_cast<int64_t>(idx[ahead]);
        prefetch_bytes(xp + (in.x_batched ? b_ahead * in.sxb : 0) + tok * in.sxn, D * sizeof(scalar_t));
        if (pos) prefetch_bytes(pos + tok * D, D * sizeof(acc_t));
        ++ahead;
      }
      scalar_t* dst = out + r * D;
      if (plain) {
        const scalar_t* src = xp + (in.x_batched ? b * in.sxb : 0) + static_cast<int64_t>(idx[r]) * in.sxn;
        std::memcpy(dst, src, sizeof(scalar_t) * D);
        continue;
      }
      acc_t* v = buf.data();
      load_row(xp, pos, bias, in, b, idx[r], v);
      if (normalize) {
        acc_t mean, rstd;
        row_stats(v, D, eps, mean, rstd);
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>((v[d] - mean) * rstd);
      } else {
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(v[d]);
      }
    }
  });
}

// out[d] = sum over j in [offs[d], offs[d+1]) of src[order ? order[j] : j], rows of D, each output row
// written once (zeros when it has no sources).
template <typename src_t, typename out_t>
void segment_sum(const src_t* src, int64_t D, const int64_t* order, const int64_t* offs, int64_t num_dest,
                 out_t* out) {
  using acc_t = std::conditional_t<std::is_same_v<src_t, double> || std::is_same_v<out_t, double>, double, float>;
  at::parallel_for(0, num_dest, row_grain(D), [&](int64_t lo, int64_t hi) {
    std::vector<acc_t> acc(D);
    for (int64_t dest = lo; dest < hi; ++dest) {
      out_t* o = out + dest * D;
      const int64_t first = offs[dest], last = offs[dest + 1];
      if (first == last) {
        std::fill(o, o + D, static_cast<out_t>(0));
        continue;
      }
      const src_t* row = src + (order ? order[first] : first) * D;
      if (last - first == 1) {
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<out_t>(static_cast<acc_t>(row[d]));
        continue;
      }
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) acc[d] = static_cast<acc_t>(row[d]);
      for (int64_t j = first + 1; j < last; ++j) {
        row = src + (order ? order[j] : j) * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) acc[d] += static_cast<acc_t>(row[d]);
      }
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<out_t>(acc[d]);
    }
  });
}

// Stable counting sort of the rows by key (b*N + i when by_sample, else i): offsets [num_dest + 1] and
// the rows in key order (rows with equal keys stay in row order, which fixes the summation order).
template <typename index_t>
void rows_by_key(const index_t* idx, const Segments& seg, int64_t T, int64_t N, bool by_sample,
                 std::vector<int64_t>& offs, std::vector<int64_t>& order) {
  const int64_t num_dest = by_sample ? seg.num_seqs * N : N;
  offs.assign(num_dest + 1, 0);
  order.resize(T);
  std::vector<int64_t> keys(T);
  for (int64_t s = 0; s < seg.num_seqs; ++s) {
    const int64_t base = by_sample ? s * N : 0;
    for (int64_t r = seg.begin(s); r < seg.end(s); ++r) {
      keys[r] = base + static_cast<int64_t>(idx[r]);
      ++offs[keys[r] + 1];
    }
  }
  for (int64_t d = 0; d < num_dest; ++d) offs[d + 1] += offs[d];
  std::vector<int64_t> cursor(offs.begin(), offs.end() - 1);
  for (int64_t r = 0; r < T; ++r) order[cursor[keys[r]]++] = r;
}

template <typename scalar_t, typename index_t>
std::vector<at::Tensor> backward_impl(const at::Tensor& grad_out, const at::Tensor& x, const index_t* idx,
                                      const Segments& seg, int64_t T, const RowInputs& in,
                                      const acc_of<scalar_t>* pos, const acc_of<scalar_t>* bias, bool normalize,
                                      double eps, bool need_x, bool need_pos, bool need_bias) {
  using acc_t = acc_of<scalar_t>;
  const int64_t D = in.D;
  const int64_t N = x.size(1);
  const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  const scalar_t* dy = grad_out.const_data_ptr<scalar_t>();

  // The gradient at each selected row before the gather's scatter: dy itself, or through the norm.
  at::Tensor ds;
  if (normalize) {
    ds = iwm::empty_output({T, D}, acc_type);
    acc_t* dsp = ds.mutable_data_ptr<acc_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    at::parallel_for(0, T, row_grain(D), [&](int64_t lo, int64_t hi) {
      std::vector<acc_t> buf(D);
      int64_t b = seg.sample_of(lo);
      int64_t b_end = seg.end(b);
      for (int64_t r = lo; r < hi; ++r) {
        while (r >= b_end) b_end = seg.end(++b);
        acc_t* v = buf.data();
        load_row(xp, pos, bias, in, b, idx[r], v);
        acc_t mean, rstd;
        row_stats(v, D, eps, mean, rstd);
        const scalar_t* g = dy + r * D;
        acc_t sum_g = 0, sum_gx = 0;
#pragma omp simd reduction(+ : sum_g, sum_gx)
        for (int64_t d = 0; d < D; ++d) {
          const acc_t gd = static_cast<acc_t>(g[d]);
          sum_g += gd;
          sum_gx += gd * (v[d] - mean) * rstd;
        }
        const acc_t mean_g = sum_g / static_cast<acc_t>(D), mean_gx = sum_gx / static_cast<acc_t>(D);
        acc_t* o = dsp + r * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) {
          const acc_t xhat = (v[d] - mean) * rstd;
          o[d] = (static_cast<acc_t>(g[d]) - mean_g - xhat * mean_gx) * rstd;
        }
      }
    });
  }

  at::Tensor dx, dpos, dbias;
  auto sum_into = [&](const int64_t* order, const int64_t* offs, int64_t num_dest, auto* out) {
    if (normalize) {
      segment_sum(ds.const_data_ptr<acc_t>(), D, order, offs, num_dest, out);
    } else {
      segment_sum(dy, D, order, offs, num_dest, out);
    }
  };

  if (need_bias) {
    dbias = iwm::empty_output({seg.num_seqs, D}, acc_type);
    std::vector<int64_t> offs(seg.num_seqs + 1);
    for (int64_t s = 0; s <= seg.num_seqs; ++s) offs[s] = s < seg.num_seqs ? seg.begin(s) : T;
    sum_into(nullptr, offs.data(), seg.num_seqs, dbias.mutable_data_ptr<acc_t>());
  }
  std::vector<int64_t> offs, order;
  if (need_x && in.x_batched) {
    dx = iwm::empty_output({x.size(0), N, D}, x.scalar_type());
    rows_by_key(idx, seg, T, N, /*by_sample=*/true, offs, order);
    sum_into(order.data(), offs.data(), seg.num_seqs * N, dx.mutable_data_ptr<scalar_t>());
  }
  if (need_pos || (need_x && !in.x_batched)) {
    at::Tensor by_token = iwm::empty_output({N, D}, acc_type);
    rows_by_key(idx, seg, T, N, /*by_sample=*/false, offs, order);
    sum_into(order.data(), offs.data(), N, by_token.mutable_data_ptr<acc_t>());
    if (need_pos) dpos = by_token;
    if (need_x && !in.x_batched) dx = by_token.to(x.scalar_type()).view({1, N, D});
  }
  auto none = at::empty({0}, x.options());
  return {dx.defined() ? dx : none, dpos.defined() ? dpos : none, dbias.defined() ? dbias : none};
}

struct Prepared {
  Segments seg;
  RowInputs in;
  int64_t T;
};

Prepared prepare(const at::Tensor& x, const at::Tensor& index, const std::optional<at::Tensor>& cu_seqlens,
                 int64_t row_len, int64_t num_seqs, const std::optional<at::Tensor>& pos,
                 const std::optional<at::Tensor>& bias) {
  // A stride on a size-1 dim is meaningless (torch calls such a tensor contiguous whatever it is): with
  // D == 1 only element 0 of each row is read.
  TORCH_CHECK(x.dim() == 3 && (x.stride(2) == 1 || x.size(2) == 1), "x: expected [B, N, D] with contiguous features");
  TORCH_CHECK(index.dim() == 1 && index.is_contiguous(), "index: expected a contiguous 1-D tensor");
  TORCH_CHECK(x.size(1) > 0 || index.numel() == 0, "x: the token axis (dim 1) is empty, but index has ",
              index.numel(), " indices into it");
  TORCH_CHECK(index.scalar_type() == at::kInt || index.scalar_type() == at::kLong, "index: int32 or int64");
  const int64_t D = x.size(2);
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (cu_seqlens.has_value()) {
    TORCH_CHECK(cu_seqlens->scalar_type() == at::kLong && cu_seqlens->is_contiguous() &&
                    cu_seqlens->numel() == num_seqs + 1, "cu_seqlens: contiguous int64 [num_seqs + 1]");
  } else {
    TORCH_CHECK(row_len > 0 && row_len * num_seqs == index.numel(), "index: row_len * num_seqs != numel");
  }
  if (pos.has_value())
    TORCH_CHECK(pos->scalar_type() == acc_type && pos->is_contiguous() && pos->numel() == x.size(1) * D,
                "pos: contiguous [N, D] in the accumulation dtype");
  if (bias.has_value())
    TORCH_CHECK(bias->scalar_type() == acc_type && bias->is_contiguous() && bias->numel() == num_seqs * D,
                "bias: contiguous [B, D] in the accumulation dtype");
  TORCH_CHECK(x.size(0) == 1 || x.size(0) == num_seqs, "x: batch must be 1 or the number of sequences");
  Segments seg{cu_seqlens.has_value() ? cu_seqlens->const_data_ptr<int64_t>() : nullptr, row_len, num_seqs};
  RowInputs in{D, x.stride(0), x.stride(1), x.size(0) != 1};
  return {seg, in, index.numel()};
}

template <typename Fn>
void dispatch_index(const at::Tensor& index, Fn&& fn) {
  if (index.scalar_type() == at::kInt) {
    fn(index.const_data_ptr<int32_t>());
  } else {
    fn(index.const_data_ptr<int64_t>());
  }
}

template <typename acc_t>
const acc_t* opt_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<acc_t>() : nullptr;
}

at::Tensor gather_tokens_fwd_cpu(const at::Tensor& x, const at::Tensor& index,
                                 const std::optional<at::Tensor>& cu_seqlens, int64_t row_len, int64_t num_seqs,
                                 const std::optional<at::Tensor>& pos, const std::optional<at::Tensor>& bias,
                                 bool normalize, double eps) {
  const Prepared p = prepare(x, index, cu_seqlens, row_len, num_seqs, pos, bias);
  at::Tensor out = iwm::empty_output({p.T, p.in.D}, x.scalar_type());
  if (p.T == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "gather_tokens_fwd", [&] {
    using acc_t = acc_of<scalar_t>;
    dispatch_index(index, [&](auto* idx) {
      forward_impl<scalar_t>(x, idx, p.seg, p.T, p.in, opt_ptr<acc_t>(pos), opt_ptr<acc_t>(bias), normalize, eps,
                             out.mutable_data_ptr<scalar_t>());
    });
  });
  return out;
}

std::vector<at::Tensor> gather_tokens_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                              const at::Tensor& index, const std::optional<at::Tensor>& cu_seqlens,
                                              int64_t row_len, int64_t num_seqs, const std::optional<at::Tensor>& pos,
                                              const std::optional<at::Tensor>& bias, bool normalize, double eps,
                                              bool need_x, bool need_pos, bool need_bias) {
  const Prepared p = prepare(x, index, cu_seqlens, row_len, num_seqs, pos, bias);
  TORCH_CHECK(grad_out.is_contiguous() && grad_out.scalar_type() == x.scalar_type() &&
                  grad_out.numel() == p.T * p.in.D, "grad_out: contiguous [T, D] in x's dtype");
  std::vector<at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "gather_tokens_bwd", [&] {
    using acc_t = acc_of<scalar_t>;
    dispatch_index(index, [&](auto* idx) {
      result = backward_impl<scalar_t>(grad_out, x, idx, p.seg, p.T, p.in, opt_ptr<acc_t>(pos), opt_ptr<acc_t>(bias),
                                       normalize, eps, need_x, need_pos, need_bias);
    });
  });
  return result;
}

std::vector<int64_t> cpu_output_pool_stats() { return iwm::OutputPool::get().stats(); }

int64_t cpu_output_pool_set_limit(int64_t bytes) { return iwm::OutputPool::get().set_limit(bytes); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(iwm_native, m) {
  m.def("gather_tokens_fwd(Tensor x, Tensor index, Tensor? cu_seqlens, int row_len, int num_seqs, Tensor? pos, "
        "Tensor? bias, bool normalize, float eps) -> Tensor");
  m.def("gather_tokens_bwd(Tensor grad_out, Tensor x, Tensor index, Tensor? cu_seqlens, int row_len, int num_seqs, "
        "Tensor? pos, Tensor? bias, bool normalize, float eps, bool need_x, bool need_pos, bool need_bias) -> Tensor[]");
  // [limit bytes, cached free bytes, hits, misses] of the CPU output pool, and its limit (returns the old one).
  m.def("cpu_output_pool_stats() -> int[]", &cpu_output_pool_stats);
  m.def("cpu_output_pool_set_limit(int bytes) -> int", &cpu_output_pool_set_limit);
}

TORCH_LIBRARY_IMPL(iwm_native, CPU, m) {
  m.impl("gather_tokens_fwd", &gather_tokens_fwd_cpu);
  m.impl("gather_tokens_bwd", &gather_tokens_bwd_cpu);
}
