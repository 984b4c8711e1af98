//! Image–text retrieval evaluation (Recall@1/5/10 both ways and mean recall) of R2D2 /
//! PRD2 on a JSON Lines manifest, with R2D2's two-stage re-ranking: cosine top k, then
//! ITM + cosine (k = 128 as in the original Flickr30k-CN evaluation).
//!
//! ```sh
//! cargo run --release --example eval_retrieval -- --model r2d2-vit-b16-flickr30k-cna \
//!     --manifest flickr30k-cna-test.jsonl
//! ```
//!
//! The manifest has one image per line, paths relative to the manifest's folder:
//! `{"image": "images/1000092795.jpg", "captions": ["…", "…"]}` (see `tuwen::eval::retrieval`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tuwen::eval::{evaluate, RetrievalDataset, RetrievalOptions};
use tuwen::models::r2d2::R2d2Encoder;
use tuwen::models::{parse_device, parse_dtype};
use tuwen::LoadOptions;

#[derive(Parser, Debug)]
#[command(about = "Recall@K image-text retrieval evaluation with R2D2 re-ranking")]
struct Args {
    /// Preset name, checkpoint file or model directory.
    #[arg(long)]
    model: String,
    /// JSON Lines manifest: {"image": path, "captions": [...]} per line.
    #[arg(long)]
    manifest: PathBuf,
    /// Candidates re-ranked per query.
    #[arg(long, default_value_t = 128)]
    top_k: usize,
    /// Rank by cosine similarity only.
    #[arg(long)]
    no_rerank: bool,
    #[arg(long, default_value_t = 32)]
    image_batch_size: usize,
    #[arg(long, default_value_t = 256)]
    text_batch_size: usize,
    /// Image-text pairs per cross-encoder pass.
    #[arg(long, default_value_t = 64)]
    itm_batch_size: usize,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// cpu, cuda[:N] or metal[:N].
    #[arg(long, default_value = "cpu")]
    device: String,
    /// f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    dtype: String,
}

fn run(args: Args) -> tuwen::Result<()> {
    let opts = LoadOptions {
        device: parse_device(&args.device)?,
        dtype: parse_dtype(&args.dtype)?,
        ..LoadOptions::default()
    };
    let data = RetrievalDataset::from_jsonl(&args.manifest)?;
    eprintln!(
        "{}: {} images, {} captions",
        args.manifest.display(),
        data.images.len(),
        data.texts.len()
    );
    let model = R2d2Encoder::load(&args.model, &opts)?;
    let ropts = RetrievalOptions {
        top_k: args.top_k,
        rerank: !args.no_rerank && model.has_itm(),
        image_batch_size: args.image_batch_size,
        text_batch_size: args.text_batch_size,
        itm_batch_size: args.itm_batch_size,
        progress: true,
    };
    if !args.no_rerank && !model.has_itm() {
        eprintln!("note: the model has no cross encoder (PRD2): cosine ranking only");
    }
    let start = std::time::Instant::now();
    let report = evaluate(&model, &data, &ropts)?;
    if !report.truncated.is_empty() {
        eprintln!(
            "warning: {} captions were truncated to {} tokens",
            report.truncated.len(),
            model.config().max_text_len
        );
    }
    if args.json {
        let s =
            serde_json::to_string_pretty(&report).map_err(|e| tuwen::Error::parse("report", e))?;
        println!("{s}");
    } else {
        println!("cosine:                 {}", report.cosine);
        if let Some(r) = &report.reranked {
            println!("re-ranked (top {:>4}):   {r}", report.top_k);
        }
    }
    eprintln!("took {:.1} s", start.elapsed().as_secs_f64());
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
