// sync_batchnorm_mpi: data-parallel training with synchronized BatchNorm over MPI.
//
//   mpirun -np 2 ./sync_batchnorm_mpi            (Open MPI as root: add --allow-run-as-root)
//
// A global batch of N samples is split over the processes (unevenly when N is not a
// multiple of their number). Every process runs the same model on its part,
//
//   h = x W   [n_local, C];   y = BatchNorm(h);   loss = 0.5 * sum((y - t)^2) / N
//
// and after backward sums dW over the processes (as data-parallel training does); the
// synchronized BatchNorm (normkit::mpi::AllreduceReducer) makes the statistics, the
// running statistics and dweight, dbias those of the whole batch. Every process also
// computes the same step on the whole batch alone, the single-process reference, and
// the example prints the largest difference of every quantity: equal up to float
// rounding (sums in another order). For contrast, a plain BatchNorm on each part
// (per-process statistics) gives a visibly different model.
//
//   sync_batchnorm_mpi [--smoke] [--out DIR]    (--smoke: 3 steps instead of 50)
//   Rank 0 writes sync_batchnorm_mpi.csv (per step: losses, largest differences).
#include <normkit/mpi.hpp>
#include <normkit/normkit.hpp>

#include <Eigen/Dense>
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

namespace {

using Eigen::Index;
using Mat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using TMap = Eigen::TensorMap<Eigen::Tensor<float, 2, Eigen::RowMajor>>;
using CTMap = Eigen::TensorMap<const Eigen::Tensor<float, 2, Eigen::RowMajor>>;

constexpr Index kN = 61, kIn = 12, kC = 8;

/// One data-parallel replica: a linear map and a BatchNorm (synchronized or not).
struct Replica {
  Mat W, dW, h, y, dh;
  normkit::BatchNorm<float> bn;
  normkit::BatchNorm<float>::Cache cache;
  normkit::BatchNorm<float>::Grads grads;

  Replica(const Mat& w0, const normkit::BatchNormOptions& opt) : W(w0), bn(kC, opt) {}

  /// Forward and backward on rows [x, t] of the batch; returns the part's loss sum
  /// (already divided by the global batch size N).
  double step(const Mat& x, const Mat& t) {
    h = x * W;
    y.resize(h.rows(), kC);
    bn.forward(CTMap(h.data(), h.rows(), kC), TMap(y.data(), y.rows(), kC), cache);
    const Mat dy = (y - t) / float(kN);
    dh.resize(h.rows(), kC);
    bn.backward(CTMap(h.data(), h.rows(), kC), CTMap(dy.data(), dy.rows(), kC), cache, TMap(dh.data(), dh.rows(), kC),
                grads);
    dW = x.transpose() * dh;
    return 0.5 * double((y - t).squaredNorm()) / double(kN);
  }

  void sgd(float lr) {
    W -= lr * dW;
    for (Index c = 0; c < kC; ++c) {
      bn.weight()(c) -= lr * grads.weight(c);
      bn.bias()(c) -= lr * grads.bias(c);
    }
  }
};

double max_rel(const float* a, const float* b, Index n) {
  double num = 0, den = 0;
  for (Index i = 0; i < n; ++i) {
    num = std::max(num, double(std::fabs(a[i] - b[i])));
    den = std::max(den, double(std::fabs(b[i])));
  }
  return den > 0 ? num / den : num;
}

void sum_over_ranks(float* data, Index n) {
  MPI_Allreduce(MPI_IN_PLACE, data, static_cast<int>(n), MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  bool smoke = false;
  std::string out = ".";
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--smoke")) smoke = true;
    else if (!std::strcmp(argv[i], "--out") && i + 1 < argc) out = argv[++i];
  }
  const int steps = smoke ? 3 : 50;

  // The same data and initial weights on every process (same seed); each takes a slice.
  std::mt19937 rng(5);
  std::normal_distribution<float> gauss;
  Mat w0(kIn, kC);
  for (Index i = 0; i < w0.size(); ++i) w0.data()[i] = gauss(rng) / std::sqrt(float(kIn));
  const Index lo = kN * rank / size, hi = kN * (rank + 1) / size;

  auto reducer = std::make_shared<normkit::mpi::AllreduceReducer>(MPI_COMM_WORLD);
  Replica sync(w0, normkit::BatchNormOptions().reducer(reducer));
  Replica local(w0, normkit::BatchNormOptions());  // per-process statistics
  Replica whole(w0, normkit::BatchNormOptions());  // the single-process reference

  if (rank == 0)
    std::printf("global batch %ld over %d processes (rank 0 holds %ld samples); %d SGD steps\n",
                static_cast<long>(kN), size, static_cast<long>(hi - lo), steps);
  FILE* csv = nullptr;
  if (rank == 0) {
    const std::string path = out + "/sync_batchnorm_mpi.csv";
    csv = std::fopen(path.c_str(), "w");
    if (csv) std::fprintf(csv, "step,loss_reference,loss_sync,loss_local,diff_sync,diff_local\n");
  }
  double worst_sync = 0, worst_local = 0;
  for (int s = 0; s < steps; ++s) {
    Mat x(kN, kIn), t(kN, kC);  // a fresh batch: offset, differently scaled features
    for (Index i = 0; i < x.size(); ++i) x.data()[i] = 3.0f + (1 + float(i % kIn)) * gauss(rng);
    for (Index i = 0; i < t.size(); ++i) t.data()[i] = gauss(rng);
    const Mat xp = x.middleRows(lo, hi - lo), tp = t.middleRows(lo, hi - lo);

    const double l_ref = whole.step(x, t);
    double l_sync = sync.step(xp, tp), l_local = local.step(xp, tp);
    MPI_Allreduce(MPI_IN_PLACE, &l_sync, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
    MPI_Allreduce(MPI_IN_PLACE, &l_local, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
    sum_over_ranks(sync.dW.data(), sync.dW.size());  // data parallel: sum the replicas' gradients
    sum_over_ranks(local.dW.data(), local.dW.size());
    // Plain BatchNorm's parameter gradients are per process: sum them as well.
    sum_over_ranks(local.grads.weight.data(), kC);
    sum_over_ranks(local.grads.bias.data(), kC);

    // Every quantity of this step against the reference: y and dh on this process's rows,
    // dW, dweight, dbias, running statistics (whole batch).
    const auto diffs = [&](const Replica& r) {
      double d = 0;
      d = std::max(d, max_rel(r.y.data(), whole.y.data() + lo * kC, r.y.size()));
      d = std::max(d, max_rel(r.dh.data(), whole.dh.data() + lo * kC, r.dh.size()));
      d = std::max(d, max_rel(r.dW.data(), whole.dW.data(), r.dW.size()));
      d = std::max(d, max_rel(r.grads.weight.data(), whole.grads.weight.data(), kC));
      d = std::max(d, max_rel(r.grads.bias.data(), whole.grads.bias.data(), kC));
      d = std::max(d, max_rel(r.bn.running_mean().data(), whole.bn.running_mean().data(), kC));
      d = std::max(d, max_rel(r.bn.running_var().data(), whole.bn.running_var().data(), kC));
      MPI_Allreduce(MPI_IN_PLACE, &d, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
      return d;
    };
    const double d_sync = diffs(sync), d_local = diffs(local);
    worst_sync = std::max(worst_sync, d_sync);
    worst_local = std::max(worst_local, d_local);
    if (rank == 0) {
      if (s < 3 || (s + 1) % 10 == 0)
        std::printf("step %2d  loss: single %.6f  sync %.6f  per-process %.6f   max rel diff: sync %.1e  "
                    "per-process %.1e\n",
                    s + 1, l_ref, l_sync, l_local, d_sync, d_local);
      if (csv) std::fprintf(csv, "%d,%.8f,%.8f,%.8f,%.3e,%.3e\n", s + 1, l_ref, l_sync, l_local, d_sync, d_local);
    }
    whole.sgd(0.1f);
    sync.sgd(0.1f);
    local.sgd(0.1f);
  }
  if (csv) std::fclose(csv);

  // Float rounding of sums taken in another order, over 50 steps of training: ~1e-6.
  // Per-process statistics differ at the level of the sampling noise of half a batch.
  const bool ok = worst_sync < 1e-4 && (size == 1 || worst_local > 1e-2);
  if (rank == 0) {
    std::printf("\nlargest relative difference to the single-process run: synchronized %.2e, "
                "per-process statistics %.2e\n",
                worst_sync, worst_local);
    if (ok) std::printf("OK: synchronized BatchNorm over %d processes equals the single-process step\n", size);
    else std::printf("FAILED\n");
  }
  MPI_Finalize();
  return ok ? 0 : 1;
}
