// The fuzz target's cases for Eigen::bfloat16 (see fuzz_case.hpp for why one TU per type).
#include "fuzz_case.hpp"

template void nkfuzz::dispatch_rank<Eigen::bfloat16>(const nkfuzz::Config&, nkfuzz::Reader&);
