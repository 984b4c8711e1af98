//! Chinese-CLIP against HF transformers on tiny random checkpoints saved in the published
//! layout by `tests/fixtures/gen_cnclip.py`: tokenizer ids from `vocab.txt`, preprocessing
//! in both `size` forms, embeddings, logits and every layer's hidden states, from
//! `model.safetensors` and from `pytorch_model.bin`.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use tuwen::models::cnclip::{ChineseClipConfig, ChineseClipEncoder};
use tuwen::preprocess::ImageInput;
use tuwen::{Error, LoadOptions};

use crate::common::{fixture, get, load_st, max_abs_diff};
use crate::examples::example;

const FOLDERS: [&str; 2] = ["vit_tiny", "vit_tiny_bin"];

fn reference() -> (std::collections::HashMap<String, Tensor>, serde_json::Value) {
    let st = load_st(&fixture("cnclip/vit_tiny_ref.safetensors"));
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("cnclip/vit_tiny_ref.json")).unwrap(),
    )
    .unwrap();
    (st, json)
}

fn opts() -> LoadOptions {
    LoadOptions {
        tune_allocator: false,
        ..LoadOptions::default()
    }
}

fn texts(json: &serde_json::Value) -> Vec<String> {
    json["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect()
}

fn images(json: &serde_json::Value) -> Vec<PathBuf> {
    json["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| fixture(&format!("data/images/{}", f.as_str().unwrap())))
        .collect()
}

/// A copy of a fixture folder whose config.json is changed by `edit`.
fn edited(folder: &str, edit: impl Fn(&mut serde_json::Value)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(fixture(&format!("cnclip/{folder}"))).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
    }
    let cfg = dir.path().join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&cfg, v.to_string()).unwrap();
    dir
}

fn u32_ids(t: &Tensor) -> Tensor {
    t.to_dtype(DType::U32).unwrap()
}

#[test]
fn cnclip_tokenizer_from_vocab_matches_bert_tokenizer_fast() {
    let (r, json) = reference();
    let m = ChineseClipEncoder::from_dir(&fixture("cnclip/vit_tiny"), &opts()).unwrap();
    let t = texts(&json);
    let refs: Vec<&str> = t.iter().map(String::as_str).collect();
    let b = m
        .text_processor()
        .encode_batch(&refs, &Device::Cpu)
        .unwrap();
    assert_eq!(b.input_ids.dims(), &[t.len(), 52]);
    let ours = b
        .input_ids
        .to_dtype(DType::I64)
        .unwrap()
        .to_vec2::<i64>()
        .unwrap();
    let theirs = get(&r, "input_ids").to_vec2::<i64>().unwrap();
    for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
        assert_eq!(a, b, "ids of {:?}", t[i]);
    }
    let mask = b
        .attention_mask
        .to_dtype(DType::I64)
        .unwrap()
        .to_vec2::<i64>()
        .unwrap();
    assert_eq!(mask, get(&r, "attention_mask").to_vec2::<i64>().unwrap());
    // The long text was cut, keeping [CLS] … [SEP].
    assert_eq!(b.truncated, vec![t.len() - 1]);
}

#[test]
fn cnclip_preprocessing_matches_hf_in_both_size_forms() {
    let (r, json) = reference();
    let imgs: Vec<ImageInput> = images(&json).iter().map(ImageInput::path).collect();
    for folder in FOLDERS {
        let m =
            ChineseClipEncoder::from_dir(&fixture(&format!("cnclip/{folder}")), &opts()).unwrap();
        let p = m.image_processor();
        let ours = p.process_batch(&imgs, &Device::Cpu).unwrap();
        let std = Tensor::new(&p.std, &Device::Cpu)
            .unwrap()
            .reshape((1, 3, 1, 1))
            .unwrap();
        for backend in ["pil", "tv"] {
            let theirs = get(&r, &format!("{folder}_pixel_values_{backend}"));
            assert_eq!(ours.dims(), theirs.dims(), "{folder}");
            // In [0, 1] pixel units: the normalised difference times the std.
            let mad = (&ours - theirs)
                .unwrap()
                .broadcast_mul(&std)
                .unwrap()
                .abs()
                .unwrap()
                .mean_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            println!(
                "{folder} preprocessing vs HF {backend}: mean |Δ| = {:.3}/255",
                mad * 255.0
            );
            assert!(mad <= 1.0 / 255.0, "{folder} {backend}: {mad}");
        }
    }
}

#[test]
fn cnclip_embeddings_and_logits_match_hf() {
    let (r, json) = reference();
    let t = texts(&json);
    let refs: Vec<&str> = t.iter().map(String::as_str).collect();
    for folder in FOLDERS {
        let dir = fixture(&format!("cnclip/{folder}"));
        let m = ChineseClipEncoder::from_dir(&dir, &opts()).unwrap();
        assert!(m.load_report().warning().is_none(), "{:?}", m.load_report());
        let pv = get(&r, &format!("{folder}_pixel_values_pil"));
        let img = m.image_embeds_from_pixels(pv).unwrap();
        let d = max_abs_diff(&img, get(&r, &format!("{folder}_image_embeds")));
        println!("{folder} image embeds: {d:.2e}");
        assert!(d < 1e-4, "{folder} image: {d}");
        let txt = m
            .text_embeds_from_ids(
                &u32_ids(get(&r, "input_ids")),
                &get(&r, "attention_mask").to_dtype(DType::F32).unwrap(),
            )
            .unwrap();
        let d = max_abs_diff(&txt, get(&r, "text_embeds"));
        println!("{folder} text embeds: {d:.2e}");
        assert!(d < 1e-4, "{folder} text: {d}");
        // Through the public trait, from the tokenizer: the same texts.
        let model = tuwen::load(dir.to_str().unwrap(), &opts()).unwrap();
        assert_eq!(model.family(), tuwen::Family::ChineseClip);
        let txt2 = model.embed_texts(&refs).unwrap();
        assert!(max_abs_diff(&txt2, get(&r, "text_embeds")) < 1e-4);
        let logits = model.logits(&img, &txt2).unwrap();
        let d = max_abs_diff(&logits, get(&r, &format!("{folder}_logits_per_image")));
        println!("{folder} logits: {d:.2e}");
        assert!(d < 1e-4, "{folder} logits: {d}");
        // From the JPEGs: preprocessing within 1/255 of HF's keeps the embeddings close.
        let imgs: Vec<ImageInput> = images(&json).iter().map(ImageInput::path).collect();
        let e = model.embed_images(&imgs).unwrap();
        let d = max_abs_diff(&e, get(&r, &format!("{folder}_image_embeds")));
        println!("{folder} image embeds from JPEGs: {d:.2e}");
        assert!(d < 2e-2, "{folder} from JPEGs: {d}");
        // Softmax scoring over the texts.
        let p = model.probabilities(&logits).unwrap();
        let rows = p.sum(1).unwrap().to_vec1::<f32>().unwrap();
        assert!(rows.iter().all(|s| (s - 1.0).abs() < 1e-5));
    }
}

/// Every layer's hidden states, by loading the same weights with 0, 1 and 2 layers: the
/// last hidden state of a k-layer tower is HF's `hidden_states[k]`.
#[test]
fn cnclip_hidden_states_match_hf_per_layer() {
    let (r, _) = reference();
    for folder in FOLDERS {
        for k in 0..=2usize {
            let dir = edited(folder, |v| {
                v["text_config"]["num_hidden_layers"] = k.into();
                v["vision_config"]["num_hidden_layers"] = k.into();
            });
            let m = ChineseClipEncoder::from_dir(dir.path(), &opts()).unwrap();
            let pv = get(&r, &format!("{folder}_pixel_values_pil"));
            let h = m.model().vision_hidden(pv).unwrap();
            let d = max_abs_diff(&h, get(&r, &format!("{folder}_vision_hidden_{k}")));
            assert!(d < 1e-4, "{folder} vision layer {k}: {d}");
            let mask = get(&r, "attention_mask").to_dtype(DType::F32).unwrap();
            let h = m
                .model()
                .text_hidden(&u32_ids(get(&r, "input_ids")), &mask)
                .unwrap();
            // Padded positions differ in what HF lets them attend to; compare real tokens.
            let real = mask.unsqueeze(2).unwrap();
            let want = get(&r, &format!("text_hidden_{k}"));
            let d = max_abs_diff(
                &h.broadcast_mul(&real).unwrap(),
                &want.broadcast_mul(&real).unwrap(),
            );
            println!("{folder} layer {k}: text {d:.2e}");
            assert!(d < 1e-4, "{folder} text layer {k}: {d}");
        }
    }
}

#[test]
fn cnclip_examples_classify_and_embed() {
    let dir = fixture("cnclip/vit_tiny");
    let img = fixture("data/images/test.jpg");
    let o = std::process::Command::new(example("zero_shot"))
        .args(["--model", dir.to_str().unwrap()])
        .args(["--image", img.to_str().unwrap()])
        .args(["--labels", "猫,狗,汽车"])
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{s}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(s.contains("汽车") && s.contains("softmax"), "{s}");
}

fn load_err(p: &std::path::Path) -> Error {
    match tuwen::load(p.to_str().unwrap(), &opts()) {
        Ok(_) => panic!("{} loaded", p.display()),
        Err(e) => e,
    }
}

#[test]
fn cnclip_bad_folders_are_named_errors() {
    // An unknown model_type.
    let d = edited("vit_tiny", |v| v["model_type"] = "chinese_clip_v9".into());
    let e = load_err(d.path());
    assert!(matches!(e, Error::WrongFamily { .. }), "{e}");
    let e = ChineseClipConfig::from_json_file(&d.path().join("config.json")).unwrap_err();
    assert!(e.to_string().contains("chinese_clip_v9"), "{e}");
    // No vocab.txt.
    let d = edited("vit_tiny", |_| {});
    std::fs::remove_file(d.path().join("vocab.txt")).unwrap();
    let e = load_err(d.path());
    assert!(
        matches!(e, Error::Tokenizer { .. }) && e.to_string().contains("vocab.txt"),
        "{e}"
    );
    // A mis-shaped tensor: the key and both shapes.
    let d = edited("vit_tiny_bin", |v| v["projection_dim"] = 17.into());
    let e = load_err(d.path()).to_string();
    assert!(
        e.contains("visual_projection.weight") && e.contains("17"),
        "{e}"
    );
    // A shortest edge without a crop.
    let d = edited("vit_tiny", |_| {});
    std::fs::write(
        d.path().join("preprocessor_config.json"),
        r#"{"size": {"shortest_edge": 40}, "do_center_crop": false}"#,
    )
    .unwrap();
    let e = load_err(d.path());
    assert!(e.to_string().contains("center crop"), "{e}");
    // Out-of-range preprocessor values name the file and the field.
    for (bad, field) in [
        (r#"{"size": {"height": 0, "width": 32}}"#, "size"),
        (r#"{"size": {"shortest_edge": 1000000}}"#, "shortest_edge"),
        (r#"{"resample": 7}"#, "resample"),
        (r#"{"image_std": [0.5, 0.0, 0.5]}"#, "image_std"),
        (r#"{"image_mean": [0.5, "x", 0.5]}"#, "image_mean"),
    ] {
        std::fs::write(d.path().join("preprocessor_config.json"), bad).unwrap();
        let e = load_err(d.path()).to_string();
        assert!(
            e.contains(field) && e.contains("preprocessor_config.json"),
            "{bad}: {e}"
        );
    }
    // A context length beyond the model's positions.
    let mut m = ChineseClipEncoder::from_dir(&fixture("cnclip/vit_tiny"), &opts()).unwrap();
    assert!(m.set_context_length(65).is_err() && m.set_context_length(1).is_err());
    m.set_context_length(16).unwrap();
    let b = m
        .text_processor()
        .encode_batch(&["一只猫"], &Device::Cpu)
        .unwrap();
    assert_eq!(b.input_ids.dims(), &[1, 16]);
}

/// The parameter list of every published ViT checkpoint, built from its preset, equals the
/// tensor list of HF's modeling code for the same configuration (no weights needed). The
/// RN50, which HF does not have, is checked against cn_clip's list in `cnclip_original.rs`.
#[test]
fn cnclip_parameter_lists_equal_published_checkpoints() {
    use tuwen::models::cnclip::{ChineseClip, PRESETS, RN50_PRESET};
    for p in PRESETS.iter().filter(|p| p.name != RN50_PRESET) {
        let cfg = ChineseClipConfig::preset(p.name).unwrap();
        let ours = tuwen::checkpoint::parameter_shapes(|vb| ChineseClip::new(&cfg, vb)).unwrap();
        let v: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fixture(&format!("manifests/{}.json", p.name))).unwrap(),
        )
        .unwrap();
        let theirs: std::collections::BTreeMap<String, Vec<usize>> = v["tensors"]
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
            .collect();
        let missing: Vec<_> = theirs.keys().filter(|k| !ours.contains_key(*k)).collect();
        let extra: Vec<_> = ours.keys().filter(|k| !theirs.contains_key(*k)).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{}: missing {missing:?}, extra {extra:?}",
            p.name
        );
        for (k, s) in &theirs {
            assert_eq!(&ours[k], s, "{}: shape of {k}", p.name);
        }
        println!("{}: {} tensors match", p.name, ours.len());
    }
}
