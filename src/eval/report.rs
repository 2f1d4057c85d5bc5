//! `results.md`: one Markdown table comparing every method of an eval run — score per
//! objective (mean ± 95% CI), win rate against base sampling, KL to the base, length,
//! distinct-1 (pooled and per response), seconds per response and forward passes per
//! generated token.

use std::fmt::Write;
use std::path::Path;

use super::run::SettingSummary;
use crate::error::Result;

/// The table as Markdown, rows in summary order.
pub fn markdown_table(summary: &[SettingSummary]) -> String {
    let names: Vec<String> = summary
        .first()
        .map(|s| s.scores.keys().cloned().collect())
        .unwrap_or_default();
    let mut md = String::new();
    let mut header = vec!["method".to_string()];
    header.extend(names.iter().map(|n| format!("{n} (mean ± 95% CI)")));
    header.push(format!("win rate vs base ({})", names.join(" / ")));
    header.extend(
        [
            "KL to base (mean ± 95% CI)",
            "tokens",
            "distinct-1 (pooled / per response)",
            "s/response",
            "forward passes/token",
            "passes/response (base / ARM / RM)",
        ]
        .map(String::from),
    );
    let _ = writeln!(md, "| {} |", header.join(" | "));
    let align: Vec<&str> = header
        .iter()
        .enumerate()
        .map(|(i, _)| if i == 0 { "---" } else { "---:" })
        .collect();
    let _ = writeln!(md, "| {} |", align.join(" | "));
    for s in summary {
        let mut row = vec![s.method.clone()];
        row.extend(names.iter().map(|n| {
            let sc = &s.scores[n];
            format!("{:+.3} ± {:.3}", sc.mean, sc.ci95)
        }));
        let wins: Vec<String> = names
            .iter()
            .map(|n| format!("{:.2}", s.scores[n].win_rate_vs_base))
            .collect();
        row.push(wins.join(" / "));
        let p = &s.forward_passes;
        row.extend([
            s.kl.map_or_else(
                || "–".to_string(),
                |kl| format!("{:.3} ± {:.3}", kl.mean, kl.ci95),
            ),
            format!("{:.1}", s.mean_tokens),
            format!("{:.2} / {:.2}", s.distinct_1, s.distinct_1_per_response),
            format!("{:.3}", s.seconds_per_response),
            format!("{:.1}", s.forward_passes_per_token),
            format!("{:.0} / {:.0} / {:.0}", p.base, p.arm, p.rm),
        ]);
        let _ = writeln!(md, "| {} |", row.join(" | "));
    }
    md
}

/// Writes `results.md` into `dir`, with the command that produced it.
pub fn write_report(dir: &Path, summary: &[SettingSummary], command: &str) -> Result<()> {
    let mut md = String::from("# genarm eval results\n\n");
    let _ = writeln!(md, "```sh\n{command}\n```\n");
    md.push_str(&markdown_table(summary));
    md.push_str(
        "\nWin rates compare each response with base sampling on the same prompt and seed \
         (ties count ½). KL to base is the mean over responses of Σ_t log π_dec(y_t) − \
         log π_base(y_t), π_dec being the distribution each response was sampled from \
         (– for best-of-N and ARGS). Forward passes are token positions through a \
         transformer, summed over models (see docs/evaluation.md).\n",
    );
    crate::model::lora::write_atomic(&dir.join("results.md"), md.as_bytes())
}
