// An outside program against an installed llmq, through llmq.hpp: greedy tokens of
// "Once upon a time" on stories260K must be llama2.c run.c's. usage: consumer MODEL_DIR
#include <cstdio>
#include <vector>

#include <llmq.hpp>

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  const std::vector<int32_t> reference = {432, 383, 286, 261, 376, 298, 315, 421};
  try {
    llmq::Model model(argv[1]);
    llmq::Engine engine(model);
    llmq::Generation out = engine.generate(model.tokenize("Once upon a time"), llmq::greedy(8));
    if (out.tokens != reference) {
      std::fprintf(stderr, "consumer: unexpected tokens\n");
      return 1;
    }
    std::printf("consumer (C++, find_package): llmq %s:%s\n", llmq_version_string(), out.text.c_str());
  } catch (const llmq::Error& e) {
    std::fprintf(stderr, "consumer: %s\n", e.what());
    return 1;
  }
  return 0;
}
