//! The genarm command line. Each subcommand is a module that parses its arguments,
//! calls the library and prints; `main` only dispatches.
// The CLI is native only; on wasm32 (`wasm-pack test` builds every target) it is empty.
#![cfg_attr(target_arch = "wasm32", no_main)]
#![cfg(not(target_arch = "wasm32"))]

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Prints a line to stdout; a failed write (a closed pipe, a full disk) ends the command
/// with an error instead of `println!`'s panic.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        anyhow::Context::context(
            writeln!(out, $($arg)*).and_then(|()| out.flush()),
            "writing to stdout",
        )?
    }};
}

/// Prints a line to stderr, ignoring a failed write: what goes there is for a person
/// watching, and a stderr pipe whose reader has gone must not end the command with
/// `eprintln!`'s panic.
macro_rules! noteln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

mod args;
mod bench;
mod eval;
mod generate;
mod init_lora;
mod init_model;
mod load;
mod logits;
mod prefs;
mod prompts;
mod train;

#[cfg(test)]
mod option_fuzz;

/// GenARM: reward-guided generation with autoregressive reward models.
///
/// Each step samples from softmax((log_softmax(base) + Σ α_i·log_softmax(arm_i)) / T).
#[derive(Parser)]
#[command(name = "genarm", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a base model guided by ARMs.
    Generate(generate::GenerateArgs),
    /// Teacher-forced log-probabilities of given tokens (debugging and parity checks).
    Logits(logits::LogitsArgs),
    /// Prefill and decode speed: tokens/s base-only and with the given ARMs.
    Bench(bench::BenchArgs),
    /// Write a PEFT LoRA adapter with random weights for a model (for timing and tests).
    InitLora(init_lora::InitLoraArgs),
    /// Write a GGUF Llama model with random weights of a given shape (default TinyLlama-1.1B's), for timing.
    InitModel(init_model::InitModelArgs),
    /// Train an ARM (LoRA, or with --full all weights of its top layers) on preference
    /// pairs with the GenARM loss, or with --scalar-head a conventional scalar reward
    /// model (Bradley–Terry loss).
    Train(train::TrainArgs),
    /// Make synthetic preference pairs: sample K continuations per prompt, keep best/worst by a scorer.
    Prefs(prefs::PrefsArgs),
    /// Build a prompt set from a corpus of sentences, split into train and held-out files.
    Prompts(prompts::PromptsArgs),
    /// Sweep ARM weights over held-out prompts and score every response; optionally
    /// compare with baselines (best-of-N, ARGS) on the same prompts, seeds and scorers.
    Eval(eval::EvalArgs),
}

fn main() -> ExitCode {
    // candle asks for the thread count on every matmul and, without this variable, reads
    // /proc/cpuinfo each time to find it.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    // A bad flag exits with 1 like every other error (clap's own default is 2).
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let result = match cli.command {
        Command::Generate(a) => generate::run(a),
        Command::Logits(a) => logits::run(a),
        Command::Bench(a) => bench::run(a),
        Command::InitLora(a) => init_lora::run(a),
        Command::InitModel(a) => init_model::run(a),
        Command::Train(a) => train::run(a),
        Command::Prefs(a) => prefs::run(a),
        Command::Prompts(a) => prompts::run(a),
        Command::Eval(a) => eval::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // A reader that closed the pipe (`genarm … | head`) wanted no more: success, as
        // for Unix tools. Any other failed write (a full disk) is an error.
        Err(e) if is_closed_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            noteln!("error: {}", error_text(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each cause once: genarm's own errors already quote their
/// source (`path: reason`), which `{:#}` would print a second time.
fn error_text(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

fn is_closed_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
