//! Image–text retrieval evaluation of any model `tuwen::load` opens: Recall@1/5/10 both
//! ways and mean recall, as Flickr30K-CN, COCO-CN and MUGE report them. Models with a
//! cross encoder (R2D2) also re-rank: cosine top k, then ITM + cosine (k = 128 as in the
//! original Flickr30k-CN evaluation).
//!
//! ```sh
//! # Chinese-CLIP's format: a folder with {split}_imgs.tsv and {split}_texts.jsonl
//! cargo run --release --example eval_retrieval -- --model siglip2-base-patch16-224 \
//!     --data datasets/Flickr30k-CN --split test --output flickr-test.json
//! # the crate's JSON Lines manifest, R2D2 with re-ranking
//! cargo run --release --example eval_retrieval -- --model r2d2-vit-b16-flickr30k-cna \
//!     --data flickr30k-cna-test.jsonl --rerank on
//! ```
//!
//! It prints a table, and with `--output` writes a JSON record (model, dataset, split,
//! every metric, the counts and the time taken). `--cache DIR` keeps the embeddings, so a
//! second run with another `--top-k` skips encoding.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, ValueEnum};
use tuwen::eval::cache::file_stamp;
use tuwen::eval::report::recall_table;
use tuwen::eval::{evaluate, EmbeddingCache, EvalRecord, RetrievalDataset, RetrievalOptions};
use tuwen::models::{parse_device, parse_dtype};
use tuwen::{Error, LoadOptions};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Rerank {
    /// Re-rank when the model has a cross encoder.
    Auto,
    /// Re-rank; an error for a model without a cross encoder.
    On,
    /// Cosine ranking only.
    Off,
}

#[derive(Parser, Debug)]
#[command(about = "Recall@K image-text retrieval evaluation for every tuwen model")]
struct Args {
    /// Fail when the checkpoint holds tensors the model does not use (by default they
    /// are listed as a warning).
    #[arg(long)]
    strict: bool,
    /// Preset name, checkpoint file or model directory.
    #[arg(long)]
    model: String,
    /// A Chinese-CLIP dataset folder ({split}_imgs.tsv + {split}_texts.jsonl), a
    /// *_imgs.tsv file, or a JSON Lines manifest.
    #[arg(long, alias = "manifest")]
    data: PathBuf,
    /// The split of a Chinese-CLIP folder (train, valid, test); may be left out when the
    /// folder holds one.
    #[arg(long)]
    split: Option<String>,
    /// Cross-encoder re-ranking.
    #[arg(long, value_enum, default_value_t = Rerank::Auto)]
    rerank: Rerank,
    /// Candidates re-ranked per query.
    #[arg(long, default_value_t = 128)]
    top_k: usize,
    /// BriVL: an N×N grid of boxes plus the whole image for images without boxes.
    #[arg(long)]
    grid: Option<usize>,
    #[arg(long, default_value_t = 32)]
    image_batch_size: usize,
    #[arg(long, default_value_t = 256)]
    text_batch_size: usize,
    /// Image-text pairs per cross-encoder pass.
    #[arg(long, default_value_t = 64)]
    itm_batch_size: usize,
    /// Leave out images that cannot be read (they are listed) instead of failing.
    #[arg(long)]
    skip_bad: bool,
    /// Keep embeddings in this folder and reuse them on the next run.
    #[arg(long)]
    cache: Option<PathBuf>,
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

fn run(args: Args) -> tuwen::Result<()> {
    let started = Instant::now();
    for (name, v) in [
        ("--top-k", args.top_k),
        ("--image-batch-size", args.image_batch_size),
        ("--text-batch-size", args.text_batch_size),
        ("--itm-batch-size", args.itm_batch_size),
    ] {
        if v == 0 {
            return Err(Error::InvalidArgument(format!("{name} must be at least 1")));
        }
    }
    let opts = LoadOptions {
        device: parse_device(&args.device)?,
        dtype: parse_dtype(&args.dtype)?,
        box_grid: args.grid,
        strict: args.strict,
        ..LoadOptions::default()
    };
    let data = RetrievalDataset::open(&args.data, args.split.as_deref())?;
    eprintln!(
        "{}: {} images, {} texts",
        data.origin,
        data.images.len(),
        data.texts.len()
    );
    let model = tuwen::load(&args.model, &opts)?;
    if let Some(w) = model.load_report().warning() {
        eprintln!("warning: {w}");
    }
    if let Some(n) = model.load_report().note() {
        eprintln!("note: {n}");
    }
    let has_cross = model.cross_encoder().is_some();
    let rerank = match args.rerank {
        Rerank::On => true,
        Rerank::Off => false,
        Rerank::Auto => has_cross,
    };
    let cache = args.cache.as_ref().map(|dir| {
        let stamp = file_stamp(std::path::Path::new(&args.model));
        EmbeddingCache::new(
            dir,
            format!("{} [{stamp}] grid {:?}", args.model, args.grid),
        )
    });
    let ropts = RetrievalOptions {
        top_k: args.top_k,
        rerank,
        image_batch_size: args.image_batch_size,
        text_batch_size: args.text_batch_size,
        itm_batch_size: args.itm_batch_size,
        skip_bad: args.skip_bad,
        cache,
        progress: true,
    };
    let report = evaluate(model.as_ref(), &data, &ropts)?;
    if !report.truncated.is_empty() {
        eprintln!(
            "warning: {} texts were truncated to the model's maximum length",
            report.truncated.len()
        );
    }
    if !report.skipped_images.is_empty() {
        eprintln!("skipped {} images:", report.skipped_images.len());
        for (id, why) in report.skipped_images.iter().take(100) {
            eprintln!("  {id}: {why}");
        }
    }
    if report.images_cached || report.texts_cached {
        eprintln!(
            "embeddings from the cache: images {}, texts {}",
            report.images_cached, report.texts_cached
        );
    }
    let record = EvalRecord {
        task: "retrieval".into(),
        model: args.model.clone(),
        family: model.family().to_string(),
        dataset: args.data.display().to_string(),
        split: args.split.clone(),
        metrics: report.metrics(),
        counts: [
            ("images", report.num_images),
            ("texts", report.num_texts),
            ("i2t_queries", report.i2t_queries),
            ("t2i_queries", report.t2i_queries),
            ("skipped_images", report.skipped_images.len()),
            ("truncated_texts", report.truncated.len()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect(),
        seconds: started.elapsed().as_secs_f64(),
        details: serde_json::to_value(&report).map_err(|e| Error::parse("retrieval report", e))?,
    };
    if let Some(p) = &args.output {
        record.write_json(p)?;
        eprintln!("wrote {}", p.display());
    }
    if args.json {
        let s = serde_json::to_string_pretty(&record).map_err(|e| Error::parse("record", e))?;
        println!("{s}");
    } else {
        println!("{}", recall_table("cosine", &report.cosine));
        if let Some(r) = &report.reranked {
            println!(
                "{}",
                recall_table(&format!("re-ranked@{}", report.top_k), r)
            );
        }
        println!(
            "{} images ({} image→text queries), {} texts ({} text→image queries); \
             encoding {:.1} s, ranking {:.1} s",
            report.num_images,
            report.i2t_queries,
            report.num_texts,
            report.t2i_queries,
            report.encode_seconds,
            report.rank_seconds
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
