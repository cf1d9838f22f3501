# The layers against PyTorch (libtorch) and oneDNN on the same inputs in the same
# process, each where found (cmake/NormkitPeers.cmake): the semantics are PyTorch's, so a
# model moved over must compute the same numbers. Not in the sanitizer builds (the asan
# preset sets NORMKIT_PEERS off): the peers' libraries are not built with them.
#
# Compiled at -O1: these files check semantics against the peers, within tolerances,
# not the kernels' speed or bits (the other tests do, at the build's level), and -O3
# made test_peers_torch the longest compilation of the build, 260 s of CPU where -O1
# takes 129 (GCC 12; 90% of it optimization and code generation). With GCC, normkit's
# own code is still compiled at -O3 there (core/config.hpp's optimize pragma).
if(TARGET normkit_peer_torch)
  normkit_add_test(test_peers_torch SOURCES test_peers_torch.cpp LABELS unit peers LIBS normkit_peer_torch)
endif()
if(TARGET normkit_peer_onednn)
  normkit_add_test(test_peers_onednn SOURCES test_peers_onednn.cpp LABELS unit peers LIBS normkit_peer_onednn)
endif()
foreach(_peer_test test_peers_torch test_peers_onednn)
  if(TARGET ${_peer_test} AND CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    target_compile_options(${_peer_test} PRIVATE -O1)
  endif()
endforeach()
