// llmq-eval: the quality tool. Scores a text file with a "reference" engine (the unquantized model)
// and a "candidate" engine (the model in a quantization mode) and reports the candidate's
// perplexity, its ratio to the reference's, how often both pick the same next token (top-1
// agreement) and the mean KL divergence KL(reference || candidate) of their next-token
// distributions. The reference is the model as stored with its default (auto) KV cache; the
// candidate differs by its KV cache dtype today (weight quantization modes come later). When the
// mode changes nothing, the candidate is the reference (top1 = 1, kl = 0, ppl_ratio = 1).
//
// Protocol (shared/data/README.md): the text is split on "\n\n" and empty strings are dropped; each
// paragraph is a document, tokenized without special tokens with BOS prepended, and every token
// after BOS is scored by the logits of the position before it. Perplexity = exp(mean NLL), in double.
//
// Several documents share each forward step (one flattened batch of up to --batch-tokens tokens,
// each document in its own KV sequence); a document longer than that gets its own chunked steps.
#include <algorithm>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include <fmt/format.h>

#include "engine/dtype.h"
#include "engine/engine.h"
#include "engine/text_data.h"
#include "engine/error.h"
#include "engine/model.h"
#include "tools/tool_main.h"

namespace llmq {
namespace {

const char* kUsage =
    "usage: llmq-eval --model DIR --data FILE [--quant MODE] [--kv-dtype DTYPE] [--max-docs N]\n"
    "                 [--threads T] [--batch-tokens B]\n"
    "  --quant MODE      weight quantization of the candidate: none, int8wo, fp8 (engine/quant.h)\n"
    "  --candidate-model DIR  a pre-quantized checkpoint of the same model (llmq-quantize) as the candidate\n"
    "  --kv-dtype DTYPE  KV cache dtype of the candidate: auto (the weights' dtype), f32, f16, bf16,\n"
    "                    int8 (per-token scales), fp8 (per-layer scales)\n"
    "  --max-docs N      score only the first N documents (default all)\n"
    "  --threads T       CPU threads per engine (default one per core)\n"
    "  --batch-tokens B  tokens per forward step (default 2048)\n";

struct UsageError {
  std::string message;
};

[[noreturn]] void usage_error(const std::string& message) { throw UsageError{message}; }

using Clock = std::chrono::steady_clock;

using llmq::tool::seconds_since;

// ---- Options ---------------------------------------------------------------------------------

// A quantization mode: what the candidate engine is. The default mode is the reference.
struct Mode {
  std::string quant = "none";
  std::string kv_dtype_name = "auto";
  llmq_kv_dtype kv_dtype = LLMQ_KV_DTYPE_AUTO;
};

struct Options {
  std::string model_dir;
  std::string data_path;
  std::string candidate_dir;  // a pre-quantized checkpoint of the same model, as the candidate
  Mode mode;
  int64_t max_docs = -1;  // -1: all
  int32_t threads = 0;
  int32_t batch_tokens = 2048;
};

int64_t parse_int(const std::string& flag, const std::string& text, int64_t min, int64_t max) {
  int64_t value = 0;
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc() || end != text.data() + text.size() || value < min || value > max)
    usage_error(fmt::format("{} expects an integer in [{}, {}], got '{}'", flag, min, max, text));
  return value;
}

Options parse_options(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "-h" || flag == "--help") {
      std::fputs(kUsage, stdout);
      std::exit(0);
    }
    if (i + 1 >= argc) usage_error(fmt::format("'{}': unknown flag or missing value", flag));
    const std::string value = argv[++i];
    if (flag == "--model") o.model_dir = value;
    else if (flag == "--data") o.data_path = value;
    else if (flag == "--candidate-model") o.candidate_dir = value;
    else if (flag == "--quant") o.mode.quant = value;
    else if (flag == "--kv-dtype") o.mode.kv_dtype_name = value;
    else if (flag == "--max-docs") o.max_docs = parse_int(flag, value, 1, INT64_MAX);
    else if (flag == "--threads") o.threads = int32_t(parse_int(flag, value, 0, 1024));
    else if (flag == "--batch-tokens") o.batch_tokens = int32_t(parse_int(flag, value, 1, 65536));
    else usage_error(fmt::format("unknown flag '{}'", flag));
  }
  if (o.model_dir.empty()) usage_error("--model DIR is required");
  if (o.data_path.empty()) usage_error("--data FILE is required");
  if (o.mode.quant != "none" && o.mode.quant != "int8wo" && o.mode.quant != "fp8")
    usage_error(fmt::format("--quant: unknown mode '{}' (none, int8wo, fp8)", o.mode.quant));
  const char* const kv_dtypes[] = {"auto", "f32", "f16", "bf16", "int8", "fp8"};  // in llmq_kv_dtype order
  const auto* kv = std::find(std::begin(kv_dtypes), std::end(kv_dtypes), o.mode.kv_dtype_name);
  if (kv == std::end(kv_dtypes))
    usage_error(fmt::format("--kv-dtype: unknown dtype '{}' (auto, f32, f16, bf16, int8, fp8)", o.mode.kv_dtype_name));
  o.mode.kv_dtype = llmq_kv_dtype(kv - std::begin(kv_dtypes));
  return o;
}

// ---- Data --------------------------------------------------------------------------------------

// ---- Scoring -----------------------------------------------------------------------------------

struct Totals {
  double nll_reference = 0;
  double nll_candidate = 0;
  double kl = 0;
  int64_t top1 = 0;  // positions where both engines' argmax agree
  int64_t tokens = 0;
};

struct RowSummary {
  double log_normalizer;  // logsumexp of the row, in double
  int32_t argmax;         // the lowest id wins ties
};

RowSummary summarize(const float* logits, int32_t vocab) {
  int32_t best = 0;
  for (int32_t v = 1; v < vocab; ++v)
    if (logits[v] > logits[best]) best = v;
  const double max = logits[best];
  double sum = 0;
  for (int32_t v = 0; v < vocab; ++v) sum += std::exp(double(logits[v]) - max);
  return {max + std::log(sum), best};
}

// Scores `target` under both rows. `candidate` may be the same pointer as `reference`.
void score_row(const float* reference, const float* candidate, int32_t vocab, int32_t target, Totals& totals) {
  const RowSummary r = summarize(reference, vocab);
  const RowSummary c = candidate == reference ? r : summarize(candidate, vocab);
  totals.nll_reference += r.log_normalizer - double(reference[target]);
  totals.nll_candidate += c.log_normalizer - double(candidate[target]);
  totals.top1 += r.argmax == c.argmax;
  ++totals.tokens;
  if (candidate == reference) return;  // KL(p || p) = 0
  double kl = 0;
  for (int32_t v = 0; v < vocab; ++v) {
    const double log_p = double(reference[v]) - r.log_normalizer;
    const double log_q = double(candidate[v]) - c.log_normalizer;
    kl += std::exp(log_p) * (log_p - log_q);
  }
  totals.kl += kl;
}

// Prints a line on stderr each time another ~10% of the scored tokens is done.
class Progress {
 public:
  explicit Progress(int64_t total) : total_(total), start_(Clock::now()) {}
  void update(int64_t done) {
    if (done * 10 < next_ * total_) return;
    while (next_ <= 10 && done * 10 >= next_ * total_) ++next_;
    std::fprintf(stderr, "llmq-eval: %3d%% (%lld/%lld tokens, %.1f s)\n", int(done * 100 / total_), (long long)done,
                 (long long)total_, seconds_since(start_));
  }

 private:
  int64_t total_;
  int64_t next_ = 1;  // the next tenth to report
  Clock::time_point start_;
};

// Runs documents through the reference and (when it is not the reference) the candidate engine,
// several per forward step, and accumulates the Totals.
class Evaluator {
 public:
  Evaluator(Engine& reference, Engine* candidate, int32_t batch_tokens)
      : engines_{&reference, candidate}, batch_tokens_(batch_tokens) {
    kv_blocks_ = reference.allocator().num_blocks();
    if (candidate) kv_blocks_ = std::min<int64_t>(kv_blocks_, candidate->allocator().num_blocks());
  }

  // docs: BOS + ids, each at least 2 ids long.
  Totals run(const std::vector<std::vector<int32_t>>& docs, Progress& progress) {
    const int32_t block_size = engines_[0]->block_size();
    std::vector<Piece> pieces;
    int64_t tokens = 0, blocks = 0;
    auto flush = [&] {
      if (pieces.empty()) return;
      step(pieces);
      progress.update(totals_.tokens);
      pieces.clear();
      sequences_.clear();  // frees the documents' KV blocks
      tokens = blocks = 0;
    };
    for (const std::vector<int32_t>& doc : docs) {
      // The last id is only a target: the inputs are ids[0 .. n-2].
      const int32_t inputs = int32_t(doc.size()) - 1;
      const int64_t doc_blocks = (inputs + block_size - 1) / block_size;
      if (inputs > batch_tokens_) {  // alone, in chunks
        flush();
        Piece piece = new_piece(doc, 0, 0);
        for (int32_t begin = 0; begin < inputs; begin += batch_tokens_) {
          piece.begin = begin;
          piece.count = std::min(batch_tokens_, inputs - begin);
          step({piece});
          progress.update(totals_.tokens);
        }
        sequences_.clear();
        continue;
      }
      if (tokens + inputs > batch_tokens_ || blocks + doc_blocks > kv_blocks_) flush();
      pieces.push_back(new_piece(doc, 0, inputs));
      tokens += inputs;
      blocks += doc_blocks;
    }
    flush();
    return totals_;
  }

 private:
  // A run of one document's input ids within a step.
  struct Piece {
    const std::vector<int32_t>* ids;
    int32_t begin, count;
    SequenceKv* kv[2];  // in the reference and the candidate engine
  };

  Piece new_piece(const std::vector<int32_t>& ids, int32_t begin, int32_t count) {
    Piece piece{&ids, begin, count, {nullptr, nullptr}};
    for (int e = 0; e < 2; ++e) {
      if (!engines_[e]) continue;
      sequences_.push_back(engines_[e]->new_sequence());
      piece.kv[e] = sequences_.back().get();
    }
    return piece;
  }

  void step(const std::vector<Piece>& pieces) {
    for (int e = 0; e < 2; ++e) {
      if (!engines_[e]) continue;
      std::vector<SequenceStep> batch;
      for (const Piece& p : pieces) batch.push_back({p.kv[e], p.ids->data() + p.begin, p.count, true, true});
      engines_[e]->step(batch, &logits_[e]);
    }
    const int32_t vocab = engines_[0]->vocab_size();
    const float* reference = logits_[0].data();
    const float* candidate = engines_[1] ? logits_[1].data() : reference;
    size_t row = 0;
    for (const Piece& p : pieces)
      for (int32_t j = 0; j < p.count; ++j, ++row) {
        const size_t offset = row * size_t(vocab);
        score_row(reference + offset, candidate + offset, vocab, (*p.ids)[size_t(p.begin + j + 1)], totals_);
      }
  }

  Engine* engines_[2];  // reference, candidate (nullptr: the candidate is the reference)
  int32_t batch_tokens_;
  int64_t kv_blocks_;
  std::vector<std::unique_ptr<SequenceKv>> sequences_;  // of the pieces in flight
  std::vector<float> logits_[2];
  Totals totals_;
};

// ---- The mode's costs and engines ----------------------------------------------------------------

QuantMode quant_mode(const Mode& mode) {
  return mode.quant == "int8wo" ? QuantMode::Int8WeightOnly : mode.quant == "fp8" ? QuantMode::Fp8 : QuantMode::None;
}

// KV cache bytes per token: K and V of every layer.
uint64_t kv_bytes_per_token(const Model& model, llmq_kv_dtype kv_dtype) {
  return llmq::kv_bytes_per_token(model.config(), resolve_kv_dtype(model, kv_dtype));
}

// True when the mode's engine would compute exactly what the reference does.
bool is_reference(const Model& model, const Mode& mode) {
  return mode.quant == "none" &&
         resolve_kv_dtype(model, mode.kv_dtype) == resolve_kv_dtype(model, LLMQ_KV_DTYPE_AUTO);
}

// An engine for `mode`. Its KV cache holds a full batch with room for every document's partly
// filled last block, and the longest document's chunked prefill.
std::unique_ptr<Engine> make_engine(std::shared_ptr<const Model> model, const Options& o, const Mode& mode,
                                    int64_t longest_inputs) {
  EngineOptions e;
  e.n_threads = o.threads;
  e.max_batch_tokens = o.batch_tokens;
  e.kv_dtype = mode.kv_dtype;
  const int64_t block = e.kv_block_size;
  const int64_t blocks = std::max(2 * ((o.batch_tokens + block - 1) / block), (longest_inputs + block - 1) / block);
  e.kv_cache_bytes = uint64_t(blocks * block) * kv_bytes_per_token(*model, mode.kv_dtype);
  e.quant = quant_mode(mode);
  return std::make_unique<Engine>(std::move(model), e);
}

// ---- Main --------------------------------------------------------------------------------------

int run(int argc, char** argv) {
  const Options o = parse_options(argc, argv);
  const std::string text = read_corpus(o.data_path, "data file");
  std::vector<std::string_view> paragraphs = split_documents(text);
  if (paragraphs.empty())
    fail(LLMQ_ERR_INVALID_ARGUMENT, "data file '{}' has no documents (only blank lines)", o.data_path);
  if (o.max_docs > 0 && size_t(o.max_docs) < paragraphs.size()) paragraphs.resize(size_t(o.max_docs));

  std::shared_ptr<const Model> model = Model::load(o.model_dir);
  const ModelConfig& config = model->config();
  const Tokenizer* tokenizer = model->tokenizer();
  if (!tokenizer) fail(LLMQ_ERR_UNSUPPORTED, "model '{}' has no tokenizer (tokenizer.json)", o.model_dir);
  const int32_t bos = tokenizer->bos_id() >= 0 ? tokenizer->bos_id() : config.bos_id;
  if (bos < 0) fail(LLMQ_ERR_UNSUPPORTED, "model '{}' has no BOS token", o.model_dir);

  std::vector<std::vector<int32_t>> docs;
  int64_t n_ids = 0, scored = 0, longest_inputs = 0;
  for (size_t i = 0; i < paragraphs.size(); ++i) {
    std::vector<int32_t> ids{bos};
    const std::vector<int32_t> encoded = tokenizer->encode(paragraphs[i], false);
    ids.insert(ids.end(), encoded.begin(), encoded.end());
    const int64_t inputs = int64_t(ids.size()) - 1;
    if (inputs > config.max_position)
      fail(LLMQ_ERR_CONTEXT_OVERFLOW, "document {} has {} ids with BOS; the model's context is {}", i, ids.size(),
           config.max_position);
    n_ids += int64_t(ids.size());
    scored += inputs;
    longest_inputs = std::max(longest_inputs, inputs);
    if (inputs > 0) docs.push_back(std::move(ids));
  }
  if (scored == 0) fail(LLMQ_ERR_INVALID_ARGUMENT, "data file '{}' gives no token to score", o.data_path);

  const Mode& mode = o.mode;
  const Mode reference_mode;
  fmt::print("model: {} ({}, {} layers, vocab {})\n", o.model_dir, config.architecture_name, config.num_layers,
             config.vocab_size);
  const auto start = Clock::now();
  std::unique_ptr<Engine> reference = make_engine(model, o, reference_mode, longest_inputs);
  // The candidate: none when the mode is the reference itself (its logits are the reference's).
  std::unique_ptr<Engine> candidate;
  if (!o.candidate_dir.empty()) {
    std::shared_ptr<const Model> other = Model::load(o.candidate_dir);
    const ModelConfig& oc = other->config();
    if (oc.vocab_size != config.vocab_size || oc.num_layers != config.num_layers || oc.hidden_size != config.hidden_size)
      fail(LLMQ_ERR_INVALID_ARGUMENT, "--candidate-model {} is not a checkpoint of {} (vocab, layers or hidden size differ)",
           o.candidate_dir, o.model_dir);
    candidate = make_engine(other, o, mode, longest_inputs);
  } else if (!is_reference(*model, mode)) {
    candidate = make_engine(model, o, mode, longest_inputs);
  }
  Engine& engine = candidate ? *candidate : *reference;
  fmt::print("reference: quant=none kv-dtype=auto ({}): model_bytes={} kv_bytes_per_token={}\n",
             dtype_name(reference->kv_dtype()), reference->weight_bytes(), reference->kv_bytes_per_token());
  fmt::print("mode: {}quant={} kv-dtype={} ({}): model_bytes={} kv_bytes_per_token={}{}\n",
             o.candidate_dir.empty() ? "" : "candidate-model=" + o.candidate_dir + " ", quant_mode_name(engine.quant()),
             mode.kv_dtype_name, dtype_name(engine.kv_dtype()), engine.weight_bytes(), engine.kv_bytes_per_token(),
             candidate ? "" : " (the reference itself)");
  fmt::print("data: {}: {} documents, {} ids, {} scored tokens\n", o.data_path, paragraphs.size(), n_ids, scored);
  std::fflush(stdout);
  Evaluator evaluator(*reference, candidate.get(), o.batch_tokens);
  Progress progress(scored);
  const Totals t = evaluator.run(docs, progress);
  const double seconds = seconds_since(start);

  const double n = double(t.tokens);
  const double ppl_reference = std::exp(t.nll_reference / n), ppl = std::exp(t.nll_candidate / n);
  // Values clipped by static scales (pre-quantized checkpoints with static activations, FP8 KV).
  const std::vector<uint64_t> sat = engine.saturation(false);
  uint64_t totals[kSaturationCounters] = {};
  std::string clipped_layers;
  for (size_t l = 0; l * kSaturationCounters < sat.size(); ++l) {
    const uint64_t* c = &sat[l * kSaturationCounters];
    for (int j = 0; j < kSaturationCounters; ++j) totals[j] += c[j];
    if (c[kActivationsClipped] || c[kKClipped] || c[kVClipped])
      clipped_layers += fmt::format(" layer{}:act={},k={},v={}", l, c[kActivationsClipped], c[kKClipped], c[kVClipped]);
  }
  if (totals[kActivationsStatic] || totals[kKvStatic])
    fmt::print("saturation: activations clipped {} of {}, K clipped {} and V clipped {} of {} each{}\n",
               totals[kActivationsClipped], totals[kActivationsStatic], totals[kKClipped], totals[kVClipped],
               totals[kKvStatic], clipped_layers.empty() ? " (no layer clips)" : ";" + clipped_layers);
  fmt::print("reference ppl={:.6f}\n", ppl_reference);
  fmt::print("time: {:.2f} s ({:.0f} tokens/s, batch {} tokens, {} threads)\n", seconds, n / seconds, o.batch_tokens,
             o.threads == 0 ? std::string("all") : std::to_string(o.threads));
  fmt::print("ppl={:.6f} ppl_ratio={:.6f} top1={:.6f} kl={:.8f} tokens={}\n", ppl, ppl / ppl_reference,
             double(t.top1) / n, t.kl / n, t.tokens);
  return 0;
}

}  // namespace
}  // namespace llmq

int main(int argc, char** argv) {
  try {
    return llmq::run(argc, argv);
  } catch (const llmq::UsageError& e) {
    std::fprintf(stderr, "llmq-eval: %s\n%s", e.message.c_str(), llmq::kUsage);
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "llmq-eval: %s\n", e.what());
    return 1;
  }
}
