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
