//! Chinese-CLIP RN50's image tower (CLIP's modified ResNet): parity with cn_clip's
//! `ModifiedResNet` on the tiny fixture of `tests/fixtures/gen_cnclip_rn50.py` (eval and train
//! mode BatchNorm, outputs and gradients), and the full-size tensor list.

use std::collections::HashMap;

use candle_core::{DType, Module, Tensor};

use tuwen::checkpoint::{parameter_shapes, Loader, TensorSource};
use tuwen::nn::resnet::{ModifiedResNet, ModifiedResNetConfig, UNUSED_KEYS};

use crate::common::{assert_close, fixture, get, load_st, max_abs_diff, test_device};

const TINY: &str = "cnclip/rn50_tiny.safetensors";
const TINY_JSON: &str = "cnclip/rn50_tiny.json";
const MANIFEST: &str = "manifests/chinese-clip-rn50.json";

fn tiny_config() -> ModifiedResNetConfig {
    let s = std::fs::read_to_string(fixture(TINY_JSON)).unwrap();
    let cfg: ModifiedResNetConfig = serde_json::from_str(&s).unwrap();
    cfg.validate().unwrap();
    cfg
}

/// The fixture's model, inference (`trainable` false) or with every tensor a variable.
fn tiny(trainable: bool) -> (ModifiedResNet, Option<candle_nn::VarMap>) {
    let source = TensorSource::open(&fixture(TINY), None).unwrap();
    let loader = Loader::new(source, "rn50_tiny.safetensors");
    let (loader, vars) = if trainable {
        let (l, v) = loader.trainable().unwrap();
        (l, Some(v))
    } else {
        (loader, None)
    };
    let net = ModifiedResNet::new(
        &tiny_config(),
        loader.var_builder(DType::F32, &test_device()),
    )
    .map_err(|e| loader.error(e))
    .unwrap();
    // Everything but the BN counters and the fixture's own references is read.
    let mut ignore = UNUSED_KEYS.to_vec();
    ignore.extend(["input", "probe", "output", "features", "grad.", "train."]);
    let report = loader.finish(&ignore);
    assert!(
        report.unexpected.is_empty(),
        "unexpected keys: {:?}",
        report.unexpected
    );
    (net, vars)
}

fn input(io: &HashMap<String, Tensor>) -> Tensor {
    get(io, "input").to_dtype(DType::F32).unwrap()
}

/// Compares our gradients of `Σ output·probe` with PyTorch's `{prefix}grad.<param>`
/// (relative to each reference's largest entry); returns the worst.
fn check_grads(
    io: &HashMap<String, Tensor>,
    vars: &candle_nn::VarMap,
    y: &Tensor,
    prefix: &str,
) -> f32 {
    let grads = (y * get(io, "probe"))
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let data = vars.data().lock().unwrap();
    let mut worst = 0f32;
    let mut n = 0;
    let key = format!("{prefix}grad.");
    for (k, want) in io.iter() {
        let Some(param) = k.strip_prefix(&key) else {
            continue;
        };
        let var = data
            .get(param)
            .unwrap_or_else(|| panic!("no variable {param}"));
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {param}"));
        let scale = want
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let rel = max_abs_diff(g, want) / scale.max(1e-6);
        println!("cnclip rn50 {prefix}grad {param}: rel diff {rel:.2e} (scale {scale:.2e})");
        assert!(rel < 1e-4, "{prefix}grad {param}: rel diff {rel}");
        worst = worst.max(rel);
        n += 1;
    }
    assert!(n >= 10, "only {n} gradients in the fixture");
    worst
}

#[test]
fn cnclip_rn50_matches_cn_clip_in_eval_mode() {
    let io = load_st(&fixture(TINY));
    let x = input(&io);
    for trainable in [false, true] {
        let (net, _) = tiny(trainable);
        let (f, y) = net.forward_features_and_pool(&x).unwrap();
        assert_eq!(f.dims(), &[2, 64, 2, 2]);
        assert_eq!(y.dims(), &[2, 16]);
        let what = if trainable { "trainable" } else { "inference" };
        assert_close(
            &format!("cnclip rn50 tiny features ({what})"),
            &f,
            get(&io, "features"),
            1e-4,
        );
        assert_close(
            &format!("cnclip rn50 tiny output ({what})"),
            &y,
            get(&io, "output"),
            1e-4,
        );
        // The stages one by one give the same.
        let mut h = net.forward_stem(&x).unwrap();
        for i in 0..4 {
            h = net.forward_stage(i, &h).unwrap();
        }
        assert!(max_abs_diff(&h, &f) == 0.0);
        assert!(max_abs_diff(&net.forward(&x).unwrap(), &y) == 0.0);
    }
}

#[test]
fn cnclip_rn50_gradients_match_cn_clip_in_eval_mode() {
    let io = load_st(&fixture(TINY));
    let (net, vars) = tiny(true);
    let vars = vars.unwrap();
    let y = net.forward(&input(&io)).unwrap();
    let worst = check_grads(&io, &vars, &y, "");
    println!("cnclip rn50 eval-mode gradients: worst rel diff {worst:.2e}");
}

/// PyTorch's train mode (`model.train()`): batch statistics in the forward and its
/// gradients, and every BN's running statistics after the step.
#[test]
fn cnclip_rn50_train_mode_matches_cn_clip() {
    let io = load_st(&fixture(TINY));
    let (net, vars) = tiny(true);
    let vars = vars.unwrap();
    net.set_batch_norm_training(true);
    let y = net.forward(&input(&io)).unwrap();
    assert_close(
        "cnclip rn50 tiny train-mode output",
        &y,
        get(&io, "train.output"),
        1e-4,
    );
    let worst = check_grads(&io, &vars, &y, "train.");
    println!("cnclip rn50 train-mode gradients: worst rel diff {worst:.2e}");
    let data = vars.data().lock().unwrap();
    let mut stats = 0;
    let mut worst = 0f32;
    for (k, want) in io.iter() {
        if let Some(buf) = k.strip_prefix("train.after.") {
            let d = max_abs_diff(data[buf].as_tensor(), want);
            assert!(d < 1e-4, "running statistic {buf}: {d}");
            worst = worst.max(d);
            stats += 1;
        }
    }
    println!("cnclip rn50 running statistics after one step: max abs diff {worst:.2e}");
    // 3 stem BNs, 3 in each of the 5 blocks, 4 shortcut BNs: 22 BNs, 2 statistics each.
    assert_eq!(stats, 44);
}

/// The full-size RN50 tower asks for exactly cn_clip's `visual.*` tensors (less the BN
/// counters), with their shapes.
#[test]
fn cnclip_rn50_names_match_cn_clip_state_dict() {
    let s = std::fs::read_to_string(fixture(MANIFEST)).unwrap();
    let doc: serde_json::Value = serde_json::from_str(&s).unwrap();
    let cfg = ModifiedResNetConfig::rn50();
    assert_eq!(cfg.heads, 32);
    let ours = parameter_shapes(|vb| ModifiedResNet::new(&cfg, vb.pp("visual"))).unwrap();
    let mut want = std::collections::BTreeMap::new();
    for (k, v) in doc["tensors"].as_object().unwrap() {
        if !k.starts_with("visual.") || UNUSED_KEYS.iter().any(|u| k.contains(u)) {
            continue;
        }
        let shape: Vec<usize> = serde_json::from_value(v["shape"].clone()).unwrap();
        want.insert(k.clone(), shape);
    }
    assert_eq!(want.len(), 284);
    assert_eq!(ours, want);
}

#[test]
fn cnclip_rn50_rejects_wrong_inputs() {
    let (net, _) = tiny(false);
    let dev = test_device();
    let gray = Tensor::zeros((1, 1, 64, 64), DType::F32, &dev).unwrap();
    assert!(net.forward(&gray).is_err());
    let big = Tensor::zeros((1, 3, 96, 96), DType::F32, &dev).unwrap();
    let err = net.forward(&big).unwrap_err().to_string();
    assert!(err.contains("positional embedding"), "{err}");
    // A missing tensor is named.
    let mut m = TensorSource::open(&fixture(TINY), None)
        .unwrap()
        .load_all()
        .unwrap();
    m.remove("layer2.0.downsample.1.running_var");
    let m: HashMap<String, Tensor> = m.into_iter().collect();
    let loader = Loader::new(TensorSource::Map(m), "map");
    let err = ModifiedResNet::new(&tiny_config(), loader.var_builder(DType::F32, &dev))
        .map_err(|e| loader.error(e))
        .unwrap_err()
        .to_string();
    assert!(err.contains("layer2.0.downsample.1.running_var"), "{err}");
}
