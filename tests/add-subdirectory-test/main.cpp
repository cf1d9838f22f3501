// Consumer of normkit through add_subdirectory(): the default LayerNorm must give every
// output row mean 0 and variance 1, on one thread and on two. Silent on success.
#include <normkit/normkit.hpp>

#include <cmath>
#include <cstdio>

using Tensor2 = Eigen::Tensor<float, 2, Eigen::RowMajor>;  // [rows, features]

static int check_rows(const char* what, const Tensor2& y) {
  int failures = 0;
  const Eigen::Index features = y.dimension(1);
  for (Eigen::Index r = 0; r < y.dimension(0); ++r) {
    double mean = 0, var = 0;
    for (Eigen::Index j = 0; j < features; ++j) mean += y(r, j);
    mean /= features;
    for (Eigen::Index j = 0; j < features; ++j) var += (y(r, j) - mean) * (y(r, j) - mean);
    var /= features;
    // eps = 1e-5 shrinks the variance by var(x) / (var(x) + eps): far below 1e-3 here.
    if (!(std::fabs(mean) < 1e-5 && std::fabs(var - 1.0) < 1e-3)) {
      std::fprintf(stderr, "add-subdirectory-test: %s: LayerNorm row %ld has mean %g, "
                           "variance %g (expected 0 and 1)\n", what, static_cast<long>(r), mean, var);
      ++failures;
    }
  }
  return failures;
}

int main() {
  const Eigen::Index rows = 4, features = 8;
  normkit::LayerNorm<float> ln(features);
  Tensor2 x(rows, features), y(rows, features);
  x.setRandom();
  x = x * 2.0f + 3.0f;  // an offset and a scale the layer must remove

  ln.forward(x, y);
  int failures = check_rows("one thread", y);

  // The threaded overload needs Threads::Threads, which normkit::normkit brings along.
  Eigen::ThreadPool pool(2);
  Eigen::ThreadPoolDevice dev(&pool, 2);
  y.setZero();
  ln.forward(dev, x, y);
  failures += check_rows("ThreadPoolDevice", y);
  return failures == 0 ? 0 : 1;
}
