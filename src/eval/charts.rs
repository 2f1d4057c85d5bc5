//! The chart files of an α sweep: `reward_vs_alpha.svg` (each ARM's α with the others
//! at 0, one panel per scorer), for two scorers the Pareto front of the settings'
//! mean scores (`pareto.svg`, `pareto.json` with its hypervolume), and
//! `reward_vs_kl.svg` (mean score against the KL to the base, GenARM's α beside the
//! trained policies).

use std::path::Path;

use serde::Serialize;

use super::pareto::{hypervolume, pareto_front};
use super::plot::{line_panels, pareto_chart, Series};
use super::run::SettingSummary;
use crate::error::{Error, Result};

/// The two-objective front of a sweep, as written to `pareto.json`.
#[derive(Clone, Debug, Serialize)]
pub struct ParetoSummary {
    pub objectives: Vec<String>,
    pub points: Vec<(f64, f64)>,
    /// The points no other point beats on both objectives.
    pub front: Vec<(f64, f64)>,
    pub reference: (f64, f64),
    pub hypervolume: f64,
}

/// Writes the charts of `summary` (the α grid's settings, base-only first) into `dir`.
/// `arms` label the ARMs, `scorers` are in `--scorer` order: the front is over the
/// first two (any others are reported, not traded off); `reference` defaults to the
/// base-only setting's scores. Returns the front when there are two scorers.
pub fn write_sweep_charts(
    dir: &Path,
    arms: &[String],
    scorers: &[String],
    summary: &[SettingSummary],
    reference: Option<(f64, f64)>,
) -> Result<Option<ParetoSummary>> {
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|e| Error::io(&path, e))
    };
    if !arms.is_empty() {
        // One panel per scorer (their scales differ), one line per ARM.
        let panels: Vec<(String, Vec<Series>)> = scorers
            .iter()
            .map(|name| (name.clone(), alpha_series(arms, name, summary)))
            .collect();
        write(
            "reward_vs_alpha.svg",
            &line_panels("mean score vs ARM weight (95% CI)", "α", &panels),
        )?;
    }
    let [x, y, ..] = scorers else {
        return Ok(None);
    };
    let points: Vec<(f64, f64)> = summary
        .iter()
        .map(|s| (s.scores[x].mean, s.scores[y].mean))
        .collect();
    let Some(&base_point) = points.first() else {
        return Ok(None);
    };
    let reference = reference.unwrap_or(base_point);
    let front = pareto_front(&points);
    let labelled: Vec<((f64, f64), String)> = points
        .iter()
        .zip(summary)
        .map(|(&p, s)| (p, format!("{:?}", s.alphas)))
        .collect();
    write(
        "pareto.svg",
        &pareto_chart("two objectives over the α grid", x, y, &labelled, &front),
    )?;
    let pareto = ParetoSummary {
        objectives: vec![x.clone(), y.clone()],
        hypervolume: hypervolume(&points, reference),
        points,
        front,
        reference,
    };
    write("pareto.json", &serde_json::to_string_pretty(&pareto)?)?;
    Ok(Some(pareto))
}

/// For each ARM, the settings where only it is guiding: (α, mean, CI) of `scorer`.
fn alpha_series(arms: &[String], scorer: &str, summary: &[SettingSummary]) -> Vec<Series> {
    (0..arms.len())
        .map(|arm| Series {
            label: format!("α of {} (the others 0)", arms[arm]),
            points: summary
                .iter()
                .filter(|s| only_arm_guides(s, arm))
                .map(|s| {
                    let score = &s.scores[scorer];
                    (s.alphas[arm] as f64, score.mean, score.ci95)
                })
                .collect(),
        })
        .collect()
}

/// Writes `reward_vs_kl.svg` into `dir`: each row's mean score (95% CI) against its mean
/// KL to the base, one panel per scorer; one line per ARM (its α with the others at 0,
/// base-only included) and one point per trained policy (`dpo:DIR` rows), as the paper
/// compares GenARM with DPO. Rows without a KL estimate (best-of-N, ARGS) are left out;
/// returns whether anything was drawn.
pub fn write_kl_chart(
    dir: &Path,
    arms: &[String],
    scorers: &[String],
    summary: &[SettingSummary],
) -> Result<bool> {
    let is_sweep = |s: &SettingSummary| s.method == "base" || s.method.starts_with("genarm:");
    let panels: Vec<(String, Vec<Series>)> = scorers
        .iter()
        .map(|name| {
            let point = |s: &SettingSummary| {
                let score = &s.scores[name];
                s.kl.map(|kl| (kl.mean, score.mean, score.ci95))
            };
            let mut series: Vec<Series> = (0..arms.len())
                .map(|arm| {
                    let mut points: Vec<(f64, f64, f64)> = summary
                        .iter()
                        .filter(|s| is_sweep(s) && only_arm_guides(s, arm))
                        .filter_map(point)
                        .collect();
                    points.sort_by(|a, b| a.0.total_cmp(&b.0));
                    Series {
                        label: format!("GenARM: α of {} (the others 0)", arms[arm]),
                        points,
                    }
                })
                .collect();
            if arms.is_empty() {
                // No ARM line to carry base sampling: its own point.
                series.extend(
                    summary
                        .iter()
                        .filter(|s| s.method == "base")
                        .filter_map(|s| {
                            Some(Series {
                                label: "base".into(),
                                points: vec![point(s)?],
                            })
                        }),
                );
            }
            series.extend(
                summary
                    .iter()
                    .filter(|s| s.method.starts_with("dpo:"))
                    .filter_map(|s| {
                        Some(Series {
                            label: s.method.clone(),
                            points: vec![point(s)?],
                        })
                    }),
            );
            series.retain(|s| !s.points.is_empty());
            (name.clone(), series)
        })
        .collect();
    if panels.iter().all(|(_, series)| series.is_empty()) {
        return Ok(false);
    }
    let path = dir.join("reward_vs_kl.svg");
    let svg = line_panels(
        "mean score vs KL to the base (95% CI)",
        "KL(π_dec ‖ π_base), nats per response",
        &panels,
    );
    std::fs::write(&path, svg).map_err(|e| Error::io(&path, e))?;
    Ok(true)
}

/// Whether `arm` is the only ARM with a non-zero α in `s` (base-only counts).
fn only_arm_guides(s: &SettingSummary, arm: usize) -> bool {
    s.alphas
        .iter()
        .enumerate()
        .all(|(i, &a)| i == arm || a == 0.0)
}
