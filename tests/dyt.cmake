# DyT: the layer, its elementwise kernels, and the drop-in test (one generic residual
# block trained with LayerNorm, RMSNorm and DyT).
normkit_add_test(test_dyt SOURCES test_dyt.cpp LABELS unit)
normkit_add_test(test_drop_in SOURCES test_drop_in.cpp LABELS unit)
