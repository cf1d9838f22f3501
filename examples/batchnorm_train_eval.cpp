// batchnorm_train_eval: what BatchNorm does in training and in inference, on a small
// classifier, and what happens when DyT takes its place.
//
// Model: logits = relu(norm(x W1 + b1)) W2 + b2, x [N, 8] -> hidden 32 -> 3 classes,
// trained with SGD + momentum on synthetic Gaussian classes whose 8 features have very
// different scales (0.1 to 10) and an offset of 5, the situation BatchNorm was made for.
//
// 1. Running statistics: BatchNorm keeps running_mean/var as an exponential average
//    (momentum 0.1) of the batch statistics. While the weights change they chase a moving
//    target; once the weights are frozen they converge (error ~0.9^k) to the statistics
//    of the whole data set, up to the noise of the last few batches.
// 2. Train vs eval: in training mode a sample is normalized with its batch's statistics,
//    so its output depends on the other samples in the batch; in eval mode with the
//    running ones, so it is a fixed function of the sample. The gap shrinks as the batch
//    grows (batch statistics get closer to the population's).
// 3. Folding: eval-mode BatchNorm is a per-channel affine map (BatchNorm::fold()), so it
//    folds into the preceding linear layer, W1' = W1 diag(scale), b1' = b1 * scale +
//    shift: the deployed model has no BatchNorm and gives the same outputs.
// 4. DyT in place of BatchNorm (and no normalization at all), same training recipe, over
//    seeds: the DyT paper reports that DyT does not match BatchNorm in ResNet-50/VGG19.
//
//   batchnorm_train_eval [--smoke] [--out DIR]
//   Writes batchnorm_running_stats.csv, batchnorm_train_eval.csv, batchnorm_vs_dyt.csv;
//   plot with plot_batchnorm_train_eval.py.
#include <normkit/normkit.hpp>

#include <Eigen/Dense>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using Eigen::Index;
using Mat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using RowVec = Eigen::Matrix<float, 1, Eigen::Dynamic>;
using TMap = Eigen::TensorMap<Eigen::Tensor<float, 2, Eigen::RowMajor>>;
using CTMap = Eigen::TensorMap<const Eigen::Tensor<float, 2, Eigen::RowMajor>>;

constexpr Index kIn = 8, kHidden = 32, kClasses = 3;

/// No normalization, with the layers' interface.
struct NoNorm {
  struct Cache {};
  struct Grads {};
  explicit NoNorm(Index) {}
  template <class X, class Y>
  void forward(const X& x, Y&& y) { y = x; }
  template <class X, class Y>
  void forward(const X& x, Y&& y, Cache&) { y = x; }
  template <class X, class DY, class DX>
  void backward(const X&, const DY& dy, const Cache&, DX&& dx, Grads&) const { dx = dy; }
};

struct Data {
  Mat x;               // [N, kIn]
  std::vector<int> y;  // [N]
};

/// Gaussian classes around random centres, then each feature scaled by 0.1..10 and
/// shifted by 5: raw features of wildly different ranges.
Data make_data(Index n, std::mt19937& rng) {
  std::mt19937 fixed(123);  // the class centres and feature scales are the same for every set
  std::normal_distribution<float> gauss;
  Mat centre(kClasses, kIn);
  for (Index i = 0; i < centre.size(); ++i) centre.data()[i] = 1.2f * gauss(fixed);
  RowVec scale(kIn);
  for (Index j = 0; j < kIn; ++j) scale(j) = std::pow(10.0f, -1.0f + 2.0f * float(j) / float(kIn - 1));
  Data d;
  d.x.resize(n, kIn);
  d.y.resize(static_cast<std::size_t>(n));
  for (Index i = 0; i < n; ++i) {
    const int c = static_cast<int>(rng() % kClasses);
    d.y[static_cast<std::size_t>(i)] = c;
    for (Index j = 0; j < kIn; ++j) d.x(i, j) = (centre(c, j) + gauss(rng)) * scale(j) + 5.0f;
  }
  return d;
}

template <class Norm>
struct Net {
  Mat W1, W2, dW1, dW2;
  RowVec b1, b2, db1, db2;
  Norm norm{kHidden};
  typename Norm::Cache cache;
  typename Norm::Grads grads;
  Mat h, z, a, logits;  // h = x W1 + b1, z = norm(h), a = relu(z)
  std::vector<std::vector<float>> velocity;

  explicit Net(std::mt19937& rng) {
    std::normal_distribution<float> gauss;
    W1.resize(kIn, kHidden);
    W2.resize(kHidden, kClasses);
    for (Index i = 0; i < W1.size(); ++i) W1.data()[i] = gauss(rng) / std::sqrt(float(kIn));
    for (Index i = 0; i < W2.size(); ++i) W2.data()[i] = gauss(rng) / std::sqrt(float(kHidden));
    b1 = RowVec::Zero(kHidden);
    b2 = RowVec::Zero(kClasses);
  }

  void pre(const Mat& x) {
    h = x * W1;
    h.rowwise() += b1;
    z.resize(h.rows(), h.cols());
  }
  void post() {
    a = z.cwiseMax(0.0f);
    logits = a * W2;
    logits.rowwise() += b2;
  }
  /// Training forward (batch statistics for BatchNorm); returns the mean cross-entropy.
  double forward_train(const Mat& x, const std::vector<int>& y, Index first) {
    pre(x);
    norm.forward(CTMap(h.data(), h.rows(), h.cols()), TMap(z.data(), z.rows(), z.cols()), cache);
    post();
    return loss(y, first);
  }
  /// Inference forward: the logits only, running statistics for BatchNorm.
  const Mat& predict(const Mat& x) {
    pre(x);
    if constexpr (std::is_same_v<Norm, normkit::BatchNorm<float>>) norm.eval();
    norm.forward(CTMap(h.data(), h.rows(), h.cols()), TMap(z.data(), z.rows(), z.cols()));
    if constexpr (std::is_same_v<Norm, normkit::BatchNorm<float>>) norm.train();
    post();
    return logits;
  }
  double loss(const std::vector<int>& y, Index first) const {
    double l = 0;
    for (Index i = 0; i < logits.rows(); ++i) {
      const float mx = logits.row(i).maxCoeff();
      const double lse = mx + std::log((logits.row(i).array() - mx).exp().sum());
      l += lse - logits(i, y[static_cast<std::size_t>(first + i)]);
    }
    return l / double(logits.rows());
  }
  void backward(const Mat& x, const std::vector<int>& y, Index first) {
    const Index n = logits.rows();
    Mat dlogits(n, kClasses);
    for (Index i = 0; i < n; ++i) {
      dlogits.row(i) = (logits.row(i).array() - logits.row(i).maxCoeff()).exp();
      dlogits.row(i) /= dlogits.row(i).sum();
      dlogits(i, y[static_cast<std::size_t>(first + i)]) -= 1.0f;
    }
    dlogits /= float(n);
    dW2.noalias() = a.transpose() * dlogits;
    db2 = dlogits.colwise().sum();
    const Mat dz = ((dlogits * W2.transpose()).array() * (z.array() > 0.0f).cast<float>()).matrix();
    Mat dh(n, kHidden);
    norm.backward(CTMap(h.data(), n, kHidden), CTMap(dz.data(), n, kHidden), cache, TMap(dh.data(), n, kHidden),
                  grads);
    dW1.noalias() = x.transpose() * dh;
    db1 = dh.colwise().sum();
  }
  template <class F>
  void for_each_param(F&& f) {
    f(W1.data(), dW1.data(), W1.size());
    f(b1.data(), db1.data(), b1.size());
    f(W2.data(), dW2.data(), W2.size());
    f(b2.data(), db2.data(), b2.size());
    if constexpr (!std::is_same_v<Norm, NoNorm>) {
      if constexpr (std::is_same_v<Norm, normkit::DyT<float>>) f(&norm.alpha(), &grads.alpha, 1);
      f(norm.weight().data(), grads.weight.data(), norm.weight().size());
      f(norm.bias().data(), grads.bias.data(), norm.bias().size());
    }
  }
  void sgd(float lr, float momentum) {
    std::size_t i = 0;
    for_each_param([&](float* w, const float* g, Index n) {
      if (velocity.size() <= i) velocity.emplace_back(static_cast<std::size_t>(n), 0.0f);
      for (Index j = 0; j < n; ++j) {
        velocity[i][j] = momentum * velocity[i][j] + g[j];
        w[j] -= lr * velocity[i][j];
      }
      ++i;
    });
  }
  double accuracy(const Data& d) {
    const Mat& l = predict(d.x);
    Index right = 0;
    for (Index i = 0; i < l.rows(); ++i) {
      Index arg;
      l.row(i).maxCoeff(&arg);
      right += arg == d.y[static_cast<std::size_t>(i)];
    }
    return double(right) / double(l.rows());
  }
};

/// Largest |running - population| of the pre-norm activations h over the whole training
/// set, relative to the population standard deviation (mean) and variance (var).
std::pair<double, double> running_stats_error(Net<normkit::BatchNorm<float>>& net, const Data& train) {
  net.pre(train.x);
  const Eigen::ArrayXd mean = net.h.cast<double>().colwise().mean().transpose();
  const Eigen::ArrayXd var =
      (net.h.cast<double>().rowwise() - mean.matrix().transpose()).array().square().colwise().sum().transpose() /
      double(net.h.rows() - 1);
  double em = 0, ev = 0;
  for (Index c = 0; c < kHidden; ++c) {
    em = std::max(em, std::fabs(net.norm.running_mean()(c) - mean(c)) / std::sqrt(var(c)));
    ev = std::max(ev, std::fabs(net.norm.running_var()(c) - var(c)) / var(c));
  }
  return {em, ev};
}

struct Schedule {
  int epochs;
  Index batch;
  float lr, momentum;
};

template <class Norm, class OnStep>
void train(Net<Norm>& net, const Data& d, const Schedule& s, std::mt19937& rng, OnStep&& on_step) {
  std::vector<Index> order(static_cast<std::size_t>(d.x.rows()));
  std::iota(order.begin(), order.end(), Index(0));
  Data shuffled = d;
  int step = 0;
  for (int e = 0; e < s.epochs; ++e) {
    std::shuffle(order.begin(), order.end(), rng);
    for (Index i = 0; i < d.x.rows(); ++i) {
      shuffled.x.row(i) = d.x.row(order[i]);
      shuffled.y[static_cast<std::size_t>(i)] = d.y[static_cast<std::size_t>(order[i])];
    }
    for (Index b = 0; b + s.batch <= d.x.rows(); b += s.batch) {
      const Mat xb = shuffled.x.middleRows(b, s.batch);
      net.forward_train(xb, shuffled.y, b);
      net.backward(xb, shuffled.y, b);
      net.sgd(s.lr, s.momentum);
      on_step(++step);
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  bool smoke = false;
  std::string out = ".";
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--smoke")) smoke = true;
    else if (!std::strcmp(argv[i], "--out") && i + 1 < argc) out = argv[++i];
    else {
      std::fprintf(stderr, "usage: %s [--smoke] [--out DIR]\n", argv[0]);
      return 2;
    }
  }
  bool ok = true;
  const auto check = [&](bool cond, const char* what) {
    if (!cond) std::printf("FAIL: %s\n", what);
    ok = ok && cond;
  };
  std::mt19937 data_rng(1);
  const Data train_set = make_data(smoke ? 1024 : 4096, data_rng), test_set = make_data(1024, data_rng);
  const Schedule sched{smoke ? 3 : 10, 32, 0.02f, 0.9f};

  // 1. Running statistics while training, then with the weights frozen.
  std::printf("1. BatchNorm running statistics vs the statistics of h = x W1 + b1 over the training set\n");
  std::printf("   (max over channels; mean error in population sd, var error relative)\n");
  std::mt19937 rng(10);
  Net<normkit::BatchNorm<float>> bn(rng);
  std::vector<std::array<double, 3>> trace;  // step, mean error, var error
  const int every = 10;
  train(bn, train_set, sched, rng, [&](int step) {
    if (step % every) return;
    const auto [em, ev] = running_stats_error(bn, train_set);
    trace.push_back({double(step), em, ev});
  });
  const int trained_steps = static_cast<int>(trace.back()[0]);
  const auto [em_trained, ev_trained] = running_stats_error(bn, train_set);
  // Frozen weights: train-mode forwards only (they update the running statistics).
  std::uniform_int_distribution<Index> pick(0, train_set.x.rows() / sched.batch - 1);
  for (int k = 1; k <= 100; ++k) {
    const Index b = pick(rng) * sched.batch;
    bn.forward_train(train_set.x.middleRows(b, sched.batch), train_set.y, b);
    const auto [em, ev] = running_stats_error(bn, train_set);
    trace.push_back({double(trained_steps + k), em, ev});
    if (k == 10 || k == 50 || k == 100)
      std::printf("   frozen weights, %3d more train-mode batches: mean error %.4f, var error %.4f\n", k, em, ev);
  }
  std::printf("   end of training (%d steps): mean error %.4f, var error %.4f\n", trained_steps, em_trained,
              ev_trained);
  const double em_final = trace.back()[1], ev_final = trace.back()[2];
  check(em_final < 0.1 && ev_final < 0.2, "running statistics converge once the weights are frozen");

  // 2. Train-mode vs eval-mode outputs on test data, by batch size.
  std::printf("\n2. train-mode (batch statistics) vs eval-mode (running statistics) BatchNorm output\n");
  std::printf("   %-10s %s\n", "batch", "mean |y_train - y_eval| (y has unit scale)");
  std::vector<std::pair<Index, double>> gap;
  for (Index batch : {2, 4, 8, 32, 128, 1024}) {
    normkit::BatchNorm<float> probe = bn.norm;  // a copy: train-mode forwards update running stats
    Mat h = test_set.x * bn.W1;
    h.rowwise() += bn.b1;
    Mat ytrain(h.rows(), kHidden), yeval(h.rows(), kHidden);
    probe.eval();
    probe.forward(CTMap(h.data(), h.rows(), kHidden), TMap(yeval.data(), h.rows(), kHidden));
    probe.train();
    for (Index b = 0; b + batch <= h.rows(); b += batch)
      probe.forward(CTMap(h.data() + b * kHidden, batch, kHidden), TMap(ytrain.data() + b * kHidden, batch, kHidden));
    const Index used = h.rows() / batch * batch;
    const double g = (ytrain.topRows(used) - yeval.topRows(used)).cwiseAbs().mean();
    gap.push_back({batch, g});
    std::printf("   %-10ld %.4f\n", static_cast<long>(batch), g);
  }
  {
    // The same sample in two batches: different train-mode outputs, one eval-mode output.
    normkit::BatchNorm<float> probe = bn.norm;
    Mat h = test_set.x.topRows(64) * bn.W1;
    h.rowwise() += bn.b1;
    Mat y1(8, kHidden), y2(8, kHidden);
    Mat other(8, kHidden);
    other.row(0) = h.row(0);
    other.bottomRows(7) = h.middleRows(32, 7);
    probe.forward(CTMap(h.data(), 8, kHidden), TMap(y1.data(), 8, kHidden));
    probe.forward(CTMap(other.data(), 8, kHidden), TMap(y2.data(), 8, kHidden));
    std::printf("   sample 0 in two batches of 8, train mode: first outputs %.4f vs %.4f\n", y1(0, 0), y2(0, 0));
  }
  check(gap.front().second > 4 * gap.back().second, "the train/eval gap shrinks with the batch size");

  // 3. Folding into the linear layer.
  const auto f = bn.norm.fold();
  Mat W1f = bn.W1;
  RowVec b1f = bn.b1;
  for (Index c = 0; c < kHidden; ++c) {
    W1f.col(c) *= f.scale(c);
    b1f(c) = bn.b1(c) * f.scale(c) + f.shift(c);
  }
  const Mat logits = bn.predict(test_set.x);
  Mat zf = test_set.x * W1f;
  zf.rowwise() += b1f;
  Mat logits_f = zf.cwiseMax(0.0f) * bn.W2;
  logits_f.rowwise() += bn.b2;
  const double fold_diff = (logits - logits_f).cwiseAbs().maxCoeff() / logits.cwiseAbs().maxCoeff();
  std::printf("\n3. BatchNorm folded into W1, b1: max |logits - folded logits| / max |logits| = %.2e\n", fold_diff);
  check(fold_diff < 1e-5, "the folded model gives the same logits (float rounding only)");

  // 4. BatchNorm vs DyT vs nothing, same recipe, several seeds.
  const int seeds = smoke ? 2 : 5;
  std::printf("\n4. test accuracy after %d epochs (SGD lr %.2g, momentum %.1f, batch %ld), %d seeds\n", sched.epochs,
              double(sched.lr), double(sched.momentum), static_cast<long>(sched.batch), seeds);
  const char* names[] = {"BatchNorm", "DyT", "none"};
  std::vector<std::vector<double>> acc(3);
  for (int s = 0; s < seeds; ++s) {
    std::mt19937 r0(100 + s), r1(100 + s), r2(100 + s);  // the same init and data order
    Net<normkit::BatchNorm<float>> n0(r0);
    Net<normkit::DyT<float>> n1(r1);
    Net<NoNorm> n2(r2);
    train(n0, train_set, sched, r0, [](int) {});
    train(n1, train_set, sched, r1, [](int) {});
    train(n2, train_set, sched, r2, [](int) {});
    acc[0].push_back(n0.accuracy(test_set));
    acc[1].push_back(n1.accuracy(test_set));
    acc[2].push_back(n2.accuracy(test_set));
  }
  double mean[3];
  for (int v = 0; v < 3; ++v) {
    double m = 0, sd = 0;
    for (double a : acc[v]) m += a;
    m /= seeds;
    for (double a : acc[v]) sd += (a - m) * (a - m);
    sd = std::sqrt(sd / (seeds - 1));
    mean[v] = m;
    std::printf("   %-10s %.4f +- %.4f   (", names[v], m, sd);
    for (double a : acc[v]) std::printf(" %.3f", a);
    std::printf(" )\n");
  }
  check(mean[0] > 0.6, "the BatchNorm classifier learns (chance is 1/3)");

  const auto open = [&](const char* name) {
    const std::string p = out + "/" + name;
    FILE* fp = std::fopen(p.c_str(), "w");
    if (!fp) std::fprintf(stderr, "cannot write %s\n", p.c_str());
    return fp;
  };
  FILE* f1 = open("batchnorm_running_stats.csv");
  FILE* f2 = open("batchnorm_train_eval.csv");
  FILE* f3 = open("batchnorm_vs_dyt.csv");
  if (!f1 || !f2 || !f3) return 1;
  std::fprintf(f1, "step,phase,mean_error,var_error\n");
  for (const auto& t : trace)
    std::fprintf(f1, "%d,%s,%.6f,%.6f\n", int(t[0]), t[0] > trained_steps ? "frozen" : "training", t[1], t[2]);
  std::fprintf(f2, "batch,mean_abs_train_minus_eval\n");
  for (const auto& g : gap) std::fprintf(f2, "%ld,%.6f\n", static_cast<long>(g.first), g.second);
  std::fprintf(f3, "norm,seed,test_accuracy\n");
  for (int v = 0; v < 3; ++v)
    for (int s = 0; s < seeds; ++s) std::fprintf(f3, "%s,%d,%.6f\n", names[v], s, acc[v][s]);
  std::fclose(f1);
  std::fclose(f2);
  std::fclose(f3);
  std::printf("\nwrote batchnorm_running_stats.csv, batchnorm_train_eval.csv, batchnorm_vs_dyt.csv in %s\n",
              out.c_str());
  std::printf(ok ? "OK\n" : "FAILED\n");
  return ok ? 0 : 1;
}
