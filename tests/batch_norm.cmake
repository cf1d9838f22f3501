# BatchNorm: the layer and its per-channel kernels (MPI tests are in mpi.cmake).
normkit_add_test(test_batch_norm SOURCES test_batch_norm.cpp LABELS unit)
