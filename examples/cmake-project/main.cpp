// One training step of a LayerNorm: forward with a cache, backward to dx and the
// parameter gradients. Checks the two facts every LayerNorm must satisfy and says so.
#include <normkit/normkit.hpp>

#include <cmath>
#include <cstdio>

using Tensor2 = Eigen::Tensor<float, 2, Eigen::RowMajor>;  // [tokens, features]

int main() {
  const Eigen::Index tokens = 4, features = 8;
  normkit::LayerNorm<float> ln(features);  // eps 1e-5, weight 1, bias 0

  Tensor2 x(tokens, features), y(tokens, features);     // input, output
  Tensor2 dy(tokens, features), dx(tokens, features);   // dL/dy (given), dL/dx (computed)
  x.setRandom();
  x = x * 2.0f + 3.0f;
  dy.setRandom();

  normkit::LayerNorm<float>::Cache cache;  // per-row mean and rstd, for backward
  ln.forward(x, y, cache);
  normkit::LayerNorm<float>::Grads g;      // g.weight, g.bias: [features], overwritten
  ln.backward(x, dy, cache, dx, g);

  // The output rows are normalized, and dx sums to zero along each row: shifting a
  // row of x by a constant does not change y, so the loss cannot change either.
  int failures = 0;
  for (Eigen::Index r = 0; r < tokens; ++r) {
    double mean = 0, var = 0, dx_sum = 0;
    for (Eigen::Index j = 0; j < features; ++j) mean += y(r, j), dx_sum += dx(r, j);
    mean /= features;
    for (Eigen::Index j = 0; j < features; ++j) var += (y(r, j) - mean) * (y(r, j) - mean);
    var /= features;
    std::printf("row %ld: y mean %+.2e, y variance %.5f, sum of dx %+.2e\n",
                static_cast<long>(r), mean, var, dx_sum);
    if (std::fabs(mean) > 1e-5 || std::fabs(var - 1.0) > 1e-3 || std::fabs(dx_sum) > 1e-4) ++failures;
  }
  std::printf("dbias[0] = %+.4f (the column sum of dy), dweight[0] = %+.4f\n", g.bias(0), g.weight(0));
  if (failures != 0) std::fprintf(stderr, "layer_norm_demo: %d row(s) failed the checks\n", failures);
  return failures == 0 ? 0 : 1;
}
