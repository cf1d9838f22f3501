# The layers against PyTorch (libtorch) and oneDNN on the same inputs in the same
# process, each where found (cmake/NormkitPeers.cmake): the semantics are PyTorch's, so a
# model moved over must compute the same numbers. Not in the sanitizer builds (the asan
# preset sets NORMKIT_PEERS off): the peers' libraries are not built with them.
if(TARGET normkit_peer_torch)
  normkit_add_test(test_peers_torch SOURCES test_peers_torch.cpp LABELS unit peers LIBS normkit_peer_torch)
endif()
if(TARGET normkit_peer_onednn)
  normkit_add_test(test_peers_onednn SOURCES test_peers_onednn.cpp LABELS unit peers LIBS normkit_peer_onednn)
endif()
