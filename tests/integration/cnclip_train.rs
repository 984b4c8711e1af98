//! Chinese-CLIP training: one step's InfoNCE loss and the gradient of every parameter
//! against HF `ChineseCLIPModel(return_loss=True)` (`tests/fixtures/gen_cnclip.py`),
//! gradient coverage, the clamped temperature and image-tower locking.

use candle_core::{DType, Device, Tensor};
use tuwen::train::cnclip::{load_trainable, CnClipInputs, CnClipLossConfig, CnClipObjective};
use tuwen::train::{grad_coverage, Objective, StepCtx, Trainer, TrainerConfig};

use crate::common::{fixture, get, load_st, named_vars, rel_diff, rel_diff_floor};

#[test]
fn cnclip_loss_and_gradients_match_hf() {
    let r = load_st(&fixture("cnclip/vit_tiny_train_ref.safetensors"));
    let m = load_trainable(&fixture("cnclip/vit_tiny"), DType::F32, &Device::Cpu).unwrap();
    let obj = CnClipObjective::new(
        m.model.clone(),
        Some(m.logit_scale_var().unwrap()),
        CnClipLossConfig::default(),
    )
    .unwrap();
    let ids = get(&r, "input_ids").to_dtype(DType::U32).unwrap();
    let mask = get(&r, "attention_mask").to_dtype(DType::F32).unwrap();
    let x = CnClipInputs {
        pixel_values: get(&r, "pixel_values"),
        input_ids: &ids,
        attention_mask: &mask,
    };
    let loss = obj.loss(&x, &StepCtx::single(0, 0)).unwrap();
    let ours = loss.total.to_scalar::<f32>().unwrap();
    let theirs = get(&r, "loss").to_vec1::<f32>().unwrap()[0];
    println!("loss: ours {ours}, HF {theirs}");
    assert!((ours - theirs).abs() < 1e-5, "loss {ours} vs {theirs}");

    let grads = loss.total.backward().unwrap();
    let vars = named_vars(&m.vars);
    let mut worst = (0f32, String::new());
    for (name, var) in &vars {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let d = if name == "text_model.embeddings.word_embeddings.weight" {
            let rows = get(&r, "grad_row_ids").to_dtype(DType::U32).unwrap();
            rel_diff_floor(
                &g.index_select(&rows, 0).unwrap(),
                get(&r, &format!("grad_rows.{name}")),
                1e-3,
            )
        } else {
            let want = r
                .get(&format!("grad.{name}"))
                .unwrap_or_else(|| panic!("HF has no gradient for {name}"));
            rel_diff_floor(g, want, 1e-3)
        };
        if d > worst.0 {
            worst = (d, name.clone());
        }
        assert!(d < 1e-4, "gradient of {name}: {d}");
    }
    println!(
        "gradients: worst relative difference {:.2e} ({})",
        worst.0, worst.1
    );
    // Every trainable parameter receives a gradient.
    let cov = grad_coverage(&vars, &grads).unwrap();
    println!("coverage: {cov}");
    cov.ensure_complete().unwrap();
}

#[test]
fn cnclip_logit_scale_is_clamped_at_ln_100() {
    let m = load_trainable(&fixture("cnclip/vit_tiny"), DType::F32, &Device::Cpu).unwrap();
    let var = m.logit_scale_var().unwrap();
    var.set(&Tensor::new(7.0f32, &Device::Cpu).unwrap())
        .unwrap();
    let obj = CnClipObjective::new(
        m.model.clone(),
        Some(var.clone()),
        CnClipLossConfig::default(),
    )
    .unwrap();
    obj.clamp_logit_scale().unwrap();
    let v = var.as_tensor().to_scalar::<f32>().unwrap();
    assert!((v as f64 - 100f64.ln()).abs() < 1e-6, "{v}");
}

/// Locking the image tower freezes it (all of it, or all but its last N layers) and
/// nothing else; a step then leaves the frozen weights unchanged.
#[test]
fn cnclip_image_tower_locking() {
    let r = load_st(&fixture("cnclip/vit_tiny_train_ref.safetensors"));
    for (unlocked, trained_vision) in [(0usize, false), (1, true)] {
        let m = load_trainable(&fixture("cnclip/vit_tiny"), DType::F32, &Device::Cpu).unwrap();
        let cfg = CnClipLossConfig {
            lock_image: true,
            unlocked_layers: unlocked,
        };
        let obj =
            CnClipObjective::new(m.model.clone(), Some(m.logit_scale_var().unwrap()), cfg).unwrap();
        let tcfg = TrainerConfig {
            groups: obj.param_groups(),
            ..Default::default()
        };
        let mut trainer = Trainer::from_varmap(&m.vars, tcfg).unwrap();
        let before: Vec<(String, Tensor)> = named_vars(&m.vars)
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().copy().unwrap()))
            .collect();
        let ids = get(&r, "input_ids").to_dtype(DType::U32).unwrap();
        let mask = get(&r, "attention_mask").to_dtype(DType::F32).unwrap();
        trainer
            .step(&[()], |_, ctx| {
                let x = CnClipInputs {
                    pixel_values: get(&r, "pixel_values"),
                    input_ids: &ids,
                    attention_mask: &mask,
                };
                Ok(obj.loss(&x, ctx)?.total)
            })
            .unwrap();
        let after = named_vars(&m.vars);
        for ((name, old), (_, new)) in before.iter().zip(&after) {
            let changed = rel_diff(new.as_tensor(), old) > 0.0;
            let frozen = name.starts_with("vision_model.embeddings")
                || name.starts_with("vision_model.pre_layrnorm")
                || name.starts_with("vision_model.encoder.layers.0.")
                || (!trained_vision
                    && (name.starts_with("vision_model.encoder.layers.1.")
                        || name.starts_with("vision_model.post_layernorm")
                        || name.starts_with("visual_projection")));
            assert_eq!(
                changed, !frozen,
                "unlocked {unlocked}: {name} changed {changed}"
            );
        }
    }
    // More unlocked layers than the tower has is an error.
    let m = load_trainable(&fixture("cnclip/vit_tiny"), DType::F32, &Device::Cpu).unwrap();
    let bad = CnClipLossConfig {
        lock_image: true,
        unlocked_layers: 3,
    };
    assert!(CnClipObjective::new(m.model.clone(), None, bad).is_err());
}

/// `train_cnclip` trains, resumes exactly, and exports a folder the inference API loads.
#[test]
fn train_cnclip_trains_resumes_and_exports() {
    use std::process::Command;
    let dir = tempfile::tempdir().unwrap();
    let data = tuwen::train::synthetic::write_shapes_dataset(
        &dir.path().join("data"),
        &tuwen::train::synthetic::ShapesConfig::new(16, 4),
    )
    .unwrap();
    let model = fixture("cnclip/vit_tiny_bin");
    let run = |out: &std::path::Path, steps: &str, extra: &[&str]| {
        let o = Command::new(crate::examples::example("train_cnclip"))
            .args(["--model", model.to_str().unwrap()])
            .args(["--train", data.manifest_path.to_str().unwrap()])
            .args(["--out", out.to_str().unwrap(), "--steps", steps])
            .args(["--batch-size", "4", "--lr", "1e-3", "--warmup", "1"])
            .args([
                "--checkpoint-every",
                "2",
                "--lock-image",
                "--unlocked-layers",
                "1",
            ])
            .args(extra)
            .output()
            .unwrap();
        let s = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        (o.status.success(), s)
    };
    let (split, whole) = (dir.path().join("split"), dir.path().join("whole"));
    let (ok, s) = run(&split, "2", &[]);
    assert!(ok, "{s}");
    let (ok, s) = run(&split, "4", &["--resume"]);
    assert!(ok && s.contains("resumed from"), "{s}");
    let (ok, s) = run(&whole, "4", &[]);
    assert!(ok, "{s}");
    let (a, b) = (
        load_st(&split.join("model/model.safetensors")),
        load_st(&whole.join("model/model.safetensors")),
    );
    assert_eq!(a.len(), b.len());
    for (k, t) in &a {
        assert_eq!(rel_diff(t, &b[k]), 0.0, "{k} differs after resume");
    }
    // The image tower's first layer was locked: unchanged from the start.
    let start =
        tuwen::checkpoint::TensorSource::open(&model.join("pytorch_model.bin"), None).unwrap();
    let k = "vision_model.encoder.layers.0.mlp.fc1.weight";
    assert_eq!(rel_diff(&a[k], &start.load(k).unwrap().unwrap()), 0.0);
    let m = tuwen::load(
        split.join("model").to_str().unwrap(),
        &tuwen::LoadOptions::default(),
    )
    .unwrap();
    assert_eq!(m.embed_texts(&["红色的圆形"]).unwrap().dims(), &[1, 16]);
    assert!(!split.join("model/pytorch_model.bin").exists());
}
