#pragma once
// A batch of variable-length sequences, stored the cheapest way that keeps every per-token layer a
// plain matrix op:
//
//   data    one contiguous row-major block [batch·seq, dim]; token t of sequence b is row b·seq + t
//   layout  batch, seq (the common padded length) and lengths[b] ∈ [1, seq], the valid tokens of b
//
// Rows t ≥ lengths[b] are padding (right padding, the default). With `left_padded` (Hugging Face's
// padding_side="left", what batched generation uses) the valid tokens are the LAST lengths[b] rows
// instead: first(b) = seq − lengths[b]; only the causal LM (models/llama.hpp, loss/causal_lm.hpp)
// reads such layouts, every other position-mixing layer refuses them (require_right_padded). Row-wise layers (Linear,
// LayerNorm, FeedForward) just process them; attention masks them as keys (key-padding mask), so padding never changes
// a valid row. Padding content must be finite: its gradient is 0, but a weight gradient Σ_rows dYᵀ X still multiplies
// it, and 0 · NaN is NaN (as in PyTorch). pack_sequences fills it with zeros. Every layer that mixes positions
// (attention, pooling) takes the SequenceLayout next to the [batch·seq, dim] matrix, so hidden states stay ordinary
// Matrix<T> and flow through Eigen::Ref without copies. SequenceBatch<T> bundles the two for callers who want one
// object.
//
// Prepending n rows to every sequence (soft prompts, Lester et al. 2021) is prepend_rows(); its
// backward is split_prepended_rows().
#include <string>
#include <vector>

#include "peft/core/error.hpp"
#include "peft/core/separate.hpp"
#include "peft/core/types.hpp"

namespace peft {

struct SequenceLayout {
  Index batch = 0;
  Index seq = 0;
  std::vector<Index> lengths;  ///< size batch, each in [1, seq]
  bool left_padded = false;    ///< valid tokens of b are rows first(b) .. seq − 1 (padding first)

  SequenceLayout() = default;
  /// All sequences full (lengths = seq).
  SequenceLayout(Index batch_size, Index seq_len)
      : batch(batch_size), seq(seq_len), lengths(static_cast<std::size_t>(batch_size > 0 ? batch_size : 0), seq_len) {}
  /// Padded to seq_len with explicit lengths (validated by validate()).
  SequenceLayout(Index batch_size, Index seq_len, std::vector<Index> lens)
      : batch(batch_size), seq(seq_len), lengths(std::move(lens)) {}
  /// Padded to the longest length.
  static SequenceLayout from_lengths(std::vector<Index> lens) {
    Index longest = 0;
    for (Index l : lens) longest = l > longest ? l : longest;
    const Index batch_size = static_cast<Index>(lens.size());  // before the move below
    return SequenceLayout(batch_size, longest, std::move(lens));
  }

  /// Left-padded, to the longest length (HF's padding_side="left").
  static SequenceLayout left_from_lengths(std::vector<Index> lens) {
    SequenceLayout l = from_lengths(std::move(lens));
    l.left_padded = true;
    return l;
  }

  /// batch·seq: the row count of the matching data block.
  Index rows() const { return batch * seq; }
  Index length(Index b) const { return lengths[static_cast<std::size_t>(b)]; }
  /// Row of token t of sequence b.
  Index row(Index b, Index t) const { return b * seq + t; }
  /// First valid row of sequence b within its seq rows (0 unless left-padded).
  Index first(Index b) const { return left_padded ? seq - length(b) : 0; }
  bool valid(Index b, Index t) const { return t >= first(b) && t < first(b) + length(b); }
  bool padded() const {
    for (Index l : lengths)
      if (l != seq) return true;
    return false;
  }
  /// Σ lengths: the number of real tokens.
  Index total_tokens() const {
    Index n = 0;
    for (Index l : lengths) n += l;
    return n;
  }

  /// True when validate() would pass (no allocation: for hot paths).
  bool ok(Index data_rows = -1) const {
    if (batch <= 0 || seq <= 0 || static_cast<Index>(lengths.size()) != batch) return false;
    for (Index l : lengths)
      if (l < 1 || l > seq) return false;
    return data_rows < 0 || data_rows == rows();
  }

  /// As validate(who, data_rows) with who = `Kind "name"`, built only on failure (no allocation).
  void validate(const char* kind, const std::string& name, Index data_rows = -1) const {
    if (!ok(data_rows)) validate(describe(kind, name), data_rows);
  }

  /// As validate(who, data_rows) for a literal name; the string is built only on failure.
  void validate(const char* who, Index data_rows = -1) const {
    if (!ok(data_rows)) validate(std::string(who), data_rows);
  }

  /// Throws ShapeError naming `who` unless batch, seq ≥ 1, lengths has batch entries in [1, seq]
  /// and (when data_rows ≥ 0) the data block has batch·seq rows.
  PEFT_SEPARATE_INLINE void validate(const std::string& who, Index data_rows = -1) const;

  /// The layout after prepending n rows to every sequence: seq + n, lengths + n (left-padded: the n
  /// rows go right before the valid tokens, after the padding).
  SequenceLayout prepended(Index n) const {
    SequenceLayout out(batch, seq + n, lengths);
    out.left_padded = left_padded;
    for (Index& l : out.lengths) l += n;
    return out;
  }

  /// *this = from.prepended(n), reusing this layout's storage (no allocation once it has held as
  /// many sequences): for hot paths. `from` may be *this.
  void assign_prepended(const SequenceLayout& from, Index n) {
    const Index s = from.seq;
    if (&from != this) {
      batch = from.batch;
      left_padded = from.left_padded;
      lengths.assign(from.lengths.begin(), from.lengths.end());
    }
    seq = s + n;
    for (Index& l : lengths) l += n;
  }

  /// ShapeError naming `Kind "name"` for a left-padded layout (layers that only read right padding).
  void require_right_padded(const char* kind, const std::string& name) const {
    if (left_padded && padded())
      throw ShapeError(describe(kind, name) +
                       ": left-padded sequence batches are read only by the causal LM (models/llama.hpp); pad on "
                       "the right");
  }
};

#if PEFT_SEPARATE_BODIES  // compiled once in the project's test build (peft/core/separate.hpp)
PEFT_SEPARATE_INLINE void SequenceLayout::validate(const std::string& who, Index data_rows) const {
  if (batch <= 0 || seq <= 0)
    throw ShapeError(who + ": sequence batch must have batch >= 1 and seq >= 1, got batch=" + std::to_string(batch) +
                     ", seq=" + std::to_string(seq));
  if (static_cast<Index>(lengths.size()) != batch)
    throw ShapeError(who + ": sequence batch has " + std::to_string(lengths.size()) +
                     " lengths, expected batch=" + std::to_string(batch));
  for (Index b = 0; b < batch; ++b)
    if (length(b) < 1 || length(b) > seq)
      throw ShapeError(who + ": sequence " + std::to_string(b) + " has length " + std::to_string(length(b)) +
                       ", expected 1 <= length <= seq=" + std::to_string(seq));
  if (data_rows >= 0 && data_rows != rows())
    throw ShapeError(who + ": sequence data has " + std::to_string(data_rows) + " rows, expected batch*seq = " +
                     std::to_string(batch) + "*" + std::to_string(seq) + " = " + std::to_string(rows()));
}
#endif

/// Data block plus layout, for callers who want a single object.
template <class T>
struct SequenceBatch {
  Matrix<T> data;  ///< [batch·seq, dim]
  SequenceLayout layout;

  Index dim() const { return data.cols(); }
  /// Rows of sequence b (all seq of them, padding included).
  typename Matrix<T>::RowsBlockXpr sequence(Index b) { return data.middleRows(b * layout.seq, layout.seq); }
  typename Matrix<T>::ConstRowsBlockXpr sequence(Index b) const { return data.middleRows(b * layout.seq, layout.seq); }
  void validate(const std::string& who) const { layout.validate(who, data.rows()); }
};

/// Packs sequences of shape [len_b, dim] into one padded batch; padding rows hold `pad_value`.
template <class T>
SequenceBatch<T> pack_sequences(const std::vector<Matrix<T>>& sequences, T pad_value = T(0)) {
  if (sequences.empty()) throw ShapeError("pack_sequences: no sequences given");
  const Index dim = sequences.front().cols();
  std::vector<Index> lens;
  for (std::size_t b = 0; b < sequences.size(); ++b) {
    if (sequences[b].cols() != dim)
      throw ShapeError("pack_sequences: sequence " + std::to_string(b) + " has " + std::to_string(sequences[b].cols()) +
                       " features, expected " + std::to_string(dim));
    lens.push_back(sequences[b].rows());
  }
  SequenceBatch<T> out;
  out.layout = SequenceLayout::from_lengths(std::move(lens));
  out.layout.validate("pack_sequences");
  out.data.setConstant(out.layout.rows(), dim, pad_value);
  for (Index b = 0; b < out.layout.batch; ++b)
    out.data.middleRows(b * out.layout.seq, out.layout.length(b)) = sequences[static_cast<std::size_t>(b)];
  return out;
}

/// Packs token-id sequences into one padded id vector [batch·seq] (padding = pad_id) + its layout;
/// `left`: padding first (HF's padding_side="left", for batched generation).
inline std::vector<Index> pack_token_ids(const std::vector<std::vector<Index>>& sequences, SequenceLayout& layout,
                                         Index pad_id = 0, bool left = false) {
  if (sequences.empty()) throw ShapeError("pack_token_ids: no sequences given");
  std::vector<Index> lens;
  for (const auto& s : sequences) lens.push_back(static_cast<Index>(s.size()));
  layout = SequenceLayout::from_lengths(std::move(lens));
  layout.left_padded = left;
  layout.validate("pack_token_ids");
  std::vector<Index> ids(static_cast<std::size_t>(layout.rows()), pad_id);
  for (Index b = 0; b < layout.batch; ++b)
    for (Index t = 0; t < layout.length(b); ++t)
      ids[static_cast<std::size_t>(layout.row(b, layout.first(b) + t))] =
          sequences[static_cast<std::size_t>(b)][static_cast<std::size_t>(t)];
  return ids;
}

/// out = per sequence [prefix; x_b]: the n rows of `prefix` [n, dim] (shared by all sequences) or
/// [batch·n, dim] (sequence b uses rows b·n .. b·n+n−1) go before each sequence. out_layout =
/// layout.prepended(n). `out` is resized only when its shape changes.
template <class T>
void prepend_rows(const ConstMatrixRef<T>& x, const SequenceLayout& layout, const ConstMatrixRef<T>& prefix,
                  Matrix<T>& out, SequenceLayout& out_layout, Index n) {
  layout.validate("prepend_rows", x.rows());
  layout.require_right_padded("prepend_rows", "");
  if (n <= 0) throw ShapeError("prepend_rows: number of prepended rows must be >= 1, got " + std::to_string(n));
  if (prefix.cols() != x.cols())
    throw ShapeError("prepend_rows: prefix has " + std::to_string(prefix.cols()) + " features, expected " +
                     std::to_string(x.cols()));
  const bool shared = prefix.rows() == n;
  if (!shared && prefix.rows() != layout.batch * n)
    throw ShapeError("prepend_rows: prefix has " + std::to_string(prefix.rows()) + " rows, expected n=" +
                     std::to_string(n) + " (shared) or batch*n=" + std::to_string(layout.batch * n));
  out_layout.assign_prepended(layout, n);
  out.resize(out_layout.rows(), x.cols());
  const Index s2 = out_layout.seq;
  for (Index b = 0; b < layout.batch; ++b) {
    if (shared)
      out.middleRows(b * s2, n) = prefix;
    else
      out.middleRows(b * s2, n) = prefix.middleRows(b * n, n);
    out.middleRows(b * s2 + n, layout.seq) = x.middleRows(b * layout.seq, layout.seq);
  }
}

/// Backward of prepend_rows: dx gets the original rows of dy; dprefix (if not null) accumulates
/// (+=) the prepended rows, summed over sequences when it has n rows (shared prefix) or per sequence
/// when it has batch·n rows. `out_layout` is the layout prepend_rows produced.
template <class T>
void split_prepended_rows(const ConstMatrixRef<T>& dy, const SequenceLayout& out_layout, Index n, Matrix<T>* dx,
                          Matrix<T>* dprefix) {
  out_layout.validate("split_prepended_rows", dy.rows());
  out_layout.require_right_padded("split_prepended_rows", "");
  if (n <= 0 || n >= out_layout.seq)
    throw ShapeError("split_prepended_rows: n=" + std::to_string(n) +
                     " must be in [1, seq) with seq=" + std::to_string(out_layout.seq));
  const Index s = out_layout.seq - n;
  if (dprefix != nullptr) {
    const bool shared = dprefix->rows() == n;
    if ((!shared && dprefix->rows() != out_layout.batch * n) || dprefix->cols() != dy.cols())
      throw ShapeError("split_prepended_rows: prefix gradient has shape " +
                       shape_str(dprefix->rows(), dprefix->cols()) + ", expected " + shape_str(n, dy.cols()) + " or " +
                       shape_str(out_layout.batch * n, dy.cols()));
    for (Index b = 0; b < out_layout.batch; ++b) {
      if (shared)
        *dprefix += dy.middleRows(b * out_layout.seq, n);
      else
        dprefix->middleRows(b * n, n) += dy.middleRows(b * out_layout.seq, n);
    }
  }
  if (dx != nullptr) {
    dx->resize(out_layout.batch * s, dy.cols());
    for (Index b = 0; b < out_layout.batch; ++b) dx->middleRows(b * s, s) = dy.middleRows(b * out_layout.seq + n, s);
  }
}

}  // namespace peft
