// llmq from C++ through include/llmq.hpp (RAII over the C ABI): loads a model, streams a greedy
// continuation of a prompt to stdout, then prints the token ids and the speed.
//
//   llmq-generate-cpp MODEL_DIR ["PROMPT"] [MAX_TOKENS]
#include <cstdlib>
#include <iostream>
#include <string>

#include "llmq.hpp"

int main(int argc, char** argv) {
  if (argc < 2) {
    std::cerr << "usage: llmq-generate-cpp MODEL_DIR [PROMPT] [MAX_TOKENS]\n";
    return 2;
  }
  const std::string prompt = argc > 2 ? argv[2] : "Once upon a time";
  const int max_tokens = argc > 3 ? std::atoi(argv[3]) : 64;
  try {
    llmq::Model model(argv[1]);
    llmq::Engine engine(model);
    std::cout << prompt << std::flush;
    llmq::Generation out =
        engine.generate(model.tokenize(prompt), llmq::greedy(max_tokens), [](int32_t, std::string_view text) {
          std::cout << text << std::flush;
          return true;  // keep going
        });
    std::cout << "\nids:";
    for (int32_t id : out.tokens) std::cout << ' ' << id;
    std::cout << '\n';
    double per_s = out.tokens.size() > 1 && out.result.decode_time_s > 0
                       ? double(out.tokens.size() - 1) / out.result.decode_time_s
                       : 0.0;
    std::cerr << out.tokens.size() << " tokens, " << per_s << " tokens/s\n";
  } catch (const llmq::Error& e) {
    std::cerr << "llmq-generate-cpp: " << e.what() << '\n';
    return 1;
  }
  return 0;
}
