// quickstart: forward and backward of each normkit layer, in a few lines each.
// Prints, per layer, the first output row's mean and variance and the gradient norms.
#include <normkit/normkit.hpp>

#include <cmath>
#include <cstdio>

using Tensor2 = Eigen::Tensor<float, 2, Eigen::RowMajor>;  // [tokens, features]

namespace {

double row_mean(const Tensor2& t, Eigen::Index r) {
  double s = 0;
  for (Eigen::Index j = 0; j < t.dimension(1); ++j) s += t(r, j);
  return s / static_cast<double>(t.dimension(1));
}

double row_var(const Tensor2& t, Eigen::Index r) {
  const double m = row_mean(t, r);
  double s = 0;
  for (Eigen::Index j = 0; j < t.dimension(1); ++j) s += (t(r, j) - m) * (t(r, j) - m);
  return s / static_cast<double>(t.dimension(1));
}

template <class Tensor>
double norm(const Tensor& t) {
  double s = 0;
  for (Eigen::Index i = 0; i < t.size(); ++i) s += static_cast<double>(t.data()[i]) * t.data()[i];
  return std::sqrt(s);
}

// The same generic code runs every layer: they share forward/backward/Cache/Grads.
template <class Layer>
void train_step(const char* name, Layer& layer, const Tensor2& x, const Tensor2& dy) {
  Tensor2 y(x.dimensions()), dx(x.dimensions());
  typename Layer::Cache cache;              // what backward needs
  layer.forward(x, y, cache);               // training forward
  typename Layer::Grads grads;              // parameter gradients (overwritten)
  layer.backward(x, dy, cache, dx, grads);  // dx and grads
  std::printf("%-10s y[0]: mean %+.4f var %.4f   |dx| %.4f  |dweight| %.4f\n", name,
              row_mean(y, 0), row_var(y, 0), norm(dx), norm(grads.weight));
}

}  // namespace

int main() {
  const Eigen::Index tokens = 32, features = 768;
  Tensor2 x(tokens, features), dy(tokens, features);
  x.setRandom();  // uniform in [-1, 1]: mean 0, variance 1/3
  x = x * 3.0f + 5.0f;
  dy.setRandom();

  normkit::LayerNorm<float> ln(features);  // eps 1e-5, weight 1, bias 0
  train_step("LayerNorm", ln, x, dy);      // y rows: mean 0, variance 1

  normkit::RMSNorm<float> rms(features);   // eps = FLT_EPSILON, weight 1
  train_step("RMSNorm", rms, x, dy);       // y rows: mean square 1

  // Inference on two threads, through an Eigen device.
  Eigen::ThreadPool pool(2);
  Eigen::ThreadPoolDevice dev(&pool, 2);
  Tensor2 y(tokens, features);
  ln.forward(dev, x, y);
  std::printf("LayerNorm on 2 threads: y[0]: mean %+.4f var %.4f\n", row_mean(y, 0), row_var(y, 0));
  const bool ok = std::fabs(row_mean(y, 0)) < 1e-4 && std::fabs(row_var(y, 0) - 1) < 1e-3;
  return ok ? 0 : 1;
}
