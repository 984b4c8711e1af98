//! Results users can keep: one JSON record per evaluation, and a printed table.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One evaluation's result, as written by the `eval_*` examples' `--output`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    /// `retrieval`, `zero-shot` or `matching`.
    pub task: String,
    /// The model as given (preset name or path) and its family.
    pub model: String,
    pub family: String,
    /// The dataset as given, and its split.
    pub dataset: String,
    pub split: Option<String>,
    /// Every metric, by name (percentages, except AUC).
    pub metrics: BTreeMap<String, f64>,
    /// Item counts: images, texts, queries, classes, skipped …
    pub counts: BTreeMap<String, usize>,
    /// Wall-clock seconds of the whole evaluation.
    pub seconds: f64,
    /// The full task-specific report.
    pub details: serde_json::Value,
}

impl EvalRecord {
    /// Writes the record as pretty JSON (atomically: a temporary file, then a rename).
    pub fn write_json(&self, path: &Path) -> Result<()> {
        let s = serde_json::to_string_pretty(self).map_err(|e| Error::Serialize {
            what: "evaluation record".into(),
            reason: e.to_string(),
        })?;
        crate::checkpoint::write_atomic(path, s.as_bytes())
    }

    /// The metrics as an aligned two-column table.
    pub fn table(&self) -> String {
        let w = self
            .metrics
            .keys()
            .map(|k| k.len())
            .max()
            .unwrap_or(6)
            .max(6);
        let mut out = format!(
            "{} of {} ({}) on {}{}\n",
            self.task,
            self.model,
            self.family,
            self.dataset,
            self.split
                .as_ref()
                .map(|s| format!(" [{s}]"))
                .unwrap_or_default()
        );
        out += &format!("  {:<w$}  {:>8}\n", "metric", "value");
        for (k, v) in &self.metrics {
            out += &format!("  {k:<w$}  {v:>8.2}\n");
        }
        let counts: Vec<String> = self
            .counts
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        out += &format!("  ({}; {:.1} s)\n", counts.join(", "), self.seconds);
        out
    }
}

/// The retrieval metrics laid out as the papers' tables: one row per direction.
pub fn recall_table(label: &str, r: &super::Recall) -> String {
    format!(
        "{label:<12} | image→text R@1 {:>6.2} R@5 {:>6.2} R@10 {:>6.2} | text→image R@1 {:>6.2} \
         R@5 {:>6.2} R@10 {:>6.2} | MR {:>6.2}",
        r.txt_r1, r.txt_r5, r.txt_r10, r.img_r1, r.img_r5, r.img_r10, r.r_mean
    )
}
