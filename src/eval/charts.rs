//! The chart files of an α sweep: `reward_vs_alpha.svg` (each ARM's α with the others
//! at 0, one panel per scorer), and for two scorers the Pareto front of the settings'
//! mean scores (`pareto.svg`, `pareto.json` with its hypervolume).

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
                .filter(|s| {
                    s.alphas
                        .iter()
                        .enumerate()
                        .all(|(i, &a)| i == arm || a == 0.0)
                })
                .map(|s| {
                    let score = &s.scores[scorer];
                    (s.alphas[arm] as f64, score.mean, score.ci95)
                })
                .collect(),
        })
        .collect()
}
