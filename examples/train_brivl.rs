//! Continued pre-training of BriVL with its cross-modal MoCo objective (momentum encoders,
//! two negative queues), on a JSONL or CSV manifest of image–caption pairs.
//!
//! ```text
//! cargo run --release --example train_brivl -- \
//!     --checkpoint BriVL-1.0-5500w.pth --tokenizer tokenizer.json \
//!     --train data/train.jsonl --val data/val.jsonl --out runs/brivl \
//!     --steps 20000 --batch-size 16 --lr 1e-5 --queue-size 9600
//! ```
//!
//! Settings come from `--config run.toml` (keys as the long flags, with `_` for `-`), then
//! the command line. The run folder gets `ckpt/step-NNNNNNNNN/` training checkpoints
//! (weights, AdamW state, schedule, RNG seed, data position, queues and key encoders;
//! written atomically, the last `--keep` kept), `metrics.jsonl`, and at the end `model/`
//! (`model.safetensors` with the query and `_mom` encoders, `config.json`,
//! `tokenizer.json`), which `zero_shot --model runs/brivl/model` and `embed` load.
//! `--resume` continues from the newest checkpoint exactly as if never stopped; an OUT that
//! already holds checkpoints needs `--resume` or `--overwrite`. OUT is locked for the run
//! (`OUT/.lock`): a second run on it stops at once.

use std::path::{Path, PathBuf};

use clap::Parser;
use serde::Deserialize;

use tuwen::eval::RetrievalOptions;
use tuwen::models::brivl::{BrivlConfig, BrivlEncoder};
use tuwen::models::{parse_device, parse_dtype};
use tuwen::train::brivl::{all_trainable, BatchNormMode, BrivlMoco, MocoConfig};
use tuwen::train::{
    open_validation, snapshot, validation_name, AdamWConfig, AugmentConfig, CheckpointManager,
    DataConfig, DataLoader, EvalHook, Fit, Manifest, MetricsLog, Objective, RetrievalEval, RunLock,
    Schedule, Trainer, TrainerConfig,
};
use tuwen::Error;
use tuwen::LoadOptions;

#[derive(Parser, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[command(about = "Continue BriVL's MoCo pre-training on your image–caption pairs")]
struct Args {
    /// A TOML file with any of these options (the command line wins).
    #[arg(long)]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// The BriVL checkpoint (`.pth` with `learnable`, or converted `.safetensors`).
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Train from random weights instead of a checkpoint.
    #[arg(long)]
    from_scratch: bool,
    /// The model config (original YAML or JSON); default: the preset.
    #[arg(long)]
    model_config: Option<PathBuf>,
    /// The preset giving the config when --model-config is absent.
    #[arg(long)]
    preset: Option<String>,
    /// `tokenizer.json` of hfl/chinese-roberta-wwm-ext.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Training manifest (JSONL or CSV).
    #[arg(long)]
    train: Option<PathBuf>,
    /// Held-out set for Recall@K during training: a Chinese-CLIP folder ({split}_imgs.tsv
    /// + {split}_texts.jsonl), a JSON Lines manifest or a CSV.
    #[arg(long)]
    val: Option<PathBuf>,
    /// The split of a Chinese-CLIP validation folder.
    #[arg(long)]
    val_split: Option<String>,
    /// The run folder.
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long)]
    steps: Option<u64>,
    #[arg(long)]
    batch_size: Option<usize>,
    /// Micro-batches per optimiser step.
    #[arg(long)]
    grad_accum: Option<usize>,
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long)]
    weight_decay: Option<f64>,
    #[arg(long)]
    warmup: Option<u64>,
    /// Final learning rate as a fraction of --lr (cosine decay).
    #[arg(long)]
    min_lr_ratio: Option<f64>,
    /// Clip the global gradient norm.
    #[arg(long)]
    clip: Option<f64>,
    /// MoCo queue length (a multiple of batch size × accumulation).
    #[arg(long)]
    queue_size: Option<usize>,
    #[arg(long)]
    momentum: Option<f64>,
    #[arg(long)]
    temperature: Option<f64>,
    /// Also count top-k queue neighbours shared by both modalities as positives.
    #[arg(long)]
    multi_positive: bool,
    #[arg(long)]
    topk: Option<usize>,
    /// Trainable tensor patterns (repeat); default: the original's (EfficientNet blocks
    /// 3–6, the last four BERT layers, all heads), or everything with --from-scratch.
    #[arg(long)]
    trainable: Vec<String>,
    /// Box grid for images without boxes (0: whole image only).
    #[arg(long)]
    box_grid: Option<usize>,
    /// BatchNorm statistics while training: `running` (the checkpoint's, frozen; default)
    /// or `batch` (PyTorch's train mode; default with --from-scratch).
    #[arg(long)]
    batch_norm: Option<String>,
    /// Turn off colour jitter / grayscale.
    #[arg(long)]
    no_augment: bool,
    #[arg(long)]
    seed: Option<u64>,
    /// Checkpoint every N steps.
    #[arg(long)]
    save_every: Option<u64>,
    /// Checkpoints kept.
    #[arg(long)]
    keep: Option<usize>,
    /// Evaluate on --val every N steps.
    #[arg(long)]
    eval_every: Option<u64>,
    /// Continue from the newest checkpoint in OUT/ckpt.
    #[arg(long)]
    resume: bool,
    /// Delete the checkpoints already in OUT/ckpt and start over (without it, or --resume,
    /// an OUT that holds checkpoints is an error).
    #[arg(long, conflicts_with = "resume")]
    overwrite: bool,
    /// Show a progress bar.
    #[arg(long)]
    progress: bool,
    /// cpu, cuda, cuda:N or metal.
    #[arg(long)]
    device: Option<String>,
    /// f32, bf16 or f16 (AdamW keeps f32 master weights).
    #[arg(long)]
    dtype: Option<String>,
}

/// Command-line values override the TOML file's.
fn merge(cli: Args) -> tuwen::Result<Args> {
    let Some(path) = cli.config.clone() else {
        return Ok(cli);
    };
    let text = std::fs::read_to_string(&path)
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    let file: Args =
        toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
    Ok(Args {
        config: Some(path),
        checkpoint: cli.checkpoint.or(file.checkpoint),
        from_scratch: cli.from_scratch || file.from_scratch,
        model_config: cli.model_config.or(file.model_config),
        preset: cli.preset.or(file.preset),
        tokenizer: cli.tokenizer.or(file.tokenizer),
        train: cli.train.or(file.train),
        val: cli.val.or(file.val),
        val_split: cli.val_split.or(file.val_split),
        out: cli.out.or(file.out),
        steps: cli.steps.or(file.steps),
        batch_size: cli.batch_size.or(file.batch_size),
        grad_accum: cli.grad_accum.or(file.grad_accum),
        lr: cli.lr.or(file.lr),
        weight_decay: cli.weight_decay.or(file.weight_decay),
        warmup: cli.warmup.or(file.warmup),
        min_lr_ratio: cli.min_lr_ratio.or(file.min_lr_ratio),
        clip: cli.clip.or(file.clip),
        queue_size: cli.queue_size.or(file.queue_size),
        momentum: cli.momentum.or(file.momentum),
        temperature: cli.temperature.or(file.temperature),
        multi_positive: cli.multi_positive || file.multi_positive,
        topk: cli.topk.or(file.topk),
        trainable: if cli.trainable.is_empty() {
            file.trainable
        } else {
            cli.trainable
        },
        box_grid: cli.box_grid.or(file.box_grid),
        batch_norm: cli.batch_norm.or(file.batch_norm),
        no_augment: cli.no_augment || file.no_augment,
        seed: cli.seed.or(file.seed),
        save_every: cli.save_every.or(file.save_every),
        keep: cli.keep.or(file.keep),
        eval_every: cli.eval_every.or(file.eval_every),
        resume: cli.resume || file.resume,
        overwrite: cli.overwrite || file.overwrite,
        progress: cli.progress || file.progress,
        device: cli.device.or(file.device),
        dtype: cli.dtype.or(file.dtype),
    })
}

fn need<T>(v: Option<T>, flag: &str) -> tuwen::Result<T> {
    v.ok_or_else(|| Error::InvalidArgument(format!("{flag} is required")))
}

fn run(args: Args) -> tuwen::Result<()> {
    let device = parse_device(args.device.as_deref().unwrap_or("cpu"))?;
    let dtype = parse_dtype(args.dtype.as_deref().unwrap_or("f32"))?;
    let tokenizer = need(args.tokenizer.clone(), "--tokenizer")?;
    let train = need(args.train.clone(), "--train")?;
    let out = need(args.out.clone(), "--out")?;
    if args.resume && args.overwrite {
        return Err(Error::InvalidArgument(
            "--resume and --overwrite exclude each other".into(),
        ));
    }
    // Before anything else touches OUT: one run per folder, and no silent restart.
    let _lock = RunLock::acquire(&out)?;
    let ckpts = CheckpointManager::new(out.join("ckpt"), args.keep.unwrap_or(3))?;
    for p in ckpts.prepare_start(args.resume, args.overwrite)? {
        eprintln!("--overwrite: deleted {}", p.display());
    }
    let cfg = match &args.model_config {
        Some(p) => BrivlConfig::from_file(p)?,
        None => {
            let name = args.preset.as_deref().unwrap_or("brivl-1.0");
            BrivlConfig::preset(name).ok_or_else(|| Error::UnknownPreset {
                name: name.into(),
                known: "brivl-1.0, brivl-nmi".into(),
            })?
        }
    };
    let batch = args.batch_size.unwrap_or(16);
    let accum = args.grad_accum.unwrap_or(1);
    let mut moco = MocoConfig::for_model(&cfg)?;
    if let Some(k) = args.queue_size {
        moco.queue_size = k;
    }
    if let Some(m) = args.momentum {
        moco.momentum = m;
    }
    if let Some(t) = args.temperature {
        moco.temperature = t;
    }
    if let Some(k) = args.topk {
        moco.topk = k;
    }
    moco.multi_positive = args.multi_positive;
    moco.seed = args.seed.unwrap_or(0);
    moco.batch_norm = match args.batch_norm.as_deref() {
        None if args.from_scratch => BatchNormMode::Batch,
        None | Some("running") => BatchNormMode::Running,
        Some("batch") => BatchNormMode::Batch,
        Some(other) => {
            return Err(Error::InvalidArgument(format!(
                "--batch-norm must be `running` or `batch`, not `{other}`"
            )))
        }
    };
    if !args.trainable.is_empty() {
        moco.trainable = args.trainable.clone();
    } else if args.from_scratch {
        moco.trainable = all_trainable();
    }
    if moco.queue_size % (batch * accum) != 0 {
        return Err(Error::Config(format!(
            "--queue-size {} must be a multiple of the global batch {} (batch size {batch} × \
             {accum} accumulation steps)",
            moco.queue_size,
            batch * accum
        )));
    }
    let model = match (&args.checkpoint, args.from_scratch) {
        (Some(p), false) => BrivlMoco::from_checkpoint(&cfg, moco, p, &device, dtype)?,
        (None, true) => {
            BrivlMoco::from_scratch(&cfg, moco, args.seed.unwrap_or(0), &device, dtype)?
        }
        _ => {
            return Err(Error::InvalidArgument(
                "give exactly one of --checkpoint and --from-scratch".into(),
            ))
        }
    };
    let model = model
        .with_tokenizer(&tokenizer)?
        .with_box_grid(args.box_grid.unwrap_or(cfg.box_grid));

    let steps = args.steps.unwrap_or(1000);
    let tcfg = TrainerConfig {
        optimizer: AdamWConfig {
            lr: args.lr.unwrap_or(1e-5),
            weight_decay: args.weight_decay.unwrap_or(0.05),
            ..Default::default()
        },
        groups: model.param_groups(),
        schedule: Schedule::warmup_cosine(
            args.warmup.unwrap_or(steps / 20),
            steps,
            args.min_lr_ratio.unwrap_or(0.0),
        ),
        grad_accum: accum,
        max_grad_norm: args.clip.or(Some(1.0)),
        seed: args.seed.unwrap_or(0),
        ..Default::default()
    };
    let mut trainer = Trainer::from_varmap(model.vars(), tcfg.clone())?;
    model.attach(&mut trainer);

    let mut dcfg = DataConfig::new(batch, cfg.img_size);
    dcfg.seed = args.seed.unwrap_or(0);
    dcfg.pipeline = model.image_pipeline((!args.no_augment).then(AugmentConfig::default));
    let mut loader = DataLoader::new(Manifest::open(&train)?, dcfg)?;

    std::fs::create_dir_all(&out)
        .map_err(|e| Error::io(format!("creating {}", out.display()), e))?;
    let mut log = MetricsLog::append(out.join("metrics.jsonl"))?;
    let mut hooks = Vec::new();
    if let Some(path) = &args.val {
        let data = open_validation(path, args.val_split.as_deref())?;
        let (vars, vcfg, tok) = (model.vars().clone(), cfg.clone(), PathBuf::from(&tokenizer));
        let lopts = LoadOptions {
            device: device.clone(),
            dtype,
            box_grid: Some(args.box_grid.unwrap_or(cfg.box_grid)),
            tune_allocator: false,
            ..LoadOptions::default()
        };
        let ropts = RetrievalOptions {
            image_batch_size: batch,
            text_batch_size: batch,
            ..RetrievalOptions::default()
        };
        let name = validation_name(path, args.val_split.as_deref());
        let every = args.eval_every.unwrap_or(500);
        hooks.push(RetrievalEval::new(name, every, data, ropts, move || {
            let enc = BrivlEncoder::from_source(
                &vcfg,
                snapshot(&vars)?,
                "the training weights",
                Some(&tok),
                &lopts,
            )?;
            Ok(Box::new(enc) as Box<dyn tuwen::DualEncoder>)
        }));
    }
    let run_config = serde_json::json!({
        "model": cfg,
        "moco": model.moco_config(),
        "trainer": tcfg,
        "train": train,
        "batch_size": batch,
    });
    let mut fit = Fit::new(&mut trainer, &mut loader, steps)
        .checkpoints(&ckpts, args.save_every.unwrap_or(500))
        .resume(args.resume)
        .log(&mut log, 1)
        .objective_state(&model)
        .progress(args.progress)
        .config(run_config);
    for hook in hooks.iter_mut() {
        fit = fit.eval(hook as &mut dyn EvalHook);
    }
    let summary = fit.run(|b, ctx| Ok(model.loss(&model.inputs(b)?, ctx)?.loss))?;
    if let Some(from) = &summary.resumed_from {
        println!("resumed from {}", from.display());
    }
    println!(
        "ran {} steps ({} skipped), last loss {:?}, {} samples skipped",
        summary.steps_run, summary.skipped_steps, summary.last_loss, summary.skipped_samples
    );
    for (step, name, metrics) in &summary.evals {
        println!("eval {name} after {step} steps: {metrics:?}");
    }
    let model_dir = out.join("model");
    model.export(&model_dir, Some(Path::new(&tokenizer)))?;
    println!("model written to {}", model_dir.display());
    Ok(())
}

fn main() {
    // SAFETY: first thing in `main`: no other thread exists yet and no candle op has run.
    unsafe { tuwen::threads::candle_ops_on_calling_thread() };
    if let Err(e) = merge(Args::parse()).and_then(run) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
