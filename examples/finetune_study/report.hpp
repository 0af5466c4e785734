#pragma once
// Results: the console table, CSV files and hand-written SVG plots (no plotting dependency; any
// browser opens them).
#include <iosfwd>
#include <string>
#include <vector>

#include "strategies.hpp"

namespace study {

struct RunInfo {
  std::string data;  ///< data description
  std::string net;   ///< architecture description
  std::string command_line;
  Index budget = 0;
  int epochs = 0;
  std::uint64_t seed = 0;
  int threads = 0;
};

void print_table(std::ostream& out, const Pretrained& pretrained, const std::vector<StrategyResult>& results);

/// Writes results.csv, curves.csv, learning_curves.svg and accuracy_vs_params.svg into `dir`
/// (created if needed); returns the paths written.
std::vector<std::string> write_outputs(const std::string& dir, const RunInfo& info, const Pretrained& pretrained,
                                       const std::vector<StrategyResult>& results);

/// The smoke test's assertions: one row per strategy, accuracies finite and above chance (5-way:
/// 20 %) by a margin, parameter counts consistent. Returns the failures (empty: pass).
std::vector<std::string> check_results(const Pretrained& pretrained, const std::vector<StrategyResult>& results,
                                       const std::vector<std::string>& expected_ids);

}  // namespace study
