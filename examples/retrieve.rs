//! Retrieval with R2D2 / PRD2: index a folder of images and query it with text, or query a
//! list of texts with an image. Optionally re-rank the top k candidates by ITM + cosine, as
//! the R2D2 evaluation does.
//!
//! ```sh
//! # text -> image
//! cargo run --release --example retrieve -- --model r2d2-vit-l14-250m \
//!     --images photos/ --query 乔丹投篮 --rerank-k 16
//! # image -> text
//! cargo run --release --example retrieve -- --model r2d2-vit-l14-250m \
//!     --image-query jordan.jpg --texts-file captions.txt --rerank-k 16
//! ```

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use tuwen::eval::retrieval::{
    cosine_scores, cross_scores_image_vs_texts, cross_scores_text_vs_images, encode_texts_batched,
    rank_desc, Encoded, RetrievalModel,
};
use tuwen::models::r2d2::R2d2Encoder;
use tuwen::models::{parse_device, parse_dtype};
use tuwen::{Error, ImageInput, LoadOptions};

#[derive(Parser, Debug)]
#[command(about = "Text-to-image or image-to-text retrieval with R2D2 / PRD2")]
struct Args {
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
    /// cpu, cuda[:N] or metal[:N].
    #[arg(long, default_value = "cpu")]
    device: String,
    /// f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    dtype: String,
}

const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"];

fn list_images(dir: &Path) -> tuwen::Result<Vec<PathBuf>> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| Error::io(format!("listing {}", dir.display()), e))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "no images ({}) in {}",
            IMAGE_EXTENSIONS.join(", "),
            dir.display()
        )));
    }
    Ok(files)
}

/// Encodes the images in batches; images that cannot be read are skipped with a warning.
fn index_images(
    model: &R2d2Encoder,
    files: Vec<PathBuf>,
    batch: usize,
    keep: bool,
) -> tuwen::Result<(Vec<PathBuf>, Encoded)> {
    let mut kept = Vec::new();
    let mut parts = Vec::new();
    for chunk in files.chunks(batch.max(1)) {
        let inputs: Vec<ImageInput> = chunk.iter().map(ImageInput::path).collect();
        match model.encode_images(&inputs, keep) {
            Ok(e) => {
                kept.extend_from_slice(chunk);
                parts.push(e);
            }
            Err(_) => {
                // Find the bad ones.
                for (f, input) in chunk.iter().zip(inputs) {
                    match model.encode_images(std::slice::from_ref(&input), keep) {
                        Ok(e) => {
                            kept.push(f.clone());
                            parts.push(e);
                        }
                        Err(e) => eprintln!("warning: skipping {}: {e}", f.display()),
                    }
                }
            }
        }
        eprint!("\rindexed {} images", kept.len());
    }
    eprintln!();
    if parts.is_empty() {
        return Err(Error::InvalidArgument("no readable images".into()));
    }
    Ok((kept, Encoded::cat(&parts)?))
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
    let opts = LoadOptions {
        device: parse_device(&args.device)?,
        dtype: parse_dtype(&args.dtype)?,
        ..LoadOptions::default()
    };
    let model = R2d2Encoder::load(&args.model, &opts)?;
    let rerank = args.rerank_k > 0;
    if rerank && !model.can_rerank() {
        return Err(Error::Config(format!(
            "--rerank-k needs a cross encoder, and {} has none",
            model.config().model_type
        )));
    }
    if let Some(dir) = &args.images {
        let (files, images) = index_images(&model, list_images(dir)?, args.batch_size, rerank)?;
        let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
        let queries: Vec<&str> = args.query.iter().map(String::as_str).collect();
        let texts = encode_texts_batched(&model, &queries, args.batch_size, rerank, false)?;
        for &i in &texts.truncated {
            eprintln!("warning: query {} was truncated to 64 tokens", i + 1);
        }
        let sims = cosine_scores(&images, &texts)?;
        for (t, q) in queries.iter().enumerate() {
            let cos: Vec<f32> = sims.iter().map(|row| row[t]).collect();
            let rows = ranked(&cos, args.rerank_k, |cand| {
                cross_scores_text_vs_images(&model, &images, &texts, t, cand, args.batch_size)
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
        let texts = encode_texts_batched(&model, &refs, args.batch_size, rerank, false)?;
        for &i in &texts.truncated {
            eprintln!("warning: text {} was truncated to 64 tokens", i + 1);
        }
        let image = model.encode_images(&[ImageInput::path(img)], rerank)?;
        let sims = cosine_scores(&image, &texts)?;
        let rows = ranked(&sims[0], args.rerank_k, |cand| {
            cross_scores_image_vs_texts(&model, &image, &texts, 0, cand, args.batch_size)
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
