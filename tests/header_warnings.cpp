// Compiled, never run: every layer's forward and backward for float, double, bfloat16
// and half, both memory orders, one thread and a pool, built with -Wall -Wextra
// -Wpedantic -Wshadow -Wconversion -Wsign-conversion and more (tests/packaging.cmake),
// -Werror (and -march=native where the build uses it), but without the flags our other
// binaries add. A warning that normkit's headers give a user's build fails the build
// here: with GCC 12 on an AVX-512 machine they gave thousands (see core/config.hpp).
#include <normkit/normkit.hpp>

namespace {

template <class Layer, class Tensor, class Device>
void use(Layer& layer, const Device& dev, Tensor& x, Tensor& y, Tensor& dx) {
  typename Layer::Cache cache;
  typename Layer::Grads grads;
  layer.forward(dev, x, y, cache);
  layer.backward(dev, x, y, cache, dx, grads);
  layer.forward(x, y);
  layer.forward(dev, x + x, y);  // an expression input, evaluated first
}

template <class T, int Layout, class Device>
void use_all(const Device& dev) {
  Eigen::Tensor<T, 3, Layout> x(2, 3, 5), y(2, 3, 5), dx(2, 3, 5);
  x.setConstant(T(1));
  normkit::LayerNorm<T> ln({5});
  normkit::RMSNorm<T> rms({5});
  normkit::BatchNorm<T> bn(3);
  normkit::BatchNorm<T> bn_last(5, normkit::BatchNormOptions().channel_axis(-1));
  normkit::DyT<T> dyt(5);
  normkit::DyT<T> dyt_first(3, normkit::DyTOptions().channel_axis(1));
  use(ln, dev, x, y, dx);
  use(rms, dev, x, y, dx);
  use(bn, dev, x, y, dx);
  use(bn_last, dev, x, y, dx);
  use(dyt, dev, x, y, dx);
  use(dyt_first, dev, x, y, dx);
}

template <class Device>
void use_types(const Device& dev) {
  use_all<float, Eigen::RowMajor>(dev);
  use_all<float, Eigen::ColMajor>(dev);
  use_all<Eigen::bfloat16, Eigen::RowMajor>(dev);
  use_all<Eigen::half, Eigen::ColMajor>(dev);
  use_all<double, Eigen::RowMajor>(dev);
}

}  // namespace

void normkit_header_warnings() {
  use_types(Eigen::DefaultDevice());
  // An expression with int indices (bfloat16: dense()'s one-thread loop where GCC has
  // bug 105593).
  Eigen::Tensor<Eigen::bfloat16, 2, Eigen::RowMajor, int> xi(3, 5), yi(3, 5);
  xi.setConstant(Eigen::bfloat16(1));
  normkit::LayerNorm<Eigen::bfloat16>(5).forward(xi + xi, yi);
  Eigen::ThreadPool pool(2);
  use_types(Eigen::ThreadPoolDevice(&pool, 2));
}
