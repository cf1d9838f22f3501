// Consumer of the installed normkit package (find_package or pkg-config): the default
// LayerNorm must give every output row mean 0 and variance 1. Silent on success.
#include <normkit/normkit.hpp>

#include <cmath>
#include <cstdio>

int main() {
  using Tensor2 = Eigen::Tensor<float, 2, Eigen::RowMajor>;  // [rows, features]
  const Eigen::Index rows = 4, features = 8;
  normkit::LayerNorm<float> ln(features);
  Tensor2 x(rows, features), y(rows, features);
  x.setRandom();
  x = x * 2.0f + 3.0f;  // an offset and a scale the layer must remove
  ln.forward(x, y);

  int failures = 0;
  for (Eigen::Index r = 0; r < rows; ++r) {
    double mean = 0, var = 0;
    for (Eigen::Index j = 0; j < features; ++j) mean += y(r, j);
    mean /= features;
    for (Eigen::Index j = 0; j < features; ++j) var += (y(r, j) - mean) * (y(r, j) - mean);
    var /= features;
    // eps = 1e-5 shrinks the variance by var(x) / (var(x) + eps): far below 1e-3 here.
    if (!(std::fabs(mean) < 1e-5 && std::fabs(var - 1.0) < 1e-3)) {
      std::fprintf(stderr, "find-package-test: LayerNorm row %ld has mean %g, variance %g "
                           "(expected 0 and 1)\n", static_cast<long>(r), mean, var);
      ++failures;
    }
  }
  return failures == 0 ? 0 : 1;
}
