//! Embeds images and texts and writes them to a safetensors file.
//!
//! ```sh
//! cargo run --release --example embed -- --model siglip2-base-patch16-224 \
//!     --image a.jpg --image b.jpg --text 猫 --text 狗 --out embeds.safetensors
//! ```
//!
//! The file holds `image_embeds` [N, D], `text_embeds` [M, D] and `logits_per_image`
//! [N, M], all f32; models with a cross encoder (R2D2) also write `itm_scores` [N, M].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use candle_core::DType;
use clap::Parser;
use tuwen::preprocess::image::inputs_with_box_files;
use tuwen::LoadOptions;

#[derive(Parser, Debug)]
#[command(about = "Embed images and texts with a tuwen dual encoder")]
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
    /// A text (repeatable).
    #[arg(long, required = true)]
    text: Vec<String>,
    /// Output safetensors file.
    #[arg(long)]
    out: PathBuf,
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
    let texts: Vec<&str> = args.text.iter().map(String::as_str).collect();
    let img = model.embed_images(&images)?;
    let txt = model.embed_texts(&texts)?;
    let logits = model.logits(&img, &txt)?;
    let mut out = BTreeMap::new();
    out.insert("image_embeds".to_string(), img.to_dtype(DType::F32)?);
    out.insert("text_embeds".to_string(), txt.to_dtype(DType::F32)?);
    out.insert("logits_per_image".to_string(), logits.to_dtype(DType::F32)?);
    if let Some(itm) = model.itm_scores(&images, &texts)? {
        out.insert("itm_scores".to_string(), itm.to_dtype(DType::F32)?);
    }
    tuwen::checkpoint::save_safetensors(&out, None, &args.out)?;
    println!(
        "wrote {} ({} images, {} texts, dim {})",
        args.out.display(),
        images.len(),
        texts.len(),
        model.embed_dim()
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
