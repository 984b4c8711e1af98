//! Chinese-CLIP from cn_clip's release checkpoints (`clip_cn_*.pt`): the tiny ViT and RN50
//! of `tests/fixtures/gen_cnclip_original.py` against cn_clip's own `CLIP` (embeddings,
//! logits, last hidden states), the configuration read off the shapes of the full-size
//! checkpoints, discovery through `tuwen::load`, and bad checkpoints.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use tuwen::checkpoint::{parameter_shapes, TensorSource};
use tuwen::models::cnclip::{
    original, ChineseClip, ChineseClipConfig, ChineseClipEncoder, IGNORED_KEYS, RN50_PRESET,
};
use tuwen::models::{DualEncoder, Family, LoadOptions};
use tuwen::preprocess::ImageInput;

use crate::common::{fixture, get, load_st, rel_diff_floor};

const REF: &str = "cnclip/cn_clip_tiny_ref.safetensors";

fn checkpoint(model: &str) -> PathBuf {
    fixture(&format!("cnclip/cn_clip_{model}_tiny.pt"))
}

fn vocab() -> PathBuf {
    fixture("cnclip/vit_tiny/vocab.txt")
}

fn load(model: &str, opts: &LoadOptions) -> ChineseClipEncoder {
    ChineseClipEncoder::from_cn_clip_checkpoint(&checkpoint(model), None, Some(&vocab()), opts)
        .unwrap()
}

fn cpu(t: &Tensor) -> Tensor {
    t.to_device(&Device::Cpu).unwrap()
}

fn check(what: &str, ours: &Tensor, theirs: &Tensor) {
    let d = rel_diff_floor(&cpu(ours), &cpu(theirs), 1e-3);
    println!("{what}: relative difference {d:.2e}");
    assert!(d < 1e-4, "{what}: {d}");
}

fn check_against_cn_clip(model: &str) {
    let r = load_st(&fixture(REF));
    let g = |k: &str| cpu(get(&r, &format!("{model}.{k}")));
    let enc = load(model, &LoadOptions::default());
    let report = enc.load_report();
    assert!(report.unexpected.is_empty(), "{report:?}");
    let net = enc.model();
    let ids = g("input_ids").to_dtype(DType::U32).unwrap();
    let mask = ids.ne(0u32).unwrap().to_dtype(DType::F32).unwrap();
    let image = g("image");
    check(
        &format!("{model} image_features"),
        &net.image_features(&image).unwrap(),
        &g("image_features"),
    );
    check(
        &format!("{model} text_features"),
        &net.text_features(&ids, &mask).unwrap(),
        &g("text_features"),
    );
    check(
        &format!("{model} text_hidden"),
        &net.text_hidden(&ids, &mask).unwrap(),
        &g("text_hidden"),
    );
    if model == "vit" {
        check(
            "vit vision_hidden",
            &net.vision_hidden(&image).unwrap(),
            &g("vision_hidden"),
        );
    }
    let img = enc.image_embeds_from_pixels(&image).unwrap();
    let txt = enc.text_embeds_from_ids(&ids, &mask).unwrap();
    check(
        &format!("{model} logits_per_image"),
        &enc.logits(&img, &txt).unwrap(),
        &g("logits_per_image"),
    );
}

#[test]
fn cn_clip_vit_checkpoint_matches_cn_clip() {
    check_against_cn_clip("vit");
}

#[test]
fn cn_clip_rn50_checkpoint_matches_cn_clip() {
    check_against_cn_clip("rn50");
}

/// The configuration read off a checkpoint's shapes is the one cn_clip built it from.
#[test]
fn cn_clip_config_is_read_off_the_shapes() {
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("cnclip/cn_clip_tiny_ref.json")).unwrap(),
    )
    .unwrap();
    for model in ["vit", "rn50"] {
        let src = original::open(&checkpoint(model)).unwrap();
        let cfg = original::config_from_shapes(&src.shapes(), model).unwrap();
        let kw = &json[model]["clip_kwargs"];
        let u = |k: &str| kw[k].as_u64().unwrap_or_else(|| panic!("{k}")) as usize;
        assert_eq!(cfg.projection_dim, u("embed_dim"));
        assert_eq!(cfg.text_config.hidden_size, u("text_hidden_size"));
        assert_eq!(
            cfg.text_config.num_hidden_layers,
            u("text_num_hidden_layers")
        );
        assert_eq!(
            cfg.text_config.num_attention_heads,
            u("text_num_attention_heads")
        );
        assert_eq!(
            cfg.text_config.intermediate_size,
            u("text_intermediate_size")
        );
        assert_eq!(cfg.text_config.vocab_size, u("vocab_size"));
        assert_eq!(cfg.image_size(), u("image_resolution"));
        match (model, &cfg.vision_resnet) {
            ("vit", None) => {
                let v = &cfg.vision_config;
                assert_eq!(v.hidden_size, u("vision_width"));
                assert_eq!(v.num_hidden_layers, u("vision_layers"));
                assert_eq!(v.patch_size, u("vision_patch_size"));
                assert_eq!(
                    v.num_attention_heads,
                    json[model]["vision_heads"].as_u64().unwrap() as usize
                );
            }
            ("rn50", Some(r)) => {
                let layers: Vec<usize> = kw["vision_layers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().unwrap() as usize)
                    .collect();
                assert_eq!(r.layers.to_vec(), layers);
                assert_eq!(r.width, u("vision_width"));
                assert_eq!(
                    r.heads,
                    json[model]["vision_heads"].as_u64().unwrap() as usize
                );
            }
            other => panic!("{model}: wrong tower {:?}", other.1),
        }
    }
}

fn manifest_shapes(name: &str) -> BTreeMap<String, Vec<usize>> {
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture(&format!("manifests/{name}.json"))).unwrap(),
    )
    .unwrap();
    v["tensors"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, t)| {
            let shape = t["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            (k.clone(), shape)
        })
        .collect()
}

/// The tensor lists of the full-size cn_clip checkpoints (`chinese-clip-rn50`, and the
/// original ViT-B/16): their configuration read off the shapes is the preset's, and after
/// the key map every tensor is one the model reads (or an ignored counter), with its shape.
#[test]
fn full_size_cn_clip_checkpoints_map_onto_the_presets() {
    for (manifest, preset) in [
        ("chinese-clip-rn50", RN50_PRESET),
        ("cn-clip-vit-b-16-original", "chinese-clip-vit-base-patch16"),
    ] {
        let shapes = manifest_shapes(manifest);
        let want = ChineseClipConfig::preset(preset).unwrap();
        let mut got = original::config_from_shapes(&shapes, manifest).unwrap();
        got.logit_scale_init_value = want.logit_scale_init_value;
        assert_eq!(got, want, "{manifest}");
        let mapped = original::converted_shapes(&shapes, want.vision_resnet.is_some());
        let model = parameter_shapes(|vb| ChineseClip::new(&want, vb)).unwrap();
        for (name, shape) in &model {
            assert_eq!(mapped.get(name), Some(shape), "{manifest}: {name}");
        }
        let extra: Vec<&String> = mapped
            .keys()
            .filter(|k| !model.contains_key(*k))
            .filter(|k| !IGNORED_KEYS.iter().any(|p| k.contains(p)))
            .collect();
        assert!(extra.is_empty(), "{manifest}: unread {extra:?}");
        println!(
            "{manifest}: {} tensors map onto the {} of {preset}",
            shapes.len(),
            model.len()
        );
    }
}

/// Copies a checkpoint (and optionally the vocabulary) into a fresh folder.
fn folder_with(model: &str, with_vocab: bool) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let pt = dir.path().join(format!("clip_cn_{model}.pt"));
    std::fs::copy(checkpoint(model), &pt).unwrap();
    if with_vocab {
        std::fs::copy(vocab(), dir.path().join("vocab.txt")).unwrap();
    }
    (dir, pt)
}

/// `tuwen::load` recognises a cn_clip checkpoint, as a file or as the only checkpoint of
/// a folder, and embeds real images and Chinese text with it.
#[test]
fn tuwen_load_opens_cn_clip_checkpoints() {
    for model in ["vit", "rn50"] {
        let (dir, pt) = folder_with(model, true);
        for path in [pt.as_path(), dir.path()] {
            assert_eq!(
                tuwen::checkpoint::discover::identify(path).unwrap(),
                Some(Family::ChineseClip),
                "{}",
                path.display()
            );
            let enc = tuwen::load(path.to_str().unwrap(), &LoadOptions::default()).unwrap();
            assert_eq!(enc.family(), Family::ChineseClip);
            let img = enc
                .embed_images(&[ImageInput::path(fixture("data/images/test.jpg"))])
                .unwrap();
            let txt = enc.embed_texts(&["一只猫", "红色的圆形"]).unwrap();
            assert_eq!(img.dims(), &[1, 16]);
            assert_eq!(txt.dims(), &[2, 16]);
            let logits = enc.logits(&img, &txt).unwrap();
            assert!(logits
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .all(|v| v.is_finite()));
        }
    }
}

/// The same weights through an HF-style folder with the crate's names (what `train_cnclip`
/// exports) give the same embeddings: the key map loses nothing.
#[test]
fn cn_clip_rn50_folder_round_trip() {
    let enc = load("rn50", &LoadOptions::default());
    let src = original::open(&checkpoint("rn50")).unwrap();
    let conv = original::convert(&src, "rn50", None).unwrap();
    assert!(conv.unmapped.is_empty(), "{:?}", conv.unmapped);
    let dir = tempfile::tempdir().unwrap();
    let tensors: BTreeMap<String, Tensor> = conv
        .tensors
        .into_iter()
        .map(|(k, v)| (k, v.to_dtype(DType::F32).unwrap()))
        .collect();
    tuwen::checkpoint::save_safetensors(&tensors, None, &dir.path().join("model.safetensors"))
        .unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        serde_json::to_string_pretty(&conv.config).unwrap(),
    )
    .unwrap();
    std::fs::copy(vocab(), dir.path().join("vocab.txt")).unwrap();
    let back = ChineseClipEncoder::from_dir(dir.path(), &LoadOptions::default()).unwrap();
    let img = [ImageInput::path(fixture("data/images/test.jpg"))];
    let a = enc.embed_images(&img).unwrap();
    let b = back.embed_images(&img).unwrap();
    assert_eq!(rel_diff_floor(&a, &b, 0.0), 0.0);
}

fn err_of(path: &Path, vocab: Option<&Path>, opts: &LoadOptions) -> String {
    match ChineseClipEncoder::from_cn_clip_checkpoint(path, None, vocab, opts) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn cn_clip_checkpoint_errors_name_the_problem() {
    // No vocabulary beside the checkpoint.
    let (_dir, pt) = folder_with("vit", false);
    let e = err_of(&pt, None, &LoadOptions::default());
    assert!(
        e.contains("vocab.txt") && e.contains("OFA-Sys/chinese-clip-vit-base-patch16"),
        "{e}"
    );

    // An unknown key: reported as unused; a strict load fails naming it.
    let src = original::open(&checkpoint("vit")).unwrap();
    let mut all = src.load_all().unwrap();
    all.insert(
        "module.visual.extra_head.weight".into(),
        Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap(),
    );
    let conv = original::convert(
        &TensorSource::Map(all.clone().into_iter().collect()),
        "x",
        None,
    )
    .unwrap();
    assert_eq!(conv.unmapped, vec!["visual.extra_head.weight".to_string()]);
    let text = tuwen::preprocess::TextProcessor::bert_from_vocab(&vocab(), true, 52).unwrap();
    let image = tuwen::models::cnclip::read_image_processor(Path::new("/nonexistent"), 32).unwrap();
    let build = |strict: bool, tensors| {
        ChineseClipEncoder::from_source(
            &conv.config,
            TensorSource::Map(tensors),
            "x.pt (cn_clip layout)",
            text.clone(),
            image,
            &LoadOptions {
                strict,
                ..Default::default()
            },
        )
    };
    let loose = build(false, conv.tensors.clone()).unwrap();
    assert_eq!(
        loose.load_report().unexpected,
        vec!["visual.extra_head.weight".to_string()]
    );
    let e = build(true, conv.tensors.clone()).unwrap_err().to_string();
    assert!(e.contains("visual.extra_head.weight"), "{e}");

    // A stacked q/k/v projection whose rows are not a multiple of 3.
    let key = "module.visual.transformer.resblocks.0.attn.in_proj_weight";
    let mut bad = all.clone();
    bad.insert(
        key.into(),
        Tensor::zeros((100, 128), DType::F32, &Device::Cpu).unwrap(),
    );
    let e = original::convert(&TensorSource::Map(bad.into_iter().collect()), "x", None)
        .unwrap_err()
        .to_string();
    assert!(e.contains(key) && e.contains("multiple of 3"), "{e}");

    // A mis-shaped tensor: the error names the crate's key and both shapes.
    let mut bad = all.clone();
    bad.insert(
        "module.bert.encoder.layer.0.output.dense.bias".into(),
        Tensor::zeros(7, DType::F32, &Device::Cpu).unwrap(),
    );
    let conv = original::convert(&TensorSource::Map(bad.into_iter().collect()), "x", None).unwrap();
    let e = build(false, conv.tensors).unwrap_err().to_string();
    assert!(
        e.contains("text_model.encoder.layer.0.output.dense.bias") && e.contains('7'),
        "{e}"
    );

    // A missing tower: the configuration cannot be read, and the error names the key.
    let mut bad = all;
    bad.retain(|k, _| !k.starts_with("module.bert.embeddings.word_embeddings"));
    let e = original::convert(&TensorSource::Map(bad.into_iter().collect()), "x", None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("bert.embeddings.word_embeddings.weight"), "{e}");
}

/// Shapes that no cn_clip configuration produces are refused while reading the configuration,
/// each error naming the tensor or the width at fault.
#[test]
fn cn_clip_config_errors_name_the_tensor() {
    let shapes = original::open(&checkpoint("vit")).unwrap().shapes();
    let with = |key: &str, shape: Vec<usize>| {
        let mut s = shapes.clone();
        s.insert(key.to_string(), shape);
        match original::config_from_shapes(&s, "x.pt") {
            Ok(c) => panic!("{key}: accepted as {c:?}"),
            Err(e) => e.to_string(),
        }
    };
    let e = with("module.visual.positional_embedding", vec![18, 128]);
    assert!(
        e.contains("visual.positional_embedding") && e.contains("18 positions"),
        "{e}"
    );
    let e = with(
        "module.bert.embeddings.word_embeddings.weight",
        vec![21128, 96],
    );
    assert!(e.contains("text width 96") && e.contains("64"), "{e}");
    let e = with("module.text_projection", vec![32, 16]);
    assert!(
        e.contains("text_projection") && e.contains("[32, 16]"),
        "{e}"
    );
    let e = with("module.visual.conv1.weight", vec![128, 3, 8]);
    assert!(
        e.contains("visual.conv1.weight") && e.contains("rank-4"),
        "{e}"
    );
}
