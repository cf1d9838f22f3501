// The fuzz target's cases for double (see fuzz_case.hpp for why one TU per type).
#include "fuzz_case.hpp"

template void nkfuzz::dispatch_rank<double>(const nkfuzz::Config&, nkfuzz::Reader&);
