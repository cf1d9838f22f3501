# Synchronized BatchNorm over MPI, run under mpirun with 2 and 3 ranks (uneven splits).
# Skipped, with a message, where no MPI is installed: nothing else in normkit needs it.
find_package(MPI COMPONENTS CXX QUIET)
if(NOT MPI_CXX_FOUND)
  message(STATUS "normkit: MPI not found, the synchronized BatchNorm tests are skipped "
                 "(Debian: apt-get install openmpi-bin libopenmpi-dev)")
  return()
endif()

add_executable(test_batch_norm_mpi test_batch_norm_mpi.cpp)
target_link_libraries(test_batch_norm_mpi PRIVATE normkit::normkit normkit_dev_flags GTest::gtest MPI::MPI_CXX)
target_include_directories(test_batch_norm_mpi PRIVATE ${CMAKE_CURRENT_SOURCE_DIR})

# mpi.hpp under the strict warnings of header_warnings (tests/packaging.cmake), where
# that target is built; compiled, never run.
if(TARGET header_warnings)
  add_library(header_warnings_mpi OBJECT header_warnings_mpi.cpp)
  target_link_libraries(header_warnings_mpi PRIVATE normkit::normkit MPI::MPI_CXX)
  target_compile_options(header_warnings_mpi PRIVATE ${NORMKIT_STRICT_WARNINGS})
endif()

# Open MPI refuses to run as root without --allow-run-as-root, and to start more ranks
# than cores (CI has 2) without --oversubscribe; other MPIs do not know the flags.
set(NORMKIT_MPIEXEC_FLAGS "")
execute_process(COMMAND ${MPIEXEC_EXECUTABLE} --version OUTPUT_VARIABLE _nk_mpi_version ERROR_QUIET)
if(_nk_mpi_version MATCHES "Open MPI|OpenRTE")
  set(NORMKIT_MPIEXEC_FLAGS --allow-run-as-root --oversubscribe)
endif()
foreach(ranks 2 3)
  add_test(NAME BatchNormMpi.${ranks}Ranks
           COMMAND ${MPIEXEC_EXECUTABLE} ${MPIEXEC_NUMPROC_FLAG} ${ranks} ${NORMKIT_MPIEXEC_FLAGS}
                   ${MPIEXEC_PREFLAGS} $<TARGET_FILE:test_batch_norm_mpi> ${MPIEXEC_POSTFLAGS})
  # Open MPI leaks at exit by design; under ASan keep the memory-error checks and drop
  # only leak detection for these tests.
  set_tests_properties(BatchNormMpi.${ranks}Ranks PROPERTIES LABELS "mpi" TIMEOUT 120
                       ENVIRONMENT "ASAN_OPTIONS=detect_leaks=0")
endforeach()
