// Synchronized BatchNorm over MPI: run under mpirun with 2 or 3 ranks. The batch is split
// unevenly (rank r gets r + 1 samples, plus an empty part in one case); every rank runs
// the whole batch in one process too, and its part of y and dx, and dweight, dbias and
// the running statistics, must equal the full-batch results to within float rounding.
#include <gtest/gtest.h>
#include <mpi.h>

#include <normkit/mpi.hpp>
#include <normkit/normkit.hpp>

#include "test_support.hpp"

namespace {

using nktest::Index;
using Vec = std::vector<double>;

int rank_of() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}
int size_of() {
  int s = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &s);
  return s;
}

/// Samples of each rank: rank r gets r + 1 (or none for rank 0 with `empty_first`).
std::vector<long> split_of(int ranks, bool empty_first) {
  std::vector<long> s;
  for (int r = 0; r < ranks; ++r) s.push_back(empty_first && r == 0 ? 0 : r + 1);
  return s;
}

template <class T, int L>
void compare_with_full_batch(long C, long H, long W, bool channels_last, bool empty_first, double tol) {
  const int rank = rank_of(), ranks = size_of();
  const std::vector<long> split = split_of(ranks, empty_first);
  long N = 0, n0 = 0;
  for (int r = 0; r < ranks; ++r) {
    if (r < rank) n0 += split[static_cast<std::size_t>(r)];
    N += split[static_cast<std::size_t>(r)];
  }
  const long nr = split[static_cast<std::size_t>(rank)], per = C * H * W;
  auto dims = [&](long n) {
    return channels_last ? std::vector<Index>{n, H, W, C} : std::vector<Index>{n, C, H, W};
  };
  // Every rank draws the same full batch.
  const Vec xs = nktest::quantized<T>(nktest::random_vector(N * per, 201, -1, 3));
  const Vec dys = nktest::quantized<T>(nktest::random_vector(N * per, 202));
  const Vec ws = nktest::quantized<T>(nktest::random_vector(C, 203, 0.5, 1.5));
  const Vec bs = nktest::quantized<T>(nktest::random_vector(C, 204));
  const auto opts = normkit::BatchNormOptions().channel_axis(channels_last ? -1 : 1);
  auto setup = [&](normkit::BatchNorm<T>& bn) {
    for (long c = 0; c < C; ++c) {
      bn.weight()(c) = static_cast<T>(ws[static_cast<std::size_t>(c)]);
      bn.bias()(c) = static_cast<T>(bs[static_cast<std::size_t>(c)]);
    }
  };

  normkit::BatchNorm<T> full(C, opts);
  setup(full);
  auto x = nktest::make_tensor<T, 4, L>(dims(N), xs);
  auto dy = nktest::make_tensor<T, 4, L>(dims(N), dys);
  decltype(x) y(x.dimensions()), dx(x.dimensions());
  typename normkit::BatchNorm<T>::Cache cache;
  typename normkit::BatchNorm<T>::Grads grads;

  auto reducer = std::make_shared<normkit::mpi::AllreduceReducer>(MPI_COMM_WORLD);
  normkit::BatchNorm<T> part(C, normkit::BatchNormOptions(opts).reducer(reducer));
  setup(part);
  auto xr = nktest::make_tensor<T, 4, L>(dims(nr), Vec(xs.begin() + n0 * per, xs.begin() + (n0 + nr) * per));
  auto dyr = nktest::make_tensor<T, 4, L>(dims(nr), Vec(dys.begin() + n0 * per, dys.begin() + (n0 + nr) * per));
  decltype(xr) yr(xr.dimensions()), dxr(xr.dimensions());
  typename normkit::BatchNorm<T>::Cache cr;
  typename normkit::BatchNorm<T>::Grads gr;

  // Three training steps (the running statistics accumulate), then one in eval mode.
  for (int step = 0; step < 4; ++step) {
    if (step == 3) {
      full.eval();
      part.eval();
    }
    full.forward(x, y, cache);
    full.backward(x, dy, cache, dx, grads);
    part.forward(xr, yr, cr);
    part.backward(xr, dyr, cr, dxr, gr);
    const std::string where = "rank " + std::to_string(rank) + " of " + std::to_string(ranks) + ", step " +
                              std::to_string(step) + (channels_last ? ", channels-last" : ", NCHW");
    const auto yl = nktest::logical(y), dxl = nktest::logical(dx);
    nktest::expect_close(nktest::logical(yr),
                         std::vector<T>(yl.begin() + n0 * per, yl.begin() + (n0 + nr) * per), tol, tol, "y, " + where);
    nktest::expect_close(nktest::logical(dxr),
                         std::vector<T>(dxl.begin() + n0 * per, dxl.begin() + (n0 + nr) * per), tol, tol,
                         "dx, " + where);
    nktest::expect_close(nktest::values(gr.weight), nktest::values(grads.weight), tol * N * H * W, tol,
                         "dweight, " + where);
    nktest::expect_close(nktest::values(gr.bias), nktest::values(grads.bias), tol * N * H * W, tol, "dbias, " + where);
    nktest::expect_close(nktest::values(part.running_mean()), nktest::values(full.running_mean()), tol, tol,
                         "running_mean, " + where);
    nktest::expect_close(nktest::values(part.running_var()), nktest::values(full.running_var()), tol, tol,
                         "running_var, " + where);
    EXPECT_EQ(part.num_batches_tracked(), full.num_batches_tracked());
  }
}

TEST(BatchNormMpiTest, UnevenSplitEqualsFullBatchFloatNCHW) {
  compare_with_full_batch<float, Eigen::RowMajor>(5, 6, 7, false, false, 1e-5);
}
TEST(BatchNormMpiTest, UnevenSplitEqualsFullBatchFloatChannelsLast) {
  compare_with_full_batch<float, Eigen::RowMajor>(19, 3, 5, true, false, 1e-5);
}
TEST(BatchNormMpiTest, UnevenSplitEqualsFullBatchDoubleColMajor) {
  compare_with_full_batch<double, Eigen::ColMajor>(4, 5, 9, false, false, 1e-12);
}
TEST(BatchNormMpiTest, EmptyPartOnOneRank) {
  compare_with_full_batch<float, Eigen::RowMajor>(3, 8, 8, false, true, 1e-5);
}

TEST(BatchNormMpiTest, OneValuePerChannelOverAllRanksIsAnError) {
  // Only rank 0 holds a sample: one value per channel in all, an error on every rank
  // (they all see the global count, so none of them hangs in a later reduction).
  auto reducer = std::make_shared<normkit::mpi::AllreduceReducer>(MPI_COMM_WORLD);
  normkit::BatchNorm<float> bn(3, normkit::BatchNormOptions().reducer(reducer));
  const Index n = rank_of() == 0 ? 1 : 0;
  Eigen::Tensor<float, 2, Eigen::RowMajor> x(n, 3), y(n, 3);
  x.setRandom();
  std::string msg;
  try {
    bn.forward(x, y);
  } catch (const normkit::Error& e) {
    msg = e.what();
  }
  EXPECT_EQ(msg, "BatchNorm::forward: expected more than 1 value per channel when training, got x of shape [" +
                     std::to_string(n) + ", 3]");
  EXPECT_EQ(bn.num_batches_tracked(), 0);
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  // Only rank 0 prints the report; every rank runs and fails alike.
  if (rank_of() != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
  }
  int rc = RUN_ALL_TESTS();
  // The run fails if any rank failed.
  MPI_Allreduce(MPI_IN_PLACE, &rc, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  MPI_Finalize();
  return rc;
}
