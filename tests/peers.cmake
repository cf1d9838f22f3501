# The layers against PyTorch (libtorch) on the same inputs in the same process, where
# libtorch is found (cmake/NormkitPeers.cmake): the semantics are PyTorch's, so a model
# moved over must compute the same numbers. Not in the sanitizer builds (the asan preset
# sets NORMKIT_PEERS off): libtorch is not built with them.
if(TARGET normkit_peer_torch)
  normkit_add_test(test_peers_torch SOURCES test_peers_torch.cpp LABELS unit peers LIBS normkit_peer_torch)
endif()
