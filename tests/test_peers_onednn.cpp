// normkit against oneDNN (2.6, CPU engine), on the same inputs in the same process: the
// two layers oneDNN has, LayerNorm (normalized over the last dim) and BatchNorm (NCHW,
// NHWC and NC), forward (training, and BatchNorm inference with given statistics) and
// backward, with and without scale and shift. Besides y, dx and the parameter gradients,
// the statistics: oneDNN returns mean and (biased) variance, normkit's caches keep the
// mean and 1 / sqrt(var + eps). In float and in bfloat16 (oneDNN's other data type for
// both). Inputs and tolerance as in test_peers_torch.cpp (peers_support.hpp).
#include <normkit/normkit.hpp>

#include <oneapi/dnnl/dnnl.hpp>

#include <unordered_map>

#include "peers_support.hpp"

namespace {

using namespace nkpeers;
using dnnl::memory;
using Args = std::unordered_map<int, memory>;
using Flags = dnnl::normalization_flags;
using Tag = memory::format_tag;
constexpr auto f32 = memory::data_type::f32;
constexpr float kEps = 1e-5f;

dnnl::engine& engine() {
  static dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  return eng;
}

void run(const dnnl::primitive& p, const Args& args) {
  dnnl::stream s(engine());
  p.execute(s, args);
  s.wait();
}

template <class V>
memory mem(const memory::desc& md, const V* data) {
  return memory(md, engine(), const_cast<V*>(data));
}

std::vector<float> to_float(const std::vector<double>& v) { return std::vector<float>(v.begin(), v.end()); }

/// v as T (its values already T's: Inputs rounds them), oneDNN's data type for T.
template <class T>
std::vector<T> to_type(const std::vector<double>& v) {
  std::vector<T> r;
  for (double e : v) r.push_back(static_cast<T>(e));
  return r;
}

template <class T>
constexpr memory::data_type dnnl_type() {
  return std::is_same_v<T, Eigen::bfloat16> ? memory::data_type::bf16 : memory::data_type::f32;
}

/// 1 / sqrt(var + eps) of oneDNN's variances, in double: what normkit's caches keep.
std::vector<double> rstd_of(const std::vector<float>& var) {
  std::vector<double> r;
  for (float v : var) r.push_back(1 / std::sqrt(static_cast<double>(v) + static_cast<double>(kEps)));
  return r;
}

// ---- LayerNorm: layer_normalization_forward / _backward on [rows, features].
//
// In float and in bfloat16 (oneDNN: bf16 data, f32 statistics, scale and shift, and
// f32 parameter gradients; normkit: Eigen::bfloat16 storage, float arithmetic), where
// both round each output once from float arithmetic (expect_agree<T>).

template <class T, int R, int L>
void check_layer_norm(const std::vector<Index>& dims, bool affine, double scale, unsigned seed) {
  const Index n = nktest::numel(dims), features = dims.back(), rows = n / features;
  SCOPED_TRACE(std::string(std::is_same_v<T, float> ? "" : "bfloat16 ") + "LayerNorm x " + dims_str(dims) +
               (affine ? "" : ", no affine") + ", scale " + std::to_string(scale) +
               (L == Eigen::RowMajor ? ", RowMajor" : ", ColMajor"));
  const Inputs<T> in(n, seed, scale);
  const std::vector<double> w = nktest::quantized<T>(nktest::random_vector(features, seed + 2, 0.5, 1.5));
  const std::vector<double> b = nktest::quantized<T>(nktest::random_vector(features, seed + 3));

  normkit::LayerNorm<T> ln(features, normkit::LayerNormOptions().elementwise_affine(affine));
  if (affine) {
    set_values(ln.weight(), w);
    set_values(ln.bias(), b);
  }
  const auto x = nktest::make_tensor<T, R, L>(dims, in.x);
  const auto dy = nktest::make_tensor<T, R, L>(dims, in.dy);
  Eigen::Tensor<T, R, L> y(x.dimensions()), dx(x.dimensions());
  typename normkit::LayerNorm<T>::Cache cache;
  typename normkit::LayerNorm<T>::Grads grads;
  ln.forward(x, y, cache);
  ln.backward(x, dy, cache, dx, grads);

  const std::vector<T> X = to_type<T>(in.x), dY = to_type<T>(in.dy);
  const std::vector<float> W = to_float(w), B = to_float(b);
  std::vector<T> Y(X.size()), dX(X.size());
  std::vector<float> mean(static_cast<std::size_t>(rows)), var(mean.size()), dW(W.size()), dB(B.size());
  const memory::desc md({rows, features}, dnnl_type<T>(), Tag::ab), stat({rows}, f32, Tag::a),
      wmd({features}, f32, Tag::a);
  const Flags flags = affine ? Flags::use_scale | Flags::use_shift : Flags::none;
  const dnnl::layer_normalization_forward::primitive_desc fpd(
      {dnnl::prop_kind::forward_training, md, stat, kEps, flags}, engine());
  Args fargs = {{DNNL_ARG_SRC, mem(md, X.data())},
                {DNNL_ARG_DST, mem(md, Y.data())},
                {DNNL_ARG_MEAN, mem(stat, mean.data())},
                {DNNL_ARG_VARIANCE, mem(stat, var.data())}};
  if (affine) {
    fargs.insert({DNNL_ARG_SCALE, mem(wmd, W.data())});
    fargs.insert({DNNL_ARG_SHIFT, mem(wmd, B.data())});
  }
  run(dnnl::layer_normalization_forward(fpd), fargs);
  const dnnl::layer_normalization_backward::primitive_desc bpd(
      {affine ? dnnl::prop_kind::backward : dnnl::prop_kind::backward_data, md, md, stat, kEps, flags}, engine(), fpd);
  Args bargs = {{DNNL_ARG_SRC, mem(md, X.data())},
                {DNNL_ARG_DIFF_DST, mem(md, dY.data())},
                {DNNL_ARG_MEAN, mem(stat, mean.data())},
                {DNNL_ARG_VARIANCE, mem(stat, var.data())},
                {DNNL_ARG_DIFF_SRC, mem(md, dX.data())}};
  if (affine) {
    bargs.insert({DNNL_ARG_SCALE, mem(wmd, W.data())});
    bargs.insert({DNNL_ARG_SHIFT, mem(wmd, B.data())});
    bargs.insert({DNNL_ARG_DIFF_SCALE, mem(wmd, dW.data())});
    bargs.insert({DNNL_ARG_DIFF_SHIFT, mem(wmd, dB.data())});
  }
  run(dnnl::layer_normalization_backward(bpd), bargs);

  const NormScales sc = norm_scales(
      in.x, in.dy, affine ? w : std::vector<double>{}, affine ? b : std::vector<double>{}, rows,
      [&](std::size_t i) { return i / static_cast<std::size_t>(features); },
      [&](std::size_t i) { return i % static_cast<std::size_t>(features); }, true, kEps);
  expect_agree<T>(as_double(nktest::logical(y)), as_double(Y), sc.y, "y");
  expect_agree<float>(values(cache.mean), as_double(mean), "mean");
  expect_agree<float>(values(cache.rstd), rstd_of(var), "rstd");
  expect_agree<T>(as_double(nktest::logical(dx)), as_double(dX), sc.dx, "dx");
  if (affine) {
    expect_agree<T>(values(grads.weight), as_double(dW), sc.dweight, "dweight");
    expect_agree<T>(values(grads.bias), as_double(dB), sc.dbias, "dbias");
  }
}

template <class T>
void check_layer_norm_all() {
  const std::vector<std::vector<Index>> shapes = {{1},     {5},     {3, 1},       {4, 17},   {7, 33},
                                                  {2, 64}, {5, 100}, {2, 3, 5}, {2, 2, 3, 19}};
  unsigned seed = 100;
  for (const auto& dims : shapes)
    for (double scale : kScales)
      for (bool affine : {true, false}) {
        seed += 10;
        nktest::with_rank(dims.size(), [&](auto r) {
          check_layer_norm<T, decltype(r)::value, Eigen::RowMajor>(dims, affine, scale, seed);
          check_layer_norm<T, decltype(r)::value, Eigen::ColMajor>(dims, affine, scale, seed);
        });
      }
}

TEST(OneDnnPeer, LayerNormMatchesOneDnnLayerNormalization) { check_layer_norm_all<float>(); }

TEST(OneDnnPeer, BFloat16LayerNormMatchesOneDnnBf16LayerNormalization) { check_layer_norm_all<Eigen::bfloat16>(); }

// ---- BatchNorm: batch_normalization_forward / _backward, training and inference.

enum class Format { kNC, kNCHW, kNHWC };

/// `dims`: oneDNN's logical (N, C[, H, W]); normkit's x is the same tensor in the
/// format's memory order (NHWC: (N, H, W, C) with channel_axis -1).
template <class T, int L>
void check_batch_norm(Format format, const std::vector<Index>& dims, bool affine, double scale, unsigned seed) {
  const Index n = nktest::numel(dims), C = dims[1];
  const bool nhwc = format == Format::kNHWC;
  const std::vector<Index> nk_dims = nhwc ? std::vector<Index>{dims[0], dims[2], dims[3], dims[1]} : dims;
  SCOPED_TRACE(std::string(std::is_same_v<T, float> ? "" : "bfloat16 ") + "BatchNorm x " + dims_str(nk_dims) +
               (nhwc ? " NHWC" : "") + (affine ? "" : ", no affine") + ", scale " + std::to_string(scale) +
               (L == Eigen::RowMajor ? ", RowMajor" : ", ColMajor"));
  // The inputs in memory order, which is normkit's logical order.
  const Inputs<T> in(n, seed, scale);
  const std::vector<double> w = nktest::quantized<T>(nktest::random_vector(C, seed + 2, 0.5, 1.5));
  const std::vector<double> b = nktest::quantized<T>(nktest::random_vector(C, seed + 3));
  const std::vector<double> rmean = nktest::quantized<T>(nktest::random_vector(C, seed + 4, -1, 1));
  const std::vector<double> rvar = nktest::quantized<T>(nktest::random_vector(C, seed + 5, 0.2, 2));

  const std::vector<T> X = to_type<T>(in.x), dY = to_type<T>(in.dy);
  const std::vector<float> W = to_float(w), B = to_float(b), RM = to_float(rmean), RV = to_float(rvar);
  std::vector<T> Y(X.size()), Yeval(X.size()), dX(X.size()), dXeval(X.size());
  std::vector<float> mean(static_cast<std::size_t>(C)), var(mean.size()), dW(W.size()), dB(B.size()),
      dWeval(W.size()), dBeval(B.size());
  constexpr memory::data_type dt = dnnl_type<T>();
  const memory::desc md = format == Format::kNC
                              ? memory::desc({dims[0], C}, dt, Tag::ab)
                              : memory::desc({dims[0], C, dims[2], dims[3]}, dt, nhwc ? Tag::nhwc : Tag::nchw);
  const memory::desc cmd({C}, f32, Tag::a);
  const Flags sflags = affine ? Flags::use_scale | Flags::use_shift : Flags::none;
  const auto bprop = affine ? dnnl::prop_kind::backward : dnnl::prop_kind::backward_data;
  auto forward_args = [&](const float* m, const float* v, T* y) {
    Args a = {{DNNL_ARG_SRC, mem(md, X.data())},
              {DNNL_ARG_DST, mem(md, y)},
              {DNNL_ARG_MEAN, mem(cmd, m)},
              {DNNL_ARG_VARIANCE, mem(cmd, v)}};
    if (affine) {
      a.insert({DNNL_ARG_SCALE, mem(cmd, W.data())});
      a.insert({DNNL_ARG_SHIFT, mem(cmd, B.data())});
    }
    return a;
  };
  auto backward_args = [&](const float* m, const float* v, T* dx, float* dw, float* db) {
    Args a = {{DNNL_ARG_SRC, mem(md, X.data())},
              {DNNL_ARG_DIFF_DST, mem(md, dY.data())},
              {DNNL_ARG_MEAN, mem(cmd, m)},
              {DNNL_ARG_VARIANCE, mem(cmd, v)},
              {DNNL_ARG_DIFF_SRC, mem(md, dx)}};
    if (affine) {
      a.insert({DNNL_ARG_SCALE, mem(cmd, W.data())});
      a.insert({DNNL_ARG_SHIFT, mem(cmd, B.data())});
      a.insert({DNNL_ARG_DIFF_SCALE, mem(cmd, dw)});
      a.insert({DNNL_ARG_DIFF_SHIFT, mem(cmd, db)});
    }
    return a;
  };
  // Training: batch statistics out of the forward, into the backward.
  const dnnl::batch_normalization_forward::primitive_desc train_pd({dnnl::prop_kind::forward_training, md, kEps, sflags},
                                                                   engine());
  run(dnnl::batch_normalization_forward(train_pd), forward_args(mean.data(), var.data(), Y.data()));
  run(dnnl::batch_normalization_backward({{bprop, md, md, kEps, sflags}, engine(), train_pd}),
      backward_args(mean.data(), var.data(), dX.data(), dW.data(), dB.data()));
  // Inference with given statistics (normkit's running ones), and its backward.
  const dnnl::batch_normalization_forward::primitive_desc eval_pd(
      {dnnl::prop_kind::forward_training, md, kEps, sflags | Flags::use_global_stats}, engine());
  run(dnnl::batch_normalization_forward(eval_pd), forward_args(RM.data(), RV.data(), Yeval.data()));
  run(dnnl::batch_normalization_backward({{bprop, md, md, kEps, sflags | Flags::use_global_stats}, engine(), eval_pd}),
      backward_args(RM.data(), RV.data(), dXeval.data(), dWeval.data(), dBeval.data()));

  normkit::BatchNorm<T> bn(C, normkit::BatchNormOptions().affine(affine).channel_axis(nhwc ? -1 : 1));
  if (affine) {
    set_values(bn.weight(), w);
    set_values(bn.bias(), b);
  }
  const std::size_t inner = nhwc ? 1 : static_cast<std::size_t>(n / (dims[0] * C)), stride = nhwc ? 1 : inner;
  auto channel = [&](std::size_t i) { return (i / stride) % static_cast<std::size_t>(C); };
  auto compare = [&](bool training, const std::vector<T>& y_peer, const std::vector<T>& dx_peer,
                     const std::vector<float>& dw_peer, const std::vector<float>& db_peer) {
    SCOPED_TRACE(training ? "training" : "inference with given statistics");
    auto run_rank = [&](auto r) {
      constexpr int R = decltype(r)::value;
      const auto x = nktest::make_tensor<T, R, L>(nk_dims, in.x);
      const auto dy = nktest::make_tensor<T, R, L>(nk_dims, in.dy);
      Eigen::Tensor<T, R, L> y(x.dimensions()), dx(x.dimensions());
      typename normkit::BatchNorm<T>::Cache cache;
      typename normkit::BatchNorm<T>::Grads grads;
      bn.train(training);
      set_values(bn.running_mean(), rmean);  // training updates them; inference reads them
      set_values(bn.running_var(), rvar);
      bn.forward(x, y, cache);
      bn.backward(x, dy, cache, dx, grads);
      std::vector<std::pair<double, double>> given;
      if (!training)
        for (std::size_t k = 0; k < static_cast<std::size_t>(C); ++k) given.emplace_back(rmean[k], rvar[k]);
      const NormScales sc = norm_scales(in.x, in.dy, affine ? w : std::vector<double>{},
                                        affine ? b : std::vector<double>{}, C, channel, channel, true, kEps, given);
      expect_agree<T>(as_double(nktest::logical(y)), as_double(y_peer), sc.y, "y");
      if (training) {
        expect_agree<float>(values(cache.mean), as_double(mean), "mean");
        expect_agree<float>(values(cache.invstd), rstd_of(var), "rstd");
      }
      expect_agree<T>(as_double(nktest::logical(dx)), as_double(dx_peer), sc.dx, "dx");
      if (affine) {
        expect_agree<T>(values(grads.weight), as_double(dw_peer), sc.dweight, "dweight");
        expect_agree<T>(values(grads.bias), as_double(db_peer), sc.dbias, "dbias");
      }
    };
    if (nk_dims.size() == 2) run_rank(std::integral_constant<int, 2>{});
    if (nk_dims.size() == 4) run_rank(std::integral_constant<int, 4>{});
  };
  compare(true, Y, dX, dW, dB);
  compare(false, Yeval, dXeval, dWeval, dBeval);
}

template <class T>
void check_batch_norm_all() {
  struct Case {
    Format format;
    std::vector<Index> dims;  // oneDNN's (N, C[, H, W])
  };
  const std::vector<Case> cases = {
      {Format::kNC, {2, 1}},          {Format::kNC, {5, 3}},          {Format::kNC, {8, 20}},
      {Format::kNCHW, {2, 3, 5, 7}},  {Format::kNCHW, {1, 17, 3, 3}}, {Format::kNCHW, {3, 16, 1, 1}},
      {Format::kNHWC, {2, 3, 5, 7}},  {Format::kNHWC, {1, 17, 3, 3}}, {Format::kNHWC, {4, 33, 2, 2}},
  };
  unsigned seed = 500;
  for (const Case& c : cases)
    for (double scale : kScales)
      for (bool affine : {true, false}) {
        seed += 10;
        check_batch_norm<T, Eigen::RowMajor>(c.format, c.dims, affine, scale, seed);
        check_batch_norm<T, Eigen::ColMajor>(c.format, c.dims, affine, scale, seed);
      }
}

TEST(OneDnnPeer, BatchNormMatchesOneDnnBatchNormalization) { check_batch_norm_all<float>(); }

TEST(OneDnnPeer, BFloat16BatchNormMatchesOneDnnBf16BatchNormalization) { check_batch_norm_all<Eigen::bfloat16>(); }

}  // namespace
