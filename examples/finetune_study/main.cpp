// finetune_study: fine-tuning strategies compared on a real transfer task, with forgetting and
// its cures. See README.md in this folder, or run with --help.
#include <Eigen/Core>

#include <cstdlib>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include <peft/core/error.hpp>
#include <peft/core/warnings.hpp>
#include <peft/train/progress.hpp>
#include <peft/version.hpp>

#include "data.hpp"
#include "model.hpp"
#include "report.hpp"
#include "strategies.hpp"

namespace {

using study::Index;

const char* kUsage = R"(finetune_study - fine-tuning strategies compared on Fashion-MNIST, with forgetting and its cures

Pretrains a small network on the source task (Fashion-MNIST classes 0-4: T-shirt, trouser,
pullover, dress, coat), then adapts it to the target task (classes 5-9: sandal, shirt, sneaker,
bag, ankle boot) from a small labelled budget with each strategy, and evaluates both tasks on the
official test split. Same data, budget, batch order and seed for every strategy.

Usage: finetune_study [options]
  --strategies LIST   comma-separated subset (default: all); --list shows them
  --budget N          labelled target images (default 1000)
  --epochs N          fine-tuning epochs over the budget (default 10)
  --pretrain-epochs N source epochs (default 2)
  --seed N            seed of initialization, budget draw and batch order (default 1)
  --threads N         Eigen/OpenMP threads (default 1: the matrices are small, and on a busy
                      machine OpenMP barriers stall; --threads 2 helps on an idle one)
  --arch NAME         network: transformer or mlp (default: transformer when built in)
  --out DIR           output folder for CSV and SVG files (default finetune_out)
  --data-dir DIR      Fashion-MNIST IDX files (default /usr/share/datasets/fashion-mnist);
                      a built-in synthetic task is used when they are missing
  --quick             small configuration for a smoke test (< 30 s)
  --check             exit 1 unless the table has one row per strategy and every accuracy is above
                      chance (what the CTest smoke test runs)
  --plain             plain progress lines even on a terminal
  --list              list the strategies and exit
  --help              this text

Why this model: a small vision transformer (7x7-pixel patches -> 16 tokens, learned positions,
pre-norm blocks, mean pooling) is the smallest network on which every method of the study
applies as published: LoRA on the attention and feed-forward linears, adapters after the
attention and the feed-forward, (IA)^3 on keys, values and the feed-forward activation, prompt
tuning (prepended tokens) and prefix tuning (per-layer keys/values). A pixel MLP (--arch mlp)
hosts all but prompt and prefix tuning.

Heads and forgetting: one 10-way head; rows 0-4 are the source head, rows 5-9 the target head
(zero-initialised before adaptation). Each task's loss and accuracy use only its own five logits,
so "source accuracy after adaptation" measures how much the shared network drifted.

Outputs (in --out): results.csv, curves.csv (every learning curve), learning_curves.svg,
accuracy_vs_params.svg, run.txt.
)";

[[noreturn]] void usage_error(const std::string& msg) {
  std::cerr << "finetune_study: " << msg << "\nRun finetune_study --help for the options.\n";
  std::exit(2);
}

long parse_int(const std::string& flag, const std::string& v, long lo, long hi) {
  char* end = nullptr;
  const long x = std::strtol(v.c_str(), &end, 10);
  if (v.empty() || *end != '\0' || x < lo || x > hi)
    usage_error(flag + " expects an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "], got \"" + v +
                "\"");
  return x;
}

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ','))
    if (!item.empty()) out.push_back(item);
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  peft::set_warning_handler(peft::stderr_warning_handler());  // the library's warnings: "warning: ..." on stderr
  study::DataOptions data_opt;
  study::NetOptions net_opt;
  study::StudyOptions opt;
  std::string out_dir = "finetune_out";
  std::string strategies_arg = "all";
  bool quick = false, check = false, plain = false;
  int threads = 1;
  long budget = -1, epochs = -1, pretrain_epochs = -1;
  std::string command_line = argv[0];
#if STUDY_HAS_TRANSFORMER
  net_opt.arch = "transformer";
#else
  net_opt.arch = "mlp";
#endif
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    command_line += " " + a;
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage_error(a + " needs a value");
      command_line += std::string(" ") + argv[i + 1];
      return argv[++i];
    };
    if (a == "--help" || a == "-h") {
      std::cout << kUsage << "Architectures built in: " << study::available_architectures() << '\n';
      return 0;
    } else if (a == "--list") {
      for (const auto& s : study::all_strategies())
        std::cout << s.id << std::string(s.id.size() < 16 ? 16 - s.id.size() : 1, ' ') << s.label << "  [" << s.family
                  << (s.needs_sequence_model ? ", transformer only" : "") << "]\n";
      return 0;
    } else if (a == "--strategies") {
      strategies_arg = value();
    } else if (a == "--budget") {
      budget = parse_int(a, value(), 5, 25000);
    } else if (a == "--epochs") {
      epochs = parse_int(a, value(), 1, 1000);
    } else if (a == "--pretrain-epochs") {
      pretrain_epochs = parse_int(a, value(), 1, 100);
    } else if (a == "--seed") {
      opt.seed = static_cast<std::uint64_t>(parse_int(a, value(), 0, 2147483647));
    } else if (a == "--threads") {
      threads = static_cast<int>(parse_int(a, value(), 1, 256));
    } else if (a == "--arch") {
      net_opt.arch = value();
    } else if (a == "--out") {
      out_dir = value();
    } else if (a == "--data-dir") {
      data_opt.data_dir = value();
    } else if (a == "--quick") {
      quick = true;
    } else if (a == "--check") {
      check = true;
    } else if (a == "--plain") {
      plain = true;
    } else {
      usage_error("unknown option \"" + a + "\"");
    }
  }

  // Which strategies, in table order.
  std::vector<study::StrategyInfo> chosen;
  if (strategies_arg == "all") {
    for (const auto& s : study::all_strategies())
      if (!s.needs_sequence_model || net_opt.arch != "mlp") chosen.push_back(s);
  } else {
    const std::vector<std::string> wanted = split(strategies_arg);
    for (const auto& w : wanted) {
      bool found = false;
      for (const auto& s : study::all_strategies()) found = found || s.id == w;
      if (!found) usage_error("--strategies: unknown strategy \"" + w + "\" (see --list)");
    }
    for (const auto& s : study::all_strategies())
      for (const auto& w : wanted)
        if (s.id == w) {
          if (s.needs_sequence_model && net_opt.arch == "mlp")
            usage_error("--strategies: " + w + " needs a sequence model; use --arch transformer");
          chosen.push_back(s);
        }
  }
  if (chosen.empty()) usage_error("--strategies selects nothing");

  if (quick) {
    data_opt.budget = 250;
    data_opt.target_val = 250;
    data_opt.source_val = 250;
    data_opt.max_source = 4000;
    data_opt.max_test_per_task = 1000;
    opt.pretrain_epochs = 1;
    opt.epochs = 5;
    opt.ewc_samples = 50;
  }
  if (budget > 0) data_opt.budget = budget;
  if (epochs > 0) opt.epochs = static_cast<int>(epochs);
  if (pretrain_epochs > 0) opt.pretrain_epochs = static_cast<int>(pretrain_epochs);
  data_opt.seed = opt.seed;
  Eigen::setNbThreads(threads);
  if (plain) opt.progress.mode = peft::ProgressOptions::Mode::Plain;
  opt.log = &std::cout;

  try {
    std::string why;
    const study::TransferData data = study::load_transfer_data(data_opt, &why);
    // First line: which data this run uses (the fallback says so loudly).
    if (data.synthetic)
      std::cout << "DATA: Fashion-MNIST not found (" << why << "); using the built-in synthetic task instead\n";
    else
      std::cout << "DATA: " << data.description << '\n';
    std::cout << "task: pretrain on classes 0-4 (" << data.source_train.size() << " images), adapt to classes 5-9 from "
              << data.target_budget.size() << " labelled images; test " << data.source_test.size() << " + "
              << data.target_test.size() << " images\n";

    study::Pretrained pre = study::pretrain(data, net_opt, opt);
    std::cout << "model: " << pre.net->describe() << "; threads " << Eigen::nbThreads() << "; seed " << opt.seed << '\n'
              << "pretrained: source test accuracy " << 100.0 * pre.source_acc << " % ("
              << peft::format_duration(pre.seconds) << ")\n";

    std::vector<study::StrategyResult> results;
    for (const auto& s : chosen) results.push_back(study::run_strategy(s, pre, data, net_opt, opt));

    study::print_table(std::cout, pre, results);
    study::RunInfo info;
    info.data = data.description;
    info.net = pre.net->describe();
    info.command_line = command_line;
    info.budget = data.target_budget.size();
    info.epochs = opt.epochs;
    info.seed = opt.seed;
    info.threads = Eigen::nbThreads();
    const auto files = study::write_outputs(out_dir, info, pre, results);
    std::cout << "\nwrote";
    for (const auto& f : files) std::cout << ' ' << f;
    std::cout << '\n';

    if (check) {
      std::vector<std::string> ids;
      for (const auto& s : chosen) ids.push_back(s.id);
      const auto fails = study::check_results(pre, results, ids);
      for (const auto& f : fails) std::cout << "CHECK FAILED: " << f << '\n';
      if (!fails.empty()) return 1;
      std::cout << "check passed: " << results.size() << " rows, every accuracy above chance\n";
    }
  } catch (const peft::Error& e) {
    std::cerr << "finetune_study: " << e.what() << '\n';
    return 1;
  }
  return 0;
}
