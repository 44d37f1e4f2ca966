#include "engine/safetensors.h"

#include <sys/stat.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <map>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "engine/error.h"

namespace llmq {
namespace {

class SafetensorsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = ::testing::TempDir() + "llmq_st_XXXXXX";
    ASSERT_NE(mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  std::string write_raw(const std::string& name, const std::string& bytes) {
    std::string path = dir_ + "/" + name;
    std::ofstream(path, std::ios::binary).write(bytes.data(), std::streamsize(bytes.size()));
    return path;
  }

  // A file whose header length field says `length`, followed by `rest`.
  std::string write_with_length(const std::string& name, uint64_t length, const std::string& rest) {
    std::string bytes(8, '\0');
    for (int i = 0; i < 8; ++i) bytes[i] = char(length >> (8 * i));
    return write_raw(name, bytes + rest);
  }

  // A well-formed frame around `header` and `data`.
  std::string write_file(const std::string& name, const std::string& header, const std::string& data) {
    return write_with_length(name, header.size(), header + data);
  }

  // open(path) must fail with `status` and a message holding the path and every one of `parts`.
  static void expect_error(const std::string& path, llmq_status status, std::initializer_list<const char*> parts) {
    try {
      SafetensorsFile::open(path);
      ADD_FAILURE() << path << ": opened without error";
    } catch (const Error& e) {
      EXPECT_EQ(e.status(), status) << e.what();
      std::string message = e.what();
      EXPECT_NE(message.find(path), std::string::npos) << message;
      for (const char* part : parts)
        EXPECT_NE(message.find(part), std::string::npos) << "no '" << part << "' in: " << message;
    }
  }

  std::string dir_;
};

TEST_F(SafetensorsTest, RoundTrip) {
  const float weights[6] = {1, 2, 3, -4, 5.5f, 6};
  const uint16_t scale = f32_to_bf16(0.25f);
  const int8_t none[1] = {0};
  std::string path = dir_ + "/rt.safetensors";
  write_safetensors(path,
                    {{"layer.weight", DType::F32, {2, 3}, weights},
                     {"layer.scale", DType::BF16, {}, &scale},
                     {"layer.empty", DType::I8, {0, 5}, none}},
                    {{"format", "pt"}, {"note", "round trip"}});
  EXPECT_FALSE(std::filesystem::exists(path + ".tmp"));

  auto file = SafetensorsFile::open(path);
  EXPECT_EQ(file->path(), path);
  EXPECT_EQ(file->metadata(), (std::map<std::string, std::string>{{"format", "pt"}, {"note", "round trip"}}));
  const auto& ts = file->tensors();
  ASSERT_EQ(ts.size(), 3u);
  // Sorted by offset, which is the write order here.
  EXPECT_EQ(ts[0].name, "layer.weight");
  EXPECT_EQ(ts[1].name, "layer.scale");
  EXPECT_EQ(ts[2].name, "layer.empty");

  const TensorInfo* w = file->find("layer.weight");
  ASSERT_EQ(w, &ts[0]);
  EXPECT_EQ(w->dtype, DType::F32);
  EXPECT_EQ(w->shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(w->nbytes, 24u);
  EXPECT_EQ(std::memcmp(w->data, weights, 24), 0);
  // The mapping is page-aligned and the data section starts at a multiple of 64.
  EXPECT_EQ(reinterpret_cast<uintptr_t>(w->data) % 64, 0u);

  const TensorInfo* s = file->find("layer.scale");
  ASSERT_NE(s, nullptr);
  EXPECT_EQ(s->dtype, DType::BF16);
  EXPECT_TRUE(s->shape.empty());
  EXPECT_EQ(s->nbytes, 2u);
  EXPECT_EQ(static_cast<const char*>(s->data) - static_cast<const char*>(w->data), 24);
  EXPECT_EQ(std::memcmp(s->data, &scale, 2), 0);

  const TensorInfo* e = file->find("layer.empty");
  ASSERT_NE(e, nullptr);
  EXPECT_EQ(e->dtype, DType::I8);
  EXPECT_EQ(e->shape, (std::vector<int64_t>{0, 5}));
  EXPECT_EQ(e->nbytes, 0u);
  EXPECT_EQ(static_cast<const char*>(e->data) - static_cast<const char*>(w->data), 26);

  EXPECT_EQ(file->find("missing"), nullptr);
  EXPECT_EQ(file->find("__metadata__"), nullptr);
  // Header length field + padded header is a multiple of 64, then 26 bytes of data.
  EXPECT_EQ(file->file_size() % 64, 26u);
  EXPECT_EQ(uint64_t(std::filesystem::file_size(path)), file->file_size());
}

TEST_F(SafetensorsTest, NoMetadataAndOverwrite) {
  const int32_t v = 7;
  std::string path = dir_ + "/m.safetensors";
  write_safetensors(path, {{"a", DType::I32, {1}, &v}}, {{"k", "v"}});
  write_safetensors(path, {{"b", DType::I32, {1}, &v}});  // replaces the file
  auto file = SafetensorsFile::open(path);
  EXPECT_TRUE(file->metadata().empty());
  ASSERT_EQ(file->tensors().size(), 1u);
  EXPECT_EQ(file->tensors()[0].name, "b");
}

TEST_F(SafetensorsTest, WriteRejectsBadTensors) {
  const float v = 1;
  std::string path = dir_ + "/bad.safetensors";
  for (const auto& tensors :
       std::vector<std::vector<TensorToWrite>>{{{"a", DType::F32, {1}, &v}, {"a", DType::F32, {1}, &v}},
                                               {{"__metadata__", DType::F32, {1}, &v}},
                                               {{"neg", DType::F32, {-1}, &v}},
                                               {{"null", DType::F32, {1}, nullptr}}}) {
    try {
      write_safetensors(path, tensors);
      ADD_FAILURE() << tensors[0].name << ": written";
    } catch (const Error& e) {
      EXPECT_EQ(e.status(), LLMQ_ERR_INVALID_ARGUMENT) << e.what();
    }
  }
  EXPECT_FALSE(std::filesystem::exists(path));
  EXPECT_FALSE(std::filesystem::exists(path + ".tmp"));
}

TEST(SafetensorsStories, OpensStories260K) {
  auto file = SafetensorsFile::open(std::string(LLMQ_SHARED_DIR) + "/models/stories260K/model.safetensors");
  // 48 header entries: 47 tensors (embeddings, final norm, 5 layers of 9) and "__metadata__".
  EXPECT_EQ(file->tensors().size(), 47u);
  const TensorInfo* embed = file->find("model.embed_tokens.weight");
  ASSERT_NE(embed, nullptr);
  EXPECT_EQ(embed->dtype, DType::F32);
  EXPECT_EQ(embed->shape, (std::vector<int64_t>{512, 64}));
  EXPECT_EQ(embed->nbytes, 512u * 64 * 4);
  ASSERT_EQ(file->metadata().count("format"), 1u);
  EXPECT_EQ(file->metadata().at("format"), "pt");
  for (size_t i = 1; i < file->tensors().size(); ++i) EXPECT_LE(file->tensors()[i - 1].data, file->tensors()[i].data);
}

TEST_F(SafetensorsTest, RejectsShortFiles) {
  expect_error(write_raw("empty.st", ""), LLMQ_ERR_MODEL_FORMAT, {"truncated"});
  expect_error(write_raw("four.st", "abcd"), LLMQ_ERR_MODEL_FORMAT, {"truncated"});
}

TEST_F(SafetensorsTest, RejectsBadHeaderLengths) {
  expect_error(write_with_length("zero.st", 0, "{}"), LLMQ_ERR_MODEL_FORMAT, {"header length is 0"});
  expect_error(write_with_length("huge.st", uint64_t(1) << 63, "{}"), LLMQ_ERR_MODEL_FORMAT, {"100 MB"});
  expect_error(write_with_length("200mb.st", 200'000'000, "{}"), LLMQ_ERR_MODEL_FORMAT, {"100 MB"});
  expect_error(write_with_length("long.st", 100, "{}"), LLMQ_ERR_MODEL_FORMAT, {"truncated"});
}

TEST_F(SafetensorsTest, RejectsBadJson) {
  expect_error(write_file("bad.st", "{\"a\": ", ""), LLMQ_ERR_MODEL_FORMAT, {"not valid JSON", "parse error"});
  expect_error(write_file("array.st", "[1, 2]", ""), LLMQ_ERR_MODEL_FORMAT, {"not a JSON object"});
  expect_error(write_file("space.st", " {}", ""), LLMQ_ERR_MODEL_FORMAT, {"not a JSON object"});
  expect_error(write_file("trailing.st", "{} x", ""), LLMQ_ERR_MODEL_FORMAT, {"not valid JSON"});
  expect_error(write_file("dup.st",
                          R"({"t": {"dtype": "I8", "shape": [1], "data_offsets": [0, 1]},)"
                          R"( "t": {"dtype": "I8", "shape": [1], "data_offsets": [1, 2]}})",
                          "ab"),
               LLMQ_ERR_MODEL_FORMAT, {"duplicate key 't'"});
  expect_error(write_file("deep.st", R"({"t": {"dtype": "I8", "shape": [[1]], "data_offsets": [0, 1]}})", "a"),
               LLMQ_ERR_MODEL_FORMAT, {"nested"});
}

TEST_F(SafetensorsTest, RejectsBadEntries) {
  expect_error(write_file("notobj.st", R"({"t": 5})", ""), LLMQ_ERR_MODEL_FORMAT, {"'t'", "not a JSON object"});
  expect_error(write_file("nodtype.st", R"({"t": {"shape": [1], "data_offsets": [0, 4]}})", "abcd"),
               LLMQ_ERR_MODEL_FORMAT, {"'t'", "dtype"});
  expect_error(write_file("q4.st", R"({"t": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}})", "a"),
               LLMQ_ERR_UNSUPPORTED, {"'t'", "Q4"});
  expect_error(write_file("noshape.st", R"({"t": {"dtype": "I8", "data_offsets": [0, 1]}})", "a"),
               LLMQ_ERR_MODEL_FORMAT, {"'t'", "shape"});
  expect_error(write_file("negdim.st", R"({"t": {"dtype": "I8", "shape": [2, -1], "data_offsets": [0, 1]}})", "a"),
               LLMQ_ERR_MODEL_FORMAT, {"'t'", "shape"});
  expect_error(write_file("floatdim.st", R"({"t": {"dtype": "I8", "shape": [1.0], "data_offsets": [0, 1]}})", "a"),
               LLMQ_ERR_MODEL_FORMAT, {"'t'", "shape"});
  expect_error(
      write_file("bigdim.st", R"({"t": {"dtype": "I8", "shape": [9223372036854775808], "data_offsets": [0, 1]}})", "a"),
      LLMQ_ERR_MODEL_FORMAT, {"'t'", "shape"});
  expect_error(write_file("overflow.st",
                          R"({"t": {"dtype": "F32", "shape": [4294967296, 4294967296], "data_offsets": [0, 1]}})", "a"),
               LLMQ_ERR_MODEL_FORMAT, {"'t'", "overflows"});
  expect_error(write_file("bytesoverflow.st",
                          R"({"t": {"dtype": "F32", "shape": [4611686018427387904], "data_offsets": [0, 1]}})", "a"),
               LLMQ_ERR_MODEL_FORMAT, {"'t'", "overflows"});
  expect_error(write_file("nooffsets.st", R"({"t": {"dtype": "I8", "shape": [1]}})", "a"), LLMQ_ERR_MODEL_FORMAT,
               {"'t'", "data_offsets"});
  expect_error(write_file("threeoffsets.st", R"({"t": {"dtype": "I8", "shape": [1], "data_offsets": [0, 1, 2]}})", "a"),
               LLMQ_ERR_MODEL_FORMAT, {"'t'", "data_offsets"});
  expect_error(write_file("negoffset.st", R"({"t": {"dtype": "I8", "shape": [1], "data_offsets": [-1, 0]}})", "a"),
               LLMQ_ERR_MODEL_FORMAT, {"'t'", "data_offsets"});
}

TEST_F(SafetensorsTest, RejectsBadOffsets) {
  expect_error(write_file("range.st", R"({"t": {"dtype": "I8", "shape": [4], "data_offsets": [2, 6]}})", "abcd"),
               LLMQ_ERR_MODEL_FORMAT, {"'t'", "out of range"});
  expect_error(write_file("reversed.st", R"({"t": {"dtype": "I8", "shape": [0], "data_offsets": [3, 1]}})", "abcd"),
               LLMQ_ERR_MODEL_FORMAT, {"'t'", "end before"});
  expect_error(write_file("size.st", R"({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}})", "abcdefgh"),
               LLMQ_ERR_MODEL_FORMAT, {"'t'", "wrong size"});
  expect_error(write_file("overlap.st",
                          R"({"first": {"dtype": "I8", "shape": [4], "data_offsets": [0, 4]},)"
                          R"( "second": {"dtype": "I8", "shape": [4], "data_offsets": [2, 6]}})",
                          "abcdef"),
               LLMQ_ERR_MODEL_FORMAT, {"'first'", "'second'", "overlap"});
  // The data section holds 10 bytes, the header promises 24.
  expect_error(
      write_file("truncated.st", R"({"t": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}})", "0123456789"),
      LLMQ_ERR_MODEL_FORMAT, {"'t'", "truncated"});
}

TEST_F(SafetensorsTest, EmptyTensorsOverlapNothing) {
  auto file = SafetensorsFile::open(write_file("empty_inside.st",
                                               R"({"big": {"dtype": "I8", "shape": [4], "data_offsets": [0, 4]},)"
                                               R"( "none": {"dtype": "F32", "shape": [0], "data_offsets": [2, 2]}})",
                                               "abcd"));
  ASSERT_EQ(file->tensors().size(), 2u);
  EXPECT_EQ(file->tensors()[0].name, "big");
  EXPECT_EQ(file->tensors()[1].name, "none");
}

TEST_F(SafetensorsTest, RejectsBadMetadata) {
  expect_error(write_file("meta.st", R"({"__metadata__": {"format": "pt", "n": 1}})", ""), LLMQ_ERR_MODEL_FORMAT,
               {"__metadata__", "'n'"});
  expect_error(write_file("meta2.st", R"({"__metadata__": "pt"})", ""), LLMQ_ERR_MODEL_FORMAT, {"__metadata__"});
}

TEST_F(SafetensorsTest, RejectsUnopenablePaths) {
  expect_error(dir_ + "/does_not_exist.safetensors", LLMQ_ERR_IO, {"cannot open"});
  expect_error(dir_, LLMQ_ERR_IO, {"not a regular file"});
  std::string fifo = dir_ + "/fifo";
  ASSERT_EQ(mkfifo(fifo.c_str(), 0600), 0);
  expect_error(fifo, LLMQ_ERR_IO, {"not a regular file"});  // must not block waiting for a writer
}

}  // namespace
}  // namespace llmq
