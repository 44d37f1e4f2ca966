// Weight and activation quantization: the one definition that the CPU kernels compute and the CUDA
// kernels reproduce (the CPU backend is the GPU's oracle).
//
// int8wo  weights INT8, symmetric, one fp32 scale per output channel:
//           amax = max |w[n, :]|, scale[n] = amax / 127, q = clamp(rne(w * (127 / amax)), -127, 127)
//           (a zero row gets scale 1 and q = 0).
//         activations stay 16-bit: x is rounded to act_dtype (BF16 or F16) before the products.
//         out[m, n] = (sum_k x16[m, k] * q[n, k], fp32 accumulation) * scale[n]
// fp8     weights FP8 E4M3 with one fp32 scale per tensor: amax over the tensor, scale = amax / 448,
//           q = fp8(w * (448 / amax)) (saturating, round to nearest even, as cuda_fp8.h).
//         activations FP8 E4M3 with a dynamic per-token scale, computed the same way per row of x.
//         out[m, n] = (sum_k fp8(x)[m, k] * q[n, k], fp32 accumulation) * (x_scale[m] * w_scale)
// Products of these formats are exact in fp32, so the backends differ only in summation order.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "engine/tensor.h"
#include "llmq.h"

namespace llmq {

enum class QuantMode { None, Int8WeightOnly, Fp8 };
const char* quant_mode_name(QuantMode mode);

// A linear layer's weight as the kernels see it.
struct LinearWeight {
  Tensor w;                     // [N, K]: F32/F16/BF16 as loaded, or I8 / F8_E4M3
  Tensor scale;                 // F32 [1, N] (per channel) or [1, 1] (per tensor); empty unless quantized
  DType act_dtype = DType::F32; // I8 weights: the 16-bit type activations are rounded to
  Tensor input_scale;           // F8_E4M3 weights: F32 [1, 1] static activation scale; empty = dynamic per token
  int32_t layer = -1;           // the transformer layer, for the saturation counters
  bool quantized() const { return w.dtype == DType::I8 || w.dtype == DType::F8_E4M3; }
};

// Saturation counters, per layer: values clipped to +-448 by a static FP8 scale. Dynamic scales
// (INT8 KV, per-token FP8 activations) cannot clip and count nothing.
enum SaturationCounter {
  kActivationsClipped,  // FP8 activation values beyond +-448 after their static input scale
  kActivationsStatic,   // activation values quantized with a static scale
  kKClipped,            // K values beyond +-448 after the layer's FP8 KV scale
  kVClipped,
  kKvStatic,            // K (and as many V) values written to an FP8 cache
  kSaturationCounters
};

// Host storage of one quantized weight.
struct QuantizedWeight {
  std::vector<uint8_t> data;  // I8 or F8_E4M3 codes, [N, K]
  std::vector<float> scale;
  LinearWeight view(DType act_dtype);
  DType dtype = DType::I8;
  int64_t rows = 0, cols = 0;
};

// Quantizes a [N, K] F32/F16/BF16 weight; rows are split over `n_threads` threads.
QuantizedWeight quantize_weight(const Tensor& w, QuantMode mode, int n_threads);
// The amax the scales come from: one per row (int8wo) or one for the tensor (fp8).
std::vector<float> weight_amax(const Tensor& w, QuantMode mode, int n_threads);
// quantize_weight with the amax given. Tensor parallelism passes the max over the ranks' slices,
// so that a shard gets exactly the codes and scales of the unsharded weight.
QuantizedWeight quantize_weight(const Tensor& w, QuantMode mode, int n_threads, const std::vector<float>& amax);

// Rounds an fp32 value to the 16-bit activation type and back (F32: unchanged).
float round_activation(float x, DType act_dtype);

// Per-token FP8 activation quantization of one row: returns the row's scale and writes the
// dequantized-exact code values (fp8 decoded to fp32, before scaling) to out.
float quantize_row_fp8(const float* x, int64_t n, float* out);
// The same with the row's amax given (tensor parallelism: the max over the ranks' slices of the row).
float quantize_row_fp8(const float* x, int64_t n, float amax, float* out);
// The same with a static scale: codes fp8(x * (1 / scale)); returns how many values were clipped
// (|x / scale| beyond 448).
int64_t quantize_row_fp8_static(const float* x, int64_t n, float scale, float* out);

}  // namespace llmq
