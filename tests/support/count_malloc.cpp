// The interposed malloc / operator new of support/count_malloc.hpp, compiled once for an executable
// whose test files include the header with PEFT_COUNT_MALLOC_NO_DEFINITIONS (peft_tests_no_malloc in
// its counting mode, see support/no_malloc.hpp).
#include "support/count_malloc.hpp"
