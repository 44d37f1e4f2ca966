"""Tests of the llmq Python bindings on the shared stories260K model (python3 -m unittest).

Environment: LLMQ_TEST_MODEL (default ../shared/models/stories260K beside the checkout), and
LLMQ_LIBRARY as for the package itself. ctest runs this as `python_bindings`.
"""

import ctypes
import ctypes.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGE_ROOT = os.path.dirname(HERE)
sys.path.insert(0, PACKAGE_ROOT)

import llmq  # noqa: E402
from llmq import _lib  # noqa: E402

CHECKOUT = os.path.dirname(os.path.dirname(PACKAGE_ROOT))
MODEL_DIR = os.environ.get("LLMQ_TEST_MODEL") or os.path.join(CHECKOUT, "..", "shared", "models", "stories260K")

with open(os.path.join(MODEL_DIR, "reference", "reference_cases.json")) as f:
    CASES = {case["name"]: case for case in json.load(f)["cases"]}
ONCE = CASES["once_upon_a_time"]
EMPTY = CASES["empty_prompt"]


def run_python(code, **env_changes):
    """Runs code in a fresh interpreter that imports llmq from this checkout; returns (rc, out+err)."""
    env = dict(os.environ, PYTHONPATH=PACKAGE_ROOT)
    for key, value in env_changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    proc = subprocess.run([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True, timeout=60)
    return proc.returncode, proc.stdout


class Fixture(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.model = llmq.Model(MODEL_DIR)
        cls.engine = llmq.Engine(cls.model, n_threads=1)

    @classmethod
    def tearDownClass(cls):
        cls.engine.close()
        cls.model.close()


class LibraryTest(unittest.TestCase):
    def test_versions(self):
        self.assertEqual(llmq.abi_version(), 1)
        self.assertEqual(llmq.library_version(), llmq.__version__)
        self.assertTrue(os.path.exists(llmq.library_path), llmq.library_path)

    def test_structs_match_the_library(self):
        # The struct_size that each *_init() writes, given room, is the library's sizeof.
        for struct, fill in [(_lib.ModelParams, lib_fn("llmq_model_params_init")),
                             (_lib.EngineParams, lib_fn("llmq_engine_params_init")),
                             (_lib.SamplingParams, lib_fn("llmq_sampling_params_init")),
                             (_lib.GenerateParams, lib_fn("llmq_generate_params_init"))]:
            self.assertEqual(_lib.library_struct_size(fill), ctypes.sizeof(struct), struct.__name__)
        # Output structs: the library fills the caller's struct_size, and no more, when it is smaller.
        self.assertEqual(ctypes.sizeof(_lib.ModelInfo), 8 + 9 * 4 + 8 * 4 + 4 + 2 * 8 + 64)
        self.assertEqual(ctypes.sizeof(_lib.GenerateResult), 40)

    def test_status_codes_map_to_exceptions(self):
        self.assertIs(llmq._ERRORS[1], llmq.InvalidArgumentError)
        self.assertIs(llmq._ERRORS[11], llmq.DeviceError)
        self.assertEqual(len(llmq._ERRORS), 12)
        error = llmq.IoError("no such file", 2)
        self.assertEqual(error.status_name, "LLMQ_ERR_IO")
        self.assertEqual(str(error), "LLMQ_ERR_IO: no such file")

    def test_library_override_that_does_not_exist(self):
        rc, out = run_python("import llmq", LLMQ_LIBRARY="/nonexistent/libllmq.so")
        self.assertNotEqual(rc, 0)
        self.assertIn("LibraryNotFoundError", out)
        self.assertIn("LLMQ_LIBRARY: /nonexistent/libllmq.so", out)

    def test_library_in_the_package_folder(self):
        # A copy of the package with libllmq.so.0 inside is found there when LLMQ_LIBRARY is unset.
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copytree(os.path.join(PACKAGE_ROOT, "llmq"), os.path.join(tmp, "llmq"),
                            ignore=shutil.ignore_patterns("__pycache__", "libllmq.so*"))
            os.symlink(os.path.realpath(llmq.library_path), os.path.join(tmp, "llmq", "libllmq.so.0"))
            env = dict(os.environ, PYTHONPATH=tmp)
            env.pop("LLMQ_LIBRARY", None)
            out = subprocess.check_output([sys.executable, "-c", "import llmq; print(llmq.library_path)"], env=env,
                                          cwd=tmp, universal_newlines=True, timeout=60)
            self.assertEqual(out.strip(), os.path.join(tmp, "llmq", "libllmq.so.0"))

    def test_abi_mismatch_is_a_clear_error(self):
        compiler = os.environ.get("CC") or shutil.which("cc")
        self.assertTrue(compiler, "a C compiler (cc, or $CC) is needed to build a fake library")
        with tempfile.TemporaryDirectory() as tmp:
            source = os.path.join(tmp, "fake.c")
            with open(source, "w") as f:
                f.write("unsigned llmq_abi_version(void) { return 99; }\n")
            fake = os.path.join(tmp, "libfake.so")
            subprocess.check_call([compiler, "-shared", "-fPIC", "-o", fake, source])
            rc, out = run_python("import llmq", LLMQ_LIBRARY=fake)
            self.assertNotEqual(rc, 0)
            self.assertIn("AbiMismatchError", out)
            self.assertIn("has ABI version 99, but this Python package was written for ABI version 1", out)

    def test_a_library_that_is_not_llmq(self):
        libc = ctypes.util.find_library("c")
        rc, out = run_python("import llmq", LLMQ_LIBRARY=libc)
        self.assertNotEqual(rc, 0)
        self.assertIn("does not export llmq_abi_version", out)


def lib_fn(name):
    return getattr(_lib.lib, name)


class ModelTest(Fixture):
    def test_info(self):
        info = self.model.info
        self.assertEqual(info.architecture, "LlamaForCausalLM")
        self.assertEqual((info.vocab_size, info.hidden_size, info.num_layers), (512, 64, 5))
        self.assertEqual((info.num_heads, info.num_kv_heads, info.head_dim, info.max_context), (8, 4, 8, 512))
        self.assertEqual((info.bos_id, info.eos_ids), (1, (2, 1)))
        self.assertEqual(info.weight_bytes, 260032 * 4)

    def test_tokenize_and_detokenize(self):
        self.assertEqual(self.model.tokenize("Once upon a time"), ONCE["prompt_token_ids"])
        self.assertEqual(self.model.tokenize("Once upon a time", add_special=False), ONCE["prompt_token_ids"][1:])
        self.assertEqual(self.model.tokenize(""), [1])
        self.assertEqual(self.model.detokenize(ONCE["greedy"]["token_ids"]), ONCE["greedy"]["text_continuation"])
        self.assertEqual(self.model.detokenize([1, 403], skip_special=False), "<s> Once")
        text = "a long text, " * 200  # past the first buffer guess: the size query path
        self.assertEqual(self.model.detokenize(self.model.tokenize(text)), text)
        self.assertEqual(self.model.tokenize("héllo ✓"), self.model.tokenize("héllo ✓"))
        self.assertEqual(self.model.detokenize(self.model.tokenize("héllo ✓")), "héllo ✓")

    def test_missing_directory(self):
        with self.assertRaises(llmq.IoError) as caught:
            llmq.Model("/nonexistent/llmq-python-test")
        self.assertEqual(caught.exception.status, 2)
        self.assertIn("/nonexistent/llmq-python-test", caught.exception.message)

    def test_wrong_argument_types(self):
        with self.assertRaises(TypeError):
            llmq.Model(123)
        with self.assertRaises(llmq.InvalidArgumentError):
            llmq.Model("bad\0path")
        with self.assertRaises(TypeError):
            self.model.tokenize(b"bytes")
        with self.assertRaises(TypeError):
            self.model.detokenize("text")
        with self.assertRaises(TypeError):
            self.model.detokenize([1, "2"])
        with self.assertRaises(TypeError):
            self.model.detokenize([1, 2.0])

    def test_token_id_out_of_range(self):
        for bad in (512, -1):
            with self.assertRaises(llmq.InvalidArgumentError) as caught:
                self.model.detokenize([1, bad])
            self.assertIn(str(bad), caught.exception.message)
        with self.assertRaises(llmq.InvalidArgumentError):
            self.model.detokenize([2**40])


class GenerateTest(Fixture):
    def test_greedy_text_prompt_matches_reference(self):
        out = self.engine.generate("Once upon a time", max_tokens=64, temperature=0)
        self.assertEqual(out.tokens, ONCE["greedy"]["token_ids"])
        self.assertEqual(out.text, ONCE["greedy"]["text_continuation"])
        self.assertEqual(out.finish_reason, "length")
        self.assertEqual(out.n_prompt_tokens, 5)
        self.assertGreater(out.time_to_first_token_s, 0)
        self.assertGreater(out.decode_time_s, 0)
        self.assertGreater(out.tokens_per_s, 0)

    def test_greedy_ids_prompt_matches_reference(self):
        for case in (ONCE, EMPTY):
            out = self.engine.generate(tuple(case["prompt_token_ids"]), 64, temperature=0)
            self.assertEqual(out.tokens, case["greedy"]["token_ids"], case["name"])

    def test_story_stops_at_bos(self):
        out = self.engine.generate([1], 500, temperature=0)
        self.assertEqual(out.tokens, EMPTY["greedy_until_bos"]["token_ids"])
        self.assertEqual(out.finish_reason, "stop")

    def test_stop_ids_and_ignore_eos(self):
        expected = ONCE["greedy"]["token_ids"]
        out = self.engine.generate("Once upon a time", 64, temperature=0, stop_ids=[expected[5]])
        self.assertEqual((out.tokens, out.finish_reason), (expected[:5], "stop"))
        story = EMPTY["greedy_until_bos"]["token_ids"]
        out = self.engine.generate([1], len(story) + 3, temperature=0, ignore_eos=True)
        self.assertEqual((out.tokens[:len(story) + 1], out.finish_reason), (story + [1], "length"))

    def test_on_token_sees_every_token(self):
        seen = []
        out = self.engine.generate("Once upon a time", 16, temperature=0, on_token=seen.append)
        self.assertEqual([t.id for t in seen], ONCE["greedy"]["token_ids"][:16])
        self.assertEqual("".join(t.text for t in seen), out.text)

    def test_seeded_sampling_repeats(self):
        a = self.engine.generate("Once upon a time", 32, temperature=1.0, top_p=0.9, seed=7)
        b = self.engine.generate("Once upon a time", 32, temperature=1.0, top_p=0.9, seed=7)
        self.assertEqual(a.tokens, b.tokens)
        self.assertEqual(len(a.tokens), 32)

    def test_stream_matches_reference(self):
        with self.engine.stream("Once upon a time", 64, temperature=0) as stream:
            tokens = list(stream)
        self.assertEqual([t.id for t in tokens], ONCE["greedy"]["token_ids"])
        self.assertEqual("".join(t.text for t in tokens), ONCE["greedy"]["text_continuation"])
        self.assertEqual(stream.result.finish_reason, "length")
        self.assertEqual(stream.result.tokens, ONCE["greedy"]["token_ids"])

    def test_score_matches_reference_logits(self):
        rows = self.engine.score(ONCE["prompt_token_ids"])
        self.assertEqual(len(rows), 5)
        for row in ONCE["top5_first_positions"][:5]:
            for token, logit in row["top5"]:
                self.assertAlmostEqual(rows[row["pos"]][token], logit, delta=1e-4)

    def test_saturation_counters(self):
        counts = self.engine.saturation()
        self.assertEqual(counts, [(0, 0, 0, 0, 0)] * 5)

    def test_threads_share_an_engine(self):
        results = [None] * 4

        def work(i):
            results[i] = self.engine.generate("Once upon a time", 16, temperature=0).tokens

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(results, [ONCE["greedy"]["token_ids"][:16]] * 4)


class MisuseTest(Fixture):
    """Misuse raises an exception; nothing crashes."""

    def test_closed_engine(self):
        engine = llmq.Engine(self.model, n_threads=1)
        engine.close()
        engine.close()  # twice is fine
        self.assertTrue(engine.closed)
        with self.assertRaises(llmq.ClosedError):
            engine.generate("Once upon a time", 4)
        with self.assertRaises(llmq.ClosedError):
            engine.stream([1, 403], 4)
        with self.assertRaises(llmq.ClosedError):
            engine.score([1])
        with self.assertRaises(llmq.ClosedError):
            engine.saturation()
        with llmq.Engine(self.model) as engine:
            pass
        with self.assertRaises(ValueError):  # ClosedError is a ValueError, like a closed file's
            engine.generate([1], 4)

    def test_closed_model(self):
        model = llmq.Model(MODEL_DIR)
        engine = llmq.Engine(model, n_threads=1)
        model.close()
        with self.assertRaises(llmq.ClosedError):
            model.tokenize("Once")
        with self.assertRaises(llmq.ClosedError):
            llmq.Engine(model)
        with self.assertRaises(llmq.ClosedError):
            engine.generate("Once upon a time", 4)  # a text prompt needs the model's tokenizer
        # The engine keeps the weights alive (llmq.h): ids still work.
        out = engine.generate(ONCE["prompt_token_ids"], 8, temperature=0)
        self.assertEqual(out.tokens, ONCE["greedy"]["token_ids"][:8])
        engine.close()

    def test_wrong_argument_types(self):
        e = self.engine
        for prompt in (3.5, None, b"Once", ["a", "b"], [1, 2.0], [1, True], object()):
            with self.assertRaises(TypeError, msg=repr(prompt)):
                e.generate(prompt, 4)
        with self.assertRaises(TypeError):
            e.generate([1], "4")
        with self.assertRaises(TypeError):
            e.generate([1], 4, temperature="hot")
        with self.assertRaises(TypeError):
            e.generate([1], 4, seed=1.5)
        with self.assertRaises(TypeError):
            e.generate([1], 4, on_token="not callable")
        with self.assertRaises(TypeError):
            e.stream([1], 4, temprature=0)  # misspelt option
        with self.assertRaises(TypeError):
            llmq.Engine("not a model")
        with self.assertRaises(TypeError):
            llmq.Engine(self.model, n_threads="2")
        with self.assertRaises(llmq.InvalidArgumentError):
            llmq.Engine(self.model, kv_dtype="int4")
        with self.assertRaises(llmq.InvalidArgumentError):
            e.generate([1], -1)

    def test_invalid_values_carry_the_library_message(self):
        with self.assertRaises(llmq.InvalidArgumentError) as caught:
            self.engine.generate([1], 4, top_p=2.0)
        self.assertEqual(caught.exception.status, 1)
        self.assertIn("top_p", caught.exception.message)
        with self.assertRaises(llmq.InvalidArgumentError):
            self.engine.generate([], 4)
        with self.assertRaises(llmq.InvalidArgumentError):
            llmq.Engine(self.model, kv_block_size=0)
        with self.assertRaises(llmq.ContextOverflowError):
            self.engine.generate([1] * 600, 4)

    def test_token_id_out_of_range(self):
        for bad in (512, -1, 2**31 - 1):
            with self.assertRaises(llmq.InvalidArgumentError) as caught:
                self.engine.generate([1, bad], 4, temperature=0)
            self.assertIn(str(bad), caught.exception.message)
        with self.assertRaises(llmq.InvalidArgumentError):
            self.engine.generate([1, 2**40], 4)
        with self.assertRaises(llmq.InvalidArgumentError):
            self.engine.score([1, 512])
        # The engine is still usable afterwards.
        self.assertEqual(self.engine.generate([1], 4, temperature=0).tokens, EMPTY["greedy"]["token_ids"][:4])

    def test_cancelled_by_the_callback(self):
        seen = []

        def on_token(token):
            seen.append(token.id)
            return len(seen) == 3  # stop after the third

        out = self.engine.generate("Once upon a time", 64, temperature=0, on_token=on_token)
        self.assertEqual(out.finish_reason, "cancelled")
        self.assertEqual(out.tokens, ONCE["greedy"]["token_ids"][:3])
        self.assertEqual(seen, out.tokens)

    def test_cancelled_stream(self):
        stream = self.engine.stream("Once upon a time", 64, temperature=0)
        first = next(stream)
        result = stream.close()
        self.assertEqual(first.id, ONCE["greedy"]["token_ids"][0])
        self.assertEqual(result.finish_reason, "cancelled")
        self.assertLess(len(result.tokens), 64)
        self.assertEqual(result.tokens, ONCE["greedy"]["token_ids"][:len(result.tokens)])
        self.assertEqual(list(stream), [])  # a closed stream is exhausted

    def test_closing_the_engine_cancels_its_streams(self):
        engine = llmq.Engine(self.model, n_threads=1)
        stream = engine.stream([1], 500, temperature=0, ignore_eos=True)
        next(stream)
        engine.close()
        self.assertIsNotNone(stream.result)
        self.assertIn(stream.result.finish_reason, ("cancelled", "length"))  # "length" only on a stalled machine
        with self.assertRaises(llmq.ClosedError):
            engine.generate([1], 4)

    def test_callback_exception_propagates(self):
        def on_token(token):
            raise KeyError("from the callback")

        with self.assertRaises(KeyError):
            self.engine.generate([1], 8, on_token=on_token)
        self.assertEqual(self.engine.generate([1], 2, temperature=0).tokens, EMPTY["greedy"]["token_ids"][:2])

    def test_reentrant_call_from_the_callback(self):
        for call in (lambda: self.engine.generate([1], 2), lambda: self.engine.score([1]), self.engine.saturation):
            with self.assertRaises(llmq.Error) as caught:
                self.engine.generate([1], 4, on_token=lambda token: call())
            self.assertIn("from inside its own on_token callback", str(caught.exception))
        # Another engine may be called from the callback.
        with llmq.Engine(self.model, n_threads=1) as other:
            inner = []
            out = self.engine.generate([1], 2, temperature=0,
                                       on_token=lambda token: inner.append(other.generate([1], 1)))
            self.assertEqual([len(g.tokens) for g in inner], [1, 1])
            self.assertEqual(len(out.tokens), 2)

        def close_inside(token):
            self.engine.close()

        with self.assertRaises(llmq.Error):
            self.engine.generate([1], 4, on_token=close_inside)
        self.assertFalse(self.engine.closed)


if __name__ == "__main__":
    unittest.main()
