#pragma once
// The reference model of preference tuning without a second copy of the weights: the policy's own
// model with adapters switched off for one forward. Either every adapter host is disabled (the
// reference is the base model), or only the named adapters are (e.g. {"policy"} with an SFT adapter
// kept active and frozen beside it: the reference is the SFT model). DPOObjective
// (train/preference.hpp) and PPOTrainer (train/ppo.hpp) hold one each.
//
//   detail::ReferenceSwitch<float> sw;
//   sw.reset(hosts, {"policy"}, "PPOTrainer", model.name());   // ConfigError for a name no host holds
//   { auto off = sw.off(); model.forward(...); }               // previous flags restored, also on a throw
//
// `off()` allocates nothing; the switch holds host pointers (into the model) and indices, so copying
// its owner copies a switch of the same model.

#include <algorithm>
#include <cstddef>
#include <string>
#include <utility>
#include <vector>

#include "peft/core/error.hpp"
#include "peft/layers/adapted_linear.hpp"

namespace peft {
namespace detail {

template <class T>
class ReferenceSwitch {
 public:
  /// Switches off `names` (empty: every host's adapters) on `hosts`. ConfigError naming `owner`, the
  /// adapter and `model` for a name no host holds; the switch is unchanged then.
  void reset(std::vector<AdaptedLinear<T>*> hosts, const std::vector<std::string>& names, const std::string& owner,
             const std::string& model) {
    std::vector<std::pair<AdaptedLinear<T>*, std::size_t>> next;
    for (std::size_t k = 0; k < names.size(); ++k) {
      bool found = false;
      for (auto* h : hosts)
        if (h->has_adapter(names[k])) {
          next.emplace_back(h, k);
          found = true;
        }
      if (!found)
        throw ConfigError(owner + ": reference_disabled names adapter \"" + names[k] + "\", which no layer of model \"" +
                          model + "\" holds");
    }
    saved_.assign(std::max(hosts.size(), next.size()), 0);
    hosts_ = std::move(hosts);
    names_ = names;
    switched_ = std::move(next);
  }

  const std::vector<AdaptedLinear<T>*>& hosts() const { return hosts_; }

  /// The scope of one reference forward: the adapters are off while it lives.
  class Scope {
   public:
    explicit Scope(ReferenceSwitch& s) : s_(s) {
      if (s_.switched_.empty()) {
        for (std::size_t i = 0; i < s_.hosts_.size(); ++i) s_.saved_[i] = s_.hosts_[i]->adapters_disabled() ? 1 : 0;
        for (auto* h : s_.hosts_) h->disable_adapters(true);
        return;
      }
      for (std::size_t i = 0; i < s_.switched_.size(); ++i)
        s_.saved_[i] = s_.switched_[i].first->adapter_disabled(s_.name(i)) ? 1 : 0;
      for (std::size_t i = 0; i < s_.switched_.size(); ++i) {
        s_.switched_[i].first->disable_adapter(s_.name(i), true);
        on_ = i + 1;
      }
    }
    ~Scope() {
      if (s_.switched_.empty()) {
        for (std::size_t i = 0; i < s_.hosts_.size(); ++i) s_.hosts_[i]->disable_adapters(s_.saved_[i] != 0);
        return;
      }
      for (std::size_t i = 0; i < on_; ++i) s_.switched_[i].first->disable_adapter(s_.name(i), s_.saved_[i] != 0);
    }
    Scope(const Scope&) = delete;
    Scope& operator=(const Scope&) = delete;

   private:
    ReferenceSwitch& s_;
    std::size_t on_ = 0;  ///< switched_ entries switched off so far (a merged one throws)
  };

 private:
  const std::string& name(std::size_t i) const { return names_[switched_[i].second]; }

  std::vector<AdaptedLinear<T>*> hosts_;
  std::vector<std::string> names_;                                  ///< reference_disabled
  std::vector<std::pair<AdaptedLinear<T>*, std::size_t>> switched_;  ///< (host, index into names_)
  std::vector<char> saved_;
};

}  // namespace detail
}  // namespace peft
