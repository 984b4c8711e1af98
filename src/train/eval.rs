//! Evaluation hooks: a run calls them every N steps and logs what they return.
//!
//! The retrieval metrics themselves (Recall@K on a held-out manifest, zero-shot accuracy)
//! live in `crate::eval`; a hook wraps them with the model being trained, e.g. a
//! [`super::DataLoader`] over the held-out manifest with `shuffle: false` and
//! `drop_last: false`, embedding every batch and computing Recall@K.

use std::collections::BTreeMap;

use crate::error::Result;

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
