// DyT, Dynamic Tanh (Zhu, Chen, He, LeCun, Liu, "Transformers without Normalization",
// CVPR 2025, arXiv 2503.10622): a drop-in replacement for LayerNorm with no reduction.
//
//   forward   u = tanh(alpha * x),  y = weight[c] * u + bias[c]
//   backward  s = 1 - u^2
//             dx = dy * s * weight[c] * alpha
//             dalpha = sum_all dy * weight[c] * s * x    (a full reduction)
//             dweight[c] = sum dy * u,  dbias[c] = sum dy  (over everything but axis c)
//   shapes    x, y, dy, dx: any rank >= 1 with C channels on channel_axis (default -1,
//             tokens x features and channels-last images; 1 for N, C, ... tensors);
//             alpha: scalar; weight, bias: [C]; cache: tanh(alpha x) [numel] or empty
//   derivation: docs/derivations/dyt.md
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "core/config.hpp"
#include "core/elementwise_kernels.hpp"

NORMKIT_CODE_BEGIN

namespace normkit {

namespace detail {

/// DyT's parameter gradients from its per-channel sums (S: Acc, or the wider type where
/// sums were redone there): dweight = dscale, dbias = dshift (null: none), and the return
/// value dalpha = sum_c weight[c] * dpc[c] (weight null: 1) in the wider type, as four
/// partial sums over the channels c = 0, 1, 2, 3 (mod 4), added (s0 + s1) + (s2 + s3): an
/// order fixed by C alone, and no chain of C dependent adds. No values (`any` false), no
/// terms: 0 even where a weight is inf or NaN, as the elementwise sum. Never inlined: one
/// compiled copy serves every device, so that a NaN's payload does not depend on which
/// copy's order of operands its adds got.
template <class Acc, class T, class S>
EIGEN_DONT_INLINE T dyt_param_grads(Index C, bool any, const T* w, const S* dpc, const S* dscale,
                                    const S* dshift, T* dweight, T* dbias) {
  using Wd = wide_t<Acc>;
  auto term = [&](Index c) {
    const Wd q = static_cast<Wd>(dpc[c]);
    return w ? q * static_cast<Wd>(static_cast<Acc>(w[c])) : q;
  };
  Wd d0 = 0, d1 = 0, d2 = 0, d3 = 0;
  Index c = 0;
  for (; c + 4 <= C; c += 4) {
    d0 += term(c);
    d1 += term(c + 1);
    d2 += term(c + 2);
    d3 += term(c + 3);
  }
  if (c < C) d0 += term(c++);
  if (c < C) d1 += term(c++);
  if (c < C) d2 += term(c++);
  for (Index j = 0; j < C && dweight; ++j) dweight[j] = static_cast<T>(static_cast<Acc>(dscale[j]));
  for (Index j = 0; j < C && dbias; ++j) dbias[j] = static_cast<T>(static_cast<Acc>(dshift[j]));
  return any ? static_cast<T>(static_cast<Acc>((d0 + d1) + (d2 + d3))) : T(0);
}

}  // namespace detail

/// Where a DyT sits in a LLaMA-style model, for dyt_alpha_init_llm().
enum class DyTPosition {
  Attention,  // the DyT before the attention of a block
  Other,      // the DyT before the FFN of a block, and the final one before the output
};

/// The initial alpha of the DyT paper for LLaMA-style models, by model width (the
/// hidden size) and position. The paper (arXiv 2503.10622, Section 7 and Appendix)
/// finds that LLMs need a smaller alpha the wider they are, and a larger one in the
/// attention blocks; depth barely matters. Tabulated (attention / other):
///   Table 11, by width:  1024: 1.0 / 1.0   2048: 1.0 / 0.5   4096: 0.8 / 0.2
///                        8192: 0.2 / 0.05
///   Table 10, LLaMA:     7B (width 4096): 0.8 / 0.2   13B (5120): 0.6 / 0.15
///                        34B and 70B (8192): 0.2 / 0.05
/// At a tabulated width the table's value is returned exactly. Between two tabulated
/// widths, log(alpha) is interpolated linearly in log(width) (a geometric mean, so it
/// stays between its neighbours and decreases with the width as the tables do).
/// Below 1024 and above 8192 the nearest end of the table is returned: the paper gives
/// no trend there, so the helper does not invent one. Non-LLM models use
/// DyTOptions's default, 0.5. Throws normkit::Error for width <= 0.
inline double dyt_alpha_init_llm(Index width, DyTPosition position) {
  struct Row {
    Index width;
    double attention, other;
  };
  static constexpr Row kTable[] = {
      {1024, 1.0, 1.0}, {2048, 1.0, 0.5}, {4096, 0.8, 0.2}, {5120, 0.6, 0.15}, {8192, 0.2, 0.05}};
  if (width <= 0) detail::fail("dyt_alpha_init_llm: width must be > 0, got ", width);
  const auto pick = [&](const Row& r) {
    return position == DyTPosition::Attention ? r.attention : r.other;
  };
  constexpr std::size_t n = sizeof(kTable) / sizeof(kTable[0]);
  if (width <= kTable[0].width) return pick(kTable[0]);
  if (width >= kTable[n - 1].width) return pick(kTable[n - 1]);
  std::size_t i = 1;
  while (kTable[i].width < width) ++i;
  if (kTable[i].width == width) return pick(kTable[i]);
  const Row& lo = kTable[i - 1];
  const Row& hi = kTable[i];
  const double t = std::log(double(width) / double(lo.width)) /
                   std::log(double(hi.width) / double(lo.width));
  return std::exp((1 - t) * std::log(pick(lo)) + t * std::log(pick(hi)));
}

/// Options of DyT, set fluently: DyTOptions().alpha_init(0.8).bias(false).
class DyTOptions {
 public:
  DyTOptions& alpha_init(double v) { alpha_init_ = v; return *this; }
  DyTOptions& elementwise_affine(bool v) { affine_ = v; return *this; }
  /// The same as elementwise_affine (BatchNorm's name for it, and the "affine").
  DyTOptions& affine(bool v) { return elementwise_affine(v); }
  DyTOptions& bias(bool v) { bias_ = v; return *this; }
  DyTOptions& channel_axis(int v) { axis_ = v; return *this; }
  double alpha_init() const { return alpha_init_; }
  bool elementwise_affine() const { return affine_; }
  bool affine() const { return affine_; }
  bool bias() const { return bias_; }
  int channel_axis() const { return axis_; }

 private:
  double alpha_init_ = 0.5;  // the paper's default for non-LLM models
  bool affine_ = true;       // learnable weight (ones) and, with bias(), bias (zeros)
  bool bias_ = true;         // false: the official LLaMA variant (weight, no bias)
  int axis_ = -1;            // negative counts from the end, as in PyTorch
};

/// Dynamic Tanh. Computes in float for float/half/bfloat16 storage, in double for
/// double, with normkit's accurate vectorized tanh (at most 2 ulp). Any rank, RowMajor
/// or ColMajor. forward() is const and safe to call from several threads at once.
template <class T>
class DyT {
 public:
  using Options = DyTOptions;
  using Acc = detail::acc_t<T>;

  /// What backward needs from a training forward. Small inputs keep tanh(alpha x)
  /// (Acc, x's memory order), which in cache is cheaper than recomputing it; large ones
  /// keep nothing, because one more stream through memory costs more than the tanh
  /// (see kCacheTanhBytes). Either way backward gives the same bits.
  struct Cache {
    Eigen::Tensor<Acc, 1> tanh;  // [numel] or empty
    Acc alpha = 0;               // the alpha of that forward: backward differentiates it
    std::vector<Index> x_dims;   // shape of the x it was computed from; empty: not filled
    bool empty() const { return x_dims.empty(); }
  };

  /// Parameter gradients. backward() overwrites them (it does not accumulate).
  struct Grads {
    T alpha = T(0);
    Eigen::Tensor<T, 1> weight;  // [C], empty without elementwise_affine
    Eigen::Tensor<T, 1> bias;    // [C], empty without a bias
    detail::Workspace<Acc> work;
  };

  /// Inputs up to this size keep tanh in the cache. Measured on a 2-core EPYC (AVX2):
  /// at 128x768 (384 KiB) caching makes backward ~2x faster; at 4096x768 (12 MiB) and
  /// up the forward's extra write costs more than backward saves. On a 2-vCPU Xeon
  /// (AVX-512), 128x768 backward: 19-20 us cached, 24-27 recomputed.
  static constexpr std::size_t kCacheTanhBytes = std::size_t(4) << 20;

  explicit DyT(Index channels, const Options& options = Options())
      : C_(channels), opt_(options) {
    if (channels < 0) detail::fail("DyT: channels must be >= 0, got ", channels);
    if (!std::isfinite(options.alpha_init()))
      detail::fail("DyT: alpha_init must be finite, got ", options.alpha_init());
    if (opt_.elementwise_affine()) {
      weight_.resize(C_);
      if (opt_.bias()) bias_.resize(C_);
    }
    reset_parameters();
  }

  /// alpha back to alpha_init, weight 1, bias 0 (as the official code initializes them).
  void reset_parameters() {
    alpha_ = static_cast<T>(opt_.alpha_init());
    weight_.setConstant(T(1));
    bias_.setConstant(T(0));
  }

  /// Inference: y = DyT(x). y may be x itself (in place).
  template <class X, class Y, detail::enable_if_tensors_t<X, Y> = 0>
  void forward(const X& x, Y&& y) const {
    forward_impl(Eigen::DefaultDevice(), detail::dense(x), y, nullptr);
  }
  /// Training: also fills `cache` for backward.
  template <class X, class Y, detail::enable_if_tensors_t<X, Y> = 0>
  void forward(const X& x, Y&& y, Cache& cache) const {
    forward_impl(Eigen::DefaultDevice(), detail::dense(x), y, &cache);
  }
  template <class Device, class X, class Y, detail::enable_if_device_tensors_t<Device, X, Y> = 0>
  void forward(const Device& dev, const X& x, Y&& y) const {
    forward_impl(dev, detail::dense(x, dev), y, nullptr);
  }
  template <class Device, class X, class Y, detail::enable_if_device_tensors_t<Device, X, Y> = 0>
  void forward(const Device& dev, const X& x, Y&& y, Cache& cache) const {
    forward_impl(dev, detail::dense(x, dev), y, &cache);
  }

  /// dx (overwritten) and the parameter gradients (overwritten) from the x and cache of
  /// a training forward, with the alpha of that forward and the current weight. dx may
  /// be x or dy itself.
  template <class X, class DY, class DX, detail::enable_if_tensors_t<X, DY, DX> = 0>
  void backward(const X& x, const DY& dy, const Cache& cache, DX&& dx, Grads& grads) const {
    backward_impl(Eigen::DefaultDevice(), detail::dense(x), detail::dense(dy), cache, dx, grads);
  }
  template <class Device, class X, class DY, class DX,
            detail::enable_if_device_tensors_t<Device, X, DY, DX> = 0>
  void backward(const Device& dev, const X& x, const DY& dy, const Cache& cache, DX&& dx,
                Grads& grads) const {
    backward_impl(dev, detail::dense(x, dev), detail::dense(dy, dev), cache, dx, grads);
  }

  T& alpha() { return alpha_; }
  const T& alpha() const { return alpha_; }
  /// [C], ones; empty without elementwise_affine.
  Eigen::Tensor<T, 1>& weight() { return weight_; }
  const Eigen::Tensor<T, 1>& weight() const { return weight_; }
  /// [C], zeros; empty without elementwise_affine or with bias(false).
  Eigen::Tensor<T, 1>& bias() { return bias_; }
  const Eigen::Tensor<T, 1>& bias() const { return bias_; }
  Index channels() const { return C_; }
  bool elementwise_affine() const { return opt_.elementwise_affine(); }
  bool has_bias() const { return opt_.elementwise_affine() && opt_.bias(); }
  int channel_axis() const { return opt_.channel_axis(); }

 private:
  /// x's dims and its channel axis, after checking them.
  template <class X>
  std::pair<std::vector<Index>, std::size_t> check_x(const std::string& fn, const X& x) const {
    std::vector<Index> dims = detail::dims_of(x);
    const int rank = static_cast<int>(dims.size());
    const int axis = opt_.channel_axis() < 0 ? opt_.channel_axis() + rank : opt_.channel_axis();
    if (axis < 0 || axis >= rank)
      detail::fail(fn, ": channel_axis ", opt_.channel_axis(), " is out of range for x of rank ",
                   rank, " (x is ", detail::shape_str(dims), ")");
    const Index got = dims[static_cast<std::size_t>(axis)];
    if (got != C_) {
      if (axis == rank - 1)
        detail::fail(fn, ": x has ", got, " features, expected ", C_, " (x is ",
                     detail::shape_str(dims), ")");
      detail::fail(fn, ": x has ", got, " channels on axis ", axis, ", expected ", C_, " (x is ",
                   detail::shape_str(dims), ")");
    }
    return {dims, static_cast<std::size_t>(axis)};
  }

  template <class Dev, class X, class Y>
  void forward_impl(const Dev& dev, const X& x, Y& y, Cache* cache) const {
    static_assert(detail::traits_of<Y>::writable, "normkit: the output y must be writable");
    detail::check_same_type<T, X, Y>();
    const std::string fn = "DyT::forward";
    const auto [dims, axis] = check_x(fn, x);
    detail::check_output(fn, "y", y, dims);
    if (detail::partial_overlap(x.data(), y.data(), x.size()))
      detail::fail(fn, ": y partially overlaps x (only y == x, in place, is supported)");
    detail::fit_output(y, dims);

    const Acc alpha = static_cast<Acc>(alpha_);
    Acc* u_out = nullptr;
    if (cache) {
      const bool keep = static_cast<std::size_t>(x.size()) * sizeof(T) <= kCacheTanhBytes;
      cache->tanh.resize(keep ? x.size() : 0);
      cache->alpha = alpha;
      cache->x_dims = dims;
      if (keep) u_out = cache->tanh.data();
    }
    const detail::Block3 v = detail::block3(dims, detail::traits_of<X>::row_major, axis, axis + 1);
    detail::channel_map_forward<Dev, Acc>(dev, v, x.data(), y.data(), u_out,
                                          detail::TanhMap<Acc>(alpha),
                                          elementwise_affine() ? weight_.data() : nullptr,
                                          has_bias() ? bias_.data() : nullptr,
                                          detail::simd::stream_output<T>(x.size(), 2));
  }

  template <class Dev, class X, class DY, class DX>
  void backward_impl(const Dev& dev, const X& x, const DY& dy, const Cache& cache, DX& dx,
                     Grads& grads) const {
    static_assert(detail::traits_of<DX>::writable, "normkit: the output dx must be writable");
    detail::check_same_type<T, X, DY>();
    detail::check_same_type<T, X, DX>();
    const std::string fn = "DyT::backward";
    const auto [dims, axis] = check_x(fn, x);
    detail::check_like(fn, "dy", detail::dims_of(dy), dims);
    detail::check_output(fn, "dx", dx, dims);
    if (cache.empty())
      detail::fail(fn, ": cache is empty, expected the cache filled by forward(x, y, cache)");
    if (cache.x_dims != dims)
      detail::fail(fn, ": cache is from x of shape ", detail::shape_str(cache.x_dims),
                   ", but x is ", detail::shape_str(dims));
    if (cache.tanh.size() != 0 && cache.tanh.size() != x.size())
      detail::fail(fn, ": cache holds ", cache.tanh.size(), " tanh values, expected ", x.size(),
                   " or none");
    if (detail::partial_overlap(x.data(), dx.data(), x.size()))
      detail::fail(fn, ": dx partially overlaps x (only dx == x or dx == dy is supported)");
    if (detail::partial_overlap(dy.data(), dx.data(), x.size()))
      detail::fail(fn, ": dx partially overlaps dy (only dx == x or dx == dy is supported)");
    detail::fit_output(dx, dims);

    const bool affine = elementwise_affine(), with_bias = has_bias();
    grads.weight.resize(affine ? C_ : 0);
    grads.bias.resize(with_bias ? C_ : 0);
    // dx = dy * s * k[c], k = weight * alpha: one multiply per element, not two. A
    // channel whose k leaves Acc's range although weight and alpha do not (weight 3e38
    // and alpha 10 in float, or a subnormal product) has its dx computed apart, in the
    // wider type; the vector pass writes 0 there, and the values go in afterwards (so
    // dx may still alias x or dy).
    using Wd = detail::wide_t<Acc>;
    const Acc alpha = cache.alpha;
    detail::AlignedVector<Acc> k(static_cast<std::size_t>(C_));
    std::vector<Index> apart;
    // First in Acc, in vectors (scaled_params); only where some channel leaves Acc's
    // range, every channel again in the wider type.
    const bool plain = detail::scaled_params<Acc>(affine ? weight_.data() : nullptr, alpha, C_, k.data());
    for (Index c = 0; c < C_ && !plain; ++c) {
      const Wd kw = (affine ? static_cast<Wd>(static_cast<Acc>(weight_(c))) : Wd(1)) * static_cast<Wd>(alpha);
      const Acc kc = static_cast<Acc>(kw);
      const bool out = std::isfinite(kw) && (!std::isfinite(kc) || (kw != 0 && std::fabs(kc) < std::numeric_limits<Acc>::min()));
      k[static_cast<std::size_t>(c)] = out ? Acc(0) : kc;
      if (out) apart.push_back(c);
    }

    const detail::Block3 v = detail::block3(dims, detail::traits_of<X>::row_major, axis, axis + 1);
    std::vector<T> apart_dx;
    apart_dx.reserve(apart.size() * static_cast<std::size_t>(v.outer * v.inner));
    for (Index c : apart) {
      const Wd kw = static_cast<Wd>(static_cast<Acc>(weight_(c))) * static_cast<Wd>(alpha);
      for (Index o = 0; o < v.outer; ++o)
        for (Index i = 0; i < v.inner; ++i) {
          const Index e = (o * v.mid + c) * v.inner + i;
          const Wd t = std::tanh(static_cast<Wd>(alpha) * static_cast<Wd>(static_cast<Acc>(x.data()[e])));
          apart_dx.push_back(static_cast<T>(static_cast<Acc>(static_cast<Wd>(static_cast<Acc>(dy.data()[e])) * (1 - t * t) * kw)));
        }
    }
    const detail::ChannelGrads<Acc> g = detail::channel_map_backward<Dev, Acc>(
        dev, v, x.data(), dy.data(), dx.data(), cache.tanh.size() ? cache.tanh.data() : nullptr,
        detail::TanhMap<Acc>(alpha), k.data(), grads.work, detail::simd::stream_output<T>(x.size(), 3));
    std::size_t j = 0;
    for (Index c : apart)
      for (Index o = 0; o < v.outer; ++o)
        for (Index i = 0; i < v.inner; ++i) dx.data()[(o * v.mid + c) * v.inner + i] = apart_dx[j++];

    auto finish = [&](const auto& dpc, const auto& dscale, const auto& dshift) {
      grads.alpha = detail::dyt_param_grads<Acc>(C_, x.size() > 0, affine ? weight_.data() : nullptr,
                                                 dpc.data(), dscale.data(), dshift.data(),
                                                 affine ? grads.weight.data() : nullptr,
                                                 with_bias ? grads.bias.data() : nullptr);
    };
    const auto finite = [](const std::vector<Acc>& a) {
      return detail::all_finite(a.data(), static_cast<Index>(a.size()));
    };
    if (x.size() == 0 || (finite(g.dpc) && finite(g.dscale) && finite(g.dshift))) {
      finish(g.dpc, g.dscale, g.dshift);
      return;
    }
    // Per-channel sums of finite values that overflowed Acc (dy near FLT_MAX): redone in
    // the wider type, where they are what the weights multiply (a tiny weight brings
    // dalpha back into range).
    std::vector<Wd> dpc(g.dpc.begin(), g.dpc.end()), dscale(g.dscale.begin(), g.dscale.end()),
        dshift(g.dshift.begin(), g.dshift.end());
    for (Index c = 0; c < C_; ++c) {
      const std::size_t cu = static_cast<std::size_t>(c);
      if (std::isfinite(dpc[cu]) && std::isfinite(dscale[cu]) && std::isfinite(dshift[cu])) continue;
      Wd q = 0, sw = 0, sb = 0;
      bool all = true;
      for (Index o = 0; o < v.outer; ++o)
        for (Index i = 0; i < v.inner; ++i) {
          const Index e = (o * v.mid + c) * v.inner + i;
          const Wd xe = static_cast<Acc>(x.data()[e]), d = static_cast<Acc>(dy.data()[e]);
          all = all && std::isfinite(xe) && std::isfinite(d);
          const Wd t = std::tanh(static_cast<Wd>(alpha) * xe);
          q += d * (1 - t * t) * xe;
          sw += d * t;
          sb += d;
        }
      if (!all) continue;  // NaN and Inf stay in their channel
      dpc[cu] = q;
      dscale[cu] = sw;
      dshift[cu] = sb;
    }
    finish(dpc, dscale, dshift);
  }

  Index C_;
  Options opt_;
  T alpha_;
  Eigen::Tensor<T, 1> weight_, bias_;  // [C]
};

}  // namespace normkit

NORMKIT_CODE_END
