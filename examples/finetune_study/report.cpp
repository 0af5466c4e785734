#include "report.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <ostream>
#include <set>
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

std::string pad(const std::string& s, std::size_t w, bool right = false) {
  // Width in characters, counting a UTF-8 sequence as one.
  std::size_t n = 0;
  for (unsigned char c : s) n += (c & 0xC0) != 0x80;
  if (n >= w) return s;
  return right ? std::string(w - n, ' ') + s : s + std::string(w - n, ' ');
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

std::string num(double v) { return std::isnan(v) ? "" : fmt("%.4f", v); }

/// Mean, sample standard deviation and the 95 % half-width of the mean (Student's t).
struct Stats {
  int n = 0;
  double mean = kNaN, sd = kNaN, ci = kNaN;
};

double t975(int dof) {
  static const double t[] = {0,     12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
                             2.201, 2.179,  2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086};
  if (dof <= 0) return kNaN;
  if (dof <= 20) return t[dof];
  return dof <= 30 ? 2.042 : 1.96;
}

Stats stats(const std::vector<double>& v) {
  Stats s;
  std::vector<double> x;
  for (double d : v)
    if (!std::isnan(d)) x.push_back(d);
  s.n = static_cast<int>(x.size());
  if (x.empty()) return s;
  double sum = 0;
  for (double d : x) sum += d;
  s.mean = sum / s.n;
  if (s.n > 1) {
    double sq = 0;
    for (double d : x) sq += (d - s.mean) * (d - s.mean);
    s.sd = std::sqrt(sq / (s.n - 1));
    s.ci = t975(s.n - 1) * s.sd / std::sqrt(static_cast<double>(s.n));
  }
  return s;
}

/// "84.1 ± 1.2" (percent), "84.1" with one seed, "-" when nothing was measured.
std::string pm(const Stats& s, double scale = 100.0, const char* f = "%.1f") {
  if (s.n == 0) return "-";
  std::string out = fmt(f, scale * s.mean);
  if (s.n > 1) out += " ± " + fmt("%.1f", scale * s.sd);
  return out;
}

/// "+2.1 [+0.4, +3.8]" (percentage points, 95 % interval), without the interval for one seed.
std::string diff_ci(const Stats& s) {
  if (s.n == 0) return "-";
  std::string out = fmt("%+.1f", 100.0 * s.mean);
  if (s.n > 1) out += " [" + fmt("%+.1f", 100.0 * (s.mean - s.ci)) + ", " + fmt("%+.1f", 100.0 * (s.mean + s.ci)) + "]";
  return out;
}

double pretrained_source(const Study& st, std::uint64_t seed) {
  for (const auto& p : st.pretrained)
    if (p.seed == seed) return p.source_acc;
  return kNaN;
}

/// The chosen (tested) run of a strategy for each seed, in seed order.
std::vector<const RunResult*> chosen_runs(const Study& st, const std::string& id) {
  std::vector<const RunResult*> out;
  for (const auto& r : st.runs)
    if (r.info.id == id && r.chosen) out.push_back(&r);
  return out;
}

/// Per-seed differences a − b of the chosen runs' target accuracies (seeds both have).
Stats paired(const Study& st, const std::string& a, const std::string& b) {
  std::map<std::uint64_t, double> ref;
  for (const RunResult* r : chosen_runs(st, b)) ref[r->seed] = r->target_acc;
  std::vector<double> d;
  for (const RunResult* r : chosen_runs(st, a)) {
    const auto it = ref.find(r->seed);
    if (it != ref.end()) d.push_back(r->target_acc - it->second);
  }
  return stats(d);
}

bool has_strategy(const Study& st, const std::string& id) {
  for (const auto& s : st.strategies)
    if (s.id == id) return true;
  return false;
}

/// Everything the tables and plots say about one strategy.
struct Summary {
  const StrategyInfo* info = nullptr;
  std::string rates;  ///< chosen rate per seed, e.g. "1e-3 ×2, 3e-3"
  Stats target, source, forget, disabled;
  double disabled_max_diff = kNaN;
  Stats d_scratch, d_full;
  Index trainable = 0, total = 0;
  std::int64_t state_bytes = 0;
  double ms_per_step = kNaN, cpu_ms_per_step = kNaN;
  std::int64_t peak_rss = -1, peak_rss_added = -1;
};

Summary summarize(const Study& st, const StrategyInfo& s) {
  Summary out;
  out.info = &s;
  std::vector<double> t, src, fg, dis;
  std::map<double, int> rate_count;
  double wall = 0, cpu = 0;
  Index steps = 0;
  for (const RunResult* r : chosen_runs(st, s.id)) {
    t.push_back(r->target_acc);
    if (r->source_measured) {
      src.push_back(r->source_acc);
      fg.push_back(pretrained_source(st, r->seed) - r->source_acc);
    }
    dis.push_back(r->source_disabled);
    if (!std::isnan(r->disabled_max_diff))
      out.disabled_max_diff = std::isnan(out.disabled_max_diff) ? r->disabled_max_diff
                                                                : std::max(out.disabled_max_diff, r->disabled_max_diff);
    ++rate_count[r->lr];
    out.trainable = r->trainable;
    out.total = r->total;
    out.state_bytes = r->state_bytes;
    out.peak_rss = std::max(out.peak_rss, r->peak_rss);
    out.peak_rss_added = std::max(out.peak_rss_added, r->peak_rss_added);
  }
  // Time per step over every run of the strategy (all rates cost the same).
  for (const auto& r : st.runs)
    if (r.info.id == s.id) {
      wall += r.train_seconds;
      cpu += r.train_cpu_seconds;
      steps += r.steps;
    }
  if (steps > 0) {
    out.ms_per_step = 1000.0 * wall / static_cast<double>(steps);
    out.cpu_ms_per_step = 1000.0 * cpu / static_cast<double>(steps);
  }
  for (const auto& [lr, n] : rate_count)
    out.rates += (out.rates.empty() ? "" : ", ") + format_lr(lr) + (n > 1 ? "×" + std::to_string(n) : "");
  out.target = stats(t);
  out.source = stats(src);
  out.forget = stats(fg);
  out.disabled = stats(dis);
  if (s.id != "scratch" && has_strategy(st, "scratch")) out.d_scratch = paired(st, s.id, "scratch");
  if (s.id != "full_ft" && has_strategy(st, "full_ft")) out.d_full = paired(st, s.id, "full_ft");
  return out;
}

// ---------------------------------------------------------------------------------------------
// SVG

const char* kColours[] = {"#1b6ca8", "#d1495b", "#2a9d4b", "#e39b17", "#7b4fa0", "#5b5b5b", "#17becf", "#8c564b"};
constexpr int kNumColours = 8;  // a panel holds at most 7 strategies (PEFT under --full)

/// Marker k (0..5) at (x, y): circle, square, triangle, diamond, inverted triangle, cross.
void marker(std::ostream& s, int k, double x, double y, const std::string& colour, bool hollow = false,
            double r = 4.0) {
  const std::string style = hollow ? "fill=\"white\" stroke=\"" + colour + "\" stroke-width=\"1.8\""
                                   : "fill=\"" + colour + "\" stroke=\"" + colour + "\"";
  switch (k % 6) {
    case 0: s << "<circle cx=\"" << x << "\" cy=\"" << y << "\" r=\"" << r << "\" " << style << "/>\n"; break;
    case 1:
      s << "<rect x=\"" << x - r << "\" y=\"" << y - r << "\" width=\"" << 2 * r << "\" height=\"" << 2 * r << "\" "
        << style << "/>\n";
      break;
    case 2:
      s << "<polygon points=\"" << x << ',' << y - r * 1.2 << ' ' << x - r * 1.1 << ',' << y + r * 0.9 << ' '
        << x + r * 1.1 << ',' << y + r * 0.9 << "\" " << style << "/>\n";
      break;
    case 3:
      s << "<polygon points=\"" << x << ',' << y - r * 1.3 << ' ' << x + r * 1.1 << ',' << y << ' ' << x << ','
        << y + r * 1.3 << ' ' << x - r * 1.1 << ',' << y << "\" " << style << "/>\n";
      break;
    case 4:
      s << "<polygon points=\"" << x << ',' << y + r * 1.2 << ' ' << x - r * 1.1 << ',' << y - r * 0.9 << ' '
        << x + r * 1.1 << ',' << y - r * 0.9 << "\" " << style << "/>\n";
      break;
    default:
      s << "<path d=\"M" << x - r << ',' << y - r << " L" << x + r << ',' << y + r << " M" << x - r << ',' << y + r
        << " L" << x + r << ',' << y - r << "\" stroke=\"" << colour << "\" stroke-width=\"2\"/>\n";
  }
}

struct Box {
  double x, y, w, h;      ///< plot area in pixels
  double x0, x1, y0, y1;  ///< data range
  bool logx = false;
  double px(double v) const {
    const double t = logx ? (std::log10(v) - std::log10(x0)) / (std::log10(x1) - std::log10(x0)) : (v - x0) / (x1 - x0);
    return x + t * w;
  }
  double py(double v) const { return y + (1.0 - (v - y0) / (y1 - y0)) * h; }
};

void svg_open(std::ostream& s, double w, double h, const std::string& title, const std::string& subtitle) {
  s << "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
    << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << w << "\" height=\"" << h << "\" viewBox=\"0 0 " << w
    << ' ' << h << "\" font-family=\"sans-serif\" font-size=\"12\">\n"
    << "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    << "<text x=\"" << w / 2 << "\" y=\"22\" text-anchor=\"middle\" font-size=\"15\" font-weight=\"bold\">"
    << xml(title) << "</text>\n"
    << "<text x=\"" << w / 2 << "\" y=\"40\" text-anchor=\"middle\" font-size=\"11\" fill=\"#555\">" << xml(subtitle)
    << "</text>\n";
}

/// Rounds a percentage range outwards to multiples of `step` (fractions in, fractions out).
std::pair<double, double> zoom(double lo, double hi, double step) {
  lo = std::floor(lo / step) * step;
  hi = std::ceil(hi / step) * step;
  if (hi <= lo) hi = lo + step;
  return {std::max(0.0, lo), std::min(1.0, hi)};
}

void y_grid(std::ostream& s, const Box& b, double step, bool labels) {
  for (double v = b.y0; v <= b.y1 + 1e-9; v += step) {
    const double y = b.py(v);
    s << "<line x1=\"" << b.x << "\" y1=\"" << y << "\" x2=\"" << b.x + b.w << "\" y2=\"" << y
      << "\" stroke=\"#e6e6e6\"/>\n";
    if (labels)
      s << "<text x=\"" << b.x - 5 << "\" y=\"" << y + 4 << "\" text-anchor=\"end\" font-size=\"11\">"
        << fmt("%.0f", 100.0 * v) << "</text>\n";
  }
}

/// Mean curve over the chosen runs of a strategy (every seed has the same steps).
std::vector<CurvePoint> mean_curve(const Study& st, const std::string& id) {
  std::vector<CurvePoint> out;
  const auto runs = chosen_runs(st, id);
  if (runs.empty()) return out;
  out = runs[0]->curve;
  for (std::size_t k = 1; k < runs.size(); ++k)
    for (std::size_t i = 0; i < out.size() && i < runs[k]->curve.size(); ++i) {
      out[i].val_acc += runs[k]->curve[i].val_acc;
      out[i].source_val_acc += runs[k]->curve[i].source_val_acc;
    }
  for (auto& p : out) {
    p.val_acc /= static_cast<double>(runs.size());
    p.source_val_acc /= static_cast<double>(runs.size());
  }
  return out;
}

void write_curves_svg(const std::string& path, const Study& st) {
  // One panel per family; each strategy's mean curves: target validation (solid) and source
  // validation (dashed); reference lines: from scratch's final target validation accuracy and
  // the pretrained network's source validation accuracy.
  std::vector<std::string> families;
  for (const auto& s : st.strategies)
    if (std::find(families.begin(), families.end(), s.family) == families.end()) families.push_back(s.family);
  std::map<std::string, std::vector<CurvePoint>> curves;
  double lo = 1.0, hi = 0.0;
  Index max_step = 1;
  for (const auto& s : st.strategies) {
    curves[s.id] = mean_curve(st, s.id);
    for (const auto& p : curves[s.id]) {
      lo = std::min(lo, p.val_acc);
      hi = std::max(hi, p.val_acc);
      if (p.source_val_acc >= 0) {
        lo = std::min(lo, p.source_val_acc);
        hi = std::max(hi, p.source_val_acc);
      }
      max_step = std::max(max_step, p.step);
    }
  }
  double pre_source = kNaN, scratch_final = kNaN;
  {
    double sum = 0;
    int n = 0;
    for (const auto& p : st.pretrained)
      if (!p.curve.empty()) {
        sum += p.curve.back().val_acc;
        ++n;
      }
    if (n > 0) pre_source = sum / n;
  }
  if (curves.count("scratch") && !curves["scratch"].empty()) scratch_final = curves["scratch"].back().val_acc;
  if (!std::isnan(pre_source)) hi = std::max(hi, pre_source);
  const auto [y0, y1] = zoom(lo, hi, 0.05);
  const double step = (y1 - y0) > 0.45 ? 0.1 : 0.05;

  const int cols = families.size() > 1 ? 2 : 1;
  const int rows =
      static_cast<int>((families.size() + static_cast<std::size_t>(cols) - 1) / static_cast<std::size_t>(cols));
  const double pw = 540, ph = 300, top = 58;
  const double W = cols * pw, H = top + rows * ph + 34;
  std::ofstream s(path);
  svg_open(s, W, H,
           "Validation accuracy while fine-tuning (mean of " + std::to_string(st.info.num_seeds) + " seed" +
               (st.info.num_seeds > 1 ? "s" : "") + ", chosen rate)",
           "solid: target validation accuracy; dashed: source validation accuracy (forgetting); grey: references");
  for (std::size_t f = 0; f < families.size(); ++f) {
    const double ox = static_cast<double>(f % static_cast<std::size_t>(cols)) * pw;
    const double oy = top + static_cast<double>(f / static_cast<std::size_t>(cols)) * ph;
    Box b{ox + 52, oy + 24, 290, ph - 70, 0, static_cast<double>(max_step), y0, y1};
    s << "<text x=\"" << b.x + b.w / 2 << "\" y=\"" << oy + 14 << "\" text-anchor=\"middle\" font-weight=\"bold\">"
      << xml(families[f]) << "</text>\n";
    y_grid(s, b, step, true);
    for (int k = 0; k <= 4; ++k) {
      const double v = static_cast<double>(max_step) * k / 4.0;
      s << "<text x=\"" << b.px(v) << "\" y=\"" << b.y + b.h + 15 << "\" text-anchor=\"middle\" font-size=\"11\">"
        << fmt("%.0f", v) << "</text>\n";
    }
    s << "<rect x=\"" << b.x << "\" y=\"" << b.y << "\" width=\"" << b.w << "\" height=\"" << b.h
      << "\" fill=\"none\" stroke=\"#333\"/>\n"
      << "<text x=\"" << b.x + b.w / 2 << "\" y=\"" << b.y + b.h + 30 << "\" text-anchor=\"middle\" font-size=\"11\">"
      << "optimizer step</text>\n"
      << "<text transform=\"translate(" << ox + 16 << ',' << b.y + b.h / 2
      << ") rotate(-90)\" text-anchor=\"middle\" font-size=\"11\">accuracy (%)</text>\n";
    double ly = b.y + 6;
    const double lx = b.x + b.w + 14;
    auto ref = [&](double v, const char* dash, const std::string& label) {
      if (std::isnan(v)) return;
      s << "<line x1=\"" << b.x << "\" y1=\"" << b.py(v) << "\" x2=\"" << b.x + b.w << "\" y2=\"" << b.py(v)
        << "\" stroke=\"#888\" stroke-width=\"1.5\" stroke-dasharray=\"" << dash << "\"/>\n";
      s << "<line x1=\"" << lx << "\" y1=\"" << ly << "\" x2=\"" << lx + 22 << "\" y2=\"" << ly
        << "\" stroke=\"#888\" stroke-width=\"1.5\" stroke-dasharray=\"" << dash << "\"/>\n<text x=\"" << lx + 28
        << "\" y=\"" << ly + 4 << "\" font-size=\"11\">" << xml(label) << "</text>\n";
      ly += 16;
    };
    ref(pre_source, "2,3", "pretrained, source");
    if (families[f] != "baseline") ref(scratch_final, "7,4", "from scratch, target");
    int k = 0;
    for (const auto& st_info : st.strategies) {
      if (st_info.family != families[f]) continue;
      const auto& c = curves[st_info.id];
      if (c.empty()) continue;
      const std::string colour = kColours[k % kNumColours];
      for (int pass = 0; pass < 2; ++pass) {
        if (pass == 1 && c.front().source_val_acc < 0) break;
        s << "<polyline fill=\"none\" stroke=\"" << colour << "\" stroke-width=\"2\""
          << (pass == 1 ? " stroke-dasharray=\"5,3\"" : "") << " points=\"";
        for (const auto& p : c)
          s << b.px(static_cast<double>(p.step)) << ',' << b.py(pass == 0 ? p.val_acc : p.source_val_acc) << ' ';
        s << "\"/>\n";
        for (const auto& p : c)
          marker(s, k, b.px(static_cast<double>(p.step)), b.py(pass == 0 ? p.val_acc : p.source_val_acc), colour,
                 pass == 1, 3.2);
      }
      // Legend: a label on two lines when long.
      s << "<line x1=\"" << lx << "\" y1=\"" << ly << "\" x2=\"" << lx + 22 << "\" y2=\"" << ly << "\" stroke=\""
        << colour << "\" stroke-width=\"2\"/>\n";
      marker(s, k, lx + 11, ly, colour, false, 3.2);
      std::string label = st_info.label;
      std::string second;
      if (label.size() > 24) {
        const std::size_t cut = label.rfind(' ', 24);
        if (cut != std::string::npos) {
          second = label.substr(cut + 1);
          label = label.substr(0, cut);
        }
      }
      s << "<text x=\"" << lx + 28 << "\" y=\"" << ly + 4 << "\" font-size=\"11\">" << xml(label) << "</text>\n";
      if (!second.empty()) {
        ly += 13;
        s << "<text x=\"" << lx + 28 << "\" y=\"" << ly + 4 << "\" font-size=\"11\">" << xml(second) << "</text>\n";
      }
      ly += 17;
      ++k;
    }
  }
  s << "</svg>\n";
}

void write_params_svg(const std::string& path, const Study& st, const std::vector<Summary>& sums) {
  // A dot plot, one row per strategy sorted by trainable parameters: left, the trainable
  // parameters (log axis); right, target test accuracy (filled) and source test accuracy after
  // adaptation (hollow), mean ± sd over seeds.
  std::vector<const Summary*> rows;
  for (const auto& s : sums) rows.push_back(&s);
  std::stable_sort(rows.begin(), rows.end(),
                   [](const Summary* a, const Summary* b) { return a->trainable < b->trainable; });
  double pmin = 1e18, pmax = 1, lo = 1, hi = 0;
  for (const Summary* r : rows) {
    pmin = std::min(pmin, static_cast<double>(std::max<Index>(r->trainable, 1)));
    pmax = std::max(pmax, static_cast<double>(r->trainable));
    for (const Stats* x : {&r->target, &r->source}) {
      if (x->n == 0) continue;
      const double sd = std::isnan(x->sd) ? 0.0 : x->sd;
      lo = std::min(lo, x->mean - sd);
      hi = std::max(hi, x->mean + sd);
    }
  }
  double pre = 0;
  for (const auto& p : st.pretrained) pre += p.source_acc / static_cast<double>(st.pretrained.size());
  hi = std::max(hi, pre);
  const auto y_range = zoom(lo - 0.01, hi + 0.01, 0.05);  // no marker on the frame
  const double y0 = y_range.first, y1 = y_range.second;  // plain names: the lambdas below use them
  const double row_h = 24, top = 80, label_w = 250;
  const double H = top + row_h * static_cast<double>(rows.size()) + 60, W = 1000;
  std::ofstream s(path);
  svg_open(s, W, H,
           "Accuracy and trainable parameters per strategy (mean ± sd over " + std::to_string(st.info.num_seeds) +
               " seed" + (st.info.num_seeds > 1 ? "s" : "") + ")",
           "rows sorted by trainable parameters; accuracy on the official test split at the validation-chosen rate");
  Box bp{label_w,
         top,
         230,
         row_h * static_cast<double>(rows.size()),
         std::pow(10.0, std::floor(std::log10(pmin))),
         std::pow(10.0, std::ceil(std::log10(pmax) + 1e-9)),
         0,
         1,
         true};
  if (bp.x1 <= bp.x0) bp.x1 = bp.x0 * 10;
  Box ba{label_w + 270, top, 440, bp.h, y0, y1, 0, 1};
  const double xstep = (y1 - y0) > 0.45 ? 0.1 : 0.05;
  // Frames, grids and axis labels.
  for (double x = bp.x0; x <= bp.x1 * 1.0001; x *= 10) {
    const int e = static_cast<int>(std::lround(std::log10(x)));
    s << "<line x1=\"" << bp.px(x) << "\" y1=\"" << top << "\" x2=\"" << bp.px(x) << "\" y2=\"" << top + bp.h
      << "\" stroke=\"#e6e6e6\"/>\n<text x=\"" << bp.px(x) << "\" y=\"" << top + bp.h + 15
      << "\" text-anchor=\"middle\" font-size=\"11\">"
      << (e < 3 ? std::to_string(static_cast<long long>(std::lround(x)))
                : (e < 6 ? std::to_string(static_cast<long long>(std::lround(x / 1000))) + "k"
                         : "1e" + std::to_string(e)))
      << "</text>\n";
  }
  for (double v = y0; v <= y1 + 1e-9; v += xstep)
    s << "<line x1=\"" << ba.px(v) << "\" y1=\"" << top << "\" x2=\"" << ba.px(v) << "\" y2=\"" << top + ba.h
      << "\" stroke=\"#e6e6e6\"/>\n<text x=\"" << ba.px(v) << "\" y=\"" << top + ba.h + 15
      << "\" text-anchor=\"middle\" font-size=\"11\">" << fmt("%.0f", 100 * v) << "</text>\n";
  for (const Box* b : {&bp, &ba})
    s << "<rect x=\"" << b->x << "\" y=\"" << b->y << "\" width=\"" << b->w << "\" height=\"" << b->h
      << "\" fill=\"none\" stroke=\"#333\"/>\n";
  s << "<text x=\"" << bp.x + bp.w / 2 << "\" y=\"" << top - 8
    << "\" text-anchor=\"middle\" font-size=\"12\">trainable parameters (log)</text>\n"
    << "<text x=\"" << ba.x + ba.w / 2 << "\" y=\"" << top - 8
    << "\" text-anchor=\"middle\" font-size=\"12\">test accuracy (%)</text>\n";
  // Reference: the pretrained network's source accuracy.
  s << "<line x1=\"" << ba.px(pre) << "\" y1=\"" << top << "\" x2=\"" << ba.px(pre) << "\" y2=\"" << top + ba.h
    << "\" stroke=\"#888\" stroke-width=\"1.5\" stroke-dasharray=\"2,3\"/>\n";
  for (std::size_t i = 0; i < rows.size(); ++i) {
    const Summary& r = *rows[i];
    const double y = top + row_h * (static_cast<double>(i) + 0.5);
    if (i % 2 == 1)
      s << "<rect x=\"8\" y=\"" << y - row_h / 2 << "\" width=\"" << W - 16 << "\" height=\"" << row_h
        << "\" fill=\"#000\" fill-opacity=\"0.035\"/>\n";
    s << "<text x=\"" << label_w - 10 << "\" y=\"" << y + 4 << "\" text-anchor=\"end\">" << xml(r.info->label)
      << "</text>\n";
    marker(s, 1, bp.px(static_cast<double>(std::max<Index>(r.trainable, 1))), y, "#555", false, 3.5);
    {
      // The count beside its marker, on the side with room.
      const double mx = bp.px(static_cast<double>(std::max<Index>(r.trainable, 1)));
      const bool left = mx > bp.x + bp.w * 0.6;
      s << "<text x=\"" << (left ? mx - 8 : mx + 8) << "\" y=\"" << y + 4 << "\" font-size=\"10\" fill=\"#555\""
        << (left ? " text-anchor=\"end\"" : "") << ">" << with_commas(r.trainable) << "</text>\n";
    }
    auto dot = [&](const Stats& x, const std::string& colour, bool hollow) {
      if (x.n == 0) return;
      if (!std::isnan(x.sd))
        s << "<line x1=\"" << ba.px(std::max(y0, x.mean - x.sd)) << "\" y1=\"" << y << "\" x2=\""
          << ba.px(std::min(y1, x.mean + x.sd)) << "\" y2=\"" << y << "\" stroke=\"" << colour
          << "\" stroke-width=\"2\"/>\n";
      marker(s, 0, ba.px(x.mean), y, colour, hollow, 4.5);
    };
    dot(r.source, "#d1495b", true);
    dot(r.target, "#1b6ca8", false);
  }
  const double ly = top + bp.h + 40;
  marker(s, 0, ba.x + 6, ly, "#1b6ca8", false, 4.5);
  s << "<text x=\"" << ba.x + 16 << "\" y=\"" << ly + 4 << "\" font-size=\"11\">target (new classes)</text>\n";
  marker(s, 0, ba.x + 150, ly, "#d1495b", true, 4.5);
  s << "<text x=\"" << ba.x + 160 << "\" y=\"" << ly + 4 << "\" font-size=\"11\">source after adaptation</text>\n"
    << "<line x1=\"" << ba.x + 310 << "\" y1=\"" << ly << "\" x2=\"" << ba.x + 332 << "\" y2=\"" << ly
    << "\" stroke=\"#888\" stroke-width=\"1.5\" stroke-dasharray=\"2,3\"/><text x=\"" << ba.x + 338 << "\" y=\""
    << ly + 4 << "\" font-size=\"11\">pretrained, source</text>\n";
  s << "</svg>\n";
}

std::vector<Summary> summaries(const Study& st) {
  std::vector<Summary> out;
  for (const auto& s : st.strategies) out.push_back(summarize(st, s));
  return out;
}

void print_main_table(std::ostream& out, const Study& st, const std::vector<Summary>& sums) {
  std::vector<double> pre;
  for (const auto& p : st.pretrained) pre.push_back(p.source_acc);
  const int seeds = st.info.num_seeds;
  out << "\npretrained: source test accuracy " << pm(stats(pre)) << " %"
      << (seeds > 1 ? " (mean ± sd over " + std::to_string(seeds) + " seeds)" : "") << '\n';
  out << '\n'
      << pad("strategy", 36) << pad("rate", 16) << pad("target %", 13, true) << pad("source %", 13, true)
      << pad("forget", 14, true) << pad("disabled", 10, true) << pad("trainable", 11, true) << pad("%", 7, true)
      << pad("ms/step", 16, true) << pad("peak", 6, true) << pad("+train", 8, true) << '\n'
      << pad("", 36) << pad("(chosen)", 16) << pad("", 13, true) << pad("after", 13, true) << pad("pts", 14, true)
      << pad("source %", 10, true) << pad("", 11, true) << pad("", 7, true) << pad("(cpu)", 16, true)
      << pad("MiB", 6, true) << pad("MiB", 8, true) << '\n'
      << std::string(150, '-') << '\n';
  for (const auto& r : sums) {
    out << pad(r.info->label, 36) << pad(r.rates, 16) << pad(pm(r.target), 13, true) << pad(pm(r.source), 13, true)
        << pad(r.forget.n ? pm(r.forget, 100.0, "%+.1f") : "-", 14, true)
        << pad(r.info->peft && r.disabled.n ? fmt("%.1f", 100 * r.disabled.mean) : "-", 10, true)
        << pad(with_commas(r.trainable), 11, true)
        << pad(fmt("%.2f", 100.0 * static_cast<double>(r.trainable) / static_cast<double>(std::max<Index>(r.total, 1))),
               7, true)
        << pad(std::isnan(r.ms_per_step) ? "-"
                                         : fmt("%.1f", r.ms_per_step) + " (" + fmt("%.1f", r.cpu_ms_per_step) + ")",
               9 + 7, true)
        << pad(r.peak_rss < 0 ? "n/a" : fmt("%.0f", static_cast<double>(r.peak_rss) / 1048576.0), 6, true)
        << pad(r.peak_rss_added < 0 ? "n/a" : fmt("%.1f", static_cast<double>(r.peak_rss_added) / 1048576.0), 8, true)
        << '\n';
  }
  out << std::string(150, '-') << '\n';
}

void print_diff_table(std::ostream& out, const Study& st, const std::vector<Summary>& sums) {
  const bool scratch = has_strategy(st, "scratch"), full = has_strategy(st, "full_ft");
  if (!scratch && !full) return;
  out << "\nPaired differences in target test accuracy (percentage points, same seed: same budget and pretraining;"
      << (st.info.num_seeds > 1
              ? " mean [95 % interval, Student's t over " + std::to_string(st.info.num_seeds) + " seeds]"
              : " one seed: no interval")
      << ")\n"
      << pad("strategy", 36) << pad("vs from scratch", 24, true) << pad("vs full FT", 24, true) << '\n'
      << std::string(84, '-') << '\n';
  for (const auto& r : sums)
    out << pad(r.info->label, 36) << pad(scratch ? diff_ci(r.d_scratch) : "", 24, true)
        << pad(full ? diff_ci(r.d_full) : "", 24, true) << '\n';
  out << std::string(84, '-') << '\n';
}

/// Under --full: every strategy at every rate it shares with full FT, target and forgetting.
void print_matched_table(std::ostream& out, const Study& st) {
  std::set<double> rates;
  bool any_untested = false;
  for (const auto& r : st.runs) {
    rates.insert(r.lr);
    any_untested = any_untested || !r.tested;
  }
  if (any_untested || !has_strategy(st, "full_ft")) return;
  out << "\nAt equal learning rates (every rate tested; target test accuracy and forgetting, mean over seeds; "
         "\"-\": rate not in the strategy's grid)\n"
      << pad("strategy", 36);
  for (double lr : rates) out << pad(format_lr(lr), 16, true);
  out << '\n' << std::string(36 + 16 * rates.size(), '-') << '\n';
  for (const auto& s : st.strategies) {
    out << pad(s.label, 36);
    for (double lr : rates) {
      std::vector<double> t, f;
      for (const auto& r : st.runs)
        if (r.info.id == s.id && r.lr == lr) {
          t.push_back(r.target_acc);
          if (r.source_measured) f.push_back(pretrained_source(st, r.seed) - r.source_acc);
        }
      std::string cell = "-";
      if (!t.empty()) {
        cell = fmt("%.1f", 100 * stats(t).mean);
        if (!f.empty()) cell += " / " + fmt("%+.1f", 100 * stats(f).mean);
      }
      out << pad(cell, 16, true);
    }
    out << '\n';
  }
  out << std::string(36 + 16 * rates.size(), '-') << "\ncells: target % / forgetting (points)\n";
}

}  // namespace

std::string format_lr(double lr) {
  // 3e-4, 1e-3, 3e-2 ...: one significant digit is all a grid has.
  const int e = static_cast<int>(std::floor(std::log10(lr) + 1e-9));
  const double m = lr / std::pow(10.0, e);
  return fmt("%.0f", m) + "e" + std::to_string(e);
}

void print_tables(std::ostream& out, const Study& st) {
  const auto sums = summaries(st);
  print_main_table(out, st, sums);
  out << "target / source %: 5-way test accuracy on the target / source classes (official test split), at the rate\n"
      << "chosen on the validation split for each seed (\"rate\": the chosen rates, ×n = chosen for n seeds);\n"
      << "mean ± sd over seeds. forget = pretrained source accuracy − source accuracy after adaptation (points).\n"
      << "disabled: source accuracy with the PEFT modules disabled. % = trainable / all parameters. ms/step = wall\n"
      << "(process CPU) milliseconds per optimizer step, training only. peak = peak resident memory while training\n"
      << "(the whole process: data set, frozen model, what earlier phases left resident); +train = that peak minus "
         "the\n"
      << "resident memory when training started, evaluation buffers already allocated: what training itself added\n"
      << "(max over seeds; n/a where the kernel cannot reset the high-water mark).\n";
  double worst = kNaN;
  for (const auto& r : sums)
    if (!std::isnan(r.disabled_max_diff))
      worst = std::isnan(worst) ? r.disabled_max_diff : std::max(worst, r.disabled_max_diff);
  if (!std::isnan(worst))
    out << "checked: with their modules disabled, the PEFT models' source logits differ from the pretrained model's by "
           "at most "
        << fmt("%g", worst) << (worst == 0.0 ? " (identical)" : "") << ".\n";
  print_diff_table(out, st, sums);
  print_matched_table(out, st);
}

std::vector<std::string> write_outputs(const std::string& dir, const Study& st) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) throw peft::IoError("--out \"" + dir + "\": cannot create the directory: " + ec.message());
  std::vector<std::string> written;
  const auto path = [&](const char* name) { return (fs::path(dir) / name).string(); };
  const auto open = [&](const char* name) {
    std::ofstream s(path(name));
    if (!s) throw peft::IoError("cannot write \"" + path(name) + "\"");
    written.push_back(path(name));
    return s;
  };
  {
    std::ofstream s = open("runs.csv");
    // The timing columns come last (the determinism test compares everything before them).
    s << "strategy,label,family,seed,lr,chosen,val_acc,tested,target_acc,source_acc,source_disabled,"
         "disabled_max_diff,pretrained_source_acc,trainable_params,total_params,steps,train_seconds,"
         "train_cpu_seconds,peak_rss_bytes,peak_rss_added_bytes\n";
    for (const auto& r : st.runs)
      s << r.info.id << ',' << csv_field(r.info.label) << ',' << csv_field(r.info.family) << ',' << r.seed << ','
        << format_lr(r.lr) << ',' << (r.chosen ? 1 : 0) << ',' << num(r.val_acc) << ',' << (r.tested ? 1 : 0) << ','
        << num(r.target_acc) << ',' << (r.source_measured ? num(r.source_acc) : "") << ',' << num(r.source_disabled)
        << ',' << (std::isnan(r.disabled_max_diff) ? "" : fmt("%g", r.disabled_max_diff)) << ','
        << num(pretrained_source(st, r.seed)) << ',' << r.trainable << ',' << r.total << ',' << r.steps << ','
        << fmt("%.3f", r.train_seconds) << ',' << fmt("%.3f", r.train_cpu_seconds) << ',' << r.peak_rss << ','
        << r.peak_rss_added << '\n';
  }
  const auto sums = summaries(st);
  {
    std::ofstream s = open("summary.csv");
    s << "strategy,label,family,seeds,chosen_rates,target_mean,target_sd,source_mean,source_sd,forget_mean,forget_sd,"
         "source_disabled_mean,diff_vs_scratch,diff_vs_scratch_ci95,diff_vs_full_ft,diff_vs_full_ft_ci95,"
         "trainable_params,trainable_percent,ms_per_step,cpu_ms_per_step,peak_rss_bytes,peak_rss_added_bytes\n";
    for (const auto& r : sums)
      s << r.info->id << ',' << csv_field(r.info->label) << ',' << csv_field(r.info->family) << ',' << r.target.n << ','
        << csv_field(r.rates) << ',' << num(r.target.mean) << ',' << num(r.target.sd) << ',' << num(r.source.mean)
        << ',' << num(r.source.sd) << ',' << num(r.forget.mean) << ',' << num(r.forget.sd) << ','
        << (r.info->peft ? num(r.disabled.mean) : "") << ',' << num(r.d_scratch.mean) << ',' << num(r.d_scratch.ci)
        << ',' << num(r.d_full.mean) << ',' << num(r.d_full.ci) << ',' << r.trainable << ','
        << fmt("%.4f", 100.0 * static_cast<double>(r.trainable) / static_cast<double>(std::max<Index>(r.total, 1)))
        << ',' << fmt("%.3f", r.ms_per_step) << ',' << fmt("%.3f", r.cpu_ms_per_step) << ',' << r.peak_rss << ','
        << r.peak_rss_added << '\n';
  }
  {
    std::ofstream s = open("curves.csv");
    s << "strategy,seed,lr,chosen,step,train_loss,target_val_acc,source_val_acc\n";
    for (const auto& p : st.pretrained)
      for (const auto& c : p.curve)
        s << "pretrain," << p.seed << ",1e-3,1," << c.step << ',' << fmt("%.5f", c.train_loss) << ",,"
          << fmt("%.4f", c.val_acc) << '\n';
    for (const auto& r : st.runs)
      for (const auto& c : r.curve)
        s << r.info.id << ',' << r.seed << ',' << format_lr(r.lr) << ',' << (r.chosen ? 1 : 0) << ',' << c.step << ','
          << fmt("%.5f", c.train_loss) << ',' << fmt("%.4f", c.val_acc) << ','
          << (c.source_val_acc >= 0 ? fmt("%.4f", c.source_val_acc) : "") << '\n';
  }
  {
    std::ofstream s = open("run.txt");
    s << "data: " << st.info.data << "\nsplit: " << st.info.split << "\nmodel: " << st.info.net
      << "\ncommand: " << st.info.command_line << "\nbudget: " << st.info.budget << " labelled images, validation "
      << st.info.val << "\nsteps: " << st.info.steps << "\nseeds: " << st.info.num_seeds
      << "\nthreads: " << st.info.threads << '\n';
    for (const auto& p : st.pretrained)
      s << "seed " << p.seed << ": pretrained source test accuracy " << fmt("%.4f", p.source_acc) << " ("
        << fmt("%.1f", p.seconds) << " s)\n";
    print_tables(s, st);
  }
  write_curves_svg(path("curves.svg"), st);
  written.push_back(path("curves.svg"));
  write_params_svg(path("accuracy_vs_params.svg"), st, sums);
  written.push_back(path("accuracy_vs_params.svg"));
  return written;
}

std::vector<std::string> check_results(const Study& st) {
  constexpr double kChance = 1.0 / kTaskClasses;
  constexpr double kMargin = 0.05;
  std::vector<std::string> fails;
  for (const auto& p : st.pretrained)
    if (!(p.source_acc > kChance + kMargin))
      fails.push_back("seed " + std::to_string(p.seed) + ": pretrained source accuracy " + fmt("%.3f", p.source_acc) +
                      " is not above chance");
  for (const auto& s : st.strategies) {
    const auto runs = chosen_runs(st, s.id);
    if (static_cast<int>(runs.size()) != st.info.num_seeds)
      fails.push_back(s.id + ": " + std::to_string(runs.size()) + " chosen runs, expected one per seed (" +
                      std::to_string(st.info.num_seeds) + ")");
    for (const RunResult* r : runs) {
      const std::string who = s.id + " (seed " + std::to_string(r->seed) + ", lr " + format_lr(r->lr) + ")";
      if (!r->tested) fails.push_back(who + ": chosen run not tested");
      if (!(r->target_acc > kChance + kMargin))
        fails.push_back(who + ": target accuracy " + fmt("%.3f", r->target_acc) + " is not above chance (0.2 + 0.05)");
      if (r->source_measured && !(r->source_acc > kChance + kMargin))
        fails.push_back(who + ": source accuracy after adaptation " + fmt("%.3f", r->source_acc) +
                        " is not above chance (0.2 + 0.05)");
      if (r->trainable <= 0 || r->trainable > r->total)
        fails.push_back(who + ": trainable parameters " + std::to_string(r->trainable) + " not in (0, " +
                        std::to_string(r->total) + "]");
      if (r->curve.empty()) fails.push_back(who + ": no learning curve");
      if (s.peft && !(r->disabled_max_diff == 0.0))
        fails.push_back(who + ": with its modules disabled the source logits differ from the pretrained model's by " +
                        fmt("%g", r->disabled_max_diff));
    }
  }
  return fails;
}

}  // namespace study
