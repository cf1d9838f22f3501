// normkit: normalization layers over Eigen tensors. Include this one header.
#pragma once

#include "batch_norm.hpp"
#include "dyt.hpp"
#include "layer_norm.hpp"
#include "rms_norm.hpp"
