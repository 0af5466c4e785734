#pragma once
// Shared by the Llama tests (tests/models/test_llama*.cpp): the fixture directory, the tiny config
// every synthetic Llama test starts from, and the error measure over a layout's real rows.
#include <algorithm>
#include <cstdlib>
#include <string>

#include <peft/core/sequence.hpp>
#include <peft/core/types.hpp>
#include <peft/models/llama.hpp>

namespace peft::test {

/// tests/data/llama/<name> (or $PEFT_TEST_DATA/llama/<name>).
inline std::string llama_data(const std::string& name) {
  std::string dir;
  if (const char* d = std::getenv("PEFT_TEST_DATA")) {
    dir = d;
  } else {
    std::string here = __FILE__;
    here = here.substr(0, here.find_last_of('/'));
    dir = here.substr(0, here.find_last_of('/')) + "/data";
  }
  return dir + "/llama/" + name;
}

/// 2 layers, hidden 8, 4 query heads over 2 key/value heads (GQA), head_dim 4, vocabulary 11;
/// no biases, default rope (theta 100). Tests switch on what they exercise.
inline LlamaConfig tiny_llama_base() {
  LlamaConfig c;
  c.vocab_size = 11;
  c.hidden_size = 8;
  c.intermediate_size = 12;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 4;
  c.rms_norm_eps = 1e-5;
  c.rope.theta = 100.0;
  return c;
}

/// Relative max-norm error of `got` against `want` over the real (non-padding) rows of `layout`,
/// left or right padded.
template <class T>
double valid_rows_error(const Matrix<T>& got, const Matrix<double>& want, const SequenceLayout& layout) {
  double num = 0, den = 0;
  for (Index b = 0; b < layout.batch; ++b)
    for (Index t = layout.first(b); t < layout.first(b) + layout.length(b); ++t) {
      const Index r = layout.row(b, t);
      num = std::max(num, (got.row(r).template cast<double>() - want.row(r)).cwiseAbs().maxCoeff());
      den = std::max(den, want.row(r).cwiseAbs().maxCoeff());
    }
  return num / den;
}

}  // namespace peft::test
