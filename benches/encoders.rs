//! Encoder throughput at real sizes with random weights (the numbers depend on shapes, not
//! on weight values): every workload of `workloads.rs` (SigLIP 2 B/16 and NaFlex, R2D2
//! ViT-L/14, BERT and ITM re-ranking, BriVL's image and text towers) at batches 1 and 8
//! (ITM: one query against 128 candidates), and the training steps of small SigLIP, R2D2
//! and BriVL (MoCo) configs. Run with `cargo bench --bench encoders`; pass a
//! criterion filter to run a subset, e.g. `cargo bench --bench encoders -- siglip2`. The
//! side-by-side comparison with PyTorch, with peak memory, is `compare_pytorch.py`.

use criterion::{criterion_group, criterion_main, Criterion};

mod workloads;
use workloads::{workload, WORKLOADS};

fn bench_encoders(c: &mut Criterion) {
    // As `tuwen::load` does for a CPU model.
    tuwen::tune_allocator();
    let mut g = c.benchmark_group("encoders");
    g.sample_size(10);
    for &name in WORKLOADS {
        let batches: &[usize] = if name == "r2d2-itm-rerank" {
            &[1]
        } else {
            &[1, 8]
        };
        for &b in batches {
            let mut run = workload(name, b).expect("workload");
            g.bench_function(format!("{name}, batch {b}"), |bench| {
                bench.iter(|| run().expect("forward"))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench_encoders);
criterion_main!(benches);
