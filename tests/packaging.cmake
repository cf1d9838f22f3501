# Packaging: normkit as its users consume it, each consumer a tiny project built by CTest
# with this build's compiler, build type and flags (label `packaging`).
#   find-package-test.install  cmake --install this build tree into a fresh prefix
#   find-package-test          find_package(normkit) from that prefix: configure, build, run
#   pkg-config-test            `pkg-config --cflags --libs normkit` from that prefix: compile, run
#   example-cmake-project      examples/cmake-project against that prefix
#   add-subdirectory-test      add_subdirectory(normkit): build, run; no tests/bench/install
#   fetchcontent-test          FetchContent from the local checkout: the same checks
#   header_warnings            (a build target, not a test) the headers under -Werror
# normkit's headers warning-free in a strict user build (compiled, never run; a warning
# fails the build): tests/header_warnings.cpp under -Wall -Wextra -Wpedantic plus
# -Wshadow, -Wconversion, -Wsign-conversion, -Wold-style-cast, -Wcast-qual,
# -Wnon-virtual-dtor, -Woverloaded-virtual and -Wundef, and -Werror. CI builds it with
# GCC (the release build) and with clang (scripts/ci-sanitizers.sh, beside the TSan test).
set(NORMKIT_STRICT_WARNINGS
  $<$<CXX_COMPILER_ID:GNU,Clang>:-Wall -Wextra -Wpedantic -Wshadow -Wconversion -Wsign-conversion
    -Wold-style-cast -Wcast-qual -Wnon-virtual-dtor -Woverloaded-virtual -Wundef -Werror>
  $<$<AND:$<BOOL:${NORMKIT_NATIVE}>,$<CXX_COMPILER_ID:GNU,Clang>>:-march=native>)
# The asan preset sets NORMKIT_HEADER_WARNINGS off: a compile-only check, which the
# release build (GCC) and the TSan build (clang) of CI already make.
option(NORMKIT_HEADER_WARNINGS "Build the header_warnings target(s): the headers under -Werror" ON)
if(NORMKIT_HEADER_WARNINGS)
  add_library(header_warnings OBJECT header_warnings.cpp)
  target_link_libraries(header_warnings PRIVATE normkit::normkit)
  target_compile_options(header_warnings PRIVATE ${NORMKIT_STRICT_WARNINGS})
endif()

set(_nk_consumer_args
  -DGENERATOR=${CMAKE_GENERATOR}
  -DCXX_COMPILER=${CMAKE_CXX_COMPILER}
  -DBUILD_TYPE=${CMAKE_BUILD_TYPE}
  -DCXX_FLAGS=${CMAKE_CXX_FLAGS})

add_test(NAME add-subdirectory-test
  COMMAND ${CMAKE_COMMAND}
    -DNORMKIT_SOURCE_DIR=${PROJECT_SOURCE_DIR}
    -DCONSUMER_DIR=${CMAKE_CURRENT_SOURCE_DIR}/add-subdirectory-test
    -DBUILD_DIR=${CMAKE_CURRENT_BINARY_DIR}/add-subdirectory-test
    ${_nk_consumer_args}
    -P ${CMAKE_CURRENT_SOURCE_DIR}/add-subdirectory-test/run.cmake)
set_tests_properties(add-subdirectory-test PROPERTIES LABELS packaging TIMEOUT 300)

add_test(NAME fetchcontent-test
  COMMAND ${CMAKE_COMMAND}
    -DNORMKIT_SOURCE_DIR=${PROJECT_SOURCE_DIR}
    -DCONSUMER_DIR=${CMAKE_CURRENT_SOURCE_DIR}/fetchcontent-test
    -DBUILD_DIR=${CMAKE_CURRENT_BINARY_DIR}/fetchcontent-test
    -DSUBPROJECT_DIR=_deps/normkit-build
    ${_nk_consumer_args}
    -P ${CMAKE_CURRENT_SOURCE_DIR}/add-subdirectory-test/run.cmake)
set_tests_properties(fetchcontent-test PROPERTIES LABELS packaging TIMEOUT 300)

# The installed package exists only where this build generates install rules.
if(NOT NORMKIT_INSTALL)
  message(STATUS "normkit: NORMKIT_INSTALL is OFF, the find-package and pkg-config tests are skipped")
  return()
endif()

set(_nk_prefix ${CMAKE_CURRENT_BINARY_DIR}/find-package-test/prefix)
set(_nk_layout_args
  -DPREFIX=${_nk_prefix}
  -DINCLUDEDIR=${CMAKE_INSTALL_INCLUDEDIR}
  -DCMAKEDIR=${CMAKE_INSTALL_LIBDIR}/cmake/normkit
  -DPCDIR=${CMAKE_INSTALL_DATADIR}/pkgconfig)
set(_nk_run_script ${CMAKE_CURRENT_SOURCE_DIR}/find-package-test/run.cmake)

add_test(NAME find-package-test.install
  COMMAND ${CMAKE_COMMAND} -DSTEP=install -DNORMKIT_BINARY_DIR=${PROJECT_BINARY_DIR}
    -DCONFIG=$<CONFIG> ${_nk_layout_args} -P ${_nk_run_script})
set_tests_properties(find-package-test.install PROPERTIES
  LABELS packaging FIXTURES_SETUP normkit-installed)

add_test(NAME find-package-test
  COMMAND ${CMAKE_COMMAND} -DSTEP=cmake
    -DCONSUMER_DIR=${CMAKE_CURRENT_SOURCE_DIR}/find-package-test
    -DBUILD_DIR=${CMAKE_CURRENT_BINARY_DIR}/find-package-test/build
    ${_nk_consumer_args} ${_nk_layout_args} -P ${_nk_run_script})
add_test(NAME example-cmake-project
  COMMAND ${CMAKE_COMMAND} -DSTEP=cmake
    -DCONSUMER_DIR=${PROJECT_SOURCE_DIR}/examples/cmake-project
    -DBUILD_DIR=${CMAKE_CURRENT_BINARY_DIR}/find-package-test/example-cmake-project
    -DEXECUTABLE=layer_norm_demo
    ${_nk_consumer_args} ${_nk_layout_args} -P ${_nk_run_script})
set_tests_properties(find-package-test example-cmake-project PROPERTIES
  LABELS packaging FIXTURES_REQUIRED normkit-installed TIMEOUT 300)

find_program(NORMKIT_PKG_CONFIG NAMES pkgconf pkg-config)
if(NOT NORMKIT_PKG_CONFIG)
  message(STATUS "normkit: pkg-config not found, pkg-config-test is skipped "
                 "(Debian: apt-get install pkgconf)")
  return()
endif()
add_test(NAME pkg-config-test
  COMMAND ${CMAKE_COMMAND} -DSTEP=pkg-config -DPKG_CONFIG=${NORMKIT_PKG_CONFIG}
    -DNORMKIT_VERSION=${PROJECT_VERSION}
    -DSOURCE=${CMAKE_CURRENT_SOURCE_DIR}/find-package-test/main.cpp
    -DBUILD_DIR=${CMAKE_CURRENT_BINARY_DIR}/find-package-test/pkg-config
    -DCXX_COMPILER=${CMAKE_CXX_COMPILER}
    ${_nk_layout_args} -P ${_nk_run_script})
set_tests_properties(pkg-config-test PROPERTIES
  LABELS packaging FIXTURES_REQUIRED normkit-installed TIMEOUT 300)
