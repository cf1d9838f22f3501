// The engine shared by LayerNorm and RMSNorm: argument checks, layout dispatch,
// threading and the fixed-order reduction of parameter gradients. The layers add only
// their options, their names and their public surface.
#pragma once

#include <algorithm>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "config.hpp"
#include "norm_kernels.hpp"
#include "parallel.hpp"

NORMKIT_CODE_BEGIN

namespace normkit {
namespace detail {

/// What backward needs from a training forward: one rstd (and, for LayerNorm, one
/// mean) per normalized row, indexed by the row-major flattening of x's leading dims
/// whatever x's layout, plus the shape of x, to refuse a cache from another input.
template <class Acc>
struct RmsCache {
  Eigen::Tensor<Acc, 1> rstd;  // [rows]
  std::vector<Index> x_dims;   // shape of the x it was computed from; empty: not filled
  bool empty() const { return x_dims.empty(); }
};

template <class Acc>
struct MeanRmsCache : RmsCache<Acc> {
  Eigen::Tensor<Acc, 1> mean;  // [rows]
};

template <class Acc, bool Center>
using NormCache = std::conditional_t<Center, MeanRmsCache<Acc>, RmsCache<Acc>>;

/// Calls f(std::bool_constant<a>, std::bool_constant<b>): runtime flags to template
/// arguments, so that the inner loops carry no branches.
template <class F>
decltype(auto) dispatch2(bool a, bool b, F&& f) {
  using T = std::true_type;
  using N = std::false_type;
  if (a) return b ? f(T{}, T{}) : f(T{}, N{});
  return b ? f(N{}, T{}) : f(N{}, N{});
}

template <class T>
inline void validate_eps(const char* layer, double eps) {
  if (!(eps > 0) || !std::isfinite(eps))
    fail(layer, ": eps must be a finite number > 0, got ", eps);
  // The kernels add eps in the accumulation type and take rsqrt of var + eps in SIMD,
  // where a subnormal argument counts as 0: below the smallest normal number of that
  // type, a constant row would get rstd = inf and NaN outputs.
  using Acc = acc_t<T>;
  if (!(eps >= static_cast<double>(std::numeric_limits<Acc>::min())))
    fail(layer, ": eps must be >= ", static_cast<double>(std::numeric_limits<Acc>::min()),
         " (the smallest normal ", sizeof(Acc) == 4 ? "float" : "double", ", the accumulation type), got ", eps);
}

template <class T, bool Center>
class TrailingNorm {
  static_assert(detail::is_layer_scalar_v<T>, "normkit layers take float, double, Eigen::half or Eigen::bfloat16");

 public:
  using Scalar = T;
  using Acc = acc_t<T>;
  using Cache = NormCache<Acc, Center>;

  /// Parameter gradients. backward() overwrites them (it does not accumulate): sum
  /// them yourself across micro-batches.
  struct Grads {
    Eigen::Tensor<T, 1> weight;  // [features], empty without elementwise_affine
    Eigen::Tensor<T, 1> bias;    // [features], empty without a bias
    Workspace<Acc> work;         // reused scratch for the per-block partial sums
  };

  /// Inference: y = norm(x). y has x's shape, or is an Eigen::Tensor with no elements,
  /// which is resized to it; y may be x itself (in place).
  template <class X, class Y, enable_if_tensors_t<X, Y> = 0>
  void forward(const X& x, Y&& y) const {
    forward_impl(Eigen::DefaultDevice(), dense(x), y, nullptr);
  }
  /// Training: also fills `cache` for backward.
  template <class X, class Y, enable_if_tensors_t<X, Y> = 0>
  void forward(const X& x, Y&& y, Cache& cache) const {
    forward_impl(Eigen::DefaultDevice(), dense(x), y, &cache);
  }
  template <class Device, class X, class Y, enable_if_device_tensors_t<Device, X, Y> = 0>
  void forward(const Device& dev, const X& x, Y&& y) const {
    forward_impl(dev, dense(x, dev), y, nullptr);
  }
  template <class Device, class X, class Y, enable_if_device_tensors_t<Device, X, Y> = 0>
  void forward(const Device& dev, const X& x, Y&& y, Cache& cache) const {
    forward_impl(dev, dense(x, dev), y, &cache);
  }

  /// dx (overwritten) and the parameter gradients (overwritten) from the x and cache of
  /// a training forward. dx may be x or dy itself, or an empty Eigen::Tensor (as y).
  template <class X, class DY, class DX, enable_if_tensors_t<X, DY, DX> = 0>
  void backward(const X& x, const DY& dy, const Cache& cache, DX&& dx, Grads& grads) const {
    backward_impl(Eigen::DefaultDevice(), dense(x), dense(dy), cache, dx, grads);
  }
  template <class Device, class X, class DY, class DX,
            enable_if_device_tensors_t<Device, X, DY, DX> = 0>
  void backward(const Device& dev, const X& x, const DY& dy, const Cache& cache, DX&& dx,
                Grads& grads) const {
    backward_impl(dev, dense(x, dev), dense(dy, dev), cache, dx, grads);
  }

  Eigen::Tensor<T, 1>& weight() { return weight_; }
  const Eigen::Tensor<T, 1>& weight() const { return weight_; }
  const std::vector<Index>& normalized_shape() const { return shape_; }
  Index features() const { return features_; }
  double eps() const { return eps_; }
  bool elementwise_affine() const { return affine_; }

  /// As PyTorch: weight 1, bias 0.
  void reset_parameters() {
    weight_.setConstant(T(1));
    bias_.setConstant(T(0));
  }

 protected:
  TrailingNorm(const char* name, std::vector<Index> shape, double eps, bool affine, bool bias)
      : name_(name), shape_(std::move(shape)), eps_(eps), affine_(affine), has_bias_(affine && bias) {
    if (shape_.empty()) fail(name_, ": normalized_shape is empty, expected at least one dim");
    for (Index d : shape_)
      if (d < 0) fail(name_, ": normalized_shape ", shape_str(shape_), " has a negative dim");
    validate_eps<T>(name_, eps);
    features_ = product(shape_, 0, shape_.size());
    if (affine_) weight_.resize(features_);
    if (has_bias_) bias_.resize(features_);
    reset_parameters();
  }

  template <class Dev, class X, class Y>
  void forward_impl(const Dev& dev, const X& x, Y& y, Cache* cache) const {
    static_assert(traits_of<Y>::writable, "normkit: the output y must be writable");
    detail::check_same_type<T, X, Y>();
    const std::string fn = std::string(name_) + "::forward";
    const std::vector<Index> dims = check_x(fn, x);
    check_output(fn, "y", y, dims);
    if (partial_overlap(x.data(), y.data(), x.size()))
      fail(fn, ": y partially overlaps x (only y == x, in place, is supported)");
    fit_output(y, dims);

    const Index rows = x.size() == 0 ? 0 : x.size() / std::max<Index>(features_, 1);
    if (cache) {
      cache->rstd.resize(rows);
      if constexpr (Center) cache->mean.resize(rows);
      cache->x_dims = dims;
    }
    if (x.size() == 0) return;

    constexpr bool row_major = traits_of<X>::row_major;
    const Index F = features_;
    const T* xp = x.data();
    T* yp = y.data();
    const bool stream = simd::stream_output<T>(x.size(), 2);
    const bool overlap =
        !stream && static_cast<std::size_t>(x.size()) * sizeof(T) <= kOverlapBytes;
    const IndexVector<Index> fperm = param_permutation(dims, row_major);
    const Eigen::Tensor<T, 1> w = permuted(weight_, fperm), b = permuted(bias_, fperm);
    const Affine<T> p{affine_ ? (fperm.empty() ? weight_.data() : w.data()) : nullptr,
                      has_bias_ ? (fperm.empty() ? bias_.data() : b.data()) : nullptr};
    Acc* mean = nullptr;
    Acc* rstd = cache ? cache->rstd.data() : nullptr;
    if constexpr (Center) mean = cache ? cache->mean.data() : nullptr;
    const Acc eps = static_cast<Acc>(eps_);

    dispatch2(p.weight != nullptr, p.bias != nullptr, [&](auto hw, auto hb) {
      constexpr bool HasW = decltype(hw)::value, HasB = decltype(hb)::value;
      if constexpr (row_major) {
        parallel_for(dev, rows, 2.0 * double(F) * double(sizeof(T)), 10.0 * double(F), [&](Index r0, Index r1) {
          if (overlap) {
            rows_forward_overlapped<Center, HasW, HasB>(xp + r0 * F, yp + r0 * F, r1 - r0, F, eps,
                                                        p, mean ? mean + r0 : nullptr,
                                                        rstd ? rstd + r0 : nullptr);
            return;
          }
          for (Index r = r0; r < r1; ++r) {
            Acc m, s;
            row_forward<Center, HasW, HasB>(xp + r * F, yp + r * F, F, eps, p, stream, m, s);
            if (rstd) rstd[r] = s;
            if constexpr (Center)
              if (mean) mean[r] = m;
          }
          if (stream) simd::stream_fence();
        });
      } else {
        const IndexVector<Index> perm = row_permutation(dims);
        const Index tiles = (rows + kColTile - 1) / kColTile;
        parallel_for(dev, tiles, 2.0 * double(F * kColTile) * double(sizeof(T)), 10.0 * double(F * kColTile),
                     [&](Index t0, Index t1) {
                       for (Index t = t0; t < t1; ++t) {
                         const Index c0 = t * kColTile, nc = std::min(kColTile, rows - c0);
                         Acc m[kColTile], s[kColTile];
                         cols_forward<Center, HasW, HasB>(xp + c0, yp + c0, F, rows, nc, eps, p,
                                                          stream, m, s);
                         for (Index c = 0; c < nc; ++c) {
                           const Index r = perm.empty() ? c0 + c : perm[c0 + c];
                           if (rstd) rstd[r] = s[c];
                           if constexpr (Center)
                             if (mean) mean[r] = m[c];
                         }
                       }
                       if (stream) simd::stream_fence();
                     });
      }
    });
  }

  template <class Dev, class X, class DY, class DX>
  void backward_impl(const Dev& dev, const X& x, const DY& dy, const Cache& cache, DX& dx,
                     Grads& grads) const {
    static_assert(traits_of<DX>::writable, "normkit: the output dx must be writable");
    detail::check_same_type<T, X, DY>();
    detail::check_same_type<T, X, DX>();
    const std::string fn = std::string(name_) + "::backward";
    const std::vector<Index> dims = check_x(fn, x);
    check_like(fn, "dy", dims_of(dy), dims);
    check_output(fn, "dx", dx, dims);
    if (cache.empty())
      fail(fn, ": cache is empty, expected the cache filled by forward(x, y, cache)");
    if (cache.x_dims != dims)
      fail(fn, ": cache is from x of shape ", shape_str(cache.x_dims), ", but x is ",
           shape_str(dims));
    const Index rows = x.size() == 0 ? 0 : x.size() / std::max<Index>(features_, 1);
    if (cache.rstd.size() != rows || (Center && cache_mean_size(cache) != rows))
      fail(fn, ": cache holds ", cache.rstd.size(), " rows of statistics, expected ", rows);
    if (partial_overlap(x.data(), dx.data(), x.size()))
      fail(fn, ": dx partially overlaps x (only dx == x or dx == dy is supported)");
    if (partial_overlap(dy.data(), dx.data(), x.size()))
      fail(fn, ": dx partially overlaps dy (only dx == x or dx == dy is supported)");
    fit_output(dx, dims);

    const Index F = features_;
    if (affine_) grads.weight.resize(F);
    if (has_bias_) grads.bias.resize(F);
    if (!affine_) grads.weight.resize(0);
    if (!has_bias_) grads.bias.resize(0);
    if (x.size() == 0) {
      if (affine_) grads.weight.setConstant(T(0));
      if (has_bias_) grads.bias.setConstant(T(0));
      return;
    }

    constexpr bool row_major = traits_of<X>::row_major;
    const T* xp = x.data();
    const T* dyp = dy.data();
    T* dxp = dx.data();
    const IndexVector<Index> fperm = param_permutation(dims, row_major);
    const Eigen::Tensor<T, 1> w = permuted(weight_, fperm);
    const T* wp = affine_ ? (fperm.empty() ? weight_.data() : w.data()) : nullptr;
    const Index nparts = (affine_ ? 1 : 0) + (has_bias_ ? 1 : 0);
    const Index tiles = (rows + kColTile - 1) / kColTile;
    const Blocking bl = row_major ? fixed_blocking(rows, kBlockRows) : fixed_blocking(tiles, 1);
    Acc* partial = nparts ? grads.work.get(static_cast<std::size_t>(bl.blocks * F * nparts))
                          : nullptr;
    const Acc* mean = nullptr;
    if constexpr (Center) mean = cache.mean.data();
    const Acc* rstd = cache.rstd.data();
    const IndexVector<Index> perm = row_major ? IndexVector<Index>() : row_permutation(dims);
    const bool has_bias = has_bias_;
    const bool stream = simd::stream_output<T>(x.size(), 3);

    dispatch2(wp != nullptr, false, [&](auto hw, auto) {
      constexpr bool HasW = decltype(hw)::value;
      const double items = row_major ? double(bl.per_block) : double(bl.per_block * kColTile);
      parallel_for(dev, bl.blocks, 3.0 * double(F) * items * double(sizeof(T)), 12.0 * double(F) * items,
                   [&](Index b0, Index b1) {
                     for (Index b = b0; b < b1; ++b) {
                       Acc* dw = partial ? partial + b * F * nparts : nullptr;
                       Acc* db = has_bias ? dw + F : nullptr;
                       if (partial) std::fill(dw, dw + F * nparts, Acc(0));
                       if (!HasW) dw = nullptr;
                       if constexpr (row_major) {
                         const Index i = bl.begin(b);
                         rows_backward<Center, HasW>(xp + i * F, dyp + i * F, dxp + i * F, bl.end(b) - i, F,
                                                     Center ? mean + i : nullptr, rstd + i, wp, dw, db, stream);
                       } else {
                         for (Index i = bl.begin(b); i < bl.end(b); ++i) {
                           const Index c0 = i * kColTile, nc = std::min(kColTile, rows - c0);
                           Acc m[kColTile] = {}, s[kColTile];
                           for (Index c = 0; c < nc; ++c) {
                             const Index r = perm.empty() ? c0 + c : perm[c0 + c];
                             if constexpr (Center) m[c] = mean[r];
                             s[c] = rstd[r];
                           }
                           cols_backward<Center, HasW>(xp + c0, dyp + c0, dxp + c0, F, rows, nc,
                                                       m, s, wp, dw, db);
                         }
                       }
                     }
                     if (stream) simd::stream_fence();
                   });
    });
    if (!nparts) return;
    // Combine the block partials in block order, in column groups fixed by F (see
    // sum_blocks): the same bits for any thread count.
    const Index groups = (F + kSumColumns - 1) / kSumColumns;
    parallel_for(dev, groups, double(kSumColumns * bl.blocks * nparts) * double(sizeof(Acc)),
                 double(kSumColumns * bl.blocks * nparts), [&](Index g0, Index g1) {
                   Acc sw[kSumColumns], sb[kSumColumns];
                   for (Index gi = g0; gi < g1; ++gi) {
                     const Index c0 = gi * kSumColumns, n = std::min(kSumColumns, F - c0);
                     if (affine_) sum_blocks(partial + c0, F * nparts, bl.blocks, n, sw);
                     if (has_bias_) sum_blocks(partial + F + c0, F * nparts, bl.blocks, n, sb);
                     for (Index j = 0; j < n; ++j) {
                       const Index o = fperm.empty() ? c0 + j : fperm[c0 + j];
                       if (affine_) grads.weight(o) = static_cast<T>(sw[j]);
                       if (has_bias_) grads.bias(o) = static_cast<T>(sb[j]);
                     }
                   }
                 });
  }

  const char* name_;
  std::vector<Index> shape_;  // normalized_shape
  Index features_ = 0;        // its product
  double eps_;
  bool affine_, has_bias_;
  Eigen::Tensor<T, 1> weight_, bias_;  // [features], row-major flattening of shape_

 private:
  static Index cache_mean_size(const Cache& c) {
    if constexpr (Center)
      return c.mean.size();
    else
      return c.rstd.size();
  }

  /// x's dims, after checking them against normalized_shape.
  template <class X>
  std::vector<Index> check_x(const std::string& fn, const X& x) const {
    std::vector<Index> dims = dims_of(x);
    const std::size_t k = shape_.size(), r = dims.size();
    if (r < k)
      fail(fn, ": x has rank ", r, ", expected rank >= ", k, " (normalized_shape is ",
           shape_str(shape_), ")");
    const std::vector<Index> trailing(dims.end() - static_cast<std::ptrdiff_t>(k), dims.end());
    if (trailing != shape_) {
      if (k == 1)
        fail(fn, ": x has ", trailing[0], " features, expected ", shape_[0], " (x is ",
             shape_str(dims), ")");
      fail(fn, ": x has trailing dims ", shape_str(trailing), ", expected normalized_shape ",
           shape_str(shape_), " (x is ", shape_str(dims), ")");
    }
    return dims;
  }

  /// For memory position m inside the normalized block, the parameter index.
  IndexVector<Index> param_permutation(const std::vector<Index>& dims, bool row_major) const {
    return mid_permutation(dims, row_major, dims.size() - shape_.size(), dims.size());
  }

  /// For memory position c among a ColMajor tensor's rows, the row-major row index.
  IndexVector<Index> row_permutation(const std::vector<Index>& dims) const {
    return mid_permutation(dims, false, 0, dims.size() - shape_.size());
  }

  /// The parameter vector in the order x stores its normalized block (empty when that
  /// is the parameter order already: use the parameter itself).
  static Eigen::Tensor<T, 1> permuted(const Eigen::Tensor<T, 1>& p, const IndexVector<Index>& perm) {
    if (perm.empty() || p.size() == 0) return Eigen::Tensor<T, 1>();
    Eigen::Tensor<T, 1> out(p.size());
    for (Index m = 0; m < p.size(); ++m) out(m) = p(perm[m]);
    return out;
  }
};

}  // namespace detail
}  // namespace normkit

NORMKIT_CODE_END
