#pragma once
// Results: the console tables, CSV files and hand-written SVG plots (no plotting dependency; any
// browser opens them).
#include <iosfwd>
#include <string>
#include <vector>

#include "strategies.hpp"

namespace study {

struct RunInfo {
  std::string data;   ///< data description
  std::string split;  ///< source and target class names
  std::string net;    ///< architecture description
  std::string command_line;
  Index budget = 0;
  Index val = 0;
  Index steps = 0;
  int threads = 0;
  int num_seeds = 0;
};

struct PretrainedSummary {
  std::uint64_t seed = 0;
  double source_acc = 0.0;
  double target_acc = 0.0;
  double seconds = 0.0;
  std::vector<CurvePoint> curve;
};

/// Everything one invocation measured.
struct Study {
  RunInfo info;
  std::vector<StrategyInfo> strategies;      ///< in table order
  std::vector<PretrainedSummary> pretrained;  ///< one per seed
  std::vector<RunResult> runs;                ///< every strategy × seed × rate
};

std::string format_lr(double lr);

void print_tables(std::ostream& out, const Study& study);

/// Writes runs.csv, summary.csv, curves.csv, curves.svg, accuracy_vs_params.svg and run.txt into
/// `dir` (created if needed); returns the paths written.
std::vector<std::string> write_outputs(const std::string& dir, const Study& study);

/// The smoke test's assertions: every strategy has a chosen, tested run per seed; accuracies
/// finite and above chance (5-way: 20 %) by a margin; parameter counts consistent; every PEFT
/// model with its modules disabled reproduces the pretrained source logits exactly. Returns the
/// failures (empty: pass).
std::vector<std::string> check_results(const Study& study);

}  // namespace study
