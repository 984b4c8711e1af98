//! Continued pre-training of a SigLIP / SigLIP 2 checkpoint on an image–text manifest
//! with the sigmoid loss (optionally distilled toward the starting checkpoint).
//!
//! ```sh
//! # one process (CPU or one GPU)
//! cargo run --release --example train_siglip2 -- --model ./siglip2-base-patch16-224 \
//!     --train zh-pairs.jsonl --out runs/zh --steps 10000 --batch-size 64 --lr 1e-5 \
//!     --warmup 500 --distill-weight 0.5 --device cuda
//!
//! # 4 GPUs on one machine, one process each (build with --features nccl)
//! rm -f /tmp/tuwen-nccl.id
//! for r in 0 1 2 3; do
//!   RANK=$r WORLD_SIZE=4 LOCAL_RANK=$r TUWEN_NCCL_ID=/tmp/tuwen-nccl.id \
//!     target/release/examples/train_siglip2 --model ./siglip2-base-patch16-224 \
//!     --train zh-pairs.jsonl --out runs/zh --batch-size 64 --nccl &
//! done; wait
//! ```
//!
//! `--model` is a local directory (`config.json`, `model.safetensors`, `tokenizer.json`,
//! optionally `preprocessor_config.json`). The manifest is JSONL
//! (`{"image": "a.jpg", "caption": "…"}` per line) or CSV. Training checkpoints go to
//! `OUT/ckpt` (`--resume` continues from the newest one; an OUT that holds checkpoints
//! needs `--resume` or `--overwrite`, and OUT is locked while a run uses it), metrics to
//! `OUT/metrics.jsonl`, and the final model to `OUT/model`, a directory the inference API
//! loads: `cargo run --release --example zero_shot -- --model OUT/model --image x.jpg`.
//!
//! With NCCL, each rank trains on every `WORLD_SIZE`-th sample of the manifest with
//! `--batch-size` per rank (the global batch is `WORLD_SIZE × batch size`); the sigmoid
//! loss sees the images of all ranks. Only rank 0 writes checkpoints, metrics and the
//! final model. NaFlex models re-read each batch's images to keep their aspect ratios.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use candle_core::Device;
use clap::Parser;
use tuwen::eval::RetrievalOptions;
use tuwen::models::siglip2::{SiglipEncoder, SiglipImageProcessor};
use tuwen::models::{parse_device, parse_dtype};
use tuwen::preprocess::ImageInput;
use tuwen::train::dist::Collective;
use tuwen::train::siglip::{
    export_model_dir, load_trainable, DistillKind, SiglipInputs, SiglipLossConfig, SiglipObjective,
    SiglipPixels,
};
use tuwen::train::{
    open_validation, snapshot, validation_name, AdamWConfig, CheckpointManager, DataConfig,
    DataLoader, EvalHook, Fit, ImagePipeline, Manifest, MetricsLog, Objective, ParamGroupConfig,
    RetrievalEval, RunLock, Schedule, Trainer, TrainerConfig,
};
use tuwen::{Error, LoadOptions};

#[derive(Parser, Debug, serde::Serialize)]
#[command(about = "Continued pre-training of SigLIP / SigLIP 2 with the sigmoid loss")]
struct Args {
    /// The starting checkpoint: a SigLIP / SigLIP 2 model directory.
    #[arg(long)]
    model: PathBuf,
    /// Training manifest (JSONL or CSV).
    #[arg(long)]
    train: PathBuf,
    /// Run directory: ckpt/, metrics.jsonl, model/.
    #[arg(long)]
    out: PathBuf,
    /// Optimiser steps in total (a resumed run continues up to this).
    #[arg(long, default_value_t = 1000)]
    steps: u64,
    /// Pairs per micro-batch (per rank).
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Micro-batches per step.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// A preset of hyper-parameters: `danqing` (DanQing's continued pre-training of
    /// SigLIP 2: AdamW lr 1e-5, weight decay 0.1, betas (0.9, 0.98), 1,000 warm-up steps,
    /// 256 px images, 64-token texts). Options given explicitly override it.
    #[arg(long)]
    recipe: Option<String>,
    /// Learning rate (default 1e-5).
    #[arg(long)]
    lr: Option<f64>,
    /// Weight decay (default 1e-4).
    #[arg(long)]
    weight_decay: Option<f64>,
    /// AdamW's β1 (default 0.9).
    #[arg(long)]
    beta1: Option<f64>,
    /// AdamW's β2 (default 0.999).
    #[arg(long)]
    beta2: Option<f64>,
    /// Linear warm-up steps, then cosine decay (default 500).
    #[arg(long)]
    warmup: Option<u64>,
    /// A validation set (repeatable): a Chinese-CLIP folder ({split}_imgs.tsv +
    /// {split}_texts.jsonl), a JSON Lines manifest or a CSV. Recall@K goes to
    /// metrics.jsonl every --eval-every steps.
    #[arg(long)]
    val: Vec<PathBuf>,
    /// The split of Chinese-CLIP validation folders (default: the folder's only split).
    #[arg(long)]
    val_split: Option<String>,
    #[arg(long, default_value_t = 500)]
    eval_every: u64,
    /// Images and texts per forward pass in validation.
    #[arg(long, default_value_t = 64)]
    eval_batch_size: usize,
    /// The cosine's floor as a fraction of --lr.
    #[arg(long, default_value_t = 0.0)]
    min_lr_ratio: f64,
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    /// Weight of the distillation toward the starting checkpoint (0: off).
    #[arg(long, default_value_t = 0.0)]
    distill_weight: f64,
    /// features (1 − cos of embeddings) or logits (binary KL on pair probabilities).
    #[arg(long, default_value = "features")]
    distill: String,
    /// Only parameters matching these patterns train (repeatable; default: all).
    #[arg(long)]
    trainable: Vec<String>,
    /// Parameters matching these patterns are frozen (repeatable).
    #[arg(long)]
    frozen: Vec<String>,
    #[arg(long, default_value_t = 500)]
    checkpoint_every: u64,
    /// Training checkpoints kept.
    #[arg(long, default_value_t = 3)]
    keep: usize,
    /// Continue from the newest checkpoint in OUT/ckpt.
    #[arg(long)]
    resume: bool,
    /// Delete the checkpoints already in OUT/ckpt and start over (without it, or --resume,
    /// an OUT that holds checkpoints is an error).
    #[arg(long, conflicts_with = "resume")]
    overwrite: bool,
    #[arg(long, default_value_t = 10)]
    log_every: u64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// cpu, cuda[:N] or metal[:N] (ignored with --nccl: LOCAL_RANK picks the GPU).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// f32, bf16 or f16 (half precision trains with f32 master weights).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Join an NCCL group described by RANK, WORLD_SIZE, LOCAL_RANK and TUWEN_NCCL_ID.
    #[arg(long)]
    nccl: bool,
    /// Show a progress bar (rank 0).
    #[arg(long)]
    progress: bool,
}

fn group(args: &Args) -> tuwen::Result<(Option<Arc<dyn Collective>>, Device)> {
    if !args.nccl {
        return Ok((None, parse_device(&args.device)?));
    }
    #[cfg(feature = "nccl")]
    {
        let g = tuwen::train::dist::NcclGroup::from_env()?;
        let device = g.device().clone();
        Ok((Some(Arc::new(g)), device))
    }
    #[cfg(not(feature = "nccl"))]
    Err(Error::Config(
        "--nccl needs a build with `--features nccl`".into(),
    ))
}

fn run(args: Args) -> tuwen::Result<()> {
    let (comm, device) = group(&args)?;
    let (rank, world) = comm.as_ref().map_or((0, 1), |c| (c.rank(), c.world_size()));
    // Rank 0 writes OUT: it takes the folder's lock before anything touches it (one run per
    // folder) and refuses to restart silently over existing checkpoints.
    let ckpts = CheckpointManager::new(args.out.join("ckpt"), args.keep)?;
    let _lock = if rank == 0 {
        let lock = RunLock::acquire(&args.out)?;
        for p in ckpts.prepare_start(args.resume, args.overwrite)? {
            eprintln!("--overwrite: deleted {}", p.display());
        }
        Some(lock)
    } else {
        None
    };
    let dtype = parse_dtype(&args.dtype)?;
    let distill = match args.distill.as_str() {
        "features" => DistillKind::Features,
        "logits" => DistillKind::Logits,
        other => {
            return Err(Error::Config(format!(
                "--distill {other}: expected features or logits"
            )))
        }
    };

    let h = Hyper::of(&args)?;
    for (name, v) in [
        ("--max-grad-norm", args.max_grad_norm),
        ("--distill-weight", args.distill_weight),
        ("--min-lr-ratio", args.min_lr_ratio),
    ] {
        // 0 turns clipping and distillation off; NaN or a negative value must not do so
        // silently.
        if !(v.is_finite() && v >= 0.0) {
            return Err(Error::InvalidArgument(format!(
                "{name} {v} must be a finite number >= 0"
            )));
        }
    }
    let mut m = load_trainable(&args.model, dtype, &device)?;
    if let Some(r) = &args.recipe {
        apply_recipe_sizes(r, &mut m)?;
    }
    let text = m
        .text_processor
        .clone()
        .ok_or_else(|| Error::Config(format!("{} has no tokenizer.json", args.model.display())))?;
    let teacher = if args.distill_weight > 0.0 {
        let opts = LoadOptions {
            device: device.clone(),
            dtype,
            ..LoadOptions::default()
        };
        Some(SiglipEncoder::from_dir(&args.model, &opts)?.model)
    } else {
        None
    };
    let loss_cfg = SiglipLossConfig {
        distill_weight: args.distill_weight,
        distill,
    };
    let mut objective = SiglipObjective::new(m.model.clone(), teacher, loss_cfg)?;
    if let Some(c) = &comm {
        objective = objective.with_collective(c.clone());
    }

    // This rank's shard: every world-th sample, all shards of equal length.
    let mut manifest = Manifest::open(&args.train)?;
    if world > 1 {
        let per_rank = manifest.samples.len() / world;
        let samples = manifest
            .samples
            .iter()
            .skip(rank)
            .step_by(world)
            .take(per_rank)
            .cloned()
            .collect();
        manifest = Manifest::from_samples(manifest.origin.clone(), samples);
    }
    let all_samples = manifest.samples.clone();
    let mut data_cfg = DataConfig::new(args.batch_size, 224);
    data_cfg.seed = args.seed;
    data_cfg.drop_last = true;
    data_cfg.pipeline = match &m.image_processor {
        SiglipImageProcessor::Fixed(p) => ImagePipeline::from_processor(*p),
        // The loader's square images are not used for NaFlex: keep them small.
        SiglipImageProcessor::NaFlex(_) => ImagePipeline::new(16),
    };
    let mut loader = DataLoader::new(manifest, data_cfg)?;

    let mut groups = ParamGroupConfig::default().with_trainable(args.trainable.clone());
    groups = groups.with_frozen(args.frozen.clone());
    let cfg = TrainerConfig {
        optimizer: AdamWConfig {
            lr: h.lr,
            weight_decay: h.weight_decay,
            beta1: h.beta1,
            beta2: h.beta2,
            ..Default::default()
        },
        groups,
        schedule: Schedule::warmup_cosine(h.warmup, args.steps, args.min_lr_ratio),
        grad_accum: args.grad_accum,
        max_grad_norm: (args.max_grad_norm > 0.0).then_some(args.max_grad_norm),
        seed: args.seed,
        ..Default::default()
    };
    let mut trainer = Trainer::from_varmap(&m.vars, cfg)?;

    // Rank 0's weights are broadcast (the start of data parallelism); `Fit` then resumes
    // every rank from rank 0's newest checkpoint, each at its own data position.
    if let Some(c) = &comm {
        trainer.set_collective(c.clone())?;
    }

    let mut metrics = if rank == 0 {
        Some(MetricsLog::append(args.out.join("metrics.jsonl"))?)
    } else {
        None
    };
    let mut config = serde_json::to_value(&args)
        .map_err(|e| Error::Config(format!("cannot record the arguments: {e}")))?;
    config["resolved"] = serde_json::json!({
        "lr": h.lr,
        "weight_decay": h.weight_decay,
        "betas": [h.beta1, h.beta2],
        "warmup": h.warmup,
        "max_text_len": text.max_len(),
        "max_num_patches": match &m.image_processor {
            SiglipImageProcessor::NaFlex(p) => Some(p.max_num_patches),
            SiglipImageProcessor::Fixed(_) => None,
        },
    });
    // Validation (rank 0): an inference encoder over the current weights each time.
    let mut hooks = Vec::new();
    if rank == 0 {
        for path in &args.val {
            let data = open_validation(path, args.val_split.as_deref())?;
            let (cfg, vars, tokenizer) = (
                m.config.clone(),
                m.vars.clone(),
                args.model.join("tokenizer.json"),
            );
            let max_patches = match &m.image_processor {
                SiglipImageProcessor::NaFlex(p) => Some(p.max_num_patches),
                SiglipImageProcessor::Fixed(_) => None,
            };
            let lopts = LoadOptions {
                device: device.clone(),
                dtype,
                tune_allocator: false,
                ..LoadOptions::default()
            };
            let ropts = RetrievalOptions {
                image_batch_size: args.eval_batch_size,
                text_batch_size: args.eval_batch_size,
                ..RetrievalOptions::default()
            };
            let name = validation_name(path, args.val_split.as_deref());
            hooks.push(RetrievalEval::new(
                name,
                args.eval_every,
                data,
                ropts,
                move || {
                    let enc = SiglipEncoder::from_source(
                        &cfg,
                        snapshot(&vars)?,
                        "the training weights",
                        tokenizer.is_file().then_some(tokenizer.as_path()),
                        max_patches,
                        &lopts,
                    )?;
                    Ok(Box::new(enc) as Box<dyn tuwen::DualEncoder>)
                },
            ));
        }
    }
    let mut fit = Fit::new(&mut trainer, &mut loader, args.steps)
        .config(config)
        .checkpoints(&ckpts, args.checkpoint_every)
        .resume(args.resume)
        .progress(args.progress);
    if let Some(log) = metrics.as_mut() {
        fit = fit.log(log, args.log_every);
    }
    for hook in hooks.iter_mut() {
        fit = fit.eval(hook as &mut dyn EvalHook);
    }
    let summary = fit.run(|batch, ctx| {
        let texts: Vec<&str> = batch.captions.iter().map(String::as_str).collect();
        let ids = text.encode_batch(&texts, &device)?.input_ids;
        match &m.image_processor {
            SiglipImageProcessor::Fixed(_) => {
                let px = batch.images.to_device(&device)?.to_dtype(dtype)?;
                Ok(objective
                    .loss(&SiglipInputs::new(SiglipPixels::Fixed(&px), &ids), ctx)?
                    .total)
            }
            SiglipImageProcessor::NaFlex(p) => {
                let inputs: Vec<ImageInput> = batch
                    .indices
                    .iter()
                    .map(|&i| ImageInput::path(&all_samples[i].image))
                    .collect();
                let mut nb = p.process_batch(&inputs, &device)?;
                nb.pixel_values = nb.pixel_values.to_dtype(dtype)?;
                Ok(objective
                    .loss(&SiglipInputs::new(SiglipPixels::NaFlex(&nb), &ids), ctx)?
                    .total)
            }
        }
    })?;
    if rank == 0 {
        if let Some(path) = &summary.resumed_from {
            eprintln!("resumed from {}", path.display());
        }
        eprintln!(
            "{} steps run (from step {}), last loss {:?}, {} skipped samples",
            summary.steps_run, summary.start_step, summary.last_loss, summary.skipped_samples
        );
        for (step, name, metrics) in &summary.evals {
            eprintln!("eval {name} after {step} steps: {metrics:?}");
        }
        let weights = trainer.optimizer().weights()?;
        let out = export_model_dir(&args.model, &args.out.join("model"), &weights, dtype)?;
        eprintln!("model written to {}", out.display());
    }
    if let Some(c) = &comm {
        c.barrier()?;
    }
    Ok(())
}

/// The optimiser settings: explicit options, else the recipe's, else the defaults.
struct Hyper {
    lr: f64,
    weight_decay: f64,
    beta1: f64,
    beta2: f64,
    warmup: u64,
}

impl Hyper {
    fn of(args: &Args) -> tuwen::Result<Self> {
        let base = match args.recipe.as_deref() {
            None => Hyper {
                lr: 1e-5,
                weight_decay: 1e-4,
                beta1: 0.9,
                beta2: 0.999,
                warmup: 500,
            },
            Some("danqing") => Hyper {
                lr: 1e-5,
                weight_decay: 0.1,
                beta1: 0.9,
                beta2: 0.98,
                warmup: 1000,
            },
            Some(other) => {
                return Err(Error::Config(format!(
                    "unknown --recipe `{other}` (known: danqing)"
                )))
            }
        };
        let h = Hyper {
            lr: args.lr.unwrap_or(base.lr),
            weight_decay: args.weight_decay.unwrap_or(base.weight_decay),
            beta1: args.beta1.unwrap_or(base.beta1),
            beta2: args.beta2.unwrap_or(base.beta2),
            warmup: args.warmup.unwrap_or(base.warmup),
        };
        let finite = |name: &str, v: f64, lo: f64, hi: f64| {
            if v.is_finite() && v >= lo && v < hi {
                Ok(())
            } else {
                Err(Error::InvalidArgument(format!(
                    "--{name} {v} is out of range [{lo}, {hi})"
                )))
            }
        };
        if !(h.lr.is_finite() && h.lr > 0.0 && h.lr < 1.0) {
            return Err(Error::InvalidArgument(format!(
                "--lr {} must be a finite number in (0, 1)",
                h.lr
            )));
        }
        finite("weight-decay", h.weight_decay, 0.0, 10.0)?;
        finite("beta1", h.beta1, 0.0, 1.0)?;
        finite("beta2", h.beta2, 0.0, 1.0)?;
        if args.eval_batch_size == 0 || args.eval_every == 0 {
            return Err(Error::InvalidArgument(
                "--eval-batch-size and --eval-every must be at least 1".into(),
            ));
        }
        Ok(h)
    }
}

/// The recipe's image and text sizes: DanQing trains at 256 px with 64-token texts. A
/// fixed-resolution model must be a 256 px one (its position embeddings are learned for
/// it); NaFlex models get a budget of 256 patches (16 × 16 at patch 16).
fn apply_recipe_sizes(
    recipe: &str,
    m: &mut tuwen::train::siglip::TrainableSiglip,
) -> tuwen::Result<()> {
    if recipe != "danqing" {
        return Ok(());
    }
    let v = &m.config.vision_config;
    match &mut m.image_processor {
        SiglipImageProcessor::Fixed(_) => {
            if v.image_size != 256 {
                return Err(Error::Config(format!(
                    "--recipe danqing trains at 256 px, and this model is {} px: start from a \
                     256 px checkpoint (siglip2-base-patch16-256, siglip2-large-patch16-256)",
                    v.image_size
                )));
            }
        }
        SiglipImageProcessor::NaFlex(p) => {
            p.max_num_patches = (256 / v.patch_size.max(1)).pow(2);
        }
    }
    if m.config.text_config.max_position_embeddings < 64 {
        return Err(Error::Config(format!(
            "--recipe danqing uses 64-token texts, and this model's text tower takes {}",
            m.config.text_config.max_position_embeddings
        )));
    }
    if let Some(t) = m.text_processor.as_mut() {
        t.set_max_len(64);
    }
    Ok(())
}

fn main() -> ExitCode {
    // SAFETY: first thing in `main`: no other thread exists yet and no candle op has run.
    unsafe { tuwen::threads::candle_ops_on_calling_thread() };
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
