// normkit against PyTorch (libtorch 1.13, CPU), on the same inputs in the same process:
// the layers' semantics are PyTorch's (DESIGN.md), so a model ported from PyTorch must
// compute the same numbers. Each case builds the layer both ways from the same options
// and parameters, runs forward (training and inference) and backward, and compares every
// output: y, dx, the parameter gradients, BatchNorm's running statistics over several
// steps (unbiased variance, momentum or cumulative average), in float, double,
// Eigen::half and Eigen::bfloat16, in both of normkit's layouts.
//
// half and bfloat16 (storage; normkit computes in float): torch runs in float on the same
// inputs and parameters (rounded to the 16-bit type), and normkit's outputs must be that
// float result rounded to the type. Not torch's own bfloat16 kernels: libtorch 1.13's
// bfloat16 LayerNorm on this CPU is up to 3 ulp of bfloat16 from the exact result on the
// same inputs (its dbias several ulp; normkit's are within half an ulp), and it has no
// half LayerNorm at all ("LayerNormKernelImpl" not implemented for 'Half').
//
// libtorch 1.13 has LayerNorm and BatchNorm modules; it has no RMSNorm (torch 2.4 added
// it) and no DyT, so those are the eager expressions of torch.nn.RMSNorm's and the DyT
// paper's forward, and their gradients come from autograd. RMSNorm's default eps is
// torch.finfo(dtype).eps, as torch.nn.RMSNorm's eps=None.
//
// Two input scales: values in [-2, 2], and the same times 1e-3, where the variance (1e-6)
// is below LayerNorm's and BatchNorm's eps (1e-5) and RMSNorm's mean square is ten times
// float's epsilon, so that a wrong eps, or eps added in the wrong place, shows.
//
// Tolerance: see peers_support.hpp.
#include <normkit/normkit.hpp>

#include <torch/torch.h>

#include "peers_support.hpp"

namespace {

using namespace nkpeers;

/// The dtype torch computes normkit's T in: compute_t<T> (for half and bfloat16 the
/// inputs are already rounded to T).
template <class T>
constexpr torch::Dtype torch_dtype() {
  return std::is_same_v<compute_t<T>, double> ? torch::kDouble : torch::kFloat;
}

/// A torch tensor of torch_dtype<T>(), logical dims `dims`, row-major values `data`.
template <class T>
torch::Tensor to_torch(const std::vector<Index>& dims, const std::vector<double>& data) {
  std::vector<int64_t> d(dims.begin(), dims.end());
  return torch::tensor(data, torch::kDouble).reshape(d).to(torch_dtype<T>());
}

std::vector<double> from_torch(const torch::Tensor& t) {
  const torch::Tensor c = t.detach().to(torch::kDouble).contiguous();
  return std::vector<double>(c.data_ptr<double>(), c.data_ptr<double>() + c.numel());
}

template <class T>
class TorchPeer : public ::testing::Test {};
using Scalars = ::testing::Types<float, double, Eigen::half, Eigen::bfloat16>;
TYPED_TEST_SUITE(TorchPeer, Scalars, nktest::ScalarNames);

// ---- LayerNorm and RMSNorm: torch::nn::LayerNorm and torch.nn.RMSNorm's expression.

struct TrailingCase {
  std::vector<Index> dims;
  std::vector<Index> normalized;
};

const std::vector<TrailingCase>& trailing_cases() {
  static const std::vector<TrailingCase> cases = {
      {{1}, {1}},       {{5}, {5}},          {{3, 1}, {1}},           {{4, 17}, {17}},
      {{7, 33}, {33}},  {{2, 3, 5}, {3, 5}}, {{2, 2, 3, 19}, {19}},  {{3, 2, 4, 5}, {2, 4, 5}},
      {{6, 64}, {64}},
  };
  return cases;
}

/// torch.nn.RMSNorm's forward (torch 2.4+): x * rsqrt(mean(x^2) + eps) * w.
torch::Tensor torch_rms_norm(const torch::Tensor& x, std::size_t norm_dims, double eps,
                             const c10::optional<torch::Tensor>& w) {
  std::vector<int64_t> reduce;
  for (std::size_t i = 0; i < norm_dims; ++i) reduce.push_back(-1 - static_cast<int64_t>(i));
  torch::Tensor y = x * torch::rsqrt(x.pow(2).mean(reduce, /*keepdim=*/true) + eps);
  return w ? y * *w : y;
}

/// One trailing-norm case, both layouts: normkit's Layer against torch, forward (with and
/// without a cache) and backward. Layer is LayerNorm<T> or RMSNorm<T>.
template <class Layer, class T, int R, int L>
void check_trailing(const TrailingCase& c, bool affine, bool bias, bool default_eps, double scale, unsigned seed) {
  constexpr bool kLN = std::is_same_v<Layer, normkit::LayerNorm<T>>;
  const Index n = nktest::numel(c.dims), features = nktest::numel(c.normalized);
  const Inputs<T> in(n, seed, scale);
  const std::vector<double> w = nktest::quantized<T>(nktest::random_vector(features, seed + 2, 0.5, 1.5));
  const std::vector<double> b = nktest::quantized<T>(nktest::random_vector(features, seed + 3));
  const double eps = default_eps ? (kLN ? 1e-5 : epsilon_of<T>()) : 1e-3;
  const std::string what = std::string(kLN ? "LayerNorm" : "RMSNorm") + " x " + dims_str(c.dims) + " over " +
                           dims_str(c.normalized) + (affine ? "" : ", no affine") + (bias ? "" : ", no bias") +
                           ", eps " + (default_eps ? "default" : "1e-3") + ", scale " + std::to_string(scale) +
                           (L == Eigen::RowMajor ? ", RowMajor" : ", ColMajor");
  SCOPED_TRACE(what);

  typename Layer::Options opt;
  opt.elementwise_affine(affine);
  if (!default_eps) opt.eps(eps);
  if constexpr (kLN) opt.bias(bias);
  Layer layer(c.normalized, opt);
  if (affine) {
    set_values(layer.weight(), w);
    if constexpr (kLN)
      if (bias) set_values(layer.bias(), b);
  }
  const auto x = nktest::make_tensor<T, R, L>(c.dims, in.x);
  const auto dy = nktest::make_tensor<T, R, L>(c.dims, in.dy);
  Eigen::Tensor<T, R, L> y(x.dimensions()), y_inference(x.dimensions()), dx(x.dimensions());
  typename Layer::Cache cache;
  typename Layer::Grads grads;
  layer.forward(x, y_inference);
  layer.forward(x, y, cache);
  layer.backward(x, dy, cache, dx, grads);

  // torch: the module (LayerNorm) or the expression (RMSNorm), on leaves that want grads.
  const NormScales sc = norm_scales(
      in.x, in.dy, affine ? w : std::vector<double>{}, affine && bias && kLN ? b : std::vector<double>{},
      n / features, [&](std::size_t i) { return i / static_cast<std::size_t>(features); },
      [&](std::size_t i) { return i % static_cast<std::size_t>(features); }, kLN, eps);

  const std::vector<int64_t> shape(c.normalized.begin(), c.normalized.end());
  torch::Tensor X = to_torch<T>(c.dims, in.x).requires_grad_(true);
  torch::Tensor W = to_torch<T>(c.normalized, w).requires_grad_(true);
  torch::Tensor B = to_torch<T>(c.normalized, b).requires_grad_(true);
  torch::Tensor Y;
  if constexpr (kLN) {
    torch::nn::LayerNorm m(torch::nn::LayerNormOptions(shape).eps(eps).elementwise_affine(affine));
    m->to(torch_dtype<T>());
    if (affine) {
      torch::NoGradGuard no_grad;
      m->weight.copy_(W);
      m->bias.copy_(bias ? B : torch::zeros_like(B));
    }
    Y = m->forward(X);
    Y.backward(to_torch<T>(c.dims, in.dy));
    if (affine) {
      expect_agree<T>(values(grads.weight), from_torch(m->weight.grad().reshape({-1})), sc.dweight, "dweight");
      if (bias) expect_agree<T>(values(grads.bias), from_torch(m->bias.grad().reshape({-1})), sc.dbias, "dbias");
    }
  } else {
    Y = torch_rms_norm(X, c.normalized.size(), eps, affine ? c10::optional<torch::Tensor>(W) : c10::nullopt);
    Y.backward(to_torch<T>(c.dims, in.dy));
    if (affine) expect_agree<T>(values(grads.weight), from_torch(W.grad().reshape({-1})), sc.dweight, "dweight");
  }
  const std::vector<double> Yt = from_torch(Y);
  expect_agree<T>(as_double(nktest::logical(y)), Yt, sc.y, "y (training forward)");
  expect_agree<T>(as_double(nktest::logical(y_inference)), Yt, sc.y, "y (inference forward)");
  expect_agree<T>(as_double(nktest::logical(dx)), from_torch(X.grad()), sc.dx, "dx");
}

template <class Layer, class T>
void check_trailing_all() {
  unsigned seed = 100;
  for (const TrailingCase& c : trailing_cases())
    for (double scale : kScales)
      for (int variant = 0; variant < 4; ++variant) {
        // affine + bias + default eps, affine without bias, no affine, eps 1e-3.
        const bool affine = variant != 2, bias = variant == 0 || variant == 3, default_eps = variant != 3;
        ++seed;
        nktest::with_rank(c.dims.size(), [&](auto r) {
          check_trailing<Layer, T, decltype(r)::value, Eigen::RowMajor>(c, affine, bias, default_eps, scale, seed);
          check_trailing<Layer, T, decltype(r)::value, Eigen::ColMajor>(c, affine, bias, default_eps, scale, seed);
        });
      }
}

TYPED_TEST(TorchPeer, LayerNormMatchesTorchLayerNorm) {
  check_trailing_all<normkit::LayerNorm<TypeParam>, TypeParam>();
}

TYPED_TEST(TorchPeer, RMSNormMatchesTorchRMSNormExpression) {
  check_trailing_all<normkit::RMSNorm<TypeParam>, TypeParam>();
}

// ---- BatchNorm: torch::nn::BatchNorm{1,2,3}d, train for several steps, then eval.

struct BatchCase {
  std::vector<Index> dims;  // torch's (N, C, ...)
  bool channels_last;       // normkit's x is (N, ..., C), channel_axis(-1)
};

/// torch's dims permuted to channels-last: (N, C, d2, ...) -> (N, d2, ..., C).
std::vector<Index> channels_last_dims(const std::vector<Index>& d) {
  std::vector<Index> r{d[0]};
  r.insert(r.end(), d.begin() + 2, d.end());
  r.push_back(d[1]);
  return r;
}

std::vector<int64_t> to_channels_last_perm(std::size_t rank) {
  std::vector<int64_t> p{0};
  for (std::size_t i = 2; i < rank; ++i) p.push_back(static_cast<int64_t>(i));
  p.push_back(1);
  return p;
}

template <class T, int R, int L>
void check_batch_norm(const BatchCase& c, std::optional<double> momentum, bool affine, double scale, unsigned seed) {
  const Index n = nktest::numel(c.dims), C = c.dims[1];
  const std::vector<Index> nk_dims = c.channels_last ? channels_last_dims(c.dims) : c.dims;
  const std::string what = "BatchNorm x " + dims_str(nk_dims) + (c.channels_last ? " channels-last" : "") +
                           ", momentum " + (momentum ? std::to_string(*momentum) : "None (cumulative)") +
                           (affine ? "" : ", no affine") + ", scale " + std::to_string(scale) +
                           (L == Eigen::RowMajor ? ", RowMajor" : ", ColMajor");
  SCOPED_TRACE(what);
  const std::vector<double> w = nktest::quantized<T>(nktest::random_vector(C, seed + 2, 0.5, 1.5));
  const std::vector<double> b = nktest::quantized<T>(nktest::random_vector(C, seed + 3));

  normkit::BatchNorm<T> bn(C, typename normkit::BatchNorm<T>::Options()
                                  .momentum(momentum)
                                  .affine(affine)
                                  .channel_axis(c.channels_last ? -1 : 1));
  if (affine) {
    set_values(bn.weight(), w);
    set_values(bn.bias(), b);
  }
  torch::nn::AnyModule module;
  const auto opts = torch::nn::BatchNormOptions(C)
                        .momentum(momentum ? c10::optional<double>(*momentum) : c10::nullopt)
                        .affine(affine);
  if (R == 2 || R == 3) module = torch::nn::AnyModule(torch::nn::BatchNorm1d(opts));
  if (R == 4) module = torch::nn::AnyModule(torch::nn::BatchNorm2d(opts));
  if (R == 5) module = torch::nn::AnyModule(torch::nn::BatchNorm3d(opts));
  auto m = module.ptr();
  m->to(torch_dtype<T>());
  torch::Tensor mw, mb;
  for (const auto& p : m->named_parameters()) (p.key() == "weight" ? mw : mb) = p.value();
  if (affine) {
    torch::NoGradGuard no_grad;
    mw.copy_(to_torch<T>({C}, w));
    mb.copy_(to_torch<T>({C}, b));
  }
  const std::vector<int64_t> perm = to_channels_last_perm(c.dims.size());
  // normkit's logical layout of a torch (N, C, ...) tensor.
  auto nk_order = [&](const torch::Tensor& t) { return c.channels_last ? t.permute(perm) : t; };

  // Three training steps on different batches, then one in eval mode; each step's
  // forward, backward and the running statistics after it.
  for (int step = 0; step < 4; ++step) {
    const bool training = step < 3;
    SCOPED_TRACE(training ? "training step " + std::to_string(step) : std::string("eval"));
    bn.train(training);
    m->train(training);
    const Inputs<T> in(n, seed + 10 * static_cast<unsigned>(step), scale);
    // The same values as torch's (N, C, ...) tensor, in normkit's dim order.
    torch::Tensor X = to_torch<T>(c.dims, in.x).requires_grad_(true);
    const torch::Tensor dY = to_torch<T>(c.dims, in.dy);
    const auto x = nktest::make_tensor<T, R, L>(nk_dims, from_torch(nk_order(X)));
    const auto dy = nktest::make_tensor<T, R, L>(nk_dims, from_torch(nk_order(dY)));
    Eigen::Tensor<T, R, L> y(x.dimensions()), dx(x.dimensions());
    typename normkit::BatchNorm<T>::Cache cache;
    typename normkit::BatchNorm<T>::Grads grads;
    torch::Tensor rm, rv;
    for (const auto& buf : m->named_buffers()) {
      if (buf.key() == "running_mean") rm = buf.value();
      if (buf.key() == "running_var") rv = buf.value();
    }
    // 16-bit T: normkit's running statistics are T, rounded at every update, torch's are
    // float. Each step starts torch from normkit's, so that a step compares one update
    // (one rounding) and the eval step the eval arithmetic alone.
    if (sizeof(T) < sizeof(float)) {
      torch::NoGradGuard no_grad;
      rm.copy_(to_torch<T>({C}, values(bn.running_mean())));
      rv.copy_(to_torch<T>({C}, values(bn.running_var())));
    }
    bn.forward(x, y, cache);
    bn.backward(x, dy, cache, dx, grads);

    // In eval mode the statistics are the running ones (before this step: eval keeps them).
    std::vector<std::pair<double, double>> running;
    if (!training)
      for (Index k = 0; k < C; ++k) running.emplace_back(rm[k].template item<double>(), rv[k].template item<double>());
    const std::size_t inner = static_cast<std::size_t>(n / (c.dims[0] * C));
    auto channel = [&](std::size_t i) { return (i / inner) % static_cast<std::size_t>(C); };
    const NormScales sc = norm_scales(in.x, in.dy, affine ? w : std::vector<double>{},
                                      affine ? b : std::vector<double>{}, C, channel, channel, true, 1e-5, running);

    for (auto& p : m->parameters()) p.mutable_grad() = torch::Tensor();
    torch::Tensor Y = module.forward(X);
    Y.backward(dY);
    expect_agree<T>(as_double(nktest::logical(y)), from_torch(nk_order(Y)), sc.y, "y");
    expect_agree<T>(as_double(nktest::logical(dx)), from_torch(nk_order(X.grad())), sc.dx, "dx");
    if (affine) {
      expect_agree<T>(values(grads.weight), from_torch(mw.grad()), sc.dweight, "dweight");
      expect_agree<T>(values(grads.bias), from_torch(mb.grad()), sc.dbias, "dbias");
    }
    expect_agree<T>(values(bn.running_mean()), from_torch(rm), "running_mean");
    expect_agree<T>(values(bn.running_var()), from_torch(rv), "running_var");
  }
}

TYPED_TEST(TorchPeer, BatchNormMatchesTorchBatchNormOverTrainingStepsAndEval) {
  using T = TypeParam;
  const std::vector<BatchCase> cases = {
      {{2, 1}, false},          {{5, 3}, false},          {{4, 7, 3}, false},     {{3, 5, 4}, true},
      {{2, 3, 5, 7}, false},    {{2, 3, 5, 7}, true},     {{1, 17, 3, 3}, false}, {{1, 17, 3, 3}, true},
      {{2, 4, 2, 3, 2}, false}, {{2, 4, 2, 3, 2}, true},  {{8, 20}, false},
  };
  unsigned seed = 500;
  for (const BatchCase& c : cases)
    for (double scale : kScales)
      for (int variant = 0; variant < 3; ++variant) {
        const std::optional<double> momentum = variant == 1 ? std::nullopt : std::optional<double>(variant ? 0.3 : 0.1);
        const bool affine = variant != 2;
        seed += 50;
        auto run = [&](auto r) {
          constexpr int R = decltype(r)::value;
          check_batch_norm<T, R, Eigen::RowMajor>(c, momentum, affine, scale, seed);
          check_batch_norm<T, R, Eigen::ColMajor>(c, momentum, affine, scale, seed);
        };
        switch (c.dims.size()) {
          case 2: run(std::integral_constant<int, 2>{}); break;
          case 3: run(std::integral_constant<int, 3>{}); break;
          case 4: run(std::integral_constant<int, 4>{}); break;
          case 5: run(std::integral_constant<int, 5>{}); break;
          default: FAIL() << "rank " << c.dims.size();
        }
      }
}

// ---- DyT: the paper's forward as a torch expression, w * tanh(alpha * x) + b.

template <class T, int R, int L>
void check_dyt(const std::vector<Index>& dims, bool bias, unsigned seed) {
  const Index n = nktest::numel(dims), C = dims.back();
  SCOPED_TRACE("DyT x " + dims_str(dims) + (bias ? "" : ", no bias") +
               (L == Eigen::RowMajor ? ", RowMajor" : ", ColMajor"));
  const Inputs<T> in(n, seed, 1.0);
  const std::vector<double> w = nktest::quantized<T>(nktest::random_vector(C, seed + 2, 0.5, 1.5));
  const std::vector<double> b = nktest::quantized<T>(nktest::random_vector(C, seed + 3));
  const T alpha = static_cast<T>(0.8);

  normkit::DyT<T> dyt(C, typename normkit::DyT<T>::Options().bias(bias));
  dyt.alpha() = alpha;
  set_values(dyt.weight(), w);
  if (bias) set_values(dyt.bias(), b);
  const auto x = nktest::make_tensor<T, R, L>(dims, in.x);
  const auto dy = nktest::make_tensor<T, R, L>(dims, in.dy);
  Eigen::Tensor<T, R, L> y(x.dimensions()), y_inference(x.dimensions()), dx(x.dimensions());
  typename normkit::DyT<T>::Cache cache;
  typename normkit::DyT<T>::Grads grads;
  dyt.forward(x, y_inference);
  dyt.forward(x, y, cache);
  dyt.backward(x, dy, cache, dx, grads);

  torch::Tensor X = to_torch<T>(dims, in.x).requires_grad_(true);
  torch::Tensor A = to_torch<T>({1}, {static_cast<double>(alpha)}).requires_grad_(true);
  torch::Tensor W = to_torch<T>({C}, w).requires_grad_(true);
  torch::Tensor B = to_torch<T>({C}, b).requires_grad_(true);
  torch::Tensor Y = W * torch::tanh(A * X);
  if (bias) Y = Y + B;
  Y.backward(to_torch<T>(dims, in.dy));
  // Scales (see NormScales): the sums' terms, |dy w x| for dalpha, |dy| for dweight, dbias.
  double dalpha_scale = 0, dw_scale = 0;
  std::vector<double> per_channel(static_cast<std::size_t>(C));
  for (std::size_t i = 0; i < in.x.size(); ++i) {
    const std::size_t k = i % static_cast<std::size_t>(C);
    dalpha_scale += std::abs(in.dy[i] * w[k] * in.x[i]);
    dw_scale = std::max(dw_scale, per_channel[k] += std::abs(in.dy[i]));
  }
  const std::vector<double> Yt = from_torch(Y);
  expect_agree<T>(as_double(nktest::logical(y)), Yt, "y (training forward)");
  expect_agree<T>(as_double(nktest::logical(y_inference)), Yt, "y (inference forward)");
  expect_agree<T>(as_double(nktest::logical(dx)), from_torch(X.grad()), "dx");
  expect_agree<T>({static_cast<double>(grads.alpha)}, from_torch(A.grad()), dalpha_scale, "dalpha");
  expect_agree<T>(values(grads.weight), from_torch(W.grad()), dw_scale, "dweight");
  if (bias) expect_agree<T>(values(grads.bias), from_torch(B.grad()), dw_scale, "dbias");
}

TYPED_TEST(TorchPeer, DyTMatchesTheTorchExpression) {
  using T = TypeParam;
  const std::vector<std::vector<Index>> shapes = {{1}, {7}, {3, 1}, {5, 17}, {4, 64}, {2, 3, 33}, {2, 2, 3, 5}};
  unsigned seed = 900;
  for (const auto& dims : shapes)
    for (bool bias : {true, false}) {
      seed += 10;
      nktest::with_rank(dims.size(), [&](auto r) {
        check_dyt<T, decltype(r)::value, Eigen::RowMajor>(dims, bias, seed);
        check_dyt<T, decltype(r)::value, Eigen::ColMajor>(dims, bias, seed);
      });
    }
}

}  // namespace
