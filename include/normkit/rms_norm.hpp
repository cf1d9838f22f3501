// RMSNorm over the trailing `normalized_shape` dims, as torch.nn.RMSNorm.
//
//   forward   rstd = 1 / sqrt(mean(x^2) + eps),  xhat = x * rstd,  y = xhat * weight
//   backward  g = dy * weight
//             dx = rstd * (g - xhat * mean(g * xhat))
//             dweight = sum_rows dy * xhat
//   shapes    x, y, dy, dx: [..., normalized_shape]; weight: [prod(normalized_shape)];
//             cache: rstd [rows]
//   derivation: docs/derivations/rms_norm.md
#pragma once

#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "core/config.hpp"
#include "core/trailing_norm.hpp"

NORMKIT_CODE_BEGIN

namespace normkit {

namespace detail {
/// The spacing of T at 1, as torch.finfo(dtype).eps. (Eigen's NumTraits<half>::epsilon()
/// is 2^-13, not half's 2^-10, so it cannot be used here.)
template <class T>
double machine_epsilon() {
  if constexpr (std::is_same_v<T, Eigen::half>)
    return 0.0009765625;  // 2^-10
  else if constexpr (std::is_same_v<T, Eigen::bfloat16>)
    return 0.0078125;  // 2^-7
  else
    return static_cast<double>(std::numeric_limits<T>::epsilon());
}
}  // namespace detail

/// Options of RMSNorm. eps unset means the machine epsilon of the layer's scalar type,
/// as torch.nn.RMSNorm(eps=None).
class RMSNormOptions {
 public:
  RMSNormOptions& eps(double v) { eps_ = v; return *this; }
  RMSNormOptions& elementwise_affine(bool v) { affine_ = v; return *this; }
  /// The same as elementwise_affine (BatchNorm's name for it).
  RMSNormOptions& affine(bool v) { return elementwise_affine(v); }
  std::optional<double> eps() const { return eps_; }
  bool elementwise_affine() const { return affine_; }
  bool affine() const { return affine_; }

 private:
  std::optional<double> eps_;
  bool affine_ = true;  // learnable weight, ones
};

/// Root-mean-square normalization (Zhang & Sennrich, 2019): LayerNorm without the
/// centering and without a bias. Same kernels as LayerNorm with the mean pass off.
template <class T>
class RMSNorm : public detail::TrailingNorm<T, false> {
  using Base = detail::TrailingNorm<T, false>;

 public:
  using Options = RMSNormOptions;
  using typename Base::Cache;  // rstd [rows]; x_dims
  using typename Base::Grads;  // weight (bias stays empty)

  explicit RMSNorm(Index features, const Options& options = Options())
      : RMSNorm(std::vector<Index>{features}, options) {}
  explicit RMSNorm(std::vector<Index> normalized_shape, const Options& options = Options())
      : Base("RMSNorm", std::move(normalized_shape),
             options.eps().value_or(detail::machine_epsilon<T>()),
             options.elementwise_affine(), false) {}
};

}  // namespace normkit

NORMKIT_CODE_END
