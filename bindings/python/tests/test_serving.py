"""Tests of llmq.Server (the serving API, llmq_server_*) on stories260K: the reference tokens
through a server, concurrent requests from several threads equal to generate() alone, cancel,
bad input refused while the server goes on, asyncio, statistics, prefix reuse and closing."""

import asyncio
import json
import os
import sys
import threading
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import llmq  # noqa: E402

CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
MODEL_DIR = os.environ.get("LLMQ_TEST_MODEL") or os.path.join(CHECKOUT, "..", "shared", "models", "stories260K")
with open(os.path.join(MODEL_DIR, "reference", "reference_cases.json")) as f:
    ONCE = {case["name"]: case for case in json.load(f)["cases"]}["once_upon_a_time"]
PROMPT = ONCE["prompt_token_ids"]
GREEDY = ONCE["greedy"]["token_ids"]


class ServerTest(unittest.TestCase):
    def setUp(self):
        self.model = llmq.Model(MODEL_DIR)
        self.engine = llmq.Engine(self.model, n_threads=1)
        self.server = llmq.Server(self.engine, peak_bandwidth=1e10)

    def tearDown(self):
        self.server.close()
        self.engine.close()
        self.model.close()

    def test_reference_tokens_stream_and_result(self):
        request = self.server.submit("Once upon a time", max_tokens=len(GREEDY), temperature=0, ignore_eos=True)
        streamed = [token.id for token in request]
        self.assertEqual(streamed, GREEDY)
        result = request.result(timeout=60)
        self.assertEqual(result.tokens, GREEDY)
        self.assertEqual(result.text, ONCE["greedy"]["text_continuation"])
        self.assertEqual(result.finish_reason, "length")
        self.assertEqual(result.n_prompt_tokens, len(PROMPT))
        self.assertGreater(result.time_to_first_token_s, 0)
        self.assertEqual([t.id for t in request], GREEDY[:0] or [], "iterating again after the end yields nothing")

    def test_concurrent_requests_from_threads_equal_generate_alone(self):
        jobs = [(PROMPT[:2 + i % 4], 8 + i % 5, 0.0 if i % 2 else 0.9, 100 + i) for i in range(24)]
        expected = [self.engine.generate(p, n, temperature=t, seed=s, ignore_eos=True).tokens for p, n, t, s in jobs]
        requests = [None] * len(jobs)

        def submit(first):
            for i in range(first, len(jobs), 4):
                p, n, t, s = jobs[i]
                requests[i] = self.server.submit(p, n, temperature=t, seed=s, ignore_eos=True)

        threads = [threading.Thread(target=submit, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(len({r.id for r in requests}), len(jobs), "ids are unique")
        for request, tokens in zip(requests, expected):
            self.assertEqual(request.result(timeout=60).tokens, tokens)
        stats = self.server.stats()
        self.assertEqual(stats.requests_submitted, len(jobs))
        self.assertEqual(stats.requests_finished, len(jobs))
        self.assertEqual(stats.generated_tokens, sum(len(t) for t in expected))
        self.assertEqual(stats.kv_blocks_used, 0)
        self.assertEqual(sum(stats.ttft_histogram), len(jobs))
        self.assertGreater(stats.mean_decode_mbu, 0)

    def test_cancel(self):
        request = self.server.submit(PROMPT, max_tokens=400, temperature=0, ignore_eos=True)
        first = next(iter(request))
        self.assertEqual(first.id, GREEDY[0])
        self.assertTrue(request.cancel())
        result = request.result(timeout=60)
        self.assertEqual(result.finish_reason, "cancelled")
        self.assertLess(len(result.tokens), 400)
        self.assertFalse(request.cancel(), "a finished request cannot be cancelled")
        self.assertEqual(self.server.stats().requests_cancelled, 1)

    def test_bad_input_is_refused_and_the_server_goes_on(self):
        with self.assertRaises(llmq.InvalidArgumentError):
            self.server.submit([], max_tokens=4)
        with self.assertRaisesRegex(llmq.InvalidArgumentError, "prompt_ids\\[1\\] = 512"):
            self.server.submit([1, 512], max_tokens=4)
        with self.assertRaises(llmq.ContextOverflowError):
            self.server.submit(PROMPT, max_tokens=600)
        with self.assertRaisesRegex(llmq.InvalidArgumentError, "top_p"):
            self.server.submit(PROMPT, max_tokens=4, top_p=0)
        with self.assertRaises(TypeError):
            self.server.submit(PROMPT, max_tokens="four")
        with self.assertRaises(TypeError):
            llmq.Server("not an engine")
        ok = self.server.submit(PROMPT, max_tokens=4, temperature=0, ignore_eos=True)
        self.assertEqual(ok.result(timeout=60).tokens, GREEDY[:4])
        self.assertEqual(self.server.stats().requests_submitted, 1)

    def test_asyncio(self):
        async def main():
            a = self.server.submit(PROMPT, max_tokens=6, temperature=0, ignore_eos=True)
            b = self.server.submit(PROMPT, max_tokens=6, temperature=0, ignore_eos=True)
            tokens = [t.id async for t in b.stream()]
            return (await a).tokens, tokens, (await b).tokens

        awaited, streamed, again = asyncio.run(main())
        self.assertEqual(awaited, GREEDY[:6])
        self.assertEqual(streamed, GREEDY[:6])
        self.assertEqual(again, GREEDY[:6])

    def test_prefix_caching_reuses_blocks(self):
        with llmq.Server(self.engine, prefix_caching=True, peak_bandwidth=1e10) as server:
            prompt = [1] + list(range(100, 140))
            first = server.submit(prompt, max_tokens=6, temperature=0, ignore_eos=True).result(timeout=60)
            second = server.submit(prompt, max_tokens=6, temperature=0, ignore_eos=True).result(timeout=60)
        self.assertEqual(first.tokens, second.tokens)
        self.assertEqual(first.n_cached_tokens, 0)
        self.assertEqual(second.n_cached_tokens, 32)

    def test_closed_server(self):
        pending = self.server.submit(PROMPT, max_tokens=400, temperature=0, ignore_eos=True)
        self.server.close()
        self.server.close()  # twice is a no-op
        with self.assertRaises(llmq.ClosedError):
            self.server.submit(PROMPT, max_tokens=4)
        with self.assertRaises(llmq.ClosedError):
            self.server.stats()
        if not pending.done or pending._error is not None:
            with self.assertRaises(llmq.ClosedError):
                pending.result(timeout=60)

    def test_engine_closed_first(self):
        self.engine.close()  # the C server keeps what it needs of the engine
        request = self.server.submit(PROMPT, max_tokens=4, temperature=0, ignore_eos=True)
        self.assertEqual(request.result(timeout=60).tokens, GREEDY[:4])


if __name__ == "__main__":
    unittest.main()
