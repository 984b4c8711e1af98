//! Bad inputs and careless use: every one gives a typed error that names the problem, never
//! a panic, an abort, a hang or a wrong result with exit code 0. The `.pth` reader's
//! hostile files are in `pth_reader.rs`, the fuzzers in `fuzz.rs`.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use tuwen::preprocess::{ImageInput, NaFlexProcessor};
use tuwen::{Error, LoadOptions};

use crate::common::{fixture, load_st};
use crate::eval::family_dir;
use crate::examples::run_example as run;

fn no_tune() -> LoadOptions {
    LoadOptions {
        tune_allocator: false,
        ..LoadOptions::default()
    }
}

fn err_text<T>(r: tuwen::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

fn small_jpeg() -> Vec<u8> {
    std::fs::read(fixture("data/images/baike_14361859_0.jpg")).unwrap()
}

// ---- 1. sizes nobody checked --------------------------------------------------------------

#[test]
fn naflex_max_num_patches_out_of_range_is_a_config_error() {
    for bad in ["0", "1000000000", "-3", "\"many\""] {
        let dir = family_dir("siglip2-naflex");
        std::fs::write(
            dir.path().join("preprocessor_config.json"),
            format!("{{\"max_num_patches\": {bad}, \"patch_size\": 16}}"),
        )
        .unwrap();
        let e = err_text(tuwen::load(dir.path().to_str().unwrap(), &no_tune()));
        assert!(e.contains("max_num_patches"), "{bad}: {e}");
    }
    // The processor itself refuses too, without touching memory.
    let img = ImageInput::bytes(small_jpeg());
    for m in [0, tuwen::preprocess::MAX_NUM_PATCHES + 1] {
        let e = NaFlexProcessor::new(16, m)
            .process_batch(std::slice::from_ref(&img), &Device::Cpu)
            .unwrap_err();
        assert!(matches!(e, Error::Config(_)), "{e}");
    }
}

#[test]
fn a_huge_box_grid_is_refused_without_allocating() {
    let dir = family_dir("brivl");
    for grid in [4294967296usize, usize::MAX, 1 << 33] {
        let opts = LoadOptions {
            box_grid: Some(grid),
            ..no_tune()
        };
        let m = tuwen::load(dir.path().to_str().unwrap(), &opts).unwrap();
        let t = Instant::now();
        let e = m
            .embed_images(&[ImageInput::bytes(small_jpeg())])
            .unwrap_err();
        assert!(matches!(e, Error::Config(_)), "{e}");
        assert!(e.to_string().contains("box grid"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5));
    }
    // The same through the command line.
    let img = fixture("data/images/test.jpg");
    let (ok, s) = run(
        "embed",
        &[
            "--model",
            dir.path().to_str().unwrap(),
            "--image",
            img.to_str().unwrap(),
            "--text",
            "红色",
            "--grid",
            "4294967296",
            "--out",
            dir.path().join("e.safetensors").to_str().unwrap(),
        ],
    );
    assert!(!ok && s.contains("box grid"), "{s}");
}

// ---- 3. wrong results with exit code 0 ----------------------------------------------------

/// A JPEG cut in half is an error, never grey rows; other formats too.
#[test]
fn truncated_images_are_errors() {
    let jpeg = small_jpeg();
    let full = ImageInput::bytes(jpeg.clone()).decode_rgb().unwrap();
    // The strict decoder gives the same pixels as the `image` crate on a whole file.
    let reference = image::load_from_memory(&jpeg).unwrap().to_rgb8();
    assert_eq!(full.as_raw(), reference.as_raw());
    for cut in [jpeg.len() / 2, jpeg.len() * 9 / 10, jpeg.len() - 100] {
        let e = ImageInput::bytes(jpeg[..cut].to_vec())
            .decode_rgb()
            .unwrap_err();
        assert!(e.to_string().contains("truncated"), "cut at {cut}: {e}");
    }
    for p in ["data/images/test.jpg", "data/images/jordan.jpg"] {
        let bytes = std::fs::read(fixture(p)).unwrap();
        let whole = ImageInput::bytes(bytes.clone()).decode_rgb().unwrap();
        assert_eq!(
            whole.as_raw(),
            image::load_from_memory(&bytes).unwrap().to_rgb8().as_raw(),
            "{p}"
        );
        assert!(ImageInput::bytes(bytes[..bytes.len() / 2].to_vec())
            .decode_rgb()
            .is_err());
    }
    let png = std::fs::read(fixture("r2d2/resize_src.png")).unwrap();
    assert!(ImageInput::bytes(png[..png.len() / 2].to_vec())
        .decode_rgb()
        .is_err());
}

/// In training a truncated image is a skipped sample, named in the log and on stderr.
#[test]
fn training_names_the_samples_it_skips() {
    let dir = tempfile::tempdir().unwrap();
    let data = tuwen::train::synthetic::write_shapes_dataset(
        &dir.path().join("data"),
        &tuwen::train::synthetic::ShapesConfig::new(8, 3),
    )
    .unwrap();
    // Cut one image in half (re-encoded as JPEG under its own name first).
    let victim = data.manifest.samples[2].image.clone();
    let img = image::open(&victim).unwrap();
    let mut jpeg = std::io::Cursor::new(Vec::new());
    img.write_to(&mut jpeg, image::ImageFormat::Jpeg).unwrap();
    let jpeg = jpeg.into_inner();
    let cut = victim.with_extension("cut.jpg");
    std::fs::write(&cut, &jpeg[..jpeg.len() / 2]).unwrap();
    let text = std::fs::read_to_string(&data.manifest_path)
        .unwrap()
        .replace(
            victim.file_name().unwrap().to_str().unwrap(),
            cut.file_name().unwrap().to_str().unwrap(),
        );
    std::fs::write(&data.manifest_path, text).unwrap();
    let model = family_dir("siglip");
    let out = dir.path().join("run");
    let (ok, s) = run(
        "train_siglip2",
        &[
            "--model",
            model.path().to_str().unwrap(),
            "--train",
            data.manifest_path.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--warmup",
            "1",
        ],
    );
    assert!(ok, "{s}");
    let name = cut.display().to_string();
    assert!(s.contains("skipped sample") && s.contains(&name), "{s}");
    let log = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let event = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["event"] == "skipped_sample")
        .unwrap_or_else(|| panic!("no skipped_sample event in\n{log}"));
    assert_eq!(event["image"], name.as_str());
    assert!(
        event["reason"].as_str().unwrap().contains("truncated"),
        "{event}"
    );
}

/// `--lr` NaN, inf, 1e30, 0 and negative values are refused by every trainer before a
/// step runs.
#[test]
fn every_trainer_refuses_bad_learning_rates() {
    let dir = tempfile::tempdir().unwrap();
    let data = tuwen::train::synthetic::write_shapes_dataset(
        &dir.path().join("data"),
        &tuwen::train::synthetic::ShapesConfig::new(8, 3),
    )
    .unwrap();
    let manifest = data.manifest_path.to_str().unwrap().to_string();
    let siglip = family_dir("siglip");
    let pth = fixture("original/r2d2_tiny.pth");
    let tok = fixture("data/hfl-roberta-wwm-ext/tokenizer.json");
    let brivl_pth = fixture("original/brivl_tiny.pth");
    let brivl_cfg = fixture("original/brivl_tiny.json");
    for (k, lr) in ["NaN", "inf", "1e30", "-1e-4", "0"].iter().enumerate() {
        let out = dir.path().join(format!("run{k}"));
        let out = out.to_str().unwrap();
        let runs: Vec<(&str, Vec<&str>)> = vec![
            (
                "train_siglip2",
                vec![
                    "--model",
                    siglip.path().to_str().unwrap(),
                    "--train",
                    &manifest,
                ],
            ),
            (
                "train_r2d2",
                vec![
                    "--init",
                    pth.to_str().unwrap(),
                    "--tokenizer",
                    tok.to_str().unwrap(),
                    "--manifest",
                    &manifest,
                ],
            ),
            (
                "train_brivl",
                vec![
                    "--checkpoint",
                    brivl_pth.to_str().unwrap(),
                    "--model-config",
                    brivl_cfg.to_str().unwrap(),
                    "--tokenizer",
                    tok.to_str().unwrap(),
                    "--train",
                    &manifest,
                    "--box-grid",
                    "2",
                ],
            ),
        ];
        for (name, mut args) in runs {
            let lr_arg = format!("--lr={lr}");
            args.extend(["--out", out, "--steps", "2", "--batch-size", "4", &lr_arg]);
            let (ok, s) = run(name, &args);
            assert!(!ok, "{name} accepted --lr {lr}:\n{s}");
            assert!(s.contains("lr"), "{name} --lr {lr}: {s}");
            assert!(
                !Path::new(out).join("ckpt").join("step-000000002").exists(),
                "{name} trained with --lr {lr}"
            );
        }
    }
    // Other numeric options of the trainers: NaN must not silently turn clipping or
    // distillation off.
    let out = dir.path().join("other");
    for (flag, v) in [
        ("--max-grad-norm", "NaN"),
        ("--distill-weight", "-1"),
        ("--min-lr-ratio", "NaN"),
        ("--weight-decay", "inf"),
        ("--beta2", "1.5"),
    ] {
        let arg = format!("{flag}={v}");
        let (ok, s) = run(
            "train_siglip2",
            &[
                "--model",
                siglip.path().to_str().unwrap(),
                "--train",
                &manifest,
                "--out",
                out.to_str().unwrap(),
                "--steps",
                "2",
                "--warmup",
                "1",
                &arg,
            ],
        );
        let bare = flag.trim_start_matches("--");
        assert!(!ok && (s.contains(flag) || s.contains(bare)), "{arg}: {s}");
    }
}

/// NaN weights, or a negative `layer_norm_eps`, never print NaN probabilities.
#[test]
fn non_finite_weights_and_bad_eps_are_errors() {
    // NaN in one weight: the embedding is an error naming the input.
    let dir = family_dir("siglip");
    let st = dir.path().join("model.safetensors");
    let mut tensors: std::collections::BTreeMap<String, Tensor> =
        load_st(&st).into_iter().collect();
    let key = tensors
        .keys()
        .find(|k| k.contains("vision_model") && k.ends_with("fc1.weight"))
        .unwrap()
        .clone();
    let nan = (tensors[&key].ones_like().unwrap() * f64::NAN).unwrap();
    tensors.insert(key, nan);
    tuwen::checkpoint::save_safetensors(&tensors, None, &st).unwrap();
    let m = tuwen::load(dir.path().to_str().unwrap(), &no_tune()).unwrap();
    let img = fixture("data/images/test.jpg");
    let e = m.embed_images(&[ImageInput::path(&img)]).unwrap_err();
    assert!(matches!(e, Error::NonFinite(_)), "{e}");
    assert!(e.to_string().contains("test.jpg"), "{e}");
    let (ok, s) = run(
        "zero_shot",
        &[
            "--model",
            dir.path().to_str().unwrap(),
            "--image",
            img.to_str().unwrap(),
            "--labels",
            "猫,狗",
        ],
    );
    assert!(
        !ok && s.contains("not finite") && !s.contains("NaN\n"),
        "{s}"
    );

    // layer_norm_eps -1 (and NaN-producing 0) are refused at load time.
    for eps in ["-1", "0"] {
        let dir = family_dir("siglip");
        let cfg = dir.path().join("config.json");
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
        v["vision_config"]["layer_norm_eps"] = serde_json::json!(eps.parse::<f64>().unwrap());
        std::fs::write(&cfg, v.to_string()).unwrap();
        let e = err_text(tuwen::load(dir.path().to_str().unwrap(), &no_tune()));
        assert!(e.contains("epsilon"), "{eps}: {e}");
    }
}

#[test]
fn box_json_with_non_numbers_or_zero_area_is_refused() {
    use tuwen::preprocess::boxes::{boxes_from_json, prepare_boxes};
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("b.json");
    for bad in [
        r#"[[0, "a", 0, 10, 10]]"#,
        r#"[[0, "a", 10, 10]]"#,
        r#"[[0, null, 10, 10]]"#,
        r#"[[0, 1, 10]]"#,
        r#"[[0, 1, 10, 10, 3]]"#,
        r#"{"bbox": [[0, [1], 10, 10]]}"#,
    ] {
        std::fs::write(&p, bad).unwrap();
        let e = boxes_from_json(&p).unwrap_err();
        assert!(e.to_string().contains("not four numbers"), "{bad}: {e}");
    }
    std::fs::write(&p, "[[1, 2, 30, 40]]").unwrap();
    assert_eq!(boxes_from_json(&p).unwrap(), vec![[1.0, 2.0, 30.0, 40.0]]);
    for zero in [[5.0, 5.0, 5.0, 20.0], [1.0, 7.0, 30.0, 7.0]] {
        let e = prepare_boxes(Some(&[zero]), 100, 80, 64, 37, 6, "x").unwrap_err();
        assert!(e.to_string().contains("zero-area"), "{e}");
    }
}

/// A config with fewer layers than the checkpoint loads, but the unused tensors are a
/// warning on the command line and an error with `--strict` / `LoadOptions::strict`.
#[test]
fn unused_checkpoint_tensors_are_reported_and_strict_refuses_them() {
    let dir = family_dir("siglip");
    let cfg = dir.path().join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    v["text_config"]["num_hidden_layers"] = serde_json::json!(0);
    std::fs::write(&cfg, v.to_string()).unwrap();
    let spec = dir.path().to_str().unwrap();
    let m = tuwen::load(spec, &no_tune()).unwrap();
    let w = m.load_report().warning().expect("a warning");
    assert!(w.contains("text_model.encoder.layers.0"), "{w}");
    let strict = LoadOptions {
        strict: true,
        ..no_tune()
    };
    let e = err_text(tuwen::load(spec, &strict));
    assert!(
        e.contains("strict") && e.contains("text_model.encoder.layers.0"),
        "{e}"
    );
    let img = fixture("data/images/test.jpg");
    let args = [
        "--model",
        spec,
        "--image",
        img.to_str().unwrap(),
        "--labels",
        "猫,狗",
    ];
    let (ok, s) = run("zero_shot", &args);
    assert!(
        ok && s.contains("warning:") && s.contains("not used"),
        "{s}"
    );
    let (ok, s) = run("zero_shot", &[&args[..], &["--strict"]].concat());
    assert!(!ok && s.contains("strict"), "{s}");
    // The untouched model has no warning.
    let clean = family_dir("siglip");
    let m = tuwen::load(clean.path().to_str().unwrap(), &strict).unwrap();
    assert!(m.load_report().warning().is_none());
}

// ---- 4. runs that hurt each other ---------------------------------------------------------

fn siglip_train_args<'a>(
    model: &'a str,
    manifest: &'a str,
    out: &'a str,
    steps: &'a str,
) -> Vec<&'a str> {
    vec![
        "--model",
        model,
        "--train",
        manifest,
        "--out",
        out,
        "--steps",
        steps,
        "--batch-size",
        "4",
        "--warmup",
        "1",
        "--checkpoint-every",
        "1",
        "--keep",
        "1",
    ]
}

/// A second run on a locked folder stops at once and names the holder; an existing run
/// needs --resume or --overwrite; temporaries of live processes are never removed.
#[test]
fn run_folders_are_locked_and_never_silently_restarted() {
    let dir = tempfile::tempdir().unwrap();
    let data = tuwen::train::synthetic::write_shapes_dataset(
        &dir.path().join("data"),
        &tuwen::train::synthetic::ShapesConfig::new(8, 3),
    )
    .unwrap();
    let model = family_dir("siglip");
    let (model_s, manifest) = (
        model.path().to_str().unwrap().to_string(),
        data.manifest_path.to_str().unwrap().to_string(),
    );
    let out = dir.path().join("run");
    let out_s = out.to_str().unwrap().to_string();

    // Held by this process: the example refuses and names our pid.
    {
        let _lock = tuwen::train::RunLock::acquire(&out).unwrap();
        let (ok, s) = run(
            "train_siglip2",
            &siglip_train_args(&model_s, &manifest, &out_s, "2"),
        );
        assert!(!ok, "{s}");
        assert!(
            s.contains("in use by another run") && s.contains(&std::process::id().to_string()),
            "{s}"
        );
        assert!(!out.join("ckpt").join("step-000000001").exists());
    }
    let (ok, s) = run(
        "train_siglip2",
        &siglip_train_args(&model_s, &manifest, &out_s, "2"),
    );
    assert!(ok, "{s}");

    // A temporary checkpoint of a live process survives another run's start; one of a
    // dead process is cleaned.
    let mut live = Command::new("sleep").arg("60").spawn().unwrap();
    let mut dead = Command::new("true").spawn().unwrap();
    let dead_pid = dead.id();
    dead.wait().unwrap();
    let ckpt = out.join("ckpt");
    let live_tmp = ckpt.join(format!(".tmp-step-000000009-{}-1", live.id()));
    let dead_tmp = ckpt.join(format!(".tmp-step-000000009-{dead_pid}-1"));
    let half_pruned = ckpt.join(format!(".pruned-step-000000000-{dead_pid}-0"));
    for d in [&live_tmp, &dead_tmp, &half_pruned] {
        std::fs::create_dir_all(d).unwrap();
        std::fs::write(d.join("model.safetensors"), b"partial").unwrap();
    }

    // Without --resume or --overwrite an existing run is refused, and nothing changes.
    let (ok, s) = run(
        "train_siglip2",
        &siglip_train_args(&model_s, &manifest, &out_s, "3"),
    );
    assert!(
        !ok && s.contains("--resume") && s.contains("--overwrite"),
        "{s}"
    );
    assert!(out.join("ckpt/step-000000002").exists());
    assert!(live_tmp.exists(), "a live process's temporary was removed");

    // --resume continues; the dead temporaries are gone, the live one stays.
    let mut args = siglip_train_args(&model_s, &manifest, &out_s, "3");
    args.push("--resume");
    let (ok, s) = run("train_siglip2", &args);
    assert!(ok && s.contains("resumed from"), "{s}");
    assert!(live_tmp.exists());
    assert!(!dead_tmp.exists() && !half_pruned.exists());
    // Pruning (keep 1) left exactly one complete step directory and no leftovers.
    let names: Vec<String> = std::fs::read_dir(&ckpt)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("step-") || n.starts_with(".pruned"))
        .collect();
    assert_eq!(names, vec!["step-000000003".to_string()], "{names:?}");

    // --overwrite starts over at step 0.
    let mut args = siglip_train_args(&model_s, &manifest, &out_s, "1");
    args.push("--overwrite");
    let (ok, s) = run("train_siglip2", &args);
    assert!(
        ok && !s.contains("resumed from") && s.contains("deleted"),
        "{s}"
    );
    assert!(out.join("ckpt/step-000000001").exists());
    assert!(!out.join("ckpt/step-000000003").exists());
    live.kill().unwrap();
    let _ = live.wait();
}

#[test]
fn train_brivl_refuses_an_existing_run_without_resume() {
    let dir = tempfile::tempdir().unwrap();
    let data = tuwen::train::synthetic::write_shapes_dataset(
        &dir.path().join("data"),
        &tuwen::train::synthetic::ShapesConfig::new(8, 3),
    )
    .unwrap();
    let out = dir.path().join("run");
    let tok = fixture("data/hfl-roberta-wwm-ext/tokenizer.json");
    let (pth, cfg) = (
        fixture("original/brivl_tiny.pth"),
        fixture("original/brivl_tiny.json"),
    );
    let brivl = |extra: &[&str]| {
        let args = [
            "--checkpoint",
            pth.to_str().unwrap(),
            "--model-config",
            cfg.to_str().unwrap(),
            "--tokenizer",
            tok.to_str().unwrap(),
            "--train",
            data.manifest_path.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--steps",
            "1",
            "--batch-size",
            "4",
            "--box-grid",
            "2",
            "--save-every",
            "1",
        ];
        run("train_brivl", &[&args[..], extra].concat())
    };
    let (ok, s) = brivl(&[]);
    assert!(ok, "{s}");
    let model = out.join("model/model.safetensors");
    let written = std::fs::metadata(&model).unwrap().modified().unwrap();
    // Pointed at the finished run again without --resume: refused before anything is
    // written; the checkpoint and the exported model are untouched.
    let (ok, s) = brivl(&[]);
    assert!(
        !ok && s.contains("--resume") && s.contains("--overwrite"),
        "{s}"
    );
    assert!(out.join("ckpt/step-000000001").exists());
    assert_eq!(
        std::fs::metadata(&model).unwrap().modified().unwrap(),
        written
    );
    let (ok, s) = brivl(&["--resume", "--overwrite"]);
    assert!(!ok, "{s}");
}

// ---- 5. unbounded memory and hangs --------------------------------------------------------

#[cfg(unix)]
#[test]
fn non_regular_files_and_oversized_files_are_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo.jpg");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let t = Instant::now();
    for p in [
        fifo.as_path(),
        Path::new("/dev/zero"),
        Path::new("/dev/urandom"),
        dir.path(),
    ] {
        let e = ImageInput::path(p).decode_rgb().unwrap_err();
        assert!(
            e.to_string().contains("not a regular file"),
            "{}: {e}",
            p.display()
        );
    }
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    // A sparse file beyond the byte cap is refused before reading.
    let big = dir.path().join("big.jpg");
    let f = std::fs::File::create(&big).unwrap();
    f.set_len(tuwen::preprocess::image::MAX_IMAGE_BYTES + 1)
        .unwrap();
    let e = ImageInput::path(&big).decode_rgb().unwrap_err();
    assert!(e.to_string().contains("limit"), "{e}");
    // The same through a model: the embedding call fails, naming the file.
    let model = family_dir("siglip");
    let m = tuwen::load(model.path().to_str().unwrap(), &no_tune()).unwrap();
    let e = m.embed_images(&[ImageInput::path(&fifo)]).unwrap_err();
    assert!(e.to_string().contains("fifo.jpg"), "{e}");
}

/// `embed_images` / `embed_texts` encode in chunks of `LoadOptions::max_batch`: the result
/// equals one input at a time, for any number of inputs.
#[test]
fn embeddings_are_computed_in_bounded_chunks() {
    for family in ["siglip", "brivl", "r2d2"] {
        let dir = family_dir(family);
        let opts = LoadOptions {
            max_batch: 3,
            box_grid: Some(2),
            ..no_tune()
        };
        let m = tuwen::load(dir.path().to_str().unwrap(), &opts).unwrap();
        assert_eq!(m.max_batch(), 3);
        let texts: Vec<String> = (0..10).map(|i| format!("第{i}张图片")).collect();
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let all = m.embed_texts(&refs).unwrap();
        assert_eq!(all.dims()[0], 10);
        for (i, t) in refs.iter().enumerate() {
            let one = m.embed_texts(&[t]).unwrap();
            let d = crate::common::max_abs_diff(&all.get(i).unwrap(), &one.get(0).unwrap());
            assert!(d < 1e-5, "{family} text {i}: {d}");
        }
        let imgs: Vec<ImageInput> = ["test.jpg", "jordan.jpg", "baike_14361859_0.jpg", "test.jpg"]
            .iter()
            .map(|f| ImageInput::path(fixture(&format!("data/images/{f}"))))
            .collect();
        let all = m.embed_images(&imgs).unwrap();
        assert_eq!(all.dims()[0], 4);
        let one = m.embed_images(&imgs[3..]).unwrap();
        let d = crate::common::max_abs_diff(&all.get(3).unwrap(), &one.get(0).unwrap());
        assert!(d < 1e-5, "{family} image chunk: {d}");
        // Empty input is still the error it was.
        assert!(m.embed_texts(&[]).is_err());
    }
}

/// The pixels in flight are bounded: a permit for the whole budget waits until the others
/// are given back.
#[test]
fn pixels_in_flight_are_bounded() {
    use tuwen::preprocess::image::{PixelPermit, MAX_PIXELS_IN_FLIGHT};
    let big = PixelPermit::acquire(MAX_PIXELS_IN_FLIGHT);
    assert_eq!(big.pixels(), MAX_PIXELS_IN_FLIGHT);
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let p = PixelPermit::acquire(MAX_PIXELS_IN_FLIGHT / 2);
        tx.send(Instant::now()).unwrap();
        drop(p);
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        rx.try_recv().is_err(),
        "a permit was granted over the budget"
    );
    let released = Instant::now();
    drop(big);
    let granted = rx.recv_timeout(Duration::from_secs(30)).unwrap();
    assert!(granted >= released);
    waiter.join().unwrap();
}

// ---- 6. messages that mislead -------------------------------------------------------------

#[test]
fn load_errors_say_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    // A truncated .pth: the reader's own error, not "neither a preset nor a directory".
    let pth = std::fs::read(fixture("original/r2d2_tiny.pth")).unwrap();
    let cut = dir.path().join("cut.pth");
    std::fs::write(&cut, &pth[..pth.len() / 2]).unwrap();
    let e = err_text(tuwen::load(cut.to_str().unwrap(), &no_tune()));
    assert!(
        e.contains("cannot read checkpoint") && e.contains("cut.pth"),
        "{e}"
    );
    assert!(!e.contains("neither a preset"), "{e}");
    // A missing path: "no such file", not "unknown model preset".
    for missing in [
        "/nonexistent/model.pth",
        "./no-such-dir",
        "weights.safetensors",
    ] {
        let e = err_text(tuwen::load(missing, &no_tune()));
        assert!(e.contains("no such file"), "{missing}: {e}");
    }
    // An unknown preset name still lists the presets.
    let e = err_text(tuwen::load("siglip9-base", &no_tune()));
    assert!(
        e.contains("unknown model preset") && e.contains("siglip2-base-patch16-224"),
        "{e}"
    );
    // A token id beyond the vocabulary names itself.
    let model = family_dir("siglip");
    let m = tuwen::models::siglip2::SiglipEncoder::from_dir(model.path(), &no_tune()).unwrap();
    let ids = Tensor::new(&[[5u32, 5000]], &Device::Cpu).unwrap();
    let e = m.text_embeds_from_ids(&ids).unwrap_err().to_string();
    assert!(
        e.contains("token id 5000") && e.contains("vocabulary"),
        "{e}"
    );
}

/// BriVL in bf16 on the CPU either works or says which dtypes work where.
#[test]
fn unsupported_dtypes_are_named_at_load_time() {
    let dir = family_dir("brivl");
    let opts = LoadOptions {
        dtype: DType::BF16,
        box_grid: Some(2),
        ..no_tune()
    };
    match tuwen::load(dir.path().to_str().unwrap(), &opts) {
        Ok(m) => {
            let e = m.embed_images(&[ImageInput::path(fixture("data/images/test.jpg"))]);
            assert!(e.is_ok(), "{:?}", e.err());
        }
        Err(e) => {
            let e = e.to_string();
            assert!(
                e.contains("bf16") && e.contains("f32") && e.contains("CPU"),
                "{e}"
            );
        }
    }
}
