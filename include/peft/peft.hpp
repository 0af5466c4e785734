#pragma once
// Umbrella header: everything in peft-cpp except what needs nlohmann-json: file I/O (peft/io/*.hpp)
// and apply_peft (peft/models/peft_config.hpp, which applies LoRA and (IA)^3 through the io method table)
// and PeftModel (peft/models/peft_model.hpp, the model-level handle on the same table).
#include "peft/version.hpp"

#include "peft/core/check.hpp"
#include "peft/core/error.hpp"
#include "peft/core/init.hpp"
#include "peft/core/module.hpp"
#include "peft/core/parameter.hpp"
#include "peft/core/parameters.hpp"
#include "peft/core/rng.hpp"
#include "peft/core/sequence.hpp"
#include "peft/core/targeting.hpp"
#include "peft/core/types.hpp"
#include "peft/core/warnings.hpp"

// The kinds of adapter a linear layer hosts (the method table, io/methods.hpp, lists them with
// their PEFT file formats): LoRA and DoRA, (IA)³, VeRA, LoHa, LoKr.
#include "peft/adapters/ia3.hpp"
#include "peft/adapters/loha.hpp"
#include "peft/adapters/lokr.hpp"
#include "peft/adapters/lora.hpp"
#include "peft/adapters/method.hpp"
#include "peft/adapters/vera.hpp"

#include "peft/layers/activations.hpp"
#include "peft/layers/adapted_linear.hpp"
#include "peft/layers/adapter.hpp"
#include "peft/layers/attention.hpp"
#include "peft/layers/dropout.hpp"
#include "peft/layers/embedding.hpp"
#include "peft/layers/feed_forward.hpp"
#include "peft/layers/ia3.hpp"
#include "peft/layers/layer_norm.hpp"
#include "peft/layers/linear.hpp"
#include "peft/layers/lora_linear.hpp"
#include "peft/layers/lora_mixed_batch.hpp"
#include "peft/layers/modules_to_save.hpp"
#include "peft/layers/prefix_attention.hpp"
#include "peft/layers/rms_norm.hpp"
#include "peft/layers/rotary.hpp"
#include "peft/layers/soft_prompt.hpp"

#include "peft/loss/accuracy.hpp"
#include "peft/loss/bradley_terry.hpp"
#include "peft/loss/causal_lm.hpp"
#include "peft/loss/cross_entropy.hpp"
#include "peft/loss/mse.hpp"

#include "peft/merge/analysis.hpp"
#include "peft/merge/combine.hpp"
#include "peft/merge/extract.hpp"
#include "peft/merge/factors.hpp"
#include "peft/merge/lora_factors.hpp"
#include "peft/merge/low_rank_svd.hpp"

#include "peft/models/generation.hpp"
#include "peft/models/llama.hpp"
#include "peft/models/transformer.hpp"

#include "peft/quant/blockwise8.hpp"
#include "peft/quant/loftq.hpp"
#include "peft/quant/nf4.hpp"
#include "peft/quant/nf4_lora_linear.hpp"

#include "peft/meta/episodes.hpp"
#include "peft/meta/maml.hpp"
#include "peft/meta/protonet.hpp"

#include "peft/optim/adam.hpp"
#include "peft/optim/clip.hpp"
#include "peft/optim/optimizer.hpp"
#include "peft/optim/param_groups.hpp"
#include "peft/optim/regularizers.hpp"
#include "peft/optim/schedule.hpp"
#include "peft/optim/sgd.hpp"

#include "peft/train/batches.hpp"
#include "peft/train/early_stopping.hpp"
#include "peft/train/gradient_check.hpp"
#include "peft/train/memory.hpp"
#include "peft/train/progress.hpp"
