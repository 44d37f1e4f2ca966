// Writing pre-quantized checkpoints in the conventions vLLM reads, from a loaded 16/32-bit model.
// The weights are quantized exactly as the engine's quantize-on-load does (engine/quant.h), so a
// saved checkpoint generates bit-identically to quantizing at load time.
//
//   fp8     "quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic"|"static"}
//           *.weight F8_E4M3, *.weight_scale F32 [] (per tensor); with calibration also
//           *.input_scale F32 [] (static activations) and self_attn.k_scale / v_scale F32 [] (FP8 KV).
//   int8wo  compressed-tensors, "int-quantized": *.weight I8 with *.weight_scale F32 [N, 1]; with
//           calibration also the k_scale / v_scale of an FP8 KV cache.
// Used by llmq-quantize (with calibration) and llmq-synth --quant.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <utility>

#include "engine/model.h"
#include "engine/quant.h"

namespace llmq {

// amax per (layer, site) over calibration tokens: sites "attn_in", "o_in", "mlp_in", "down_in"
// (inputs of the linear layers) and "k", "v" (the cache rows), as Engine::set_observer names them.
using CalibrationAmax = std::map<std::pair<int32_t, std::string>, float>;

struct QuantizedCheckpointSummary {
  size_t tensors = 0;
  std::string calibration;  // per-layer amax lines when calibrated, else ""
};

// Writes `model` (loaded from a 16/32-bit checkpoint in model.dir()) quantized in `mode` to
// `out_dir`: model.safetensors, config.json with its quantization_config, and the generation and
// tokenizer files copied. `amax` null: no static scales (fp8 activations dynamic, no KV scales).
// Throws LLMQ_ERR_INVALID_ARGUMENT for a checkpoint quantized already or mode None, LLMQ_ERR_IO
// when the files cannot be written.
QuantizedCheckpointSummary write_quantized_checkpoint(const Model& model, const std::string& out_dir, QuantMode mode,
                                                      const CalibrationAmax* amax, int threads);

}  // namespace llmq
