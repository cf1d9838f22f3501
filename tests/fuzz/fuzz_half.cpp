// The fuzz target's cases for Eigen::half (see fuzz_case.hpp for why one TU per type).
#include "fuzz_case.hpp"

template void nkfuzz::dispatch_rank<Eigen::half>(const nkfuzz::Config&, nkfuzz::Reader&);
