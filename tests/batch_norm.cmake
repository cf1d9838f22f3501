# BatchNorm: the layer and its per-channel kernels (MPI tests are in mpi.cmake).
normkit_add_test(test_batch_norm SOURCES test_batch_norm.cpp LABELS unit)
# Groups of one channel wherever the row path runs BatchNorm's passes a group of channels
# at a time (include/normkit/core/channel_kernels.hpp), so that the suite goes through
# many groups; the other test binaries keep the default (one group for small tensors).
target_compile_definitions(test_batch_norm PRIVATE NORMKIT_GROUP_BYTES=1)
