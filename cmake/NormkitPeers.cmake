# The peers that normkit's benchmark times and its peer tests check against, each where
# it is found: oneDNN (Debian libdnnl-dev) and libtorch (libtorch-dev). For our own
# binaries only; not installed. Defines the INTERFACE targets normkit_peer_onednn and
# normkit_peer_torch (where found) and NORMKIT_PEERS_FOUND ("oneDNN 2.6.0, libtorch
# 1.13.0", or "none").
include_guard(GLOBAL)

option(NORMKIT_PEERS "Compare with oneDNN and libtorch (benchmark, peer tests) when they are found" ON)
set(_found "")
if(NORMKIT_PEERS)
  # Debian's oneDNN is built with an OpenCL GPU runtime, and its CMake config then
  # requires OpenCL (a hard error, QUIET or not) although the CPU engine never uses it:
  # without the OpenCL development files (ocl-icd-opencl-dev, a recommendation of
  # libdnnl-dev that --no-install-recommends skips) we go without oneDNN.
  find_package(OpenCL QUIET)
  if(OpenCL_FOUND)
    find_package(dnnl CONFIG QUIET)
  else()
    message(STATUS "normkit peers: OpenCL development files not found, oneDNN not used "
                   "(install ocl-icd-opencl-dev)")
  endif()
  # Debian's libdnnl runs on OpenMP: its thread count is set through it.
  find_package(OpenMP QUIET COMPONENTS CXX)
  if(dnnl_FOUND AND OpenMP_CXX_FOUND)
    add_library(normkit_peer_onednn INTERFACE)
    target_link_libraries(normkit_peer_onednn INTERFACE DNNL::dnnl OpenMP::OpenMP_CXX)
    list(APPEND _found "oneDNN ${dnnl_VERSION}")
  endif()
  find_package(Torch CONFIG QUIET)
  if(Torch_FOUND)
    add_library(normkit_peer_torch INTERFACE)
    target_link_libraries(normkit_peer_torch INTERFACE ${TORCH_LIBRARIES})
    list(APPEND _found "libtorch ${Torch_VERSION}")
  endif()
endif()
if(_found)
  string(REPLACE ";" ", " NORMKIT_PEERS_FOUND "${_found}")
else()
  set(NORMKIT_PEERS_FOUND "none")
endif()
message(STATUS "normkit peers: ${NORMKIT_PEERS_FOUND}")
unset(_found)
