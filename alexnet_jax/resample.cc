// AlexnetBilinearResample: bilinear resampling of an (H, W, C) uint8 image
// at a regular grid of sampling points, straight to uint8 (rounded) or
// float32. The train augmentation's resample of the decoded crop window
// (alexnet_jax/preprocess.py, decode_crop_resize); built and loaded by
// alexnet_jax/native.py.
//
// Output pixel (i, j) samples the image at row y0 + i * dy, column
// x0 + j * dx (pixel-index units: pixel k's centre is at k), each clamped to
// the image, with the weights of tf.image.crop_and_resize's bilinear filter.
// TensorFlow's CropAndResize does the same in float32 for every output value
// with its four taps; here one row of vertically interpolated values is made
// per output row and the horizontal taps are precomputed per column, and the
// uint8 output is written directly (rounded half up, as
// tf.cast(x + 0.5, tf.uint8)), an RGB pixel per SSE2 vector where the
// compiler targets it (every x86-64): ~5x less time per crop.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#ifdef __SSE2__
#include <emmintrin.h>
#endif

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace {

using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;

inline void Store(float v, uint8_t* out) {
  // v is a convex combination of uint8 values: 0 <= v + 0.5 < 256.
  *out = static_cast<uint8_t>(static_cast<int32_t>(v + 0.5f));
}
inline void Store(float v, float* out) { *out = v; }

template <typename T>
class BilinearResampleOp : public OpKernel {
 public:
  explicit BilinearResampleOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("height", &out_h_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("width", &out_w_));
    OP_REQUIRES(ctx, out_h_ > 0 && out_w_ > 0,
                absl::InvalidArgumentError("height and width must be > 0"));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& image = ctx->input(0);
    const Tensor& grid = ctx->input(1);
    OP_REQUIRES(ctx, image.dims() == 3,
                absl::InvalidArgumentError(absl::StrCat(
                    "image must be (height, width, channels), got ",
                    image.shape().DebugString())));
    OP_REQUIRES(ctx, grid.NumElements() == 4,
                absl::InvalidArgumentError(
                    "grid must hold 4 values (y0, dy, x0, dx)"));
    const int64_t h = image.dim_size(0), w = image.dim_size(1);
    const int64_t c = image.dim_size(2);
    OP_REQUIRES(ctx, h > 0 && w > 0 && c > 0,
                absl::InvalidArgumentError(absl::StrCat(
                    "empty image: ", image.shape().DebugString())));
    const auto g = grid.flat<float>();
    for (int k = 0; k < 4; ++k) {
      OP_REQUIRES(ctx, std::isfinite(g(k)),
                  absl::InvalidArgumentError("grid values must be finite"));
    }
    Tensor* output = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(
                            0, TensorShape({out_h_, out_w_, c}), &output));
    const uint8_t* in = image.flat<uint8_t>().data();
    T* out = output->flat<T>().data();

    // Horizontal taps of output value m = j * c + ch: columns left[j] and
    // right[j] (offsets into a row of the window [lo, hi]), weight xw[j].
    const int64_t row_len = int64_t{out_w_} * c;
    std::vector<int32_t> left(row_len), right(row_len);
    std::vector<float> xw(row_len);
    int64_t lo = w - 1, hi = 0;
    std::vector<int64_t> a(out_w_);
    for (int j = 0; j < out_w_; ++j) {
      const float x = std::min(std::max(g(2) + j * g(3), 0.0f),
                               static_cast<float>(w - 1));
      a[j] = static_cast<int64_t>(std::floor(x));
      lo = std::min(lo, a[j]);
      hi = std::max(hi, std::min(a[j] + 1, w - 1));
      for (int64_t ch = 0; ch < c; ++ch) xw[j * c + ch] = x - a[j];
    }
    for (int j = 0; j < out_w_; ++j) {
      for (int64_t ch = 0; ch < c; ++ch) {
        left[j * c + ch] = static_cast<int32_t>((a[j] - lo) * c + ch);
        right[j * c + ch] =
            static_cast<int32_t>((std::min(a[j] + 1, w - 1) - lo) * c + ch);
      }
    }

    // Per output row: the two source rows' columns [lo, hi] interpolated
    // vertically (contiguous), then each output value from its two taps.
    const int64_t span = (hi - lo + 1) * c;
    std::vector<float> rowbuf(span + 1);  // + 1: a 4-lane load's padding.
    for (int i = 0; i < out_h_; ++i) {
      const float y = std::min(std::max(g(0) + i * g(1), 0.0f),
                               static_cast<float>(h - 1));
      const int64_t top = static_cast<int64_t>(std::floor(y));
      const int64_t bottom = std::min(top + 1, h - 1);
      const float yw = y - top;
      const uint8_t* __restrict r0 = in + (top * w + lo) * c;
      const uint8_t* __restrict r1 = in + (bottom * w + lo) * c;
      float* __restrict v = rowbuf.data();
      for (int64_t k = 0; k < span; ++k) {
        const float t = r0[k];
        v[k] = t + (static_cast<float>(r1[k]) - t) * yw;
      }
      T* __restrict o = out + i * row_len;
      if (c == 3) {  // RGB: one pair of taps and one weight per pixel.
        int j = 0;
#ifdef __SSE2__
        if constexpr (std::is_same_v<T, uint8_t>) {
          // The pixel's three values in one 4-lane vector (the 4th lane is
          // the next pixel's or rowbuf's padding); the 4 bytes stored end
          // on the next pixel's first byte, which its own store rewrites.
          // The same float operations as below: the same results.
          const __m128 half = _mm_set1_ps(0.5f);
          for (; j < out_w_ - 1; ++j) {
            const __m128 p = _mm_loadu_ps(v + left[j * 3]);
            const __m128 q = _mm_loadu_ps(v + right[j * 3]);
            const __m128 r = _mm_add_ps(
                p, _mm_mul_ps(_mm_sub_ps(q, p), _mm_set1_ps(xw[j * 3])));
            __m128i k = _mm_cvttps_epi32(_mm_add_ps(r, half));
            k = _mm_packs_epi32(k, k);
            k = _mm_packus_epi16(k, k);
            const int32_t bytes = _mm_cvtsi128_si32(k);
            std::memcpy(o + j * 3, &bytes, 4);
          }
        }
#endif
        for (; j < out_w_; ++j) {
          const float* p = v + left[j * 3];
          const float* q = v + right[j * 3];
          const float f = xw[j * 3];
          Store(p[0] + (q[0] - p[0]) * f, o + j * 3);
          Store(p[1] + (q[1] - p[1]) * f, o + j * 3 + 1);
          Store(p[2] + (q[2] - p[2]) * f, o + j * 3 + 2);
        }
        continue;
      }
      const int32_t* __restrict li = left.data();
      const int32_t* __restrict ri = right.data();
      const float* __restrict wx = xw.data();
      for (int64_t m = 0; m < row_len; ++m) {
        const float p = v[li[m]];
        Store(p + (v[ri[m]] - p) * wx[m], o + m);
      }
    }
  }

 private:
  int out_h_, out_w_;
};

}  // namespace

REGISTER_OP("AlexnetBilinearResample")
    .Input("image: uint8")
    .Input("grid: float")
    .Attr("height: int")
    .Attr("width: int")
    .Attr("out_type: {uint8, float} = DT_UINT8")
    .Output("output: out_type")
    .SetShapeFn([](::tensorflow::shape_inference::InferenceContext* ctx) {
      ::tensorflow::shape_inference::ShapeHandle image;
      TF_RETURN_IF_ERROR(ctx->WithRank(ctx->input(0), 3, &image));
      int height, width;
      TF_RETURN_IF_ERROR(ctx->GetAttr("height", &height));
      TF_RETURN_IF_ERROR(ctx->GetAttr("width", &width));
      ctx->set_output(0, ctx->MakeShape({height, width, ctx->Dim(image, 2)}));
      return ::absl::OkStatus();
    })
    .Doc("Bilinear resample of an (H, W, C) uint8 image at rows "
         "y0 + i * dy, columns x0 + j * dx (grid = [y0, dy, x0, dx]).");

REGISTER_KERNEL_BUILDER(Name("AlexnetBilinearResample")
                            .Device(::tensorflow::DEVICE_CPU)
                            .TypeConstraint<uint8_t>("out_type"),
                        BilinearResampleOp<uint8_t>);
REGISTER_KERNEL_BUILDER(Name("AlexnetBilinearResample")
                            .Device(::tensorflow::DEVICE_CPU)
                            .TypeConstraint<float>("out_type"),
                        BilinearResampleOp<float>);
