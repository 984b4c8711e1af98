//! The example programs, run as a user would run them.

use std::path::PathBuf;
use std::process::Command;

use crate::common::{assert_close, fixture, get, load_st, tiny_siglip_dir};

/// The compiled example next to this test binary (`cargo test` builds the examples).
pub(crate) fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap().join("examples");
    let p = dir.join(name);
    assert!(p.exists(), "example {name} not built at {}", p.display());
    p
}

#[test]
fn zero_shot_prints_a_ranked_table() {
    let dir = tiny_siglip_dir();
    let out = Command::new(example("zero_shot"))
        .args(["--model", dir.path().to_str().unwrap()])
        .args(["--image", fixture("data/images/test.jpg").to_str().unwrap()])
        .args(["--labels", "猫,狗，汽车"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for label in ["猫", "狗", "汽车", "sigmoid probability"] {
        assert!(stdout.contains(label), "missing {label} in\n{stdout}");
    }
    assert_eq!(
        stdout
            .lines()
            .filter(|l| l.trim_start().starts_with(char::is_numeric))
            .count(),
        3
    );
}

#[test]
fn embed_writes_what_the_api_computes() {
    let dir = tiny_siglip_dir();
    let out_dir = tempfile::tempdir().unwrap();
    let out_file = out_dir.path().join("e.safetensors");
    let img = fixture("data/images/jordan.jpg");
    let status = Command::new(example("embed"))
        .args(["--model", dir.path().to_str().unwrap()])
        .args(["--image", img.to_str().unwrap()])
        .args(["--text", "乔丹投篮", "--text", "a dog"])
        .args(["--out", out_file.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(status.success());
    let written = load_st(&out_file);
    let model = tuwen::load(dir.path().to_str().unwrap(), &tuwen::LoadOptions::default()).unwrap();
    let i = model
        .embed_images(&[tuwen::ImageInput::path(&img)])
        .unwrap();
    let t = model.embed_texts(&["乔丹投篮", "a dog"]).unwrap();
    assert_close("embed image_embeds", get(&written, "image_embeds"), &i, 0.0);
    assert_close("embed text_embeds", get(&written, "text_embeds"), &t, 0.0);
    assert_eq!(get(&written, "logits_per_image").dims(), &[1, 2]);
}

#[test]
fn examples_fail_cleanly_on_bad_input() {
    let dir = tiny_siglip_dir();
    let out = Command::new(example("zero_shot"))
        .args([
            "--model",
            dir.path().to_str().unwrap(),
            "--image",
            "/nonexistent.jpg",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("/nonexistent.jpg") && !stderr.contains("panicked"),
        "{stderr}"
    );
}

/// `train_brivl` trains the tiny BriVL from its checkpoint on a manifest, checkpoints,
/// resumes, and exports a model that `zero_shot` and `embed` load.
#[test]
fn train_brivl_trains_resumes_and_exports_a_loadable_model() {
    let dir = tempfile::tempdir().unwrap();
    let data = tuwen::train::synthetic::write_shapes_dataset(
        &dir.path().join("data"),
        &tuwen::train::synthetic::ShapesConfig::new(16, 3),
    )
    .unwrap();
    let out = dir.path().join("run");
    let toml = dir.path().join("run.toml");
    std::fs::write(
        &toml,
        format!(
            "checkpoint = {:?}\nmodel_config = {:?}\ntokenizer = {:?}\nbatch_size = 4\n\
             box_grid = 2\nsave_every = 2\nlr = 1e-4\n",
            fixture("original/brivl_tiny.pth"),
            fixture("original/brivl_tiny.json"),
            fixture("data/hfl-roberta-wwm-ext/tokenizer.json"),
        ),
    )
    .unwrap();
    let train = |steps: &str, extra: &[&str]| {
        let o = Command::new(example("train_brivl"))
            .args(["--config", toml.to_str().unwrap()])
            .args(["--train", data.manifest_path.to_str().unwrap()])
            .args(["--out", out.to_str().unwrap(), "--steps", steps])
            .args(extra)
            .output()
            .unwrap();
        let s = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(o.status.success(), "{s}");
        s
    };
    let s = train(
        "2",
        &[
            "--val",
            data.manifest_path.to_str().unwrap(),
            "--eval-every",
            "2",
        ],
    );
    assert!(
        s.contains("ran 2 steps") && s.contains("after 2 steps") && s.contains("\"r_mean\""),
        "{s}"
    );
    let s = train("4", &["--resume"]);
    assert!(
        s.contains("resumed from") && s.contains("ran 2 steps"),
        "{s}"
    );
    assert!(out.join("ckpt/step-000000004/meta.json").is_file());
    let log = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert!(log.contains("\"event\":\"resume\""), "{log}");

    // A bad setting is a clear error, not a panic.
    let o = Command::new(example("train_brivl"))
        .args(["--config", toml.to_str().unwrap()])
        .args(["--train", data.manifest_path.to_str().unwrap()])
        .args([
            "--out",
            out.to_str().unwrap(),
            "--queue-size",
            "10",
            "--resume",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("multiple of the global batch"),
        "{err}"
    );

    let model = out.join("model");
    let o = Command::new(example("zero_shot"))
        .args(["--model", model.to_str().unwrap()])
        .args(["--image", fixture("data/images/test.jpg").to_str().unwrap()])
        .args(["--labels", "红色的圆形,蓝色的三角形"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(stdout.contains("红色的圆形"), "{stdout}");
    let emb = dir.path().join("e.safetensors");
    let st = Command::new(example("embed"))
        .args(["--model", model.to_str().unwrap()])
        .args(["--image", fixture("data/images/test.jpg").to_str().unwrap()])
        .args(["--text", "红色的圆形"])
        .args(["--out", emb.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(st.success());
    assert!(!load_st(&emb).is_empty());
}

/// Runs an example; returns whether it succeeded, and its stdout and stderr together.
pub(crate) fn run_example(name: &str, args: &[&str]) -> (bool, String) {
    let o = Command::new(example(name)).args(args).output().unwrap();
    let s = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.success(), s)
}

/// Runs an example to success and returns its stdout and stderr together.
fn run_ok(name: &str, args: &[&str]) -> String {
    let (ok, s) = run_example(name, args);
    assert!(ok, "{name} {args:?}:\n{s}");
    s
}

/// Asserts two weight files hold the same tensors, bit for bit.
fn assert_same_weights(a: &std::path::Path, b: &std::path::Path) {
    let (a, b) = (load_st(a), load_st(b));
    assert_eq!(a.len(), b.len());
    for (name, t) in &a {
        assert_close(name, t, &b[name], 0.0);
    }
}

/// `train_siglip2` run for 2 steps and then resumed up to 4 ends with the same weights as
/// an uninterrupted 4-step run, and its model loads with the inference API.
#[test]
fn train_siglip2_resumes_exactly() {
    let model = tiny_siglip_dir();
    let dir = tempfile::tempdir().unwrap();
    let data = tuwen::train::synthetic::write_shapes_dataset(
        &dir.path().join("data"),
        &tuwen::train::synthetic::ShapesConfig::new(24, 5),
    )
    .unwrap();
    let train = |out: &std::path::Path, steps: &str, extra: &[&str]| {
        let mut args = vec![
            "--model",
            model.path().to_str().unwrap(),
            "--train",
            data.manifest_path.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--steps",
            steps,
            "--batch-size",
            "4",
            "--lr",
            "1e-3",
            "--warmup",
            "1",
            "--checkpoint-every",
            "2",
        ];
        args.extend_from_slice(extra);
        run_ok("train_siglip2", &args)
    };
    let (split, whole) = (dir.path().join("split"), dir.path().join("whole"));
    let s = train(&split, "2", &[]);
    assert!(!s.contains("resumed from"), "{s}");
    let s = train(&split, "4", &["--resume"]);
    assert!(
        s.contains("resumed from") && s.contains("2 steps run"),
        "{s}"
    );
    train(&whole, "4", &[]);
    assert_same_weights(
        &split.join("model/model.safetensors"),
        &whole.join("model/model.safetensors"),
    );
    let m = tuwen::load(
        split.join("model").to_str().unwrap(),
        &tuwen::LoadOptions::default(),
    )
    .unwrap();
    assert_eq!(m.embed_texts(&["红色的圆形"]).unwrap().dims()[0], 1);
}

/// `train_r2d2` with R2D2's training augmentation (the default) resumes exactly: 2 steps,
/// then resumed up to 4, equal an uninterrupted 4-step run; a run without augmentation
/// trains on different pixels.
#[test]
fn train_r2d2_augments_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let data = tuwen::train::synthetic::write_shapes_dataset(
        &dir.path().join("data"),
        &tuwen::train::synthetic::ShapesConfig::new(24, 6),
    )
    .unwrap();
    let pth = fixture("original/r2d2_tiny.pth");
    let tok = fixture("data/hfl-roberta-wwm-ext/tokenizer.json");
    let train = |out: &std::path::Path, steps: &str, extra: &[&str]| {
        let mut args = vec![
            "--init",
            pth.to_str().unwrap(),
            "--tokenizer",
            tok.to_str().unwrap(),
            "--manifest",
            data.manifest_path.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--steps",
            steps,
            "--batch-size",
            "4",
            "--lr",
            "1e-3",
            "--warmup",
            "1",
            "--checkpoint-every",
            "2",
        ];
        args.extend_from_slice(extra);
        run_ok("train_r2d2", &args)
    };
    let (split, whole, plain) = (
        dir.path().join("split"),
        dir.path().join("whole"),
        dir.path().join("plain"),
    );
    train(&split, "2", &[]);
    let s = train(&split, "4", &["--resume"]);
    assert!(
        s.contains("resumed from") && s.contains("2 steps run"),
        "{s}"
    );
    train(&whole, "4", &[]);
    assert_same_weights(
        &split.join("model.safetensors"),
        &whole.join("model.safetensors"),
    );
    train(&plain, "4", &["--no-augment"]);
    let (a, p) = (
        load_st(&whole.join("model.safetensors")),
        load_st(&plain.join("model.safetensors")),
    );
    let differs = a.iter().any(|(name, t)| {
        let d = (t - &p[name]).unwrap().abs().unwrap().max_all().unwrap();
        d.to_scalar::<f32>().unwrap() > 0.0
    });
    assert!(differs, "augmented and plain runs trained identically");
}
