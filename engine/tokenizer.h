// Tokenizer for Hugging Face tokenizer.json files with a BPE model (the Llama 2 / SentencePiece
// style: "▁" for spaces, <0xXX> byte-fallback pieces, no pre-tokenizer). Encoding and decoding
// match the Hugging Face `tokenizers` library for such files.
//
// Limits (rejected at load with LLMQ_ERR_UNSUPPORTED unless said otherwise): models other than
// BPE, a pre_tokenizer, normalizers other than Prepend / Replace(String) / Sequence, decoders
// other than Replace(String) / ByteFallback / Fuse / Strip(start only) in a Sequence. Added
// tokens are all matched on the raw text (their normalized / lstrip / rstrip flags are ignored);
// BPE dropout is ignored (it only matters for training).
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace llmq {

namespace detail {
// A normalizer or decoder step: Prepend `content` to non-empty text, or Replace every `pattern`.
struct Rewrite {
  bool prepend = false;
  std::string pattern;
  std::string content;
};
// The decoder pipeline reduced to what it does to a token sequence.
struct DecoderSpec {
  std::vector<Rewrite> replace;  // Replace steps, applied to each token's text
  bool byte_fallback = false;    // <0xXX> tokens become raw bytes
  std::string strip_content;     // Strip: remove up to strip_count leading strip_content
  int strip_count = 0;
};
}  // namespace detail

class Tokenizer {
 public:
  // Reads DIR/tokenizer.json and DIR/tokenizer_config.json if present (add_bos_token,
  // add_eos_token, bos_token, eos_token; defaults: add BOS "<s>", no EOS "</s>").
  static std::unique_ptr<Tokenizer> load(const std::string& model_dir);

  int32_t vocab_size() const { return static_cast<int32_t>(id_to_token_.size()); }
  int32_t bos_id() const { return bos_id_; }  // -1 if none
  int32_t eos_id() const { return eos_id_; }  // -1 if none
  bool add_bos() const { return add_bos_; }

  // Encodes text; add_special adds BOS (and EOS) as tokenizer_config.json says. Text that is not
  // valid UTF-8 is accepted: each invalid byte becomes a byte-fallback token (or unk).
  std::vector<int32_t> encode(std::string_view text, bool add_special) const;
  // Decodes ids to UTF-8 text as Hugging Face decode(ids, skip_special_tokens) does. Throws
  // LLMQ_ERR_INVALID_ARGUMENT on an id outside [0, vocab_size).
  std::string decode(const std::vector<int32_t>& ids, bool skip_special) const;
  // Streaming: the bytes token `id` adds to the output after `prev_id` (-1 at the start). Special
  // tokens give ""; a byte-fallback token gives its one byte (feed the result through Utf8Stream);
  // the decoder's leading-space strip applies at the start and after BOS. Throws on a bad id.
  std::string token_bytes(int32_t prev_id, int32_t id) const;
  bool is_special(int32_t id) const;

 private:
  struct Merge {
    int32_t rank;
    int32_t new_id;
  };
  struct AddedToken {
    std::string content;
    int32_t id;
  };

  const AddedToken* match_added(std::string_view text, size_t pos) const;
  void encode_segment(std::string_view segment, std::vector<int32_t>& out) const;
  void bpe(std::string_view word, std::vector<int32_t>& out) const;
  std::string normalize(std::string_view text) const;
  std::string decode_piece(int32_t id) const;  // the decoder's Replace steps applied
  int byte_value(int32_t id) const;            // 0..255 for a <0xXX> token under ByteFallback, else -1
  std::string_view strip_start(std::string_view s) const;
  void check_id(int32_t id) const;

  std::vector<std::string> id_to_token_;
  std::vector<bool> special_;
  std::unordered_map<std::string, int32_t> vocab_;  // model vocabulary (for BPE)
  std::unordered_map<uint64_t, Merge> merges_;      // (left id << 32 | right id) -> merge
  std::array<int32_t, 256> byte_ids_{};             // id of <0xXX>, -1 if absent
  std::vector<AddedToken> added_;                   // sorted longest first, for leftmost-longest
  int32_t unk_id_ = -1;
  bool byte_fallback_ = false;
  bool fuse_unk_ = false;
  bool ignore_merges_ = false;

  std::array<bool, 256> added_first_{};             // first bytes of added tokens, to skip fast
  std::vector<detail::Rewrite> normalizer_;
  detail::DecoderSpec decoder_;

  int32_t bos_id_ = -1;
  int32_t eos_id_ = -1;
  bool add_bos_ = false;
  bool add_eos_ = false;
};

// Holds back incomplete UTF-8 sequences (byte-fallback tokens emit single bytes) so a stream only
// ever emits whole characters. Invalid bytes become U+FFFD, one per maximal invalid subpart.
class Utf8Stream {
 public:
  std::string push(std::string_view bytes);  // the complete characters available so far
  std::string flush();                       // the rest (an incomplete tail becomes U+FFFD)

 private:
  std::string drain(bool final);
  std::string pending_;
};

}  // namespace llmq
