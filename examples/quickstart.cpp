// quickstart: forward and backward of each normkit layer, in a few lines each.
// Prints, per layer, the first output row's mean and variance and the gradient norms:
// LayerNorm, RMSNorm, DyT (no statistics: its output saturates on offset inputs) and
// BatchNorm in training and eval mode.
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

  normkit::DyT<float> dyt(features);       // y = weight * tanh(alpha x) + bias, alpha 0.5
  train_step("DyT", dyt, x, dy);           // no statistics: x = 5 +- 3 saturates tanh, y ~ 1

  // BatchNorm normalizes each channel (here a feature) over the batch (here the tokens):
  // a new BatchNorm is in training mode and updates its running statistics.
  normkit::BatchNorm<float> bn(features);  // channel axis 1 of [N, C]; momentum 0.1
  train_step("BatchNorm", bn, x, dy);
  bn.eval();                               // inference: the running statistics
  Tensor2 y_eval(tokens, features);
  bn.forward(x, y_eval);
  std::printf("BatchNorm eval: running_mean[0] %.4f (0.9 * 0 + 0.1 * batch mean), y[0] mean %+.4f\n",
              static_cast<double>(bn.running_mean()(0)), row_mean(y_eval, 0));

  // Inference on two threads, through an Eigen device.
  Eigen::ThreadPool pool(2);
  Eigen::ThreadPoolDevice dev(&pool, 2);
  Tensor2 y(tokens, features);
  ln.forward(dev, x, y);
  std::printf("LayerNorm on 2 threads: y[0]: mean %+.4f var %.4f\n", row_mean(y, 0), row_var(y, 0));

  // Inputs may be Eigen tensor expressions, evaluated into a temporary first (a copy;
  // a Tensor or TensorMap is read in place): here the last 8 tokens, a slice of x.
  const Eigen::array<Eigen::Index, 2> first{{tokens - 8, 0}}, extent{{8, features}};
  Tensor2 y_last(8, features);
  ln.forward(x.slice(first, extent), y_last);
  std::printf("LayerNorm of x.slice(last 8 tokens): y[0]: mean %+.4f var %.4f\n", row_mean(y_last, 0),
              row_var(y_last, 0));

  const bool ok = std::fabs(row_mean(y, 0)) < 1e-4 && std::fabs(row_var(y, 0) - 1) < 1e-3 &&
                  std::fabs(row_mean(y_last, 0)) < 1e-4 && std::fabs(row_var(y_last, 0) - 1) < 1e-3;
  return ok ? 0 : 1;
}
