#include "report.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <ostream>
#include <sstream>

#include <peft/core/error.hpp>
#include <peft/train/progress.hpp>

namespace study {
namespace {

std::string fmt(const char* f, double v) {
  char b[64];
  std::snprintf(b, sizeof b, f, v);
  return b;
}

std::string with_commas(Index n) {
  std::string s = std::to_string(n);
  for (int i = static_cast<int>(s.size()) - 3; i > 0; i -= 3) s.insert(static_cast<std::size_t>(i), ",");
  return s;
}

std::string mib(std::int64_t bytes) { return bytes < 0 ? "n/a" : fmt("%.0f", static_cast<double>(bytes) / 1048576.0); }

std::string pad(const std::string& s, std::size_t w, bool right = false) {
  if (s.size() >= w) return s;
  return right ? std::string(w - s.size(), ' ') + s : s + std::string(w - s.size(), ' ');
}

std::string csv_field(const std::string& s) {
  if (s.find_first_of(",\"\n") == std::string::npos) return s;
  std::string q = "\"";
  for (char c : s) q += (c == '"') ? std::string("\"\"") : std::string(1, c);
  return q + "\"";
}

std::string xml(const std::string& s) {
  std::string o;
  for (char c : s) {
    switch (c) {
      case '&': o += "&amp;"; break;
      case '<': o += "&lt;"; break;
      case '>': o += "&gt;"; break;
      case '"': o += "&quot;"; break;
      default: o += c;
    }
  }
  return o;
}

// 16 distinguishable colours (Tableau 10 + 6), one per strategy in table order.
const char* kPalette[] = {"#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
                          "#9c755f", "#bab0ac", "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#17becf"};

std::string colour_of(const std::string& id) {
  const auto& all = all_strategies();
  for (std::size_t i = 0; i < all.size(); ++i)
    if (all[i].id == id) return kPalette[i % 16];
  return "#333333";
}

/// A plot frame: data coordinates → SVG pixels, axes, ticks, grid.
struct Frame {
  double w = 760, h = 460, left = 64, right = 210, top = 40, bottom = 56;
  double x0 = 0, x1 = 1, y0 = 0, y1 = 1;
  bool logx = false;
  double px(double x) const {
    const double t = logx ? (std::log10(x) - std::log10(x0)) / (std::log10(x1) - std::log10(x0)) : (x - x0) / (x1 - x0);
    return left + t * (w - left - right);
  }
  double py(double y) const { return top + (1.0 - (y - y0) / (y1 - y0)) * (h - top - bottom); }
};

void svg_open(std::ostream& s, const Frame& f, const std::string& title) {
  s << "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
    << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << f.w << "\" height=\"" << f.h << "\" viewBox=\"0 0 "
    << f.w << ' ' << f.h << "\" font-family=\"sans-serif\" font-size=\"12\">\n"
    << "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    << "<text x=\"" << f.w / 2 << "\" y=\"22\" text-anchor=\"middle\" font-size=\"15\" font-weight=\"bold\">"
    << xml(title) << "</text>\n";
}

void svg_axes(std::ostream& s, const Frame& f, const std::vector<double>& xticks,
              const std::vector<std::string>& xlabels, const std::vector<double>& yticks, const std::string& xtitle,
              const std::string& ytitle) {
  const double xa = f.left, xb = f.w - f.right, ya = f.top, yb = f.h - f.bottom;
  for (std::size_t i = 0; i < yticks.size(); ++i) {
    const double y = f.py(yticks[i]);
    s << "<line x1=\"" << xa << "\" y1=\"" << y << "\" x2=\"" << xb << "\" y2=\"" << y
      << "\" stroke=\"#e5e5e5\"/>\n<text x=\"" << xa - 6 << "\" y=\"" << y + 4 << "\" text-anchor=\"end\">"
      << fmt("%.0f", 100.0 * yticks[i]) << "</text>\n";
  }
  for (std::size_t i = 0; i < xticks.size(); ++i) {
    const double x = f.px(xticks[i]);
    s << "<line x1=\"" << x << "\" y1=\"" << ya << "\" x2=\"" << x << "\" y2=\"" << yb
      << "\" stroke=\"#e5e5e5\"/>\n<text x=\"" << x << "\" y=\"" << yb + 16 << "\" text-anchor=\"middle\">"
      << xml(xlabels[i]) << "</text>\n";
  }
  s << "<rect x=\"" << xa << "\" y=\"" << ya << "\" width=\"" << xb - xa << "\" height=\"" << yb - ya
    << "\" fill=\"none\" stroke=\"#333\"/>\n"
    << "<text x=\"" << (xa + xb) / 2 << "\" y=\"" << f.h - 14 << "\" text-anchor=\"middle\">" << xml(xtitle)
    << "</text>\n"
    << "<text transform=\"translate(18," << (ya + yb) / 2 << ") rotate(-90)\" text-anchor=\"middle\">" << xml(ytitle)
    << "</text>\n";
}

void svg_legend(std::ostream& s, const Frame& f, const std::vector<std::pair<std::string, std::string>>& entries) {
  double y = f.top + 6;
  const double x = f.w - f.right + 14;
  for (const auto& [label, colour] : entries) {
    s << "<line x1=\"" << x << "\" y1=\"" << y << "\" x2=\"" << x + 18 << "\" y2=\"" << y << "\" stroke=\"" << colour
      << "\" stroke-width=\"3\"/>\n<text x=\"" << x + 24 << "\" y=\"" << y + 4 << "\" font-size=\"11\">" << xml(label)
      << "</text>\n";
    y += 17;
  }
}

std::vector<double> nice_ticks(double lo, double hi, int count) {
  std::vector<double> t;
  for (int i = 0; i <= count; ++i) t.push_back(lo + (hi - lo) * i / count);
  return t;
}

void write_learning_curves(const std::string& path, const Pretrained& pre, const std::vector<StrategyResult>& results,
                           const RunInfo& info) {
  Frame f;
  int max_epoch = 1;
  double lo = 1.0;
  for (const auto& r : results)
    for (const auto& p : r.curve) {
      max_epoch = std::max(max_epoch, p.epoch);
      lo = std::min(lo, p.val_acc);
    }
  f.x0 = 0;
  f.x1 = max_epoch;
  f.y0 = std::max(0.0, std::floor(lo * 10.0) / 10.0 - 0.1);
  f.y1 = 1.0;
  std::ofstream s(path);
  svg_open(s, f, "Target validation accuracy while fine-tuning (budget " + std::to_string(info.budget) + ")");
  std::vector<double> xt;
  std::vector<std::string> xl;
  const int step = std::max(1, max_epoch / 10);
  for (int e = 0; e <= max_epoch; e += step) {
    xt.push_back(e);
    xl.push_back(std::to_string(e));
  }
  svg_axes(s, f, xt, xl, nice_ticks(f.y0, f.y1, static_cast<int>(std::lround((f.y1 - f.y0) * 10))), "epoch",
           "target validation accuracy (%)");
  std::vector<std::pair<std::string, std::string>> legend;
  for (const auto& r : results) {
    const std::string c = colour_of(r.info.id);
    // Epoch 0: the starting point (chance for a zero head; the pretrained head is never the target head).
    s << "<polyline fill=\"none\" stroke=\"" << c << "\" stroke-width=\"2\" points=\"";
    for (const auto& p : r.curve) s << f.px(p.epoch) << ',' << f.py(p.val_acc) << ' ';
    s << "\"><title>" << xml(r.info.label) << "</title></polyline>\n";
    legend.emplace_back(r.info.label, c);
  }
  svg_legend(s, f, legend);
  (void)pre;
  s << "</svg>\n";
}

void write_accuracy_vs_params(const std::string& path, const std::vector<StrategyResult>& results) {
  Frame f;
  f.logx = true;
  double pmin = 1e18, pmax = 1;
  for (const auto& r : results) {
    pmin = std::min(pmin, static_cast<double>(std::max<Index>(r.trainable, 1)));
    pmax = std::max(pmax, static_cast<double>(r.trainable));
  }
  f.x0 = std::pow(10.0, std::floor(std::log10(pmin)));
  f.x1 = std::pow(10.0, std::ceil(std::log10(pmax) + 1e-9));
  if (f.x1 <= f.x0) f.x1 = f.x0 * 10;
  f.y0 = 0.0;
  f.y1 = 1.0;
  std::ofstream s(path);
  svg_open(s, f, "Accuracy vs. trainable parameters (log scale)");
  std::vector<double> xt;
  std::vector<std::string> xl;
  for (double x = f.x0; x <= f.x1 * 1.0001; x *= 10) {
    xt.push_back(x);
    const int e = static_cast<int>(std::lround(std::log10(x)));
    xl.push_back(e <= 3 ? std::to_string(static_cast<long long>(std::lround(x))) : "1e" + std::to_string(e));
  }
  svg_axes(s, f, xt, xl, nice_ticks(0.0, 1.0, 10), "trainable parameters", "test accuracy (%)");
  std::vector<std::pair<std::string, std::string>> legend;
  for (const auto& r : results) {
    const std::string c = colour_of(r.info.id);
    const double x = f.px(static_cast<double>(std::max<Index>(r.trainable, 1)));
    const double yt = f.py(r.target_acc);
    s << "<circle cx=\"" << x << "\" cy=\"" << yt << "\" r=\"5\" fill=\"" << c << "\"><title>" << xml(r.info.label)
      << ": target " << fmt("%.1f", 100 * r.target_acc) << " %</title></circle>\n";
    if (r.source_measured) {
      const double ys = f.py(r.source_acc);
      s << "<line x1=\"" << x << "\" y1=\"" << yt << "\" x2=\"" << x << "\" y2=\"" << ys << "\" stroke=\"" << c
        << "\" stroke-dasharray=\"2,2\"/>\n<circle cx=\"" << x << "\" cy=\"" << ys
        << "\" r=\"5\" fill=\"white\" stroke=\"" << c << "\" stroke-width=\"2\"><title>" << xml(r.info.label)
        << ": source after adaptation " << fmt("%.1f", 100 * r.source_acc) << " %</title></circle>\n";
    }
    legend.emplace_back(r.info.label, c);
  }
  svg_legend(s, f, legend);
  const double ly = f.h - f.bottom + 32;
  s << "<circle cx=\"" << f.left + 6 << "\" cy=\"" << ly << "\" r=\"5\" fill=\"#555\"/><text x=\"" << f.left + 16
    << "\" y=\"" << ly + 4 << "\" font-size=\"11\">target accuracy</text>\n"
    << "<circle cx=\"" << f.left + 136 << "\" cy=\"" << ly
    << "\" r=\"5\" fill=\"white\" stroke=\"#555\" stroke-width=\"2\"/>"
    << "<text x=\"" << f.left + 146 << "\" y=\"" << ly + 4
    << "\" font-size=\"11\">source accuracy after adaptation</text>\n";
  s << "</svg>\n";
}

}  // namespace

void print_table(std::ostream& out, const Pretrained& pre, const std::vector<StrategyResult>& results) {
  const std::string before = fmt("%.1f", 100.0 * pre.source_acc);
  out << '\n'
      << pad("strategy", 38) << pad("target", 8, true) << pad("source", 16, true) << pad("forget", 8, true)
      << pad("trainable", 12, true) << pad("%", 8, true) << pad("time", 8, true) << pad("cpu", 8, true)
      << pad("state", 10, true) << pad("peak", 8, true) << '\n'
      << pad("", 38) << pad("acc %", 8, true) << pad("before->after", 16, true) << pad("pts", 8, true) << pad("", 36)
      << pad("KiB", 10, true) << pad("MiB", 8, true) << '\n'
      << std::string(124, '-') << '\n';
  for (const auto& r : results) {
    const std::string src = r.source_measured ? before + " -> " + fmt("%.1f", 100.0 * r.source_acc) : "-";
    const std::string forget = r.source_measured ? fmt("%+.1f", 100.0 * (pre.source_acc - r.source_acc)) : "-";
    out << pad(r.info.label, 38) << pad(fmt("%.1f", 100.0 * r.target_acc), 8, true) << pad(src, 16, true)
        << pad(forget, 8, true) << pad(with_commas(r.trainable), 12, true)
        << pad(fmt("%.2f", 100.0 * static_cast<double>(r.trainable) / static_cast<double>(std::max<Index>(r.total, 1))),
               8, true)
        << pad(peft::format_duration(r.seconds), 8, true) << pad(peft::format_duration(r.cpu_seconds), 8, true)
        << pad(with_commas(static_cast<Index>((r.state_bytes + 1023) / 1024)), 10, true)
        << pad(mib(r.peak_rss), 8, true) << '\n';
  }
  out << std::string(124, '-') << '\n'
      << "target/source acc: 5-way test accuracy on classes 5-9 / 0-4 (official test split); forget = source acc\n"
      << "lost by adapting (percentage points); % = trainable / all parameters of the adapted model; time = wall\n"
      << "time, cpu = process CPU time (what a busy machine cannot inflate); state = what training adds per\n"
      << "trainable parameter (its gradient and AdamW's two moments), the memory PEFT saves; peak = peak resident\n"
      << "memory of the process during the strategy (data set and frozen model included; n/a where the kernel\n"
      << "cannot reset the high-water mark).\n";
}

std::vector<std::string> write_outputs(const std::string& dir, const RunInfo& info, const Pretrained& pre,
                                       const std::vector<StrategyResult>& results) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) throw peft::IoError("--out \"" + dir + "\": cannot create the directory: " + ec.message());
  std::vector<std::string> written;
  const auto path = [&](const char* name) { return (fs::path(dir) / name).string(); };
  {
    std::ofstream s(path("results.csv"));
    if (!s) throw peft::IoError("cannot write \"" + path("results.csv") + "\"");
    s << "strategy,label,family,target_acc,source_acc_before,source_acc_after,forgetting,trainable_params,total_params,"
         "trainable_percent,train_state_bytes,seconds,cpu_seconds,peak_rss_bytes\n";
    for (const auto& r : results) {
      s << r.info.id << ',' << csv_field(r.info.label) << ',' << csv_field(r.info.family) << ','
        << fmt("%.4f", r.target_acc) << ',';
      if (r.source_measured)
        s << fmt("%.4f", pre.source_acc) << ',' << fmt("%.4f", r.source_acc) << ','
          << fmt("%.4f", pre.source_acc - r.source_acc);
      else
        s << ",,";
      s << ',' << r.trainable << ',' << r.total << ','
        << fmt("%.4f", 100.0 * static_cast<double>(r.trainable) / static_cast<double>(std::max<Index>(r.total, 1)))
        << ',' << r.state_bytes << ',' << fmt("%.2f", r.seconds) << ',' << fmt("%.2f", r.cpu_seconds) << ','
        << r.peak_rss << '\n';
    }
    written.push_back(path("results.csv"));
  }
  {
    std::ofstream s(path("curves.csv"));
    if (!s) throw peft::IoError("cannot write \"" + path("curves.csv") + "\"");
    s << "strategy,phase,epoch,step,train_loss,val_acc\n";
    for (const auto& p : pre.curve)
      s << "pretrain," << p.phase << ',' << p.epoch << ',' << p.step << ',' << fmt("%.5f", p.train_loss) << ','
        << fmt("%.4f", p.val_acc) << '\n';
    for (const auto& r : results)
      for (const auto& p : r.curve)
        s << r.info.id << ',' << p.phase << ',' << p.epoch << ',' << p.step << ',' << fmt("%.5f", p.train_loss) << ','
          << fmt("%.4f", p.val_acc) << '\n';
    written.push_back(path("curves.csv"));
  }
  {
    std::ofstream s(path("run.txt"));
    s << "data: " << info.data << "\nmodel: " << info.net << "\ncommand: " << info.command_line
      << "\nbudget: " << info.budget << "\nepochs: " << info.epochs << "\nseed: " << info.seed
      << "\nthreads: " << info.threads << "\npretrained source test accuracy: " << fmt("%.4f", pre.source_acc)
      << "\npretraining seconds: " << fmt("%.2f", pre.seconds) << '\n';
    print_table(s, pre, results);
    written.push_back(path("run.txt"));
  }
  write_learning_curves(path("learning_curves.svg"), pre, results, info);
  written.push_back(path("learning_curves.svg"));
  write_accuracy_vs_params(path("accuracy_vs_params.svg"), results);
  written.push_back(path("accuracy_vs_params.svg"));
  return written;
}

std::vector<std::string> check_results(const Pretrained& pre, const std::vector<StrategyResult>& results,
                                       const std::vector<std::string>& expected_ids) {
  constexpr double kChance = 1.0 / kTaskClasses;
  constexpr double kMargin = 0.05;
  std::vector<std::string> fails;
  if (!(pre.source_acc > kChance + kMargin))
    fails.push_back("pretrained source accuracy " + fmt("%.3f", pre.source_acc) + " is not above chance");
  if (results.size() != expected_ids.size())
    fails.push_back("table has " + std::to_string(results.size()) + " rows, expected " +
                    std::to_string(expected_ids.size()));
  for (std::size_t i = 0; i < results.size() && i < expected_ids.size(); ++i) {
    const StrategyResult& r = results[i];
    if (r.info.id != expected_ids[i])
      fails.push_back("row " + std::to_string(i) + " is " + r.info.id + ", expected " + expected_ids[i]);
    if (!std::isfinite(r.target_acc) || r.target_acc < 0 || r.target_acc > 1)
      fails.push_back(r.info.id + ": target accuracy " + fmt("%g", r.target_acc) + " outside [0, 1]");
    else if (!(r.target_acc > kChance + kMargin))
      fails.push_back(r.info.id + ": target accuracy " + fmt("%.3f", r.target_acc) +
                      " is not above chance (0.2 + 0.05)");
    if (r.source_measured && (!std::isfinite(r.source_acc) || r.source_acc < 0 || r.source_acc > 1))
      fails.push_back(r.info.id + ": source accuracy " + fmt("%g", r.source_acc) + " outside [0, 1]");
    else if (r.source_measured && !(r.source_acc > kChance + kMargin))
      fails.push_back(r.info.id + ": source accuracy after adaptation " + fmt("%.3f", r.source_acc) +
                      " is not above chance (0.2 + 0.05)");
    if (r.trainable <= 0 || r.trainable > r.total)
      fails.push_back(r.info.id + ": trainable parameters " + std::to_string(r.trainable) + " not in (0, " +
                      std::to_string(r.total) + "]");
    if (r.curve.empty()) fails.push_back(r.info.id + ": no learning curve");
  }
  return fails;
}

}  // namespace study
