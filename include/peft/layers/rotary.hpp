#pragma once
// Rotary position embeddings (Su et al., 2021, "RoFormer"), in Hugging Face's rotate-half layout
// (LlamaRotaryEmbedding + apply_rotary_pos_emb): for a head vector x [d] at position p,
//
//   θ_i = p · f_i  (i < d/2),   c = [cos θ, cos θ],  s = [sin θ, sin θ]            [d]
//   rot(x) = [−x_{d/2..d−1}, x_{0..d/2−1}],   y = x ⊙ c + rot(x) ⊙ s
//   backward: rot is linear with rotᵀ(g) = −rot(g), so dx = dy ⊙ c − rot(dy ⊙ s).
//
// Inverse frequencies f_i = θ_base^(−2i/d) ("default"), or Llama 3's rope_type "llama3"
// (modeling_rope_utils._compute_llama3_parameters): with wavelength λ_i = 2π / f_i,
//   λ_i < L/high_freq_factor: f_i kept;   λ_i > L/low_freq_factor: f_i / factor;
//   between: (1 − σ) f_i / factor + σ f_i,  σ = (L/λ_i − low_freq_factor) / (high − low),
// L = original_max_position_embeddings. HF computes the angles in float32 even for a float64
// model; here they are computed in double and rounded to T once.
#include <cmath>
#include <string>
#include <vector>

#include "peft/core/error.hpp"
#include "peft/core/types.hpp"

namespace peft {

/// Rotary settings (config.json's rope_theta and rope_scaling, or transformers 5's rope_parameters).
struct RopeConfig {
  double theta = 10000.0;
  std::string type = "default";  ///< "default" or "llama3"
  double factor = 1.0;           ///< llama3
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  double original_max_position_embeddings = 8192;
};

/// The inverse frequencies f [head_dim / 2] of a RopeConfig (ConfigError for anything invalid).
inline std::vector<double> rope_inverse_frequencies(const RopeConfig& c, Index head_dim) {
  const double pi = 3.14159265358979323846;
  if (head_dim <= 0 || head_dim % 2 != 0)
    throw ConfigError("rotary embedding: head_dim must be even and > 0, got " + std::to_string(head_dim));
  if (!(c.theta > 0.0)) throw ConfigError("rotary embedding: rope_theta must be > 0");
  std::vector<double> f(static_cast<std::size_t>(head_dim / 2));
  for (std::size_t i = 0; i < f.size(); ++i)
    f[i] = 1.0 / std::pow(c.theta, static_cast<double>(2 * i) / static_cast<double>(head_dim));
  if (c.type == "default") return f;
  if (c.type != "llama3")
    throw ConfigError("rotary embedding: rope_type \"" + c.type + "\" is not supported (default, llama3)");
  if (!(c.factor > 0.0) || !(c.high_freq_factor > c.low_freq_factor) || !(c.low_freq_factor > 0.0) ||
      !(c.original_max_position_embeddings > 0.0))
    throw ConfigError(
        "rotary embedding: llama3 rope scaling needs factor > 0, high_freq_factor > low_freq_factor > 0 "
        "and original_max_position_embeddings > 0");
  const double L = c.original_max_position_embeddings;
  const double low_wl = L / c.low_freq_factor, high_wl = L / c.high_freq_factor;
  for (double& fi : f) {
    const double wl = 2.0 * pi / fi;
    const double scaled = wl > low_wl ? fi / c.factor : fi;
    if (!(wl < high_wl) && !(wl > low_wl)) {
      const double s = (L / wl - c.low_freq_factor) / (c.high_freq_factor - c.low_freq_factor);
      fi = (1.0 - s) * scaled / c.factor + s * scaled;
    } else {
      fi = scaled;
    }
  }
  return f;
}

/// cos / sin tables per position (grown on demand) and the rotation of head blocks.
template <class T>
class RotaryEmbedding {
 public:
  RotaryEmbedding() = default;
  RotaryEmbedding(const RopeConfig& config, Index head_dim)
      : config_(config), head_dim_(head_dim), inv_freq_(rope_inverse_frequencies(config, head_dim)) {}

  Index head_dim() const { return head_dim_; }
  const RopeConfig& config() const { return config_; }
  const std::vector<double>& inverse_frequencies() const { return inv_freq_; }
  Index positions() const { return cos_.rows(); }

  /// Makes the tables cover positions [0, n) (allocates only when n grows).
  void reserve(Index n) {
    if (n <= cos_.rows()) return;
    const Index half = head_dim_ / 2;
    Matrix<T> c(n, half), s(n, half);
    for (Index p = 0; p < n; ++p)
      for (Index i = 0; i < half; ++i) {
        const double a = static_cast<double>(p) * inv_freq_[static_cast<std::size_t>(i)];
        c(p, i) = static_cast<T>(std::cos(a));
        s(p, i) = static_cast<T>(std::sin(a));
      }
    cos_.swap(c);
    sin_.swap(s);
  }

  /// In place: row t of `x` (a [rows, head_dim] block) is a head vector at position first + t.
  /// Rotates by +θ (forward) or, with inverse, applies the transpose (backward: dx from dy).
  template <class Block>
  void rotate(Block&& x, Index first, bool inverse = false) const {
    const Index half = head_dim_ / 2;
    const T sign = inverse ? T(-1) : T(1);
    for (Index t = 0; t < x.rows(); ++t) {
      const auto c = cos_.row(first + t);
      const auto s = sin_.row(first + t);
      for (Index i = 0; i < half; ++i) {
        const T a = x(t, i), b = x(t, i + half), si = sign * s(i);
        x(t, i) = a * c(i) - b * si;         // y₁ = x₁ c − x₂ s
        x(t, i + half) = b * c(i) + a * si;  // y₂ = x₂ c + x₁ s
      }
    }
  }

 private:
  RopeConfig config_;
  Index head_dim_ = 0;
  std::vector<double> inv_freq_;
  Matrix<T> cos_, sin_;  ///< [positions, head_dim / 2]
};

}  // namespace peft
