#include "engine/tokenizer.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <queue>

#include <nlohmann/json.hpp>

#include "engine/error.h"

namespace llmq {
namespace {

using json = nlohmann::json;

// Ids above this are rejected: id_to_token_ is sized by the largest id, and real vocabularies
// stay far below it (Gemma's 256K is among the largest).
constexpr int64_t kMaxVocab = int64_t{1} << 21;
constexpr int kMaxNesting = 8;  // Sequence normalizers / decoders inside one another
constexpr const char* kReplacementChar = "\xEF\xBF\xBD";  // U+FFFD

enum class Utf8 { kValid, kTruncated, kInvalid };

// Scans the UTF-8 sequence at the start of non-empty s. kValid: len is its length. kTruncated: s
// ends inside a sequence that is valid so far (len = s.size()). kInvalid: len is the length of
// the maximal invalid subpart (Unicode's recommended unit for one U+FFFD).
Utf8 scan_utf8(std::string_view s, size_t& len) {
  const auto c = static_cast<uint8_t>(s[0]);
  size_t need = 0;
  uint8_t lo = 0x80, hi = 0xBF;  // allowed range of the next byte (stricter after some leads)
  len = 1;
  if (c < 0x80) return Utf8::kValid;
  if (c >= 0xC2 && c <= 0xDF) {
    need = 2;
  } else if (c >= 0xE0 && c <= 0xEF) {
    need = 3;
    if (c == 0xE0) lo = 0xA0;  // overlong
    if (c == 0xED) hi = 0x9F;  // surrogates
  } else if (c >= 0xF0 && c <= 0xF4) {
    need = 4;
    if (c == 0xF0) lo = 0x90;  // overlong
    if (c == 0xF4) hi = 0x8F;  // above U+10FFFF
  } else {
    return Utf8::kInvalid;
  }
  for (; len < need; ++len) {
    if (len == s.size()) return Utf8::kTruncated;
    const auto x = static_cast<uint8_t>(s[len]);
    if (x < lo || x > hi) return Utf8::kInvalid;
    lo = 0x80;
    hi = 0xBF;
  }
  return Utf8::kValid;
}

bool valid_utf8(std::string_view s) {
  for (size_t i = 0, len = 0; i < s.size(); i += len) {
    if (scan_utf8(s.substr(i), len) != Utf8::kValid) return false;
  }
  return true;
}

std::string replace_all(std::string_view s, std::string_view pattern, std::string_view content) {
  std::string out;
  size_t start = 0;
  for (size_t hit; (hit = s.find(pattern, start)) != std::string_view::npos; start = hit + pattern.size()) {
    out.append(s.substr(start, hit - start)).append(content);
  }
  out.append(s.substr(start));
  return out;
}

uint64_t pair_key(int32_t left, int32_t right) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right);
}

json read_json(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(LLMQ_ERR_IO, "cannot open {}: {}", path, std::strerror(errno));
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) fail(LLMQ_ERR_IO, "cannot read {}", path);
  try {
    return json::parse(text);
  } catch (const json::exception& e) {
    fail(LLMQ_ERR_MODEL_FORMAT, "{}: invalid JSON: {}", path, e.what());
  }
}

// Typed access to untrusted JSON: every failure names the file and the field.
struct Reader {
  const std::string& path;

  [[noreturn]] void bad(const std::string& field, std::string_view what) const {
    fail(LLMQ_ERR_MODEL_FORMAT, "{}: '{}' {}", path, field, what);
  }
  // obj[key], or nullptr when obj has no such key (obj must be an object).
  static const json* find(const json& obj, const char* key) {
    auto it = obj.find(key);
    return it == obj.end() ? nullptr : &*it;
  }
  const json& object(const json& v, const std::string& field) const {
    if (!v.is_object()) bad(field, "must be an object");
    return v;
  }
  const json& need(const json& obj, const char* key, const std::string& field) const {
    const json* v = find(obj, key);
    if (!v) bad(field, "is missing");
    return *v;
  }
  std::string string(const json& v, const std::string& field) const {
    if (!v.is_string()) bad(field, "must be a string");
    return v.get<std::string>();
  }
  bool boolean(const json& obj, const char* key, bool fallback, const std::string& field) const {
    const json* v = find(obj, key);
    if (!v || v->is_null()) return fallback;
    if (!v->is_boolean()) bad(field, "must be true or false");
    return v->get<bool>();
  }
  int32_t id(const json& v, const std::string& field) const {
    if (!v.is_number_integer()) bad(field, "must be an integer token id");
    // is_number_integer covers unsigned too; read both ways to avoid overflow on huge values.
    if (v.is_number_unsigned() ? v.get<uint64_t>() >= static_cast<uint64_t>(kMaxVocab)
                               : (v.get<int64_t>() < 0 || v.get<int64_t>() >= kMaxVocab)) {
      bad(field, fmt::format("must be a token id in [0, {})", kMaxVocab));
    }
    return static_cast<int32_t>(v.get<int64_t>());
  }
  std::string replace_pattern(const json& step, const std::string& field) const {
    const json& pattern = object(need(step, "pattern", field + ".pattern"), field + ".pattern");
    if (find(pattern, "Regex")) fail(LLMQ_ERR_UNSUPPORTED, "{}: '{}.pattern': Regex patterns are not supported", path, field);
    std::string s = string(need(pattern, "String", field + ".pattern.String"), field + ".pattern.String");
    if (s.empty()) bad(field + ".pattern.String", "must not be empty");
    return s;
  }
  std::string type(const json& step, const std::string& field, int depth) const {
    object(step, field);
    if (depth > kMaxNesting) bad(field, "is nested too deeply");
    return string(need(step, "type", field + ".type"), field + ".type");
  }

  void normalizer(const json& n, const std::string& field, int depth, std::vector<detail::Rewrite>& out) const {
    if (n.is_null()) return;
    const std::string t = type(n, field, depth);
    if (t == "Sequence") {
      const json& list = need(n, "normalizers", field + ".normalizers");
      if (!list.is_array()) bad(field + ".normalizers", "must be an array");
      for (size_t i = 0; i < list.size(); ++i) {
        normalizer(list[i], fmt::format("{}.normalizers[{}]", field, i), depth + 1, out);
      }
    } else if (t == "Prepend") {
      out.push_back({true, "", string(need(n, "prepend", field + ".prepend"), field + ".prepend")});
    } else if (t == "Replace") {
      out.push_back({false, replace_pattern(n, field), string(need(n, "content", field + ".content"), field + ".content")});
    } else {
      fail(LLMQ_ERR_UNSUPPORTED, "{}: '{}': normalizer type '{}' is not supported", path, field, t);
    }
  }

  void decoder(const json& d, const std::string& field, int depth, detail::DecoderSpec& out) const {
    const std::string t = type(d, field, depth);
    if (t == "Sequence") {
      const json& list = need(d, "decoders", field + ".decoders");
      if (!list.is_array()) bad(field + ".decoders", "must be an array");
      for (size_t i = 0; i < list.size(); ++i) {
        decoder(list[i], fmt::format("{}.decoders[{}]", field, i), depth + 1, out);
      }
    } else if (t == "Replace") {
      out.replace.push_back({false, replace_pattern(d, field), string(need(d, "content", field + ".content"), field + ".content")});
    } else if (t == "ByteFallback") {
      out.byte_fallback = true;
    } else if (t == "Fuse") {
      // Joining the tokens is what decode() does anyway.
    } else if (t == "Strip") {
      out.strip_content = string(need(d, "content", field + ".content"), field + ".content");
      size_t len = 0;
      if (out.strip_content.empty() || scan_utf8(out.strip_content, len) != Utf8::kValid ||
          len != out.strip_content.size()) {
        bad(field + ".content", "must be one character");
      }
      const json& start = need(d, "start", field + ".start");
      const json& stop = need(d, "stop", field + ".stop");
      if (!start.is_number_unsigned() || start.get<uint64_t>() > 1024) bad(field + ".start", "must be a small count");
      if (!stop.is_number_unsigned()) bad(field + ".stop", "must be a count");
      if (stop.get<uint64_t>() != 0) fail(LLMQ_ERR_UNSUPPORTED, "{}: '{}.stop': only stop 0 is supported", path, field);
      out.strip_count = static_cast<int>(start.get<uint64_t>());
    } else {
      fail(LLMQ_ERR_UNSUPPORTED, "{}: '{}': decoder type '{}' is not supported", path, field, t);
    }
  }
};

}  // namespace

std::unique_ptr<Tokenizer> Tokenizer::load(const std::string& model_dir) {
  const std::string path = (std::filesystem::path(model_dir) / "tokenizer.json").string();
  const json root = read_json(path);
  const Reader r{path};
  r.object(root, "(root)");
  auto tok = std::unique_ptr<Tokenizer>(new Tokenizer());

  const json& model = r.object(r.need(root, "model", "model"), "model");
  // Hugging Face infers a missing type from the fields; a vocab object plus merges means BPE.
  if (const json* type = Reader::find(model, "type")) {
    const std::string t = r.string(*type, "model.type");
    if (t != "BPE") fail(LLMQ_ERR_UNSUPPORTED, "{}: 'model.type' is '{}': only BPE is supported", path, t);
  }
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    const json* v = Reader::find(model, key);
    if (v && !v->is_null() && !(v->is_string() && v->get<std::string>().empty())) {
      fail(LLMQ_ERR_UNSUPPORTED, "{}: 'model.{}' is not supported", path, key);
    }
  }
  tok->byte_fallback_ = r.boolean(model, "byte_fallback", false, "model.byte_fallback");
  tok->fuse_unk_ = r.boolean(model, "fuse_unk", false, "model.fuse_unk");
  tok->ignore_merges_ = r.boolean(model, "ignore_merges", false, "model.ignore_merges");

  int32_t max_id = -1;
  const json& vocab = r.object(r.need(model, "vocab", "model.vocab"), "model.vocab");
  for (const auto& [token, value] : vocab.items()) {
    const int32_t id = r.id(value, fmt::format("model.vocab[\"{}\"]", token));
    tok->vocab_.emplace(token, id);
    max_id = std::max(max_id, id);
  }

  std::vector<AddedToken> added;
  std::vector<bool> added_special;
  if (const json* list = Reader::find(root, "added_tokens"); list && !list->is_null()) {
    if (!list->is_array()) r.bad("added_tokens", "must be an array");
    for (size_t i = 0; i < list->size(); ++i) {
      const std::string field = fmt::format("added_tokens[{}]", i);
      const json& entry = r.object((*list)[i], field);
      added.push_back({r.string(r.need(entry, "content", field + ".content"), field + ".content"),
                       r.id(r.need(entry, "id", field + ".id"), field + ".id")});
      added_special.push_back(r.boolean(entry, "special", false, field + ".special"));
      max_id = std::max(max_id, added.back().id);
    }
  }

  tok->id_to_token_.resize(static_cast<size_t>(max_id + 1));
  tok->special_.resize(tok->id_to_token_.size(), false);
  for (const auto& [token, value] : vocab.items()) {
    tok->id_to_token_[value.get<int32_t>()] = token;  // ids were checked above
  }
  // Added tokens take precedence when an id is in both, as in Hugging Face.
  for (size_t i = 0; i < added.size(); ++i) {
    tok->id_to_token_[added[i].id] = added[i].content;
    tok->special_[added[i].id] = added_special[i];
    if (!added[i].content.empty()) tok->added_.push_back(added[i]);
  }
  // Longest first so that the first match at a position is the longest (leftmost-longest).
  std::stable_sort(tok->added_.begin(), tok->added_.end(),
                   [](const AddedToken& a, const AddedToken& b) { return a.content.size() > b.content.size(); });
  for (const AddedToken& a : tok->added_) tok->added_first_[static_cast<uint8_t>(a.content[0])] = true;

  const json* merges = Reader::find(model, "merges");
  if (!merges || !merges->is_array()) r.bad("model.merges", "must be an array");
  auto lookup = [&](const std::string& token, const std::string& field) {
    auto it = tok->vocab_.find(token);
    if (it == tok->vocab_.end()) r.bad(field, fmt::format("names unknown token '{}'", token));
    return it->second;
  };
  for (size_t i = 0; i < merges->size(); ++i) {
    const std::string field = fmt::format("model.merges[{}]", i);
    const json& m = (*merges)[i];
    std::string a, b;
    if (m.is_string()) {  // "a b" (older files)
      const std::string s = m.get<std::string>();
      const size_t space = s.find(' ');
      if (space == std::string::npos) r.bad(field, "must be \"a b\"");
      a = s.substr(0, space);
      b = s.substr(space + 1);
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {  // [a, b]
      a = m[0].get<std::string>();
      b = m[1].get<std::string>();
    } else {
      r.bad(field, "must be \"a b\" or [a, b]");
    }
    // A later duplicate overrides an earlier one, as when Hugging Face collects them into a map.
    const int32_t left = lookup(a, field), right = lookup(b, field), merged = lookup(a + b, field);
    tok->merges_[pair_key(left, right)] = {static_cast<int32_t>(i), merged};
  }

  if (const json* unk = Reader::find(model, "unk_token"); unk && !unk->is_null()) {
    tok->unk_id_ = lookup(r.string(*unk, "model.unk_token"), "model.unk_token");
  }
  for (int b = 0; b < 256; ++b) {
    auto it = tok->vocab_.find(fmt::format("<0x{:02X}>", b));
    tok->byte_ids_[b] = it == tok->vocab_.end() ? -1 : it->second;
  }

  if (const json* pre = Reader::find(root, "pre_tokenizer"); pre && !pre->is_null()) {
    const std::string t = pre->is_object() && pre->contains("type") && (*pre)["type"].is_string()
                              ? (*pre)["type"].get<std::string>() : "?";
    fail(LLMQ_ERR_UNSUPPORTED, "{}: 'pre_tokenizer' ({}) is not supported", path, t);
  }
  if (const json* n = Reader::find(root, "normalizer")) r.normalizer(*n, "normalizer", 0, tok->normalizer_);
  const json* dec = Reader::find(root, "decoder");
  if (!dec || dec->is_null()) fail(LLMQ_ERR_UNSUPPORTED, "{}: a missing 'decoder' is not supported", path);
  r.decoder(*dec, "decoder", 0, tok->decoder_);

  // tokenizer_config.json is optional; without it, "<s>" is BOS (added) and "</s>" EOS, if present.
  bool add_bos = true, add_eos = false;
  std::string names[2] = {"<s>", "</s>"};
  bool named[2] = {false, false};  // named explicitly in the config, so it must exist
  const char* keys[2] = {"bos_token", "eos_token"};
  const std::string config_path = (std::filesystem::path(model_dir) / "tokenizer_config.json").string();
  const Reader c{config_path};
  std::error_code ec;
  if (std::filesystem::exists(config_path, ec)) {
    const json config = read_json(config_path);
    c.object(config, "(root)");
    add_bos = c.boolean(config, "add_bos_token", true, "add_bos_token");
    add_eos = c.boolean(config, "add_eos_token", false, "add_eos_token");
    // A special token is written as "<s>" or as {"content": "<s>", ...}; null means none.
    for (int k = 0; k < 2; ++k) {
      const json* v = Reader::find(config, keys[k]);
      if (!v) continue;
      named[k] = !v->is_null();
      const std::string field = fmt::format("{}.content", keys[k]);
      if (v->is_null()) names[k].clear();
      else if (v->is_object()) names[k] = c.string(c.need(*v, "content", field), field);
      else names[k] = c.string(*v, keys[k]);
    }
  }
  int32_t ids[2] = {-1, -1};
  for (int k = 0; k < 2; ++k) {
    if (names[k].empty()) continue;
    for (const AddedToken& a : tok->added_) {
      if (a.content == names[k]) ids[k] = a.id;
    }
    if (auto it = tok->vocab_.find(names[k]); ids[k] < 0 && it != tok->vocab_.end()) ids[k] = it->second;
    if (ids[k] < 0 && named[k]) c.bad(keys[k], fmt::format("names unknown token '{}'", names[k]));
  }
  tok->bos_id_ = ids[0];
  tok->eos_id_ = ids[1];
  tok->add_bos_ = add_bos && tok->bos_id_ >= 0;
  tok->add_eos_ = add_eos && tok->eos_id_ >= 0;
  return tok;
}

const Tokenizer::AddedToken* Tokenizer::match_added(std::string_view text, size_t pos) const {
  if (!added_first_[static_cast<uint8_t>(text[pos])]) return nullptr;
  for (const AddedToken& a : added_) {
    if (text.compare(pos, a.content.size(), a.content) == 0) return &a;
  }
  return nullptr;
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_special) const {
  std::vector<int32_t> out;
  if (add_special && add_bos_) out.push_back(bos_id_);
  // Added tokens are split out of the raw text first; the pieces between them are tokenized alone.
  size_t start = 0;
  for (size_t i = 0; i < text.size();) {
    const AddedToken* hit = match_added(text, i);
    if (!hit) {
      ++i;
      continue;
    }
    encode_segment(text.substr(start, i - start), out);
    out.push_back(hit->id);
    i += hit->content.size();
    start = i;
  }
  encode_segment(text.substr(start), out);
  if (add_special && add_eos_) out.push_back(eos_id_);
  return out;
}

std::string Tokenizer::normalize(std::string_view text) const {
  std::string s(text);
  for (const detail::Rewrite& step : normalizer_) {
    if (!step.prepend) s = replace_all(s, step.pattern, step.content);
    else if (!s.empty()) s.insert(0, step.content);
  }
  return s;
}

void Tokenizer::encode_segment(std::string_view segment, std::vector<int32_t>& out) const {
  if (segment.empty()) return;
  bpe(normalize(segment), out);
}

// BPE over the characters of one word, as Hugging Face's Word::merge_all: a heap of candidate
// merges ordered by (rank, position) over a linked list of symbols, O(n log n).
void Tokenizer::bpe(std::string_view word, std::vector<int32_t>& out) const {
  if (word.empty()) return;
  if (ignore_merges_) {
    auto it = vocab_.find(std::string(word));
    if (it != vocab_.end()) {
      out.push_back(it->second);
      return;
    }
  }
  struct Symbol {
    int32_t id, prev, next;
    bool alive;
  };
  std::vector<Symbol> syms;
  auto add = [&](int32_t id) {
    const auto n = static_cast<int32_t>(syms.size());
    syms.push_back({id, n - 1, n + 1, true});
  };
  bool unk_pending = false;  // fuse_unk turns a run of unknown characters into one unk
  auto flush_unk = [&] {
    if (unk_pending) add(unk_id_);
    unk_pending = false;
  };
  for (size_t i = 0, len = 0; i < word.size(); i += len) {
    // An invalid UTF-8 byte counts as a character of its own, which byte fallback can still encode.
    if (scan_utf8(word.substr(i), len) != Utf8::kValid) len = 1;
    const std::string ch(word.substr(i, len));
    if (auto it = vocab_.find(ch); it != vocab_.end()) {
      flush_unk();
      add(it->second);
      continue;
    }
    if (byte_fallback_ && std::all_of(ch.begin(), ch.end(), [&](char c) { return byte_ids_[static_cast<uint8_t>(c)] >= 0; })) {
      flush_unk();
      for (char c : ch) add(byte_ids_[static_cast<uint8_t>(c)]);
      continue;
    }
    if (unk_id_ < 0) continue;  // Hugging Face drops the character when there is no unk token
    if (!fuse_unk_) flush_unk();
    unk_pending = true;
  }
  flush_unk();
  if (syms.empty()) return;
  syms.back().next = -1;

  struct Candidate {
    int32_t rank, pos, new_id;
  };
  auto later = [](const Candidate& a, const Candidate& b) { return a.rank != b.rank ? a.rank > b.rank : a.pos > b.pos; };
  std::priority_queue<Candidate, std::vector<Candidate>, decltype(later)> queue(later);
  auto push_pair = [&](int32_t pos) {
    const int32_t next = syms[pos].next;
    if (next < 0) return;
    auto it = merges_.find(pair_key(syms[pos].id, syms[next].id));
    if (it != merges_.end()) queue.push({it->second.rank, pos, it->second.new_id});
  };
  for (int32_t pos = 0; pos + 1 < static_cast<int32_t>(syms.size()); ++pos) push_pair(pos);
  while (!queue.empty()) {
    const Candidate top = queue.top();
    queue.pop();
    Symbol& left = syms[top.pos];
    if (!left.alive || left.next < 0) continue;
    Symbol& right = syms[left.next];
    // Skip entries made stale by an earlier merge (the pair at pos has changed since).
    auto it = merges_.find(pair_key(left.id, right.id));
    if (it == merges_.end() || it->second.new_id != top.new_id) continue;
    left.id = top.new_id;
    left.next = right.next;
    right.alive = false;
    if (left.next >= 0) syms[left.next].prev = top.pos;
    if (left.prev >= 0) push_pair(left.prev);
    push_pair(top.pos);
  }
  for (int32_t pos = 0; pos >= 0; pos = syms[pos].next) out.push_back(syms[pos].id);
}

void Tokenizer::check_id(int32_t id) const {
  if (id < 0 || id >= vocab_size()) {
    fail(LLMQ_ERR_INVALID_ARGUMENT, "token id {} is out of range [0, {})", id, vocab_size());
  }
}

bool Tokenizer::is_special(int32_t id) const { return id >= 0 && id < vocab_size() && special_[id]; }

int Tokenizer::byte_value(int32_t id) const {
  if (!decoder_.byte_fallback) return -1;
  const std::string& t = id_to_token_[id];
  if (t.size() != 6 || t.compare(0, 3, "<0x") != 0 || t[5] != '>') return -1;
  auto hex = [](char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  const int hi = hex(t[3]), lo = hex(t[4]);
  return hi < 0 || lo < 0 ? -1 : hi * 16 + lo;
}

std::string Tokenizer::decode_piece(int32_t id) const {
  std::string s = id_to_token_[id];
  for (const detail::Rewrite& step : decoder_.replace) s = replace_all(s, step.pattern, step.content);
  return s;
}

std::string_view Tokenizer::strip_start(std::string_view s) const {
  for (int i = 0; i < decoder_.strip_count && s.substr(0, decoder_.strip_content.size()) == decoder_.strip_content; ++i) {
    s.remove_prefix(decoder_.strip_content.size());
  }
  return s;
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids, bool skip_special) const {
  std::string out, bytes;
  // As Hugging Face's ByteFallback: a run of byte tokens that is not valid UTF-8 as a whole
  // becomes one U+FFFD per byte.
  auto flush_bytes = [&] {
    if (valid_utf8(bytes)) out += bytes;
    else for (size_t i = 0; i < bytes.size(); ++i) out += kReplacementChar;
    bytes.clear();
  };
  for (int32_t id : ids) {
    check_id(id);
    if (skip_special && special_[id]) continue;
    if (const int b = byte_value(id); b >= 0) {
      bytes += static_cast<char>(b);
      continue;
    }
    flush_bytes();
    out += decode_piece(id);
  }
  flush_bytes();
  return std::string(strip_start(out));
}

std::string Tokenizer::token_bytes(int32_t prev_id, int32_t id) const {
  check_id(id);
  if (prev_id != -1) check_id(prev_id);
  if (special_[id]) return "";
  const int b = byte_value(id);
  std::string piece = b >= 0 ? std::string(1, static_cast<char>(b)) : decode_piece(id);
  if (prev_id == -1 || prev_id == bos_id_) return std::string(strip_start(piece));
  return piece;
}

std::string Utf8Stream::push(std::string_view bytes) {
  pending_.append(bytes);
  return drain(false);
}

std::string Utf8Stream::flush() { return drain(true); }

std::string Utf8Stream::drain(bool final) {
  std::string out;
  size_t i = 0;
  for (size_t len = 0; i < pending_.size(); i += len) {
    const Utf8 r = scan_utf8(std::string_view(pending_).substr(i), len);
    if (r == Utf8::kTruncated && !final) break;  // the rest may still arrive
    if (r == Utf8::kValid) out.append(pending_, i, len);
    else out += kReplacementChar;
  }
  pending_.erase(0, i);
  return out;
}

}  // namespace llmq
