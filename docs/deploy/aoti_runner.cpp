// Run an AOTInductor package of a detrkit detector from C++ (libtorch, no Python).
//
//   aoti_runner MODEL_AOTI.PT2 DETRKIT_C.SO IMAGE.RAW HEIGHT WIDTH
//
// IMAGE.RAW: 3 * HEIGHT * WIDTH bytes, RGB planes (channels first), already resized to the
// network input size. Prints one line per detection: label score x0 y0 x1 y1.
//
// The package calls detrkit::ms_deform_attn_forward through the PyTorch dispatcher, so the
// library that registers that op (detrkit/_C*.so, built against the same libtorch) is loaded
// before the package.
#include <dlfcn.h>

#include <cstdlib>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <vector>

#include <ATen/ATen.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

int main(int argc, char** argv) {
  if (argc != 6) {
    std::cerr << "usage: " << argv[0] << " MODEL_AOTI.PT2 DETRKIT_C.SO IMAGE.RAW HEIGHT WIDTH\n";
    return 2;
  }
  // RTLD_LAZY: the extension's only Python symbol (its module init) is never called here
  if (dlopen(argv[2], RTLD_LAZY | RTLD_GLOBAL) == nullptr) {
    std::cerr << "cannot load " << argv[2] << ": " << dlerror() << "\n";
    return 1;
  }
  const int64_t height = std::atoll(argv[4]);
  const int64_t width = std::atoll(argv[5]);
  // images: (1, 3, H, W) uint8 RGB; normalization is inside the package
  at::Tensor images = at::empty({1, 3, height, width}, at::kByte);
  std::ifstream raw(argv[3], std::ios::binary);
  raw.read(reinterpret_cast<char*>(images.data_ptr<uint8_t>()), images.numel());
  if (raw.gcount() != images.numel()) {
    std::cerr << argv[3] << " holds fewer than 3 * " << height << " * " << width << " bytes\n";
    return 1;
  }

  torch::inductor::AOTIModelPackageLoader loader(argv[1]);
  std::vector<at::Tensor> outputs = loader.run({images});
  at::Tensor boxes = outputs[0].contiguous();   // (N, K, 4) float xyxy, input pixels
  at::Tensor scores = outputs[1].contiguous();  // (N, K) float, best first
  at::Tensor labels = outputs[2].contiguous();  // (N, K) int64
  const float* box = boxes.data_ptr<float>();
  const float* score = scores.data_ptr<float>();
  const int64_t* label = labels.data_ptr<int64_t>();
  std::cout << std::setprecision(9);
  for (int64_t k = 0; k < scores.size(1); ++k) {
    std::cout << label[k] << " " << score[k] << " " << box[4 * k] << " " << box[4 * k + 1]
              << " " << box[4 * k + 2] << " " << box[4 * k + 3] << "\n";
  }
  return 0;
}
