// Synchronized BatchNorm over MPI: the one normkit header that needs <mpi.h>, included
// explicitly by the programs that use it (nothing else in normkit depends on MPI).
//
//   auto reducer = std::make_shared<normkit::mpi::AllreduceReducer>(MPI_COMM_WORLD);
//   normkit::BatchNorm<float> bn(64, normkit::BatchNormOptions().reducer(reducer));
//
// Every process of the communicator then calls forward/backward on its part of the
// batch (parts may differ in size, even be empty) in the same order: the statistics,
// the running statistics, dx, dweight and dbias are those of the whole batch.
#pragma once

#include <mpi.h>

#include <algorithm>
#include <climits>

#include "core/config.hpp"
#include "batch_norm.hpp"

NORMKIT_CODE_BEGIN

namespace normkit {
namespace mpi {

/// A StatsReducer that sums with MPI_Allreduce over a communicator (not owned: it must
/// outlive the reducer).
class AllreduceReducer : public StatsReducer {
 public:
  explicit AllreduceReducer(MPI_Comm comm) : comm_(comm) {}

  void allreduce_sum(double* data, Index n) override {
    // MPI counts are int: long buffers go in pieces.
    for (Index off = 0; off < n; off += INT_MAX) {
      const int cnt = static_cast<int>(std::min<Index>(INT_MAX, n - off));
      const int rc = MPI_Allreduce(MPI_IN_PLACE, data + off, cnt, MPI_DOUBLE, MPI_SUM, comm_);
      if (rc != MPI_SUCCESS) {
        char msg[MPI_MAX_ERROR_STRING];
        int len = 0;
        MPI_Error_string(rc, msg, &len);
        detail::fail("mpi::AllreduceReducer::allreduce_sum: MPI_Allreduce failed: ",
                     std::string(msg, static_cast<std::size_t>(len)));
      }
    }
  }

  MPI_Comm comm() const { return comm_; }

 private:
  MPI_Comm comm_;
};

}  // namespace mpi
}  // namespace normkit

NORMKIT_CODE_END
