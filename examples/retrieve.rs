//! Retrieval with any tuwen model: index a folder of images and query it with text, or
//! query a list of texts with an image. Models with a cross encoder (R2D2) can re-rank the
//! top k candidates by ITM + cosine, as the R2D2 evaluation does; asking for it with any
//! other model is an error.
//!
//! ```sh
//! # text -> image
//! cargo run --release --example retrieve -- --model r2d2-vit-l14-250m \
//!     --images photos/ --query 乔丹投篮 --rerank-k 16
//! # image -> text
//! cargo run --release --example retrieve -- --model r2d2-vit-l14-250m \
//!     --image-query jordan.jpg --texts-file captions.txt --rerank-k 16
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tuwen::eval::data::{list_images, IMAGE_EXTENSIONS};
use tuwen::eval::encode::{encode_images, encode_texts, EncodeOptions};
use tuwen::eval::retrieval::{
    cosine_scores, cross_scores_image_vs_texts, cross_scores_text_vs_images, rank_desc,
};
use tuwen::eval::ImageRef;
use tuwen::models::{parse_device, parse_dtype};
use tuwen::{Error, LoadOptions};

#[derive(Parser, Debug)]
#[command(about = "Text-to-image or image-to-text retrieval with a tuwen model")]
struct Args {
    /// Fail when the checkpoint holds tensors the model does not use (by default they
    /// are listed as a warning).
    #[arg(long)]
    strict: bool,
    /// Preset name, checkpoint file or model directory.
    #[arg(long)]
    model: String,
    /// A folder of images to index (text -> image).
    #[arg(long, requires = "query")]
    images: Option<PathBuf>,
    /// A text query (repeat for several).
    #[arg(long)]
    query: Vec<String>,
    /// An image query (image -> text).
    #[arg(long, conflicts_with = "images", requires = "texts_file")]
    image_query: Option<PathBuf>,
    /// The texts to search, one per line (image -> text).
    #[arg(long)]
    texts_file: Option<PathBuf>,
    /// Results to print per query.
    #[arg(long, default_value_t = 5)]
    top: usize,
    /// Re-rank this many cosine candidates by ITM + cosine (R2D2 only; 0 disables).
    #[arg(long, default_value_t = 0)]
    rerank_k: usize,
    /// Images or texts per forward pass.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// BriVL: an N×N grid of boxes plus the whole image.
    #[arg(long)]
    grid: Option<usize>,
    /// cpu, cuda[:N] or metal[:N].
    #[arg(long, default_value = "cpu")]
    device: String,
    /// f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    dtype: String,
}

/// Scores of one query row: cosine, or ITM + cosine for the top k (others keep cosine
/// below every re-ranked score, as the original's −100).
fn ranked(
    cos: &[f32],
    rerank_k: usize,
    cross: impl FnOnce(&[usize]) -> tuwen::Result<Vec<f32>>,
) -> tuwen::Result<Vec<(usize, f32, Option<f32>)>> {
    if rerank_k == 0 {
        return Ok(rank_desc(cos)
            .into_iter()
            .map(|j| (j, cos[j], None))
            .collect());
    }
    let order = rank_desc(cos);
    let cand: Vec<usize> = order.iter().copied().take(rerank_k).collect();
    let itm = cross(&cand)?;
    let mut top: Vec<(usize, f32, Option<f32>)> = cand
        .iter()
        .zip(&itm)
        .map(|(&j, &s)| (j, cos[j], Some(s)))
        .collect();
    top.sort_by(|a, b| {
        let (sa, sb) = (a.1 + a.2.unwrap_or(0.0), b.1 + b.2.unwrap_or(0.0));
        sb.total_cmp(&sa)
    });
    top.extend(order.into_iter().skip(rerank_k).map(|j| (j, cos[j], None)));
    Ok(top)
}

fn print_results(label: &str, rows: &[(usize, f32, Option<f32>)], names: &[String], top: usize) {
    println!("{label}");
    for (rank, (j, cos, itm)) in rows.iter().take(top).enumerate() {
        match itm {
            Some(s) => println!(
                "  {:>3}. ITM+cos {:.4} (ITM {s:.4}, cosine {cos:.4})  {}",
                rank + 1,
                s + cos,
                names[*j]
            ),
            None => println!("  {:>3}. cosine {cos:.4}  {}", rank + 1, names[*j]),
        }
    }
}

fn run(args: Args) -> tuwen::Result<()> {
    if args.batch_size == 0 || args.top == 0 {
        return Err(Error::InvalidArgument(
            "--batch-size and --top must be at least 1".into(),
        ));
    }
    let opts = LoadOptions {
        device: parse_device(&args.device)?,
        dtype: parse_dtype(&args.dtype)?,
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
    let rerank = args.rerank_k > 0;
    let cross = match (rerank, model.cross_encoder()) {
        (false, _) => None,
        (true, Some(c)) => Some(c),
        (true, None) => {
            return Err(Error::Config(format!(
                "--rerank-k needs a cross encoder, and the {} model has none",
                model.family()
            )))
        }
    };
    let eo = EncodeOptions {
        image_batch_size: args.batch_size,
        text_batch_size: args.batch_size,
        keep_states: rerank,
        skip_bad: true,
        progress: false,
    };
    if let Some(dir) = &args.images {
        let files = list_images(dir)?;
        if files.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "no images ({}) in {}",
                IMAGE_EXTENSIONS.join(", "),
                dir.display()
            )));
        }
        let refs: Vec<ImageRef> = files.iter().cloned().map(ImageRef::Path).collect();
        let enc = encode_images(model.as_ref(), &refs, &[], &eo)?;
        for (i, why) in &enc.skipped {
            eprintln!("warning: skipping {}: {why}", files[*i].display());
        }
        eprintln!("indexed {} images", enc.kept.len());
        let names: Vec<String> = enc
            .kept
            .iter()
            .map(|&i| files[i].display().to_string())
            .collect();
        let images = enc.encoded;
        let queries: Vec<&str> = args.query.iter().map(String::as_str).collect();
        let texts = encode_texts(model.as_ref(), &queries, &eo)?;
        for &i in &texts.truncated {
            eprintln!("warning: query {} was truncated", i + 1);
        }
        let sims = cosine_scores(&images, &texts)?;
        for (t, q) in queries.iter().enumerate() {
            let cos: Vec<f32> = sims.iter().map(|row| row[t]).collect();
            let rows = ranked(&cos, args.rerank_k, |cand| match cross {
                Some(c) => {
                    cross_scores_text_vs_images(c, &images, &texts, t, cand, args.batch_size)
                }
                None => Ok(Vec::new()),
            })?;
            print_results(&format!("query: {q}"), &rows, &names, args.top);
        }
        return Ok(());
    }
    if let (Some(img), Some(file)) = (&args.image_query, &args.texts_file) {
        let s = std::fs::read_to_string(file)
            .map_err(|e| Error::io(format!("reading {}", file.display()), e))?;
        let names: Vec<String> = s
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let texts = encode_texts(model.as_ref(), &refs, &eo)?;
        for &i in &texts.truncated {
            eprintln!("warning: text {} was truncated", i + 1);
        }
        let eo = EncodeOptions {
            skip_bad: false,
            ..eo
        };
        let image = encode_images(model.as_ref(), &[ImageRef::Path(img.clone())], &[], &eo)?;
        let image = image.encoded;
        let sims = cosine_scores(&image, &texts)?;
        let rows = ranked(&sims[0], args.rerank_k, |cand| match cross {
            Some(c) => cross_scores_image_vs_texts(c, &image, &texts, 0, cand, args.batch_size),
            None => Ok(Vec::new()),
        })?;
        print_results(
            &format!("image: {}", img.display()),
            &rows,
            &names,
            args.top,
        );
        return Ok(());
    }
    Err(Error::InvalidArgument(
        "give --images DIR with --query TEXT, or --image-query IMAGE with --texts-file FILE".into(),
    ))
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
