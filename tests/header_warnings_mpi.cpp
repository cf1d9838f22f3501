// Compiled, never run: normkit/mpi.hpp (the one header that needs MPI) under the strict
// warnings of header_warnings.cpp (tests/mpi.cmake), with the synchronized BatchNorm's
// forward and backward instantiated through its reducer.
#include <normkit/mpi.hpp>
#include <normkit/normkit.hpp>

#include <memory>

void normkit_header_warnings_mpi(MPI_Comm comm);

void normkit_header_warnings_mpi(MPI_Comm comm) {
  auto reducer = std::make_shared<normkit::mpi::AllreduceReducer>(comm);
  normkit::BatchNorm<float> bn(3, normkit::BatchNormOptions().reducer(reducer));
  Eigen::Tensor<float, 3, Eigen::RowMajor> x(2, 3, 4), y(2, 3, 4), dx(2, 3, 4);
  x.setRandom();
  normkit::BatchNorm<float>::Cache cache;
  normkit::BatchNorm<float>::Grads grads;
  bn.forward(x, y, cache);
  bn.backward(x, y, cache, dx, grads);
  normkit::BatchNorm<double> bn_d(3, normkit::BatchNormOptions().reducer(reducer).channel_axis(-1));
  Eigen::Tensor<double, 2, Eigen::ColMajor> xd(4, 3), yd(4, 3);
  xd.setRandom();
  bn_d.forward(xd, yd);
}
