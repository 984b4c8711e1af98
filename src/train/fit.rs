//! The training loop: batches from a [`BatchSource`] (the manifest
//! [`DataLoader`](super::data::DataLoader) or the streaming
//! [`WebDatasetLoader`](super::data::webdataset::WebDatasetLoader)), steps of a [`Trainer`], metrics,
//! evaluation hooks, periodic checkpoints, and resume from the newest checkpoint.
//!
//! # Data-parallel runs
//!
//! When the trainer has a collective of more than one rank
//! ([`Trainer::set_collective`]), every rank runs its own `Fit` over its own loader (a
//! [`WebDatasetLoader`](super::data::webdataset::WebDatasetLoader) with its rank, say) and:
//!
//! * after every step the ranks gather their data positions (a few hundred bytes through
//!   [`all_gather_bytes`]); at a checkpoint step **rank 0 alone** writes the checkpoint,
//!   with every rank's position ([`CheckpointMeta::rank_data`](super::state::CheckpointMeta::rank_data)),
//!   and the other ranks wait for the write and learn its outcome, so no rank runs ahead
//!   of a checkpoint that is not on disk, and a failed write stops every rank;
//! * rank 0's settings decide: its checkpoint manager, interval and resume flag are used
//!   (the other ranks' are ignored, so they may pass the same or none);
//! * on resume rank 0 picks the newest checkpoint, every rank loads it and restores its
//!   own data position; a checkpoint written with another number of ranks is refused with
//!   [`Error::WorldSizeMismatch`], naming both sizes (a rank's position is only valid for
//!   the rank split it was taken on). Checkpoints of single-process runs and older ones
//!   with a single position load as world size 1;
//! * metrics are logged and the progress bar drawn on rank 0 only (a log given to another
//!   rank is left untouched);
//! * evaluation hooks run on every rank that has them, after the same step: the weights
//!   are identical on all ranks, so hooks over the same data give identical results, and
//!   rank 0 logs them. Give hooks to rank 0 alone to evaluate once (the others then wait
//!   for it in the next step's collectives);
//! * [`ExtraState`] is saved from rank 0 and restored on every rank: it must be the same
//!   on all ranks (as MoCo queues filled with gathered features are).
//!
//! No running random state needs saving per rank: all randomness derives from the seed
//! and positions ([`super::rng`]); a rank's data randomness follows from its restored
//! data position.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::data::{Batch, BatchSource, DataPosition};
use super::dist::{all_gather_bytes, Collective};
use super::eval::EvalHook;
use super::log::{step_record, MetricsLog, Progress};
use super::objectives::Objective;
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

impl<T: ExtraState + ?Sized> ExtraState for &mut T {
    fn save_state(&self) -> Result<BTreeMap<String, Tensor>> {
        (**self).save_state()
    }

    fn load_state(&mut self, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
        (**self).load_state(tensors)
    }
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
    extra: Option<Box<dyn ExtraState + 'a>>,
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
        self.extra = Some(Box::new(extra));
        self
    }

    /// Checkpoints and restores the extra state of `objective` (queues, momentum
    /// encoders, EMA teachers: [`Objective::extra_state`]), if it has any.
    pub fn objective_state<O: Objective>(mut self, objective: &'a O) -> Self {
        self.extra = objective.extra_state();
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
        let group = match trainer.collective() {
            Some(c) if c.world_size() > 1 => Some(Group {
                comm: c.clone(),
                rank: c.rank(),
                world: c.world_size(),
                device: trainer
                    .optimizer()
                    .trained()
                    .first()
                    .map_or(Device::Cpu, |(_, v)| v.device().clone()),
            }),
            _ => None,
        };
        let (rank, world) = group.as_ref().map_or((0, 1), |g| (g.rank, g.world));
        let lead = rank == 0;
        if !lead {
            log = None;
        }
        let progress = progress && lead;
        let resume_from = if resume && lead {
            checkpoints.map(|(mgr, _)| mgr)
        } else {
            None
        };
        let find = || match resume_from {
            Some(mgr) => mgr.latest(),
            None => Ok(None),
        };
        let latest = match &group {
            None => find()?,
            Some(g) => g.on_rank0(find, "to find the checkpoint to resume from")?,
        };
        if let Some(path) = latest {
            let loaded = (|| -> Result<u64> {
                let ck = CheckpointManager::load(&path)?;
                // Checked first, so that a refused checkpoint changes nothing.
                let pos = ck.meta.position_for(rank, world, &path)?;
                trainer.restore(&ck)?;
                if let Some(pos) = pos {
                    loader.set_position(pos)?;
                }
                if let Some(extra) = extra.as_deref_mut() {
                    extra.load_state(&ck.extra)?;
                }
                Ok(ck.meta.step)
            })();
            let step = match &group {
                None => loaded?,
                Some(g) => g.agree(loaded, "to resume")?,
            };
            if let Some(log) = log.as_deref_mut() {
                log.write(&json!({
                    "event": "resume",
                    "step": step,
                    "from": path.display().to_string(),
                    "world_size": world,
                }))?;
            }
            summary.resumed_from = Some(path);
        }
        summary.start_step = trainer.global_step();
        let mut parts = RunState {
            trainer,
            total_steps,
            checkpoints,
            log,
            log_every,
            evals,
            extra,
            config,
            bar: progress.then(|| Progress::new(total_steps, summary.start_step)),
            group: group.as_ref(),
            named_skips: 0,
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

/// What a run holds once it has started: the trainer, where to checkpoint and log, the
/// hooks, and this rank's group.
struct RunState<'a, 'b> {
    trainer: &'b mut Trainer,
    total_steps: u64,
    checkpoints: Option<(&'a CheckpointManager, u64)>,
    log: Option<&'a mut MetricsLog>,
    log_every: u64,
    evals: Vec<&'a mut dyn EvalHook>,
    extra: Option<Box<dyn ExtraState + 'a>>,
    config: serde_json::Value,
    bar: Option<Progress>,
    group: Option<&'b Group>,
    /// Skipped samples named so far (at most [`NAMED_SKIPS`]).
    named_skips: usize,
}

/// How many skipped samples a run names (path and reason, in the metrics log and on
/// stderr); later ones are only counted, in every step record's `skipped_samples`.
pub const NAMED_SKIPS: usize = 100;

/// This rank's view of a data-parallel group of more than one rank.
struct Group {
    comm: Arc<dyn Collective>,
    rank: usize,
    world: usize,
    /// Where the group's tensors live (the trained parameters' device).
    device: Device,
}

impl Group {
    /// Every rank's `value`, in rank order (JSON through [`all_gather_bytes`]).
    fn gather<S: Serialize, D: DeserializeOwned>(&self, value: &S) -> Result<Vec<D>> {
        let bytes = serde_json::to_vec(value).map_err(|e| Error::Serialize {
            what: "rank metadata".into(),
            reason: e.to_string(),
        })?;
        all_gather_bytes(self.comm.as_ref(), &bytes, &self.device)?
            .iter()
            .enumerate()
            .map(|(r, b)| {
                serde_json::from_slice(b).map_err(|e| {
                    Error::Collective(format!("rank {r} sent unreadable metadata: {e}"))
                })
            })
            .collect()
    }

    /// Runs `f` on rank 0 and gives its value to every rank: rank 0 gets its own result
    /// back (its error as it was), the others rank 0's value or an error quoting rank 0's.
    /// Also a barrier: no rank returns before rank 0 is done.
    fn on_rank0<T: Serialize + DeserializeOwned>(
        &self,
        f: impl FnOnce() -> Result<T>,
        what: &str,
    ) -> Result<T> {
        if self.rank == 0 {
            let mine = f();
            let msg = Some(mine.as_ref().map_err(|e| e.to_string()));
            let _: Vec<serde_json::Value> = self.gather(&msg)?;
            return mine;
        }
        let none: Option<()> = None;
        let all: Vec<Option<std::result::Result<T, String>>> = self.gather(&none)?;
        match all.into_iter().next().flatten() {
            Some(Ok(v)) => Ok(v),
            Some(Err(m)) => Err(Error::Collective(format!("rank 0 failed {what}: {m}"))),
            None => Err(Error::Collective(format!("rank 0 sent nothing {what}"))),
        }
    }

    /// Whether every rank succeeded: a rank's own error is returned as it was; when only
    /// another rank failed, an error names it.
    fn agree<T>(&self, mine: Result<T>, what: &str) -> Result<T> {
        let msg: Option<String> = mine.as_ref().err().map(|e| e.to_string());
        let all: Vec<Option<String>> = self.gather(&msg)?;
        let mine = mine?;
        match all
            .iter()
            .enumerate()
            .find_map(|(r, m)| m.as_ref().map(|m| (r, m)))
        {
            Some((r, m)) => Err(Error::Collective(format!("rank {r} failed {what}: {m}"))),
            None => Ok(mine),
        }
    }
}

/// What every rank sends after each step of a data-parallel run.
#[derive(Serialize, Deserialize)]
struct StepMeta {
    position: DataPosition,
    /// Rank 0 writes a checkpoint after this step.
    checkpoint: bool,
}

impl RunState<'_, '_> {
    /// Names the samples the loader skipped in these batches: the first [`NAMED_SKIPS`] of
    /// the run go to the metrics log (event `skipped_sample`) and to stderr.
    fn name_skipped(&mut self, batches: &[Batch]) -> Result<()> {
        let step = self.trainer.global_step();
        for s in batches.iter().flat_map(|b| &b.skipped) {
            if self.named_skips >= NAMED_SKIPS {
                return Ok(());
            }
            self.named_skips += 1;
            let msg = format!(
                "skipped sample {} ({}): {}",
                s.index,
                s.image.display(),
                s.reason
            );
            match &self.bar {
                Some(bar) => bar.println(&msg),
                None => eprintln!("{msg}"),
            }
            if self.named_skips == NAMED_SKIPS {
                eprintln!(
                    "{NAMED_SKIPS} skipped samples named; later ones are only counted \
                     (skipped_samples in the metrics log)"
                );
            }
            if let Some(log) = self.log.as_deref_mut() {
                log.write(&json!({
                    "event": "skipped_sample",
                    "step": step,
                    "index": s.index,
                    "image": s.image.display().to_string(),
                    "reason": s.reason,
                }))?;
            }
        }
        Ok(())
    }

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
            self.name_skipped(&micro)?;
            let pos = match micro.last() {
                Some(b) => b.position_after,
                None => {
                    return Err(Error::InvalidArgument(
                        "a step needs at least one micro-batch".into(),
                    ))
                }
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
            let due = self
                .checkpoints
                .filter(|(_, every)| done % every == 0 || done == self.total_steps);
            match self.group {
                None => {
                    if let Some((mgr, _)) = due {
                        let path = self.save(mgr, done, &[pos])?;
                        summary.checkpoints.push(path);
                    }
                }
                Some(g) => {
                    let mine = StepMeta {
                        position: pos,
                        checkpoint: g.rank == 0 && due.is_some(),
                    };
                    let all: Vec<StepMeta> = g.gather(&mine)?;
                    if all.first().is_some_and(|m| m.checkpoint) {
                        let positions: Vec<DataPosition> = all.iter().map(|m| m.position).collect();
                        let path = g.on_rank0(
                            || match due {
                                Some((mgr, _)) => self.save(mgr, done, &positions),
                                None => Err(Error::Config(
                                    "saving a checkpoint needs a checkpoint manager".into(),
                                )),
                            },
                            "to write the checkpoint",
                        )?;
                        summary.checkpoints.push(path);
                    }
                }
            }
        }
        Ok(())
    }

    /// Writes the checkpoint after `done` steps with the data positions of every rank
    /// (one for a single process).
    fn save(
        &mut self,
        mgr: &CheckpointManager,
        done: u64,
        positions: &[DataPosition],
    ) -> Result<PathBuf> {
        let extra = match self.extra.as_deref() {
            Some(x) => x.save_state()?,
            None => BTreeMap::new(),
        };
        let mut ck =
            self.trainer
                .checkpoint(positions.first().copied(), extra, self.config.clone())?;
        if positions.len() > 1 {
            ck.meta.world_size = positions.len();
            ck.meta.rank_data = positions.to_vec();
        }
        let path = mgr.save(&ck)?;
        if let Some(log) = self.log.as_deref_mut() {
            log.write(&json!({
                "event": "checkpoint",
                "step": done,
                "path": path.display().to_string(),
            }))?;
        }
        Ok(path)
    }
}
