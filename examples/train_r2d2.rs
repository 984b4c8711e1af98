//! Continues training an R2D2 or PRD2 checkpoint on a JSONL/CSV manifest of image–text
//! pairs, with the R2D2 objectives (GCPR, FGR, TgD, FgD), crash-safe checkpoints and
//! resume. The result loads with the inference API (`R2d2Encoder::load("OUT")`).
//!
//! ```sh
//! # official fine-tuning recipe (GCPR + FGR, ViT frozen, lr 1e-5, wd 0.05, 500 warm-up
//! # steps, cosine); run again with the same --out and --resume to resume (an --out that
//! # holds checkpoints needs --resume or --overwrite; it is locked while a run uses it)
//! cargo run --release --example train_r2d2 -- --init r2d2_pretrain_250m.pth \
//!     --tokenizer tokenizer.json --manifest train.jsonl --out runs/r2d2 --steps 10000
//! # PRD2: GCPR + TgD
//! cargo run --release --example train_r2d2 -- --init prd2_pretrain_250m.pth --preset prd2 ...
//! ```
//!
//! Manifest lines look like `{"image": "a.jpg", "captions": ["红色的圆形"], "id": "img1"}`;
//! pairs with the same `id` are positives of each other.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use candle_core::DType;
use clap::Parser;
use tuwen::checkpoint::Loader;
use tuwen::eval::RetrievalOptions;
use tuwen::models::parse_device;
use tuwen::models::r2d2::{open_checkpoint, R2d2, R2d2Config, R2d2Encoder};
use tuwen::preprocess::{ImageProcessor, TextProcessor, TextStyle};
use tuwen::train::r2d2::{finetune_trainer_config, image_keys, R2d2Inputs};
use tuwen::train::{
    open_validation, snapshot, validation_name, CheckpointManager, DataConfig, DataLoader,
    EvalHook, Fit, ImagePipeline, Manifest, MetricsLog, Objective, R2d2LossConfig, R2d2Objective,
    RetrievalEval, RunLock, Schedule, Trainer,
};
use tuwen::LoadOptions;

#[derive(Parser, Debug)]
#[command(about = "Continue training R2D2 / PRD2 on image-text pairs")]
struct Args {
    /// The starting checkpoint (.pth / .safetensors) or model directory.
    #[arg(long)]
    init: PathBuf,
    /// config.json (default: the model directory's, else inferred from the tensors).
    #[arg(long)]
    config: Option<PathBuf>,
    /// tokenizer.json (default: beside the checkpoint).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// JSONL or CSV manifest.
    #[arg(long)]
    manifest: PathBuf,
    /// Output directory: checkpoints in OUT/ckpt, the final model in OUT.
    #[arg(long)]
    out: PathBuf,
    /// finetune (GCPR + FGR, ViT frozen), pretrain (all four objectives) or prd2 (GCPR +
    /// TgD). Default: finetune for R2D2, prd2 for PRD2.
    #[arg(long)]
    preset: Option<String>,
    /// A validation set (repeatable): a Chinese-CLIP folder ({split}_imgs.tsv +
    /// {split}_texts.jsonl), a JSON Lines manifest or a CSV. Recall@K (cosine, and
    /// re-ranked by ITM + cosine when the model has a cross encoder) goes to metrics.jsonl
    /// every --eval-every steps.
    #[arg(long)]
    val: Vec<PathBuf>,
    /// The split of Chinese-CLIP validation folders.
    #[arg(long)]
    val_split: Option<String>,
    #[arg(long, default_value_t = 500)]
    eval_every: u64,
    /// Candidates re-ranked per query in validation (0: cosine only).
    #[arg(long, default_value_t = 16)]
    eval_rerank_k: usize,
    /// Images and texts per forward pass in validation.
    #[arg(long, default_value_t = 32)]
    eval_batch_size: usize,
    /// A JSON file with an `R2d2LossConfig` (overrides --preset).
    #[arg(long)]
    loss_config: Option<PathBuf>,
    #[arg(long, default_value_t = 1000)]
    steps: u64,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Learning rate (default 1e-5).
    #[arg(long)]
    lr: Option<f64>,
    /// Warm-up steps (default 500, capped at --steps / 10 for short runs).
    #[arg(long)]
    warmup: Option<u64>,
    /// Also train the ViT (frozen in the official fine-tuning).
    #[arg(long)]
    train_vision: bool,
    /// Plain resize instead of R2D2's training augmentation (RandomResizedCrop 0.5–1,
    /// horizontal flip, RandAugment with 2 ops at magnitude 5).
    #[arg(long)]
    no_augment: bool,
    #[arg(long, default_value_t = 500)]
    checkpoint_every: u64,
    #[arg(long, default_value_t = 2)]
    keep: usize,
    /// Continue from the newest checkpoint in OUT/ckpt.
    #[arg(long)]
    resume: bool,
    /// Delete the checkpoints already in OUT/ckpt and start over (without it, or --resume,
    /// an OUT that holds checkpoints is an error).
    #[arg(long, conflicts_with = "resume")]
    overwrite: bool,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// cpu, cuda[:N] or metal[:N].
    #[arg(long, default_value = "cpu")]
    device: String,
}

fn err(msg: String) -> tuwen::Error {
    tuwen::Error::InvalidArgument(msg)
}

fn weights_file(init: &Path) -> tuwen::Result<PathBuf> {
    if init.is_dir() {
        tuwen::models::r2d2::checkpoint_in_dir(init)?
            .ok_or_else(|| err(format!("no checkpoint in {}", init.display())))
    } else {
        Ok(init.to_path_buf())
    }
}

fn run(args: Args) -> tuwen::Result<()> {
    // Before anything else touches OUT: one run per folder, and no silent restart.
    let _lock = RunLock::acquire(&args.out)?;
    let ckpts = CheckpointManager::new(args.out.join("ckpt"), args.keep)?;
    for p in ckpts.prepare_start(args.resume, args.overwrite)? {
        eprintln!("--overwrite: deleted {}", p.display());
    }
    let device = parse_device(&args.device)?;
    let file = weights_file(&args.init)?;
    let (source, family) = open_checkpoint(&file)?;
    let cfg_path = args
        .config
        .clone()
        .or_else(|| Some(args.init.join("config.json")).filter(|p| p.is_file()));
    let cfg = match &cfg_path {
        Some(p) => R2d2Config::from_json_file(p)?,
        None => R2d2Config::infer(&source.shapes())?,
    };
    let tok_path = args
        .tokenizer
        .clone()
        .or_else(|| {
            let dir = if args.init.is_dir() {
                Some(args.init.clone())
            } else {
                args.init.parent().map(Path::to_path_buf)
            };
            dir.map(|d| d.join("tokenizer.json"))
                .filter(|p| p.is_file())
        })
        .ok_or_else(|| err("no tokenizer.json beside the checkpoint: pass --tokenizer".into()))?;
    let tok = TextProcessor::from_file(&tok_path, TextStyle::Bert, cfg.max_text_len)?;

    // The student, every weight a trainable var (the trainer's patterns decide which train).
    let (loader, vars) = Loader::new(source, file.display().to_string()).trainable()?;
    let vb = loader.var_builder(DType::F32, &device);
    let net = R2d2::new(&cfg, vb).map_err(|e| loader.error(e))?;
    let report = loader.finish(tuwen::models::r2d2::IGNORED_KEYS);
    println!(
        "{family} loaded from {}: {} tensors",
        file.display(),
        report.loaded
    );

    let mut loss_cfg = match (&args.loss_config, args.preset.as_deref()) {
        (Some(p), _) => {
            let s = std::fs::read_to_string(p)
                .map_err(|e| tuwen::Error::io(format!("reading {}", p.display()), e))?;
            serde_json::from_str(&s).map_err(|e| tuwen::Error::parse(p.display().to_string(), e))?
        }
        (None, Some("finetune")) => R2d2LossConfig::finetune(),
        (None, Some("pretrain")) => R2d2LossConfig::default(),
        (None, Some("prd2")) => R2d2LossConfig::prd2(),
        (None, Some(other)) => {
            return Err(err(format!(
                "unknown preset `{other}` (finetune, pretrain, prd2)"
            )))
        }
        (None, None) if cfg.has_joint_layers() => R2d2LossConfig::finetune(),
        (None, None) => R2d2LossConfig::prd2(),
    };
    let mut tcfg = finetune_trainer_config(args.steps);
    if args.train_vision {
        loss_cfg.freeze_vision = false;
        tcfg.groups.frozen.retain(|p| p != "visual_encoder.*");
    }
    if let Some(lr) = args.lr {
        tcfg.optimizer.lr = lr;
    }
    let warmup = args.warmup.unwrap_or(500.min(args.steps / 10));
    tcfg.schedule = Schedule::warmup_cosine(warmup, args.steps, 0.0);
    tcfg.grad_accum = args.grad_accum;
    tcfg.seed = args.seed;
    let objective = R2d2Objective::new(loss_cfg.clone(), &net, &vars)?;
    let mut trainer = Trainer::from_varmap(&vars, tcfg.clone())?;

    let manifest = Manifest::open(&args.manifest)?;
    let size = cfg.vision_config.image_size;
    let mut pipeline = ImagePipeline::from_processor(ImageProcessor::clip(size));
    if !args.no_augment {
        pipeline = pipeline.with_r2d2_augment();
    }
    let data_cfg = DataConfig {
        seed: args.seed,
        pipeline,
        ..DataConfig::new(args.batch_size, size)
    };
    let mut data = DataLoader::new(manifest, data_cfg)?;
    std::fs::create_dir_all(&args.out)
        .map_err(|e| tuwen::Error::io(format!("creating {}", args.out.display()), e))?;
    let mut log = MetricsLog::append(args.out.join("metrics.jsonl"))?;
    let run_config = serde_json::json!({
        "model": cfg,
        "losses": loss_cfg,
        "trainer": tcfg,
        "manifest": args.manifest.display().to_string(),
    });
    if args.eval_every == 0 || args.eval_batch_size == 0 {
        return Err(err(
            "--eval-every and --eval-batch-size must be at least 1".into()
        ));
    }
    let mut hooks = Vec::new();
    for path in &args.val {
        let data = open_validation(path, args.val_split.as_deref())?;
        let (cfg, vars, tok_path) = (cfg.clone(), vars.clone(), tok_path.clone());
        let lopts = LoadOptions {
            device: device.clone(),
            tune_allocator: false,
            ..LoadOptions::default()
        };
        let ropts = RetrievalOptions {
            rerank: args.eval_rerank_k > 0 && cfg.has_joint_layers(),
            top_k: args.eval_rerank_k.max(1),
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
                let enc = R2d2Encoder::from_source(
                    &cfg,
                    snapshot(&vars)?,
                    "the training weights",
                    Some(&tok_path),
                    &lopts,
                )?;
                Ok(Box::new(enc) as Box<dyn tuwen::DualEncoder>)
            },
        ));
    }
    let mut fit = Fit::new(&mut trainer, &mut data, args.steps)
        .checkpoints(&ckpts, args.checkpoint_every)
        .resume(args.resume)
        .log(&mut log, 10)
        .objective_state(&objective)
        .config(run_config)
        .progress(true);
    for hook in hooks.iter_mut() {
        fit = fit.eval(hook as &mut dyn EvalHook);
    }
    let summary = fit.run(|batch, ctx| {
        let captions: Vec<&str> = batch.captions.iter().map(String::as_str).collect();
        let text = tok.encode_batch(&captions, &device)?;
        let pixels = batch.images.to_device(&device)?;
        let keys = image_keys(&batch.ids, &batch.indices);
        let x = R2d2Inputs {
            pixel_values: &pixels,
            input_ids: &text.input_ids,
            attention_mask: &text.attention_mask,
            image_ids: &keys,
        };
        Ok(objective.loss(&x, ctx)?.total)
    })?;
    if let Some(p) = &summary.resumed_from {
        println!("resumed from {}", p.display());
    }
    println!(
        "{} steps run, last loss {:?}, {} skipped samples",
        summary.steps_run, summary.last_loss, summary.skipped_samples
    );
    for (step, name, metrics) in &summary.evals {
        println!("eval {name} after {step} steps: {metrics:?}");
    }

    // The final model: weights, config and tokenizer, loadable by R2d2Encoder::load.
    let weights = trainer.optimizer().weights()?;
    let out_model = args.out.join("model.safetensors");
    tuwen::checkpoint::save_safetensors(&weights, None, &out_model)?;
    cfg.to_json_file(&args.out.join("config.json"))?;
    std::fs::copy(&tok_path, args.out.join("tokenizer.json"))
        .map_err(|e| tuwen::Error::io("copying tokenizer.json".to_string(), e))?;
    let check = R2d2Encoder::load(&args.out.display().to_string(), &LoadOptions::default())?;
    println!(
        "wrote {} ({} family, loads with the inference API)",
        args.out.display(),
        check.config().family()
    );
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
