// Checkpoints of continual and few-shot training state: a replay buffer (State::visit fields) and an
// episode sampler round-trip exactly, and a replay run resumed from a checkpoint ends bit for bit
// where the uninterrupted run ends.
#include <peft/io/checkpoint.hpp>
#include <peft/layers/linear.hpp>
#include <peft/loss/mse.hpp>
#include <peft/meta/episodes.hpp>
#include <peft/optim/adam.hpp>
#include <peft/train/batches.hpp>
#include <peft/train/continual.hpp>

#include <string>
#include <vector>

#include "io_test_utils.hpp"
#include "support/test_utils.hpp"

using namespace peft;
using namespace peft::io;
using peft::test::io::TempDir;

namespace {

bool same_replay_state(const ReplayBuffer::State& a, const ReplayBuffer::State& b) {
  if (a.items.size() != b.items.size() || a.seen != b.seen || a.seen_per_class != b.seen_per_class || a.rng != b.rng)
    return false;
  for (std::size_t i = 0; i < a.items.size(); ++i)
    if (a.items[i].id != b.items[i].id || a.items[i].label != b.items[i].label || a.items[i].task != b.items[i].task)
      return false;
  return true;
}

/// A two-task regression run with replay: task t's rows are 20 inputs of its own; each step trains
/// a 4 → 2 linear on a batch of 5 task rows plus up to 5 replayed rows (Adam), and offers the task
/// rows to a class-balanced buffer (class = row % 3). With `save_at` >= 0 the run stops after that
/// many steps and writes a checkpoint; with `resume` it starts from one.
struct ReplayRun {
  Matrix<double> x, y;
  Rng init;
  Linear<double> net;
  Adam<double> opt;
  ReplayBuffer buffer;
  int step = 0;

  explicit ReplayRun(std::uint64_t init_seed)
      : init(init_seed),
        net(4, 2, init),
        opt(trainable_parameters(net), AdamOptions{0.05}),
        buffer(6, true, init_seed + 1) {
    Rng data(77);
    x = test::random_matrix<double>(40, 4, data);
    y = test::random_matrix<double>(40, 2, data);
  }

  static constexpr int kStepsPerTask = 8;

  void run(int until, const std::string& save_path, const std::string& resume_path) {
    std::unique_ptr<BatchSampler> sampler;
    int sampler_task = -1;
    if (!resume_path.empty()) {
      const Checkpoint<double> ck = Checkpoint<double>::load(resume_path);
      restore_parameters(net, ck);
      load_optimizer_state(opt, ck);
      load_object_state(buffer, ck, "replay");
      step = static_cast<int>(ck.get_int("step"));
      sampler_task = step / kStepsPerTask;
      sampler = std::make_unique<BatchSampler>(20, 5, 999);  // its state comes from the checkpoint
      load_sampler_state(*sampler, ck);
    }
    std::vector<Index> batch, rows;
    std::vector<ReplayItem> replayed;
    Matrix<double> xb, yb, out, dout;
    typename Linear<double>::Cache cache;
    for (; step < until; ++step) {
      const int task = step / kStepsPerTask;
      if (task != sampler_task) {
        sampler = std::make_unique<BatchSampler>(20, 5, 100 + static_cast<std::uint64_t>(task));
        sampler_task = task;
      }
      if (!sampler->next(batch)) {
        sampler->start_epoch();
        sampler->next(batch);
      }
      rows.clear();
      for (Index b : batch) rows.push_back(20 * task + b);
      if (task > 0) {
        buffer.sample(5, replayed);
        for (const ReplayItem& it : replayed) rows.push_back(static_cast<Index>(it.id));
      }
      xb.resize(static_cast<Index>(rows.size()), 4);
      yb.resize(static_cast<Index>(rows.size()), 2);
      for (std::size_t r = 0; r < rows.size(); ++r) {
        xb.row(static_cast<Index>(r)) = x.row(rows[r]);
        yb.row(static_cast<Index>(r)) = y.row(rows[r]);
      }
      opt.zero_grad();
      net.forward(xb, out, cache);
      mse<double>(out, yb, &dout);
      net.backward(cache, dout, nullptr);
      opt.step();
      for (Index b : batch) buffer.add({20 * task + b, (20 * task + b) % 3, task});
    }
    if (!save_path.empty()) {
      Checkpoint<double> ck;
      save_parameters(net, ck);
      save_optimizer_state(opt, ck);
      save_sampler_state(*sampler, ck);
      save_object_state(buffer, ck, "replay");
      ck.put_int("step", step);
      ck.save(save_path);
    }
  }
};

}  // namespace

TEST_CASE("checkpoint: a replay buffer's state round-trips and it continues identically", "[io][checkpoint]") {
  TempDir dir;
  for (bool balanced : {false, true}) {
    ReplayBuffer a(7, balanced, 5);
    for (std::int64_t i = 0; i < 40; ++i) a.add({i, i % 4 == 3 ? 3 : i % 2, i / 10});
    Checkpoint<float> ck;
    save_object_state(a, ck, "replay");
    CHECK(ck.has_ints("replay.items"));
    CHECK(ck.has_int("replay.seen"));
    CHECK(ck.has_rng("replay.rng"));
    ck.save(dir.file("r.safetensors"));
    const Checkpoint<float> back = Checkpoint<float>::load(dir.file("r.safetensors"));
    ReplayBuffer b(7, balanced, 123);  // another seed: the generator comes from the checkpoint
    load_object_state(b, back, "replay");
    CHECK(same_replay_state(a.state(), b.state()));
    std::vector<ReplayItem> sa, sb;
    for (std::int64_t i = 40; i < 60; ++i) {
      a.add({i, i % 5, 4});
      b.add({i, i % 5, 4});
      a.sample(3, sa);
      b.sample(3, sb);
      REQUIRE(sa.size() == sb.size());
      for (std::size_t k = 0; k < sa.size(); ++k) CHECK(sa[k].id == sb[k].id);
    }
    CHECK(same_replay_state(a.state(), b.state()));
  }
}

TEST_CASE("checkpoint: a replay run resumed from a checkpoint equals the uninterrupted run", "[io][checkpoint]") {
  TempDir dir;
  ReplayRun whole(11);
  whole.run(2 * ReplayRun::kStepsPerTask, "", "");
  ReplayRun first(11);
  first.run(ReplayRun::kStepsPerTask + 3, dir.file("mid.safetensors"), "");  // stops inside task 1
  ReplayRun resumed(42);  // other initial weights and buffer seed: everything comes from the file
  resumed.run(2 * ReplayRun::kStepsPerTask, "", dir.file("mid.safetensors"));
  CHECK(resumed.net.weight.value == whole.net.weight.value);
  CHECK(resumed.net.bias.value == whole.net.bias.value);
  CHECK(same_replay_state(resumed.buffer.state(), whole.buffer.state()));
  CHECK(whole.buffer.size() == 6);
}

TEST_CASE("checkpoint: a replay buffer refuses a malformed or inconsistent state", "[io][checkpoint]") {
  ReplayBuffer a(4, true, 1);
  for (std::int64_t i = 0; i < 6; ++i) a.add({i, i % 2, 0});
  Checkpoint<double> ck;
  save_object_state(a, ck, "replay");
  ReplayBuffer b(4, true, 2);
  const ReplayBuffer::State before = b.state();
  PEFT_REQUIRE_THROWS_WITH(load_object_state(b, ck, "other"), ConfigError, "no scalar \"other.items\"");

  Checkpoint<double> bad = ck;
  bad.put_ints("replay.items", {1, 0, 0, 2});
  PEFT_REQUIRE_THROWS_WITH(load_object_state(b, bad, "replay"), ConfigError, "has 4 numbers, expected 3 per item");
  bad.put_ints("replay.items", {1, 7, 0});
  PEFT_REQUIRE_THROWS_WITH(load_object_state(b, bad, "replay"), ConfigError, "item 1 has label 7");
  bad = ck;
  bad.put_int("replay.seen", 5);
  PEFT_REQUIRE_THROWS_WITH(load_object_state(b, bad, "replay"), ConfigError, "counts are inconsistent");
  CHECK(same_replay_state(b.state(), before));  // nothing changed

  TempDir dir;
  {  // a hand-made malformed list in the file's metadata
    std::vector<float> z(1, 0.f);
    save_safetensors<float>(dir.file("list.safetensors"), {{"t", {1}, z.data()}},
                            {{"peft.checkpoint", "1"}, {"l:replay.items", "1,2,x"}});
  }
  const Checkpoint<float> ml = Checkpoint<float>::load(dir.file("list.safetensors"));
  PEFT_REQUIRE_THROWS_WITH(ml.get_ints("replay.items"), IoError, "is not a comma-separated list of integers");
  Checkpoint<float> empty;
  empty.put_ints("none", {});
  CHECK(empty.get_ints("none").empty());
  empty.put_ints("neg", {-3, 0, 9000000000LL});
  CHECK(empty.get_ints("neg") == std::vector<std::int64_t>{-3, 0, 9000000000LL});
}

TEST_CASE("checkpoint: an episode sampler resumes the same episodes", "[io][checkpoint][meta]") {
  std::vector<std::int64_t> labels;
  for (int i = 0; i < 60; ++i) labels.push_back(i % 6);
  EpisodeSampler a(labels, 3, 2, 2, 9, {0, 1, 2, 3, 5});
  Episode e;
  for (int i = 0; i < 3; ++i) a.next(e);
  Checkpoint<double> ck;
  save_episode_sampler_state(a, ck);
  TempDir dir;
  ck.save(dir.file("e.safetensors"));
  std::vector<Episode> expected(4);
  for (auto& x : expected) a.next(x);

  EpisodeSampler b(labels, 3, 2, 2, 1234, {0, 1, 2, 3, 5});
  load_episode_sampler_state(b, Checkpoint<double>::load(dir.file("e.safetensors")));
  CHECK(b.episodes() == 3);
  for (const auto& x : expected) {
    b.next(e);
    CHECK(e.classes == x.classes);
    CHECK(e.support == x.support);
    CHECK(e.query == x.query);
  }
  EpisodeSampler other_k(labels, 3, 1, 2, 1, {0, 1, 2, 3, 5});
  PEFT_REQUIRE_THROWS_WITH(load_episode_sampler_state(other_k, ck), ConfigError, "draws 3-way 2-shot episodes");
  EpisodeSampler other_classes(labels, 3, 2, 2, 1, {0, 1, 2, 3, 4});
  PEFT_REQUIRE_THROWS_WITH(load_episode_sampler_state(other_classes, ck), ConfigError, "(other classes)");
}
