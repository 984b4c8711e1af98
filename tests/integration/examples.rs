//! The example programs, run as a user would run them.

use std::path::PathBuf;
use std::process::Command;

use crate::common::{assert_close, get, load_st, shared, tiny_siglip_dir};

/// The compiled example next to this test binary (`cargo test` builds the examples).
fn example(name: &str) -> PathBuf {
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
        .args(["--image", shared("data/images/test.jpg").to_str().unwrap()])
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
    let img = shared("data/images/jordan.jpg");
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
