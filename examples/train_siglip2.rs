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
//! `OUT/ckpt` (the run resumes from the newest one when restarted), metrics to
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
use tuwen::models::siglip2::{SiglipEncoder, SiglipImageProcessor};
use tuwen::models::{parse_device, parse_dtype};
use tuwen::preprocess::ImageInput;
use tuwen::train::dist::Collective;
use tuwen::train::siglip::{
    export_model_dir, load_trainable, DistillKind, SiglipInputs, SiglipLossConfig, SiglipObjective,
    SiglipPixels,
};
use tuwen::train::{
    AdamWConfig, CheckpointManager, DataConfig, DataLoader, Fit, ImagePipeline, Manifest,
    MetricsLog, Objective, ParamGroupConfig, Schedule, Trainer, TrainerConfig,
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
    #[arg(long, default_value_t = 1e-5)]
    lr: f64,
    #[arg(long, default_value_t = 1e-4)]
    weight_decay: f64,
    /// Linear warm-up steps, then cosine decay.
    #[arg(long, default_value_t = 500)]
    warmup: u64,
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

    let m = load_trainable(&args.model, dtype, &device)?;
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
            lr: args.lr,
            weight_decay: args.weight_decay,
            ..Default::default()
        },
        groups,
        schedule: Schedule::warmup_cosine(args.warmup, args.steps, args.min_lr_ratio),
        grad_accum: args.grad_accum,
        max_grad_norm: (args.max_grad_norm > 0.0).then_some(args.max_grad_norm),
        seed: args.seed,
        ..Default::default()
    };
    let mut trainer = Trainer::from_varmap(&m.vars, cfg)?;

    // Rank 0's weights are broadcast (the start of data parallelism); `Fit` then resumes
    // every rank from rank 0's newest checkpoint, each at its own data position.
    let ckpts = CheckpointManager::new(args.out.join("ckpt"), args.keep)?;
    if let Some(c) = &comm {
        trainer.set_collective(c.clone())?;
    }

    let mut metrics = if rank == 0 {
        Some(MetricsLog::append(args.out.join("metrics.jsonl"))?)
    } else {
        None
    };
    let config = serde_json::to_value(&args)
        .map_err(|e| Error::Config(format!("cannot record the arguments: {e}")))?;
    let mut fit = Fit::new(&mut trainer, &mut loader, args.steps)
        .config(config)
        .checkpoints(&ckpts, args.checkpoint_every)
        .resume(true)
        .progress(args.progress);
    if let Some(log) = metrics.as_mut() {
        fit = fit.log(log, args.log_every);
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
        let weights = trainer.optimizer().weights()?;
        let out = export_model_dir(&args.model, &args.out.join("model"), &weights, dtype)?;
        eprintln!("model written to {}", out.display());
    }
    if let Some(c) = &comm {
        c.barrier()?;
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
