//! The training loop: batches from a [`BatchSource`] (the manifest
//! [`DataLoader`](super::data::DataLoader) or the streaming
//! [`WebDatasetLoader`](super::webdataset::WebDatasetLoader)), steps of a [`Trainer`], metrics,
//! evaluation hooks, periodic checkpoints, and resume from the newest checkpoint.

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::Tensor;
use serde_json::json;

use super::data::{Batch, BatchSource};
use super::eval::EvalHook;
use super::log::{step_record, MetricsLog, Progress};
use super::state::CheckpointManager;
use super::trainer::{StepCtx, Trainer};
use crate::error::{Error, Result};

/// State beyond weights and optimiser that a run must checkpoint (MoCo queues and their
/// pointers, EMA shadows); stored in the checkpoint's `extra.safetensors`.
pub trait ExtraState {
    /// The tensors to save (cheap copies are fine: they are written right away).
    fn save_state(&self) -> Result<BTreeMap<String, Tensor>>;
    /// Restores what [`ExtraState::save_state`] returned.
    fn load_state(&mut self, tensors: &BTreeMap<String, Tensor>) -> Result<()>;
}

/// What a [`Fit::run`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FitSummary {
    /// The step the run started from (0, or the resumed checkpoint's).
    pub start_step: u64,
    /// Steps run by this call.
    pub steps_run: u64,
    /// `(step, loss)` of every step run, skipped ones included.
    pub losses: Vec<(u64, f64)>,
    pub last_loss: Option<f64>,
    /// Steps skipped for non-finite values during this call.
    pub skipped_steps: u64,
    /// Samples skipped since the start of the run (resumed count included).
    pub skipped_samples: u64,
    /// The checkpoint resumed from.
    pub resumed_from: Option<PathBuf>,
    /// Checkpoints written.
    pub checkpoints: Vec<PathBuf>,
    /// `(steps done, hook name, metrics)` of every evaluation.
    pub evals: Vec<(u64, String, BTreeMap<String, f64>)>,
}

/// A training run over a data loader; build it, then [`Fit::run`] it.
pub struct Fit<'a> {
    trainer: &'a mut Trainer,
    loader: &'a mut dyn BatchSource,
    total_steps: u64,
    checkpoints: Option<(&'a CheckpointManager, u64)>,
    log: Option<&'a mut MetricsLog>,
    log_every: u64,
    evals: Vec<&'a mut dyn EvalHook>,
    extra: Option<&'a mut dyn ExtraState>,
    resume: bool,
    progress: bool,
    prefetch: usize,
    config: serde_json::Value,
}

impl<'a> Fit<'a> {
    /// Trains until the trainer has run `total_steps` steps, drawing batches from
    /// `loader` (a `&mut DataLoader` or `&mut WebDatasetLoader`).
    pub fn new(
        trainer: &'a mut Trainer,
        loader: &'a mut dyn BatchSource,
        total_steps: u64,
    ) -> Self {
        Self {
            trainer,
            loader,
            total_steps,
            checkpoints: None,
            log: None,
            log_every: 1,
            evals: Vec::new(),
            extra: None,
            resume: false,
            progress: false,
            prefetch: 2,
            config: serde_json::Value::Null,
        }
    }

    /// Prepares up to `depth` batches ahead on a background thread while the model
    /// trains (default 2; 0 loads on the training thread). Batches and their order do
    /// not depend on it: the thread produces exactly the batches the run consumes.
    pub fn prefetch(mut self, depth: usize) -> Self {
        self.prefetch = depth;
        self
    }

    /// Saves a checkpoint every `every` steps and at the end.
    pub fn checkpoints(mut self, manager: &'a CheckpointManager, every: u64) -> Self {
        self.checkpoints = Some((manager, every.max(1)));
        self
    }

    /// Starts from the newest complete checkpoint of the manager, when there is one.
    pub fn resume(mut self, yes: bool) -> Self {
        self.resume = yes;
        self
    }

    /// Writes metrics every `every` steps (skips are always written).
    pub fn log(mut self, log: &'a mut MetricsLog, every: u64) -> Self {
        self.log = Some(log);
        self.log_every = every.max(1);
        self
    }

    /// Adds an evaluation hook.
    pub fn eval(mut self, hook: &'a mut dyn EvalHook) -> Self {
        self.evals.push(hook);
        self
    }

    /// Checkpoints and restores extra state.
    pub fn extra_state(mut self, extra: &'a mut dyn ExtraState) -> Self {
        self.extra = Some(extra);
        self
    }

    /// Shows a progress bar.
    pub fn progress(mut self, yes: bool) -> Self {
        self.progress = yes;
        self
    }

    /// The run's configuration, stored in every checkpoint's metadata.
    pub fn config(mut self, config: serde_json::Value) -> Self {
        self.config = config;
        self
    }

    /// Runs the loop. `loss_fn` gets each micro-batch and returns its scalar loss.
    pub fn run<F>(self, mut loss_fn: F) -> Result<FitSummary>
    where
        F: FnMut(&Batch, &StepCtx) -> Result<Tensor>,
    {
        let Fit {
            trainer,
            loader,
            total_steps,
            checkpoints,
            mut log,
            log_every,
            evals,
            mut extra,
            resume,
            progress,
            prefetch,
            config,
        } = self;
        let mut summary = FitSummary::default();
        if resume {
            if let Some((mgr, _)) = checkpoints {
                if let Some(path) = mgr.latest()? {
                    let ck = CheckpointManager::load(&path)?;
                    trainer.restore(&ck)?;
                    if let Some(pos) = ck.meta.data {
                        loader.set_position(pos)?;
                    }
                    if let Some(extra) = extra.as_deref_mut() {
                        extra.load_state(&ck.extra)?;
                    }
                    if let Some(log) = log.as_deref_mut() {
                        log.write(&json!({
                            "event": "resume",
                            "step": ck.meta.step,
                            "from": path.display().to_string(),
                        }))?;
                    }
                    summary.resumed_from = Some(path);
                }
            }
        }
        summary.start_step = trainer.global_step();
        let mut parts = Parts {
            trainer,
            total_steps,
            checkpoints,
            log,
            log_every,
            evals,
            extra,
            config,
            bar: progress.then(|| Progress::new(total_steps, summary.start_step)),
        };
        let needed = total_steps.saturating_sub(summary.start_step) as usize
            * parts.trainer.config().grad_accum;
        if prefetch == 0 || needed == 0 {
            let mut next = || loader.next_batch();
            parts.run(&mut next, &mut loss_fn, &mut summary)?;
        } else {
            std::thread::scope(|scope| -> Result<()> {
                let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Batch>>(prefetch);
                let producer = &mut *loader;
                scope.spawn(move || {
                    for _ in 0..needed {
                        let b = producer.next_batch();
                        let failed = b.is_err();
                        // A closed channel means the training side stopped early.
                        if tx.send(b).is_err() || failed {
                            break;
                        }
                    }
                });
                let mut next = || {
                    rx.recv().map_err(|_| {
                        Error::Training("the data loading thread stopped unexpectedly".into())
                    })?
                };
                // `rx` is dropped when this closure returns, which releases a producer
                // blocked on a full channel before the scope joins it.
                parts.run(&mut next, &mut loss_fn, &mut summary)
            })?;
        }
        if let Some(bar) = &parts.bar {
            bar.finish();
        }
        Ok(summary)
    }
}

struct Parts<'a, 'b> {
    trainer: &'b mut Trainer,
    total_steps: u64,
    checkpoints: Option<(&'a CheckpointManager, u64)>,
    log: Option<&'a mut MetricsLog>,
    log_every: u64,
    evals: Vec<&'a mut dyn EvalHook>,
    extra: Option<&'a mut dyn ExtraState>,
    config: serde_json::Value,
    bar: Option<Progress>,
}

impl Parts<'_, '_> {
    fn run<F>(
        &mut self,
        next: &mut dyn FnMut() -> Result<Batch>,
        loss_fn: &mut F,
        summary: &mut FitSummary,
    ) -> Result<()>
    where
        F: FnMut(&Batch, &StepCtx) -> Result<Tensor>,
    {
        let accum = self.trainer.config().grad_accum;
        while self.trainer.global_step() < self.total_steps {
            let mut micro = Vec::with_capacity(accum);
            for _ in 0..accum {
                micro.push(next()?);
            }
            let pos = match micro.last() {
                Some(b) => b.position_after,
                None => return Err(Error::Training("no micro-batch".into())),
            };
            let report = match self.trainer.step(&micro, &mut *loss_fn) {
                Ok(r) => r,
                Err(e) => {
                    if let Some(log) = self.log.as_deref_mut() {
                        log.write(&json!({
                            "event": "error",
                            "step": self.trainer.global_step(),
                            "message": e.to_string(),
                        }))?;
                    }
                    return Err(e);
                }
            };
            let done = report.step + 1;
            summary.steps_run += 1;
            summary.losses.push((report.step, report.loss));
            summary.last_loss = Some(report.loss);
            summary.skipped_samples = pos.skipped_total;
            if report.skipped.is_some() {
                summary.skipped_steps += 1;
            }
            if let Some(log) = self.log.as_deref_mut() {
                if report.skipped.is_some() || done % self.log_every == 0 {
                    log.write(&step_record(&report, pos.skipped_total, Some(pos.epoch)))?;
                }
            }
            if let Some(bar) = &self.bar {
                bar.update(&report);
                if let Some(reason) = &report.skipped {
                    bar.println(&format!("step {} skipped: {reason}", report.step));
                }
            }
            for hook in self.evals.iter_mut() {
                if done % hook.every() == 0 {
                    let metrics = hook.evaluate(done)?;
                    if let Some(log) = self.log.as_deref_mut() {
                        log.write(&json!({
                            "event": "eval",
                            "step": done,
                            "name": hook.name(),
                            "metrics": metrics,
                        }))?;
                    }
                    summary.evals.push((done, hook.name().to_string(), metrics));
                }
            }
            if let Some((mgr, every)) = self.checkpoints {
                if done % every == 0 || done == self.total_steps {
                    let extra = match self.extra.as_deref() {
                        Some(x) => x.save_state()?,
                        None => BTreeMap::new(),
                    };
                    let ck = self
                        .trainer
                        .checkpoint(Some(pos), extra, self.config.clone())?;
                    let path = mgr.save(&ck)?;
                    if let Some(log) = self.log.as_deref_mut() {
                        log.write(&json!({
                            "event": "checkpoint",
                            "step": done,
                            "path": path.display().to_string(),
                        }))?;
                    }
                    summary.checkpoints.push(path);
                }
            }
        }
        Ok(())
    }
}
