//! Scores one image against many texts with R2D2's cross encoder (ITM) and its dual
//! encoder (cosine), like the table in the R2D2 README.
//!
//! ```sh
//! cargo run --release --example rerank -- --model r2d2-vit-l14-250m \
//!     --image jordan.jpg --text 乔丹投篮 --text 乔丹运球 --text 詹姆斯投篮
//! ```
//!
//! `--model` is a preset name (its file downloaded by hand into `$TUWEN_WEIGHTS_DIR`), a
//! `.pth` / `.safetensors` checkpoint, or a model directory.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tuwen::models::r2d2::R2d2Encoder;
use tuwen::models::{parse_device, parse_dtype};
use tuwen::{DualEncoder, ImageInput, LoadOptions};

#[derive(Parser, Debug)]
#[command(about = "R2D2 image-text matching scores for one image and many texts")]
struct Args {
    /// Fail when the checkpoint holds tensors the model does not use (by default they
    /// are listed as a warning).
    #[arg(long)]
    strict: bool,
    /// Preset name, checkpoint file or model directory.
    #[arg(long)]
    model: String,
    /// The image.
    #[arg(long)]
    image: PathBuf,
    /// A candidate text (repeat for several).
    #[arg(long = "text")]
    texts: Vec<String>,
    /// A file with one candidate text per line (blank lines are skipped).
    #[arg(long)]
    texts_file: Option<PathBuf>,
    /// cpu, cuda[:N] or metal[:N].
    #[arg(long, default_value = "cpu")]
    device: String,
    /// f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Sort by ITM score, best first.
    #[arg(long)]
    sort: bool,
}

fn run(args: Args) -> tuwen::Result<()> {
    let mut texts = args.texts.clone();
    if let Some(f) = &args.texts_file {
        let s = std::fs::read_to_string(f)
            .map_err(|e| tuwen::Error::io(format!("reading {}", f.display()), e))?;
        texts.extend(
            s.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from),
        );
    }
    if texts.is_empty() {
        return Err(tuwen::Error::Text(
            "no texts given (use --text or --texts-file)".into(),
        ));
    }
    let opts = LoadOptions {
        device: parse_device(&args.device)?,
        dtype: parse_dtype(&args.dtype)?,
        strict: args.strict,
        ..LoadOptions::default()
    };
    let model = R2d2Encoder::load(&args.model, &opts)?;
    if let Some(w) = model.load_report().warning() {
        eprintln!("warning: {w}");
    }
    if let Some(n) = model.load_report().note() {
        eprintln!("note: {n}");
    }
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let image = [ImageInput::path(&args.image)];

    let img = model.image_features(&image)?;
    let txt = model.text_features(&refs)?;
    for &i in &txt.truncated {
        eprintln!(
            "warning: text {} is longer than {} tokens and was truncated",
            i + 1,
            model.config().max_text_len
        );
    }
    let cos = img
        .embeds
        .matmul(&txt.embeds.t()?)?
        .squeeze(0)?
        .to_vec1::<f32>()?;
    let probs = model
        .probabilities(&model.logits(&img.embeds, &txt.embeds)?)?
        .squeeze(0)?
        .to_vec1::<f32>()?;
    let itm = if model.has_itm() {
        Some(
            model
                .itm_scores_from_tensors(&img.tokens, &txt.states, &txt.mask)?
                .squeeze(0)?
                .to_vec1::<f32>()?,
        )
    } else {
        eprintln!(
            "note: {} has no cross encoder; showing the dual encoder only",
            model.family()
        );
        None
    };

    let mut order: Vec<usize> = (0..texts.len()).collect();
    if args.sort {
        let key = |i: usize| itm.as_ref().map_or(cos[i], |s| s[i]);
        order.sort_by(|&a, &b| key(b).total_cmp(&key(a)));
    }
    println!("image: {}", args.image.display());
    println!("{:>10} {:>10} {:>10}  text", "ITM", "cosine", "softmax");
    for i in order {
        let itm_s = itm
            .as_ref()
            .map_or_else(|| "-".to_string(), |s| format!("{:.8}", s[i]));
        println!(
            "{itm_s:>10} {:>10.4} {:>10.4}  {}",
            cos[i], probs[i], texts[i]
        );
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
