// A downstream program on peft::io: reads a safetensors file written by the reference implementation
// (argv[1]: tests/data/small.safetensors), writes a layer's weight and reads it back; with peft::idx,
// the IDX reader links against zlib and reports a missing file.
#include <peft/io/safetensors.hpp>
#include <peft/peft.hpp>
#ifdef PEFT_CONSUMER_IDX
#include <peft/io/idx.hpp>
#endif

#include <cstdio>
#include <string>

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: consumer_io <small.safetensors> <scratch dir>\n");
    return 2;
  }
  const peft::io::SafeTensorsFile f(argv[1]);
  const peft::Matrix<double> w = f.load<double>("w");
  bool ok = w.rows() == 2 && w.cols() == 3 && f.metadata().at("format") == "pt";
  for (peft::Index i = 0; ok && i < 6; ++i) ok = w(i / 3, i % 3) == static_cast<double>(i) - 2.5;

  peft::Rng rng(3);
  peft::Linear<float> layer(4, 5, rng, true, "proj");
  const std::string out = std::string(argv[2]) + "/consumer_io.safetensors";
  peft::io::save_safetensors<float>(out, {{"proj.weight", peft::io::matrix_shape(5, 4), layer.weight.value.data()}});
  ok = ok && peft::io::SafeTensorsFile(out).load<float>("proj.weight") == layer.weight.value;

#ifdef PEFT_CONSUMER_IDX
  try {
    (void)peft::read_idx(std::string(argv[2]) + "/missing-idx1-ubyte.gz");
    ok = false;
  } catch (const peft::IoError&) {
  }
#endif
  std::printf("peft::io consumer: %s\n", ok ? "ok" : "FAILED");
  return ok ? 0 : 1;
}
