#pragma once
// Shared by the tests of peft/meta: the float64 torch fixture (benchmarks/peer/make_meta_fixtures.py)
// and the tiny MLP it describes.
#include <cstdlib>
#include <fstream>
#include <map>
#include <sstream>
#include <string>

#include <peft/core/types.hpp>
#include <peft/layers/activations.hpp>
#include <peft/layers/linear.hpp>
#include <peft/loss/mse.hpp>
#include <peft/meta/maml.hpp>

namespace peft::test::meta {

inline std::string meta_data_dir() {
  if (const char* d = std::getenv("PEFT_TEST_DATA")) return d;
  std::string here = __FILE__;
  here = here.substr(0, here.find_last_of('/'));
  return here.substr(0, here.find_last_of('/')) + "/data";
}

/// "name rows cols values..." per line; '#' lines are comments.
inline std::map<std::string, Matrix<double>> read_meta_fixture() {
  std::ifstream f(meta_data_dir() + "/meta/meta_fixture.txt");
  if (!f) throw std::runtime_error("cannot open " + meta_data_dir() + "/meta/meta_fixture.txt");
  std::map<std::string, Matrix<double>> out;
  std::string line;
  while (std::getline(f, line)) {
    if (line.empty() || line[0] == '#') continue;
    std::istringstream in(line);
    std::string name;
    Index rows = 0, cols = 0;
    in >> name >> rows >> cols;
    Matrix<double> m(rows, cols);
    for (Index i = 0; i < rows; ++i)
      for (Index j = 0; j < cols; ++j) in >> m(i, j);
    out[name] = m;
  }
  return out;
}

/// y = fc2(tanh(fc1(x))), MSE loss, with a support and a query set: the task of the fixture.
struct MetaTinyTask {
  Linear<double> fc1, fc2;
  Matrix<double> xs, ys, xq, yq;
  Linear<double>::Cache c1, c2;
  Matrix<double> z1, h1, out, dout, dh, dz;

  explicit MetaTinyTask(const std::map<std::string, Matrix<double>>& fx)
      : fc1(fx.at("w1"), fx.at("b1")),
        fc2(fx.at("w2"), fx.at("b2")),
        xs(fx.at("xs")),
        ys(fx.at("ys")),
        xq(fx.at("xq")),
        yq(fx.at("yq")) {
    fc1.bias.set_trainable(false);  // outside the meta-learned subset
  }

  std::vector<NamedParameter<double>> subset() {
    return {{"fc1.weight", &fc1.weight}, {"fc2.weight", &fc2.weight}, {"fc2.bias", &fc2.bias}};
  }

  double operator()(MetaSplit split) {
    const Matrix<double>& x = split == MetaSplit::support ? xs : xq;
    const Matrix<double>& y = split == MetaSplit::support ? ys : yq;
    fc1.forward(x, z1, c1);
    activation_forward<double>(Activation::Tanh, z1, h1);
    fc2.forward(h1, out, c2);
    const double l = mse<double>(out, y, &dout);
    fc2.backward(c2, dout, &dh);
    activation_backward<double>(Activation::Tanh, z1, dh, dz);
    fc1.backward(c1, dz, nullptr);
    return l;
  }
};

}  // namespace peft::test::meta
