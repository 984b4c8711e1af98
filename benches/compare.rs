//! Timing binary for the side-by-side comparison with PyTorch (`benches/compare_pytorch.py`).
//!
//! `cargo bench --bench compare -- --workload siglip2-b16-image --batch 8 --iters 5`
//! prints one JSON line: `{"workload", "batch", "median_s", "min_s", "times"}`. Weights are
//! random (timings depend on shapes only). `--list` prints the workloads.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use tuwen::checkpoint::random_var_builder;
use tuwen::models::siglip2::{Siglip, SiglipConfig};

type Run = Box<dyn FnMut() -> candle_core::Result<()>>;

fn workload(name: &str, batch: usize) -> Result<Run, String> {
    let dev = Device::Cpu;
    let e = |e: candle_core::Error| e.to_string();
    let siglip = |preset: &str| -> Result<Siglip, String> {
        let cfg = SiglipConfig::preset(preset).ok_or("preset")?;
        Siglip::new(&cfg, random_var_builder(7, DType::F32, &dev)).map_err(e)
    };
    Ok(match name {
        "siglip2-b16-image" => {
            let m = siglip("siglip2-base-patch16-224")?;
            let px = Tensor::randn(0f32, 1.0, (batch, 3, 224, 224), &dev).map_err(e)?;
            Box::new(move || m.get_image_features(&px).map(|_| ()))
        }
        "siglip2-b16-text" => {
            let m = siglip("siglip2-base-patch16-224")?;
            let ids = Tensor::ones((batch, 64), DType::U32, &dev).map_err(e)?;
            Box::new(move || m.get_text_features(&ids, None).map(|_| ()))
        }
        "siglip2-b16-naflex-image" => {
            let m = siglip("siglip2-base-patch16-naflex")?;
            let batch_ = tuwen::preprocess::NaFlexBatch {
                pixel_values: Tensor::randn(0f32, 1.0, (batch, 256, 768), &dev).map_err(e)?,
                pixel_attention_mask: Tensor::ones((batch, 256), DType::U32, &dev).map_err(e)?,
                spatial_shapes: vec![(16, 16); batch],
            };
            Box::new(move || m.get_image_features_naflex(&batch_).map(|_| ()))
        }
        other => return Err(format!("unknown workload {other}")),
    })
}

const WORKLOADS: &[&str] = &[
    "siglip2-b16-image",
    "siglip2-b16-text",
    "siglip2-b16-naflex-image",
];

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let get = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    if args.iter().any(|a| a == "--list") {
        println!("{}", WORKLOADS.join("\n"));
        return;
    }
    let Some(name) = get("--workload") else {
        // `cargo bench` runs every bench binary without arguments: do nothing then.
        return;
    };
    let batch: usize = get("--batch").and_then(|b| b.parse().ok()).unwrap_or(8);
    let iters: usize = get("--iters").and_then(|b| b.parse().ok()).unwrap_or(5);
    let mut run = match workload(&name, batch) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        if let Err(e) = run() {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
        times.push(t.elapsed().as_secs_f64());
    }
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    println!(
        "{{\"workload\": \"{name}\", \"batch\": {batch}, \"median_s\": {median:.6}, \"min_s\": {:.6}, \"times\": {times:?}}}",
        sorted[0]
    );
}
