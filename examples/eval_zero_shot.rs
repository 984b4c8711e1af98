//! Zero-shot classification benchmark (ELEVATER-style) for every tuwen model: top-1 and
//! top-5 accuracy and mean per-class recall, with prompt ensembling over templates. With
//! `--matching`, R2D2's ICM / IQM tasks instead: AUC and accuracy of the ITM score over
//! labelled pairs.
//!
//! ```sh
//! # ELEVATER layout as Chinese-CLIP prepares it: cifar-10/test/000/…, cifar-10/label_cn.txt
//! cargo run --release --example eval_zero_shot -- --model siglip2-base-patch16-224 \
//!     --data datasets/cifar-10 --split test --output cifar10.json
//! # a CSV of path,label and your own templates
//! cargo run --release --example eval_zero_shot -- --model ./run/model \
//!     --data test.csv --classes names.txt --templates templates.txt
//! # R2D2 ICM: {"image": …, "text": …, "label": 0|1} per line
//! cargo run --release --example eval_zero_shot -- --model r2d2-vit-l14-icm \
//!     --data icm-test.jsonl --matching
//! ```
//!
//! Without `--templates` the built-in Chinese templates (`tuwen::eval::DEFAULT_TEMPLATES_ZH`)
//! are used.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use tuwen::eval::zero_shot::read_templates;
use tuwen::eval::{
    evaluate_matching, evaluate_zero_shot, ClassificationDataset, EvalRecord, MatchingDataset,
    ZeroShotOptions, DEFAULT_TEMPLATES_ZH,
};
use tuwen::models::{parse_device, parse_dtype};
use tuwen::{Error, LoadOptions};

#[derive(Parser, Debug)]
#[command(about = "Zero-shot classification and ITM matching benchmarks")]
struct Args {
    /// Fail when the checkpoint holds tensors the model does not use (by default they
    /// are listed as a warning).
    #[arg(long)]
    strict: bool,
    /// Preset name, checkpoint file or model directory.
    #[arg(long)]
    model: String,
    /// A dataset folder (ELEVATER layout), a split folder of class sub-folders, a
    /// `path,label` CSV, or with --matching a JSON Lines file of labelled pairs.
    #[arg(long)]
    data: PathBuf,
    /// The split sub-folder of a dataset folder (default `test`).
    #[arg(long)]
    split: Option<String>,
    /// The class-name file, one name a line (default: label_cn.txt beside the split).
    #[arg(long)]
    classes: Option<PathBuf>,
    /// Prompt templates, one a line, `{}` for the class name (default: built-in Chinese).
    #[arg(long)]
    templates: Option<PathBuf>,
    /// ITM matching (R2D2's ICM / IQM) on labelled pairs instead of classification.
    #[arg(long)]
    matching: bool,
    /// BriVL: an N×N grid of boxes plus the whole image.
    #[arg(long)]
    grid: Option<usize>,
    #[arg(long, default_value_t = 32)]
    image_batch_size: usize,
    #[arg(long, default_value_t = 256)]
    text_batch_size: usize,
    /// Leave out images that cannot be read (they are listed) instead of failing.
    #[arg(long)]
    skip_bad: bool,
    /// Write the JSON record here.
    #[arg(long)]
    output: Option<PathBuf>,
    /// Print the JSON record instead of the table.
    #[arg(long)]
    json: bool,
    /// cpu, cuda[:N] or metal[:N].
    #[arg(long, default_value = "cpu")]
    device: String,
    /// f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    dtype: String,
}

fn counts(pairs: &[(&str, usize)]) -> std::collections::BTreeMap<String, usize> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

fn run(args: Args) -> tuwen::Result<()> {
    let started = Instant::now();
    if args.image_batch_size == 0 || args.text_batch_size == 0 {
        return Err(Error::InvalidArgument(
            "batch sizes must be at least 1".into(),
        ));
    }
    let opts = LoadOptions {
        device: parse_device(&args.device)?,
        dtype: parse_dtype(&args.dtype)?,
        box_grid: args.grid,
        strict: args.strict,
        ..LoadOptions::default()
    };
    let zopts = ZeroShotOptions {
        image_batch_size: args.image_batch_size,
        text_batch_size: args.text_batch_size,
        skip_bad: args.skip_bad,
        progress: true,
    };
    let (record, skipped) = if args.matching {
        let data = MatchingDataset::from_jsonl(&args.data)?;
        eprintln!("{}: {} pairs", data.origin, data.images.len());
        let model = tuwen::load(&args.model, &opts)?;
        if let Some(w) = model.load_report().warning() {
            eprintln!("warning: {w}");
        }
        if let Some(n) = model.load_report().note() {
            eprintln!("note: {n}");
        }
        let r = evaluate_matching(model.as_ref(), &data, &zopts)?;
        let rec = EvalRecord {
            task: "matching".into(),
            model: args.model.clone(),
            family: model.family().to_string(),
            dataset: args.data.display().to_string(),
            split: None,
            metrics: r.metrics(),
            counts: counts(&[
                ("pairs", r.num_pairs),
                ("positive", r.num_positive),
                ("skipped_images", r.skipped_images.len()),
            ]),
            seconds: started.elapsed().as_secs_f64(),
            details: serde_json::to_value(&r).map_err(|e| Error::parse("report", e))?,
        };
        (rec, r.skipped_images)
    } else {
        let data = ClassificationDataset::open(
            &args.data,
            args.split.as_deref(),
            args.classes.as_deref(),
        )?;
        let templates = match &args.templates {
            Some(p) => read_templates(p)?,
            None => DEFAULT_TEMPLATES_ZH.iter().map(|s| s.to_string()).collect(),
        };
        eprintln!(
            "{}: {} images, {} classes, {} templates",
            data.origin,
            data.images.len(),
            data.classes.len(),
            templates.len()
        );
        let model = tuwen::load(&args.model, &opts)?;
        if let Some(w) = model.load_report().warning() {
            eprintln!("warning: {w}");
        }
        if let Some(n) = model.load_report().note() {
            eprintln!("note: {n}");
        }
        let r = evaluate_zero_shot(model.as_ref(), &data, &templates, &zopts)?;
        let rec = EvalRecord {
            task: "zero-shot".into(),
            model: args.model.clone(),
            family: model.family().to_string(),
            dataset: args.data.display().to_string(),
            split: args.split.clone(),
            metrics: r.metrics(),
            counts: counts(&[
                ("images", r.num_images),
                ("classes", r.num_classes),
                ("templates", r.num_templates),
                ("skipped_images", r.skipped_images.len()),
            ]),
            seconds: started.elapsed().as_secs_f64(),
            details: serde_json::to_value(&r).map_err(|e| Error::parse("report", e))?,
        };
        (rec, r.skipped_images)
    };
    if !skipped.is_empty() {
        eprintln!("skipped {} images:", skipped.len());
        for (p, why) in skipped.iter().take(100) {
            eprintln!("  {p}: {why}");
        }
    }
    if let Some(p) = &args.output {
        record.write_json(p)?;
        eprintln!("wrote {}", p.display());
    }
    if args.json {
        let s = serde_json::to_string_pretty(&record).map_err(|e| Error::parse("record", e))?;
        println!("{s}");
    } else {
        print!("{}", record.table());
    }
    Ok(())
}

fn main() -> ExitCode {
    // SAFETY: first thing in `main`: no other thread exists yet and no candle op has run.
    unsafe { tuwen::threads::candle_ops_on_calling_thread() };
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
