// transformer_dyt: does DyT train a Transformer as well as LayerNorm? Measured, with
// seeds and a significance test, on a block small enough to read in one sitting.
//
// Model: one pre-norm Transformer block and a final norm, as in GPT-2/LLaMA,
//
//   x0 = E[token] + P[position]                       [B*T, d]
//   x1 = x0 + Attention(norm1(x0))                    single head, no mask
//   x2 = x1 + W2 relu(W1 norm2(x1) + b1) + b2         MLP, hidden m
//   logits = normf(x2) Wh + bh                        [B*T, V], cross-entropy per token
//
// with norm = LayerNorm, RMSNorm, DyT or nothing (the same code: the layers share their
// interface). Single-head attention rather than an MLP-mixer: attention is what DyT
// replaces LayerNorm around in the paper, and its hand-written backward is ~20 lines
// (dS = P * (dP - rowsum(dP * P))), checked below against finite differences.
//
// Task: sort a sequence of T tokens from a vocabulary of V (the target at position i is
// the i-th smallest token). The model must compare every token with every other one.
//
// Protocol: every variant trains with the same Adam settings (not tuned per variant),
// the same data and the same initial weights per seed; the final loss is the mean
// cross-entropy on a held-out set of sequences. Reported: mean +- sd over seeds per
// variant, Welch's t-test DyT vs LayerNorm (p-value from the Student t CDF through the
// regularized incomplete beta function), time per training step (one thread).
//
//   transformer_dyt [--smoke] [--seeds N] [--steps N] [--out DIR]
//   --smoke: finite-difference check of the whole model's backward (double) for every
//            variant, the t-test's p-value against a table value, and a short training
//            that must lower the loss; a few seconds. Without it: the full comparison,
//            transformer_dyt_{summary,curves}.csv, plot with plot_transformer_dyt.py.
#include <normkit/normkit.hpp>

#include <Eigen/Dense>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using Eigen::Index;
template <class T>
using Mat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class T>
using RowVec = Eigen::Matrix<T, 1, Eigen::Dynamic>;
template <class T>
using TMap = Eigen::TensorMap<Eigen::Tensor<T, 2, Eigen::RowMajor>>;
template <class T>
using CTMap = Eigen::TensorMap<const Eigen::Tensor<T, 2, Eigen::RowMajor>>;

/// The "no normalization" variant: the identity, with the layers' interface.
template <class T>
struct NoNorm {
  struct Cache {};
  struct Grads {};
  explicit NoNorm(Index) {}
  template <class X, class Y>
  void forward(const X& x, Y&& y, Cache&) { y = x; }
  template <class X, class DY, class DX>
  void backward(const X&, const DY& dy, const Cache&, DX&& dx, Grads&) const { dx = dy; }
};

struct Config {
  Index T = 16;    // sequence length
  Index V = 16;    // vocabulary
  Index d = 32;    // model width
  Index m = 64;    // MLP hidden width
  Index B = 32;    // sequences per batch
};

/// A batch of the sorting task: tokens and targets, [B, T] row-major.
struct Batch {
  std::vector<int> tok, target;
};

Batch make_batch(const Config& c, Index B, std::mt19937& rng) {
  std::uniform_int_distribution<int> u(0, static_cast<int>(c.V) - 1);
  Batch b;
  b.tok.resize(static_cast<std::size_t>(B * c.T));
  for (int& t : b.tok) t = u(rng);
  b.target = b.tok;
  for (Index s = 0; s < B; ++s) std::sort(b.target.begin() + s * c.T, b.target.begin() + (s + 1) * c.T);
  return b;
}

template <class T, class Norm>
struct Model {
  Config c;
  Mat<T> E, P, Wq, Wk, Wv, Wo, W1, W2, Wh;
  RowVec<T> b1, b2, bh;
  Norm norm1, norm2, normf;
  // Gradients, same shapes.
  Mat<T> dE, dP, dWq, dWk, dWv, dWo, dW1, dW2, dWh;
  RowVec<T> db1, db2, dbh;
  typename Norm::Grads g1, g2, gf;
  // Activations kept for backward. Rows are tokens: [B*T, .].
  Mat<T> x0, n1, q, k, v, att, o, x1, n2, h, g, x2, n3, logits, prob;
  typename Norm::Cache c1, c2, cf;

  Model(const Config& cfg, std::mt19937& rng) : c(cfg), norm1(cfg.d), norm2(cfg.d), normf(cfg.d) {
    std::normal_distribution<double> gauss;
    const auto init = [&](Mat<T>& w, Index r, Index cols, double sd) {
      w.resize(r, cols);
      for (Index i = 0; i < w.size(); ++i) w.data()[i] = static_cast<T>(sd * gauss(rng));
    };
    const double sd = 1 / std::sqrt(double(c.d));
    init(E, c.V, c.d, 1.0);
    init(P, c.T, c.d, 1.0);
    init(Wq, c.d, c.d, sd);
    init(Wk, c.d, c.d, sd);
    init(Wv, c.d, c.d, sd);
    init(Wo, c.d, c.d, sd);
    init(W1, c.d, c.m, sd);
    init(W2, c.m, c.d, 1 / std::sqrt(double(c.m)));
    init(Wh, c.d, c.V, sd);
    b1 = RowVec<T>::Zero(c.m);
    b2 = RowVec<T>::Zero(c.d);
    bh = RowVec<T>::Zero(c.V);
  }

  template <class N>
  static void norm_forward(N& norm, const Mat<T>& x, Mat<T>& y, typename N::Cache& cache) {
    y.resize(x.rows(), x.cols());
    norm.forward(CTMap<T>(x.data(), x.rows(), x.cols()), TMap<T>(y.data(), y.rows(), y.cols()), cache);
  }
  template <class N>
  static Mat<T> norm_backward(N& norm, const Mat<T>& x, const Mat<T>& dy, const typename N::Cache& cache,
                              typename N::Grads& grads) {
    Mat<T> dx(x.rows(), x.cols());
    norm.backward(CTMap<T>(x.data(), x.rows(), x.cols()), CTMap<T>(dy.data(), dy.rows(), dy.cols()), cache,
                  TMap<T>(dx.data(), dx.rows(), dx.cols()), grads);
    return dx;
  }

  /// Mean cross-entropy over the batch's tokens; keeps what backward needs.
  double forward(const Batch& b) {
    const Index BT = static_cast<Index>(b.tok.size()), T_ = c.T;
    x0.resize(BT, c.d);
    for (Index i = 0; i < BT; ++i) x0.row(i) = E.row(b.tok[i]) + P.row(i % T_);
    norm_forward(norm1, x0, n1, c1);
    q = n1 * Wq;
    k = n1 * Wk;
    v = n1 * Wv;
    att.resize(BT, T_);
    o.resize(BT, c.d);
    const T scale = T(1) / std::sqrt(T(c.d));
    for (Index s = 0; s < BT / T_; ++s) {
      auto a = att.middleRows(s * T_, T_);
      a.noalias() = q.middleRows(s * T_, T_) * k.middleRows(s * T_, T_).transpose() * scale;
      for (Index i = 0; i < T_; ++i) {  // softmax per row, shifted by its max
        a.row(i).array() = (a.row(i).array() - a.row(i).maxCoeff()).exp();
        a.row(i) /= a.row(i).sum();
      }
      o.middleRows(s * T_, T_).noalias() = a * v.middleRows(s * T_, T_);
    }
    x1 = x0 + o * Wo;
    norm_forward(norm2, x1, n2, c2);
    h = (n2 * W1).rowwise() + b1;
    g = h.cwiseMax(T(0));
    x2 = g * W2;
    x2.rowwise() += b2;
    x2 += x1;
    norm_forward(normf, x2, n3, cf);
    logits = (n3 * Wh).rowwise() + bh;
    prob.resize(BT, c.V);
    double loss = 0;
    for (Index i = 0; i < BT; ++i) {
      const T mx = logits.row(i).maxCoeff();
      prob.row(i) = (logits.row(i).array() - mx).exp();
      const T z = prob.row(i).sum();
      prob.row(i) /= z;
      loss += -(static_cast<double>(logits(i, b.target[i]) - mx) - std::log(static_cast<double>(z)));
    }
    return loss / static_cast<double>(BT);
  }

  /// Fills every gradient (overwriting) for the batch of the last forward.
  void backward(const Batch& b) {
    const Index BT = static_cast<Index>(b.tok.size()), T_ = c.T;
    Mat<T> dlogits = prob;  // d(mean CE)/dlogits = (softmax - onehot) / BT
    for (Index i = 0; i < BT; ++i) dlogits(i, b.target[i]) -= T(1);
    dlogits /= static_cast<T>(BT);
    dWh.noalias() = n3.transpose() * dlogits;
    dbh = dlogits.colwise().sum();
    const Mat<T> dn3 = dlogits * Wh.transpose();
    const Mat<T> dx2 = norm_backward(normf, x2, dn3, cf, gf);
    // MLP branch (dx2 flows to x1 through the residual too).
    dW2.noalias() = g.transpose() * dx2;
    db2 = dx2.colwise().sum();
    const Mat<T> dh = ((dx2 * W2.transpose()).array() * (h.array() > T(0)).template cast<T>()).matrix();
    dW1.noalias() = n2.transpose() * dh;
    db1 = dh.colwise().sum();
    const Mat<T> dn2 = dh * W1.transpose();
    const Mat<T> dx1 = dx2 + norm_backward(norm2, x1, dn2, c2, g2);
    // Attention branch.
    dWo.noalias() = o.transpose() * dx1;
    const Mat<T> dout = dx1 * Wo.transpose();
    Mat<T> dq(BT, c.d), dk(BT, c.d), dv(BT, c.d);
    const T scale = T(1) / std::sqrt(T(c.d));
    for (Index s = 0; s < BT / T_; ++s) {
      const auto a = att.middleRows(s * T_, T_);
      const auto dos = dout.middleRows(s * T_, T_);
      const Mat<T> da = dos * v.middleRows(s * T_, T_).transpose();
      dv.middleRows(s * T_, T_).noalias() = a.transpose() * dos;
      // softmax backward: dS = A * (dA - rowsum(dA * A))
      const Eigen::Matrix<T, Eigen::Dynamic, 1> r = (da.array() * a.array()).rowwise().sum();
      const Mat<T> ds = (a.array() * (da.colwise() - r).array()).matrix() * scale;
      dq.middleRows(s * T_, T_).noalias() = ds * k.middleRows(s * T_, T_);
      dk.middleRows(s * T_, T_).noalias() = ds.transpose() * q.middleRows(s * T_, T_);
    }
    dWq.noalias() = n1.transpose() * dq;
    dWk.noalias() = n1.transpose() * dk;
    dWv.noalias() = n1.transpose() * dv;
    const Mat<T> dn1 = dq * Wq.transpose() + dk * Wk.transpose() + dv * Wv.transpose();
    const Mat<T> dx0 = dx1 + norm_backward(norm1, x0, dn1, c1, g1);
    dE = Mat<T>::Zero(c.V, c.d);
    dP = Mat<T>::Zero(c.T, c.d);
    for (Index i = 0; i < BT; ++i) {
      dE.row(b.tok[i]) += dx0.row(i);
      dP.row(i % T_) += dx0.row(i);
    }
  }

  /// f(name, param, grad, size) for every parameter, the norms' included.
  template <class F>
  void for_each_param(F&& f) {
    f("E", E.data(), dE.data(), E.size());
    f("P", P.data(), dP.data(), P.size());
    f("Wq", Wq.data(), dWq.data(), Wq.size());
    f("Wk", Wk.data(), dWk.data(), Wk.size());
    f("Wv", Wv.data(), dWv.data(), Wv.size());
    f("Wo", Wo.data(), dWo.data(), Wo.size());
    f("W1", W1.data(), dW1.data(), W1.size());
    f("b1", b1.data(), db1.data(), b1.size());
    f("W2", W2.data(), dW2.data(), W2.size());
    f("b2", b2.data(), db2.data(), b2.size());
    f("Wh", Wh.data(), dWh.data(), Wh.size());
    f("bh", bh.data(), dbh.data(), bh.size());
    norm_params("norm1", norm1, g1, f);
    norm_params("norm2", norm2, g2, f);
    norm_params("normf", normf, gf, f);
  }

  template <class F>
  static void norm_params(const std::string& name, Norm& n, typename Norm::Grads& gr, F& f) {
    if constexpr (!std::is_same_v<Norm, NoNorm<T>>) {
      if constexpr (std::is_same_v<Norm, normkit::DyT<T>>) f(name + ".alpha", &n.alpha(), &gr.alpha, 1);
      f(name + ".weight", n.weight().data(), gr.weight.data(), n.weight().size());
      if constexpr (!std::is_same_v<Norm, normkit::RMSNorm<T>>)
        f(name + ".bias", n.bias().data(), gr.bias.data(), n.bias().size());
    }
  }
};

/// Adam (Kingma & Ba) over Model::for_each_param, state in the order of the parameters.
template <class T>
struct Adam {
  double lr = 3e-3, b1 = 0.9, b2 = 0.999, eps = 1e-8;
  std::vector<std::vector<double>> m, v;
  long t = 0;
  template <class M>
  void step(M& model) {
    ++t;
    std::size_t i = 0;
    const double c1 = 1 - std::pow(b1, double(t)), c2 = 1 - std::pow(b2, double(t));
    model.for_each_param([&](const std::string&, T* w, const T* g, Index n) {
      if (m.size() <= i) {
        m.emplace_back(static_cast<std::size_t>(n), 0.0);
        v.emplace_back(static_cast<std::size_t>(n), 0.0);
      }
      for (Index j = 0; j < n; ++j) {
        m[i][j] = b1 * m[i][j] + (1 - b1) * g[j];
        v[i][j] = b2 * v[i][j] + (1 - b2) * double(g[j]) * g[j];
        w[j] = static_cast<T>(w[j] - lr * (m[i][j] / c1) / (std::sqrt(v[i][j] / c2) + eps));
      }
      ++i;
    });
  }
};

/// Largest relative error of the analytic gradient against central differences, over
/// up to 4 entries of every parameter (double, a small model).
template <class Norm>
double gradient_check(std::mt19937& rng) {
  Config c;
  c.T = 5, c.V = 6, c.d = 8, c.m = 12, c.B = 2;
  Model<double, Norm> model(c, rng);
  // Non-trivial norm parameters, so that their gradients are checked away from 1 and 0.
  std::uniform_real_distribution<double> u(0.5, 1.5);
  model.for_each_param([&](const std::string& name, double* w, const double*, Index n) {
    if (name.find("norm") == 0)
      for (Index j = 0; j < n; ++j) w[j] = u(rng) * (name.find("bias") != std::string::npos ? 0.3 : 1.0);
  });
  const Batch b = make_batch(c, c.B, rng);
  model.forward(b);
  model.backward(b);
  std::vector<std::pair<std::string, std::vector<double>>> grads;  // analytic, copied
  model.for_each_param([&](const std::string& name, double*, const double* g, Index n) {
    grads.emplace_back(name, std::vector<double>(g, g + n));
  });
  double worst = 0;
  std::size_t p = 0;
  model.for_each_param([&](const std::string& name, double* w, const double*, Index n) {
    for (int probe = 0; probe < 4 && probe < n; ++probe) {
      const Index j = std::uniform_int_distribution<Index>(0, n - 1)(rng);
      const double h = 1e-5, w0 = w[j];
      w[j] = w0 + h;
      const double lp = model.forward(b);
      w[j] = w0 - h;
      const double lm = model.forward(b);
      w[j] = w0;
      const double num = (lp - lm) / (2 * h), ana = grads[p].second[j];
      const double err = std::fabs(num - ana) / std::max(1e-6, std::fabs(num) + std::fabs(ana));
      if (err > worst) worst = err;
      if (err > 1e-5)
        std::printf("  %s[%ld]: analytic %.10g, finite difference %.10g\n", name.c_str(), static_cast<long>(j),
                    ana, num);
    }
    ++p;
  });
  return worst;
}

/// Two-sided p-value of Student's t with df degrees of freedom:
/// P(|t'| > |t|) = I_{df / (df + t^2)}(df / 2, 1 / 2).
double incomplete_beta_cf(double a, double b, double x) {
  // Continued fraction of the regularized incomplete beta (modified Lentz).
  const double tiny = 1e-300;
  double c = 1, d = 1 - (a + b) * x / (a + 1);
  if (std::fabs(d) < tiny) d = tiny;
  d = 1 / d;
  double f = d;
  for (int m = 1; m <= 300; ++m) {
    const double m2 = 2.0 * m;
    double aa = m * (b - m) * x / ((a + m2 - 1) * (a + m2));
    d = 1 + aa * d;
    c = 1 + aa / c;
    if (std::fabs(d) < tiny) d = tiny;
    if (std::fabs(c) < tiny) c = tiny;
    d = 1 / d;
    f *= d * c;
    aa = -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1));
    d = 1 + aa * d;
    c = 1 + aa / c;
    if (std::fabs(d) < tiny) d = tiny;
    if (std::fabs(c) < tiny) c = tiny;
    d = 1 / d;
    const double delta = d * c;
    f *= delta;
    if (std::fabs(delta - 1) < 1e-15) break;
  }
  return f;
}

double regularized_incomplete_beta(double a, double b, double x) {
  if (x <= 0) return 0;
  if (x >= 1) return 1;
  const double front =
      std::exp(std::lgamma(a + b) - std::lgamma(a) - std::lgamma(b) + a * std::log(x) + b * std::log1p(-x));
  if (x < (a + 1) / (a + b + 2)) return front * incomplete_beta_cf(a, b, x) / a;
  return 1 - front * incomplete_beta_cf(b, a, 1 - x) / b;
}

double student_t_two_sided_p(double t, double df) {
  return regularized_incomplete_beta(df / 2, 0.5, df / (df + t * t));
}

struct Stats {
  double mean = 0, sd = 0;
  std::size_t n = 0;
};

Stats stats_of(const std::vector<double>& x) {
  Stats s;
  s.n = x.size();
  for (double v : x) s.mean += v;
  s.mean /= static_cast<double>(s.n);
  for (double v : x) s.sd += (v - s.mean) * (v - s.mean);
  s.sd = s.n > 1 ? std::sqrt(s.sd / static_cast<double>(s.n - 1)) : 0;
  return s;
}

struct Welch {
  double t, df, p;
};

Welch welch(const std::vector<double>& a, const std::vector<double>& b) {
  const Stats sa = stats_of(a), sb = stats_of(b);
  const double va = sa.sd * sa.sd / double(sa.n), vb = sb.sd * sb.sd / double(sb.n);
  const double t = (sa.mean - sb.mean) / std::sqrt(va + vb);
  const double df = (va + vb) * (va + vb) / (va * va / double(sa.n - 1) + vb * vb / double(sb.n - 1));
  return {t, df, student_t_two_sided_p(t, df)};
}

struct RunResult {
  double eval_loss = 0, eval_acc = 0, ms_per_step = 0, first_loss = 0;
  std::vector<double> curve;  // training loss, mean over windows of `window` steps
};

template <class Norm>
RunResult train(const Config& c, int seed, int steps, int window, const Batch& held_out) {
  std::mt19937 init_rng(1000 + seed), data_rng(2000 + seed);  // same per seed for every variant
  Model<float, Norm> model(c, init_rng);
  Adam<float> adam;
  RunResult r;
  double acc = 0;
  const auto t0 = std::chrono::steady_clock::now();
  for (int step = 0; step < steps; ++step) {
    const Batch b = make_batch(c, c.B, data_rng);
    const double loss = model.forward(b);
    model.backward(b);
    adam.step(model);
    if (step == 0) r.first_loss = loss;
    acc += loss;
    if ((step + 1) % window == 0) {
      r.curve.push_back(acc / window);
      acc = 0;
    }
  }
  const auto t1 = std::chrono::steady_clock::now();
  r.ms_per_step = std::chrono::duration<double, std::milli>(t1 - t0).count() / steps;
  r.eval_loss = model.forward(held_out);
  Index right = 0;
  for (Index i = 0; i < model.prob.rows(); ++i) {
    Index arg;
    model.prob.row(i).maxCoeff(&arg);
    right += arg == held_out.target[static_cast<std::size_t>(i)];
  }
  r.eval_acc = double(right) / double(model.prob.rows());
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  bool smoke = false;
  int seeds = 8, steps = 1500;
  std::string out = ".";
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--smoke")) smoke = true;
    else if (!std::strcmp(argv[i], "--seeds") && i + 1 < argc) seeds = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--steps") && i + 1 < argc) steps = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--out") && i + 1 < argc) out = argv[++i];
    else {
      std::fprintf(stderr, "usage: %s [--smoke] [--seeds N] [--steps N] [--out DIR]\n", argv[0]);
      return 2;
    }
  }
  bool ok = true;

  if (smoke) {
    // 1. The hand-written backward of the whole model, for each norm, in double.
    std::mt19937 rng(7);
    const double e[] = {gradient_check<normkit::LayerNorm<double>>(rng),
                        gradient_check<normkit::RMSNorm<double>>(rng), gradient_check<normkit::DyT<double>>(rng),
                        gradient_check<NoNorm<double>>(rng)};
    const char* names[] = {"LayerNorm", "RMSNorm", "DyT", "none"};
    for (int i = 0; i < 4; ++i) {
      std::printf("gradient check %-9s: max relative error %.2e (must be < 1e-5)\n", names[i], e[i]);
      ok = ok && e[i] < 1e-5;
    }
    // 2. The p-value: t = 2.228 with 10 df is the two-sided 5% point (tables: 2.2281).
    const double p = student_t_two_sided_p(2.228139, 10);
    std::printf("Student t: p(|t| > 2.228139; df 10) = %.6f (table: 0.05)\n", p);
    ok = ok && std::fabs(p - 0.05) < 1e-5;
    seeds = 2;
    steps = 60;
  }

  Config c;
  std::mt19937 held_rng(99);
  const Batch held_out = make_batch(c, 256, held_rng);
  const int window = smoke ? 10 : 25;
  const char* variants[] = {"LayerNorm", "RMSNorm", "DyT", "none"};
  std::vector<std::vector<RunResult>> res(4);
  std::printf("\nsorting %ld tokens of %ld, d %ld, MLP %ld, batch %ld sequences; Adam lr 3e-3; %d steps, %d seeds\n",
              static_cast<long>(c.T), static_cast<long>(c.V), static_cast<long>(c.d), static_cast<long>(c.m),
              static_cast<long>(c.B), steps, seeds);
  for (int s = 0; s < seeds; ++s) {
    res[0].push_back(train<normkit::LayerNorm<float>>(c, s, steps, window, held_out));
    res[1].push_back(train<normkit::RMSNorm<float>>(c, s, steps, window, held_out));
    res[2].push_back(train<normkit::DyT<float>>(c, s, steps, window, held_out));
    res[3].push_back(train<NoNorm<float>>(c, s, steps, window, held_out));
    std::printf("seed %d: held-out loss", s);
    for (int v = 0; v < 4; ++v) std::printf("  %s %.4f", variants[v], res[v].back().eval_loss);
    std::printf("\n");
  }

  std::printf("\n%-10s %-22s %-22s %s\n", "norm", "held-out loss", "token accuracy", "ms/step");
  std::vector<std::vector<double>> loss(4);
  for (int v = 0; v < 4; ++v) {
    std::vector<double> acc, ms;
    for (const RunResult& r : res[v]) {
      loss[v].push_back(r.eval_loss);
      acc.push_back(r.eval_acc);
      ms.push_back(r.ms_per_step);
    }
    const Stats sl = stats_of(loss[v]), sa = stats_of(acc), sm = stats_of(ms);
    std::printf("%-10s %.4f +- %.4f       %.4f +- %.4f       %.2f\n", variants[v], sl.mean, sl.sd, sa.mean, sa.sd,
                sm.mean);
  }
  const Welch w = welch(loss[2], loss[0]);
  std::printf("\nWelch's t-test, DyT vs LayerNorm held-out loss: t = %.3f, df = %.1f, p = %.4g -> %s\n", w.t, w.df,
              w.p, w.p < 0.05 ? "significant at 5%" : "not significant at 5%");

  if (smoke) {
    // 3. Training works for every normalized variant: 60 steps lower the loss.
    for (int v = 0; v < 3; ++v)
      for (const RunResult& r : res[v])
        if (!(r.eval_loss < r.first_loss - 0.1)) {
          std::printf("FAIL: %s did not learn: first loss %.4f, held-out loss after training %.4f\n", variants[v],
                      r.first_loss, r.eval_loss);
          ok = false;
        }
  }

  const std::string sum_path = out + "/transformer_dyt_summary.csv", curve_path = out + "/transformer_dyt_curves.csv";
  FILE* fs = std::fopen(sum_path.c_str(), "w");
  FILE* fc = std::fopen(curve_path.c_str(), "w");
  if (!fs || !fc) {
    std::fprintf(stderr, "cannot write %s or %s\n", sum_path.c_str(), curve_path.c_str());
    return 1;
  }
  std::fprintf(fs, "norm,seed,heldout_loss,token_accuracy,ms_per_step\n");
  std::fprintf(fc, "norm,seed,step,train_loss\n");
  for (int v = 0; v < 4; ++v)
    for (std::size_t s = 0; s < res[v].size(); ++s) {
      const RunResult& r = res[v][s];
      std::fprintf(fs, "%s,%zu,%.6f,%.6f,%.4f\n", variants[v], s, r.eval_loss, r.eval_acc, r.ms_per_step);
      for (std::size_t k = 0; k < r.curve.size(); ++k)
        std::fprintf(fc, "%s,%zu,%zu,%.6f\n", variants[v], s, (k + 1) * window, r.curve[k]);
    }
  std::fclose(fs);
  std::fclose(fc);
  std::printf("wrote %s and %s\n", sum_path.c_str(), curve_path.c_str());
  std::printf(ok ? "OK\n" : "FAILED\n");
  return ok ? 0 : 1;
}
