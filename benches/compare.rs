//! Timing binary for the side-by-side comparison with PyTorch (`benches/compare_pytorch.py`).
//!
//! `cargo bench --bench compare -- --workload siglip2-b16-image --batch 8 --iters 5`
//! prints one JSON line: `{"workload", "batch", "median_s", "min_s", "times",
//! "peak_rss_mib"}` after `--warmup` untimed runs (default 1). `--device cuda` (built with
//! `--features cuda`) and `--dtype bf16|f16|f32` run it elsewhere; every run ends with a
//! device synchronisation. Weights are random (timings
//! depend on shapes only); the workloads are in `workloads.rs`. `--list` prints them. Run one
//! workload per process so that the peak RSS (`VmHWM`) is that workload's. Like
//! `tuwen::load` for a CPU model, it applies `tuwen::tune_allocator()` first;
//! `--untuned-allocator` measures without it. Like the examples, it runs candle's own
//! elementwise ops on the calling thread unless `CANDLE_NUM_THREADS` is set
//! (`tuwen::threads::candle_ops_on_calling_thread`); `--candle-threads-default` measures
//! with candle's own pool.

use std::time::Instant;

mod workloads;
use workloads::{peak_rss_mib, workload_on, WORKLOADS};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let get = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    if !args.iter().any(|a| a == "--candle-threads-default") {
        // SAFETY: no other thread exists yet and no candle op has run (reading the arguments
        // starts neither).
        unsafe { tuwen::threads::candle_ops_on_calling_thread() };
    }
    if args.iter().any(|a| a == "--list") {
        println!("{}", WORKLOADS.join("\n"));
        return;
    }
    let Some(name) = get("--workload") else {
        // `cargo bench` runs every bench binary without arguments: do nothing then.
        return;
    };
    if !args.iter().any(|a| a == "--untuned-allocator") {
        tuwen::tune_allocator();
    }
    let batch: usize = get("--batch").and_then(|b| b.parse().ok()).unwrap_or(8);
    let iters: usize = get("--iters").and_then(|b| b.parse().ok()).unwrap_or(5);
    let warmup: usize = get("--warmup").and_then(|b| b.parse().ok()).unwrap_or(1);
    let device = get("--device").unwrap_or_else(|| "cpu".into());
    let dev = match tuwen::models::parse_device(&device) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: --device {device}: {e}");
            std::process::exit(1);
        }
    };
    let dtype = match get("--dtype").as_deref().unwrap_or("f32") {
        "f32" => candle_core::DType::F32,
        "bf16" => candle_core::DType::BF16,
        "f16" => candle_core::DType::F16,
        other => {
            eprintln!("error: --dtype {other}: expected f32, bf16 or f16");
            std::process::exit(1);
        }
    };
    let mut run = match workload_on(&name, batch, &dev, dtype) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    for _ in 0..warmup {
        if let Err(e) = run() {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
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
    let rss = peak_rss_mib().unwrap_or(f64::NAN);
    println!(
        "{{\"workload\": \"{name}\", \"device\": \"{device}\", \"dtype\": \"{dtype:?}\", \"batch\": {batch}, \"median_s\": {median:.6}, \"min_s\": {:.6}, \"times\": {times:?}, \"peak_rss_mib\": {rss:.1}}}",
        sorted[0]
    );
}
