//! One optimiser step at a time: gradient accumulation, clipping, the non-finite guard,
//! the schedule, post-step hooks; plus EMA/momentum updates and gradient coverage.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Tensor, Var};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use super::dist::{all_reduce_grads, Collective};
use super::optim::{AdamW, AdamWConfig, Grads, ParamGroupConfig};
use super::rng::{derive_rng, streams, ChaCha8Rng};
use super::schedule::Schedule;
use crate::error::{Error, Result};

/// Locks a var map's table, or fails if a thread panicked while holding it.
pub(crate) fn lock_vars(
    vars: &VarMap,
) -> Result<std::sync::MutexGuard<'_, std::collections::HashMap<String, Var>>> {
    vars.data()
        .lock()
        .map_err(|_| Error::LockPoisoned("var map"))
}

/// What a [`Trainer`] does each step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainerConfig {
    pub optimizer: AdamWConfig,
    pub groups: ParamGroupConfig,
    pub schedule: Schedule,
    /// Micro-batches per optimiser step; their gradients are averaged.
    pub grad_accum: usize,
    /// Clip the global L2 gradient norm to this value (PyTorch `clip_grad_norm_`).
    pub max_grad_norm: Option<f64>,
    /// Stop with an error after this many non-finite steps in a row.
    pub max_consecutive_skips: usize,
    /// The run seed from which all step randomness is derived ([`StepCtx::rng`]).
    pub seed: u64,
}

impl Default for TrainerConfig {
    fn default() -> Self {
        Self {
            optimizer: AdamWConfig::default(),
            groups: ParamGroupConfig::default(),
            schedule: Schedule::default(),
            grad_accum: 1,
            max_grad_norm: None,
            max_consecutive_skips: 5,
            seed: 0,
        }
    }
}

/// Where the loss closure is called from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepCtx {
    /// The 0-based optimiser step.
    pub step: u64,
    /// The micro-batch within the step.
    pub micro: usize,
    /// Micro-batches in this step.
    pub n_micro: usize,
    /// The run seed.
    pub seed: u64,
    /// This process's rank in its data-parallel group (0 without a collective).
    pub rank: usize,
}

impl StepCtx {
    /// Step `step` of a loop written without [`Trainer`]: one micro-batch, one worker
    /// (rank 0), run seed `seed`.
    pub fn single(step: u64, seed: u64) -> Self {
        Self {
            step,
            micro: 0,
            n_micro: 1,
            seed,
            rank: 0,
        }
    }

    /// A generator for this step, micro-batch and rank: the same on every run and after
    /// resume. `stream` tells independent uses apart (model code should use ids ≥ 100).
    /// Rank 0 draws what a single worker draws; every other rank has its own stream, so
    /// that dropout and masking differ across ranks as they do across a single worker's
    /// samples.
    pub fn rng(&self, stream: u64) -> ChaCha8Rng {
        if self.rank == 0 {
            derive_rng(
                self.seed,
                &[streams::STEP, stream, self.step, self.micro as u64],
            )
        } else {
            derive_rng(
                self.seed,
                &[
                    streams::STEP,
                    stream,
                    self.step,
                    self.micro as u64,
                    self.rank as u64,
                ],
            )
        }
    }
}

/// Why a step was skipped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum SkipReason {
    /// A micro-batch's loss was NaN or infinite.
    NonFiniteLoss { micro: usize, value: f64 },
    /// The accumulated gradient's norm was NaN or infinite.
    NonFiniteGradNorm { value: f64 },
}

impl std::fmt::Display for SkipReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SkipReason::NonFiniteLoss { micro, value } => {
                write!(f, "loss is {value} in micro-batch {micro}")
            }
            SkipReason::NonFiniteGradNorm { value } => write!(f, "gradient norm is {value}"),
        }
    }
}

/// What one [`Trainer::step`] did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepReport {
    /// The 0-based step that ran.
    pub step: u64,
    /// Mean loss over the micro-batches (NaN/inf when skipped for the loss).
    pub loss: f64,
    /// The base learning rate used (before group multipliers).
    pub lr: f64,
    /// The global gradient L2 norm before clipping (NaN when no gradient was computed).
    pub grad_norm: f64,
    /// Whether clipping scaled the gradients.
    pub clipped: bool,
    /// Set when the step was skipped and the weights left unchanged.
    pub skipped: Option<SkipReason>,
    /// Samples in the step (from [`BatchInfo`]).
    pub samples: usize,
    /// Wall time of the step.
    pub seconds: f64,
}

/// Counters a checkpoint keeps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrainerCounters {
    /// Optimiser steps run (skipped ones included): the next step's index.
    pub step: u64,
    pub consecutive_skips: u64,
    pub skipped_steps: u64,
}

/// The number of samples in a micro-batch, for throughput.
pub trait BatchInfo {
    fn num_samples(&self) -> usize;
}

impl BatchInfo for Tensor {
    fn num_samples(&self) -> usize {
        self.dims().first().copied().unwrap_or(1)
    }
}

/// One sample (for steps whose closure needs no input).
impl BatchInfo for () {
    fn num_samples(&self) -> usize {
        1
    }
}

impl<T> BatchInfo for Vec<T> {
    fn num_samples(&self) -> usize {
        self.len()
    }
}

impl<A: BatchInfo, B> BatchInfo for (A, B) {
    fn num_samples(&self) -> usize {
        self.0.num_samples()
    }
}

type Hook = Box<dyn FnMut(&StepReport) -> Result<()> + Send>;

/// Runs optimiser steps over named trainable vars.
pub struct Trainer {
    config: TrainerConfig,
    opt: AdamW,
    counters: TrainerCounters,
    hooks: Vec<Hook>,
    /// Data-parallel group: gradients are averaged over its ranks.
    collective: Option<Arc<dyn Collective>>,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("config", &self.config)
            .field("counters", &self.counters)
            .field("hooks", &self.hooks.len())
            .field("collective", &self.collective)
            .finish()
    }
}

impl Trainer {
    /// A trainer over named vars (all of a model's vars: the group configuration decides
    /// which train).
    pub fn new(
        vars: impl IntoIterator<Item = (String, Var)>,
        config: TrainerConfig,
    ) -> Result<Self> {
        if config.grad_accum == 0 {
            return Err(Error::Config("grad_accum must be at least 1".into()));
        }
        if config.max_consecutive_skips == 0 {
            return Err(Error::Config(
                "max_consecutive_skips must be at least 1".into(),
            ));
        }
        if let Some(c) = config.max_grad_norm {
            if !(c.is_finite() && c > 0.0) {
                return Err(Error::Config(format!("max_grad_norm {c} must be positive")));
            }
        }
        config.schedule.validate()?;
        let opt = AdamW::new(vars, config.optimizer, &config.groups)?;
        if opt.trained_names().is_empty() {
            return Err(Error::Config(
                "no parameter is trainable: check the trainable/frozen patterns".into(),
            ));
        }
        Ok(Self {
            config,
            opt,
            counters: TrainerCounters::default(),
            hooks: Vec::new(),
            collective: None,
        })
    }

    /// A trainer over every var of a [`VarMap`] (e.g. from `Loader::trainable`).
    pub fn from_varmap(vars: &VarMap, config: TrainerConfig) -> Result<Self> {
        let named: Vec<(String, Var)> = lock_vars(vars)?
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Self::new(named, config)
    }

    pub fn config(&self) -> &TrainerConfig {
        &self.config
    }

    pub fn optimizer(&self) -> &AdamW {
        &self.opt
    }

    pub fn optimizer_mut(&mut self) -> &mut AdamW {
        &mut self.opt
    }

    /// The next step's index (steps run so far, skipped ones included).
    pub fn global_step(&self) -> u64 {
        self.counters.step
    }

    pub fn counters(&self) -> TrainerCounters {
        self.counters
    }

    /// Restores counters from a checkpoint.
    pub fn set_counters(&mut self, c: TrainerCounters) {
        self.counters = c;
    }

    /// The base learning rate at `step`.
    pub fn lr_at(&self, step: u64) -> f64 {
        self.config.schedule.lr(self.config.optimizer.lr, step)
    }

    /// Runs `hook` after every step that updated the weights (EMA teachers, logging).
    pub fn add_post_step_hook(
        &mut self,
        hook: impl FnMut(&StepReport) -> Result<()> + Send + 'static,
    ) {
        self.hooks.push(Box::new(hook));
    }

    /// Makes this trainer one rank of a data-parallel group (see [`super::dist`]): the
    /// weights (f32 masters included) are broadcast from rank 0 now, and every later step
    /// averages the accumulated gradients over the ranks before clipping and updating, so
    /// all ranks take the same step. Non-finite losses are agreed on, so that every rank
    /// skips the same steps.
    ///
    /// Every rank must call this, after restoring a checkpoint if it resumes (optimiser
    /// state is not broadcast: every rank loads the same checkpoint).
    pub fn set_collective(&mut self, comm: Arc<dyn Collective>) -> Result<()> {
        if comm.world_size() > 1 {
            let weights = self.opt.weights()?;
            let mut synced = BTreeMap::new();
            for (name, w) in weights {
                let b = comm.broadcast(&w, 0)?;
                synced.insert(name, b);
            }
            self.opt
                .load_weights(&synced, "the broadcast from rank 0")?;
        }
        self.collective = Some(comm);
        Ok(())
    }

    /// The data-parallel group set by [`Trainer::set_collective`].
    pub fn collective(&self) -> Option<&Arc<dyn Collective>> {
        self.collective.as_ref()
    }

    /// One optimiser step over `micro_batches` (normally `grad_accum` of them).
    ///
    /// For each micro-batch `loss_fn` returns a scalar loss; gradients are summed and
    /// divided by the number of micro-batches, so with mean-reduced losses the step equals
    /// one over the concatenated batch. Then the global norm is measured (and clipped when
    /// configured), the schedule sets the learning rate, AdamW updates, and hooks run.
    ///
    /// A non-finite loss or gradient norm skips the update (the report says why); after
    /// `max_consecutive_skips` skips in a row an [`Error::Diverged`] stops training. The
    /// weights are then those of the last good step.
    ///
    /// With a collective ([`Trainer::set_collective`]) the averaged gradients are further
    /// averaged over the ranks before the norm is measured.
    pub fn step<B, F>(&mut self, micro_batches: &[B], mut loss_fn: F) -> Result<StepReport>
    where
        B: BatchInfo,
        F: FnMut(&B, &StepCtx) -> Result<Tensor>,
    {
        if micro_batches.is_empty() {
            return Err(Error::InvalidArgument(
                "a step needs at least one micro-batch".into(),
            ));
        }
        let start = Instant::now();
        let step = self.counters.step;
        let lr = self.lr_at(step);
        let n = micro_batches.len();
        let samples = micro_batches.iter().map(|b| b.num_samples()).sum();
        let mut acc: Option<Grads> = None;
        let mut loss_sum = 0f64;
        let mut skipped = None;
        let rank = self.collective.as_ref().map_or(0, |c| c.rank());
        for (micro, batch) in micro_batches.iter().enumerate() {
            let ctx = StepCtx {
                step,
                micro,
                n_micro: n,
                seed: self.config.seed,
                rank,
            };
            let loss = loss_fn(batch, &ctx)?;
            if loss.elem_count() != 1 {
                return Err(Error::InvalidArgument(format!(
                    "the loss must be a scalar, got shape {:?}",
                    loss.dims()
                )));
            }
            let value = loss.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?[0];
            // In a group, one rank's non-finite loss skips the step on every rank (the
            // others would otherwise wait for it in the collectives of the backward pass).
            let peers_bad = match &self.collective {
                Some(c) if c.world_size() > 1 => {
                    let bad = Tensor::new(&[(!value.is_finite()) as u8 as f32], loss.device())?;
                    c.all_reduce_sum(&bad)?.to_vec1::<f32>()?[0] > 0.0
                }
                _ => false,
            };
            if !value.is_finite() || peers_bad {
                // Another rank's loss was non-finite: reported as NaN here.
                let value = if value.is_finite() { f64::NAN } else { value };
                skipped = Some(SkipReason::NonFiniteLoss { micro, value });
                loss_sum = value;
                break;
            }
            loss_sum += value;
            let store = loss.backward()?;
            let grads = self.opt.collect_grads(&store);
            drop(store);
            acc = Some(match acc {
                None => to_accum(grads)?,
                Some(mut a) => {
                    for (dst, src) in a.grads.iter_mut().zip(grads.grads) {
                        *dst = match (dst.take(), src) {
                            (Some(d), Some(s)) => Some((d + s.to_dtype(accum_dtype(s.dtype()))?)?),
                            (Some(d), None) => Some(d),
                            (None, Some(s)) => Some(s.to_dtype(accum_dtype(s.dtype()))?),
                            (None, None) => None,
                        };
                    }
                    a
                }
            });
        }
        let mut grad_norm = f64::NAN;
        let mut clipped = false;
        if skipped.is_none() {
            let mut grads = acc.unwrap_or_else(|| self.opt.empty_grads());
            if n > 1 {
                grads.scale(1.0 / n as f64)?;
            }
            if let Some(c) = &self.collective {
                let vars: Vec<Var> = self
                    .opt
                    .trained()
                    .into_iter()
                    .map(|(_, v)| v.clone())
                    .collect();
                all_reduce_grads(&mut grads, &vars, c.as_ref())?;
            }
            grad_norm = grads.global_norm()?;
            if !grad_norm.is_finite() {
                skipped = Some(SkipReason::NonFiniteGradNorm { value: grad_norm });
            } else {
                if let Some(max) = self.config.max_grad_norm {
                    let coef = max / (grad_norm + 1e-6);
                    if coef < 1.0 {
                        grads.scale(coef)?;
                        clipped = true;
                    }
                }
                self.opt.set_lr(lr);
                self.opt.step(&grads)?;
            }
        }
        self.counters.step += 1;
        let report = StepReport {
            step,
            // The mean over micro-batches; for a non-finite loss, that loss itself.
            loss: if loss_sum.is_finite() {
                loss_sum / n as f64
            } else {
                loss_sum
            },
            lr,
            grad_norm,
            clipped,
            skipped: skipped.clone(),
            samples,
            seconds: start.elapsed().as_secs_f64(),
        };
        match skipped {
            Some(reason) => {
                self.counters.consecutive_skips += 1;
                self.counters.skipped_steps += 1;
                if self.counters.consecutive_skips >= self.config.max_consecutive_skips as u64 {
                    return Err(Error::Diverged {
                        step,
                        skipped: self.counters.consecutive_skips,
                        reason: reason.to_string(),
                    });
                }
            }
            None => {
                self.counters.consecutive_skips = 0;
                for h in &mut self.hooks {
                    h(&report)?;
                }
            }
        }
        Ok(report)
    }

    /// Runs one backward pass of `loss` and reports which trained parameters got a
    /// non-zero gradient (see [`grad_coverage`]). Weights are not changed.
    pub fn gradient_coverage(&self, loss: &Tensor) -> Result<GradCoverage> {
        let store = loss.backward()?;
        let named: Vec<(String, Var)> = self
            .opt
            .trained()
            .into_iter()
            .map(|(n, v)| (n.to_string(), v.clone()))
            .collect();
        grad_coverage(&named, &store)
    }
}

fn accum_dtype(d: DType) -> DType {
    match d {
        DType::F64 => DType::F64,
        _ => DType::F32,
    }
}

fn to_accum(mut g: Grads) -> Result<Grads> {
    for x in g.grads.iter_mut().flatten() {
        if x.dtype() != accum_dtype(x.dtype()) {
            *x = x.to_dtype(accum_dtype(x.dtype()))?;
        }
    }
    Ok(g)
}

/// Which trainable parameters received a gradient in a backward pass.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GradCoverage {
    /// Got a gradient with at least one non-zero element.
    pub nonzero: Vec<String>,
    /// Got a gradient that is zero everywhere.
    pub zero: Vec<String>,
    /// Got no gradient: the loss does not depend on them (or the graph was cut, e.g. by a
    /// fused op without backward).
    pub missing: Vec<String>,
    /// Got a gradient with NaN or infinite elements.
    pub non_finite: Vec<String>,
}

impl GradCoverage {
    /// Whether every parameter got a finite, non-zero gradient.
    pub fn is_complete(&self) -> bool {
        self.zero.is_empty() && self.missing.is_empty() && self.non_finite.is_empty()
    }

    /// An error listing the parameters without a usable gradient.
    pub fn ensure_complete(&self) -> Result<()> {
        if self.is_complete() {
            return Ok(());
        }
        Err(Error::IncompleteGradients(self.to_string()))
    }
}

impl std::fmt::Display for GradCoverage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} with non-zero gradient, {} zero {:?}, {} missing {:?}, {} non-finite {:?}",
            self.nonzero.len(),
            self.zero.len(),
            self.zero,
            self.missing.len(),
            self.missing,
            self.non_finite.len(),
            self.non_finite
        )
    }
}

/// Reports, for each named var, whether `grads` holds a non-zero, finite gradient for it.
pub fn grad_coverage(
    vars: &[(String, Var)],
    grads: &candle_core::backprop::GradStore,
) -> Result<GradCoverage> {
    let mut out = GradCoverage::default();
    let mut sorted: Vec<&(String, Var)> = vars.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, var) in sorted {
        match grads.get(var.as_tensor()) {
            None => out.missing.push(name.clone()),
            Some(g) => {
                let g = g.to_dtype(DType::F32)?;
                // Flattened first: scalars (a temperature) have no dimension to reduce.
                let finite = g.flatten_all()?.abs()?.max(0)?.to_scalar::<f32>()?;
                if !finite.is_finite() {
                    out.non_finite.push(name.clone());
                } else if finite == 0.0 {
                    out.zero.push(name.clone());
                } else {
                    out.nonzero.push(name.clone());
                }
            }
        }
    }
    Ok(out)
}

/// `target ← momentum · target + (1 − momentum) · source` for each pair, computed in f32
/// (f64 for f64 targets) and rounded into the target's dtype. This is MoCo's momentum
/// encoder update (m = 0.99) and an EMA teacher's (0.995).
pub fn ema_update(targets: &[Var], sources: &[Var], momentum: f64) -> Result<()> {
    if targets.len() != sources.len() {
        return Err(Error::InvalidArgument(format!(
            "ema_update: {} targets for {} sources",
            targets.len(),
            sources.len()
        )));
    }
    check_momentum(momentum)?;
    for (t, s) in targets.iter().zip(sources) {
        if t.dims() != s.dims() {
            return Err(Error::InvalidArgument(format!(
                "ema_update: target shape {:?} differs from source shape {:?}",
                t.dims(),
                s.dims()
            )));
        }
        let cd = accum_dtype(t.dtype());
        let next = ema_value(&t.as_detached_tensor().to_dtype(cd)?, s, momentum)?;
        t.set(&next.to_dtype(t.dtype())?)?;
    }
    Ok(())
}

fn check_momentum(m: f64) -> Result<()> {
    if !(0.0..=1.0).contains(&m) {
        return Err(Error::InvalidArgument(format!(
            "EMA momentum {m} is outside [0, 1]"
        )));
    }
    Ok(())
}

fn ema_value(target: &Tensor, source: &Var, momentum: f64) -> Result<Tensor> {
    let s = source
        .as_detached_tensor()
        .to_dtype(target.dtype())?
        .to_device(target.device())?;
    Ok(((target * momentum)? + (s * (1.0 - momentum))?)?)
}

/// Pairs of (target, source) vars for momentum/EMA updates, matched by name, with f32
/// shadow copies for half-precision targets so that small updates are not rounded away.
#[derive(Debug)]
pub struct EmaPairs {
    pairs: Vec<(String, Var, Var, Option<Tensor>)>,
}

impl EmaPairs {
    /// Pairs every var whose name starts with `source_prefix` with the var named
    /// `target_prefix + rest`, e.g. `("imgencoder.", "imgencoder_mom.")`. Fails when a
    /// source has no target or shapes differ; fails when nothing matches.
    pub fn by_prefix(vars: &VarMap, source_prefix: &str, target_prefix: &str) -> Result<Self> {
        let data = lock_vars(vars)?;
        let mut pairs = Vec::new();
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        for name in names {
            let Some(rest) = name.strip_prefix(source_prefix) else {
                continue;
            };
            let tname = format!("{target_prefix}{rest}");
            let target = data.get(&tname).ok_or_else(|| {
                Error::InvalidArgument(format!("EMA source `{name}` has no target `{tname}`"))
            })?;
            let source = &data[name];
            pairs.push((tname, target.clone(), source.clone()));
        }
        drop(data);
        if pairs.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "no var starts with `{source_prefix}`"
            )));
        }
        Self::new(pairs)
    }

    /// Explicit `(target name, target, source)` triples.
    pub fn new(pairs: Vec<(String, Var, Var)>) -> Result<Self> {
        let mut out = Vec::with_capacity(pairs.len());
        for (name, t, s) in pairs {
            if t.dims() != s.dims() {
                return Err(Error::InvalidArgument(format!(
                    "EMA target `{name}` has shape {:?}, its source {:?}",
                    t.dims(),
                    s.dims()
                )));
            }
            let shadow = match t.dtype() {
                DType::BF16 | DType::F16 => Some(t.as_detached_tensor().to_dtype(DType::F32)?),
                _ => None,
            };
            out.push((name, t, s, shadow));
        }
        Ok(Self { pairs: out })
    }

    /// Number of pairs.
    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// Copies each source into its target (MoCo initialises the key encoder this way).
    pub fn copy_from_sources(&mut self) -> Result<()> {
        self.update(0.0)
    }

    /// `target ← m · target + (1 − m) · source` for every pair.
    pub fn update(&mut self, momentum: f64) -> Result<()> {
        check_momentum(momentum)?;
        for (_, t, s, shadow) in &mut self.pairs {
            match shadow {
                Some(sh) => {
                    let next = ema_value(sh, s, momentum)?;
                    t.set(&next.to_dtype(t.dtype())?)?;
                    *sh = next;
                }
                None => {
                    let cd = accum_dtype(t.dtype());
                    let next = ema_value(&t.as_detached_tensor().to_dtype(cd)?, s, momentum)?;
                    t.set(&next.to_dtype(t.dtype())?)?;
                }
            }
        }
        Ok(())
    }

    /// The f32 shadows of half-precision targets, as `ema_shadow.{target}` (save them in
    /// a checkpoint's extra tensors for an exact resume).
    pub fn state_tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        for (name, _, _, shadow) in &self.pairs {
            if let Some(s) = shadow {
                out.insert(format!("ema_shadow.{name}"), s.copy()?);
            }
        }
        Ok(out)
    }

    /// Restores shadows saved by [`EmaPairs::state_tensors`]; without one, the shadow is
    /// re-derived from the target (call after the weights are restored).
    pub fn load_state_tensors(&mut self, s: &BTreeMap<String, Tensor>) -> Result<()> {
        for (name, t, _, shadow) in &mut self.pairs {
            if let Some(sh) = shadow {
                *sh = match s.get(&format!("ema_shadow.{name}")) {
                    Some(x) => x.to_dtype(DType::F32)?.to_device(t.device())?,
                    None => t.as_detached_tensor().to_dtype(DType::F32)?,
                };
            }
        }
        Ok(())
    }
}
