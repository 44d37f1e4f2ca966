//! End to end on the shared stories260K model, against llama2.c's reference outputs
//! (reference/reference_cases.json). LLMQ_TEST_MODEL overrides the model folder (default
//! ../shared/models/stories260K beside the checkout).
use llmq::{Engine, EngineOptions, FinishReason, GenerateOptions, KvDtype, Model, Status};
use std::ops::ControlFlow;
use std::path::PathBuf;

fn model_dir() -> PathBuf {
    match std::env::var_os("LLMQ_TEST_MODEL") {
        Some(dir) => PathBuf::from(dir),
        None => {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../../shared/models/stories260K")
        }
    }
}

/// The few values of reference_cases.json the tests need, read without a JSON crate.
struct Reference {
    json: String,
}

impl Reference {
    fn load() -> Reference {
        let path = model_dir().join("reference/reference_cases.json");
        Reference {
            json: std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{}: {}", path.display(), e)),
        }
    }

    /// The text of case `name` from its `"section"` on (e.g. "\"greedy\": {").
    fn section(&self, name: &str, section: &str) -> &str {
        let case = &self.json[self
            .json
            .find(&format!("\"name\": \"{}\"", name))
            .expect("case")..];
        &case[case.find(section).expect("section")..]
    }

    fn ids(&self, name: &str, section: &str, key: &str) -> Vec<i32> {
        let text = self.section(name, section);
        let text = &text[text.find(&format!("\"{}\": [", key)).expect("key")..];
        let list = &text[text.find('[').unwrap() + 1..text.find(']').unwrap()];
        list.split(',')
            .map(|n| n.trim().parse().expect("an id"))
            .collect()
    }

    /// A JSON string value (escapes \n, \", \\ and \uXXXX handled).
    fn string(&self, name: &str, section: &str, key: &str) -> String {
        let text = self.section(name, section);
        let text = &text[text.find(&format!("\"{}\": \"", key)).expect("key") + key.len() + 5..];
        let mut out = String::new();
        let mut chars = text.chars();
        while let Some(c) = chars.next() {
            match c {
                '"' => return out,
                '\\' => match chars.next().unwrap() {
                    'n' => out.push('\n'),
                    't' => out.push('\t'),
                    'u' => {
                        let hex: String = chars.by_ref().take(4).collect();
                        out.push(char::from_u32(u32::from_str_radix(&hex, 16).unwrap()).unwrap());
                    }
                    other => out.push(other),
                },
                c => out.push(c),
            }
        }
        panic!("unterminated string");
    }
}

const GREEDY: &str = "\"greedy\": {";

fn setup() -> (Model, Engine) {
    let model = Model::load(model_dir()).expect("load stories260K");
    let engine = Engine::new(
        &model,
        &EngineOptions {
            n_threads: 1,
            ..EngineOptions::default()
        },
    )
    .expect("engine");
    (model, engine)
}

#[test]
fn versions() {
    assert_eq!(llmq::abi_version(), 1);
    assert_eq!(llmq::version(), env!("CARGO_PKG_VERSION"));
}

#[test]
fn model_info_and_tokenizer() {
    let (model, _engine) = setup();
    let info = model.info();
    assert_eq!(info.architecture, "LlamaForCausalLM");
    assert_eq!(
        (
            info.vocab_size,
            info.hidden_size,
            info.num_layers,
            info.max_context
        ),
        (512, 64, 5, 512)
    );
    assert_eq!(info.eos_ids, vec![2, 1]);
    let r = Reference::load();
    let prompt = r.ids(
        "once_upon_a_time",
        "\"prompt_token_ids\"",
        "prompt_token_ids",
    );
    assert_eq!(model.tokenize("Once upon a time", true).unwrap(), prompt);
    assert_eq!(
        model.tokenize("Once upon a time", false).unwrap(),
        prompt[1..]
    );
    let continuation = r.ids("once_upon_a_time", GREEDY, "token_ids");
    let text = r.string("once_upon_a_time", GREEDY, "text_continuation");
    assert_eq!(model.detokenize(&continuation, true).unwrap(), text);
    let long = "a long text, ".repeat(200);
    assert_eq!(
        model
            .detokenize(&model.tokenize(&long, true).unwrap(), true)
            .unwrap(),
        long
    );
}

#[test]
fn greedy_generation_matches_run_c() {
    let (_model, engine) = setup();
    let r = Reference::load();
    let expected = r.ids("once_upon_a_time", GREEDY, "token_ids");
    let out = engine
        .generate("Once upon a time", &GenerateOptions::greedy(64))
        .unwrap();
    assert_eq!(out.tokens, expected);
    assert_eq!(
        out.text,
        r.string("once_upon_a_time", GREEDY, "text_continuation")
    );
    assert_eq!(out.finish_reason, FinishReason::Length);
    assert_eq!(out.n_prompt_tokens, 5);
    assert!(
        out.time_to_first_token_s > 0.0 && out.decode_time_s > 0.0 && out.tokens_per_second() > 0.0
    );

    // The empty prompt, as ids; and the whole story, which ends at BOS = 1.
    let out = engine.generate(&[1], &GenerateOptions::greedy(64)).unwrap();
    assert_eq!(out.tokens, r.ids("empty_prompt", GREEDY, "token_ids"));
    let out = engine
        .generate(&[1], &GenerateOptions::greedy(500))
        .unwrap();
    assert_eq!(
        out.tokens,
        r.ids("empty_prompt", "\"greedy_until_bos\"", "token_ids")
    );
    assert_eq!(out.finish_reason, FinishReason::Stop);
}

#[test]
fn streaming_matches_generate() {
    let (_model, engine) = setup();
    let r = Reference::load();
    let mut stream = engine
        .stream("Once upon a time", &GenerateOptions::greedy(64))
        .unwrap();
    let tokens: Vec<_> = stream.by_ref().map(|t| t.unwrap()).collect();
    let out = stream.finish().unwrap();
    assert_eq!(
        tokens.iter().map(|t| t.id).collect::<Vec<_>>(),
        r.ids("once_upon_a_time", GREEDY, "token_ids")
    );
    assert_eq!(
        tokens.iter().map(|t| t.text.as_str()).collect::<String>(),
        out.text
    );
    assert_eq!(out.finish_reason, FinishReason::Length);
}

#[test]
fn seeded_sampling_repeats_and_stop_ids_stop() {
    let (_model, engine) = setup();
    let options = GenerateOptions {
        max_tokens: 32,
        top_p: 0.9,
        seed: Some(7),
        ..GenerateOptions::default()
    };
    let a = engine.generate("Once upon a time", &options).unwrap();
    let b = engine.generate("Once upon a time", &options).unwrap();
    assert_eq!(a.tokens, b.tokens);
    assert_eq!(a.tokens.len(), 32);
    let expected = Reference::load().ids("once_upon_a_time", GREEDY, "token_ids");
    let options = GenerateOptions {
        stop_ids: vec![expected[5]],
        ..GenerateOptions::greedy(64)
    };
    let out = engine.generate("Once upon a time", &options).unwrap();
    assert_eq!(
        (out.tokens.as_slice(), out.finish_reason),
        (&expected[..5], FinishReason::Stop)
    );
}

#[test]
fn score_matches_reference_logits() {
    let (_model, engine) = setup();
    let logits = engine.score(&[1, 403, 407, 261, 378]).unwrap();
    assert_eq!(logits.len(), 5 * 512);
    // The first reference top-5 entry of position 0 ("top5": [[id, logit], ...]).
    let r = Reference::load();
    let top5 = r.section("once_upon_a_time", "\"top5\": [");
    let first = &top5[top5.find('[').unwrap() + 1..];
    let pair: Vec<f64> = first[first.find('[').unwrap() + 1..first.find(']').unwrap()]
        .split(',')
        .map(|v| v.trim().parse().unwrap())
        .collect();
    assert_eq!(pair[0], 403.0);
    assert!(
        (logits[pair[0] as usize] as f64 - pair[1]).abs() < 1e-4,
        "{:?} vs {}",
        pair,
        logits[pair[0] as usize]
    );
    assert_eq!(engine.saturation(false).unwrap(), vec![[0u64; 5]; 5]);
}

#[test]
fn handles_are_send_and_sync_and_shared_across_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Model>();
    send_sync::<Engine>();
    let (_model, engine) = setup();
    let expected = Reference::load().ids("once_upon_a_time", GREEDY, "token_ids");
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..3)
            .map(|_| {
                s.spawn(|| {
                    engine
                        .generate("Once upon a time", &GenerateOptions::greedy(16))
                        .unwrap()
                        .tokens
                })
            })
            .collect();
        for worker in workers {
            assert_eq!(worker.join().unwrap(), expected[..16]);
        }
    });
}

// ---- Misuse: errors, never crashes --------------------------------------------------------------

#[test]
fn dropped_handles_are_not_used_after_free() {
    // A dropped engine cannot be named again (a compile_fail doctest in lib.rs shows it). What can
    // happen: the model dropped first, a stream outliving its engine.
    let (model, engine) = setup();
    drop(model);
    let out = engine
        .generate("Once upon a time", &GenerateOptions::greedy(4))
        .unwrap();
    assert_eq!(out.tokens.len(), 4);
    let stream = engine.stream(&[1], &GenerateOptions::greedy(8)).unwrap();
    drop(engine);
    assert_eq!(stream.map(|t| t.unwrap().id).count(), 8);
}

#[test]
fn bad_arguments_are_errors() {
    let e = Model::load("/nonexistent/llmq-rust-test").unwrap_err();
    assert_eq!(e.status(), Status::Io);
    assert!(e.message().contains("/nonexistent/llmq-rust-test"), "{}", e);
    assert!(e.to_string().starts_with("LLMQ_ERR_IO: "), "{}", e);
    let e = Model::load("bad\0path").unwrap_err();
    assert_eq!(e.status(), Status::InvalidArgument);

    let (model, engine) = setup();
    let e = engine
        .generate(
            &[1],
            &GenerateOptions {
                top_p: 2.0,
                ..GenerateOptions::greedy(4)
            },
        )
        .unwrap_err();
    assert_eq!(e.status(), Status::InvalidArgument);
    assert!(e.message().contains("top_p"), "{}", e);
    let e = engine
        .generate(&[], &GenerateOptions::greedy(4))
        .unwrap_err();
    assert_eq!(e.status(), Status::InvalidArgument);
    let e = engine
        .generate(&vec![1; 600], &GenerateOptions::greedy(4))
        .unwrap_err();
    assert_eq!(e.status(), Status::ContextOverflow);
    let e = Engine::new(
        &model,
        &EngineOptions {
            kv_block_size: 0,
            ..EngineOptions::default()
        },
    )
    .unwrap_err();
    assert_eq!(e.status(), Status::InvalidArgument);
    let e = Engine::new(
        &model,
        &EngineOptions {
            kv_dtype: KvDtype::Fp8,
            n_threads: -3,
            ..EngineOptions::default()
        },
    );
    assert!(e.is_err());
    // A failed stream yields its error, then ends.
    let mut stream = engine.stream(&[], &GenerateOptions::greedy(4)).unwrap();
    assert_eq!(
        stream.next().unwrap().unwrap_err().status(),
        Status::InvalidArgument
    );
    assert!(stream.next().is_none());
    assert_eq!(
        stream.finish().unwrap_err().status(),
        Status::InvalidArgument
    );
}

#[test]
fn token_ids_out_of_range_are_errors() {
    let (model, engine) = setup();
    for bad in [512, -1, i32::MAX] {
        let e = engine
            .generate(&[1, bad], &GenerateOptions::greedy(4))
            .unwrap_err();
        assert_eq!(e.status(), Status::InvalidArgument);
        assert!(e.message().contains(&bad.to_string()), "{}", e);
        assert_eq!(
            model.detokenize(&[1, bad], true).unwrap_err().status(),
            Status::InvalidArgument
        );
    }
    assert_eq!(
        engine.score(&[1, 512]).unwrap_err().status(),
        Status::InvalidArgument
    );
    // Still usable afterwards.
    assert_eq!(
        engine
            .generate(&[1], &GenerateOptions::greedy(2))
            .unwrap()
            .tokens
            .len(),
        2
    );
}

#[test]
fn cancelled_by_the_callback() {
    let (_model, engine) = setup();
    let expected = Reference::load().ids("once_upon_a_time", GREEDY, "token_ids");
    let mut seen = Vec::new();
    let out = engine
        .generate_with("Once upon a time", &GenerateOptions::greedy(64), |token| {
            seen.push(token.id);
            if seen.len() == 3 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .unwrap();
    assert_eq!(out.finish_reason, FinishReason::Cancelled);
    assert_eq!(out.tokens, expected[..3]);
    assert_eq!(seen, out.tokens);
}

#[test]
fn cancelled_stream() {
    let (_model, engine) = setup();
    let mut stream = engine
        .stream(
            &[1],
            &GenerateOptions {
                ignore_eos: true,
                ..GenerateOptions::greedy(500)
            },
        )
        .unwrap();
    let first = stream.next().unwrap().unwrap();
    let out = stream.finish().unwrap();
    assert_eq!(out.tokens[0], first.id);
    assert!(out.tokens.len() <= 500);
    assert!(
        matches!(
            out.finish_reason,
            FinishReason::Cancelled | FinishReason::Length
        ),
        "{:?}",
        out.finish_reason
    );
    // Dropping a stream midway cancels it too, and the engine goes on.
    drop(engine.stream(&[1], &GenerateOptions::greedy(500)).unwrap());
    assert_eq!(
        engine
            .generate(&[1], &GenerateOptions::greedy(3))
            .unwrap()
            .tokens
            .len(),
        3
    );
}

#[test]
fn calling_the_engine_from_its_own_callback_is_an_error() {
    let (_model, engine) = setup();
    let mut inner = Vec::new();
    let out = engine
        .generate_with(&[1], &GenerateOptions::greedy(2), |_| {
            inner.push(
                engine
                    .generate(&[1], &GenerateOptions::greedy(1))
                    .map(|g| g.tokens),
            );
            inner.push(engine.score(&[1]).map(|_| Vec::new()));
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(out.tokens.len(), 2);
    assert_eq!(inner.len(), 4);
    for result in inner {
        let e = result.unwrap_err();
        assert_eq!(e.status(), Status::InvalidArgument);
        assert!(
            e.message().contains("inside its own token callback"),
            "{}",
            e
        );
    }
    // Another engine may be called from the callback.
    let (_model2, other) = setup();
    let out = engine
        .generate_with(&[1], &GenerateOptions::greedy(1), |_| {
            assert_eq!(
                other
                    .generate(&[1], &GenerateOptions::greedy(1))
                    .unwrap()
                    .tokens
                    .len(),
                1
            );
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(out.tokens.len(), 1);
}

#[test]
fn a_panicking_callback_stops_generation_and_unwinds() {
    let (_model, engine) = setup();
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        engine.generate_with(&[1], &GenerateOptions::greedy(8), |_| {
            panic!("from the callback")
        })
    }));
    let payload = caught.unwrap_err();
    assert_eq!(payload.downcast_ref::<&str>(), Some(&"from the callback"));
    assert_eq!(
        engine
            .generate(&[1], &GenerateOptions::greedy(2))
            .unwrap()
            .tokens
            .len(),
        2
    );
}
