//! Encoder throughput at real sizes with random weights (the numbers depend on shapes, not
//! on weight values). Run with `cargo bench --bench encoders`;
//! pass a criterion filter to run a subset.

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion};
use tuwen::checkpoint::random_var_builder;
use tuwen::models::siglip2::{Siglip, SiglipConfig};

fn siglip(name: &str) -> Siglip {
    let cfg = SiglipConfig::preset(name).expect("preset");
    Siglip::new(&cfg, random_var_builder(7, DType::F32, &Device::Cpu)).expect("model")
}

fn bench_siglip2(c: &mut Criterion) {
    let mut g = c.benchmark_group("siglip2");
    g.sample_size(10);
    let model = siglip("siglip2-base-patch16-224");
    for b in [1usize, 8] {
        let px = Tensor::randn(0f32, 1.0, (b, 3, 224, 224), &Device::Cpu).expect("pixels");
        g.bench_function(format!("b16-224 image encoder, batch {b}"), |bench| {
            bench.iter(|| model.get_image_features(&px).expect("forward"))
        });
        let ids = Tensor::ones((b, 64), DType::U32, &Device::Cpu).expect("ids");
        g.bench_function(format!("b16 text encoder 64 tokens, batch {b}"), |bench| {
            bench.iter(|| model.get_text_features(&ids, None).expect("forward"))
        });
    }
    let naflex = siglip("siglip2-base-patch16-naflex");
    for b in [1usize, 8] {
        let pixel_values = Tensor::randn(0f32, 1.0, (b, 256, 768), &Device::Cpu).expect("pixels");
        let batch = tuwen::preprocess::NaFlexBatch {
            pixel_values,
            pixel_attention_mask: Tensor::ones((b, 256), DType::U32, &Device::Cpu).expect("mask"),
            spatial_shapes: vec![(16, 16); b],
        };
        g.bench_function(
            format!("b16-naflex image encoder 256 patches, batch {b}"),
            |bench| bench.iter(|| naflex.get_image_features_naflex(&batch).expect("forward")),
        );
    }
    g.finish();
}

criterion_group!(benches, bench_siglip2);
criterion_main!(benches);
