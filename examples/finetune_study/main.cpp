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

Pretrains a small network on five source classes of Fashion-MNIST, then adapts it to the other five
from a small labelled budget with each strategy, and evaluates both tasks on the official test
split. For each seed and strategy, every learning rate of the strategy's grid is trained and the
one with the best accuracy on a target validation split (training images outside the budget, as
many as the budget) is kept; only that run is evaluated on the test split (every rate under
--full). Same data, budget, batch order and seed for every strategy within a seed.

Usage: finetune_study [options]
  --strategies LIST   comma-separated subset; "all" for every strategy and control (default: the
                      default set, see --list)
  --full              every strategy and control, and the test split at every rate (matched-rate
                      comparisons)
  --source-classes L  the five source classes (default 0,1,2,5,8: T-shirt, trouser, pullover,
                      sandal, bag; the target is the other five)
  --budget N          labelled target images (default 100)
  --steps N           fine-tuning optimizer steps, independent of the budget (default 200)
  --pretrain-epochs N source epochs (default 2)
  --seeds N           seeds per strategy (default 3; --quick: 1)
  --seed N            first seed (default 1): seeds N, N+1, ... Each seed draws its own budget,
                      validation split, pretraining and batch order
  --threads N         Eigen/OpenMP threads (default 1: the matrices are small)
  --arch NAME         network: transformer or mlp (default: transformer when built in)
  --out DIR           output folder for CSV and SVG files (default finetune_out)
  --data-dir DIR      Fashion-MNIST IDX files (default /usr/share/datasets/fashion-mnist);
                      a built-in synthetic task is used when they are missing
  --quick             small configuration for a smoke test
  --check             exit 1 unless every requested strategy has a row, every accuracy is above
                      chance and every PEFT model with its modules disabled reproduces the
                      pretrained model's source logits exactly (what the CTest smoke test runs)
  --plain             plain progress lines even on a terminal
  --list              list the strategies with their rate grids and exit
  --help              this text

The model: a small vision transformer (7x7-pixel patches -> 16 tokens, learned positions,
pre-norm blocks, mean pooling), the smallest network on which every method of the study applies
as published. A pixel MLP (--arch mlp) hosts all but prompt and prefix tuning.

Heads and forgetting: one 10-way head; rows 0-4 are the source head, rows 5-9 the target head
(zero-initialised before adaptation, except in the random-head control). Each task's loss and
accuracy use only its own five logits, so "source accuracy after adaptation" measures how much
the shared network drifted.

Outputs (in --out): runs.csv (every strategy, seed and rate), summary.csv, curves.csv, curves.svg,
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

std::vector<int> parse_classes(const std::string& v) {
  std::vector<int> out;
  for (const auto& item : split(v)) out.push_back(static_cast<int>(parse_int("--source-classes", item, 0, 9)));
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  peft::set_warning_handler(peft::stderr_warning_handler());  // the library's warnings: "warning: ..." on stderr
  study::DataOptions data_opt;
  study::NetOptions net_opt;
  study::StudyOptions opt;
  std::string out_dir = "finetune_out";
  std::string strategies_arg;
  bool quick = false, check = false, plain = false, full = false;
  int threads = 1;
  long budget = -1, steps = -1, pretrain_epochs = -1, seeds = -1;
  std::uint64_t first_seed = 1;
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
      for (const auto& s : study::all_strategies()) {
        std::string grid;
        for (double lr : s.lr_grid) grid += (grid.empty() ? "" : ", ") + study::format_lr(lr);
        std::cout << s.id << std::string(s.id.size() < 18 ? 18 - s.id.size() : 1, ' ') << s.label << "  [" << s.family
                  << (s.in_default ? ", default" : "") << (s.needs_sequence_model ? ", transformer only" : "")
                  << "; rates " << grid << "]\n";
      }
      return 0;
    } else if (a == "--strategies") {
      strategies_arg = value();
    } else if (a == "--full") {
      full = true;
    } else if (a == "--source-classes") {
      data_opt.source_classes = parse_classes(value());
    } else if (a == "--budget") {
      budget = parse_int(a, value(), 10, 25000);
    } else if (a == "--steps") {
      steps = parse_int(a, value(), 1, 1000000);
    } else if (a == "--pretrain-epochs") {
      pretrain_epochs = parse_int(a, value(), 1, 100);
    } else if (a == "--seeds") {
      seeds = parse_int(a, value(), 1, 100);
    } else if (a == "--seed") {
      first_seed = static_cast<std::uint64_t>(parse_int(a, value(), 0, 2147483647));
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
  const bool mlp = net_opt.arch == "mlp";
  if (strategies_arg.empty() || strategies_arg == "all") {
    const bool every = full || strategies_arg == "all";
    for (const auto& s : study::all_strategies())
      if ((every || s.in_default) && (!s.needs_sequence_model || !mlp)) chosen.push_back(s);
    // The MLP cannot host prefix tuning: its default set gets (IA)^3 instead.
    if (mlp && !every) chosen.insert(chosen.end() - 1, study::strategy("ia3"));
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
          if (s.needs_sequence_model && mlp)
            usage_error("--strategies: " + w + " needs a sequence model; use --arch transformer");
          chosen.push_back(s);
        }
  }
  if (chosen.empty()) usage_error("--strategies selects nothing");

  int num_seeds = 3;
  if (quick) {
    num_seeds = 1;
    data_opt.max_source = 3000;
    data_opt.source_val = 200;
    data_opt.max_test_per_task = 500;
    opt.pretrain_epochs = 1;
    opt.steps = 40;
    opt.curve_points = 2;
    opt.ewc_samples = 50;
  }
  if (budget > 0) data_opt.budget = budget;
  if (steps > 0) opt.steps = steps;
  if (pretrain_epochs > 0) opt.pretrain_epochs = static_cast<int>(pretrain_epochs);
  if (seeds > 0) num_seeds = static_cast<int>(seeds);
  Eigen::setNbThreads(threads);
  if (plain) opt.progress.mode = peft::ProgressOptions::Mode::Plain;
  opt.log = &std::cout;

  try {
    study::Study st;
    st.strategies = chosen;
    for (int k = 0; k < num_seeds; ++k) {
      const std::uint64_t seed = first_seed + static_cast<std::uint64_t>(k);
      data_opt.seed = seed;
      opt.seed = seed;
      std::string why;
      const study::TransferData data = study::load_transfer_data(data_opt, &why);
      if (k == 0) {
        // First line: which data this run uses (the fallback says so loudly).
        if (data.synthetic)
          std::cout << "DATA: Fashion-MNIST not found (" << why << "); using the built-in synthetic task instead\n";
        else
          std::cout << "DATA: " << data.description << '\n';
        std::string src, tgt;
        for (int c = 0; c < study::kNumClasses; ++c)
          (c < study::kTaskClasses ? src : tgt) +=
              std::string(c % study::kTaskClasses == 0 ? "" : ", ") + study::class_name(data.original_class[static_cast<std::size_t>(c)]);
        st.info.split = "source " + src + "; target " + tgt;
        std::cout << "task: pretrain on " << src << " (" << data.source_train.size() << " images); adapt to " << tgt
                  << " from " << data.target_budget.size() << " labelled images in " << opt.steps
                  << " steps; rates chosen on " << data.target_val.size() << " validation images; test "
                  << data.source_test.size() << " + " << data.target_test.size() << " images; " << num_seeds
                  << " seed(s)\n";
        st.info.data = data.description;
        st.info.budget = data.target_budget.size();
        st.info.val = data.target_val.size();
      }
      study::Pretrained pre = study::pretrain(data, net_opt, opt);
      if (k == 0) st.info.net = pre.net->describe();
      std::cout << "seed " << seed << ": pretrained source test accuracy " << 100.0 * pre.source_acc << " % ("
                << peft::format_duration(pre.seconds) << ")\n";
      for (const auto& s : chosen) {
        std::unique_ptr<study::Net> best_net;
        std::size_t best = 0;
        std::vector<study::RunResult> runs;
        for (double lr : s.lr_grid) {
          std::unique_ptr<study::Net> net;
          runs.push_back(study::run_strategy(s, lr, pre, data, net_opt, opt, net));
          if (full) study::test(runs.back(), *net, pre, data);  // matched-rate comparisons need every rate
          // Ties keep the smaller rate (the grid is increasing).
          if (runs.size() == 1 || runs.back().val_acc > runs[best].val_acc) {
            best = runs.size() - 1;
            best_net = std::move(net);
          }
        }
        runs[best].chosen = true;
        if (!runs[best].tested) study::test(runs[best], *best_net, pre, data);
        for (auto& r : runs) st.runs.push_back(std::move(r));
      }
      st.pretrained.push_back(study::PretrainedSummary{seed, pre.source_acc, pre.target_acc, pre.seconds, pre.curve});
    }
    st.info.command_line = command_line;
    st.info.steps = opt.steps;
    st.info.threads = Eigen::nbThreads();
    st.info.num_seeds = num_seeds;

    study::print_tables(std::cout, st);
    const auto files = study::write_outputs(out_dir, st);
    std::cout << "\nwrote";
    for (const auto& f : files) std::cout << ' ' << f;
    std::cout << '\n';

    if (check) {
      const auto fails = study::check_results(st);
      for (const auto& f : fails) std::cout << "CHECK FAILED: " << f << '\n';
      if (!fails.empty()) return 1;
      std::cout << "check passed: " << chosen.size() << " strategies x " << num_seeds
                << " seed(s), every accuracy above chance, disabled PEFT modules reproduce the pretrained model\n";
    }
  } catch (const peft::Error& e) {
    std::cerr << "finetune_study: " << e.what() << '\n';
    return 1;
  }
  return 0;
}
