#!/usr/bin/env python3
"""llmq from Python: loads a model, streams a greedy continuation of a prompt to stdout, then
prints the token ids and the speed.

    PYTHONPATH=bindings/python python3 examples/python/generate.py MODEL_DIR ["PROMPT"] [MAX_TOKENS]

(libllmq is found through LLMQ_LIBRARY, the package folder, the checkout's build/lib, or the loader.)
"""
import sys

import llmq


def main(argv):
    if len(argv) < 2:
        print("usage: generate.py MODEL_DIR [PROMPT] [MAX_TOKENS]", file=sys.stderr)
        return 2
    prompt = argv[2] if len(argv) > 2 else "Once upon a time"
    max_tokens = int(argv[3]) if len(argv) > 3 else 64
    try:
        with llmq.Model(argv[1]) as model, llmq.Engine(model) as engine:
            print(prompt, end="", flush=True)
            with engine.stream(prompt, max_tokens, temperature=0) as stream:
                for token in stream:
                    print(token.text, end="", flush=True)
            out = stream.result
            print("\nids: " + " ".join(map(str, out.tokens)))
            print("%d tokens, %s, %.0f tokens/s" % (len(out.tokens), out.finish_reason, out.tokens_per_s),
                  file=sys.stderr)
    except llmq.Error as e:
        print("generate.py: %s" % e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
