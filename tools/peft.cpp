// The `peft` command-line tool; see tools/peft_cli.hpp for the commands and exit codes.
#include <iostream>
#include <string>
#include <vector>

#include "peft_cli.hpp"

int main(int argc, char** argv) {
  peft::cli::install_signal_handlers();  // temporaries are removed on SIGINT / SIGTERM / SIGHUP / SIGBUS
  std::vector<std::string> args(argv + 1, argv + argc);
  return peft::cli::run(args, std::cout, std::cerr);
}
