// The benchmark binary: every layer's BM_* (bench_<layer>.cpp), the memcpy roofline
// (here) and the peers, when compiled in.
#include "common.hpp"

namespace {

// memcpy over rows * features floats: the roofline every other row is compared with.
void BM_Memcpy(benchmark::State& state) {
  const nkbench::Index n = state.range(0) * state.range(1);
  const int threads = static_cast<int>(state.range(2));
  double gbps = 0;
  for (auto _ : state) gbps = nkbench::memcpy_gbps(n, threads);  // it times the copies itself
  state.counters["GB/s"] = gbps;
  state.counters["of_memcpy"] = 1.0;
  state.counters["memcpy_GB/s"] = gbps;
}
BENCHMARK(BM_Memcpy)->Apply(nkbench::row_shapes)->Iterations(1);

}  // namespace

#ifndef NORMKIT_BENCH_PEERS
#define NORMKIT_BENCH_PEERS "none"
#endif

// BENCHMARK_MAIN plus the context a reader needs to trust the table: which peers were
// compiled in, and which thread counts were measured (NORMKIT_BENCH_THREADS).
int main(int argc, char** argv) {
  std::string threads;
  for (int t : nkbench::thread_list()) threads += (threads.empty() ? "" : ",") + std::to_string(t);
  benchmark::AddCustomContext("normkit_peers", NORMKIT_BENCH_PEERS);
  benchmark::AddCustomContext("normkit_threads", threads);
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
