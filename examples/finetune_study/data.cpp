// Data for the study: Fashion-MNIST through peft's IDX reader, or a synthetic stand-in.
#include "data.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <filesystem>

#include <peft/io/idx.hpp>
#include <peft/train/batches.hpp>

namespace study {
namespace {

ImageSet from_idx(peft::IdxDataset&& ds) {
  ImageSet s;
  s.count = ds.count;
  s.height = ds.rows;
  s.width = ds.cols;
  s.pixels = std::move(ds.pixels);
  s.labels = std::move(ds.labels);
  return s;
}

/// Ten classes of 28×28 images: each class is a fixed random mixture of Gaussian blobs and an
/// oriented stripe pattern; samples are shifted by up to ±2 pixels, rescaled in contrast and
/// noised. Classes share blob positions pairwise (c and c+5 overlap), so features learned on the
/// source classes are useful, but not sufficient, for the target classes, as in Fashion-MNIST.
ImageSet synthetic_split(Index count, std::uint64_t seed) {
  constexpr Index kSide = 28;
  peft::Rng proto_rng(0xfa5410);  // prototypes: identical for every split and seed
  std::vector<std::vector<float>> protos(kNumClasses, std::vector<float>(kSide * kSide, 0.f));
  std::vector<std::array<double, 3>> shared_blobs;
  for (int k = 0; k < 3 * kTaskClasses; ++k)
    shared_blobs.push_back({proto_rng.uniform(6, 22), proto_rng.uniform(6, 22), proto_rng.uniform(2.0, 4.5)});
  for (int c = 0; c < kNumClasses; ++c) {
    auto& p = protos[static_cast<std::size_t>(c)];
    const double angle = proto_rng.uniform(0.0, 3.14159);
    const double freq = proto_rng.uniform(0.25, 0.7);
    const double stripe = proto_rng.uniform(0.2, 0.5);
    for (Index y = 0; y < kSide; ++y)
      for (Index x = 0; x < kSide; ++x) {
        double v = stripe * (0.5 + 0.5 * std::sin(freq * (std::cos(angle) * x + std::sin(angle) * y)));
        for (int k = 0; k < 3; ++k) {
          const auto& b = shared_blobs[static_cast<std::size_t>((c % kTaskClasses) * 3 + k)];
          const double w = (k == c / kTaskClasses) ? 1.0 : 0.55;  // the class pair differs in blob weights
          v += w * std::exp(-((x - b[0]) * (x - b[0]) + (y - b[1]) * (y - b[1])) / (2 * b[2] * b[2]));
        }
        p[static_cast<std::size_t>(y * kSide + x)] = static_cast<float>(v);
      }
  }
  ImageSet s;
  s.count = count;
  s.height = s.width = kSide;
  s.pixels.resize(static_cast<std::size_t>(count * kSide * kSide));
  s.labels.resize(static_cast<std::size_t>(count));
  peft::Rng rng(seed);
  for (Index i = 0; i < count; ++i) {
    const int c = static_cast<int>(i % kNumClasses);
    s.labels[static_cast<std::size_t>(i)] = static_cast<std::uint8_t>(c);
    const int dx = static_cast<int>(rng.uniform_int(5)) - 2, dy = static_cast<int>(rng.uniform_int(5)) - 2;
    const double contrast = rng.uniform(0.6, 1.2);
    const auto& p = protos[static_cast<std::size_t>(c)];
    for (Index y = 0; y < kSide; ++y)
      for (Index x = 0; x < kSide; ++x) {
        const Index sx = std::clamp<Index>(x - dx, 0, kSide - 1), sy = std::clamp<Index>(y - dy, 0, kSide - 1);
        const double v = 150.0 * contrast * p[static_cast<std::size_t>(sy * kSide + sx)] + rng.normal(0.0, 40.0);
        s.pixels[static_cast<std::size_t>((i * kSide + y) * kSide + x)] =
            static_cast<std::uint8_t>(std::clamp(v, 0.0, 255.0));
      }
  }
  return s;
}

/// Renumbers every label through `map` (original -> renumbered).
void renumber(ImageSet& s, const std::vector<int>& map) {
  for (auto& l : s.labels) l = static_cast<std::uint8_t>(map[l]);
}

std::vector<Index> indices_of(const ImageSet& s, int first_class, int last_class) {
  std::vector<Index> out;
  for (Index i = 0; i < s.count; ++i) {
    const int l = s.labels[static_cast<std::size_t>(i)];
    if (l >= first_class && l <= last_class) out.push_back(i);
  }
  return out;
}

}  // namespace

const char* class_name(int original_label) {
  static const char* names[kNumClasses] = {"T-shirt", "trouser", "pullover", "dress", "coat",
                                           "sandal",  "shirt",   "sneaker",  "bag",   "ankle boot"};
  return original_label >= 0 && original_label < kNumClasses ? names[original_label] : "?";
}

TransferData load_transfer_data(const DataOptions& o, std::string* why_synthetic) {
  namespace fs = std::filesystem;
  TransferData d;
  const std::string files[4] = {"train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                                "t10k-labels-idx1-ubyte.gz"};
  std::string missing;
  for (const auto& f : files)
    if (!fs::exists(fs::path(o.data_dir) / f)) {
      missing = (fs::path(o.data_dir) / f).string();
      break;
    }
  if (missing.empty()) {
    const auto path = [&](int i) { return (fs::path(o.data_dir) / files[i]).string(); };
    d.train = from_idx(peft::read_idx_dataset(path(0), path(1), kNumClasses - 1));
    d.test = from_idx(peft::read_idx_dataset(path(2), path(3), kNumClasses - 1));
    d.description = "Fashion-MNIST (" + o.data_dir + ")";
  } else {
    if (why_synthetic != nullptr) *why_synthetic = missing + " not found";
    d.synthetic = true;
    d.train = synthetic_split(12000, 11);
    d.test = synthetic_split(4000, 12);
    d.description = "synthetic 28x28 10-class task (built in)";
  }

  // The split: source classes -> 0..4 in the order given, the others -> 5..9.
  if (o.source_classes.size() != static_cast<std::size_t>(kTaskClasses))
    throw peft::ConfigError("--source-classes: expected " + std::to_string(kTaskClasses) + " classes, got " +
                            std::to_string(o.source_classes.size()));
  std::vector<int> map(kNumClasses, -1);
  d.original_class.assign(kNumClasses, -1);
  for (std::size_t i = 0; i < o.source_classes.size(); ++i) {
    const int c = o.source_classes[i];
    if (c < 0 || c >= kNumClasses)
      throw peft::ConfigError("--source-classes: class " + std::to_string(c) + " is not in [0, 9]");
    if (map[static_cast<std::size_t>(c)] != -1)
      throw peft::ConfigError("--source-classes: class " + std::to_string(c) + " is listed twice");
    map[static_cast<std::size_t>(c)] = static_cast<int>(i);
  }
  for (int c = 0, next = kTaskClasses; c < kNumClasses; ++c)
    if (map[static_cast<std::size_t>(c)] == -1) map[static_cast<std::size_t>(c)] = next++;
  for (int c = 0; c < kNumClasses; ++c) d.original_class[static_cast<std::size_t>(map[static_cast<std::size_t>(c)])] = c;
  renumber(d.train, map);
  renumber(d.test, map);

  // Class-balanced, seeded splits. The run seed picks the budget; everything else is fixed.
  peft::Rng rng(o.seed * 0x9e3779b97f4a7c15ULL + 17);
  d.source_train.images = d.source_val.images = &d.train;
  std::vector<Index> source = indices_of(d.train, 0, kTaskClasses - 1);
  peft::shuffle(source, rng);
  const Index nval = std::min<Index>(o.source_val, static_cast<Index>(source.size()) / 5);
  d.source_val.index.assign(source.begin(), source.begin() + nval);
  d.source_train.index.assign(source.begin() + nval,
                              source.begin() + std::min<Index>(static_cast<Index>(source.size()), nval + o.max_source));

  std::vector<std::vector<Index>> per_class(kNumClasses);
  for (Index i = 0; i < d.train.count; ++i) {
    const int l = d.train.labels[static_cast<std::size_t>(i)];
    if (l >= kTaskClasses) per_class[static_cast<std::size_t>(l)].push_back(i);
  }
  d.target_budget.images = d.target_val.images = &d.train;
  for (int c = kTaskClasses; c < kNumClasses; ++c) {
    auto& v = per_class[static_cast<std::size_t>(c)];
    peft::shuffle(v, rng);
    const Index take = (o.budget + (c - kTaskClasses)) / kTaskClasses;  // spreads a remainder over classes
    const Index target_val = o.target_val < 0 ? o.budget : o.target_val;
    const Index val = (target_val + (c - kTaskClasses)) / kTaskClasses;
    if (take + val > static_cast<Index>(v.size()))
      throw peft::ConfigError("--budget " + std::to_string(o.budget) + " asks for " + std::to_string(take) +
                              " images of class " + std::to_string(c) + " but only " +
                              std::to_string(static_cast<Index>(v.size()) - val) + " are available");
    d.target_budget.index.insert(d.target_budget.index.end(), v.begin(), v.begin() + take);
    d.target_val.index.insert(d.target_val.index.end(), v.begin() + take, v.begin() + take + val);
  }
  peft::shuffle(d.target_budget.index, rng);

  d.source_test.images = d.target_test.images = &d.test;
  d.source_test.index = indices_of(d.test, 0, kTaskClasses - 1);
  d.target_test.index = indices_of(d.test, kTaskClasses, kNumClasses - 1);
  if (d.source_test.size() > o.max_test_per_task)
    d.source_test.index.resize(static_cast<std::size_t>(o.max_test_per_task));
  if (d.target_test.size() > o.max_test_per_task)
    d.target_test.index.resize(static_cast<std::size_t>(o.max_test_per_task));

  // Pixel mean and standard deviation over the pretraining images (the only data a practitioner
  // would have had when the "pretrained" model was built).
  double sum = 0.0, sq = 0.0;
  const Index ppi = d.train.pixels_per_image();
  for (Index i : d.source_train.index) {
    const std::uint8_t* p = d.train.pixels.data() + static_cast<std::size_t>(i * ppi);
    for (Index j = 0; j < ppi; ++j) {
      const double v = p[j] / 255.0;
      sum += v;
      sq += v * v;
    }
  }
  const double n = static_cast<double>(d.source_train.size() * ppi);
  d.mean = static_cast<float>(sum / n);
  d.stddev = static_cast<float>(std::sqrt(std::max(sq / n - (sum / n) * (sum / n), 1e-8)));
  return d;
}

void gather(const TransferData& data, const Subset& s, const Index* rows, Index n, Mat& x,
            std::vector<std::int64_t>& labels) {
  const ImageSet& img = *s.images;
  const Index ppi = img.pixels_per_image();
  x.resize(n, ppi);
  labels.resize(static_cast<std::size_t>(n));
  const float scale = 1.0f / (255.0f * data.stddev), shift = data.mean / data.stddev;
  for (Index r = 0; r < n; ++r) {
    const Index i = s.index[static_cast<std::size_t>(rows[r])];
    const std::uint8_t* p = img.pixels.data() + static_cast<std::size_t>(i * ppi);
    for (Index j = 0; j < ppi; ++j) x(r, j) = static_cast<float>(p[j]) * scale - shift;
    labels[static_cast<std::size_t>(r)] = img.labels[static_cast<std::size_t>(i)];
  }
}

}  // namespace study
