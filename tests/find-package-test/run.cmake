# Tests the installed normkit package, one STEP a CTest test (see tests/packaging.cmake):
#   install     install the normkit build tree NORMKIT_BINARY_DIR into a fresh PREFIX
#   cmake       configure CONSUMER_DIR against PREFIX with find_package, build it, run its
#               EXECUTABLE (default: app)
#   pkg-config  compile find-package-test/main.cpp with `pkg-config --cflags --libs normkit`
#               found through PREFIX, run it
# Silent on success; on failure, says which step failed and prints the command and output.
cmake_minimum_required(VERSION 3.16)

foreach(var STEP PREFIX)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "find-package-test: run.cmake needs -D${var}=...")
  endif()
endforeach()

# nk_run(<what> <command> ...): runs the command; on failure, stops with its output.
function(nk_run what)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  if(NOT rc EQUAL 0)
    string(REPLACE ";" " " cmd "${ARGN}")
    message(FATAL_ERROR "find-package-test (${STEP}): ${what} failed (${rc}):\n  ${cmd}\n${out}")
  endif()
  set(nk_output "${out}" PARENT_SCOPE)
endfunction()

if(STEP STREQUAL "install")
  # A fresh prefix, so that no file of an earlier install can hide a missing one.
  file(REMOVE_RECURSE "${PREFIX}")
  set(config_args "")
  if(CONFIG)
    set(config_args --config "${CONFIG}")
  endif()
  nk_run("installing normkit" "${CMAKE_COMMAND}" --install "${NORMKIT_BINARY_DIR}"
         --prefix "${PREFIX}" ${config_args})
  foreach(file "${INCLUDEDIR}/normkit/normkit.hpp" "${CMAKEDIR}/normkitConfig.cmake"
               "${CMAKEDIR}/normkitConfigVersion.cmake" "${CMAKEDIR}/normkitTargets.cmake"
               "${PCDIR}/normkit.pc")
    if(NOT EXISTS "${PREFIX}/${file}")
      message(FATAL_ERROR "find-package-test (install): ${PREFIX}/${file} was not installed")
    endif()
  endforeach()

elseif(STEP STREQUAL "cmake")
  file(REMOVE_RECURSE "${BUILD_DIR}")
  nk_run("configuring ${CONSUMER_DIR} against ${PREFIX}"
    "${CMAKE_COMMAND}" -S "${CONSUMER_DIR}" -B "${BUILD_DIR}" -G "${GENERATOR}"
    "-DCMAKE_PREFIX_PATH=${PREFIX}"
    "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}"
    "-DCMAKE_BUILD_TYPE=${BUILD_TYPE}"
    "-DCMAKE_CXX_FLAGS=${CXX_FLAGS}"
    -DCMAKE_EXPORT_COMPILE_COMMANDS=ON)
  # The package must come from PREFIX, not from some normkit installed on the system.
  file(STRINGS "${BUILD_DIR}/CMakeCache.txt" normkit_dir REGEX "^normkit_DIR:")
  string(REGEX REPLACE "^normkit_DIR:[A-Z]+=" "" normkit_dir "${normkit_dir}")
  if(NOT normkit_dir STREQUAL "${PREFIX}/${CMAKEDIR}")
    message(FATAL_ERROR "find-package-test (cmake): find_package(normkit) found '${normkit_dir}', "
                        "expected ${PREFIX}/${CMAKEDIR}")
  endif()
  nk_run("building ${CONSUMER_DIR}" "${CMAKE_COMMAND}" --build "${BUILD_DIR}")
  # And the headers too: normkit::normkit must carry the installed include directory.
  if(EXISTS "${BUILD_DIR}/compile_commands.json")
    file(READ "${BUILD_DIR}/compile_commands.json" commands)
    string(FIND "${commands}" "${PREFIX}/${INCLUDEDIR}" at)
    if(at EQUAL -1)
      message(FATAL_ERROR "find-package-test (cmake): ${PREFIX}/${INCLUDEDIR} is not on the "
                          "compile line of the consumer:\n${commands}")
    endif()
  endif()
  if(NOT EXECUTABLE)
    set(EXECUTABLE app)
  endif()
  file(GLOB app "${BUILD_DIR}/${EXECUTABLE}" "${BUILD_DIR}/*/${EXECUTABLE}"
                "${BUILD_DIR}/${EXECUTABLE}.exe" "${BUILD_DIR}/*/${EXECUTABLE}.exe")
  if(NOT app)
    message(FATAL_ERROR "find-package-test (cmake): no executable '${EXECUTABLE}' in ${BUILD_DIR}")
  endif()
  list(GET app 0 app)
  nk_run("running ${app}" "${app}")

elseif(STEP STREQUAL "pkg-config")
  file(REMOVE_RECURSE "${BUILD_DIR}")
  file(MAKE_DIRECTORY "${BUILD_DIR}")
  set(ENV{PKG_CONFIG_PATH} "${PREFIX}/${PCDIR}")
  nk_run("pkg-config --modversion normkit" "${PKG_CONFIG}" --modversion normkit)
  string(STRIP "${nk_output}" version)
  if(NOT version STREQUAL "${NORMKIT_VERSION}")
    message(FATAL_ERROR "find-package-test (pkg-config): normkit.pc says version '${version}', "
                        "expected ${NORMKIT_VERSION}")
  endif()
  # The .pc file must point into PREFIX even though the build was configured for another.
  nk_run("pkg-config --variable=includedir normkit" "${PKG_CONFIG}" --variable=includedir normkit)
  string(STRIP "${nk_output}" includedir)
  get_filename_component(includedir "${includedir}" REALPATH)
  get_filename_component(expected "${PREFIX}/${INCLUDEDIR}" REALPATH)
  if(NOT includedir STREQUAL expected)
    message(FATAL_ERROR "find-package-test (pkg-config): normkit.pc gives includedir "
                        "'${includedir}', expected ${expected}")
  endif()
  nk_run("pkg-config --cflags normkit" "${PKG_CONFIG}" --cflags normkit)
  separate_arguments(cflags UNIX_COMMAND "${nk_output}")
  nk_run("pkg-config --libs normkit" "${PKG_CONFIG}" --libs normkit)
  separate_arguments(libs UNIX_COMMAND "${nk_output}")
  set(app "${BUILD_DIR}/app")
  nk_run("compiling main.cpp with the pkg-config flags"
         "${CXX_COMPILER}" ${cflags} "${SOURCE}" -o "${app}" ${libs})
  nk_run("running ${app}" "${app}")

else()
  message(FATAL_ERROR "find-package-test: unknown STEP '${STEP}' (install, cmake, pkg-config)")
endif()
