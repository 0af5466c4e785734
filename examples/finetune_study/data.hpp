#pragma once
// The transfer task: five source classes and the other five as the target, of Fashion-MNIST (or
// of the built-in synthetic stand-in when the IDX files are missing). The default split
// interleaves the kinds of garment (source: T-shirt, trouser, pullover, sandal, bag; target:
// dress, coat, shirt, sneaker, ankle boot), so that both tasks hold tops, footwear and other
// items and transfer is a real question; --source-classes 0,1,2,3,4 gives the split where the
// source holds no footwear or bags.
//
// Labels are renumbered when the data are loaded: the source classes become 0-4 (in the order
// given), the target classes 5-9 (in increasing original order), so the rest of the program
// works with "source = 0-4, target = 5-9" whatever the split.
//
// Images stay as bytes (47 MB for Fashion-MNIST's 70 000 images) and are turned into normalized
// float rows one mini-batch at a time, so the peak memory the study reports is the model's and
// not a float copy of the data set.
#include <cstdint>
#include <string>
#include <vector>

#include <peft/core/rng.hpp>
#include <peft/core/types.hpp>

namespace study {

using peft::Index;
using Mat = peft::Matrix<float>;

constexpr int kNumClasses = 10;
constexpr int kTaskClasses = 5;  ///< source = 0..4, target = 5..9

/// Images of one split as bytes, with their labels.
struct ImageSet {
  Index count = 0;
  Index height = 0;
  Index width = 0;
  std::vector<std::uint8_t> pixels;  ///< count · height · width
  std::vector<std::uint8_t> labels;  ///< count, in [0, 10)
  Index pixels_per_image() const { return height * width; }
};

/// A subset of an ImageSet: row indices into it.
struct Subset {
  const ImageSet* images = nullptr;
  std::vector<Index> index;
  Index size() const { return static_cast<Index>(index.size()); }
};

/// Fashion-MNIST's class names, by original label.
const char* class_name(int original_label);

struct TransferData {
  std::string description;  ///< e.g. "Fashion-MNIST (/usr/share/datasets/fashion-mnist)"
  bool synthetic = false;
  std::vector<int> original_class;  ///< renumbered label -> original label (10 entries)
  ImageSet train, test;
  float mean = 0.f, stddev = 1.f;  ///< pixel normalization, estimated on the source training images

  Subset source_train;   ///< pretraining data: training images of classes 0-4 (capped)
  Subset source_val;     ///< held-out training images of classes 0-4 for the pretraining curve
  Subset target_budget;  ///< the small labelled budget of classes 5-9 (class-balanced)
  Subset target_val;     ///< held-out training images of classes 5-9, outside the budget, as many as
                         ///< the budget: learning-rate selection and learning curves
  Subset source_test;    ///< official test split, classes 0-4
  Subset target_test;    ///< official test split, classes 5-9
};

struct DataOptions {
  std::string data_dir = "/usr/share/datasets/fashion-mnist";
  std::vector<int> source_classes = {0, 1, 2, 5, 8};  ///< original labels of the five source classes
  Index budget = 100;        ///< labelled target images
  Index target_val = -1;     ///< held-out target images for validation (-1: as many as the budget)
  Index max_source = 20000;  ///< cap on pretraining images
  Index source_val = 500;    ///< held-out source images for the pretraining curve
  Index max_test_per_task = 5000;
  std::uint64_t seed = 1;
};

/// Loads Fashion-MNIST from `data_dir`, or builds the synthetic task when its files are missing.
/// `why_synthetic` receives the reason (the missing file) in that case. Malformed files are errors.
TransferData load_transfer_data(const DataOptions& options, std::string* why_synthetic);

/// The rows of `s` selected by `rows` (positions in s.index) as normalized floats [n, pixels].
void gather(const TransferData& data, const Subset& s, const Index* rows, Index n, Mat& x,
            std::vector<std::int64_t>& labels);

}  // namespace study
