// Photometric augmentation on the CPU: every view of every image in one read of the image.
//
// Semantics: iwm_kernels/photometric/reference.py (torchvision's formulas), parameters [V, B, 8] in its
// column layout. Work, all through at::parallel_for:
//   1. per image: each view's mean gray value after brightness (contrast needs it), accumulated in double;
//   2. per image row: convert the row to float once, then for each view run the chain on a cache-resident
//      copy (one simple loop per transform, so the compiler vectorises them) and write the normalised row,
//      or, for a blurred (view, image) pair, its pre-blur row into an fp32 scratch slot;
//   3. blurred pairs only: a horizontal pass (reflect-padded row, contiguous taps) into a second scratch,
//      then a vertical pass that finishes with solarise and normalisation.
// The arithmetic mirrors the reference operation by operation, so fp32 results agree to a few ulps.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

// The per-pixel loops are written branch-free so that they vectorise. GCC if-converts a select only when
// it may evaluate both sides, i.e. without trapping-math; dropping it changes no result (no fast-math).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

// The heavy per-row loops are also built for AVX2 and picked at load time (GCC function multi-versioning).
// Not FMA: a fused multiply-add would round differently from the reference's separate operations.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define IWM_MULTIVERSION __attribute__((target_clones("avx2", "default")))
#else
#define IWM_MULTIVERSION
#endif

namespace {

constexpr int64_t kNumParams = 8;  // brightness, contrast, saturation, hue, grayscale, sigma, solarise, threshold

// fp32 reciprocals, rounded once from double exactly as Python's 1.0 / 255.0 and 1.0 / 6.0 reach torch.
constexpr float kInv255 = static_cast<float>(1.0 / 255.0);
constexpr float kInv6 = static_cast<float>(1.0 / 6.0);

inline float maxf(float a, float b) { return a > b ? a : b; }
inline float minf(float a, float b) { return a < b ? a : b; }
inline float clamp01(float x) { return minf(maxf(x, 0.0f), 1.0f); }  // maps NaN to 0: see kNaN
inline float gray_of(float r, float g, float b) { return 0.299f * r + 0.587f * g + 0.114f * b; }

template <typename In>
inline void load_plane_row(const In* __restrict src, float* __restrict dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <>
inline void load_plane_row<uint8_t>(const uint8_t* __restrict src, float* __restrict dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]) * kInv255;
}

// NaN semantics are torch's (the reference's, torchvision's): clamp, min and max pass a NaN on, so a NaN
// after brightness (a NaN pixel, or 0 * inf) makes the image's contrast mean NaN, and (1 - f) * mean then
// makes every pixel of the image NaN, whatever the other parameters: corrupt input stays visible instead of
// being clamped to 0. The per-pixel loops keep the NaN-dropping clamp01 above (one maxps/minps: a
// NaN-propagating select form stops them vectorising, 3x slower); instead the mean pass flags NaNs and
// chain_row writes such an image as NaN outright, which is exactly what the reference computes.
const float kNaN = std::numeric_limits<float>::quiet_NaN();

struct View {
  float bright, contrast, sat, hue, gray, sigma, sol, thr;
  explicit View(const float* p)
      : bright(p[0]), contrast(p[1]), sat(p[2]), hue(p[3]), gray(p[4]), sigma(p[5]), sol(p[6]), thr(p[7]) {}
};

IWM_MULTIVERSION void hue_row(float* __restrict r, float* __restrict g, float* __restrict b, int64_t n, float shift) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float rv = r[i], gv = g[i], bv = b[i];
    const float maxc = maxf(maxf(rv, gv), bv);
    const float minc = minf(minf(rv, gv), bv);
    const bool eqc = maxc == minc;
    const float cr = maxc - minc;
    const float s = cr / (eqc ? 1.0f : maxc);
    const float d = eqc ? 1.0f : cr;
    const float rc = (maxc - rv) / d, gc = (maxc - gv) / d, bc = (maxc - bv) / d;
    float h = maxc == rv ? bc - gc : (maxc == gv ? 2.0f + rc - bc : 4.0f + gc - rc);
    h = h * kInv6 + 1.0f;
    h = h >= 1.0f ? h - 1.0f : h;  // fmod(h, 1) for h in [5/6, 11/6]
    h = h + shift;
    h = h < 0.0f ? h + 1.0f : (h >= 1.0f ? h - 1.0f : h);  // (h + shift) mod 1
    const float h6 = h * 6.0f;
    const float floor6 = static_cast<float>(static_cast<int32_t>(h6));  // h6 >= 0: truncation is floor
    const float f = h6 - floor6;
    const float sector = floor6 >= 6.0f ? floor6 - 6.0f : floor6;
    const float p = clamp01(maxc * (1.0f - s));
    const float q = clamp01(maxc * (1.0f - s * f));
    const float t = clamp01(maxc * (1.0f - s * (1.0f - f)));
    // (R, G, B) per sector 0..5: (v,t,p) (q,v,p) (p,v,t) (p,q,v) (t,p,v) (v,p,q); flat selects vectorise.
    const bool s0 = sector == 0.0f, s1 = sector == 1.0f, s2 = sector == 2.0f, s3 = sector == 3.0f,
               s4 = sector == 4.0f, s5 = sector == 5.0f;
    float ro = p, go = p, bo = maxc;
    ro = s4 ? t : ro;
    ro = s1 ? q : ro;
    ro = (s0 | s5) ? maxc : ro;
    go = s3 ? q : go;
    go = (s1 | s2) ? maxc : go;
    go = s0 ? t : go;
    bo = s5 ? q : bo;
    bo = s2 ? t : bo;
    bo = (s0 | s1) ? p : bo;
    r[i] = ro;
    g[i] = go;
    b[i] = bo;
  }
}

// brightness -> contrast -> saturation -> hue -> grayscale, in place on one row of each channel.
IWM_MULTIVERSION void chain_row(float* __restrict r, float* __restrict g, float* __restrict b, int64_t n, const View& p,
               float gray_mean) {
  if (gray_mean != gray_mean) {  // a NaN after brightness somewhere in the image (see kNaN)
    std::fill(r, r + n, kNaN);
    std::fill(g, g + n, kNaN);
    std::fill(b, b + n, kNaN);
    return;
  }
  const float fb = p.bright, fc = p.contrast, kc = (1.0f - p.contrast) * gray_mean, fs = p.sat,
              ks = 1.0f - p.sat;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float x0 = clamp01(fb * r[i]), x1 = clamp01(fb * g[i]), x2 = clamp01(fb * b[i]);
    x0 = clamp01(fc * x0 + kc);
    x1 = clamp01(fc * x1 + kc);
    x2 = clamp01(fc * x2 + kc);
    const float gk = ks * gray_of(x0, x1, x2);
    r[i] = clamp01(fs * x0 + gk);
    g[i] = clamp01(fs * x1 + gk);
    b[i] = clamp01(fs * x2 + gk);
  }
  if (p.hue != 0.0f) hue_row(r, g, b, n, p.hue);
  if (p.gray != 0.0f) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float y = gray_of(r[i], g[i], b[i]);
      r[i] = y;
      g[i] = y;
      b[i] = y;
    }
  }
}

// solarise -> normalise -> store in the output dtype.
template <typename Out>
void finish_row(const float* __restrict x, Out* __restrict out, int64_t n, bool solarize, float thr, float mean,
                float stdv) {
  if (solarize) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float v = x[i] >= thr ? 1.0f - x[i] : x[i];
      out[i] = static_cast<Out>((v - mean) / stdv);
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<Out>((x[i] - mean) / stdv);
  }
}

inline int64_t reflect(int64_t i, int64_t n) {
  if (n == 1) return 0;
  const int64_t period = 2 * (n - 1);
  int64_t m = i % period;
  if (m < 0) m += period;
  return m > n - 1 ? period - m : m;
}

struct Problem {
  int64_t V, B, H, W, nb, K;
  const float* params;
  const int32_t* slot_of;
  const float* taps;
  float mean[3], stdv[3];
};

template <typename In, typename Out>
void run(const Problem& pr, const In* img, Out* out) {
  const int64_t V = pr.V, B = pr.B, H = pr.H, W = pr.W, HW = H * W;
  // 1. mean gray value of each (view, image) after brightness.
  std::vector<float> gray_mean(V * B);
  at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> row(3 * W);
    for (int64_t b = lo; b < hi; ++b) {
      const In* base = img + b * 3 * HW;
      double acc[2] = {0.0, 0.0};
      bool has_nan[2] = {false, false};
      for (int64_t y = 0; y < H; ++y) {
        for (int c = 0; c < 3; ++c) load_plane_row(base + c * HW + y * W, row.data() + c * W, W);
        for (int64_t v = 0; v < V; ++v) {
          const float f = pr.params[(v * B + b) * kNumParams + 0];
          float s = 0.0f, nans = 0.0f;
#pragma omp simd reduction(+ : s, nans)
          for (int64_t x = 0; x < W; ++x) {
            const float r = f * row[x], g = f * row[W + x], bl = f * row[2 * W + x];
            s += gray_of(clamp01(r), clamp01(g), clamp01(bl));
            nans += ((r != r) | (g != g) | (bl != bl)) ? 1.0f : 0.0f;
          }
          acc[v] += s;
          has_nan[v] = has_nan[v] || nans > 0.0f;
        }
      }
      for (int64_t v = 0; v < V; ++v)
        gray_mean[v * B + b] = has_nan[v] ? kNaN : static_cast<float>(acc[v] / static_cast<double>(HW));
    }
  });

  at::Tensor scratch, tmp;
  float* pre = nullptr;
  if (pr.nb > 0) {
    scratch = at::empty({pr.nb * 3 * HW}, at::kFloat);
    tmp = at::empty({pr.nb * 3 * HW}, at::kFloat);
    pre = scratch.data_ptr<float>();
  }

  // 2. one read of each image row, every view's chain, one write per view (or the pre-blur scratch).
  const int64_t grain = std::max<int64_t>(1, 2048 / std::max<int64_t>(W, 1));
  at::parallel_for(0, B * H, grain, [&](int64_t lo, int64_t hi) {
    std::vector<float> src(3 * W), work(3 * W);
    for (int64_t idx = lo; idx < hi; ++idx) {
      const int64_t b = idx / H, y = idx % H;
      for (int c = 0; c < 3; ++c) load_plane_row(img + (b * 3 + c) * HW + y * W, src.data() + c * W, W);
      for (int64_t v = 0; v < V; ++v) {
        const int64_t pair = v * B + b;
        const View p(pr.params + pair * kNumParams);
        std::copy(src.begin(), src.end(), work.begin());
        chain_row(work.data(), work.data() + W, work.data() + 2 * W, W, p, gray_mean[pair]);
        const int32_t slot = pr.slot_of[pair];
        for (int c = 0; c < 3; ++c) {
          if (slot >= 0) {
            std::copy(work.data() + c * W, work.data() + (c + 1) * W, pre + (slot * 3 + c) * HW + y * W);
          } else {
            finish_row(work.data() + c * W, out + (pair * 3 + c) * HW + y * W, W, p.sol != 0.0f, p.thr,
                       pr.mean[c], pr.stdv[c]);
          }
        }
      }
    }
  });
  if (pr.nb == 0) return;

  // 3. separable blur of the parked pairs: rows (pre -> tmp), then columns + solarise + normalise (-> out).
  const int64_t K = pr.K, R = (K - 1) / 2;
  float* mid = tmp.data_ptr<float>();
  const int64_t rows = pr.nb * 3 * H;
  at::parallel_for(0, rows, grain, [&](int64_t lo, int64_t hi) {
    std::vector<float> padded(W + 2 * R);
    for (int64_t r = lo; r < hi; ++r) {
      const float* w = pr.taps + (r / (3 * H)) * K;
      const float* srow = pre + r * W;
      for (int64_t x = 0; x < W + 2 * R; ++x) padded[x] = srow[reflect(x - R, W)];
      float* drow = mid + r * W;
      std::fill(drow, drow + W, 0.0f);
      for (int64_t k = 0; k < K; ++k) {
        const float wk = w[k];
        const float* sp = padded.data() + k;
#pragma omp simd
        for (int64_t x = 0; x < W; ++x) drow[x] += wk * sp[x];
      }
    }
  });
  std::vector<int64_t> slot_pair(pr.nb);
  for (int64_t pair = 0; pair < V * B; ++pair)
    if (pr.slot_of[pair] >= 0) slot_pair[pr.slot_of[pair]] = pair;
  at::parallel_for(0, rows, grain, [&](int64_t lo, int64_t hi) {
    std::vector<float> acc(W);
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t slot = r / (3 * H), c = (r / H) % 3, y = r % H;
      const float* w = pr.taps + slot * K;
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t k = 0; k < K; ++k) {
        const float wk = w[k];
        const float* sp = mid + ((slot * 3 + c) * H + reflect(y + k - R, H)) * W;
#pragma omp simd
        for (int64_t x = 0; x < W; ++x) acc[x] += wk * sp[x];
      }
      const int64_t pair = slot_pair[slot];
      const View p(pr.params + pair * kNumParams);
      finish_row(acc.data(), out + (pair * 3 + c) * HW + y * W, W, p.sol != 0.0f, p.thr, pr.mean[c], pr.stdv[c]);
    }
  });
}

template <typename In>
void dispatch_out(const Problem& pr, const at::Tensor& images, at::Tensor& out) {
  const In* img = images.const_data_ptr<In>();
  switch (out.scalar_type()) {
    case at::kFloat: run(pr, img, out.data_ptr<float>()); break;
    case at::kBFloat16: run(pr, img, out.data_ptr<c10::BFloat16>()); break;
    case at::kHalf: run(pr, img, out.data_ptr<c10::Half>()); break;
    default: TORCH_CHECK(false, "out_dtype: unsupported ", out.scalar_type());
  }
}

// Inputs were validated in Python (iwm_kernels._validate); the checks here guard the raw op.
at::Tensor photometric_cpu(const at::Tensor& images, const at::Tensor& params, const at::Tensor& slot_of,
                           const at::Tensor& taps, at::ArrayRef<double> mean, at::ArrayRef<double> stdv,
                           at::ScalarType out_dtype) {
  TORCH_CHECK(images.dim() == 4 && images.size(1) == 3 && images.is_contiguous(), "images: contiguous [B, 3, H, W]");
  TORCH_CHECK(params.dim() == 3 && params.size(1) == images.size(0) && params.size(2) == kNumParams &&
              params.scalar_type() == at::kFloat && params.is_contiguous(), "params: contiguous float32 [V, B, 8]");
  TORCH_CHECK(slot_of.scalar_type() == at::kInt && slot_of.numel() == params.size(0) * params.size(1),
              "slot_of: int32 [V * B]");
  TORCH_CHECK(taps.scalar_type() == at::kFloat && taps.dim() == 2 && taps.is_contiguous(), "taps: float32 [slots, K]");
  TORCH_CHECK(mean.size() == 3 && stdv.size() == 3, "mean, std: 3 values each");
  Problem pr{};
  pr.V = params.size(0);
  pr.B = images.size(0);
  pr.H = images.size(2);
  pr.W = images.size(3);
  pr.nb = taps.size(0);
  pr.K = taps.size(1);
  TORCH_CHECK(pr.V <= 2, "params: at most 2 views");
  TORCH_CHECK(pr.K % 2 == 1, "taps: odd window");
  pr.params = params.const_data_ptr<float>();
  pr.slot_of = slot_of.const_data_ptr<int32_t>();
  pr.taps = taps.const_data_ptr<float>();
  for (int c = 0; c < 3; ++c) {
    pr.mean[c] = static_cast<float>(mean[c]);
    pr.stdv[c] = static_cast<float>(stdv[c]);
  }
  for (int64_t i = 0; i < slot_of.numel(); ++i) {
    const int32_t s = pr.slot_of[i];
    TORCH_CHECK(s >= -1 && s < pr.nb, "slot_of: slot ", s, " out of range for ", pr.nb, " slots");
  }
  at::Tensor out = at::empty({pr.V, pr.B, 3, pr.H, pr.W}, images.options().dtype(out_dtype));
  if (out.numel() == 0) return out;
  switch (images.scalar_type()) {
    case at::kByte: dispatch_out<uint8_t>(pr, images, out); break;
    case at::kFloat: dispatch_out<float>(pr, images, out); break;
    case at::kBFloat16: dispatch_out<c10::BFloat16>(pr, images, out); break;
    case at::kHalf: dispatch_out<c10::Half>(pr, images, out); break;
    default: TORCH_CHECK(false, "images: unsupported dtype ", images.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(iwm_native, m) {
  m.def("photometric(Tensor images, Tensor params, Tensor slot_of, Tensor taps, float[] mean, float[] std, "
        "ScalarType out_dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(iwm_native, CPU, m) {
  m.impl("photometric", &photometric_cpu);
}
