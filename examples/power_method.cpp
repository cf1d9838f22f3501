// power_method: a looped linear map with a normalization between iterations,
//
//     x_{k+1} = norm(x_k A),   A symmetric [n, n], x a row of n features,
//
// is the power method. RMSNorm rescales x to root-mean-square 1, which is exactly the
// power method's division by |x|; LayerNorm also subtracts the mean, i.e. projects onto
// the vectors orthogonal to (1, ..., 1), so it runs the power method on that subspace
// (here A's eigenvectors are taken orthogonal to (1, ..., 1), as those of a covariance
// of features centered across the feature axis). Either way the iterate turns towards
// A's top eigenvector, at the rate |lambda_2 / lambda_1| per iteration, whatever A's
// scale: both layers are scale invariant. Without a normalization the direction turns
// the same way, but the length goes as lambda_1^k: it overflows to inf (then NaN) when
// lambda_1 > 1 and vanishes to 0 when lambda_1 < 1, in float within a few hundred steps.
// This is the mechanism behind the finding that a looped linear Transformer with
// LayerNorm learns to run the power method for principal-component prediction.
//
// Prints the angle to the true eigenvector per iteration (every 10th in the table),
// writes power_method.csv; plot with examples/plot_power_method.py.
//
//   power_method [--smoke] [--out DIR]     (--smoke: shorter printout, same checks)
#include <normkit/normkit.hpp>

#include <Eigen/Dense>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>

namespace {

using Row = Eigen::Matrix<float, 1, Eigen::Dynamic, Eigen::RowMajor>;
using TensorMap2 = Eigen::TensorMap<Eigen::Tensor<float, 2, Eigen::RowMajor>>;
using ConstTensorMap2 = Eigen::TensorMap<const Eigen::Tensor<float, 2, Eigen::RowMajor>>;

/// The angle between x and the line through v (|v| = 1), in radians, in double.
/// atan2(|x - (x.v) v|, |x.v|) stays accurate near 0, where acos does not.
double angle_to(const Row& x, const Eigen::VectorXd& v) {
  const Eigen::VectorXd xd = x.transpose().cast<double>();
  if (!xd.allFinite() || xd.norm() == 0) return NAN;  // overflowed or vanished: no direction
  const double c = xd.dot(v);
  return std::atan2((xd - c * v).norm(), std::fabs(c));
}

/// One run of x <- norm(x A) for `iters` iterations; angle[k] and length[k] after step k.
template <class Norm>
void iterate(Norm* norm, const Eigen::MatrixXf& A, const Row& x0, const Eigen::VectorXd& v, int iters,
             std::vector<double>& angle, std::vector<double>& length) {
  const Eigen::Index n = A.rows();
  Row x = x0, ax(n);
  for (int k = 0; k < iters; ++k) {
    ax.noalias() = x * A;
    if (norm) {
      norm->forward(ConstTensorMap2(ax.data(), 1, n), TensorMap2(x.data(), 1, n));
    } else {
      x = ax;
    }
    angle.push_back(angle_to(x, v));
    length.push_back(x.cast<double>().norm());
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

  // A = Q diag(lambda) Q^T with Q orthonormal and orthogonal to (1, ..., 1): the
  // spectrum is known exactly, so is the top eigenvector q_0. lambda_2 / lambda_1 = 0.9.
  const Eigen::Index n = 64;
  const int iters = 300;
  std::mt19937 rng(2025);
  std::normal_distribution<double> gauss;
  Eigen::MatrixXd G(n, n);
  for (Eigen::Index i = 0; i < G.size(); ++i) G.data()[i] = gauss(rng);
  G.col(0).setOnes();  // Householder QR: Q's first column is then +-(1, ..., 1)/sqrt(n)
  const Eigen::MatrixXd Q = Eigen::HouseholderQR<Eigen::MatrixXd>(G).householderQ();
  Eigen::VectorXd lambda = Eigen::VectorXd::Zero(n);  // (1, ..., 1) gets eigenvalue 0
  for (Eigen::Index i = 1; i < n; ++i) lambda(i) = std::pow(0.9, double(i - 1));
  const Eigen::MatrixXd S = Q * lambda.asDiagonal() * Q.transpose();
  const Eigen::VectorXd v = Q.col(1);  // eigenvalue 1, the largest

  Row x0(n);
  for (Eigen::Index i = 0; i < n; ++i) x0(i) = static_cast<float>(gauss(rng));

  normkit::LayerNorm<float> ln(n);
  normkit::RMSNorm<float> rms(n);
  // The same spectrum at two scales: normalized runs do not care, raw runs blow up or die.
  const double scales[] = {4.0, 0.25};
  struct Run {
    std::string name;
    std::vector<double> angle, length;
  };
  std::vector<Run> runs;
  for (double s : scales) {
    const Eigen::MatrixXf A = (S * s).cast<float>();
    const std::string tag = s > 1 ? "(4)" : "(0.25)";  // lambda_1
    runs.push_back({"LayerNorm" + tag, {}, {}});
    iterate(&ln, A, x0, v, iters, runs.back().angle, runs.back().length);
    runs.push_back({"RMSNorm" + tag, {}, {}});
    iterate(&rms, A, x0, v, iters, runs.back().angle, runs.back().length);
    runs.push_back({"raw" + tag, {}, {}});
    iterate<normkit::RMSNorm<float>>(nullptr, A, x0, v, iters, runs.back().angle, runs.back().length);
  }

  std::printf("x <- norm(x A): angle (radians) to A's top eigenvector; |x| for the raw iterate\n");
  std::printf("(4) and (0.25): A scaled so that its top eigenvalue lambda_1 is 4 or 0.25; raw: no norm\n");
  std::printf("A: n = %ld, lambda_2/lambda_1 = 0.9, so the angle shrinks ~0.9x per iteration\n\n",
              static_cast<long>(n));
  std::printf("%5s", "iter");
  for (const Run& r : runs) std::printf(" %16s", r.name.c_str());
  std::printf(" %11s %11s\n", "|raw(4)|", "|raw(0.25)|");
  const int every = smoke ? 50 : 10;
  for (int k = 0; k < iters; ++k) {
    if ((k + 1) % every && k) continue;
    std::printf("%5d", k + 1);
    for (const Run& r : runs) std::printf(" %16.3e", r.angle[k]);
    std::printf(" %11.3e %11.3e\n", runs[2].length[k], runs[5].length[k]);
  }

  const std::string path = out + "/power_method.csv";
  if (FILE* f = std::fopen(path.c_str(), "w")) {
    std::fprintf(f, "iter");
    for (const Run& r : runs) std::fprintf(f, ",angle %s,length %s", r.name.c_str(), r.name.c_str());  // e.g. "angle LayerNorm(4)"
    std::fprintf(f, "\n");
    for (int k = 0; k < iters; ++k) {
      std::fprintf(f, "%d", k + 1);
      for (const Run& r : runs) std::fprintf(f, ",%.6e,%.6e", r.angle[k], r.length[k]);
      std::fprintf(f, "\n");
    }
    std::fclose(f);
    std::printf("\nwrote %s\n", path.c_str());
  } else {
    std::fprintf(stderr, "cannot write %s\n", path.c_str());
    return 1;
  }

  // What the example claims, checked: normalized runs converge to the eigenvector (the
  // float floor is ~1e-6 rad; 0.9^300 ~ 2e-14 is far below it), raw runs do not survive.
  bool ok = true;
  for (int r : {0, 1, 3, 4}) {
    if (!(runs[r].angle.back() < 1e-4)) {
      std::printf("FAIL: %s ends at angle %.3e, expected < 1e-4\n", runs[r].name.c_str(), runs[r].angle.back());
      ok = false;
    }
  }
  if (std::isfinite(runs[2].length.back())) {
    std::printf("FAIL: the raw iterate with lambda_1 = 4 stayed finite (%g)\n", runs[2].length.back());
    ok = false;
  }
  if (runs[5].length.back() != 0) {
    std::printf("FAIL: the raw iterate with lambda_1 = 0.25 did not vanish (%g)\n", runs[5].length.back());
    ok = false;
  }
  std::printf(ok ? "OK: normalized iterates converge to the top eigenvector; raw ones overflow or vanish\n"
                 : "FAILED\n");
  return ok ? 0 : 1;
}
