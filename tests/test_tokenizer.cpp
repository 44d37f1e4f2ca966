#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "engine/error.h"
#include "engine/tokenizer.h"

namespace llmq {
namespace {

using json = nlohmann::json;
using Ids = std::vector<int32_t>;

const std::string kModelDir = std::string(LLMQ_SHARED_DIR) + "/models/stories260K";

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in) << path;
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

const Tokenizer& stories() {
  static const std::unique_ptr<Tokenizer> tok = Tokenizer::load(kModelDir);
  return *tok;
}

// What a streaming client prints: token_bytes through a Utf8Stream, one chunk per token.
std::vector<std::string> stream_chunks(const Tokenizer& tok, const Ids& ids) {
  std::vector<std::string> chunks;
  Utf8Stream stream;
  int32_t prev = -1;
  for (int32_t id : ids) {
    chunks.push_back(stream.push(tok.token_bytes(prev, id)));
    prev = id;
  }
  chunks.back() += stream.flush();
  return chunks;
}

std::string stream_text(const Tokenizer& tok, const Ids& ids) {
  std::string text;
  for (const std::string& chunk : stream_chunks(tok, ids)) text += chunk;
  return text;
}

TEST(TokenizerStories, Metadata) {
  const Tokenizer& tok = stories();
  EXPECT_EQ(tok.vocab_size(), 512);
  EXPECT_EQ(tok.bos_id(), 1);
  EXPECT_EQ(tok.eos_id(), 2);
  EXPECT_TRUE(tok.add_bos());
  EXPECT_TRUE(tok.is_special(0));
  EXPECT_TRUE(tok.is_special(1));
  EXPECT_TRUE(tok.is_special(2));
  EXPECT_FALSE(tok.is_special(3));
  EXPECT_FALSE(tok.is_special(511));
  EXPECT_FALSE(tok.is_special(512));
}

TEST(TokenizerStories, EncodesKnownPrompts) {
  const Tokenizer& tok = stories();
  EXPECT_EQ(tok.encode("Once upon a time", true), (Ids{1, 403, 407, 261, 378}));
  EXPECT_EQ(tok.encode("Once upon a time", false), (Ids{403, 407, 261, 378}));
  EXPECT_EQ(tok.encode("", true), (Ids{1}));
  EXPECT_EQ(tok.encode("", false), Ids{});
  // A leading space is kept: the prepended "▁" and the space's "▁" give "▁" + "▁l".
  EXPECT_EQ(tok.encode(" lead", true), (Ids{1, 410, 278, 411, 380}));
  EXPECT_EQ(tok.decode(tok.encode(" lead", true), true), " lead");
}

TEST(TokenizerStories, SpecialTokensInText) {
  const Tokenizer& tok = stories();
  // Added tokens are split out first; each side is normalized on its own (so gets its "▁").
  const Ids ids = tok.encode("a<s>b", true);
  EXPECT_EQ(ids, (Ids{1, 261, 1, 268}));
  EXPECT_EQ(tok.decode(ids, true), "a b");
  EXPECT_EQ(tok.decode(ids, false), "<s> a<s> b");
  EXPECT_EQ(tok.decode({1, 403}, false), "<s> Once");
}

TEST(TokenizerStories, ReferenceCases) {
  const json ref = json::parse(read_file(kModelDir + "/reference/reference_cases.json"));
  const Tokenizer& tok = stories();
  ASSERT_EQ(ref["cases"].size(), 2u);
  for (const json& c : ref["cases"]) {
    SCOPED_TRACE(c["name"].get<std::string>());
    const Ids prompt_ids = c["prompt_token_ids"].get<Ids>();
    EXPECT_EQ(tok.encode(c["prompt"].get<std::string>(), true), prompt_ids);
    const Ids greedy = c["greedy"]["token_ids"].get<Ids>();
    // text_continuation is the greedy ids alone, decoded like tokenizer.json's decoder.
    EXPECT_EQ(tok.decode(greedy, true), c["greedy"]["text_continuation"].get<std::string>());
    for (const char* run : {"greedy", "greedy_long", "greedy_until_bos"}) {
      if (!c.contains(run)) continue;
      SCOPED_TRACE(run);
      Ids seq = prompt_ids;
      const Ids gen = c[run]["token_ids"].get<Ids>();
      seq.insert(seq.end(), gen.begin(), gen.end());
      const std::string text = c[run]["text_full"].get<std::string>();
      EXPECT_EQ(tok.decode(seq, true), text);
      EXPECT_EQ(stream_text(tok, seq), text);
    }
  }
}

TEST(TokenizerStories, RoundTripsValidationText) {
  const std::string text = read_file(std::string(LLMQ_SHARED_DIR) + "/data/tinystories_valid_sample.txt");
  const Tokenizer& tok = stories();
  size_t paragraphs = 0, total_ids = 0;
  for (size_t start = 0; start < text.size();) {
    size_t end = text.find("\n\n", start);
    if (end == std::string::npos) end = text.size();
    const std::string para = text.substr(start, end - start);
    start = end + 2;
    if (para.empty()) continue;
    ++paragraphs;
    const Ids ids = tok.encode(para, true);
    ASSERT_EQ(ids.front(), 1);
    total_ids += ids.size();
    ASSERT_EQ(tok.decode(ids, true), para) << "paragraph " << paragraphs;
    ASSERT_EQ(stream_text(tok, ids), para) << "paragraph " << paragraphs;
  }
  EXPECT_EQ(paragraphs, 4300u);
  EXPECT_EQ(total_ids, 385898u);
}

TEST(TokenizerStories, ByteFallback) {
  const Tokenizer& tok = stories();
  // U+1F600 is F0 9F 98 80; "â" and "€" are pieces, "œ" (C5 93) is not. Byte b is id b + 3.
  const std::string text = "Hi \xF0\x9F\x98\x80 \xC3\xA2\xE2\x82\xAC\xC5\x93quote";
  const Ids ids = tok.encode(text, true);
  EXPECT_EQ(ids, (Ids{1, 320, 417, 410, 0xF0 + 3, 0x9F + 3, 0x98 + 3, 0x80 + 3, 410, 502, 503, 0xC5 + 3,
                      0x93 + 3, 456, 425, 309, 411}));
  EXPECT_EQ(tok.decode(ids, true), text);
  // The stream holds back the emoji's and the "œ"'s bytes until the character is whole.
  EXPECT_EQ(stream_chunks(tok, ids),
            (std::vector<std::string>{"", "H", "i", " ", "", "", "", "\xF0\x9F\x98\x80", " ", "\xC3\xA2",
                                      "\xE2\x82\xAC", "", "\xC5\x93", "q", "u", "ot", "e"}));
  // As Hugging Face: an invalid byte run gives one U+FFFD per byte; a byte space is stripped too.
  EXPECT_EQ(tok.decode({0xE2 + 3, 0x82 + 3, 403}, true), "\xEF\xBF\xBD\xEF\xBF\xBD Once");
  EXPECT_EQ(tok.decode({0x20 + 3, 403}, true), " Once");
  // Bytes that are not UTF-8 at all still encode (as byte tokens) and decode to U+FFFD.
  EXPECT_EQ(tok.encode("\xFF", false), (Ids{410, 0xFF + 3}));
  EXPECT_EQ(tok.decode(tok.encode("\xFF", false), true), "\xEF\xBF\xBD");
}

TEST(TokenizerStories, StreamingStripsAfterBosOnly) {
  const Tokenizer& tok = stories();
  EXPECT_EQ(tok.token_bytes(-1, 403), "Once");
  EXPECT_EQ(tok.token_bytes(1, 403), "Once");
  EXPECT_EQ(tok.token_bytes(261, 403), " Once");
  EXPECT_EQ(tok.token_bytes(403, 1), "");
  EXPECT_EQ(tok.token_bytes(403, 2), "");
  EXPECT_EQ(tok.token_bytes(403, 0x41 + 3), "A");
}

TEST(TokenizerStories, RejectsOutOfRangeIds) {
  const Tokenizer& tok = stories();
  for (auto call : {+[](const Tokenizer& t) { t.token_bytes(-1, 512); }, +[](const Tokenizer& t) { t.token_bytes(-1, -1); },
                    +[](const Tokenizer& t) { t.token_bytes(600, 5); }, +[](const Tokenizer& t) { t.decode({5, 512}, true); }}) {
    try {
      call(tok);
      ADD_FAILURE() << "no error";
    } catch (const Error& e) {
      EXPECT_EQ(e.status(), LLMQ_ERR_INVALID_ARGUMENT);
    }
  }
}

TEST(TokenizerUtf8Stream, HoldsBackIncompleteCharacters) {
  Utf8Stream s;
  EXPECT_EQ(s.push("\xE2\x82"), "");
  EXPECT_EQ(s.push("\xAC!"), "\xE2\x82\xAC!");
  EXPECT_EQ(s.push("\xF0\x9F"), "");
  EXPECT_EQ(s.flush(), "\xEF\xBF\xBD");  // one U+FFFD for the truncated sequence
  EXPECT_EQ(s.flush(), "");
}

TEST(TokenizerUtf8Stream, ReplacesInvalidBytes) {
  Utf8Stream s;
  EXPECT_EQ(s.push("a\x80z"), "a\xEF\xBF\xBDz");
  EXPECT_EQ(s.push("\xE2("), "\xEF\xBF\xBD(");
  EXPECT_EQ(s.push("\xED\xA0\x80"), "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD");  // a surrogate
  EXPECT_EQ(s.push("\xC0\xAF"), "\xEF\xBF\xBD\xEF\xBF\xBD");                  // overlong
  EXPECT_EQ(s.push("\xF0\x9F\x98"), "");
  EXPECT_EQ(s.push("A"), "\xEF\xBF\xBD" "A");
  EXPECT_EQ(s.flush(), "");
}

// Writes tokenizer files into a fresh temporary directory.
class TokenizerFiles : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = ::testing::TempDir() + "llmq_tok_XXXXXX";
    ASSERT_NE(mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
    good_ = json::parse(read_file(kModelDir + "/tokenizer.json"));
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  void write(const std::string& name, const std::string& text) {
    std::ofstream(dir_ + "/" + name, std::ios::binary) << text;
  }
  // Loading must fail with `status` and a message naming `file` and containing `needle`.
  void expect_error(llmq_status status, const std::string& file, const std::string& needle) {
    try {
      Tokenizer::load(dir_);
      ADD_FAILURE() << "no error";
    } catch (const Error& e) {
      EXPECT_EQ(e.status(), status) << e.what();
      EXPECT_NE(std::string(e.what()).find(file), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  }
  void expect_tokenizer_error(const json& j, llmq_status status, const std::string& needle) {
    write("tokenizer.json", j.dump());
    expect_error(status, "tokenizer.json", needle);
  }

  std::string dir_;
  json good_;
};

TEST_F(TokenizerFiles, MissingDirectory) {
  dir_ += "/nonexistent";
  expect_error(LLMQ_ERR_IO, "tokenizer.json", "cannot open");
}

TEST_F(TokenizerFiles, BadJsonSyntax) {
  write("tokenizer.json", "{\"model\": {\"type\": \"BPE\",");
  expect_error(LLMQ_ERR_MODEL_FORMAT, "tokenizer.json", "invalid JSON");
}

TEST_F(TokenizerFiles, MissingModel) {
  good_.erase("model");
  expect_tokenizer_error(good_, LLMQ_ERR_MODEL_FORMAT, "'model' is missing");
}

TEST_F(TokenizerFiles, UnigramModel) {
  good_["model"]["type"] = "Unigram";
  expect_tokenizer_error(good_, LLMQ_ERR_UNSUPPORTED, "Unigram");
}

TEST_F(TokenizerFiles, VocabNotAnObject) {
  good_["model"]["vocab"] = json::array({"a", "b"});
  expect_tokenizer_error(good_, LLMQ_ERR_MODEL_FORMAT, "'model.vocab' must be an object");
}

TEST_F(TokenizerFiles, BadVocabIds) {
  good_["model"]["vocab"]["▁Once"] = "403";
  expect_tokenizer_error(good_, LLMQ_ERR_MODEL_FORMAT, "model.vocab");
  good_["model"]["vocab"]["▁Once"] = int64_t{1} << 40;  // would size a huge table
  expect_tokenizer_error(good_, LLMQ_ERR_MODEL_FORMAT, "model.vocab");
  good_["model"]["vocab"]["▁Once"] = -4;
  expect_tokenizer_error(good_, LLMQ_ERR_MODEL_FORMAT, "model.vocab");
}

TEST_F(TokenizerFiles, BadMerges) {
  json j = good_;
  j["model"]["merges"][3] = "▁ zzz";
  expect_tokenizer_error(j, LLMQ_ERR_MODEL_FORMAT, "'model.merges[3]' names unknown token 'zzz'");
  j["model"]["merges"][3] = 7;
  expect_tokenizer_error(j, LLMQ_ERR_MODEL_FORMAT, "model.merges[3]");
  j["model"]["merges"][3] = "nospace";
  expect_tokenizer_error(j, LLMQ_ERR_MODEL_FORMAT, "model.merges[3]");
  j["model"].erase("merges");
  expect_tokenizer_error(j, LLMQ_ERR_MODEL_FORMAT, "model.merges");
}

TEST_F(TokenizerFiles, UnsupportedPipelineParts) {
  json j = good_;
  j["normalizer"]["normalizers"][1] = {{"type", "NFKC"}};
  expect_tokenizer_error(j, LLMQ_ERR_UNSUPPORTED, "NFKC");
  j = good_;
  j["pre_tokenizer"] = {{"type", "ByteLevel"}};
  expect_tokenizer_error(j, LLMQ_ERR_UNSUPPORTED, "ByteLevel");
  j = good_;
  j["decoder"]["decoders"][0] = {{"type", "WordPiece"}};
  expect_tokenizer_error(j, LLMQ_ERR_UNSUPPORTED, "WordPiece");
  j = good_;
  j["added_tokens"][1]["id"] = -1;
  expect_tokenizer_error(j, LLMQ_ERR_MODEL_FORMAT, "added_tokens[1].id");
  j = good_;
  j["normalizer"]["normalizers"][1]["pattern"] = 5;
  expect_tokenizer_error(j, LLMQ_ERR_MODEL_FORMAT, "normalizer.normalizers[1].pattern");
}

TEST_F(TokenizerFiles, MergesAsArraysAndConfig) {
  json j = good_;
  for (json& m : j["model"]["merges"]) {
    const std::string s = m.get<std::string>();
    const size_t space = s.find(' ');
    m = json::array({s.substr(0, space), s.substr(space + 1)});
  }
  write("tokenizer.json", j.dump());
  // No tokenizer_config.json: BOS "<s>" is added by default.
  auto tok = Tokenizer::load(dir_);
  EXPECT_TRUE(tok->add_bos());
  EXPECT_EQ(tok->eos_id(), 2);
  const std::string text = "Lily and her mom went to the park to play. They played together and had fun.";
  EXPECT_EQ(tok->encode(text, true), stories().encode(text, true));
  EXPECT_EQ(tok->encode("Once upon a time", true), (Ids{1, 403, 407, 261, 378}));

  write("tokenizer_config.json", R"({"add_bos_token": false, "add_eos_token": true, "eos_token": {"content": "</s>"}})");
  tok = Tokenizer::load(dir_);
  EXPECT_FALSE(tok->add_bos());
  EXPECT_EQ(tok->encode("Once upon a time", true), (Ids{403, 407, 261, 378, 2}));

  write("tokenizer_config.json", R"({"add_bos_token": "yes"})");
  expect_error(LLMQ_ERR_MODEL_FORMAT, "tokenizer_config.json", "add_bos_token");
  write("tokenizer_config.json", R"({"bos_token": "<nope>"})");
  expect_error(LLMQ_ERR_MODEL_FORMAT, "tokenizer_config.json", "bos_token");
}

}  // namespace
}  // namespace llmq
