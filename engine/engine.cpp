#include "engine/engine.h"

#include <algorithm>
#include <chrono>
#include <thread>
#include <cmath>
#include <unordered_set>

#include "engine/device.h"
#include "engine/error.h"
#include "engine/tensor_parallel.h"

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

// One rank's share of the engine: its own backend, its shard of the weights and of every KV
// layer's heads, and its activations. Without tensor parallelism there is one, with no communicator.
struct Engine::Rank {
  TpShard shard;
  Communicator* comm = nullptr;  // nullptr: a single rank, no collectives
  std::unique_ptr<Backend> backend;
  std::vector<std::vector<char>> sliced;   // column slices of the weights (o, down)
  std::vector<QuantizedWeight> quantized;  // host copies of quantized weights (before upload)
  Tensor embed, final_norm;
  LinearWeight lm_head;
  std::vector<Layer> layers;
  std::vector<float> inv_freq_host;
  Tensor inv_freq;
  std::vector<KvLayer> kv_layers;
  std::vector<std::unique_ptr<Buffer>> buffers;  // KV storage and activations
  Tensor x, h, q, k, v, attn, proj, gate, up, last_hidden, row_amax;
  std::unique_ptr<Buffer> logits_buffer, gathered_buffer;
  uint64_t weight_bytes = 0, weight_bytes_per_step = 0;
};

namespace {

int32_t device_of(const EngineOptions& o, int rank) { return o.devices.empty() ? rank : o.devices[size_t(rank)]; }

// The max over the ranks of host values, through the rank's backend memory (load time only).
void max_over_ranks(Backend& backend, Communicator& comm, std::vector<float>* values) {
  std::unique_ptr<Buffer> buffer = backend.allocate(values->size() * sizeof(float));
  Tensor t{buffer->data(), DType::F32, 1, int64_t(values->size())};
  backend.from_host(values->data(), t);
  comm.all_reduce_max(t.as<float>(), values->size(), backend.stream());
  std::vector<float> reduced(values->size());
  backend.to_host(t, reduced.data());
  *values = std::move(reduced);
}

}  // namespace

Engine::Engine(std::shared_ptr<const Model> model, const EngineOptions& options)
    : model_(std::move(model)),
      options_(options),
      kv_dtype_(resolve_kv_dtype(*model_, options.kv_dtype)),
      allocator_(kv_num_blocks(model_->config(), options, kv_dtype_)) {
  const ModelConfig& c = model_->config();
  if (options.backend != LLMQ_BACKEND_CPU && options.backend != LLMQ_BACKEND_CUDA)
    fail(LLMQ_ERR_INVALID_ARGUMENT, "engine params: unknown backend {}", int(options.backend));
  const QuantMode stored = c.checkpoint_quant;
  if (stored != QuantMode::None && options.quant != QuantMode::None && options.quant != stored)
    fail(LLMQ_ERR_INVALID_ARGUMENT, "engine params: quant {} was asked for, but {} is already quantized as {}",
         quant_mode_name(options.quant), model_->dir(), quant_mode_name(stored));
  quant_ = stored != QuantMode::None ? stored : options.quant;
  // Everything about tensor parallelism is checked before any backend or weight is touched.
  check_parallel_options();

  std::vector<int> local_ranks;
  if (options.communicator) {
    tp_size_ = options.communicator->size();
    local_ranks = {options.communicator->rank()};
  } else {
    tp_size_ = options.tensor_parallel;
    for (int r = 0; r < tp_size_; ++r) local_ranks.push_back(r);
    const int timeout_ms = options.tp_timeout_ms > 0 ? options.tp_timeout_ms : kDefaultTpTimeoutMs;
    if (tp_size_ > 1 && options.backend == LLMQ_BACKEND_CUDA) {
      std::vector<int> devices;
      for (int r = 0; r < tp_size_; ++r) devices.push_back(device_of(options, r));
      communicators_ = make_nccl_communicators(devices, timeout_ms);
    } else if (tp_size_ > 1) {
      communicators_ = make_in_process_communicators(tp_size_, timeout_ms);
    }
  }
  for (size_t i = 0; i < local_ranks.size(); ++i) {
    ranks_.push_back(std::make_unique<Rank>());
    ranks_.back()->shard = tp_shard(c, local_ranks[i], tp_size_);
    ranks_.back()->comm = options.communicator ? options.communicator.get()
                          : communicators_.empty() ? nullptr
                                                   : communicators_[i].get();
  }
  threads_ = std::make_unique<RankThreads>(int(ranks_.size()));
  for_each_rank([&](Rank& r) { init_rank(r); });
  for (const auto& r : ranks_) {
    weight_bytes_ += r->weight_bytes;
    weight_bytes_per_step_ += r->weight_bytes_per_step;
  }
}

Engine::~Engine() {
  // Each rank's backend is released on its own thread, where its CUDA device is current.
  try {
    threads_->run([&](int i) { ranks_[size_t(i)].reset(); }, [](llmq_status, const std::string&) {});
  } catch (...) {
  }
}

void Engine::check_parallel_options() {
  const EngineOptions& o = options_;
  const ModelConfig& c = model_->config();
  if (o.tensor_parallel < 1 || o.tensor_parallel > kMaxTensorParallel)
    fail(LLMQ_ERR_INVALID_ARGUMENT, "engine params: tensor_parallel must be in [1, {}], got {}", kMaxTensorParallel,
         o.tensor_parallel);
  if (o.tp_timeout_ms < 0)
    fail(LLMQ_ERR_INVALID_ARGUMENT, "engine params: tp_timeout_ms must be >= 0, got {}", o.tp_timeout_ms);
  if (o.communicator) {
    if (o.tensor_parallel != 1)
      fail(LLMQ_ERR_INVALID_ARGUMENT,
           "engine params: tensor_parallel must be 1 with a communicator (the group is the communicator's {} ranks)",
           o.communicator->size());
    const bool nccl = communicator_device(*o.communicator) >= 0;
    if (nccl != (o.backend == LLMQ_BACKEND_CUDA))
      fail(LLMQ_ERR_INVALID_ARGUMENT, "engine params: a {} engine needs {} communicator",
           o.backend == LLMQ_BACKEND_CUDA ? "CUDA" : "CPU", nccl ? "an in-process" : "an NCCL");
    check_tensor_parallel(c, o.communicator->size());
    return;
  }
  const int tp = o.tensor_parallel;
  check_tensor_parallel(c, tp);
  if (!o.devices.empty()) {
    if (int(o.devices.size()) < tp)
      fail(LLMQ_ERR_INVALID_ARGUMENT, "engine params: tensor_parallel {} needs {} devices; the device list has {} ({})",
           tp, tp, o.devices.size(), fmt::join(o.devices, ","));
    for (int i = 0; i < tp; ++i) {
      if (o.devices[size_t(i)] < 0)
        fail(LLMQ_ERR_INVALID_ARGUMENT, "engine params: devices[{}] = {} is not a device", i, o.devices[size_t(i)]);
      for (int j = 0; j < i; ++j)
        if (o.devices[size_t(j)] == o.devices[size_t(i)])
          fail(LLMQ_ERR_INVALID_ARGUMENT, "engine params: devices[{}] and devices[{}] are both device {} (one rank per device)",
               j, i, o.devices[size_t(i)]);
    }
  }
  if (o.backend == LLMQ_BACKEND_CUDA) {
    std::string why;
    if (tp > 1 && !nccl_available(&why))
      fail(LLMQ_ERR_BACKEND_UNAVAILABLE, "engine: tensor_parallel {} on CUDA needs NCCL: {}", tp, why);
    const int count = cuda_device_count(&why);
    if (count == 0) fail(LLMQ_ERR_BACKEND_UNAVAILABLE, "engine: no CUDA backend: {}", why);
    for (int r = 0; r < tp; ++r)
      if (device_of(o, r) >= count)
        fail(LLMQ_ERR_BACKEND_UNAVAILABLE, "engine: rank {} of tensor_parallel {} needs CUDA device {}; {} visible", r,
             tp, device_of(o, r), count);
  }
}

void Engine::for_each_rank(const std::function<void(Rank&)>& fn) {
  if (failed_status_ != LLMQ_OK)
    fail(failed_status_, "engine: unusable since a tensor-parallel rank failed ({})", failed_);
  threads_->run([&](int i) { fn(*ranks_[size_t(i)]); },
                [&](llmq_status status, const std::string& why) {
                  if (!ranks_[0]->comm) return;  // one rank alone: nobody waits for it
                  failed_status_ = status;
                  failed_ = why;
                  // Peers waiting for the failed rank in a collective return with this error.
                  for (auto& r : ranks_) r->comm->abort(status, why);
                });
}

void Engine::init_rank(Rank& r) {
  const ModelConfig& c = model_->config();
  // All ranks meet before any weight is touched: a peer that never comes is a timeout, not a hang.
  if (r.comm) r.comm->barrier();
  if (options_.backend == LLMQ_BACKEND_CUDA) {
    const int device = options_.communicator ? communicator_device(*options_.communicator)
                                             : device_of(options_, r.shard.rank);
    r.backend = make_cuda_backend(CudaBackendOptions{device});
  } else {
    // The ranks share the threads asked for (0: one per core).
    const int all = options_.n_threads > 0 ? options_.n_threads : int(std::max(1u, std::thread::hardware_concurrency()));
    r.backend = make_cpu_backend(CpuBackendOptions{std::max(1, all / int(ranks_.size()))});
  }
  Backend& b = *r.backend;
  if (quant_ == QuantMode::Fp8) {
    std::string why;
    if (!b.supports_fp8(&why)) fail(LLMQ_ERR_UNSUPPORTED, "engine: quant fp8 on {}: {}", b.name(), why);
  }
  if (r.comm)
    upload_weights(r, shard_weights(model_->weights(), c, r.shard, &r.sliced));
  else
    upload_weights(r, model_->weights());
  r.inv_freq_host = rope_inv_freq(c);
  r.inv_freq = b.upload(Tensor{r.inv_freq_host.data(), DType::F32, 1, int64_t(r.inv_freq_host.size())});

  auto tensor = [&](int64_t rows, int64_t cols, DType dtype = DType::F32) {
    r.buffers.push_back(b.allocate(uint64_t(rows) * uint64_t(cols) * dtype_size(dtype)));
    return Tensor{r.buffers.back()->data(), dtype, rows, cols};
  };
  // This rank's KV heads of every block.
  const int64_t kv_heads = r.shard.kv_heads, block_size = options_.kv_block_size;
  const int64_t per_layer_cols = kv_heads * block_size * c.head_dim;
  for (int64_t l = 0; l < c.num_layers; ++l) {
    KvLayer layer;
    layer.k = tensor(allocator_.num_blocks(), per_layer_cols, kv_dtype_);
    layer.v = tensor(allocator_.num_blocks(), per_layer_cols, kv_dtype_);
    if (kv_dtype_ == DType::I8) {
      layer.k_scale = tensor(allocator_.num_blocks(), kv_heads * block_size);
      layer.v_scale = tensor(allocator_.num_blocks(), kv_heads * block_size);
    } else if (kv_dtype_ == DType::F8_E4M3) {
      // The checkpoint's calibrated per-layer scales when it has them, else 1.0 (as vLLM).
      const LayerWeights& lw = model_->weights().layers[size_t(l)];
      const Tensor unit{const_cast<float*>(&kUnitScale), DType::F32, 1, 1};
      layer.k_scale = b.upload(lw.k_scale.empty() ? unit : lw.k_scale);
      layer.v_scale = b.upload(lw.v_scale.empty() ? unit : lw.v_scale);
    }
    layer.block_size = options_.kv_block_size;
    layer.layer = r.shard.kv_replica ? -1 : int32_t(l);  // a replica's writes are counted by its first holder
    layer.num_kv_heads = int32_t(kv_heads);
    layer.head_dim = int32_t(c.head_dim);
    r.kv_layers.push_back(layer);
  }
  const int64_t T = options_.max_batch_tokens;
  r.x = tensor(T, c.hidden_size);
  r.h = tensor(T, c.hidden_size);
  r.q = tensor(T, r.shard.heads * c.head_dim);
  r.k = tensor(T, kv_heads * c.head_dim);
  r.v = tensor(T, kv_heads * c.head_dim);
  r.attn = tensor(T, r.shard.heads * c.head_dim);
  r.proj = tensor(T, c.hidden_size);
  r.gate = tensor(T, r.shard.inter);
  r.up = tensor(T, r.shard.inter);
  r.last_hidden = tensor(T, c.hidden_size);
  if (r.comm) r.row_amax = tensor(T, 1);
}

void Engine::upload_weights(Rank& r, const ModelWeights& w) {
  Backend& b = *r.backend;
  // Every tensor but the embedding table is read once per decode step.
  auto upload = [&](const Tensor& t) {
    r.weight_bytes += t.nbytes();
    r.weight_bytes_per_step += t.nbytes();
    return t.empty() ? t : b.upload(t);
  };
  // int8wo keeps activations 16-bit: the checkpoint's 16-bit type, BF16 for an F32 checkpoint.
  const DType model_dtype = w.embed.dtype;
  const DType act_dtype = model_dtype == DType::F16 || model_dtype == DType::BF16 ? model_dtype : DType::BF16;
  const int threads = std::max(1, int(std::max(1u, std::thread::hardware_concurrency())) / int(ranks_.size()));
  const QuantMode stored = model_->config().checkpoint_quant;
  // A 16/32-bit weight as loaded, or quantized here in the engine's mode. With tensor parallelism
  // a scale that spans several ranks' slices (per tensor, or a row-parallel layer's channels)
  // comes from the amax over the ranks, so the shard holds the tp = 1 codes.
  auto quantize_or_upload = [&](const Tensor& t, bool row_parallel) {
    LinearWeight lw;
    lw.act_dtype = act_dtype;
    if (quant_ == QuantMode::None) {
      lw.w = upload(t);
      return lw;
    }
    std::vector<float> amax = weight_amax(t, quant_, threads);
    if (r.comm && (quant_ == QuantMode::Fp8 || row_parallel)) max_over_ranks(b, *r.comm, &amax);
    QuantizedWeight q = quantize_weight(t, quant_, threads, amax);
    lw = q.view(act_dtype);
    r.weight_bytes += lw.w.nbytes() + lw.scale.nbytes();
    r.weight_bytes_per_step += lw.w.nbytes() + lw.scale.nbytes();
    lw.w = b.upload(lw.w);
    lw.scale = b.upload(lw.scale);
    // The CPU backend uses host memory in place: keep the quantized copy alive.
    if (lw.w.data == q.data.data()) r.quantized.push_back(std::move(q));
    return lw;
  };
  // A layer's linear weight: a pre-quantized checkpoint's codes and scales as stored, else as above.
  auto linear = [&](const LayerWeights& l, LinearIndex index, const Tensor& t) {
    if (stored == QuantMode::None) return quantize_or_upload(t, index == kO || index == kDown);
    LinearWeight lw;
    lw.act_dtype = act_dtype;
    lw.w = upload(t);
    lw.scale = upload(l.weight_scale[index]);
    lw.input_scale = upload(l.input_scale[index]);
    return lw;
  };
  r.embed = b.upload(w.embed);
  r.weight_bytes += w.embed.nbytes();
  r.final_norm = upload(w.final_norm);
  if (options_.quantize_lm_head && quant_ != QuantMode::None && stored == QuantMode::None) {
    r.lm_head = quantize_or_upload(w.lm_head, false);  // a tied one stays the embedding too
  } else if (w.lm_head.data == w.embed.data) {  // tied: one copy
    r.lm_head.w = r.embed;
    r.weight_bytes_per_step += w.embed.nbytes();
  } else {
    r.lm_head.w = upload(w.lm_head);
  }
  for (const LayerWeights& l : w.layers) {
    r.layers.push_back(Layer{upload(l.attn_norm), upload(l.mlp_norm), linear(l, kQ, l.wq), linear(l, kK, l.wk),
                             linear(l, kV, l.wv), linear(l, kO, l.wo), linear(l, kGate, l.w_gate),
                             linear(l, kUp, l.w_up), linear(l, kDown, l.w_down), upload(l.bq), upload(l.bk),
                             upload(l.bv), upload(l.bo)});
    Layer& layer = r.layers.back();
    // Saturation counters: a column-parallel layer's input is the same on every rank, so rank 0
    // alone counts it; a row-parallel one's is split, so each rank counts its part.
    const int32_t index = int32_t(r.layers.size() - 1);
    for (LinearWeight* lw : {&layer.wq, &layer.wk, &layer.wv, &layer.w_gate, &layer.w_up})
      lw->layer = r.shard.rank == 0 ? index : -1;
    layer.wo.layer = layer.w_down.layer = index;
  }
}

const char* Engine::backend_name() const { return ranks_[0]->backend->name(); }

double Engine::measure_peak_bandwidth() { return ranks_[0]->backend->measure_peak_bandwidth(); }

uint64_t Engine::kv_bytes_per_token() const {
  return kv_bytes_per_block(model_->config(), 1, kv_dtype_);
}

void Engine::check_token_ids(const int32_t* ids, size_t n, const char* what) const {
  for (size_t i = 0; i < n; ++i)
    if (ids[i] < 0 || ids[i] >= vocab_size())
      fail(LLMQ_ERR_INVALID_ARGUMENT, "{}[{}] = {} is outside the vocabulary [0, {})", what, i, ids[i], vocab_size());
}

int32_t Engine::prepare_step(const std::vector<SequenceStep>& batch) {
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

  // The batch metadata, built once and read by every rank.
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
  return int32_t(total);
}

void Engine::step(const std::vector<SequenceStep>& batch, std::vector<float>* logits) {
  const ModelConfig& c = model_->config();
  const int32_t total = prepare_step(batch);
  const size_t rows = plan_.logit_rows.size();
  const size_t vocab = size_t(c.vocab_size);
  logits->resize(rows * vocab);
  for_each_rank([&](Rank& r) {
    forward(r, int32_t(total), int32_t(rows));
    if (&r != ranks_[0].get() || rows == 0) return;
    if (!r.comm) {
      r.backend->to_host(Tensor{r.logits_buffer->data(), DType::F32, int64_t(rows), c.vocab_size}, logits->data());
      return;
    }
    gathered_.resize(size_t(tp_size_) * rows * size_t(r.shard.vocab_stride));
    r.backend->to_host(Tensor{r.gathered_buffer->data(), DType::F32, 1, int64_t(gathered_.size())}, gathered_.data());
  });
  for (const SequenceStep& s : batch) s.kv->set_length(s.kv->length() + s.n_tokens);

  if (ranks_[0]->comm && rows > 0) {
    // All-gathered as [rank][row][that rank's vocab slice] (each block vocab_stride wide).
    for (int k = 0; k < tp_size_; ++k) {
      const TpShard s = tp_shard(c, k, tp_size_);
      const float* block = gathered_.data() + size_t(k) * rows * size_t(s.vocab_stride);
      for (size_t m = 0; m < rows; ++m)
        std::copy_n(block + m * size_t(s.vocab), size_t(s.vocab), logits->data() + m * vocab + size_t(s.first_vocab));
    }
  }
}

size_t logit_rows(const std::vector<SequenceStep>& batch) {
  size_t rows = 0;
  for (const SequenceStep& s : batch)
    if (s.want_logits && s.n_tokens > 0) rows += s.all_logits ? size_t(s.n_tokens) : 1;
  return rows;
}

void Engine::step(const std::vector<SequenceStep>& batch, const std::vector<SampleRow>& sample_rows,
                  std::vector<int32_t>* tokens) {
  const size_t rows = logit_rows(batch);
  if (sample_rows.size() != rows)
    fail(LLMQ_ERR_INVALID_ARGUMENT, "engine: the step has {} logits rows but {} sampling rows", rows, sample_rows.size());
  tokens->resize(rows);
  if (ranks_[0]->comm) {
    // Tensor parallelism: the vocab-parallel logits are gathered to the host and sampled there.
    step(batch, &host_logits_);
    for (size_t i = 0; i < rows; ++i)
      (*tokens)[i] = sample_row(host_logits_.data() + i * size_t(vocab_size()), vocab_size(), sample_rows[i],
                                host_sample_scratch_);
    return;
  }
  const int32_t total = prepare_step(batch);
  for_each_rank([&](Rank& r) {  // the one rank, on its thread
    forward(r, total, int32_t(rows));
    if (rows == 0) return;
    Tensor logits{r.logits_buffer->data(), DType::F32, int64_t(rows), int64_t(vocab_size())};
    r.backend->sample(logits, sample_rows, tokens->data());
  });
  for (const SequenceStep& s : batch) s.kv->set_length(s.kv->length() + s.n_tokens);
}

std::vector<uint64_t> Engine::saturation(bool reset) {
  std::vector<uint64_t> total;
  for (const auto& r : ranks_) {
    const std::vector<uint64_t> counts = r->backend->saturation(int32_t(r->layers.size()), reset);
    total.resize(counts.size());
    for (size_t i = 0; i < counts.size(); ++i) total[i] += counts[i];
  }
  return total;
}

void Engine::set_observer(Observer observer) {
  if (observer && (options_.backend != LLMQ_BACKEND_CPU || tp_size_ > 1))
    fail(LLMQ_ERR_UNSUPPORTED, "engine: calibration observes activations on the CPU backend without tensor parallelism only");
  observer_ = std::move(observer);
}

void Engine::forward(Rank& r, int32_t n_tokens, int32_t n_logit_rows) {
  const ModelConfig& c = model_->config();
  Backend& b = *r.backend;
  Communicator* comm = r.comm;
  void* stream = b.stream();
  const float eps = float(c.rms_norm_eps);
  // The logits buffer first: a step recorded by the backend refers to it. With tensor parallelism
  // it holds this rank's vocabulary slice, vocab_stride wide for the all-gather.
  const int64_t logit_cols = comm ? r.shard.vocab_stride : c.vocab_size;
  const uint64_t logits_bytes = uint64_t(std::max(n_logit_rows, 1)) * uint64_t(logit_cols) * sizeof(float);
  if (!r.logits_buffer || r.logits_buffer->size() < logits_bytes) {
    b.drop_recordings();
    r.logits_buffer = b.allocate(logits_bytes);
    if (comm) r.gathered_buffer = b.allocate(logits_bytes * uint64_t(tp_size_));
  }
  b.begin_step(plan_);
  // Recorded steps replay one rank's ops; steps with collectives are not recorded.
  if (!comm && b.replay_step()) return;

  Tensor x = r.x.row_slice(0, n_tokens), h = r.h.row_slice(0, n_tokens), q = r.q.row_slice(0, n_tokens),
         k = r.k.row_slice(0, n_tokens), v = r.v.row_slice(0, n_tokens), attn = r.attn.row_slice(0, n_tokens),
         proj = r.proj.row_slice(0, n_tokens), gate = r.gate.row_slice(0, n_tokens), up = r.up.row_slice(0, n_tokens);
  AttentionParams attention{int32_t(r.shard.heads), int32_t(r.shard.kv_heads), int32_t(c.head_dim),
                            float(1.0 / std::sqrt(double(c.head_dim))), int32_t(c.sliding_window)};
  auto bias = [](const Tensor& t) { return t.empty() ? nullptr : &t; };
  auto observe = [&](size_t layer, const char* site, const Tensor& t) {
    if (observer_) observer_(int32_t(layer), site, t);
  };
  auto all_reduce = [&](Tensor& t) {
    if (comm) comm->all_reduce_sum(t.as<float>(), size_t(t.numel()), stream);
  };
  // Row-parallel layers (o, down): each rank's partial product over its slice of the inputs,
  // summed over the ranks.
  Tensor amax;
  auto needs_row_amax = [&](const LinearWeight& w) {
    return comm && w.w.dtype == DType::F8_E4M3 && w.input_scale.empty();
  };
  auto row_parallel = [&](const Tensor& in, const LinearWeight& w, const Tensor* b_, Tensor& out) {
    const Tensor* row_amax = nullptr;
    if (needs_row_amax(w)) {
      // Dynamic per-token FP8 scales come from the whole row, as with one rank.
      amax = r.row_amax.row_slice(0, in.rows);
      b.row_absmax(in, amax);
      comm->all_reduce_max(amax.as<float>(), size_t(in.rows), stream);
      row_amax = &amax;
    }
    b.linear(in, w, b_, out, row_amax);
    all_reduce(out);
  };

  b.embed(r.embed, r.shard.first_vocab, x);
  all_reduce(x);  // vocab-parallel: other ranks' rows are zero here
  for (size_t l = 0; l < r.layers.size(); ++l) {
    const Layer& w = r.layers[l];
    // The residual stream is x; the previous layer's MLP output (proj) is added in the fused norm.
    Tensor* residual = l == 0 ? nullptr : &x;
    const Tensor& layer_in = l == 0 ? x : proj;
    const Backend::LinearJob q_job{&w.wq, bias(w.bq), &q}, k_job{&w.wk, bias(w.bk), &k}, v_job{&w.wv, bias(w.bv), &v};
    if (observer_) {
      b.rmsnorm_linears(residual, layer_in, w.attn_norm, eps, h, {q_job, k_job, v_job});
      observe(l, "attn_in", h);
      b.rope_kv_write(q, k, v, r.inv_freq, r.kv_layers[l]);
      observe(l, "k", k);
      observe(l, "v", v);
    } else {
      b.attention_inputs(residual, layer_in, w.attn_norm, eps, h, q_job, k_job, v_job, r.inv_freq, r.kv_layers[l]);
    }
    if (observer_ || needs_row_amax(w.wo)) {
      // The attention output itself is needed: calibration observes it, or tensor parallelism takes
      // its per-token amax over the ranks before the FP8 quantization.
      b.attention(q, r.kv_layers[l], attention, attn);
      observe(l, "o_in", attn);
      row_parallel(attn, w.wo, bias(w.bo), proj);
    } else {
      // The backend may write the o projection's input in the attention kernel.
      b.attention_linear(q, r.kv_layers[l], attention, attn, w.wo, bias(w.bo), proj);
      all_reduce(proj);
    }
    const Backend::LinearJob gate_job{&w.w_gate, nullptr, &gate}, up_job{&w.w_up, nullptr, &up};
    if (observer_ || needs_row_amax(w.w_down)) {
      // The fp32 product itself is needed: calibration observes it, or tensor parallelism takes its
      // per-token amax over the ranks before the FP8 quantization.
      b.rmsnorm_linears(&x, proj, w.mlp_norm, eps, h, {gate_job, up_job});
      observe(l, "mlp_in", h);
      b.silu_mul(gate, up, gate);
      observe(l, "down_in", gate);
      row_parallel(gate, w.w_down, nullptr, proj);
    } else {
      // The backend may fuse the product into the down projection's input quantization.
      b.mlp(&x, proj, w.mlp_norm, eps, h, gate_job, up_job, w.w_down, proj);
      all_reduce(proj);
    }
  }
  if (n_logit_rows > 0) {
    b.add_rmsnorm(x, proj, r.final_norm, eps, h);
    Tensor last = r.last_hidden.row_slice(0, n_logit_rows);
    b.gather_rows(h, last);
    Tensor logits{r.logits_buffer->data(), DType::F32, n_logit_rows, r.shard.vocab};
    b.linear(last, r.lm_head, nullptr, logits);
    if (comm)
      comm->all_gather(logits.as<float>(), size_t(n_logit_rows) * size_t(r.shard.vocab_stride),
                       static_cast<float*>(r.gathered_buffer->data()), stream);
  }
  b.end_step();
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
  std::vector<int32_t> history = prompt;
  std::vector<int32_t> sampled;
  for (size_t done = 0; done < prompt.size();) {
    int32_t chunk = int32_t(std::min<size_t>(size_t(options_.max_batch_tokens), prompt.size() - done));
    const bool last = done + size_t(chunk) == prompt.size();
    SequenceStep s{seq.get(), prompt.data() + done, chunk, false, last};
    step({s}, last ? std::vector<SampleRow>{sampler.next_row(history, vocab_size())} : std::vector<SampleRow>{},
         &sampled);
    done += size_t(chunk);
  }

  int32_t token = sampled.at(0);
  Clock::time_point first_token;
  for (;;) {
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
      step({SequenceStep{seq.get(), &token, 1, false, true}}, {sampler.next_row(history, vocab_size())}, &sampled);
      token = sampled[0];
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
