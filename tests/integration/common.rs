//! Helpers shared by the integration tests.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

/// The repository root.
pub fn repo_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The committed fixtures under `tests/fixtures/`.
pub fn fixtures_dir() -> PathBuf {
    repo_dir().join("tests").join("fixtures")
}

/// A path under `tests/fixtures`, which must exist.
pub fn fixture(rel: &str) -> PathBuf {
    let p = fixtures_dir().join(rel);
    assert!(p.exists(), "missing fixture {}", p.display());
    p
}

/// The device the model and training parity tests run on: `TUWEN_TEST_DEVICE` (`cpu`,
/// `cuda[:N]`, `metal[:N]`, as the examples' `--device`), the CPU when unset. An unusable
/// value fails the test rather than falling back.
pub fn test_device() -> Device {
    match std::env::var("TUWEN_TEST_DEVICE") {
        Ok(s) => {
            tuwen::models::parse_device(&s).unwrap_or_else(|e| panic!("TUWEN_TEST_DEVICE={s}: {e}"))
        }
        Err(_) => Device::Cpu,
    }
}

/// `LoadOptions` on [`test_device`] in `f32`.
pub fn test_opts() -> tuwen::LoadOptions {
    tuwen::LoadOptions {
        device: test_device(),
        ..tuwen::LoadOptions::default()
    }
}

/// Loads every tensor of a safetensors file onto [`test_device`].
pub fn load_st(path: &std::path::Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &test_device())
        .unwrap_or_else(|e| panic!("cannot load {}: {e}", path.display()))
}

/// Gets a tensor by name or fails naming it.
pub fn get<'a>(m: &'a HashMap<String, Tensor>, k: &str) -> &'a Tensor {
    m.get(k)
        .unwrap_or_else(|| panic!("fixture has no tensor `{k}`"))
}

/// The largest absolute difference between two tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let cpu = |t: &Tensor| {
        t.to_device(&Device::Cpu)
            .and_then(|t| t.to_dtype(DType::F32))
            .and_then(|t| t.flatten_all())
            .unwrap()
    };
    let (a, b) = (cpu(a), cpu(b));
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Asserts `max |a − b| <= tol`, printing the error so logs show the parity figure.
pub fn assert_close(what: &str, a: &Tensor, b: &Tensor, tol: f32) {
    let d = max_abs_diff(a, b);
    println!("parity {what}: max abs diff {d:.3e} (tolerance {tol:.0e})");
    assert!(d <= tol, "{what}: max abs diff {d} > {tol}");
}

/// A temporary model directory with the tiny SigLIP checkpoint and the test tokenizer, as a
/// user would lay it out for `tuwen::load`.
pub fn tiny_siglip_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(
            fixture(&format!("siglip2/siglip_tiny/{f}")),
            dir.path().join(f),
        )
        .unwrap();
    }
    // The tiny model has a 1000-token vocabulary; the test tokenizer has 804.
    std::fs::copy(
        fixture("siglip2/tokenizer/tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    dir
}

/// The vars of a map, sorted by name.
pub fn named_vars(vars: &candle_nn::VarMap) -> Vec<(String, candle_core::Var)> {
    let mut v: Vec<_> = vars
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// max |a − b| / max(max |b|, floor): a floor compares tensors that are zero in exact
/// arithmetic (the key biases of attention, whose softmax ignores a per-query constant)
/// absolutely.
pub fn rel_diff_floor(a: &Tensor, b: &Tensor, floor: f32) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let a = a.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    let d = (&a - &b)
        .unwrap()
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let s = b.abs().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    d / s.max(floor).max(1e-12)
}

/// max |a − b| / max |b|.
pub fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    rel_diff_floor(a, b, 0.0)
}

/// Fills `vm` with seeded random weights for the parameters `shapes` (from
/// `tuwen::checkpoint::parameter_shapes`): norm scales 1, biases 0, embedding tables and other
/// vectors about N(0, 0.02²), matrices about N(0, 1/fan_in) (so that a narrow model does not
/// start with uniform attention), and the scalars in `fixed` set to their values. "About
/// normal": a sum of 4 uniforms, scaled.
pub fn fill_random_vars(
    vm: &candle_nn::VarMap,
    shapes: std::collections::BTreeMap<String, Vec<usize>>,
    seed: u64,
    fixed: &[(&str, f32)],
) {
    use rand::Rng;
    let mut rng = tuwen::train::rng::derive_rng(seed, &[42]);
    let mut data = vm.data().lock().unwrap();
    for (name, shape) in shapes {
        let n: usize = shape.iter().product();
        let t = if let Some((_, v)) = fixed.iter().find(|(k, _)| *k == name) {
            Tensor::new(*v, &Device::Cpu).unwrap()
        } else if (name.contains("norm") || name.contains("LayerNorm")) && name.ends_with("weight")
        {
            Tensor::ones(shape.as_slice(), DType::F32, &Device::Cpu).unwrap()
        } else if name.ends_with("bias") {
            Tensor::zeros(shape.as_slice(), DType::F32, &Device::Cpu).unwrap()
        } else {
            let std = if name.contains("embedding") || shape.len() < 2 {
                0.02
            } else {
                1.0 / (shape[1..].iter().product::<usize>() as f64).sqrt()
            };
            let v: Vec<f32> = (0..n)
                .map(|_| {
                    // A sum of 4 uniforms: about normal, variance 1/3.
                    let s: f64 = (0..4).map(|_| rng.random::<f64>() - 0.5).sum();
                    (s * std * 3f64.sqrt()) as f32
                })
                .collect();
            Tensor::from_vec(v, shape.as_slice(), &Device::Cpu).unwrap()
        };
        data.insert(name, candle_core::Var::from_tensor(&t).unwrap());
    }
}

/// Image→caption Recall@1 of image embeddings `img` `[n, d]` against the class caption
/// embeddings `txt` `[classes, d]` (scored by their dot product: pass normalised embeddings),
/// with `labels` the class of each image.
pub fn class_recall(img: &Tensor, txt: &Tensor, labels: &[usize]) -> f64 {
    let scores = img
        .matmul(&txt.t().unwrap())
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    tuwen::train::synthetic::class_recall_at_1(&scores, labels).unwrap()
}
