// The loaders' CPU rendering in one pass: uint8 HWC images and their windows to float32 CHW
// (imagenet_prep/render.py, `render_into`). Per output element, in float32 and in this order:
//     ((float(image[y, x, c]) - mean[c, y, x]) - shift[c]) * inv_std[c]
// at the window's (y, x), the columns mirrored where the window is flipped: numpy's
// `render.render_one`, operation for operation (compiled with -ffp-contract=off, so no
// fused multiply-add changes a bit). The (image, window, channel) planes are split over as
// many threads as torch's (at::get_num_threads), started for the call and joined: not
// at::parallel_for, whose OpenMP threads spin after each call, taking from the DALI
// decoder threads beside them the CPU they wait with (a third of the loader's images/s
// on 2 cores). A row is computed forward (vectorised) and reversed when flipped.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <stdexcept>
#include <algorithm>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

namespace py = pybind11;

namespace {

constexpr int64_t MAX_CROP = 4096;

void render_plane(const uint8_t* image, int64_t width, const float* mean, int64_t mean_width, int64_t ox,
                  int64_t oy, int64_t mx, int64_t my, bool flip, int64_t crop, int channel, float shift,
                  const float* inv_std, float* out) {
  float row_buffer[MAX_CROP];
  for (int64_t y = 0; y < crop; ++y) {
    const uint8_t* in = image + ((oy + y) * width + ox) * 3 + channel;
    float* o = out + y * crop;
    float* t = flip ? row_buffer : o;
    if (mean) {
      const float* m = mean + (my + y) * mean_width + mx;
      for (int64_t x = 0; x < crop; ++x) t[x] = (static_cast<float>(in[3 * x]) - m[x]) - shift;
    } else {
      for (int64_t x = 0; x < crop; ++x) t[x] = static_cast<float>(in[3 * x]) - shift;
    }
    if (flip) {
      for (int64_t x = 0; x < crop; ++x) o[x] = t[crop - 1 - x];
    }
    if (inv_std) {
      const float scale = inv_std[channel];
      for (int64_t x = 0; x < crop; ++x) o[x] *= scale;
    }
  }
}

template <typename T>
const T* data_of(const py::buffer_info& info, const char* name, const std::vector<int64_t>& shape) {
  if (info.itemsize != sizeof(T) || static_cast<int64_t>(info.ndim) != static_cast<int64_t>(shape.size())) {
    throw std::invalid_argument(std::string(name) + ": wrong dtype or number of dimensions");
  }
  int64_t stride = sizeof(T);
  for (int64_t d = info.ndim - 1; d >= 0; --d) {
    if (shape[d] >= 0 && info.shape[d] != shape[d]) throw std::invalid_argument(std::string(name) + ": wrong shape");
    if (info.shape[d] > 1 && info.strides[d] != stride) {
      throw std::invalid_argument(std::string(name) + ": not C-contiguous");
    }
    stride *= info.shape[d];
  }
  return static_cast<const T*>(info.ptr);
}

// out (B, K, 3, c, c) float32; images (B, H, W, 3) uint8; windows (B, K, 3) int64
// (offset_x, offset_y, flip); shifts (B, 3) float32; mean (3, S, S) float32 or None;
// inv_std (3,) float32 or None (all ones); mean_at (B, K, 2) int64 or None: where each
// window's mean window is, when the images are windows decoded alone (default: the window's
// own offsets).
void render(py::buffer out, py::buffer images, py::buffer windows, py::buffer shifts, py::object mean,
            py::object inv_std, py::object mean_at) {
  py::buffer_info out_info = out.request(true);
  if (out_info.ndim != 5) throw std::invalid_argument("out: (B, K, 3, c, c) float32 expected");
  const int64_t batch = out_info.shape[0], crops = out_info.shape[1], crop = out_info.shape[3];
  if (out_info.shape[2] != 3 || out_info.shape[4] != crop || crop > MAX_CROP) {
    throw std::invalid_argument("out: (B, K, 3, c, c) float32 expected");
  }
  float* o = const_cast<float*>(data_of<float>(out_info, "out", {batch, crops, 3, crop, crop}));
  py::buffer_info image_info = images.request();
  const uint8_t* image = data_of<uint8_t>(image_info, "images", {batch, -1, -1, 3});
  const int64_t height = image_info.shape[1], width = image_info.shape[2];
  py::buffer_info window_info = windows.request();
  const int64_t* window = data_of<int64_t>(window_info, "windows", {batch, crops, 3});
  py::buffer_info shift_info = shifts.request();
  const float* shift = data_of<float>(shift_info, "shifts", {batch, 3});
  py::buffer_info mean_info, inv_info;
  const float* m = nullptr;
  int64_t mean_height = 0, mean_width = 0;
  if (!mean.is_none()) {
    mean_info = py::buffer(mean).request();
    m = data_of<float>(mean_info, "mean", {3, -1, -1});
    mean_height = mean_info.shape[1], mean_width = mean_info.shape[2];
  }
  const float* inv = nullptr;
  if (!inv_std.is_none()) {
    inv_info = py::buffer(inv_std).request();
    inv = data_of<float>(inv_info, "inv_std", {3});
  }
  py::buffer_info at_info;
  const int64_t* at = nullptr;
  if (!mean_at.is_none()) {
    at_info = py::buffer(mean_at).request();
    at = data_of<int64_t>(at_info, "mean_at", {batch, crops, 2});
  }
  for (int64_t i = 0; i < batch * crops; ++i) {  // every window inside its image (and the mean image)
    const int64_t ox = window[3 * i], oy = window[3 * i + 1];
    const int64_t mx = at ? at[2 * i] : ox, my = at ? at[2 * i + 1] : oy;
    if (ox < 0 || oy < 0 || ox + crop > width || oy + crop > height ||
        (m && (mx < 0 || my < 0 || mx + crop > mean_width || my + crop > mean_height))) {
      throw std::out_of_range("a window reaches outside its image");
    }
  }
  py::gil_scoped_release no_gil;
  const int64_t planes = batch * crops * 3;
  auto run = [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t b = plane / (crops * 3), k = (plane / 3) % crops;
      const int channel = static_cast<int>(plane % 3);
      const int64_t* w = window + (b * crops + k) * 3;
      const int64_t* a = at ? at + (b * crops + k) * 2 : w;
      render_plane(image + b * height * width * 3, width, m ? m + channel * mean_height * mean_width : nullptr,
                   mean_width, w[0], w[1], a[0], a[1], w[2] != 0, crop, channel, shift[b * 3 + channel], inv,
                   o + plane * crop * crop);
    }
  };
  // At least 16 planes a thread: starting one costs tens of microseconds, a plane of 224
  // about 15 (a batch of 64 uses at most 12 threads on a large machine); this thread takes
  // the first share.
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), planes / 16));
  std::vector<std::thread> helpers;
  helpers.reserve(threads);
  const int64_t share = (planes + threads - 1) / threads;
  for (int64_t t = 1; t < threads; ++t) {
    const int64_t begin = std::min(planes, t * share), end = std::min(planes, begin + share);
    if (begin >= end) continue;
    try {
      helpers.emplace_back(run, begin, end);
    } catch (const std::system_error&) {  // no thread to be had (a process limit): this one does it
      run(begin, end);
    }
  }
  run(0, std::min(planes, share));
  for (auto& helper : helpers) helper.join();
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("render", &render, "uint8 HWC images and their windows to float32 (B, K, 3, c, c)", py::arg("out"),
             py::arg("images"), py::arg("windows"), py::arg("shifts"), py::arg("mean"), py::arg("inv_std"),
             py::arg("mean_at") = py::none());
}
