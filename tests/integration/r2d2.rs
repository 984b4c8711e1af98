//! R2D2 / PRD2: parity with the original code's tiny fixture, checkpoint handling, the
//! full-size parameter lists, retrieval and re-ranking, bad inputs, and gradients.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Tensor, D};
use tuwen::checkpoint::{Loader, TensorSource};
use tuwen::eval::retrieval::{
    cosine_scores, cross_scores_image_vs_texts, cross_scores_text_vs_images, rank_desc, transpose,
};
use tuwen::eval::{self, recall_at_k, rerank, EncodeOptions, ImageRef, RetrievalDataset};
use tuwen::models::r2d2::{self, JointConfig, R2d2, R2d2Config, R2d2Encoder, IGNORED_KEYS};
use tuwen::nn::{Activation, BertConfig, ClipVisionConfig};
use tuwen::preprocess::{TextProcessor, TextStyle};
use tuwen::{DualEncoder, Error, Family, ImageInput};

use crate::common::{assert_close, fixture, get, load_st, max_abs_diff};
use crate::common::{test_device, test_opts};

/// The tolerance of the network parity checks (fp32 throughout).
const TOL: f32 = 1e-4;
/// From JPEG files, pixel values may differ by one 8-bit level (1/255/std = 0.015): the
/// JPEG decoders differ (the `image` crate's vs libjpeg-turbo in PIL: up to 3-4 levels on
/// 2-12% of the full-size pixels of these two files), and the 8-bit rounding of the two
/// resize passes. Measured: 1.50e-2 max, 1.2e-3 mean.
const JPEG_PIXEL_TOL: f32 = 1.5 / 255.0 / 0.261_302_6;
/// What one-level pixel differences do to the tiny model's outputs. Measured: 4.4e-4 for
/// the image embeddings, 5.4e-5 for the ITM scores; 2e-3 leaves a margin.
const JPEG_TOL: f32 = 2e-3;

fn fixture_json() -> serde_json::Value {
    let p = fixture("original/r2d2_tiny.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn tiny_pth() -> PathBuf {
    fixture("original/r2d2_tiny.pth")
}

fn tokenizer_path() -> PathBuf {
    fixture("data/hfl-roberta-wwm-ext/tokenizer.json")
}

fn io() -> HashMap<String, Tensor> {
    load_st(&fixture("original/r2d2_tiny_io.safetensors"))
}

fn texts() -> Vec<String> {
    fixture_json()["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect()
}

/// The tiny configuration, from the fixture's json. MLP widths are 4× the width, as in
/// BERT and CLIP (the checkpoint's shapes confirm it; a wrong guess fails loading).
pub(crate) fn tiny_config() -> R2d2Config {
    let d = &fixture_json()["tiny_dims"];
    let u = |k: &str| d[k].as_u64().unwrap_or_else(|| panic!("tiny_dims.{k}")) as usize;
    let vision = ClipVisionConfig {
        hidden_size: u("vit_h"),
        intermediate_size: 4 * u("vit_h"),
        num_hidden_layers: u("vit_l"),
        num_attention_heads: u("vit_heads"),
        num_channels: 3,
        image_size: u("vit_img"),
        patch_size: u("vit_patch"),
        hidden_act: Activation::QuickGelu,
        layer_norm_eps: 1e-5,
    };
    let text = BertConfig {
        hidden_size: u("r_text_h"),
        num_hidden_layers: u("r_text_l"),
        num_attention_heads: u("r_text_heads"),
        intermediate_size: 4 * u("r_text_h"),
        ..BertConfig::chinese_roberta_wwm_ext()
    };
    let joint = JointConfig {
        num_hidden_layers: u("joint_l"),
        num_attention_heads: u("r_text_heads"),
        intermediate_size: 4 * u("r_text_h"),
        hidden_act: Activation::Gelu,
        layer_norm_eps: 1e-12,
    };
    R2d2Config {
        model_type: "r2d2".into(),
        vision_config: vision,
        text_config: text,
        joint_config: Some(joint),
        embed_dim: u("embed"),
        max_text_len: fixture_json()["text_max_len"].as_u64().unwrap() as usize,
    }
}

fn load_tiny(path: &Path) -> R2d2Encoder {
    R2d2Encoder::from_checkpoint(
        path,
        Some(&tiny_config()),
        Some(&tokenizer_path()),
        &test_opts(),
    )
    .unwrap_or_else(|e| panic!("loading {}: {e}", path.display()))
}

/// Checks every fixture output from the fixture's own pixel values and token ids.
fn check_network_parity(model: &R2d2Encoder, what: &str) {
    let io = io();
    let ids = get(&io, "input_ids");
    let mask = get(&io, "attention_mask");
    let txt = model.text_features_from_ids(ids, mask).unwrap();
    assert_close(
        &format!("{what} text_embeds"),
        &txt.embeds,
        get(&io, "text_embeds"),
        TOL,
    );
    for name in ["test", "jordan"] {
        let px = get(&io, &format!("pixel_values_{name}"));
        let img = model.image_features_from_pixels(px).unwrap();
        assert_close(
            &format!("{what} image_embeds_{name}"),
            &img.embeds,
            get(&io, &format!("image_embeds_{name}")),
            TOL,
        );
        let itm = model
            .itm_scores_from_tensors(&img.tokens, &txt.states, &txt.mask)
            .unwrap();
        assert_close(
            &format!("{what} itm_scores_{name}"),
            &itm.squeeze(0).unwrap(),
            get(&io, &format!("itm_scores_{name}")),
            TOL,
        );
    }
}

#[test]
fn tokenizer_ids_match_fixture() {
    let tp = TextProcessor::from_file(&tokenizer_path(), TextStyle::Bert, 64).unwrap();
    let t = texts();
    let refs: Vec<&str> = t.iter().map(String::as_str).collect();
    let b = tp.encode_batch(&refs, &Device::Cpu).unwrap();
    let io = io();
    let want = get(&io, "input_ids").to_dtype(DType::U32).unwrap();
    assert_eq!(
        b.input_ids.to_vec2::<u32>().unwrap(),
        want.to_vec2::<u32>().unwrap(),
        "token ids differ from the fixture's"
    );
    let want_mask = get(&io, "attention_mask").to_dtype(DType::U32).unwrap();
    assert_eq!(
        b.attention_mask.to_vec2::<u32>().unwrap(),
        want_mask.to_vec2::<u32>().unwrap()
    );
    assert!(b.truncated.is_empty());
}

#[test]
fn parity_from_pth_tensors() {
    let model = load_tiny(&tiny_pth());
    assert_eq!(model.family(), Family::R2d2);
    check_network_parity(&model, "pth");
    // temp is read as is: logits are cos / temp.
    let io = io();
    let t = model.model.temp.to_scalar::<f32>().unwrap();
    let want_t = fixture_json()["temp"].as_f64().unwrap() as f32;
    assert!((t - want_t).abs() < 1e-7, "temp {t} vs {want_t}");
    let img = get(&io, "image_embeds_test");
    let txt = get(&io, "text_embeds");
    let logits = model.logits(img, txt).unwrap();
    let cos = img.matmul(&txt.t().unwrap()).unwrap();
    assert_close(
        "logits = cos / temp",
        &logits,
        &(cos / want_t as f64).unwrap(),
        1e-5,
    );
    // The unused tensors are reported as ignored, nothing is unexpected.
    let report = model.load_report();
    assert!(report.unexpected.is_empty(), "{:?}", report.unexpected);
    for k in [
        "visual_encoder.embeddings.position_ids",
        "visual_encoder.post_layernorm.weight",
        "text_encoder.pooler.dense.weight",
        "text_encoder.embeddings.position_ids",
        "text_joint_layer.embeddings.word_embeddings.weight",
        "img_joint_layer.embeddings.LayerNorm.bias",
    ] {
        assert!(report.ignored.iter().any(|i| i == k), "{k} not ignored");
    }
}

#[test]
fn parity_after_safetensors_conversion() {
    let dir = tempfile::tempdir().unwrap();
    let st = dir.path().join("model.safetensors");
    let conv = r2d2::convert_checkpoint(&tiny_pth(), &st).unwrap();
    let pth_src = TensorSource::open(&tiny_pth(), Some("model")).unwrap();
    assert_eq!(conv.loaded, pth_src.shapes().len());
    // Same tensors, same values.
    let st_src = TensorSource::open(&st, None).unwrap();
    assert_eq!(st_src.shapes(), pth_src.shapes());
    for k in [
        "temp",
        "itm_head_i.weight",
        "visual_encoder.embeddings.class_embedding",
    ] {
        let a = pth_src.load(k).unwrap().unwrap();
        let b = st_src.load(k).unwrap().unwrap();
        assert_eq!(max_abs_diff(&a, &b), 0.0, "{k}");
    }
    // A model directory: checkpoint + config.json + tokenizer.json, through the registry.
    tiny_config()
        .to_json_file(&dir.path().join("config.json"))
        .unwrap();
    std::fs::copy(tokenizer_path(), dir.path().join("tokenizer.json")).unwrap();
    let model = R2d2Encoder::from_dir(dir.path(), &test_opts()).unwrap();
    check_network_parity(&model, "safetensors");
    let boxed = tuwen::load(dir.path().to_str().unwrap(), &test_opts()).unwrap();
    assert_eq!(boxed.family(), Family::R2d2);
    assert_eq!(boxed.embed_dim(), 32);
}

#[test]
fn parity_from_jpegs_and_texts_through_public_api() {
    let model = load_tiny(&tiny_pth());
    let io = io();
    let images = [
        ImageInput::path(fixture("data/images/test.jpg")),
        ImageInput::path(fixture("data/images/jordan.jpg")),
    ];
    // The fixture resized with torchvision on a PIL image (PIL bicubic, horizontal pass
    // first); we use fast_image_resize's Catmull-Rom in the same pass order. See
    // JPEG_PIXEL_TOL for why pixels may differ by one level.
    let px = model
        .image_processor
        .process_batch(&images, &Device::Cpu)
        .unwrap();
    let want_px = Tensor::cat(
        &[
            get(&io, "pixel_values_test"),
            get(&io, "pixel_values_jordan"),
        ],
        0,
    )
    .unwrap();
    let d_px = max_abs_diff(&px, &want_px);
    let mean_px = (&px - &want_px.to_device(px.device()).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    println!("parity jpeg pixel_values: max abs diff {d_px:.3e}, mean {mean_px:.3e}");

    let t = texts();
    let refs: Vec<&str> = t.iter().map(String::as_str).collect();
    // Texts: the ids are identical, so the embeddings match to the network tolerance.
    let txt = model.embed_texts(&refs).unwrap();
    assert_close("api text_embeds", &txt, get(&io, "text_embeds"), TOL);
    // Images and ITM scores: the decode and resize differences propagate.
    let img = model.embed_images(&images).unwrap();
    let want_img = Tensor::cat(
        &[
            get(&io, "image_embeds_test"),
            get(&io, "image_embeds_jordan"),
        ],
        0,
    )
    .unwrap();
    let itm = model.itm_scores(&images, &refs).unwrap().unwrap();
    let want_itm = Tensor::stack(
        &[get(&io, "itm_scores_test"), get(&io, "itm_scores_jordan")],
        0,
    )
    .unwrap();
    let d_img = max_abs_diff(&img, &want_img);
    let d_itm = max_abs_diff(&itm, &want_itm);
    println!("parity jpeg image_embeds: max abs diff {d_img:.3e} (tolerance {JPEG_TOL:.0e})");
    println!("parity jpeg itm_scores: max abs diff {d_itm:.3e} (tolerance {JPEG_TOL:.0e})");
    assert!(d_px <= JPEG_PIXEL_TOL, "pixel values differ by {d_px}");
    assert!(d_img <= JPEG_TOL && d_itm <= JPEG_TOL);
    // The eval helper agrees with the trait.
    let row = eval::itm_scores(&model, &images[1], &refs).unwrap();
    let want_row = itm.i(1).unwrap().to_vec1::<f32>().unwrap();
    // (Equal up to the GPU's batch-size-dependent summation order.)
    assert_eq!(row.len(), want_row.len());
    for (a, b) in row.iter().zip(&want_row) {
        assert!(
            (a - b).abs() <= 1e-6,
            "eval::itm_scores {a} vs the trait's {b}"
        );
    }
    // Softmax scoring over the texts.
    let probs = model
        .probabilities(&model.logits(&img, &txt).unwrap())
        .unwrap();
    let sums = probs.sum(D::Minus1).unwrap().to_vec1::<f32>().unwrap();
    assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5), "{sums:?}");
}

/// Padding is masked everywhere: the text tower's and the text-joint layer's
/// self-attention, and the image-joint layer's cross-attention. Changing the ids under the
/// mask must not change any output (the fixture's ITM scores are close together, so this
/// is the sharper check of the masks).
#[test]
fn padding_is_masked_everywhere() {
    let model = load_tiny(&tiny_pth());
    let io = io();
    let ids = get(&io, "input_ids").to_dtype(DType::U32).unwrap();
    let mask = get(&io, "attention_mask").to_dtype(DType::U32).unwrap();
    // Padded positions get other, arbitrary token ids.
    let junk = Tensor::arange(1000u32, 1000 + 64 * 11, mask.device())
        .unwrap()
        .reshape((11, 64))
        .unwrap();
    let pad = mask.ones_like().unwrap().sub(&mask).unwrap();
    let ids2 = (ids.mul(&mask).unwrap() + junk.mul(&pad).unwrap()).unwrap();
    assert!(max_abs_diff(&ids, &ids2) > 0.0);
    let img = model
        .image_features_from_pixels(get(&io, "pixel_values_jordan"))
        .unwrap();
    let a = model.text_features_from_ids(&ids, &mask).unwrap();
    let b = model.text_features_from_ids(&ids2, &mask).unwrap();
    assert_close("padding: text_embeds", &a.embeds, &b.embeds, 1e-6);
    let sa = model
        .itm_scores_from_tensors(&img.tokens, &a.states, &a.mask)
        .unwrap();
    let sb = model
        .itm_scores_from_tensors(&img.tokens, &b.states, &b.mask)
        .unwrap();
    assert_close("padding: itm_scores", &sa, &sb, 1e-6);
    // Without the mask the padding would matter: the check can fail.
    let ones = mask.ones_like().unwrap();
    let c = model.text_features_from_ids(&ids2, &ones).unwrap();
    assert!(max_abs_diff(&a.embeds, &c.embeds) > 1e-3);
}

/// A PRD2 checkpoint made from the tiny R2D2 by dropping the cross encoders: same dual
/// encoder outputs, no ITM.
#[test]
fn prd2_is_the_dual_encoder_without_joint_layers() {
    let src = TensorSource::open(&tiny_pth(), Some("model")).unwrap();
    let all = src.load_all().unwrap();
    let kept: BTreeMap<String, Tensor> = all
        .into_iter()
        .filter(|(k, _)| {
            !(k.starts_with("text_joint_layer.")
                || k.starts_with("img_joint_layer.")
                || k.starts_with("img_joint_proj.")
                || k.starts_with("itm_head"))
        })
        .map(|(k, t)| (k, t.contiguous().unwrap()))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("prd2_tiny.safetensors");
    tuwen::checkpoint::save_safetensors(&kept, None, &path).unwrap();
    assert_eq!(r2d2::sniff(&path).unwrap(), Some(Family::Prd2));
    let mut cfg = tiny_config();
    cfg.model_type = "prd2".into();
    cfg.joint_config = None;
    let model =
        R2d2Encoder::from_checkpoint(&path, Some(&cfg), Some(&tokenizer_path()), &test_opts())
            .unwrap();
    assert_eq!(model.family(), Family::Prd2);
    assert!(model.load_report().unexpected.is_empty());
    let io = io();
    let e = model
        .image_embeds_from_pixels(get(&io, "pixel_values_jordan"))
        .unwrap();
    assert_close(
        "prd2 image_embeds",
        &e,
        get(&io, "image_embeds_jordan"),
        TOL,
    );
    let images = [ImageInput::path(fixture("data/images/test.jpg"))];
    assert!(model.itm_scores(&images, &["乔丹投篮"]).unwrap().is_none());
    let err = eval::itm_scores(&model, &images[0], &["乔丹投篮"]).unwrap_err();
    assert!(err.to_string().contains("PRD2"), "{err}");
    // A PRD2 file with an R2D2 config is the wrong family.
    let err =
        R2d2Encoder::from_checkpoint(&path, Some(&tiny_config()), None, &test_opts()).unwrap_err();
    assert!(matches!(err, Error::WrongFamily { .. }), "{err}");
}

#[test]
fn full_size_parameter_lists_match_manifests() {
    for (manifest, preset) in [
        ("manifests/r2d2-vit-l14.json", "r2d2-vit-l14-250m"),
        ("manifests/r2d2-vit-b16.json", "r2d2-vit-b16-flickr30k-cna"),
        ("manifests/prd2-vit-l14.json", "prd2-vit-l14-250m"),
    ] {
        let m: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(fixture(manifest)).unwrap()).unwrap();
        let cfg = R2d2Config::preset(preset).unwrap();
        let built = tuwen::checkpoint::parameter_shapes(|vb| R2d2::new(&cfg, vb)).unwrap();

        let mut expected = BTreeMap::new();
        let mut ignored = Vec::new();
        let mut numel = 0usize;
        for (k, v) in m["tensors"].as_object().unwrap() {
            let shape: Vec<usize> = v["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            numel += shape.iter().product::<usize>();
            if IGNORED_KEYS
                .iter()
                .any(|p| tuwen::checkpoint::matches_pattern(k, p))
            {
                ignored.push(k.clone());
            } else {
                expected.insert(k.clone(), shape);
            }
        }
        // The manifest's count includes the int64 position_ids buffers.
        assert_eq!(
            numel as u64,
            m["parameters"].as_u64().unwrap(),
            "{manifest}: element count"
        );
        let missing: Vec<_> = expected
            .keys()
            .filter(|k| !built.contains_key(*k))
            .collect();
        let extra: Vec<_> = built
            .keys()
            .filter(|k| !expected.contains_key(*k))
            .collect();
        assert!(missing.is_empty(), "{preset}: not built: {missing:?}");
        assert!(extra.is_empty(), "{preset}: not in {manifest}: {extra:?}");
        for (k, s) in &expected {
            assert_eq!(&built[k], s, "{preset}: shape of {k}");
        }
        // The ignored keys are exactly the unused ones.
        for k in &ignored {
            assert!(
                k.ends_with("position_ids")
                    || k.starts_with("text_encoder.pooler.")
                    || k.contains("_joint_layer.embeddings.")
                    || k.starts_with("visual_encoder.post_layernorm."),
                "{k} should not be ignored"
            );
        }
        let n: usize = built.values().map(|s| s.iter().product::<usize>()).sum();
        println!(
            "{preset}: {} tensors ({n} parameters) built, {} ignored, as in {manifest}",
            built.len(),
            ignored.len()
        );
        // The shapes alone give back the preset's config.
        let mut shapes: BTreeMap<String, Vec<usize>> = expected.clone();
        for k in &ignored {
            shapes.insert(k.clone(), vec![1]);
        }
        assert_eq!(
            R2d2Config::infer(&shapes).unwrap(),
            cfg,
            "{preset}: inferred"
        );
    }
}

fn recall_fixture() -> (Vec<Vec<usize>>, Vec<usize>) {
    // 3 images; image 0 has texts 0,1; image 1 has text 2; image 2 has texts 3,4,5.
    (
        vec![vec![0, 1], vec![2], vec![3, 4, 5]],
        vec![0, 0, 1, 2, 2, 2],
    )
}

/// A score row whose ranking is `order` (first = best), with distinct scores.
fn row_from_order(order: &[usize]) -> Vec<f32> {
    let mut r = vec![0.0; order.len()];
    for (p, &j) in order.iter().enumerate() {
        r[j] = 1.0 - 0.05 * p as f32;
    }
    r
}

#[test]
fn recall_at_k_with_ties_and_several_captions() {
    // 4 images, 16 texts; image 0 has six captions, image 1 three, image 2 three, image 3
    // four.
    let img2txt = vec![
        vec![0, 1, 12, 13, 14, 15],
        vec![2, 10, 11],
        vec![3, 4, 5],
        vec![6, 7, 8, 9],
    ];
    let mut txt2img = vec![0; 16];
    for (i, ts) in img2txt.iter().enumerate() {
        for &t in ts {
            txt2img[t] = i;
        }
    }
    let others = |first: &[usize]| -> Vec<usize> {
        let mut o = first.to_vec();
        o.extend((0..16).filter(|j| !first.contains(j)));
        o
    };
    // Image 0: its caption 13 first -> rank 0.
    let r0 = row_from_order(&others(&[13]));
    // Image 1: text 0 and its caption 2 tie at the top; the lower index wins -> rank 1.
    let mut r1 = row_from_order(&others(&[0, 2]));
    r1[2] = r1[0];
    // Image 2: seven foreign texts first -> its best caption is at rank 7.
    let r2 = row_from_order(&others(&[0, 1, 2, 6, 7, 8, 9, 4]));
    // Image 3: twelve foreign texts first -> rank 12, a miss at 10; a NaN ranks last.
    let mut r3 = row_from_order(&others(&[0, 1, 2, 3, 4, 5, 10, 11, 12, 13, 14, 15]));
    r3[6] = f32::NAN;
    let i2t = vec![r0, r1, r2, r3];
    // Text→image: one-hot rows, except text 1 (its image 0 ties image 2 and wins), text 2
    // (its image 1 ties image 0 and loses) and text 3 (its image 2 ranks third).
    let mut t2i: Vec<Vec<f32>> = txt2img
        .iter()
        .map(|&i| (0..4).map(|j| if j == i { 1.0 } else { 0.0 }).collect())
        .collect();
    t2i[1] = vec![0.5, 0.1, 0.5, 0.0];
    t2i[2] = vec![0.7, 0.7, 0.0, 0.0];
    t2i[3] = vec![0.9, 0.1, 0.2, 0.3];
    let r = recall_at_k(&i2t, &t2i, &img2txt, &txt2img).unwrap();
    println!("synthetic recall: {r}");
    let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
    assert!(close(r.txt_r1, 25.0), "{r}");
    assert!(close(r.txt_r5, 50.0), "{r}");
    assert!(close(r.txt_r10, 75.0), "{r}");
    assert!(close(r.txt_r_mean, 50.0), "{r}");
    assert!(close(r.img_r1, 100.0 * 14.0 / 16.0), "{r}");
    assert!(close(r.img_r5, 100.0) && close(r.img_r10, 100.0), "{r}");
    let mean = (r.txt_r1 + r.txt_r5 + r.txt_r10 + r.img_r1 + r.img_r5 + r.img_r10) / 6.0;
    assert!(close(r.r_mean, mean));
    // Wrong shapes are errors, not panics.
    assert!(recall_at_k(&t2i, &i2t, &img2txt, &txt2img).is_err());
    assert!(recall_at_k(&i2t[..3], &t2i, &img2txt, &txt2img).is_err());
}

#[test]
fn rerank_matches_the_original_combination() {
    let (img2txt, txt2img) = recall_fixture();
    // Cosine gets every query wrong at R@1; the cross encoder knows the truth.
    let i2t = vec![
        vec![0.5, 0.4, 0.6, 0.1, 0.2, 0.3],
        vec![0.5, 0.5, 0.1, 0.4, 0.3, 0.6],
        vec![0.6, 0.5, 0.1, 0.2, 0.4, 0.3],
    ];
    let truth = |i: usize, j: usize| img2txt[i].contains(&j);
    let before = recall_at_k(&i2t, &transpose(&i2t), &img2txt, &txt2img).unwrap();
    assert_eq!(before.txt_r1, 0.0);
    let mut calls = Vec::new();
    let rr = rerank(&i2t, 3, false, |i, cand| {
        calls.push((i, cand.to_vec()));
        Ok(cand
            .iter()
            .map(|&j| if truth(i, j) { 1.0 } else { 0.0 })
            .collect())
    })
    .unwrap();
    // Row 1: top 3 by cosine are 5, 0, 1 (0 and 1 tie at 0.5: lower index first), so
    // text 2 (its caption) is not re-ranked.
    assert_eq!(calls[1], (1, vec![5, 0, 1]));
    assert_eq!(calls[0], (0, vec![2, 0, 1]));
    assert_eq!(calls[2], (2, vec![0, 1, 4]));
    for (i, row) in rr.iter().enumerate() {
        let cand = &calls[i].1;
        for (j, &s) in row.iter().enumerate() {
            if cand.contains(&j) {
                let want = i2t[i][j] + if truth(i, j) { 1.0 } else { 0.0 };
                assert!((s - want).abs() < 1e-6, "({i},{j}) {s} vs {want}");
            } else {
                assert_eq!(s, -100.0);
            }
        }
    }
    let t2i_cos = transpose(&i2t);
    let after = recall_at_k(&rr, &t2i_cos, &img2txt, &txt2img).unwrap();
    // Images 0 and 2 now rank a caption first; image 1's caption was outside the top 3.
    assert!((after.txt_r1 - 200.0 / 3.0).abs() < 1e-9, "{after}");
    // Row 1's candidates all score 0 in ITM: cosine decides, the tie keeps index order.
    assert_eq!(rank_desc(&rr[1])[..3], [5, 0, 1]);
    // k larger than the row re-ranks everything; k = 0 is an error.
    let all = rerank(&i2t, 100, false, |_, c| Ok(vec![0.0; c.len()])).unwrap();
    assert_eq!(all, i2t);
    assert!(rerank(&i2t, 0, false, |_, c| Ok(vec![0.0; c.len()])).is_err());
    assert!(rerank(&i2t, 2, false, |_, _| Ok(vec![0.0])).is_err());
}

/// End to end on the tiny model: the re-ranking helpers give the same scores as the
/// cross encoder applied directly, and the evaluation runs on a manifest.
#[test]
fn retrieval_end_to_end_on_tiny_model() {
    let model = load_tiny(&tiny_pth());
    let dir = tempfile::tempdir().unwrap();
    let t = texts();
    // Relative paths resolve against the manifest's directory.
    std::fs::create_dir(dir.path().join("img")).unwrap();
    for n in ["test", "jordan"] {
        std::fs::copy(
            fixture(&format!("data/images/{n}.jpg")),
            dir.path().join(format!("img/{n}.jpg")),
        )
        .unwrap();
    }
    let line = |img: &str, caps: &[String]| {
        serde_json::json!({"image": img, "captions": caps}).to_string()
    };
    let manifest = format!(
        "{}\n\n{}\n",
        line("img/test.jpg", &t[..6]),
        line("img/jordan.jpg", &t[6..9])
    );
    let mpath = dir.path().join("set.jsonl");
    std::fs::write(&mpath, manifest).unwrap();
    let data = RetrievalDataset::from_jsonl(&mpath).unwrap();
    assert_eq!(
        data.images[0],
        ImageRef::Path(dir.path().join("img/test.jpg"))
    );
    assert_eq!(
        data.img2txt,
        vec![(0..6).collect::<Vec<_>>(), vec![6, 7, 8]]
    );
    let txt2img: Vec<usize> = data.txt2img.iter().map(|v| v[0]).collect();
    assert!(data.txt2img.iter().all(|v| v.len() == 1));
    assert_eq!(txt2img, vec![0, 0, 0, 0, 0, 0, 1, 1, 1]);

    let refs: Vec<&str> = data.texts.iter().map(String::as_str).collect();
    let images: Vec<ImageInput> = ["img/test.jpg", "img/jordan.jpg"]
        .iter()
        .map(|p| ImageInput::path(dir.path().join(p)))
        .collect();
    let eo = |b: usize| EncodeOptions {
        image_batch_size: b,
        text_batch_size: b,
        keep_states: true,
        ..Default::default()
    };
    let txt = eval::encode::encode_texts(&model, &refs, &eo(4)).unwrap();
    let img = eval::encode::encode_images(&model, &data.images, &data.boxes, &eo(1))
        .unwrap()
        .encoded;
    assert_eq!(txt.len(), 9);
    // Batched embeddings equal one-shot ones.
    let direct = model.embed_texts(&refs).unwrap();
    assert_close("batched text embeds", &txt.embeds, &direct, 1e-6);
    let direct_itm = model.itm_scores(&images, &refs).unwrap().unwrap();
    let cand: Vec<usize> = vec![8, 0, 3];
    let s = cross_scores_image_vs_texts(&model, &img, &txt, 1, &cand, 2).unwrap();
    assert!(model.cross_encoder().is_some());
    for (c, v) in cand.iter().zip(&s) {
        let want = direct_itm.i((1, *c)).unwrap().to_scalar::<f32>().unwrap();
        assert!((v - want).abs() < 1e-5, "i2t pair (1,{c}): {v} vs {want}");
    }
    let s = cross_scores_text_vs_images(&model, &img, &txt, 7, &[1, 0], 1).unwrap();
    for (c, v) in [1usize, 0].iter().zip(&s) {
        let want = direct_itm.i((*c, 7)).unwrap().to_scalar::<f32>().unwrap();
        assert!((v - want).abs() < 1e-5, "t2i pair ({c},7): {v} vs {want}");
    }

    let opts = eval::RetrievalOptions {
        top_k: 2,
        rerank: true,
        ..Default::default()
    };
    let report = eval::evaluate(&model, &data, &opts).unwrap();
    let cos = cosine_scores(&img, &txt).unwrap();
    let want = recall_at_k(&cos, &transpose(&cos), &data.img2txt, &txt2img).unwrap();
    assert_eq!(report.cosine, want);
    let i2t = rerank(&cos, 2, false, |i, c| {
        Ok(c.iter()
            .map(|&j| direct_itm.i((i, j)).unwrap().to_scalar::<f32>().unwrap())
            .collect())
    })
    .unwrap();
    let t2i = rerank(&transpose(&cos), 2, false, |t, c| {
        Ok(c.iter()
            .map(|&j| direct_itm.i((j, t)).unwrap().to_scalar::<f32>().unwrap())
            .collect())
    })
    .unwrap();
    let want = recall_at_k(&i2t, &t2i, &data.img2txt, &txt2img).unwrap();
    let got = report.reranked.unwrap();
    for (a, b) in [
        (got.txt_r1, want.txt_r1),
        (got.img_r1, want.img_r1),
        (got.r_mean, want.r_mean),
    ] {
        assert!((a - b).abs() < 1e-9, "{got} vs {want}");
    }
    println!("tiny retrieval: cosine {}; re-ranked {got}", report.cosine);

    // Bad manifests fail with the line number.
    std::fs::write(&mpath, "{\"image\": \"a.jpg\", \"captions\": []}\n").unwrap();
    let e = RetrievalDataset::from_jsonl(&mpath).unwrap_err();
    assert!(e.to_string().contains("line 1"), "{e}");
    std::fs::write(&mpath, "{\"image\": \"a.jpg\"}\n").unwrap();
    assert!(RetrievalDataset::from_jsonl(&mpath).is_err());
}

#[test]
fn empty_text_list_is_an_error() {
    let model = load_tiny(&tiny_pth());
    let e = model.embed_texts(&[]).unwrap_err();
    assert!(matches!(e, Error::Text(_)), "{e}");
    let img = ImageInput::path(fixture("data/images/test.jpg"));
    assert!(eval::itm_scores(&model, &img, &[]).is_err());
    assert!(model.itm_scores(&[img], &[]).is_err());
}

#[test]
fn long_text_is_truncated_and_reported() {
    let model = load_tiny(&tiny_pth());
    let long = "乔丹在比赛的最后一秒投篮得分，观众欢呼。".repeat(8);
    let f = model.text_features(&["乔丹投篮", &long]).unwrap();
    assert_eq!(
        f.truncated,
        vec![1],
        "the long text is reported as truncated"
    );
    assert_eq!(f.embeds.dims(), &[2, 32]);
    // The output is that of the first 62 tokens between [CLS] and [SEP].
    let tp = model.text_processor().unwrap();
    let enc = tp.tokenizer().encode(long.as_str(), true).unwrap();
    let full = enc.get_ids();
    assert!(full.len() > 64);
    let mut ids: Vec<u32> = full[..63].to_vec();
    ids.push(*full.last().unwrap());
    let ids_t = Tensor::from_vec(ids, (1, 64), &Device::Cpu).unwrap();
    let mask = Tensor::ones((1, 64), DType::U32, &Device::Cpu).unwrap();
    let want = model.text_embeds_from_ids(&ids_t, &mask).unwrap();
    assert_close("truncated text", &f.embeds.i(1..2).unwrap(), &want, 1e-6);
    let itm = eval::itm_scores(
        &model,
        &ImageInput::path(fixture("data/images/jordan.jpg")),
        &[long.as_str()],
    )
    .unwrap();
    assert!(itm[0].is_finite() && (0.0..=1.0).contains(&itm[0]));
}

#[test]
fn corrupt_image_is_an_error() {
    let model = load_tiny(&tiny_pth());
    let mut bytes = std::fs::read(fixture("data/images/test.jpg")).unwrap();
    bytes.truncate(200);
    for input in [
        ImageInput::bytes(bytes),
        ImageInput::bytes(b"not an image at all".to_vec()),
        ImageInput::bytes(Vec::new()),
        ImageInput::path("/nonexistent/r2d2.jpg"),
    ] {
        let e = model.embed_images(&[input]).unwrap_err();
        assert!(matches!(e, Error::Image { .. }), "{e}");
    }
}

#[test]
fn wrong_family_checkpoint_says_what_it_found() {
    let brivl = fixture("original/brivl_tiny.pth");
    let e = R2d2Encoder::from_checkpoint(&brivl, None, None, &test_opts()).unwrap_err();
    let msg = e.to_string();
    println!("wrong family: {msg}");
    assert!(matches!(e, Error::WrongFamily { .. }), "{msg}");
    assert!(
        msg.contains("'learnable'") && msg.contains("BriVL"),
        "{msg}"
    );
    assert_eq!(r2d2::sniff(&brivl).unwrap(), None);
    // A foreign safetensors file too.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.safetensors");
    let mut m = BTreeMap::new();
    m.insert(
        "vision_model.embeddings.patch_embedding.weight".to_string(),
        Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap(),
    );
    m.insert(
        "text_model.head.weight".to_string(),
        Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap(),
    );
    tuwen::checkpoint::save_safetensors(&m, None, &p).unwrap();
    let e = R2d2Encoder::from_checkpoint(&p, None, None, &test_opts()).unwrap_err();
    assert!(matches!(e, Error::WrongFamily { .. }), "{e}");
    assert!(e.to_string().contains("vision_model"), "{e}");
}

/// Writes the tiny checkpoint with one tensor changed by `edit`.
fn tiny_with(edit: impl FnOnce(&mut BTreeMap<String, Tensor>)) -> (tempfile::TempDir, PathBuf) {
    let src = TensorSource::open(&tiny_pth(), Some("model")).unwrap();
    let mut all: BTreeMap<String, Tensor> = src
        .load_all()
        .unwrap()
        .into_iter()
        .map(|(k, t)| (k, t.contiguous().unwrap()))
        .collect();
    edit(&mut all);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("edited.safetensors");
    tuwen::checkpoint::save_safetensors(&all, None, &p).unwrap();
    (dir, p)
}

#[test]
fn missing_tensor_names_the_key() {
    let key = "img_joint_layer.encoder.layer.1.crossattention.self.key.weight";
    let (_d, p) = tiny_with(|m| {
        m.remove(key);
    });
    let e = R2d2Encoder::from_checkpoint(&p, Some(&tiny_config()), None, &test_opts()).unwrap_err();
    println!("missing: {e}");
    assert!(
        matches!(&e, Error::MissingTensor { key: k, .. } if k == key),
        "{e}"
    );
    assert!(e.to_string().contains(key));
}

#[test]
fn mis_shaped_tensor_names_both_shapes() {
    let key = "vision_proj.weight";
    let (_d, p) = tiny_with(|m| {
        m.insert(
            key.into(),
            Tensor::zeros((32, 48), DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let e = R2d2Encoder::from_checkpoint(&p, Some(&tiny_config()), None, &test_opts()).unwrap_err();
    let msg = e.to_string();
    println!("mis-shaped: {msg}");
    assert!(
        matches!(&e, Error::ShapeMismatch { key: k, expected, found, .. }
            if k == key && expected == &[32, 64] && found == &[32, 48]),
        "{msg}"
    );
    assert!(
        msg.contains("[32, 48]") && msg.contains("[32, 64]"),
        "{msg}"
    );
}

#[test]
fn extra_keys_are_reported_not_fatal() {
    let (_d, p) = tiny_with(|m| {
        m.insert(
            "optimizer.state.0.exp_avg".into(),
            Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let model = R2d2Encoder::from_checkpoint(
        &p,
        Some(&tiny_config()),
        Some(&tokenizer_path()),
        &test_opts(),
    )
    .unwrap();
    assert_eq!(
        model.load_report().unexpected,
        vec!["optimizer.state.0.exp_avg".to_string()]
    );
}

#[test]
fn presets_are_registered_and_say_where_to_download() {
    let names: Vec<String> = tuwen::registry::presets()
        .into_iter()
        .filter(|p| matches!(p.family, Family::R2d2 | Family::Prd2))
        .map(|p| p.name)
        .collect();
    assert_eq!(names.len(), 8, "{names:?}");
    for n in [
        "r2d2-vit-l14-250m",
        "r2d2-vit-l14-23m",
        "prd2-vit-l14-250m",
        "r2d2-vit-b16-flickr30k-cna",
        "r2d2-vit-b16-iqr",
        "r2d2-vit-b16-icr",
        "r2d2-vit-b16-iqm",
        "r2d2-vit-b16-icm",
    ] {
        assert!(names.iter().any(|x| x == n), "{n}");
    }
    let dir = tempfile::tempdir().unwrap();
    std::env::set_var("TUWEN_WEIGHTS_DIR", dir.path());
    let e = tuwen::load("r2d2-vit-b16-icr", &test_opts())
        .err()
        .expect("no weights in an empty directory");
    let msg = e.to_string();
    assert!(
        msg.contains("manually") && msg.contains("https://drive.google.com/"),
        "{msg}"
    );
    // Once the file is where the message says, the preset loads (the tiny checkpoint
    // stands in for the real one: the config is inferred from its shapes).
    std::fs::copy(tiny_pth(), dir.path().join("r2d2-vit-b16-icr.pth")).unwrap();
    std::fs::copy(tokenizer_path(), dir.path().join("tokenizer.json")).unwrap();
    assert_eq!(
        r2d2::locate_preset("r2d2-vit-b16-icr").unwrap(),
        dir.path().join("r2d2-vit-b16-icr.pth")
    );
    let m = tuwen::load("r2d2-vit-b16-icr", &test_opts()).unwrap();
    assert_eq!((m.family(), m.embed_dim()), (Family::R2d2, 32));
    std::env::remove_var("TUWEN_WEIGHTS_DIR");
}

/// Every trainable parameter of the tiny R2D2 gets a non-zero gradient from a loss that
/// combines the contrastive logits and both ITM heads.
#[test]
fn every_trainable_parameter_gets_a_gradient() {
    let src = TensorSource::open(&tiny_pth(), Some("model")).unwrap();
    let (loader, vars) = Loader::new(src, "r2d2_tiny.pth").trainable().unwrap();
    let vb = loader.var_builder(DType::F32, &test_device());
    let net = R2d2::new(&tiny_config(), vb)
        .map_err(|e| loader.error(e))
        .unwrap();
    let io = io();
    let px = Tensor::cat(
        &[
            get(&io, "pixel_values_test"),
            get(&io, "pixel_values_jordan"),
        ],
        0,
    )
    .unwrap();
    let ids = get(&io, "input_ids").i(5..7).unwrap();
    let mask = get(&io, "attention_mask").i(5..7).unwrap();
    let (tokens, img) = net.encode_image(&px).unwrap();
    let (states, txt) = net.encode_text(&ids, &mask).unwrap();
    // Contrastive: image i matches text i, both directions.
    let logits = net.logits(&img, &txt).unwrap();
    let target = Tensor::new(&[0u32, 1], &test_device()).unwrap();
    let l_i2t = tuwen::nn::ops::cross_entropy(&logits, &target).unwrap();
    let l_t2i = tuwen::nn::ops::cross_entropy(&logits.t().unwrap(), &target).unwrap();
    // ITM: the matching pairs and one swapped negative pair per head.
    let tok2 = Tensor::cat(&[&tokens, &tokens.i(1..2).unwrap()], 0).unwrap();
    let st2 = Tensor::cat(&[&states, &states.i(0..1).unwrap()], 0).unwrap();
    let m2 = Tensor::cat(&[&mask, &mask.i(0..1).unwrap()], 0).unwrap();
    let (lt, li) = net.itm_logits(&tok2, &st2, &m2).unwrap();
    let itm_target = Tensor::new(&[1u32, 1, 0], &test_device()).unwrap();
    let l_itm = (tuwen::nn::ops::cross_entropy(&lt, &itm_target).unwrap()
        + tuwen::nn::ops::cross_entropy(&li, &itm_target).unwrap())
    .unwrap();
    let loss = ((l_i2t + l_t2i).unwrap() + l_itm).unwrap();
    let grads = loss.backward().unwrap();
    let data = vars.data().lock().unwrap();
    assert!(data.len() > 100, "only {} trainable tensors", data.len());
    let mut zero = Vec::new();
    for (name, var) in data.iter() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        let n = g
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(n.is_finite(), "{name}: gradient {n}");
        if n == 0.0 {
            zero.push(name.clone());
        }
    }
    assert!(zero.is_empty(), "zero gradients: {zero:?}");
    println!("gradients: {} trainable tensors, all non-zero", data.len());
}

/// R2D2's preprocessing resizes with PIL's bicubic filter (torchvision on a PIL image). On
/// a hard-edged image, where bicubic overshoots and the 8-bit intermediate is clipped, our
/// resize must match PIL to one level (it did not when the vertical pass ran first).
#[test]
fn clip_resize_matches_pil() {
    use tuwen::preprocess::image::{resize_pil, Resample};
    let refs = load_st(&crate::common::fixture("r2d2/pil_resize.safetensors"));
    let src = ImageInput::path(crate::common::fixture("r2d2/resize_src.png"))
        .decode_rgb()
        .unwrap();
    assert_eq!(src.dimensions(), (131, 83));
    assert_eq!(refs.len(), 10);
    for (name, want) in &refs {
        let (filter, size) = name.split_once('_').unwrap();
        let (w, h) = size.split_once('x').unwrap();
        let (w, h): (u32, u32) = (w.parse().unwrap(), h.parse().unwrap());
        let filter = match filter {
            "bicubic" => Resample::Bicubic,
            "bilinear" => Resample::Bilinear,
            f => panic!("unknown filter {f}"),
        };
        let got = resize_pil(&src, w, h, filter).unwrap();
        let want = want.flatten_all().unwrap().to_vec1::<u8>().unwrap();
        let diffs: Vec<i32> = got
            .as_raw()
            .iter()
            .zip(&want)
            .map(|(a, b)| (*a as i32 - *b as i32).abs())
            .collect();
        assert_eq!(diffs.len(), want.len());
        let max = diffs.iter().copied().max().unwrap_or(0);
        let mean = diffs.iter().sum::<i32>() as f64 / diffs.len() as f64;
        println!("parity PIL resize {name}: max {max} levels, mean {mean:.4}");
        assert!(max <= 1 && mean < 0.01, "{name}: max {max}, mean {mean}");
    }
}

/// The inference shortcut for one image shared by many texts (a stride-0 broadcast: the
/// image projections and the image-joint layer's first self-attention computed once, the
/// text-joint cross-attention run per head over all texts) gives the scores of the plain
/// path on a materialised copy.
#[test]
fn itm_with_a_broadcast_image_matches_a_materialised_copy() {
    let model = load_tiny(&tiny_pth());
    let io = io();
    let txt = model
        .text_features_from_ids(get(&io, "input_ids"), get(&io, "attention_mask"))
        .unwrap();
    let img = model
        .image_features_from_pixels(get(&io, "pixel_values_jordan"))
        .unwrap();
    let (_, l, vw) = img.tokens.dims3().unwrap();
    let k = txt.states.dim(0).unwrap();
    let shared = img.tokens.broadcast_as((k, l, vw)).unwrap();
    assert_eq!(shared.stride()[0], 0);
    let copy = shared.contiguous().unwrap();
    let net = &model.model;
    let (a_t, a_i) = net.itm_logits(&shared, &txt.states, &txt.mask).unwrap();
    let (b_t, b_i) = net.itm_logits(&copy, &txt.states, &txt.mask).unwrap();
    assert_close("broadcast itm_head", &a_t, &b_t, 1e-5);
    assert_close("broadcast itm_head_i", &a_i, &b_i, 1e-5);
    // The logits differ between texts: a shortcut that mixed rows up would show.
    let spread = b_t.max(0).unwrap().sub(&b_t.min(0).unwrap()).unwrap();
    assert!(
        spread
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 1e-4
    );
}
