//! Fine-tuning and continued pre-training of Chinese-CLIP with CLIP's InfoNCE loss, on a
//! JSONL or CSV manifest of image–caption pairs.
//!
//! ```sh
//! cargo run --release --example train_cnclip -- --model ./chinese-clip-vit-base-patch16 \
//!     --train pairs.jsonl --val flickr30k-cn --val-split valid --out runs/cn \
//!     --steps 5000 --batch-size 64 --lr 5e-5 --warmup 100 --lock-image
//! ```
//!
//! `--model` is a Chinese-CLIP folder as published (`config.json`, `pytorch_model.bin` or
//! `model.safetensors`, `vocab.txt`, `preprocessor_config.json`), or a cn_clip checkpoint
//! (`clip_cn_rn50.pt`, `clip_cn_vit-b-16.pt`, …) with `vocab.txt` beside it. `--lock-image` freezes the
//! image tower (`--unlocked-layers N` keeps its last N layers trainable), as Chinese-CLIP's
//! fine-tuning does; `logit_scale` trains and is clamped at ln 100. Training checkpoints go
//! to `OUT/ckpt` (`--resume` continues from the newest one; an OUT that holds checkpoints
//! needs `--resume` or `--overwrite`, and OUT is locked while a run uses it), metrics to
//! `OUT/metrics.jsonl`, and the final model to `OUT/model`, which `zero_shot --model
//! OUT/model` loads.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tuwen::eval::RetrievalOptions;
use tuwen::models::cnclip::ChineseClipEncoder;
use tuwen::models::{parse_device, parse_dtype};
use tuwen::train::cnclip::{
    export_model_dir, load_trainable, CnClipInputs, CnClipLossConfig, CnClipObjective,
};
use tuwen::train::{
    open_validation, snapshot, validation_name, AdamWConfig, CheckpointManager, DataConfig,
    DataLoader, EvalHook, Fit, ImagePipeline, Manifest, MetricsLog, Objective, RetrievalEval,
    RunLock, Schedule, Trainer, TrainerConfig,
};
use tuwen::{Error, LoadOptions};

#[derive(Parser, Debug, serde::Serialize)]
#[command(about = "Fine-tune Chinese-CLIP with the CLIP loss on your image–caption pairs")]
struct Args {
    /// The Chinese-CLIP folder (or cn_clip `.pt` with `vocab.txt` beside it) to start from.
    #[arg(long)]
    model: PathBuf,
    /// JSONL or CSV manifest of image–caption pairs.
    #[arg(long)]
    train: PathBuf,
    /// Validation set (a Chinese-CLIP folder, *_imgs.tsv or a manifest); repeatable.
    #[arg(long)]
    val: Vec<PathBuf>,
    /// The split of a Chinese-CLIP validation folder.
    #[arg(long)]
    val_split: Option<String>,
    /// Evaluate every N steps.
    #[arg(long, default_value_t = 500)]
    eval_every: u64,
    /// The run folder.
    #[arg(long)]
    out: PathBuf,
    /// Optimiser steps in total (a resumed run continues up to this).
    #[arg(long)]
    steps: u64,
    /// Pairs per micro-batch.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Base learning rate (AdamW; cn_clip's fine-tuning uses 5e-5 at batch 128).
    #[arg(long, default_value_t = 5e-5)]
    lr: f64,
    #[arg(long, default_value_t = 0.001)]
    weight_decay: f64,
    #[arg(long, default_value_t = 100)]
    warmup: u64,
    /// Freeze the image tower (and its projection).
    #[arg(long)]
    lock_image: bool,
    /// With --lock-image: keep the last N image layers trainable.
    #[arg(long, default_value_t = 0)]
    unlocked_layers: usize,
    /// Text length in tokens (Chinese-CLIP's 52 by default).
    #[arg(long, default_value_t = 52)]
    context_length: usize,
    /// Clip the global gradient norm (0: off).
    #[arg(long, default_value_t = 0.0)]
    max_grad_norm: f64,
    #[arg(long, default_value_t = 500)]
    checkpoint_every: u64,
    #[arg(long, default_value_t = 3)]
    keep: usize,
    /// Continue from the newest checkpoint in OUT/ckpt.
    #[arg(long)]
    resume: bool,
    /// Delete the checkpoints already in OUT/ckpt and start over.
    #[arg(long, conflicts_with = "resume")]
    overwrite: bool,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// f32, bf16 or f16 (AdamW keeps f32 master weights).
    #[arg(long, default_value = "f32")]
    dtype: String,
    #[arg(long, default_value_t = 1)]
    log_every: u64,
    /// Show a progress bar.
    #[arg(long)]
    progress: bool,
}

fn run(args: Args) -> tuwen::Result<()> {
    // Before anything else touches OUT: one run per folder, and no silent restart.
    let _lock = RunLock::acquire(&args.out)?;
    let ckpts = CheckpointManager::new(args.out.join("ckpt"), args.keep)?;
    for p in ckpts.prepare_start(args.resume, args.overwrite)? {
        eprintln!("--overwrite: deleted {}", p.display());
    }
    if !(args.max_grad_norm.is_finite() && args.max_grad_norm >= 0.0) {
        return Err(Error::InvalidArgument(format!(
            "--max-grad-norm {} must be a finite number >= 0",
            args.max_grad_norm
        )));
    }
    let device = parse_device(&args.device)?;
    let dtype = parse_dtype(&args.dtype)?;
    let mut m = load_trainable(&args.model, dtype, &device)?;
    if let Some(w) = m.report.warning() {
        eprintln!("warning: {w}");
    }
    let max = m.config.text_config.max_position_embeddings;
    if !(2..=max).contains(&args.context_length) {
        return Err(Error::InvalidArgument(format!(
            "--context-length {} must be from 2 to the model's {max} positions",
            args.context_length
        )));
    }
    m.text_processor.set_max_len(args.context_length);
    let loss_cfg = CnClipLossConfig {
        lock_image: args.lock_image,
        unlocked_layers: args.unlocked_layers,
    };
    let objective = CnClipObjective::new(m.model.clone(), Some(m.logit_scale_var()?), loss_cfg)?;

    let data_cfg = DataConfig {
        seed: args.seed,
        pipeline: ImagePipeline::from_processor(m.image_processor),
        ..DataConfig::new(args.batch_size, m.image_processor.size.0)
    };
    let mut loader = DataLoader::new(Manifest::open(&args.train)?, data_cfg)?;
    let cfg = TrainerConfig {
        optimizer: AdamWConfig {
            lr: args.lr,
            weight_decay: args.weight_decay,
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-6,
        },
        groups: objective.param_groups(),
        schedule: Schedule::warmup_cosine(args.warmup, args.steps, 0.0),
        grad_accum: args.grad_accum,
        max_grad_norm: (args.max_grad_norm > 0.0).then_some(args.max_grad_norm),
        seed: args.seed,
        ..Default::default()
    };
    let mut trainer = Trainer::from_varmap(&m.vars, cfg)?;
    let mut log = MetricsLog::append(args.out.join("metrics.jsonl"))?;
    let config = serde_json::to_value(&args)
        .map_err(|e| Error::Config(format!("cannot record the arguments: {e}")))?;

    let mut hooks = Vec::new();
    for path in &args.val {
        let data = open_validation(path, args.val_split.as_deref())?;
        let (cfg, vars) = (m.config.clone(), m.vars.clone());
        let (text, image) = (m.text_processor.clone(), m.image_processor);
        let lopts = LoadOptions {
            device: device.clone(),
            dtype,
            tune_allocator: false,
            ..LoadOptions::default()
        };
        let ropts = RetrievalOptions {
            image_batch_size: args.batch_size,
            text_batch_size: args.batch_size,
            ..RetrievalOptions::default()
        };
        let name = validation_name(path, args.val_split.as_deref());
        hooks.push(RetrievalEval::new(
            name,
            args.eval_every,
            data,
            ropts,
            move || {
                let enc = ChineseClipEncoder::from_source(
                    &cfg,
                    snapshot(&vars)?,
                    "the training weights",
                    text.clone(),
                    image,
                    &lopts,
                )?;
                Ok(Box::new(enc) as Box<dyn tuwen::DualEncoder>)
            },
        ));
    }
    let mut fit = Fit::new(&mut trainer, &mut loader, args.steps)
        .config(config)
        .checkpoints(&ckpts, args.checkpoint_every)
        .resume(args.resume)
        .progress(args.progress)
        .log(&mut log, args.log_every);
    for hook in hooks.iter_mut() {
        fit = fit.eval(hook as &mut dyn EvalHook);
    }
    let text = m.text_processor.clone();
    let summary = fit.run(|batch, ctx| {
        let texts: Vec<&str> = batch.captions.iter().map(String::as_str).collect();
        let tok = text.encode_batch(&texts, &device)?;
        let px = batch.images.to_device(&device)?.to_dtype(dtype)?;
        let x = CnClipInputs {
            pixel_values: &px,
            input_ids: &tok.input_ids,
            attention_mask: &tok.attention_mask,
        };
        Ok(objective.loss(&x, ctx)?.total)
    })?;
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
    objective.clamp_logit_scale()?;
    let weights = trainer.optimizer().weights()?;
    let out = export_model_dir(
        &args.model,
        &args.out.join("model"),
        &weights,
        dtype,
        &m.config,
    )?;
    eprintln!("model written to {}", out.display());
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
