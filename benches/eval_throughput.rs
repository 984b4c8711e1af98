//! Evaluation throughput and peak memory: retrieval over a synthetic Chinese-CLIP-format
//! set of 2,000 images (base64 JPEGs in a TSV) and 10,000 captions (5 per image), then
//! the same evaluation again from the embedding cache.
//!
//! ```sh
//! cargo bench --bench eval_throughput                      # the tiny SigLIP fixture
//! TUWEN_BENCH_MODEL=/models/siglip2-base-patch16-224 cargo bench --bench eval_throughput
//! ```
//!
//! Prints items per second for each stage and the process's peak RSS (`VmHWM`). With the
//! tiny model the figures measure the pipeline around the model: reading and decoding
//! the TSV, preprocessing, tokenising, blocked top-k and the metrics.

use std::io::Cursor;
use std::path::Path;
use std::time::Instant;

use base64::Engine;
use tuwen::eval::{evaluate, EmbeddingCache, RetrievalDataset, RetrievalOptions};
use tuwen::LoadOptions;

const IMAGES: usize = 2000;
const CAPTIONS_PER_IMAGE: usize = 5;

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn write_set(dir: &Path) {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut tsv = String::new();
    for i in 0..IMAGES {
        let img = image::RgbImage::from_fn(96, 80, |x, y| {
            image::Rgb([
                ((x as usize * 3 + i) % 256) as u8,
                ((y as usize * 5 + i * 7) % 256) as u8,
                ((x + y) as usize * (i % 11 + 1) % 256) as u8,
            ])
        });
        let mut jpg = Vec::new();
        image::DynamicImage::ImageRgb8(img)
            .write_to(&mut Cursor::new(&mut jpg), image::ImageFormat::Jpeg)
            .expect("encode");
        tsv += &format!("{i}\t{}\n", b64.encode(&jpg));
    }
    std::fs::write(dir.join("valid_imgs.tsv"), tsv).expect("write tsv");
    let mut jsonl = String::new();
    for t in 0..IMAGES * CAPTIONS_PER_IMAGE {
        let i = t / CAPTIONS_PER_IMAGE;
        jsonl += &serde_json::json!({
            "text_id": t,
            "text": format!("第{i}张合成图片的第{}条描述，颜色渐变", t % CAPTIONS_PER_IMAGE),
            "image_ids": [i],
        })
        .to_string();
        jsonl.push('\n');
    }
    std::fs::write(dir.join("valid_texts.jsonl"), jsonl).expect("write jsonl");
}

fn tiny_model_dir(dir: &Path) {
    let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/siglip2");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fx.join("siglip_tiny").join(f), dir.join(f)).expect("fixture");
    }
    std::fs::copy(
        fx.join("tokenizer/tokenizer.json"),
        dir.join("tokenizer.json"),
    )
    .expect("fixture");
}

fn main() {
    // SAFETY: first thing in `main`: no other thread exists yet and no candle op has run.
    unsafe { tuwen::threads::candle_ops_on_calling_thread() };
    let tmp = tempfile::tempdir().expect("tempdir");
    let data_dir = tmp.path().join("data");
    std::fs::create_dir_all(&data_dir).expect("mkdir");
    let t0 = Instant::now();
    write_set(&data_dir);
    eprintln!(
        "wrote the synthetic set in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let model_path = match std::env::var("TUWEN_BENCH_MODEL") {
        Ok(p) => p,
        Err(_) => {
            let d = tmp.path().join("model");
            std::fs::create_dir_all(&d).expect("mkdir");
            tiny_model_dir(&d);
            d.display().to_string()
        }
    };
    let rss_before = peak_rss_mb();
    let t0 = Instant::now();
    let data = RetrievalDataset::open(&data_dir, Some("valid")).expect("dataset");
    let index_s = t0.elapsed().as_secs_f64();
    let model = tuwen::load(&model_path, &LoadOptions::default()).expect("model");
    let cache = tmp.path().join("cache");
    let opts = RetrievalOptions {
        cache: Some(EmbeddingCache::new(&cache, model_path.clone())),
        ..RetrievalOptions::default()
    };
    let t0 = Instant::now();
    let r = evaluate(model.as_ref(), &data, &opts).expect("evaluate");
    let total = t0.elapsed().as_secs_f64();
    let rss_after = peak_rss_mb();
    let t0 = Instant::now();
    let again = evaluate(model.as_ref(), &data, &opts).expect("evaluate from cache");
    let cached_total = t0.elapsed().as_secs_f64();
    assert!(again.images_cached && again.texts_cached);
    assert_eq!(again.cosine, r.cosine);
    let items = (IMAGES + IMAGES * CAPTIONS_PER_IMAGE) as f64;
    println!("model: {model_path}");
    println!("indexing the TSV + JSONL: {index_s:.2} s");
    println!(
        "encode {} images + {} texts: {:.2} s ({:.0} items/s)",
        IMAGES,
        IMAGES * CAPTIONS_PER_IMAGE,
        r.encode_seconds,
        items / r.encode_seconds
    );
    println!(
        "blocked top-k both ways + metrics: {:.3} s ({:.0} queries/s)",
        r.rank_seconds,
        items / r.rank_seconds
    );
    println!(
        "whole evaluation: {total:.2} s ({:.0} items/s)",
        items / total
    );
    println!(
        "again from the embedding cache: {cached_total:.2} s ({:.0} items/s)",
        items / cached_total
    );
    println!("peak RSS: {rss_before:.0} MB before evaluating, {rss_after:.0} MB after");
    println!("{}", r.cosine);
}
