// Linked into every test executable but tests/parallel's where the test build has OpenMP
// (PEFT_TEST_OPENMP): the library runs on one thread there unless OMP_NUM_THREADS asks for more,
// as when the test build had no OpenMP (the allocation counts of the no-malloc tests and the
// suite's run time under `ctest -j` rely on it). The thread count of peft's loops and of Eigen's
// products is omp_get_max_threads() unless a program calls Eigen::setNbThreads. Compiled once (an
// object library), without Eigen.
#include <omp.h>

#include <cstdlib>

namespace {
const bool peft_tests_one_thread = [] {
  if (std::getenv("OMP_NUM_THREADS") == nullptr) omp_set_num_threads(1);
  return true;
}();
}  // namespace
