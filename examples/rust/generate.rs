//! llmq from Rust: loads a model, streams a greedy continuation of a prompt to stdout, then prints
//! the token ids and the speed.
//!
//!     cargo run --example generate -- MODEL_DIR ["PROMPT"] [MAX_TOKENS]
//!
//! (from bindings/rust, with libllmq built in build/lib of the checkout, or LLMQ_LIB_DIR set.)
use llmq::{Engine, EngineOptions, GenerateOptions, Model};
use std::io::Write;
use std::process::ExitCode;

fn run(args: &[String]) -> llmq::Result<()> {
    let model = Model::load(&args[1])?;
    let prompt = args
        .get(2)
        .map(String::as_str)
        .unwrap_or("Once upon a time");
    let max_tokens = args.get(3).and_then(|n| n.parse().ok()).unwrap_or(64);
    let engine = Engine::new(&model, &EngineOptions::default())?;

    let mut stream = engine.stream(prompt, &GenerateOptions::greedy(max_tokens))?;
    print!("{}", prompt);
    for token in &mut stream {
        print!("{}", token?.text);
        std::io::stdout().flush().ok();
    }
    let out = stream.finish()?;
    println!();
    println!(
        "ids: {}",
        out.tokens
            .iter()
            .map(|id| id.to_string())
            .collect::<Vec<_>>()
            .join(" ")
    );
    eprintln!(
        "{} tokens, {:?}, {:.0} tokens/s",
        out.tokens.len(),
        out.finish_reason,
        out.tokens_per_second()
    );
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 2 {
        eprintln!("usage: generate MODEL_DIR [PROMPT] [MAX_TOKENS]");
        return ExitCode::from(2);
    }
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("generate: {}", e);
            ExitCode::FAILURE
        }
    }
}
