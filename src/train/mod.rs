//! The model-agnostic training engine used by every model's continued pre-training.
//!
//! * [`optim`]: PyTorch-exact AdamW with parameter groups (no weight decay on biases,
//!   norms and temperatures, a learning-rate multiplier per group), freezing by name
//!   patterns, and f32 master weights for bf16/f16 models.
//! * [`schedule`]: linear warm-up then cosine decay to a floor, or constant.
//! * [`trainer`]: [`Trainer`] runs one optimiser step over micro-batches (gradient
//!   accumulation), clips by global L2 norm, skips non-finite steps and stops after too
//!   many in a row; [`ema_update`] and [`EmaPairs`] for MoCo momentum encoders and EMA
//!   teachers; [`grad_coverage`] reports which trainable tensors got a gradient.
//! * [`state`]: crash-safe training checkpoints (weights, optimiser state, metadata, extra
//!   tensors such as MoCo queues) written atomically as `step-NNNNNNNNN` directories, with
//!   keep-last-K pruning.
//! * [`data`]: JSONL/CSV manifests and a deterministic, resumable, parallel
//!   [`DataLoader`] with BriVL-style colour augmentation; bad samples are skipped and
//!   counted.
//! * [`log`]: JSONL metrics and an optional progress bar (feature `progress`).
//! * [`eval`]: the hook interface through which a run evaluates (e.g. Recall@K) every N
//!   steps.
//! * [`fit`]: the loop tying these together, with resume.
//!
//! Randomness anywhere in the engine is derived from `(seed, stream, epoch/step, index)` by
//! [`rng::derive_rng`], so a resumed run reproduces an uninterrupted one exactly.
//!
//! ```no_run
//! use tuwen::train::{
//!     AdamWConfig, CheckpointManager, DataConfig, DataLoader, Fit, Manifest,
//!     ParamGroupConfig, Schedule, Trainer, TrainerConfig,
//! };
//! # fn main() -> tuwen::Result<()> {
//! # let varmap = candle_nn::VarMap::new();
//! let cfg = TrainerConfig {
//!     optimizer: AdamWConfig { lr: 1e-5, weight_decay: 0.05, ..Default::default() },
//!     groups: ParamGroupConfig::default().with_trainable(["textencoder.*"]),
//!     schedule: Schedule::warmup_cosine(500, 10_000, 0.0),
//!     grad_accum: 2,
//!     max_grad_norm: Some(1.0),
//!     ..Default::default()
//! };
//! let mut trainer = Trainer::from_varmap(&varmap, cfg)?;
//! let manifest = Manifest::open("train.jsonl".as_ref())?;
//! let mut loader = DataLoader::new(manifest, DataConfig::new(32, 224))?;
//! let ckpts = CheckpointManager::new("runs/ckpt", 3)?;
//! let summary = Fit::new(&mut trainer, &mut loader, 10_000)
//!     .checkpoints(&ckpts, 1000)
//!     .resume(true)
//!     // tokenise batch.captions, run the model, return a scalar loss
//!     .run(|batch, _ctx| model_loss(batch))?;
//! println!("{} steps, last loss {:?}", summary.steps_run, summary.last_loss);
//! # Ok(()) }
//! # fn model_loss(_: &tuwen::train::Batch) -> tuwen::Result<candle_core::Tensor> {
//! #     Ok(candle_core::Tensor::new(0f32, &candle_core::Device::Cpu)?)
//! # }
//! ```

pub mod data;
pub mod dist;
pub mod eval;
pub mod fit;
pub mod log;
pub mod objectives;
pub mod optim;
pub mod rng;
pub mod schedule;
pub mod state;
pub mod trainer;

// The objectives and the data pipeline at their earlier paths (`tuwen::train::r2d2`,
// `tuwen::train::webdataset`, ...), which programs written against them keep using.
pub use data::{augment, synthetic, webdataset};
pub use objectives::{brivl, cnclip, r2d2, siglip};

pub use crate::checkpoint::pattern::{self, Patterns};
pub use augment::AugmentConfig;
pub use data::{Batch, DataConfig, DataLoader, DataPosition, ImagePipeline, Manifest, Sample};
pub use dist::{all_gather_with_grad, Collective, LocalGroup};
pub use eval::{open_validation, snapshot, validation_name, EvalFn, EvalHook, RetrievalEval};
pub use fit::{ExtraState, Fit, FitSummary};
pub use log::{MetricsLog, Progress};
pub use objectives::{LossTerms, Objective};
pub use optim::{AdamW, AdamWConfig, Grads, GroupRule, ParamGroupConfig};
pub use r2d2::{R2d2LossConfig, R2d2Objective};
pub use schedule::Schedule;
pub use state::{CheckpointManager, CheckpointMeta, RunLock, TrainCheckpoint};
pub use trainer::{
    ema_update, grad_coverage, BatchInfo, EmaPairs, GradCoverage, SkipReason, StepCtx, StepReport,
    Trainer, TrainerConfig,
};
pub use webdataset::{
    BatchSource, ShardCursor, ShardSample, ShardSpec, ShardWriter, WebDatasetConfig,
    WebDatasetLoader,
};
