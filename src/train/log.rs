//! Training metrics: a JSONL log and an optional progress bar.
//!
//! Every line of the log is one JSON object with an `event` field: `step` (step, loss, lr,
//! grad norm, clipping, samples per second, skipped samples), `skip` (a step skipped for a
//! non-finite value, always written), `eval` (metrics from an evaluation hook),
//! `checkpoint` and `resume`. Lines are flushed as they are written, so a crashed run keeps
//! its log.
//!
//! The progress bar uses `indicatif` and needs the `progress` feature (on by default);
//! without it, [`Progress`] prints nothing.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::trainer::StepReport;
use crate::error::{Error, Result};

/// A JSONL metrics file.
#[derive(Debug)]
pub struct MetricsLog {
    path: PathBuf,
    out: BufWriter<File>,
}

impl MetricsLog {
    /// Opens `path` for appending (a resumed run continues the same log), creating it and
    /// its folder when missing.
    pub fn append(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        }
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(format!("opening metrics log {}", path.display()), e))?;
        Ok(Self {
            path,
            out: BufWriter::new(f),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes one JSON object as a line and flushes.
    pub fn write(&mut self, record: &Value) -> Result<()> {
        let line = serde_json::to_string(record).map_err(|e| Error::Serialize {
            what: "a log record".into(),
            reason: e.to_string(),
        })?;
        let r = writeln!(self.out, "{line}").and_then(|_| self.out.flush());
        r.map_err(|e| Error::io(format!("writing metrics log {}", self.path.display()), e))
    }

    /// Writes a step record (or a `skip` record for a skipped step).
    pub fn log_step(
        &mut self,
        r: &StepReport,
        skipped_samples: u64,
        epoch: Option<u64>,
    ) -> Result<()> {
        self.write(&step_record(r, skipped_samples, epoch))
    }

    /// Reads every record of a log (for tests and analysis).
    pub fn read(path: impl AsRef<Path>) -> Result<Vec<Value>> {
        let path = path.as_ref();
        let s = std::fs::read_to_string(path)
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        s.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l).map_err(|e| Error::parse(path.display().to_string(), e))
            })
            .collect()
    }
}

fn finite_or_string(x: f64) -> Value {
    if x.is_finite() {
        json!(x)
    } else {
        json!(x.to_string())
    }
}

/// The JSON record of a step.
pub fn step_record(r: &StepReport, skipped_samples: u64, epoch: Option<u64>) -> Value {
    let throughput = if r.seconds > 0.0 {
        r.samples as f64 / r.seconds
    } else {
        0.0
    };
    let mut v = json!({
        "event": if r.skipped.is_some() { "skip" } else { "step" },
        "step": r.step,
        "loss": finite_or_string(r.loss),
        "lr": r.lr,
        "grad_norm": finite_or_string(r.grad_norm),
        "clipped": r.clipped,
        "samples": r.samples,
        "seconds": r.seconds,
        "samples_per_sec": throughput,
        "skipped_samples": skipped_samples,
    });
    if let Some(e) = epoch {
        v["epoch"] = json!(e);
    }
    if let Some(reason) = &r.skipped {
        v["reason"] = json!(reason.to_string());
    }
    v
}

/// A terminal progress bar showing step, loss, learning rate and throughput.
#[derive(Debug)]
pub struct Progress {
    #[cfg(feature = "progress")]
    bar: indicatif::ProgressBar,
}

impl Progress {
    /// A bar for `total` steps starting at `start`; hidden when stderr is not a terminal.
    pub fn new(total: u64, start: u64) -> Self {
        #[cfg(feature = "progress")]
        {
            let bar = indicatif::ProgressBar::new(total);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] {pos}/{len} {msg}",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_position(start);
            Self { bar }
        }
        #[cfg(not(feature = "progress"))]
        {
            let _ = (total, start);
            Self {}
        }
    }

    /// Shows a step's figures.
    pub fn update(&self, r: &StepReport) {
        #[cfg(feature = "progress")]
        {
            let tp = if r.seconds > 0.0 {
                r.samples as f64 / r.seconds
            } else {
                0.0
            };
            let skip = if r.skipped.is_some() { " SKIPPED" } else { "" };
            self.bar.set_message(format!(
                "loss {:.4} lr {:.3e} {:.1} samples/s{skip}",
                r.loss, r.lr, tp
            ));
            self.bar.set_position(r.step + 1);
        }
        #[cfg(not(feature = "progress"))]
        let _ = r;
    }

    /// Prints a line above the bar.
    pub fn println(&self, msg: &str) {
        #[cfg(feature = "progress")]
        self.bar.println(msg);
        #[cfg(not(feature = "progress"))]
        let _ = msg;
    }

    pub fn finish(&self) {
        #[cfg(feature = "progress")]
        self.bar.finish();
    }
}
