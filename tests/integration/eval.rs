//! Evaluation for every family: retrieval and zero-shot on synthetic sets with a known
//! answer (ties included) in both dataset formats, the metrics against an independent
//! numpy computation, matching, the embedding cache, and bad datasets.

use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine;
use tuwen::eval::retrieval::recall_from_hits;
use tuwen::eval::topk::top_k_dot;
use tuwen::eval::zero_shot::{roc_auc, zero_shot_metrics};
use tuwen::eval::{
    evaluate, evaluate_matching, evaluate_zero_shot, ClassificationDataset, EmbeddingCache,
    MatchingDataset, RetrievalDataset, RetrievalOptions, ZeroShotOptions,
};
use tuwen::{DualEncoder, Error, LoadOptions};

use crate::common::{fixture, get, load_st};
use crate::examples::{example, run_example};

const TOKENIZER_BERT: &str = "data/hfl-roberta-wwm-ext/tokenizer.json";

fn copy(from: PathBuf, to: PathBuf) {
    std::fs::copy(&from, &to).unwrap_or_else(|e| panic!("{}: {e}", from.display()));
}

/// A model directory per family, laid out as a user would for `tuwen::load`.
pub(crate) fn family_dir(family: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    match family {
        "siglip" | "siglip2-naflex" => {
            let src = if family == "siglip" {
                "siglip2/siglip_tiny"
            } else {
                "siglip2/siglip2_naflex_tiny"
            };
            for f in ["config.json", "model.safetensors"] {
                copy(fixture(&format!("{src}/{f}")), d.join(f));
            }
            copy(
                fixture("siglip2/tokenizer/tokenizer.json"),
                d.join("tokenizer.json"),
            );
        }
        "brivl" => {
            copy(fixture("original/brivl_tiny.pth"), d.join("brivl_tiny.pth"));
            copy(fixture("original/brivl_tiny.json"), d.join("config.json"));
            copy(fixture(TOKENIZER_BERT), d.join("tokenizer.json"));
        }
        "r2d2" => {
            copy(fixture("original/r2d2_tiny.pth"), d.join("r2d2_tiny.pth"));
            let cfg = serde_json::to_string(&crate::r2d2::tiny_config()).unwrap();
            std::fs::write(d.join("config.json"), cfg).unwrap();
            copy(fixture(TOKENIZER_BERT), d.join("tokenizer.json"));
        }
        other => panic!("no tiny model for {other}"),
    }
    dir
}

const FAMILIES: &[&str] = &["siglip", "siglip2-naflex", "brivl", "r2d2"];

fn load(dir: &Path) -> Box<dyn DualEncoder> {
    // The tiny BriVL holds 6 boxes: a 2×2 grid plus the whole image.
    let opts = LoadOptions {
        box_grid: Some(2),
        ..LoadOptions::default()
    };
    tuwen::load(dir.to_str().unwrap(), &opts)
        .unwrap_or_else(|e| panic!("loading {}: {e}", dir.display()))
}

const N: usize = 12;

/// Chinese-CLIP's format: 12 copies of one image (plus a 13th, a distractor with no
/// text) and 12 copies of one text; text `t` names images `t` and `(t + 3) % 12`. Every
/// score ties, so the ranks come from the tie rule alone (lower index first): see
/// [`known_multi`].
fn write_cnclip(dir: &Path, split: &str) {
    let b64 = base64::engine::general_purpose::STANDARD
        .encode(std::fs::read(fixture("data/images/test.jpg")).unwrap());
    let mut tsv = String::new();
    for i in 0..=N {
        tsv += &format!("{}\t{b64}\n", 100 + i);
    }
    std::fs::write(dir.join(format!("{split}_imgs.tsv")), tsv).unwrap();
    let mut jsonl = String::new();
    for t in 0..N {
        jsonl += &serde_json::json!({
            "text_id": 5000 + t,
            "text": "草地上的一只猫",
            "image_ids": [100 + t, 100 + (t + 3) % N],
        })
        .to_string();
        jsonl.push('\n');
    }
    std::fs::write(dir.join(format!("{split}_texts.jsonl")), jsonl).unwrap();
}

/// The crate's manifest: 12 copies of one image, each with one copy of one caption, so
/// that caption `t` belongs to image `t` and ranks `t`-th both ways.
fn write_manifest(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir.join("img")).unwrap();
    let mut jsonl = String::new();
    for i in 0..N {
        copy(
            fixture("data/images/test.jpg"),
            dir.join(format!("img/{i:02}.jpg")),
        );
        jsonl += &serde_json::json!({"image": format!("img/{i:02}.jpg"), "captions": ["草地上的一只猫"]})
            .to_string();
        jsonl.push('\n');
    }
    let p = dir.join("set.jsonl");
    std::fs::write(&p, jsonl).unwrap();
    p
}

/// Recall of [`write_cnclip`]'s set: the best relevant rank of query `q` is
/// `min(q, (q ± 3) mod 12)`, i.e. ranks 0..8 and 0, 1, 2 both ways: R@1 2/12, R@5 8/12,
/// R@10 12/12.
fn known_multi() -> [f64; 3] {
    [200.0 / 12.0, 800.0 / 12.0, 100.0]
}

/// Recall of [`write_manifest`]'s set: ranks 0..11: R@1 1/12, R@5 5/12, R@10 10/12.
fn known_single() -> [f64; 3] {
    [100.0 / 12.0, 500.0 / 12.0, 1000.0 / 12.0]
}

fn assert_recall(what: &str, r: &tuwen::eval::Recall, want: [f64; 3]) {
    let got = [r.txt_r1, r.txt_r5, r.txt_r10, r.img_r1, r.img_r5, r.img_r10];
    let want6 = [want[0], want[1], want[2], want[0], want[1], want[2]];
    for (g, w) in got.iter().zip(want6) {
        assert!(
            (g - w).abs() < 1e-9,
            "{what}: {r} (want {want:?} both ways)"
        );
    }
    let mean = want.iter().sum::<f64>() / 3.0;
    assert!((r.r_mean - mean).abs() < 1e-9, "{what}: mean {}", r.r_mean);
}

/// One image and one text per forward pass, so that equal inputs give bitwise equal
/// embeddings and every score ties exactly.
fn one_at_a_time() -> RetrievalOptions {
    RetrievalOptions {
        image_batch_size: 1,
        text_batch_size: 1,
        top_k: 4,
        ..Default::default()
    }
}

#[test]
fn retrieval_known_answer_every_family_both_formats() {
    let data_dir = tempfile::tempdir().unwrap();
    write_cnclip(data_dir.path(), "valid");
    let manifest = write_manifest(data_dir.path());
    let cn = RetrievalDataset::open(data_dir.path(), Some("valid")).unwrap();
    assert_eq!((cn.num_images(), cn.num_texts()), (N + 1, N));
    assert_eq!(cn.txt2img[9], vec![9, 0]);
    assert!(cn.img2txt[N].is_empty(), "image 112 is a distractor");
    assert_eq!(cn.image_ids[3], "103");
    assert_eq!(cn.text_ids[0], "5000");
    let mf = RetrievalDataset::open(&manifest, None).unwrap();
    assert_eq!((mf.num_images(), mf.num_texts()), (N, N));
    for family in FAMILIES {
        let dir = family_dir(family);
        let model = load(dir.path());
        let r = evaluate(model.as_ref(), &cn, &one_at_a_time()).unwrap();
        assert_recall(
            &format!("{family} Chinese-CLIP format"),
            &r.cosine,
            known_multi(),
        );
        assert_eq!((r.i2t_queries, r.t2i_queries), (N, N));
        let r = evaluate(model.as_ref(), &mf, &one_at_a_time()).unwrap();
        assert_recall(&format!("{family} manifest"), &r.cosine, known_single());
        // Re-ranking: R2D2 re-ranks (the ITM scores tie too), the others refuse.
        let rr = RetrievalOptions {
            rerank: true,
            ..one_at_a_time()
        };
        match model.cross_encoder() {
            Some(_) => {
                let r = evaluate(model.as_ref(), &cn, &rr).unwrap();
                assert_recall(
                    "r2d2 re-ranked",
                    r.reranked.as_ref().unwrap(),
                    known_multi(),
                );
            }
            None => {
                let e = evaluate(model.as_ref(), &cn, &rr).unwrap_err();
                assert!(
                    matches!(e, Error::Config(_)) && e.to_string().contains("cross encoder"),
                    "{family}: {e}"
                );
            }
        }
        println!("{family}: retrieval known answers hold in both formats");
    }
}

/// A class folder tree (ELEVATER layout) with three classes of the same name: every class
/// embedding is the same, so every image is predicted class 0.
fn write_elevater(root: &Path, names: &[&str]) {
    for c in 0..3 {
        let d = root.join(format!("test/{c:03}"));
        std::fs::create_dir_all(&d).unwrap();
        for (j, img) in ["test.jpg", "jordan.jpg"].iter().enumerate() {
            copy(
                fixture(&format!("data/images/{img}")),
                d.join(format!("{j}.jpg")),
            );
        }
    }
    std::fs::write(root.join("label_cn.txt"), names.join("\n") + "\n").unwrap();
}

#[test]
fn zero_shot_known_answer_every_family_both_formats() {
    let root = tempfile::tempdir().unwrap();
    write_elevater(root.path(), &["猫", "猫", "猫"]);
    let folder = ClassificationDataset::open(root.path(), Some("test"), None).unwrap();
    assert_eq!(folder.classes.len(), 3);
    assert_eq!(folder.labels, vec![0, 0, 1, 1, 2, 2]);
    let csv = root.path().join("test.csv");
    let mut s = String::from("path,label\n");
    for (img, l) in folder.images.iter().zip(&folder.labels) {
        s += &format!("{},{l}\n", img.origin());
    }
    std::fs::write(&csv, s).unwrap();
    let csv_set =
        ClassificationDataset::open(&csv, None, Some(&root.path().join("label_cn.txt"))).unwrap();
    assert_eq!(csv_set.labels, folder.labels);
    let templates = vec!["一张{}的照片。".to_string(), "{}".to_string()];
    let opts = ZeroShotOptions {
        image_batch_size: 4,
        text_batch_size: 1,
        ..Default::default()
    };
    for family in FAMILIES {
        let dir = family_dir(family);
        let model = load(dir.path());
        for (form, data) in [("folder", &folder), ("csv", &csv_set)] {
            let r = evaluate_zero_shot(model.as_ref(), data, &templates, &opts).unwrap();
            let what = format!("{family} {form}");
            assert_eq!(r.predictions, vec![0; 6], "{what}: ties go to class 0");
            assert!(
                (r.top1 - 100.0 / 3.0).abs() < 1e-9,
                "{what}: top-1 {}",
                r.top1
            );
            assert!((r.top5 - 100.0).abs() < 1e-9, "{what}: top-5 {}", r.top5);
            assert_eq!(r.per_class_recall, vec![Some(100.0), Some(0.0), Some(0.0)]);
            assert!((r.mean_per_class_recall - 100.0 / 3.0).abs() < 1e-9);
            assert_eq!((r.num_images, r.num_classes, r.num_templates), (6, 3, 2));
        }
    }
}

/// Distinct class names: the predictions equal an argmax computed here from
/// `embed_texts` and `embed_images` directly (prompt ensemble by hand).
#[test]
fn zero_shot_predictions_equal_a_direct_computation() {
    let root = tempfile::tempdir().unwrap();
    let names = ["猫", "篮球运动员", "汽车"];
    write_elevater(root.path(), &names);
    let data = ClassificationDataset::open(root.path(), None, None).unwrap();
    let templates = vec!["一张{}的照片。".to_string(), "这是{}".to_string()];
    for family in FAMILIES {
        let dir = family_dir(family);
        let model = load(dir.path());
        let r = evaluate_zero_shot(model.as_ref(), &data, &templates, &Default::default()).unwrap();
        let mut cls = Vec::new();
        for n in names {
            let p: Vec<String> = templates.iter().map(|t| t.replace("{}", n)).collect();
            let refs: Vec<&str> = p.iter().map(String::as_str).collect();
            let e = model.embed_texts(&refs).unwrap().to_vec2::<f32>().unwrap();
            let mut m: Vec<f32> = (0..e[0].len())
                .map(|j| e.iter().map(|r| r[j]).sum::<f32>() / e.len() as f32)
                .collect();
            let norm = m.iter().map(|x| x * x).sum::<f32>().sqrt();
            m.iter_mut().for_each(|x| *x /= norm);
            cls.push(m);
        }
        let imgs: Vec<tuwen::ImageInput> = data
            .images
            .iter()
            .map(|r| tuwen::ImageInput::path(r.origin()))
            .collect();
        let ie = model.embed_images(&imgs).unwrap().to_vec2::<f32>().unwrap();
        for (i, row) in ie.iter().enumerate() {
            let s: Vec<f32> = cls
                .iter()
                .map(|c| c.iter().zip(row).map(|(a, b)| a * b).sum())
                .collect();
            let best = (0..3)
                .max_by(|&a, &b| s[a].total_cmp(&s[b]).then(b.cmp(&a)))
                .unwrap();
            let mut sorted = s.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            if sorted[0] - sorted[1] > 1e-5 {
                assert_eq!(r.predictions[i], best, "{family} image {i}: scores {s:?}");
            }
        }
    }
}

#[test]
fn metrics_equal_the_numpy_reference() {
    let e = load_st(&fixture("eval/embeds.safetensors"));
    let rel: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("eval/relations.json")).unwrap())
            .unwrap();
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("eval/reference.json")).unwrap())
            .unwrap();
    let (img, txt) = (get(&e, "image_embeds"), get(&e, "text_embeds"));
    let txt2img: Vec<Vec<usize>> = serde_json::from_value(rel["txt2img"].clone()).unwrap();
    let ni = img.dims()[0];
    let img2txt: Vec<Vec<usize>> = (0..ni)
        .map(|i| {
            (0..txt2img.len())
                .filter(|&t| txt2img[t].contains(&i))
                .collect()
        })
        .collect();
    let r = recall_from_hits(
        &top_k_dot(img, txt, 10).unwrap(),
        &top_k_dot(txt, img, 10).unwrap(),
        &img2txt,
        &txt2img,
    )
    .unwrap();
    for (k, v) in r.metrics() {
        let w = want["recall"][&k].as_f64().unwrap();
        assert!((v - w).abs() < 1e-9, "{k}: {v} vs numpy {w}");
    }
    println!("recall equals numpy: {r}");
    let c = rel["num_classes"].as_u64().unwrap() as usize;
    let labels: Vec<usize> = serde_json::from_value(rel["class_of_image"].clone()).unwrap();
    let cls = txt.narrow(0, 0, c).unwrap();
    let logits = img
        .matmul(&cls.t().unwrap())
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let m = zero_shot_metrics(&logits, &labels, c).unwrap();
    for (k, v) in [
        ("top1", m.top1),
        ("top5", m.top5),
        ("mean_per_class_recall", m.mean_per_class_recall),
    ] {
        let w = want["zero_shot"][k].as_f64().unwrap();
        assert!((v - w).abs() < 1e-9, "{k}: {v} vs numpy {w}");
    }
    let pairs: Vec<[usize; 3]> = serde_json::from_value(rel["pairs"].clone()).unwrap();
    let s = img
        .matmul(&txt.t().unwrap())
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let scores: Vec<f32> = pairs.iter().map(|p| s[p[0]][p[1]]).collect();
    let labels: Vec<bool> = pairs.iter().map(|p| p[2] == 1).collect();
    let auc = roc_auc(&scores, &labels).unwrap();
    let w = want["auc_of_cosine"].as_f64().unwrap();
    assert!((auc - w).abs() < 1e-9, "AUC {auc} vs numpy {w}");
}

#[test]
fn matching_auc_and_accuracy_from_itm() {
    let dir = family_dir("r2d2");
    let model = load(dir.path());
    let data_dir = tempfile::tempdir().unwrap();
    let imgs = ["test.jpg", "jordan.jpg"];
    let texts = ["乔丹投篮", "草地上的一只猫", "城市夜景"];
    let mut jsonl = String::new();
    let mut pairs = Vec::new();
    for (i, img) in imgs.iter().enumerate() {
        copy(
            fixture(&format!("data/images/{img}")),
            data_dir.path().join(img),
        );
        for (t, text) in texts.iter().enumerate() {
            let label = (i + t) % 2 == 0;
            jsonl +=
                &serde_json::json!({"image": img, "text": text, "label": label as u8}).to_string();
            jsonl.push('\n');
            pairs.push((i, t, label));
        }
    }
    let p = data_dir.path().join("icm.jsonl");
    std::fs::write(&p, jsonl).unwrap();
    let data = MatchingDataset::from_jsonl(&p).unwrap();
    let opts = ZeroShotOptions {
        image_batch_size: 4,
        ..Default::default()
    };
    let r = evaluate_matching(model.as_ref(), &data, &opts).unwrap();
    // Independently: the ITM matrix from the trait, then pair counting.
    let inputs: Vec<tuwen::ImageInput> = imgs
        .iter()
        .map(|n| tuwen::ImageInput::path(data_dir.path().join(n)))
        .collect();
    let itm = model
        .itm_scores(&inputs, &texts)
        .unwrap()
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let scores: Vec<f32> = pairs.iter().map(|&(i, t, _)| itm[i][t]).collect();
    for (a, b) in r.scores.iter().zip(&scores) {
        assert!((a - b).abs() < 1e-5, "ITM {a} vs {b}");
    }
    let (mut wins, mut n) = (0.0, 0.0);
    for &(i, t, l) in &pairs {
        for &(j, u, m) in &pairs {
            if l && !m {
                n += 1.0;
                let (a, b) = (itm[i][t], itm[j][u]);
                wins += if a > b {
                    1.0
                } else if a == b {
                    0.5
                } else {
                    0.0
                };
            }
        }
    }
    assert!(
        (r.auc - wins / n).abs() < 1e-6,
        "AUC {} vs {}",
        r.auc,
        wins / n
    );
    let acc = pairs
        .iter()
        .filter(|&&(i, t, l)| (itm[i][t] >= 0.5) == l)
        .count() as f64
        * 100.0
        / pairs.len() as f64;
    assert!((r.accuracy - acc).abs() < 1e-9);
    // A model without a cross encoder refuses.
    let sig = family_dir("siglip");
    let e = evaluate_matching(load(sig.path()).as_ref(), &data, &opts).unwrap_err();
    assert!(e.to_string().contains("cross encoder"), "{e}");
}

#[test]
fn embedding_cache_skips_encoding_and_notices_changes() {
    let data_dir = tempfile::tempdir().unwrap();
    write_cnclip(data_dir.path(), "test");
    let data = RetrievalDataset::open(data_dir.path(), None).unwrap();
    let dir = family_dir("siglip");
    let model = load(dir.path());
    let cache_dir = tempfile::tempdir().unwrap();
    let opts = RetrievalOptions {
        cache: Some(EmbeddingCache::new(cache_dir.path(), "tiny siglip")),
        ..one_at_a_time()
    };
    let first = evaluate(model.as_ref(), &data, &opts).unwrap();
    assert!(!first.images_cached && !first.texts_cached);
    let second = evaluate(model.as_ref(), &data, &opts).unwrap();
    assert!(second.images_cached && second.texts_cached);
    assert_eq!(first.cosine, second.cosine);
    // Another model key misses.
    let other = RetrievalOptions {
        cache: Some(EmbeddingCache::new(cache_dir.path(), "another model")),
        ..one_at_a_time()
    };
    assert!(
        !evaluate(model.as_ref(), &data, &other)
            .unwrap()
            .images_cached
    );
    // A rewritten image file misses (its size and time change).
    std::thread::sleep(std::time::Duration::from_millis(20));
    let tsv = data_dir.path().join("test_imgs.tsv");
    let mut s = std::fs::read_to_string(&tsv).unwrap();
    s.push('\n');
    std::fs::write(&tsv, s).unwrap();
    let data = RetrievalDataset::open(data_dir.path(), None).unwrap();
    let third = evaluate(model.as_ref(), &data, &opts).unwrap();
    assert!(!third.images_cached && third.texts_cached);
    // A corrupt cache entry is ignored and rewritten.
    for f in std::fs::read_dir(cache_dir.path()).unwrap() {
        std::fs::write(f.unwrap().path(), b"garbage").unwrap();
    }
    let fourth = evaluate(model.as_ref(), &data, &opts).unwrap();
    assert!(!fourth.images_cached);
    assert_eq!(fourth.cosine, first.cosine);
}

fn expect_data_err(r: tuwen::Result<impl std::fmt::Debug>, needles: &[&str]) {
    let e = r.expect_err("should fail").to_string();
    for n in needles {
        assert!(e.contains(n), "`{n}` not in: {e}");
    }
}

#[test]
fn bad_datasets_fail_naming_the_line_or_id() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    let b64 = base64::engine::general_purpose::STANDARD
        .encode(std::fs::read(fixture("data/images/test.jpg")).unwrap());
    let set = |imgs: &str, texts: &str| {
        std::fs::write(p.join("x_imgs.tsv"), imgs).unwrap();
        std::fs::write(p.join("x_texts.jsonl"), texts).unwrap();
        RetrievalDataset::open(p, Some("x"))
    };
    let ok_text = "{\"text_id\": 1, \"text\": \"猫\", \"image_ids\": [7]}\n";
    // Unknown image id.
    expect_data_err(
        set(
            &format!("7\t{b64}\n"),
            &format!("{ok_text}{{\"text_id\": 2, \"text\": \"狗\", \"image_ids\": [8]}}\n"),
        ),
        &["line 2", "image `8`"],
    );
    // Duplicate ids.
    expect_data_err(
        set(&format!("7\t{b64}\n7\t{b64}\n"), ok_text),
        &["line 2", "duplicate image id `7`"],
    );
    expect_data_err(
        set(&format!("7\t{b64}\n"), &format!("{ok_text}{ok_text}")),
        &["line 2", "duplicate text id `1`"],
    );
    // Empty split, empty text, a line without a tab.
    expect_data_err(set("", ok_text), &["no images"]);
    expect_data_err(set(&format!("7\t{b64}\n"), ""), &["no texts"]);
    expect_data_err(
        set(
            &format!("7\t{b64}\n"),
            "{\"text_id\": 1, \"text\": \" \", \"image_ids\": [7]}\n",
        ),
        &["line 1", "empty text"],
    );
    expect_data_err(set("7 no tab\n", ok_text), &["line 1", "image_id<TAB>"]);
    // Bad base64 and an undecodable image fail at encoding, naming the line; with
    // skip_bad they are left out and listed.
    let data = set(
        &format!(
            "7\t{b64}\n8\t!!notbase64\n9\t{}\n",
            base64::engine::general_purpose::STANDARD.encode(b"not an image")
        ),
        "{\"text_id\": 1, \"text\": \"猫\", \"image_ids\": [7, 8, 9]}\n",
    )
    .unwrap();
    let model = load(family_dir("siglip").path());
    expect_data_err(
        evaluate(model.as_ref(), &data, &RetrievalOptions::default()),
        &["line 2", "base64"],
    );
    let r = evaluate(
        model.as_ref(),
        &data,
        &RetrievalOptions {
            skip_bad: true,
            ..Default::default()
        },
    )
    .unwrap();
    let ids: Vec<&str> = r.skipped_images.iter().map(|(i, _)| i.as_str()).collect();
    assert_eq!(ids, vec!["8", "9"]);
    assert!(
        r.skipped_images[1].1.contains("line 3"),
        "{:?}",
        r.skipped_images
    );
    assert_eq!(r.cosine.img_r1, 100.0, "one image left: found first");

    // Classification: a class folder with no images, a missing name file, more classes
    // than names.
    let root = p.join("cls");
    write_elevater(&root, &["猫", "狗", "车"]);
    std::fs::create_dir_all(root.join("test/003")).unwrap();
    expect_data_err(
        ClassificationDataset::open(&root, None, None),
        &["003", "class 3 has no name"],
    );
    copy(fixture("data/images/test.jpg"), root.join("test/003/a.jpg"));
    std::fs::write(root.join("label_cn.txt"), "猫\n狗\n车\n船\n").unwrap();
    assert!(ClassificationDataset::open(&root, None, None).is_ok());
    std::fs::create_dir_all(root.join("test/001x")).unwrap();
    std::fs::remove_dir(root.join("test/001x")).unwrap();
    std::fs::remove_file(root.join("test/003/a.jpg")).unwrap();
    expect_data_err(
        ClassificationDataset::open(&root, None, None),
        &["003", "no images"],
    );
    std::fs::remove_file(root.join("label_cn.txt")).unwrap();
    std::fs::remove_dir(root.join("test/003")).unwrap();
    expect_data_err(
        ClassificationDataset::open(&root, None, None),
        &["class-name file"],
    );
    expect_data_err(
        ClassificationDataset::open(&root, None, Some(&p.join("nope.txt"))),
        &["nope.txt", "does not exist"],
    );
    let e = ClassificationDataset::open(&p.join("missing"), None, None).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
}

#[test]
fn eval_examples_print_tables_and_write_records() {
    let data_dir = tempfile::tempdir().unwrap();
    write_cnclip(data_dir.path(), "test");
    let root = data_dir.path().join("cls");
    write_elevater(&root, &["猫", "猫", "猫"]);
    for family in ["brivl", "r2d2"] {
        let dir = family_dir(family);
        let json = data_dir.path().join(format!("{family}.json"));
        let mut args = vec![
            "--model".to_string(),
            dir.path().display().to_string(),
            "--data".into(),
            data_dir.path().display().to_string(),
            "--split".into(),
            "test".into(),
            "--image-batch-size".into(),
            "1".into(),
            "--text-batch-size".into(),
            "1".into(),
            "--top-k".into(),
            "3".into(),
            "--output".into(),
            json.display().to_string(),
        ];
        if family == "brivl" {
            args.extend(["--grid".into(), "2".into()]);
        }
        let out = Command::new(example("eval_retrieval"))
            .args(&args)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains("cosine") && stdout.contains("R@10"),
            "{stdout}"
        );
        assert_eq!(stdout.contains("re-ranked"), family == "r2d2", "{stdout}");
        let rec: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        assert_eq!(rec["task"], "retrieval");
        assert_eq!(rec["split"], "test");
        assert_eq!(rec["counts"]["images"], 13);
        assert_eq!(rec["counts"]["t2i_queries"], 12);
        let r1 = rec["metrics"]["img_r1"].as_f64().unwrap();
        assert!((r1 - 200.0 / 12.0).abs() < 1e-9, "{rec}");
        assert!(rec["seconds"].as_f64().unwrap() > 0.0);

        let out = Command::new(example("eval_zero_shot"))
            .args(["--model", dir.path().to_str().unwrap()])
            .args(["--data", root.to_str().unwrap(), "--text-batch-size", "1"])
            .args(["--grid", "2"])
            .arg("--json")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let rec: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        let top1 = rec["metrics"]["top1"].as_f64().unwrap();
        assert!((top1 - 100.0 / 3.0).abs() < 1e-9, "{rec}");
        assert_eq!(rec["counts"]["templates"], 20);
    }
    // Re-ranking asked of a model without a cross encoder: a clear error, exit 1.
    let dir = family_dir("siglip");
    let out = Command::new(example("eval_retrieval"))
        .args(["--model", dir.path().to_str().unwrap()])
        .args([
            "--data",
            data_dir.path().to_str().unwrap(),
            "--rerank",
            "on",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cross encoder"), "{stderr}");
    // And retrieve works with SigLIP now.
    let out = Command::new(example("retrieve"))
        .args(["--model", dir.path().to_str().unwrap()])
        .args(["--images", root.join("test/000").to_str().unwrap()])
        .args(["--query", "猫", "--top", "2"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.matches("cosine").count(), 2, "{stdout}");
}

fn eval_events(log: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["event"] == "eval")
        .collect()
}

/// `train_siglip2 --val` in both formats: the metrics logged after the last step equal
/// what `eval_retrieval` reports for the exported model (the same code on the same
/// weights); `--recipe danqing` resolves its settings and refuses a model of the wrong size.
#[test]
fn train_siglip2_validates_with_the_evaluation_code() {
    let model = family_dir("siglip");
    let dir = tempfile::tempdir().unwrap();
    let data = tuwen::train::synthetic::write_shapes_dataset(
        &dir.path().join("data"),
        &tuwen::train::synthetic::ShapesConfig::new(12, 3),
    )
    .unwrap();
    let cn = dir.path().join("cn");
    std::fs::create_dir_all(&cn).unwrap();
    write_cnclip(&cn, "valid");
    let out = dir.path().join("run");
    let (m, t, o) = (
        model.path().to_str().unwrap(),
        data.manifest_path.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    let common = [
        "--model",
        m,
        "--train",
        t,
        "--out",
        o,
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--lr",
        "1e-3",
        "--warmup",
        "1",
        "--eval-every",
        "2",
        "--eval-batch-size",
        "1",
    ];
    let mut args = common.to_vec();
    args.extend(["--val", t, "--val", cn.to_str().unwrap()]);
    let (ok, s) = run_example("train_siglip2", &args);
    assert!(ok, "{s}");
    let evals = eval_events(&out.join("metrics.jsonl"));
    assert_eq!(evals.len(), 2, "{evals:?}");
    assert_eq!(evals[0]["name"], "manifest");
    assert_eq!(evals[1]["name"], "cn");
    // The tie set's known answer holds whatever the weights.
    let r1 = evals[1]["metrics"]["img_r1"].as_f64().unwrap();
    assert!((r1 - 200.0 / 12.0).abs() < 1e-9, "{evals:?}");
    let exported = out.join("model");
    let (ok, s) = run_example(
        "eval_retrieval",
        &[
            "--model",
            exported.to_str().unwrap(),
            "--data",
            t,
            "--image-batch-size",
            "1",
            "--text-batch-size",
            "1",
            "--json",
        ],
    );
    assert!(ok, "{s}");
    let json_start = s.find('{').unwrap();
    let rec: serde_json::Value = serde_json::Deserializer::from_str(&s[json_start..])
        .into_iter()
        .next()
        .unwrap()
        .unwrap();
    for k in ["txt_r1", "txt_r5", "img_r1", "img_r10", "r_mean"] {
        let (a, b) = (
            evals[0]["metrics"][k].as_f64().unwrap(),
            rec["metrics"][k].as_f64().unwrap(),
        );
        assert!(
            (a - b).abs() < 1e-9,
            "{k}: training hook {a}, eval_retrieval {b}"
        );
    }

    // The DanQing recipe: the tiny model is 32 px, so it refuses, naming the size.
    let out2 = dir.path().join("run2");
    let mut args = common.to_vec();
    args[5] = out2.to_str().unwrap();
    args.extend(["--recipe", "danqing"]);
    let (ok, s) = run_example("train_siglip2", &args);
    assert!(!ok && s.contains("256 px"), "{s}");
    let mut args = common.to_vec();
    args[5] = out2.to_str().unwrap();
    args.extend(["--recipe", "nope"]);
    let (ok, s) = run_example("train_siglip2", &args);
    assert!(!ok && s.contains("unknown --recipe"), "{s}");
    for bad in ["NaN", "inf", "-1", "0"] {
        let lr = format!("--lr={bad}");
        let mut args = common.to_vec();
        args[5] = out2.to_str().unwrap();
        args[10] = &lr;
        args.remove(11);
        let (ok, s) = run_example("train_siglip2", &args);
        assert!(!ok && s.contains("--lr"), "--lr {bad}: {s}");
    }
}

/// `train_r2d2 --val` on a Chinese-CLIP folder logs cosine and re-ranked recall.
#[test]
fn train_r2d2_validates_with_reranking() {
    let dir = tempfile::tempdir().unwrap();
    let data = tuwen::train::synthetic::write_shapes_dataset(
        &dir.path().join("data"),
        &tuwen::train::synthetic::ShapesConfig::new(8, 2),
    )
    .unwrap();
    let cn = dir.path().join("cn");
    std::fs::create_dir_all(&cn).unwrap();
    write_cnclip(&cn, "valid");
    let out = dir.path().join("run");
    let cfg = dir.path().join("config.json");
    std::fs::write(
        &cfg,
        serde_json::to_string(&crate::r2d2::tiny_config()).unwrap(),
    )
    .unwrap();
    let (ok, s) = run_example(
        "train_r2d2",
        &[
            "--init",
            fixture("original/r2d2_tiny.pth").to_str().unwrap(),
            "--config",
            cfg.to_str().unwrap(),
            "--tokenizer",
            fixture(TOKENIZER_BERT).to_str().unwrap(),
            "--manifest",
            data.manifest_path.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--steps",
            "1",
            "--batch-size",
            "4",
            "--val",
            cn.to_str().unwrap(),
            "--eval-every",
            "1",
            "--eval-rerank-k",
            "3",
            "--eval-batch-size",
            "1",
        ],
    );
    assert!(ok, "{s}");
    let evals = eval_events(&out.join("metrics.jsonl"));
    assert_eq!(evals.len(), 1, "{evals:?}");
    for k in ["img_r1", "rerank_img_r1"] {
        let v = evals[0]["metrics"][k].as_f64().unwrap();
        assert!((v - 200.0 / 12.0).abs() < 1e-9, "{k}: {evals:?}");
    }
}
