//! Evaluation hooks: a run calls them every N steps and logs what they return.
//!
//! The retrieval metrics themselves (Recall@K on a held-out manifest, zero-shot accuracy)
//! live in `crate::eval`; a hook wraps them with the model being trained, e.g. a
//! [`super::DataLoader`] over the held-out manifest with `shuffle: false` and
//! `drop_last: false`, embedding every batch and computing Recall@K.

use std::collections::BTreeMap;
use std::path::Path;

use candle_nn::VarMap;

use super::Manifest;
use crate::checkpoint::TensorSource;
use crate::error::{Error, Result};
use crate::eval::{RetrievalDataset, RetrievalOptions};
use crate::models::DualEncoder;

/// Something evaluated periodically during training.
pub trait EvalHook {
    /// A short name for logs (`"flickr30k-cn"`).
    fn name(&self) -> &str;
    /// Run every this many steps (after the step whose 1-based count is a multiple).
    fn every(&self) -> u64;
    /// Evaluates the current weights after `steps_done` steps; returns named metrics
    /// (`"i2t_R@1"` → 0.53).
    fn evaluate(&mut self, steps_done: u64) -> Result<BTreeMap<String, f64>>;
}

/// An [`EvalHook`] from a closure.
pub struct EvalFn<F> {
    name: String,
    every: u64,
    f: F,
}

impl<F> EvalFn<F>
where
    F: FnMut(u64) -> Result<BTreeMap<String, f64>>,
{
    pub fn new(name: impl Into<String>, every: u64, f: F) -> Self {
        Self {
            name: name.into(),
            every: every.max(1),
            f,
        }
    }
}

impl<F> EvalHook for EvalFn<F>
where
    F: FnMut(u64) -> Result<BTreeMap<String, f64>>,
{
    fn name(&self) -> &str {
        &self.name
    }

    fn every(&self) -> u64 {
        self.every
    }

    fn evaluate(&mut self, steps_done: u64) -> Result<BTreeMap<String, f64>> {
        (self.f)(steps_done)
    }
}

/// Detached views of the current weights in `vars`, under their names: the tensor source
/// an inference encoder is built from for evaluation. Nothing is copied, and nothing the
/// encoder computes tracks gradients.
pub fn snapshot(vars: &VarMap) -> Result<TensorSource> {
    let data = vars
        .data()
        .lock()
        .map_err(|_| Error::LockPoisoned("var map"))?;
    Ok(TensorSource::Map(
        data.iter()
            .map(|(k, v)| (k.clone(), v.as_detached_tensor()))
            .collect(),
    ))
}

/// Opens a validation set for training: every format [`RetrievalDataset::open`] reads
/// (Chinese-CLIP's TSV + JSONL, the JSON Lines manifest), plus the training manifest's CSV.
pub fn open_validation(path: &Path, split: Option<&str>) -> Result<RetrievalDataset> {
    let is_csv = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("csv"));
    if is_csv {
        let m = Manifest::from_csv(path)?;
        let mut d =
            RetrievalDataset::from_entries(m.samples.into_iter().map(|s| (s.image, s.captions)))?;
        d.origin = path.display().to_string();
        return Ok(d);
    }
    RetrievalDataset::open(path, split)
}

/// Retrieval on a held-out set during training, for every family and objective: each
/// time it runs, `build` makes an inference encoder from the current weights (see
/// [`snapshot`]) and [`crate::eval::evaluate`] reports Recall@1/5/10 both ways and the
/// mean recall, the same code as the `eval_retrieval` example.
pub struct RetrievalEval<F> {
    name: String,
    every: u64,
    data: RetrievalDataset,
    opts: RetrievalOptions,
    build: F,
}

impl<F> RetrievalEval<F>
where
    F: FnMut() -> Result<Box<dyn DualEncoder>>,
{
    pub fn new(
        name: impl Into<String>,
        every: u64,
        data: RetrievalDataset,
        opts: RetrievalOptions,
        build: F,
    ) -> Self {
        Self {
            name: name.into(),
            every: every.max(1),
            data,
            opts,
            build,
        }
    }
}

impl<F> EvalHook for RetrievalEval<F>
where
    F: FnMut() -> Result<Box<dyn DualEncoder>>,
{
    fn name(&self) -> &str {
        &self.name
    }

    fn every(&self) -> u64 {
        self.every
    }

    fn evaluate(&mut self, _steps_done: u64) -> Result<BTreeMap<String, f64>> {
        let model = (self.build)()?;
        let r = crate::eval::evaluate(model.as_ref(), &self.data, &self.opts)?;
        Ok(r.metrics())
    }
}

/// A short name for a validation set: its folder or file name (plus the split).
pub fn validation_name(path: &Path, split: Option<&str>) -> String {
    let base = path
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "val".into());
    match split {
        Some(s) => format!("{base}/{s}"),
        None => base,
    }
}
