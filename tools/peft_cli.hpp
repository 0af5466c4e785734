#pragma once
// The `peft` command-line tool, as a function so that tests can run it in-process:
//   int peft::cli::run(args, out, err)
//
//   peft inspect FILE|DIR
//   peft merge   --base model.safetensors --adapter DIR [--scale S] [--map FROM=TO]... --out merged.safetensors
//   peft combine --method cat|svd|linear|ties|dare_linear|dare_ties|magnitude_prune
//                [--weights w1,w2,...] [--rank K] [--density D] [--seed N] [--majority-sign total|frequency]
//                DIR DIR... --out DIR
//   peft quantize IN.safetensors --out OUT.safetensors [--blocksize N] [--no-double-quant]
//   peft extract --base A.safetensors --tuned B.safetensors (--rank K | --energy TAU) [--rslora] --out DIR
//   peft reward  --model BASE_DIR --reward REWARD_DIR [--tokenizer FILE] [--raw] FILE
//   peft --version
//
// Exit codes (distinct per failure class, documented in `peft --help`):
//   0 success, 1 unexpected internal error, 2 usage error, 3 I/O or file-format error (IoError),
//   4 unsupported or inconsistent configuration (ConfigError), 5 shapes that do not fit (ShapeError),
//   6 NaN / Inf (NumericError), 7 out of memory (std::bad_alloc).
// A tensor that an adapter targets but the base lacks is a configuration error (4): the wrong base
// model, or a --map is needed.
//
// Every output (merged file, adapter directory) is written atomically: on any failure nothing is
// left. The `peft` executable also calls install_signal_handlers(): on SIGINT, SIGTERM or SIGHUP
// the temporaries are removed and the signal is re-raised (the exit status is the signal's); on
// SIGBUS (a memory-mapped input truncated by another process) they are removed and the tool exits
// with 3. SIGKILL cannot be caught: its temporary stays until the next run for that output.
#include <ostream>
#include <string>
#include <vector>

namespace peft::cli {

enum ExitCode : int {
  kOk = 0,
  kInternal = 1,
  kUsage = 2,
  kIo = 3,
  kConfig = 4,
  kShape = 5,
  kNumeric = 6,
  kOutOfMemory = 7,
};

/// Runs one command line (argv without the program name). Never throws.
int run(const std::vector<std::string>& argv, std::ostream& out, std::ostream& err);

/// Installs the tool's handlers for SIGINT, SIGTERM, SIGHUP (unless ignored when the process
/// started, e.g. under nohup) and SIGBUS; see the file comment. For the executable's main(), not
/// for a program that embeds run().
void install_signal_handlers();

}  // namespace peft::cli
