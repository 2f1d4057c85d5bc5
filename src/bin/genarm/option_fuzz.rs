//! The CLI's options as a reader of hostile input: 20,000 fixed-seed argument lists,
//! each a valid command with one option given a hostile value, must parse or be
//! refused by clap — never panic (a value parser that overflows, divides or indexes).

use clap::{CommandFactory, Parser};

use super::Cli;

const HOSTILE: &[&str] = &[
    "NaN",
    "nan",
    "inf",
    "-inf",
    "-1",
    "0",
    "-0",
    "1e309",
    "-1e309",
    "1e-320",
    "4294967296",
    "18446744073709551616",
    "99999999999999999999999",
    "1e12",
    "0.5",
    "2.5",
    "",
    " ",
    "abc",
    "1,2",
    ",",
    "1,,2",
    "-",
    "--",
    "0x10",
    "1_000",
    "+3",
    "١",
    "1e",
    ".",
    "1.5,NaN",
    "X,Y",
    "3:",
    ":3",
    "bon:0",
    "args:0:1",
    "bon:18446744073709551616",
];

/// A valid invocation of each subcommand (paths need not exist: parsing comes first).
fn valid(cmd: &str) -> Vec<&'static str> {
    let base: &[&str] = match cmd {
        "generate" => &["generate", "--model", "m.gguf", "--prompt", "hi"],
        "logits" => &["logits", "--model", "m.gguf", "--tokens", "1,2"],
        "bench" => &["bench", "--model", "m.gguf"],
        "init-lora" => &["init-lora", "--model", "m.gguf", "--out", "o"],
        "init-model" => &["init-model", "--like", "m.gguf", "--out", "o.gguf"],
        "train" => &[
            "train", "--model", "m.gguf", "--data", "d.jsonl", "--out", "o",
        ],
        "prompts" => &[
            "prompts",
            "--corpus",
            "c",
            "--out-train",
            "a",
            "--out-eval",
            "b",
        ],
        "prefs" => &[
            "prefs",
            "--model",
            "m",
            "--prompts",
            "p",
            "--samples",
            "2",
            "--scorer",
            "length",
            "--out",
            "o",
        ],
        _ => &[
            "eval",
            "--model",
            "m",
            "--prompts",
            "p",
            "--scorer",
            "length",
            "--out",
            "o",
        ],
    };
    std::iter::once("genarm")
        .chain(base.iter().copied())
        .collect()
}

#[test]
fn twenty_thousand_hostile_option_values_parse_or_are_refused() {
    let command = Cli::command();
    let subcommands: Vec<(String, Vec<String>)> = command
        .get_subcommands()
        .map(|s| {
            let options = s
                .get_arguments()
                .filter(|a| a.get_action().takes_values())
                .filter_map(|a| a.get_long().map(|l| format!("--{l}")))
                .collect();
            (s.get_name().to_owned(), options)
        })
        .collect();
    let mut state = 7u64;
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as usize
    };
    let (mut accepted, mut refused) = (0, 0);
    for _ in 0..20_000 {
        let (cmd, options) = &subcommands[next() % subcommands.len()];
        let option = &options[next() % options.len()];
        let value = HOSTILE[next() % HOSTILE.len()];
        let mut argv = valid(cmd);
        argv.push(option);
        argv.push(value);
        let parsed = std::panic::catch_unwind(|| Cli::try_parse_from(&argv).is_ok());
        match parsed {
            Ok(true) => accepted += 1,
            Ok(false) => refused += 1,
            Err(_) => panic!("`{}` panicked while parsing", argv.join(" ")),
        }
    }
    println!("20000 hostile option values: {refused} refused, {accepted} accepted, 0 panics");
    assert!(refused > accepted, "{refused} refused, {accepted} accepted");
}
