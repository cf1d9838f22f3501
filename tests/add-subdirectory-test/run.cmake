# Configures, builds and runs the add_subdirectory() (or FetchContent) consumer in
# CONSUMER_DIR against the normkit sources in NORMKIT_SOURCE_DIR (see
# tests/packaging.cmake), and checks that normkit, as a subproject, brings its target
# and nothing else: no tests, benchmarks, examples or install rules. SUBPROJECT_DIR is
# normkit's binary directory under BUILD_DIR (default normkit-build). Silent on success;
# on failure, says what and why.
cmake_minimum_required(VERSION 3.16)

foreach(var NORMKIT_SOURCE_DIR CONSUMER_DIR BUILD_DIR GENERATOR)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "add-subdirectory-test: run.cmake needs -D${var}=...")
  endif()
endforeach()
if(NOT DEFINED SUBPROJECT_DIR)
  set(SUBPROJECT_DIR normkit-build)
endif()
get_filename_component(test_name "${CONSUMER_DIR}" NAME)

# nk_run(<what> <command> ...): runs the command; on failure, stops with its output.
function(nk_run what)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  if(NOT rc EQUAL 0)
    string(REPLACE ";" " " cmd "${ARGN}")
    message(FATAL_ERROR "${test_name}: ${what} failed (${rc}):\n  ${cmd}\n${out}")
  endif()
endfunction()

file(REMOVE_RECURSE "${BUILD_DIR}")
nk_run("configuring ${CONSUMER_DIR}"
  "${CMAKE_COMMAND}" -S "${CONSUMER_DIR}" -B "${BUILD_DIR}" -G "${GENERATOR}"
  "-DNORMKIT_SOURCE_DIR=${NORMKIT_SOURCE_DIR}"
  "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}"
  "-DCMAKE_BUILD_TYPE=${BUILD_TYPE}"
  "-DCMAKE_CXX_FLAGS=${CXX_FLAGS}")

# normkit is not the top-level project here, so every NORMKIT_BUILD_*/NORMKIT_INSTALL
# option defaults to OFF and its tests/, bench/ and examples/ are never added.
set(subproject "${BUILD_DIR}/${SUBPROJECT_DIR}")
if(NOT IS_DIRECTORY "${subproject}")
  message(FATAL_ERROR "${test_name}: ${subproject} is missing: was normkit added?")
endif()
file(STRINGS "${BUILD_DIR}/CMakeCache.txt" options REGEX "^NORMKIT_(BUILD_[A-Z]+|INSTALL):")
foreach(option NORMKIT_BUILD_TESTS NORMKIT_BUILD_BENCH NORMKIT_BUILD_EXAMPLES NORMKIT_INSTALL)
  if(NOT "${options}" MATCHES "(^|;)${option}:BOOL=OFF(;|$)")
    message(FATAL_ERROR "${test_name}: ${option} should default to OFF when normkit "
                        "is a subproject; the cache has: ${options}")
  endif()
endforeach()
foreach(dir tests bench examples)
  if(EXISTS "${subproject}/${dir}")
    message(FATAL_ERROR "${test_name}: normkit's ${dir}/ was added to the consumer's "
                        "build (${subproject}/${dir} exists)")
  endif()
endforeach()
file(READ "${subproject}/cmake_install.cmake" install_rules)
if(install_rules MATCHES "normkitTargets|normkitConfig")
  message(FATAL_ERROR "${test_name}: normkit installs its package from a consumer's "
                      "tree (${subproject}/cmake_install.cmake)")
endif()

nk_run("building ${CONSUMER_DIR}" "${CMAKE_COMMAND}" --build "${BUILD_DIR}")
file(GLOB app "${BUILD_DIR}/app" "${BUILD_DIR}/*/app" "${BUILD_DIR}/app.exe" "${BUILD_DIR}/*/app.exe")
if(NOT app)
  message(FATAL_ERROR "${test_name}: no executable 'app' in ${BUILD_DIR}")
endif()
list(GET app 0 app)
nk_run("running ${app}" "${app}")
