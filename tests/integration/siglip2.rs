//! SigLIP (fixed resolution) and SigLIP 2 NaFlex: parity with HF transformers, the
//! preprocessing and tokenizer against HF's processors, parameter lists against the
//! published checkpoints, and bad inputs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use tuwen::checkpoint::{parameter_shapes, save_safetensors, TensorSource};
use tuwen::models::siglip2::{Siglip, SiglipConfig, SiglipEncoder};
use tuwen::preprocess::{
    ImageInput, ImageProcessor, NaFlexBatch, NaFlexProcessor, Resample, ResizeKind, TextProcessor,
    TextStyle,
};
use tuwen::{DualEncoder, Error, LoadOptions};

use crate::common::test_opts;
use crate::common::{assert_close, fixture, get, load_st, tiny_siglip_dir};

const TOL: f32 = 1e-4;

fn opts() -> LoadOptions {
    test_opts()
}

fn ids_u32(t: &Tensor) -> Tensor {
    t.to_dtype(DType::U32).unwrap()
}

fn load_fixed(name: &str) -> SiglipEncoder {
    SiglipEncoder::from_dir(&fixture(&format!("siglip2/{name}")), &opts()).unwrap()
}

fn check_fixed_model(name: &str) {
    let model = load_fixed(name);
    assert!(
        model.load_report().unexpected.is_empty(),
        "{:?}",
        model.load_report()
    );
    let io = load_st(&fixture(&format!("siglip2/{name}_io.safetensors")));
    let px = get(&io, "pixel_values");
    let ids = ids_u32(get(&io, "input_ids"));
    let mask = get(&io, "attention_mask");

    let (hidden, pooled) = model.model.vision.forward(px).unwrap();
    assert_close(
        &format!("{name} vision_last_hidden_state"),
        &hidden,
        get(&io, "vision_last_hidden_state"),
        TOL,
    );
    assert_close(
        &format!("{name} image_pooled"),
        &pooled,
        get(&io, "image_pooled"),
        TOL,
    );
    let img = model.image_embeds_from_pixels(px).unwrap();
    assert_close(
        &format!("{name} image_embeds"),
        &img,
        get(&io, "image_embeds"),
        TOL,
    );

    let (thidden, tpooled) = model.model.text.forward(&ids, None).unwrap();
    assert_close(
        &format!("{name} text_last_hidden_state"),
        &thidden,
        get(&io, "text_last_hidden_state"),
        TOL,
    );
    assert_close(
        &format!("{name} text_pooled"),
        &tpooled,
        get(&io, "text_pooled"),
        TOL,
    );
    let txt = model.text_embeds_from_ids(&ids).unwrap();
    assert_close(
        &format!("{name} text_embeds"),
        &txt,
        get(&io, "text_embeds"),
        TOL,
    );

    let logits = model.logits(&img, &txt).unwrap();
    assert_close(
        &format!("{name} logits_per_image"),
        &logits,
        get(&io, "logits_per_image"),
        TOL,
    );

    // With the text attention mask (HF's behaviour when a mask is passed).
    let masked = model.model.get_text_features(&ids, Some(mask)).unwrap();
    assert_close(
        &format!("{name} text_pooled_masked"),
        &masked,
        get(&io, "text_pooled_masked"),
        TOL,
    );
    let masked = tuwen::nn::ops::l2_normalize(&masked).unwrap();
    let logits = model.logits(&img, &masked).unwrap();
    assert_close(
        &format!("{name} logits_per_image_masked"),
        &logits,
        get(&io, "logits_per_image_masked"),
        TOL,
    );
}

#[test]
fn siglip_fixed_matches_hf() {
    check_fixed_model("siglip_tiny");
}

#[test]
fn siglip_fixed_with_wider_text_head_matches_hf() {
    // Text hidden 24 projected to 32, the shape of giant-opt's 1152 -> 1536 head.
    check_fixed_model("siglip_tiny_proj");
}

fn naflex_batch(io: &std::collections::HashMap<String, Tensor>, s: &str) -> NaFlexBatch {
    let shapes = get(io, &format!("spatial_shapes_{s}"))
        .to_dtype(DType::I64)
        .unwrap()
        .to_vec2::<i64>()
        .unwrap();
    NaFlexBatch {
        pixel_values: get(io, &format!("pixel_values_{s}")).clone(),
        pixel_attention_mask: get(io, &format!("pixel_attention_mask_{s}"))
            .to_dtype(DType::U32)
            .unwrap(),
        spatial_shapes: shapes
            .iter()
            .map(|v| (v[0] as usize, v[1] as usize))
            .collect(),
    }
}

#[test]
fn siglip2_naflex_matches_hf() {
    let model = SiglipEncoder::from_dir(&fixture("siglip2/siglip2_naflex_tiny"), &opts()).unwrap();
    assert_eq!(model.family(), tuwen::Family::Siglip2Naflex);
    let io = load_st(&fixture("siglip2/siglip2_naflex_tiny_io.safetensors"));

    for (h, w) in [(1, 16), (2, 8), (3, 5), (4, 4), (4, 16), (6, 10), (8, 8)] {
        let ours = model.model.vision.resized_positions(h, w, h * w).unwrap();
        assert_close(
            &format!("naflex position resize {h}x{w}"),
            &ours,
            get(&io, &format!("position_embedding_resized_{h}x{w}")),
            1e-5,
        );
    }

    let ids = ids_u32(get(&io, "input_ids"));
    let txt = model.text_embeds_from_ids(&ids).unwrap();
    assert_close("naflex text_embeds", &txt, get(&io, "text_embeds"), TOL);

    for s in ["a", "b"] {
        let batch = naflex_batch(&io, s);
        let (hidden, pooled) = model
            .model
            .vision
            .forward_naflex(
                &batch.pixel_values,
                &batch.pixel_attention_mask,
                &batch.spatial_shapes,
            )
            .unwrap();
        // Compare only real patches: padding rows are computed but carry no meaning.
        let mask = batch
            .pixel_attention_mask
            .to_dtype(DType::F32)
            .unwrap()
            .unsqueeze(2)
            .unwrap();
        let ours = hidden.broadcast_mul(&mask).unwrap();
        let theirs = get(&io, &format!("vision_last_hidden_state_{s}"))
            .broadcast_mul(&mask)
            .unwrap();
        assert_close(
            &format!("naflex vision_last_hidden_state_{s} (real patches)"),
            &ours,
            &theirs,
            TOL,
        );
        assert_close(
            &format!("naflex image_pooled_{s}"),
            &pooled,
            get(&io, &format!("image_pooled_{s}")),
            TOL,
        );
        let img = model.image_embeds_from_naflex(&batch).unwrap();
        assert_close(
            &format!("naflex image_embeds_{s}"),
            &img,
            get(&io, &format!("image_embeds_{s}")),
            TOL,
        );
        let logits = model.logits(&img, &txt).unwrap();
        assert_close(
            &format!("naflex logits_per_image_{s}"),
            &logits,
            get(&io, &format!("logits_per_image_{s}")),
            TOL,
        );
    }
}

#[test]
fn siglip_sigmoid_loss_matches_hf() {
    let model = load_fixed("siglip_tiny");
    let io = load_st(&fixture("siglip2/siglip_tiny_io.safetensors"));
    let img = model
        .image_embeds_from_pixels(get(&io, "pixel_values"))
        .unwrap();
    let txt = model
        .text_embeds_from_ids(&ids_u32(get(&io, "input_ids_square")))
        .unwrap();
    let logits = model.logits(&img, &txt).unwrap();
    assert_close(
        "logits_per_image_square",
        &logits,
        get(&io, "logits_per_image_square"),
        TOL,
    );
    // L = -mean_i sum_j log sigmoid(z_ij * logit_ij), z = 2I - 1.
    let n = logits.dim(0).unwrap();
    let z = ((Tensor::eye(n, DType::F32, logits.device()).unwrap() * 2.0).unwrap() - 1.0).unwrap();
    let loss = tuwen::nn::ops::log_sigmoid(&(logits * z).unwrap())
        .unwrap()
        .sum(1)
        .unwrap()
        .mean_all()
        .unwrap()
        .neg()
        .unwrap();
    assert_close(
        "sigmoid loss",
        &loss.reshape(1).unwrap(),
        get(&io, "loss_square"),
        TOL,
    );
}

fn image_stems() -> Vec<(String, PathBuf)> {
    let refs: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("siglip2/preprocess_ref.json")).unwrap(),
    )
    .unwrap();
    let images = refs["images"].as_object().unwrap();
    assert!(!images.is_empty());
    images
        .iter()
        .map(|(stem, v)| {
            (
                stem.clone(),
                fixture(&format!("data/images/{}", v["file"].as_str().unwrap())),
            )
        })
        .collect()
}

/// Mean |ours − HF| in 8-bit pixel levels (1.0 means 1/255 of the range).
fn mad_levels(ours_normalized: &Tensor, reference_u8: &Tensor) -> f32 {
    let reference = ((reference_u8
        .to_device(ours_normalized.device())
        .and_then(|t| t.to_dtype(DType::F32))
        .unwrap()
        - 127.5)
        .unwrap()
        / 127.5)
        .unwrap();
    let d = (ours_normalized - reference)
        .unwrap()
        .abs()
        .unwrap()
        .mean_all()
        .unwrap();
    d.to_scalar::<f32>().unwrap() * 127.5
}

#[test]
fn fixed_preprocessing_matches_hf_processor() {
    let refs = load_st(&fixture("siglip2/preprocess_ref.safetensors"));
    for (stem, path) in image_stems() {
        for (resample, key) in [
            (Resample::Bilinear, "fixed_bilinear"),
            (Resample::Bicubic, "fixed_bicubic"),
        ] {
            let p = ImageProcessor::siglip2(224).with_resize(ResizeKind::Pil(resample));
            let ours = p
                .process_batch(&[ImageInput::path(&path)], &Device::Cpu)
                .unwrap()
                .squeeze(0)
                .unwrap();
            let mad = mad_levels(&ours, get(&refs, &format!("{key}_{stem}")));
            println!("preprocess {key} {stem}: mean abs diff {mad:.4} levels of 255");
            assert!(mad <= 1.0, "{key} {stem}: mean abs diff {mad} > 1/255");
        }
    }
}

#[test]
fn naflex_preprocessing_matches_hf_processor() {
    let refs = load_st(&fixture("siglip2/preprocess_ref.safetensors"));
    for (stem, path) in image_stems() {
        for (max, suffix) in [(256usize, ""), (64, "_64")] {
            let p = NaFlexProcessor::new(16, max);
            let batch = p
                .process_batch(&[ImageInput::path(&path)], &Device::Cpu)
                .unwrap();
            let shape = get(&refs, &format!("naflex_spatial_shapes_{stem}{suffix}"))
                .to_vec1::<i64>()
                .unwrap();
            assert_eq!(
                batch.spatial_shapes[0],
                (shape[0] as usize, shape[1] as usize),
                "spatial shape of {stem} at {max} patches"
            );
            let mask = get(&refs, &format!("naflex_mask_{stem}{suffix}"))
                .to_dtype(DType::U32)
                .unwrap();
            assert_eq!(
                batch
                    .pixel_attention_mask
                    .squeeze(0)
                    .unwrap()
                    .to_vec1::<u32>()
                    .unwrap(),
                mask.to_vec1::<u32>().unwrap()
            );
            let n = shape[0] as usize * shape[1] as usize;
            let ours = batch
                .pixel_values
                .squeeze(0)
                .unwrap()
                .narrow(0, 0, n)
                .unwrap();
            let theirs = get(&refs, &format!("naflex_pixel_values_{stem}{suffix}"))
                .narrow(0, 0, n)
                .unwrap();
            let mad = mad_levels(&ours, &theirs);
            println!("preprocess naflex{max} {stem}: mean abs diff {mad:.4} levels of 255");
            assert!(mad <= 1.0, "naflex {stem}: mean abs diff {mad} > 1/255");
            // Padding rows are zero.
            if n < max {
                let pad = batch
                    .pixel_values
                    .squeeze(0)
                    .unwrap()
                    .narrow(0, n, max - n)
                    .unwrap();
                assert_eq!(
                    pad.abs()
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap(),
                    0.0
                );
            }
        }
    }
}

#[test]
fn naflex_batches_mix_aspect_ratios() {
    // Three real images of different aspect ratios in one batch give the same embeddings as
    // each image alone.
    let model = SiglipEncoder::from_dir(&fixture("siglip2/siglip2_naflex_tiny"), &opts()).unwrap();
    let paths: Vec<PathBuf> = image_stems().into_iter().map(|(_, p)| p).take(3).collect();
    let inputs: Vec<ImageInput> = paths.iter().map(ImageInput::path).collect();
    let together = model.embed_images(&inputs).unwrap();
    for (i, input) in inputs.iter().enumerate() {
        let alone = model.embed_images(std::slice::from_ref(input)).unwrap();
        assert_close(
            &format!("naflex image {i} alone vs batched"),
            &alone,
            &together.narrow(0, i, 1).unwrap(),
            1e-5,
        );
    }
}

#[test]
fn gemma_text_path_matches_hf_ids() {
    let refs: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("siglip2/tokenizer_ref.json")).unwrap(),
    )
    .unwrap();
    let tp = TextProcessor::from_file(
        &fixture("siglip2/tokenizer/tokenizer.json"),
        TextStyle::Gemma,
        64,
    )
    .unwrap();
    let cases = refs["cases"].as_array().unwrap();
    assert!(cases.len() >= 5);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let expected: Vec<u32> = case["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let (ids, truncated) = tp.encode(text).unwrap();
        assert_eq!(ids, expected, "ids of {text:?}");
        assert_eq!(
            truncated,
            case["truncated"].as_bool().unwrap(),
            "truncation flag of {text:?}"
        );
    }
}

#[test]
fn public_api_zero_shot_on_real_images() {
    // The whole pipeline through `tuwen::load`: images from disk, texts through the
    // tokenizer, sigmoid probabilities.
    let dir = tiny_siglip_dir();
    let model = tuwen::load(dir.path().to_str().unwrap(), &opts()).unwrap();
    let images: Vec<ImageInput> = image_stems()
        .into_iter()
        .map(|(_, p)| ImageInput::path(p))
        .collect();
    let probs = model
        .classify(&images, &["猫", "狗", "汽车"], "一张{}的照片。")
        .unwrap();
    assert_eq!(probs.dims(), &[images.len(), 3]);
    let v = probs.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(v.iter().all(|p| p.is_finite() && (0.0..=1.0).contains(p)));

    // Embeddings through the public API equal the tensor-level path on the same pixels.
    let enc = load_fixed("siglip_tiny");
    let pixels = ImageProcessor::siglip2(32)
        .process_batch(&images, &Device::Cpu)
        .unwrap();
    let direct = enc.image_embeds_from_pixels(&pixels).unwrap();
    let via_api = model.embed_images(&images).unwrap();
    assert_close("public API vs tensor path", &via_api, &direct, 1e-6);
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
        .filter(|(k, _)| !k.ends_with("position_ids"))
        .map(|(k, v)| {
            let shape = v["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            (k.clone(), shape)
        })
        .collect()
}

#[test]
fn parameter_lists_equal_published_checkpoints() {
    for name in [
        "siglip2-base-patch16-224",
        "siglip2-base-patch16-naflex",
        "siglip2-large-patch16-256",
        "siglip2-so400m-patch14-384",
    ] {
        let cfg = SiglipConfig::preset(name).unwrap();
        let ours = parameter_shapes(|vb| Siglip::new(&cfg, vb)).unwrap();
        let theirs = manifest_shapes(name);
        let missing: Vec<_> = theirs.keys().filter(|k| !ours.contains_key(*k)).collect();
        let extra: Vec<_> = ours.keys().filter(|k| !theirs.contains_key(*k)).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{name}: missing {missing:?}, extra {extra:?}"
        );
        for (k, s) in &theirs {
            assert_eq!(&ours[k], s, "{name}: shape of {k}");
        }
        println!("{name}: {} tensors match the published list", ours.len());
    }
}

#[test]
fn every_preset_builds() {
    // All published configurations give a consistent network (shapes only).
    for name in tuwen::models::siglip2::PRESETS {
        let cfg = SiglipConfig::preset(name).unwrap();
        let shapes = parameter_shapes(|vb| Siglip::new(&cfg, vb)).unwrap();
        assert!(shapes.contains_key("logit_bias"), "{name}");
    }
}

fn write_modified(dir: &Path, edit: impl FnOnce(&mut BTreeMap<String, Tensor>)) -> PathBuf {
    let src = TensorSource::open(&fixture("siglip2/siglip_tiny/model.safetensors"), None).unwrap();
    let mut all = src.load_all().unwrap();
    edit(&mut all);
    save_safetensors(&all, None, &dir.join("model.safetensors")).unwrap();
    std::fs::copy(
        fixture("siglip2/siglip_tiny/config.json"),
        dir.join("config.json"),
    )
    .unwrap();
    dir.to_path_buf()
}

#[test]
fn missing_tensor_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let key = "vision_model.encoder.layers.1.mlp.fc2.weight";
    let dir = write_modified(tmp.path(), |m| {
        m.remove(key);
    });
    match SiglipEncoder::from_dir(&dir, &opts()) {
        Err(Error::MissingTensor {
            key: k, expected, ..
        }) => {
            assert_eq!(k, key);
            assert_eq!(expected, vec![32, 64]);
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("loading succeeded without {key}"),
    }
}

#[test]
fn misshaped_tensor_names_both_shapes() {
    let tmp = tempfile::tempdir().unwrap();
    let key = "text_model.head.weight";
    let dir = write_modified(tmp.path(), |m| {
        m.insert(
            key.into(),
            Tensor::zeros((16, 32), DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let err = SiglipEncoder::from_dir(&dir, &opts())
        .err()
        .expect("loading must fail");
    let msg = err.to_string();
    match err {
        Error::ShapeMismatch {
            key: k,
            expected,
            found,
            ..
        } => {
            assert_eq!(k, key);
            assert_eq!(expected, vec![32, 32]);
            assert_eq!(found, vec![16, 32]);
            assert!(
                msg.contains("[16, 32]") && msg.contains("[32, 32]"),
                "{msg}"
            );
        }
        e => panic!("wrong error: {e}"),
    }
}

#[test]
fn unexpected_keys_are_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = write_modified(tmp.path(), |m| {
        m.insert(
            "optimizer.step".into(),
            Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let model = SiglipEncoder::from_dir(&dir, &opts()).unwrap();
    assert_eq!(
        model.load_report().unexpected,
        vec!["optimizer.step".to_string()]
    );
}

#[test]
fn truncated_checkpoint_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixture("siglip2/siglip_tiny/model.safetensors")).unwrap();
    std::fs::write(
        tmp.path().join("model.safetensors"),
        &bytes[..bytes.len() / 2],
    )
    .unwrap();
    std::fs::copy(
        fixture("siglip2/siglip_tiny/config.json"),
        tmp.path().join("config.json"),
    )
    .unwrap();
    let err = SiglipEncoder::from_dir(tmp.path(), &opts())
        .err()
        .expect("must fail");
    assert!(matches!(err, Error::Checkpoint { .. }), "{err}");
    assert!(err.to_string().contains("model.safetensors"), "{err}");
}

#[test]
fn bad_images_give_clear_errors() {
    let model = load_fixed("siglip_tiny");
    // Corrupt bytes.
    let err = model
        .embed_images(&[ImageInput::bytes(b"\xff\xd8\xff\xe0 not a jpeg".to_vec())])
        .unwrap_err();
    assert!(matches!(err, Error::Image { .. }), "{err}");
    // A truncated JPEG.
    let jpeg = std::fs::read(fixture("data/images/test.jpg")).unwrap();
    let err = model
        .embed_images(&[ImageInput::bytes(jpeg[..200].to_vec())])
        .unwrap_err();
    assert!(matches!(err, Error::Image { .. }), "{err}");
    // Zero size.
    let empty = image::DynamicImage::new_rgb8(0, 0);
    let err = model.embed_images(&[ImageInput::image(empty)]).unwrap_err();
    assert!(err.to_string().contains("zero size"), "{err}");
    // An empty file and a missing file.
    let err = model
        .embed_images(&[ImageInput::bytes(Vec::new())])
        .unwrap_err();
    assert!(err.to_string().contains("empty"), "{err}");
    let err = model
        .embed_images(&[ImageInput::path("/nonexistent/cat.jpg")])
        .unwrap_err();
    assert!(err.to_string().contains("/nonexistent/cat.jpg"), "{err}");
    // A header that claims a huge image.
    let mut png = Vec::new();
    png.extend_from_slice(b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR");
    png.extend_from_slice(&100_000u32.to_be_bytes());
    png.extend_from_slice(&100_000u32.to_be_bytes());
    png.extend_from_slice(b"\x08\x02\x00\x00\x00\x00\x00\x00\x00");
    let err = model.embed_images(&[ImageInput::bytes(png)]).unwrap_err();
    assert!(matches!(err, Error::Image { .. }), "{err}");
    // An empty batch.
    assert!(model.embed_images(&[]).is_err());
}

#[test]
fn bad_texts_and_presets_give_clear_errors() {
    let dir = tiny_siglip_dir();
    let model = tuwen::load(dir.path().to_str().unwrap(), &opts()).unwrap();
    let err = model.embed_texts(&[]).unwrap_err();
    assert!(matches!(err, Error::Text(_)), "{err}");
    // An empty string is a valid text (EOS only), as in HF.
    assert_eq!(model.embed_texts(&[""]).unwrap().dims(), &[1, 32]);
    // Overlong text is truncated to 64 tokens.
    let long = "一张猫的照片。".repeat(100);
    assert_eq!(
        model.embed_texts(&[long.as_str()]).unwrap().dims(),
        &[1, 32]
    );
    let err = model.classify(&[], &[], "{}").unwrap_err();
    assert!(matches!(err, Error::Text(_)), "{err}");

    let err = tuwen::load("siglip2-huge-patch99-1", &opts())
        .err()
        .expect("unknown preset must fail");
    assert!(matches!(err, Error::UnknownPreset { .. }), "{err}");
    assert!(
        err.to_string().contains("siglip2-base-patch16-224"),
        "lists known presets: {err}"
    );
}

#[test]
fn empty_token_sequences_are_refused() {
    let model = load_fixed("siglip_tiny");
    let ids = Tensor::zeros((2, 0), DType::U32, &Device::Cpu).unwrap();
    let full = model
        .model
        .text
        .forward(&ids, None)
        .map(|_| ())
        .unwrap_err();
    let pooled = model.model.text.forward_pooled(&ids, None).unwrap_err();
    for err in [full, pooled] {
        assert!(err.to_string().contains("empty token sequence"), "{err}");
    }
}

#[test]
fn bf16_inference_is_close_to_f32() {
    let f32_model = load_fixed("siglip_tiny");
    let bf16_opts = LoadOptions {
        dtype: DType::BF16,
        ..test_opts()
    };
    let bf16_model = SiglipEncoder::from_dir(&fixture("siglip2/siglip_tiny"), &bf16_opts).unwrap();
    let io = load_st(&fixture("siglip2/siglip_tiny_io.safetensors"));
    let a = f32_model
        .image_embeds_from_pixels(get(&io, "pixel_values"))
        .unwrap();
    let b = bf16_model
        .image_embeds_from_pixels(get(&io, "pixel_values"))
        .unwrap();
    assert_eq!(b.dtype(), DType::F32);
    assert_close("bf16 vs f32 image embeds", &a, &b, 0.1);
}
