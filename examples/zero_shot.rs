//! Zero-shot classification: rank labels for each image.
//!
//! ```sh
//! cargo run --release --example zero_shot -- --image cat.jpg --labels 猫,狗,汽车
//! cargo run --release --example zero_shot -- --model ./my-siglip2-dir --image a.jpg --image b.jpg \
//!     --labels "cat,dog" --template "a photo of a {}."
//! ```
//!
//! `--model` takes a preset name (downloaded through the Hugging Face Hub cache) or a local
//! directory / checkpoint. For region-based models (BriVL) give `--boxes FILE.json` once per
//! image, or `--grid N` for an N×N grid of boxes plus the whole image.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tuwen::preprocess::image::inputs_with_box_files;
use tuwen::{LoadOptions, Scoring};

#[derive(Parser, Debug)]
#[command(about = "Zero-shot image classification with a tuwen dual encoder")]
struct Args {
    /// Fail when the checkpoint holds tensors the model does not use (by default they
    /// are listed as a warning).
    #[arg(long)]
    strict: bool,
    /// Preset name or local model directory / checkpoint.
    #[arg(long, default_value = "siglip2-base-patch16-224")]
    model: String,
    /// An image file (repeatable).
    #[arg(long, required = true)]
    image: Vec<PathBuf>,
    /// Candidate labels, separated by commas (ASCII or full-width).
    #[arg(long, default_value = "猫,狗,汽车")]
    labels: String,
    /// Prompt template; `{}` stands for the label.
    #[arg(long, default_value = "一张{}的照片。")]
    template: String,
    /// A JSON file of boxes per image, in the order of --image (region models only).
    #[arg(long)]
    boxes: Vec<PathBuf>,
    /// Use an N×N grid of boxes plus the whole image when an image has no boxes.
    #[arg(long)]
    grid: Option<usize>,
    /// cpu, cuda[:N] or metal[:N].
    #[arg(long, default_value = "cpu")]
    device: String,
    /// f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    dtype: String,
}

fn run(args: Args) -> tuwen::Result<()> {
    let labels: Vec<&str> = args
        .labels
        .split([',', '，'])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if labels.is_empty() {
        return Err(tuwen::Error::Text(
            "no labels given (--labels a,b,c)".into(),
        ));
    }
    let images = inputs_with_box_files(&args.image, &args.boxes)?;
    let opts = LoadOptions {
        device: tuwen::models::parse_device(&args.device)?,
        dtype: tuwen::models::parse_dtype(&args.dtype)?,
        box_grid: args.grid,
        strict: args.strict,
        ..LoadOptions::default()
    };
    let model = tuwen::load(&args.model, &opts)?;
    if let Some(w) = model.load_report().warning() {
        eprintln!("warning: {w}");
    }
    if let Some(n) = model.load_report().note() {
        eprintln!("note: {n}");
    }
    let probs = model.classify(&images, &labels, &args.template)?;
    let probs = probs.to_vec2::<f32>()?;
    let kind = match model.scoring() {
        Scoring::Sigmoid => "sigmoid probability",
        Scoring::Softmax => "softmax probability",
    };
    println!(
        "model: {} ({}), template: {:?}",
        args.model,
        model.family(),
        args.template
    );
    for (path, row) in args.image.iter().zip(probs) {
        let mut ranked: Vec<(usize, f32)> = row.into_iter().enumerate().collect();
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
        println!("\n{}", path.display());
        println!("  {:>4}  {} {kind}", "rank", pad("label", 24));
        for (rank, (i, p)) in ranked.into_iter().enumerate() {
            println!("  {:>4}  {} {:.4}", rank + 1, pad(labels[i], 24), p);
        }
    }
    Ok(())
}

/// Pads to a display width, counting CJK characters as two columns.
fn pad(s: &str, width: usize) -> String {
    let w: usize = s
        .chars()
        .map(|c| if (c as u32) >= 0x1100 { 2 } else { 1 })
        .sum();
    format!("{s}{}", " ".repeat(width.saturating_sub(w)))
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
