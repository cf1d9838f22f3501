// LayerNorm over the trailing `normalized_shape` dims, as torch.nn.LayerNorm.
//
//   forward   mean = E[x], var = E[(x - mean)^2] (biased), rstd = 1 / sqrt(var + eps)
//             xhat = (x - mean) * rstd,  y = xhat * weight + bias
//   backward  g = dy * weight
//             dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
//             dweight = sum_rows dy * xhat,  dbias = sum_rows dy
//   shapes    x, y, dy, dx: [..., normalized_shape]; weight, bias: [prod(normalized_shape)]
//             (row-major flattening); cache: mean, rstd [rows]
//   derivation: docs/derivations/layer_norm.md
#pragma once

#include <optional>
#include <vector>

#include "core/config.hpp"
#include "core/trailing_norm.hpp"

NORMKIT_CODE_BEGIN

namespace normkit {

/// Options of LayerNorm, set fluently: LayerNormOptions().eps(1e-6).bias(false).
class LayerNormOptions {
 public:
  LayerNormOptions& eps(double v) { eps_ = v; return *this; }
  LayerNormOptions& elementwise_affine(bool v) { affine_ = v; return *this; }
  /// The same as elementwise_affine (BatchNorm's name for it).
  LayerNormOptions& affine(bool v) { return elementwise_affine(v); }
  LayerNormOptions& bias(bool v) { bias_ = v; return *this; }
  double eps() const { return eps_; }
  bool elementwise_affine() const { return affine_; }
  bool affine() const { return affine_; }
  bool bias() const { return bias_; }

 private:
  double eps_ = 1e-5;
  bool affine_ = true;  // learnable weight (ones) and, with bias(), bias (zeros)
  bool bias_ = true;
};

/// Layer normalization (Ba et al., 2016) with PyTorch's semantics. Statistics in float
/// for float/half/bfloat16 storage, in double for double. Any rank >= the normalized
/// dims, RowMajor (fast path) or ColMajor. forward() is const and safe to call from
/// several threads at once.
template <class T>
class LayerNorm : public detail::TrailingNorm<T, true> {
  using Base = detail::TrailingNorm<T, true>;

 public:
  using Options = LayerNormOptions;
  using typename Base::Cache;  // mean, rstd [rows]; x_dims
  using typename Base::Grads;  // weight, bias

  explicit LayerNorm(Index features, const Options& options = Options())
      : LayerNorm(std::vector<Index>{features}, options) {}
  explicit LayerNorm(std::vector<Index> normalized_shape, const Options& options = Options())
      : Base("LayerNorm", std::move(normalized_shape), options.eps(), options.elementwise_affine(),
             options.bias()) {}

  /// The bias, [features]; empty without elementwise_affine or with bias(false).
  Eigen::Tensor<T, 1>& bias() { return this->bias_; }
  const Eigen::Tensor<T, 1>& bias() const { return this->bias_; }
  bool has_bias() const { return this->has_bias_; }
};

}  // namespace normkit

NORMKIT_CODE_END
