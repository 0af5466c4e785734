#pragma once
// Shared by the CLI tests: run `peft` in-process and capture what it prints.
#include <sstream>
#include <string>
#include <vector>

#include "peft_cli.hpp"

namespace peft::test::cli {

struct CliResult {
  int code;
  std::string out, err;
};

/// peft::cli::run(args) with stdout and stderr captured.
inline CliResult run_cli(const std::vector<std::string>& args) {
  std::ostringstream out, err;
  const int code = peft::cli::run(args, out, err);
  return {code, out.str(), err.str()};
}

inline bool contains(const std::string& s, const std::string& needle) { return s.find(needle) != std::string::npos; }

}  // namespace peft::test::cli
