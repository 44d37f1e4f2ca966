#include "engine/engine.h"

#include <algorithm>
#include <chrono>
#include <thread>
#include <cmath>
#include <unordered_set>

#include "engine/device.h"
#include "engine/error.h"

namespace llmq {

namespace {

const float kUnitScale = 1.0f;

using Clock = std::chrono::steady_clock;

double seconds_between(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }

// K and V for every layer, with the per-token scales of an INT8 cache.
uint64_t kv_bytes_per_block(const ModelConfig& c, int32_t block_size, DType kv_dtype) {
  const uint64_t per_head = uint64_t(c.head_dim) * dtype_size(kv_dtype) + (kv_dtype == DType::I8 ? sizeof(float) : 0);
  return uint64_t(c.num_layers) * 2 * uint64_t(c.num_kv_heads) * uint64_t(block_size) * per_head;
}

int32_t kv_num_blocks(const ModelConfig& c, const EngineOptions& o, DType kv_dtype) {
  if (o.kv_block_size < 1 || o.kv_block_size > 1024)
    fail(LLMQ_ERR_INVALID_ARGUMENT, "engine params: kv_block_size must be in [1, 1024], got {}", o.kv_block_size);
  if (o.max_batch_tokens < 1 || o.max_batch_tokens > 65536)
    fail(LLMQ_ERR_INVALID_ARGUMENT, "engine params: max_batch_tokens must be in [1, 65536], got {}", o.max_batch_tokens);
  if (o.n_threads < 0 || o.n_threads > 1024)
    fail(LLMQ_ERR_INVALID_ARGUMENT, "engine params: n_threads must be in [0, 1024], got {}", o.n_threads);
  uint64_t per_block = kv_bytes_per_block(c, o.kv_block_size, kv_dtype);
  uint64_t bytes = o.kv_cache_bytes;
  if (bytes == 0) {
    uint64_t full_context = uint64_t((c.max_position + o.kv_block_size - 1) / o.kv_block_size) * per_block;
    bytes = std::min(full_context, std::max(kDefaultKvCacheBytes / per_block, uint64_t(1)) * per_block);
  }
  uint64_t blocks = bytes / per_block;
  if (blocks < 1)
    fail(LLMQ_ERR_INVALID_ARGUMENT, "engine params: kv_cache_bytes {} is less than one KV block ({} bytes)", bytes,
         per_block);
  if (blocks > uint64_t(INT32_MAX) / uint64_t(o.kv_block_size))
    fail(LLMQ_ERR_INVALID_ARGUMENT, "engine params: kv_cache_bytes {} is too large", bytes);
  return int32_t(blocks);
}

}  // namespace

uint64_t kv_bytes_per_token(const ModelConfig& config, DType kv_dtype) {
  return kv_bytes_per_block(config, 1, kv_dtype);
}

DType resolve_kv_dtype(const Model& model, llmq_kv_dtype requested) {
  switch (int(requested)) {
    case LLMQ_KV_DTYPE_AUTO:  // the model's 16/32-bit dtype (embeddings stay unquantized)
      return model.weights().embed.dtype;
    case LLMQ_KV_DTYPE_F32:
      return DType::F32;
    case LLMQ_KV_DTYPE_F16:
      return DType::F16;
    case LLMQ_KV_DTYPE_BF16:
      return DType::BF16;
    case LLMQ_KV_DTYPE_INT8:
      return DType::I8;
    case LLMQ_KV_DTYPE_FP8:
      return DType::F8_E4M3;
  }
  fail(LLMQ_ERR_INVALID_ARGUMENT, "engine params: unknown kv_dtype {}", int(requested));
}

std::vector<float> rope_inv_freq(const ModelConfig& c) {
  const int64_t half = c.head_dim / 2;
  std::vector<float> inv_freq(static_cast<size_t>(half));
  const RopeConfig& r = c.rope;
  for (int64_t i = 0; i < half; ++i) {
    double freq = 1.0 / std::pow(r.theta, double(2 * i) / double(c.head_dim));
    if (r.type == "linear") {
      freq /= r.factor;
    } else if (r.type == "llama3") {
      // Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, and the band between
      // is interpolated.
      const double pi = 3.14159265358979323846;
      double wavelength = 2 * pi / freq;
      double low_freq_wavelength = double(r.original_max_position) / r.low_freq_factor;
      double high_freq_wavelength = double(r.original_max_position) / r.high_freq_factor;
      if (wavelength > low_freq_wavelength) {
        freq /= r.factor;
      } else if (wavelength >= high_freq_wavelength) {
        double smooth = (double(r.original_max_position) / wavelength - r.low_freq_factor) /
                        (r.high_freq_factor - r.low_freq_factor);
        freq = (1 - smooth) * freq / r.factor + smooth * freq;
      }
    }
    inv_freq[size_t(i)] = float(freq);
  }
  return inv_freq;
}

Engine::Engine(std::shared_ptr<const Model> model, const EngineOptions& options)
    : model_(std::move(model)),
      options_(options),
      kv_dtype_(resolve_kv_dtype(*model_, options.kv_dtype)),
      allocator_(kv_num_blocks(model_->config(), options, kv_dtype_)) {
  const ModelConfig& c = model_->config();
  if (options.backend == LLMQ_BACKEND_CUDA) {
    std::string why;
    if (cuda_device_count(&why) == 0) fail(LLMQ_ERR_BACKEND_UNAVAILABLE, "engine: no CUDA backend: {}", why);
    backend_ = make_cuda_backend(CudaBackendOptions{});
  } else if (options.backend == LLMQ_BACKEND_CPU) {
    backend_ = make_cpu_backend(CpuBackendOptions{options.n_threads});
  } else {
    fail(LLMQ_ERR_INVALID_ARGUMENT, "engine params: unknown backend {}", int(options.backend));
  }
  const QuantMode stored = model_->config().checkpoint_quant;
  if (stored != QuantMode::None && options.quant != QuantMode::None && options.quant != stored)
    fail(LLMQ_ERR_INVALID_ARGUMENT, "engine params: quant {} was asked for, but {} is already quantized as {}",
         quant_mode_name(options.quant), model_->dir(), quant_mode_name(stored));
  quant_ = stored != QuantMode::None ? stored : options.quant;
  if (quant_ == QuantMode::Fp8) {
    std::string why;
    if (!backend_->supports_fp8(&why)) fail(LLMQ_ERR_UNSUPPORTED, "engine: quant fp8 on {}: {}", backend_->name(), why);
  }
  upload_weights();
  inv_freq_host_ = rope_inv_freq(c);
  inv_freq_ = backend_->upload(Tensor{inv_freq_host_.data(), DType::F32, 1, int64_t(inv_freq_host_.size())});

  auto tensor = [&](int64_t rows, int64_t cols, DType dtype = DType::F32) {
    buffers_.push_back(backend_->allocate(uint64_t(rows) * uint64_t(cols) * dtype_size(dtype)));
    return Tensor{buffers_.back()->data(), dtype, rows, cols};
  };
  const int64_t per_layer_cols = c.num_kv_heads * options.kv_block_size * c.head_dim;
  for (int64_t l = 0; l < c.num_layers; ++l) {
    KvLayer layer;
    layer.k = tensor(allocator_.num_blocks(), per_layer_cols, kv_dtype_);
    layer.v = tensor(allocator_.num_blocks(), per_layer_cols, kv_dtype_);
    if (kv_dtype_ == DType::I8) {
      layer.k_scale = tensor(allocator_.num_blocks(), c.num_kv_heads * options.kv_block_size);
      layer.v_scale = tensor(allocator_.num_blocks(), c.num_kv_heads * options.kv_block_size);
    } else if (kv_dtype_ == DType::F8_E4M3) {
      // Static per-layer scales; 1.0 (as vLLM without calibrated k_scale / v_scale).
      // The checkpoint's calibrated per-layer scales when it has them, else 1.0 (as vLLM).
      const LayerWeights& lw = model_->weights().layers[size_t(l)];
      const Tensor unit{const_cast<float*>(&kUnitScale), DType::F32, 1, 1};
      layer.k_scale = backend_->upload(lw.k_scale.empty() ? unit : lw.k_scale);
      layer.v_scale = backend_->upload(lw.v_scale.empty() ? unit : lw.v_scale);
    }
    layer.block_size = options.kv_block_size;
    layer.layer = int32_t(l);
    layer.num_kv_heads = int32_t(c.num_kv_heads);
    layer.head_dim = int32_t(c.head_dim);
    kv_layers_.push_back(layer);
  }
  const int64_t T = options.max_batch_tokens;
  x_ = tensor(T, c.hidden_size);
  h_ = tensor(T, c.hidden_size);
  q_ = tensor(T, c.q_size());
  k_ = tensor(T, c.kv_size());
  v_ = tensor(T, c.kv_size());
  attn_ = tensor(T, c.q_size());
  proj_ = tensor(T, c.hidden_size);
  gate_ = tensor(T, c.intermediate_size);
  up_ = tensor(T, c.intermediate_size);
  last_hidden_ = tensor(T, c.hidden_size);
}

Engine::~Engine() = default;

void Engine::upload_weights() {
  const ModelWeights& w = model_->weights();
  // Every tensor but the embedding table is read once per decode step.
  auto upload = [&](const Tensor& t) {
    weight_bytes_ += t.nbytes();
    weight_bytes_per_step_ += t.nbytes();
    return t.empty() ? t : backend_->upload(t);
  };
  // int8wo keeps activations 16-bit: the checkpoint's 16-bit type, BF16 for an F32 checkpoint.
  const DType model_dtype = w.embed.dtype;
  const DType act_dtype = model_dtype == DType::F16 || model_dtype == DType::BF16 ? model_dtype : DType::BF16;
  const int threads = int(std::max(1u, std::thread::hardware_concurrency()));
  const QuantMode stored = model_->config().checkpoint_quant;
  // A 16/32-bit weight as loaded, or quantized here in the engine's mode.
  auto quantize_or_upload = [&](const Tensor& t) {
    LinearWeight lw;
    lw.act_dtype = act_dtype;
    if (quant_ == QuantMode::None) {
      lw.w = upload(t);
      return lw;
    }
    QuantizedWeight q = quantize_weight(t, quant_, threads);
    lw = q.view(act_dtype);
    weight_bytes_ += lw.w.nbytes() + lw.scale.nbytes();
    weight_bytes_per_step_ += lw.w.nbytes() + lw.scale.nbytes();
    lw.w = backend_->upload(lw.w);
    lw.scale = backend_->upload(lw.scale);
    // The CPU backend uses host memory in place: keep the quantized copy alive.
    if (lw.w.data == q.data.data()) quantized_.push_back(std::move(q));
    return lw;
  };
  // A layer's linear weight: a pre-quantized checkpoint's codes and scales as stored, else as above.
  auto linear = [&](const LayerWeights& l, LinearIndex index, const Tensor& t) {
    if (stored == QuantMode::None) return quantize_or_upload(t);
    LinearWeight lw;
    lw.act_dtype = act_dtype;
    lw.w = upload(t);
    lw.scale = upload(l.weight_scale[index]);
    lw.input_scale = upload(l.input_scale[index]);
    return lw;
  };
  embed_ = backend_->upload(w.embed);
  weight_bytes_ += w.embed.nbytes();
  final_norm_ = upload(w.final_norm);
  if (options_.quantize_lm_head && quant_ != QuantMode::None && stored == QuantMode::None) {
    lm_head_ = quantize_or_upload(w.lm_head);  // a tied one stays the embedding too
  } else if (w.lm_head.data == w.embed.data) {  // tied: one copy
    lm_head_.w = embed_;
    weight_bytes_per_step_ += w.embed.nbytes();
  } else {
    lm_head_.w = upload(w.lm_head);
  }
  for (const LayerWeights& l : w.layers) {
    layers_.push_back(Layer{upload(l.attn_norm), upload(l.mlp_norm), linear(l, kQ, l.wq), linear(l, kK, l.wk),
                            linear(l, kV, l.wv), linear(l, kO, l.wo), linear(l, kGate, l.w_gate),
                            linear(l, kUp, l.w_up), linear(l, kDown, l.w_down), upload(l.bq), upload(l.bk),
                            upload(l.bv), upload(l.bo)});
    Layer& layer = layers_.back();
    for (LinearWeight* lw : {&layer.wq, &layer.wk, &layer.wv, &layer.wo, &layer.w_gate, &layer.w_up, &layer.w_down})
      lw->layer = int32_t(layers_.size() - 1);
  }
}

uint64_t Engine::kv_bytes_per_token() const {
  return kv_bytes_per_block(model_->config(), 1, kv_dtype_);
}

void Engine::check_token_ids(const int32_t* ids, size_t n, const char* what) const {
  for (size_t i = 0; i < n; ++i)
    if (ids[i] < 0 || ids[i] >= vocab_size())
      fail(LLMQ_ERR_INVALID_ARGUMENT, "{}[{}] = {} is outside the vocabulary [0, {})", what, i, ids[i], vocab_size());
}

void Engine::step(const std::vector<SequenceStep>& batch, std::vector<float>* logits) {
  const ModelConfig& c = model_->config();
  int64_t total = 0;
  for (const SequenceStep& s : batch) total += s.n_tokens;
  if (total < 1 || total > options_.max_batch_tokens)
    fail(LLMQ_ERR_INVALID_ARGUMENT, "engine: a step takes 1 to {} tokens, got {}", options_.max_batch_tokens, total);

  // Reserve every sequence's blocks first, undoing all of them if one cannot get its blocks.
  std::vector<size_t> blocks_before;
  for (size_t i = 0; i < batch.size(); ++i) {
    const SequenceStep& s = batch[i];
    int64_t end = int64_t(s.kv->length()) + s.n_tokens;
    if (end > c.max_position)
      fail(LLMQ_ERR_CONTEXT_OVERFLOW, "engine: sequence would reach {} tokens; the model's context is {}", end,
           c.max_position);
    blocks_before.push_back(s.kv->blocks().size());
    if (!s.kv->reserve(int32_t(end))) {
      for (size_t j = 0; j < i; ++j) batch[j].kv->release_blocks_from(blocks_before[j]);
      fail(LLMQ_ERR_KV_CACHE_FULL, "engine: the KV cache is full ({} blocks of {} tokens, {} free)",
           allocator_.num_blocks(), options_.kv_block_size, allocator_.num_free());
    }
  }

  plan_.clear();
  for (size_t i = 0; i < batch.size(); ++i) {
    const SequenceStep& s = batch[i];
    for (int32_t j = 0; j < s.n_tokens; ++j) {
      int32_t position = s.kv->length() + j;
      if (s.want_logits && (s.all_logits || j == s.n_tokens - 1)) plan_.logit_rows.push_back(plan_.n_tokens());
      plan_.tokens.push_back(s.tokens[j]);
      plan_.positions.push_back(position);
      plan_.token_seq.push_back(int32_t(i));
      plan_.slots.push_back(s.kv->slot(position));
    }
    plan_.block_ids.insert(plan_.block_ids.end(), s.kv->blocks().begin(), s.kv->blocks().end());
    plan_.block_offsets.push_back(int32_t(plan_.block_ids.size()));
  }

  forward(int32_t(total), int32_t(plan_.logit_rows.size()));
  for (const SequenceStep& s : batch) s.kv->set_length(s.kv->length() + s.n_tokens);

  const size_t rows = plan_.logit_rows.size();
  logits->resize(rows * size_t(c.vocab_size));
  if (rows > 0) backend_->to_host(Tensor{logits_buffer_->data(), DType::F32, int64_t(rows), c.vocab_size}, logits->data());
}

std::vector<uint64_t> Engine::saturation(bool reset) { return backend_->saturation(int32_t(layers_.size()), reset); }

void Engine::set_observer(Observer observer) {
  if (observer && options_.backend != LLMQ_BACKEND_CPU)
    fail(LLMQ_ERR_UNSUPPORTED, "engine: calibration observes activations on the CPU backend only");
  observer_ = std::move(observer);
}

void Engine::forward(int32_t n_tokens, int32_t n_logit_rows) {
  const ModelConfig& c = model_->config();
  const float eps = float(c.rms_norm_eps);
  // The logits buffer first: a step recorded by the backend refers to it.
  uint64_t logits_bytes = uint64_t(std::max(n_logit_rows, 1)) * uint64_t(c.vocab_size) * sizeof(float);
  if (!logits_buffer_ || logits_buffer_->size() < logits_bytes) {
    backend_->drop_recordings();
    logits_buffer_ = backend_->allocate(logits_bytes);
  }
  backend_->begin_step(plan_);
  if (backend_->replay_step()) return;

  Tensor x = x_.row_slice(0, n_tokens), h = h_.row_slice(0, n_tokens), q = q_.row_slice(0, n_tokens),
         k = k_.row_slice(0, n_tokens), v = v_.row_slice(0, n_tokens), attn = attn_.row_slice(0, n_tokens),
         proj = proj_.row_slice(0, n_tokens), gate = gate_.row_slice(0, n_tokens), up = up_.row_slice(0, n_tokens);
  AttentionParams attention{int32_t(c.num_heads), int32_t(c.num_kv_heads), int32_t(c.head_dim),
                            float(1.0 / std::sqrt(double(c.head_dim))), int32_t(c.sliding_window)};
  auto bias = [](const Tensor& b) { return b.empty() ? nullptr : &b; };

  auto observe = [&](size_t layer, const char* site, const Tensor& t) {
    if (observer_) observer_(int32_t(layer), site, t);
  };
  backend_->embed(embed_, x);
  for (size_t l = 0; l < layers_.size(); ++l) {
    const Layer& w = layers_[l];
    // The residual stream is x; the previous layer's MLP output (proj) is added in the fused norm.
    if (l == 0)
      backend_->rmsnorm(x, w.attn_norm, eps, h);
    else
      backend_->add_rmsnorm(x, proj, w.attn_norm, eps, h);
    observe(l, "attn_in", h);
    backend_->linear(h, w.wq, bias(w.bq), q);
    backend_->linear(h, w.wk, bias(w.bk), k);
    backend_->linear(h, w.wv, bias(w.bv), v);
    backend_->rope_kv_write(q, k, v, inv_freq_, kv_layers_[l]);
    observe(l, "k", k);
    observe(l, "v", v);
    backend_->attention(q, kv_layers_[l], attention, attn);
    observe(l, "o_in", attn);
    backend_->linear(attn, w.wo, bias(w.bo), proj);
    backend_->add_rmsnorm(x, proj, w.mlp_norm, eps, h);
    observe(l, "mlp_in", h);
    backend_->linear(h, w.w_gate, nullptr, gate);
    backend_->linear(h, w.w_up, nullptr, up);
    backend_->silu_mul(gate, up, gate);
    observe(l, "down_in", gate);
    backend_->linear(gate, w.w_down, nullptr, proj);
  }
  if (n_logit_rows > 0) {
    backend_->add_rmsnorm(x, proj, final_norm_, eps, h);
    Tensor last = last_hidden_.row_slice(0, n_logit_rows);
    backend_->gather_rows(h, last);
    Tensor logits{logits_buffer_->data(), DType::F32, n_logit_rows, c.vocab_size};
    backend_->linear(last, lm_head_, nullptr, logits);
  }
  backend_->end_step();
}

GenerateResult Engine::generate(const std::vector<int32_t>& prompt, const GenerateOptions& options) {
  const ModelConfig& c = model_->config();
  const auto start = Clock::now();
  if (prompt.empty()) fail(LLMQ_ERR_INVALID_ARGUMENT, "generate: the prompt is empty");
  check_token_ids(prompt.data(), prompt.size(), "prompt_ids");
  if (int64_t(prompt.size()) > c.max_position)
    fail(LLMQ_ERR_CONTEXT_OVERFLOW, "generate: the prompt has {} tokens; the model's context is {}", prompt.size(),
         c.max_position);
  if (options.max_new_tokens < 0)
    fail(LLMQ_ERR_INVALID_ARGUMENT, "generate: max_new_tokens must be >= 0, got {}", options.max_new_tokens);
  check_token_ids(options.stop_ids.data(), options.stop_ids.size(), "stop_ids");
  Sampler sampler(options.sampling);

  std::unordered_set<int32_t> stop(options.stop_ids.begin(), options.stop_ids.end());
  if (!options.ignore_eos) stop.insert(c.eos_ids.begin(), c.eos_ids.end());

  GenerateResult result;
  if (options.max_new_tokens == 0) return result;
  std::unique_ptr<SequenceKv> seq = new_sequence();
  std::vector<float> logits;
  for (size_t done = 0; done < prompt.size();) {
    int32_t chunk = int32_t(std::min<size_t>(size_t(options_.max_batch_tokens), prompt.size() - done));
    SequenceStep s{seq.get(), prompt.data() + done, chunk, false, done + size_t(chunk) == prompt.size()};
    step({s}, &logits);
    done += size_t(chunk);
  }

  std::vector<int32_t> history = prompt;
  Clock::time_point first_token;
  for (;;) {
    int32_t token = sampler.sample(logits.data(), vocab_size(), history);
    if (history.size() == prompt.size()) {
      first_token = Clock::now();
      result.time_to_first_token_s = seconds_between(start, first_token);
    }
    if (stop.count(token)) {
      result.finish_reason = FinishReason::Stop;
      break;
    }
    result.tokens.push_back(token);
    history.push_back(token);
    if (options.on_token && !options.on_token(token)) {
      result.finish_reason = FinishReason::Cancelled;
      break;
    }
    if (int32_t(result.tokens.size()) >= options.max_new_tokens) {
      result.finish_reason = FinishReason::Length;
      break;
    }
    if (seq->length() >= c.max_position) {
      result.finish_reason = FinishReason::Context;
      break;
    }
    try {
      step({SequenceStep{seq.get(), &token, 1, false, true}}, &logits);
    } catch (const Error& e) {
      if (e.status() != LLMQ_ERR_KV_CACHE_FULL) throw;
      result.finish_reason = FinishReason::Context;
      break;
    }
  }
  result.decode_time_s = seconds_between(first_token, Clock::now());
  return result;
}

void Engine::score(const std::vector<int32_t>& ids, float* logits) {
  const ModelConfig& c = model_->config();
  if (ids.empty()) fail(LLMQ_ERR_INVALID_ARGUMENT, "score: ids is empty");
  check_token_ids(ids.data(), ids.size(), "ids");
  if (int64_t(ids.size()) > c.max_position)
    fail(LLMQ_ERR_CONTEXT_OVERFLOW, "score: {} ids exceed the model's context of {}", ids.size(), c.max_position);
  std::unique_ptr<SequenceKv> seq = new_sequence();
  std::vector<float> chunk_logits;
  for (size_t done = 0; done < ids.size();) {
    int32_t chunk = int32_t(std::min<size_t>(size_t(options_.max_batch_tokens), ids.size() - done));
    step({SequenceStep{seq.get(), ids.data() + done, chunk, true, true}}, &chunk_logits);
    std::copy(chunk_logits.begin(), chunk_logits.end(), logits + done * size_t(c.vocab_size));
    done += size_t(chunk);
  }
}

}  // namespace llmq
