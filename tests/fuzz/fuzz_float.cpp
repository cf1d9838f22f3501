// The fuzz target's cases for float (see fuzz_case.hpp for why one TU per type).
#include "fuzz_case.hpp"

template void nkfuzz::dispatch_rank<float>(const nkfuzz::Config&, nkfuzz::Reader&);
