//! WebDataset shards: writing, reading back against the manifest loader, exact resume at
//! shard boundaries and mid-shard, the rank split, bad members and bad shard specs.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use rand::Rng;
use tuwen::train::rng::derive_rng;
use tuwen::train::webdataset::{sample_index, split_sample_index, write_manifest, ShardCursor};
use tuwen::train::{
    AdamWConfig, AugmentConfig, Batch, CheckpointManager, DataConfig, DataLoader, DataPosition,
    Fit, FitSummary, ImagePipeline, LocalGroup, Manifest, ShardSample, ShardSpec, ShardWriter,
    Trainer, TrainerConfig, WebDatasetConfig, WebDatasetLoader,
};
use tuwen::Error;

/// `n` small images (JPEG and PNG, several sizes) and a JSONL manifest over them with ids,
/// boxes and, for some, two captions.
fn dataset(dir: &Path, n: usize) -> PathBuf {
    let img_dir = dir.join("images");
    std::fs::create_dir_all(&img_dir).unwrap();
    let mut lines = Vec::new();
    for i in 0..n {
        let mut rng = derive_rng(99, &[i as u64]);
        let base: [u8; 3] = [rng.random(), rng.random(), rng.random()];
        let (w, h) = (12 + (i % 5) as u32 * 3, 9 + (i % 3) as u32 * 4);
        let img = image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([
                base[0].wrapping_add((x * 11) as u8),
                base[1].wrapping_add((y * 7) as u8),
                base[2].wrapping_add(((x * y) * 3) as u8),
            ])
        });
        let name = if i % 3 == 0 {
            format!("{i}.jpg")
        } else {
            format!("{i}.png")
        };
        img.save(img_dir.join(&name)).unwrap();
        let mut line =
            serde_json::json!({"image": format!("images/{name}"), "id": format!("id{}", i / 2)});
        if i % 4 == 1 {
            line["captions"] = serde_json::json!([format!("第{i}张 甲"), format!("第{i}张 乙")]);
        } else {
            line["caption"] = format!("第{i}张图 颜色{}", base[0]).into();
        }
        if i % 2 == 0 {
            line["boxes"] = serde_json::json!([[1.0, 2.0, 5.5, 7.0], [0, 0, w, h]]);
        }
        lines.push(line.to_string());
    }
    let path = dir.join("train.jsonl");
    std::fs::write(&path, lines.join("\n")).unwrap();
    path
}

fn wds(threads: usize, buffer: usize) -> WebDatasetConfig {
    WebDatasetConfig {
        threads,
        shuffle_buffer: buffer,
        read_ahead: 3,
        ..WebDatasetConfig::default()
    }
}

fn ordered(batch_size: usize, size: usize) -> DataConfig {
    DataConfig {
        shuffle: false,
        drop_last: false,
        ..DataConfig::new(batch_size, size)
    }
}

fn pixels(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// Everything a batch carries, comparable.
#[derive(Debug, PartialEq)]
struct Seen {
    indices: Vec<usize>,
    captions: Vec<String>,
    ids: Vec<Option<String>>,
    pixels: Vec<f32>,
    epoch: u64,
    position: DataPosition,
    skipped: usize,
}

fn seen(b: &Batch) -> Seen {
    Seen {
        indices: b.indices.clone(),
        captions: b.captions.clone(),
        ids: b.ids.clone(),
        pixels: pixels(&b.images),
        epoch: b.epoch,
        position: b.position_after,
        skipped: b.skipped.len(),
    }
}

fn tar_members(path: &Path) -> Vec<String> {
    let mut a = tar::Archive::new(std::fs::File::open(path).unwrap());
    a.entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().display().to_string())
        .collect()
}

#[test]
fn webdataset_round_trip_matches_the_manifest_loader() {
    let dir = tempfile::tempdir().unwrap();
    let manifest_path = dataset(&dir.path().join("data"), 10);
    let manifest = Manifest::open(&manifest_path).unwrap();
    let shard_dir = dir.path().join("shards");
    let shards = write_manifest(&manifest, &shard_dir, "train", 4).unwrap();
    let names: Vec<String> = shards
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        ["train-00000.tar", "train-00001.tar", "train-00002.tar"]
    );
    // The img2dataset layout, and nothing left over from writing.
    assert_eq!(
        &tar_members(&shards[0])[..6],
        [
            "000000000.jpg",
            "000000000.txt",
            "000000000.json",
            "000000001.png",
            "000000001.txt",
            "000000001.json"
        ]
    );
    assert_eq!(tar_members(&shards[2]).len(), 6);
    assert_eq!(std::fs::read_dir(&shard_dir).unwrap().count(), 3);
    let mut a = tar::Archive::new(std::fs::File::open(&shards[0]).unwrap());
    let mut json = String::new();
    a.entries()
        .unwrap()
        .nth(2)
        .unwrap()
        .unwrap()
        .read_to_string(&mut json)
        .unwrap();
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(json["id"], "id0");
    assert_eq!(json["width"], 12);
    assert_eq!(json["height"], 9);

    // The manifest loader's view, by manifest index.
    let mut dl = DataLoader::new(manifest.clone(), ordered(10, 7)).unwrap();
    let want = dl.next_batch().unwrap();
    let want_px = pixels(&want.images);
    let per = 3 * 7 * 7;

    // Read back from the directory (in order), in batches of 3 across shard boundaries.
    let mut loader =
        WebDatasetLoader::new(ShardSpec::Dir(shard_dir.clone()), ordered(3, 7), wds(2, 0)).unwrap();
    let mut got = Vec::new();
    while let Some(b) = loader.next_batch_in_epoch().unwrap() {
        assert!(b.skipped.is_empty());
        got.push(b);
    }
    assert_eq!(got.iter().map(Batch::len).collect::<Vec<_>>(), [3, 3, 3, 1]);
    let mut count = 0;
    for b in &got {
        let px = pixels(&b.images);
        for (j, &index) in b.indices.iter().enumerate() {
            let (shard, ordinal) = split_sample_index(index);
            let m = shard * 4 + ordinal;
            assert_eq!(m, count, "stored order");
            count += 1;
            let sample = &manifest.samples[m];
            assert!(
                sample.captions.contains(&b.captions[j]),
                "{}",
                b.captions[j]
            );
            if sample.captions.len() == 1 {
                assert_eq!(b.captions[j], want.captions[m]);
            }
            assert_eq!(b.ids[j], sample.id);
            assert_eq!(b.boxes[j], sample.boxes);
            assert_eq!(b.image_sizes[j], want.image_sizes[m]);
            assert_eq!(
                &px[j * per..(j + 1) * per],
                &want_px[m * per..(m + 1) * per],
                "pixels of sample {m}"
            );
        }
    }
    assert_eq!(count, 10);
    // The epoch is over: the next batch is from epoch 1.
    assert_eq!(loader.position().epoch, 1);
    assert_eq!(loader.next_batch().unwrap().epoch, 1);
}

/// 5 shards of 6 samples each.
fn thirty(dir: &Path) -> Vec<PathBuf> {
    let m = Manifest::open(&dataset(&dir.join("data"), 30)).unwrap();
    write_manifest(&m, dir.join("shards"), "s", 6).unwrap()
}

fn shuffled_config() -> DataConfig {
    DataConfig {
        seed: 5,
        pipeline: ImagePipeline::new(6).with_augment(AugmentConfig::default()),
        ..DataConfig::new(4, 6)
    }
}

#[test]
fn webdataset_resume_reproduces_the_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let shards = thirty(dir.path());
    let spec = ShardSpec::Pattern(
        dir.path()
            .join("shards/s-{00000..00004}.tar")
            .display()
            .to_string(),
    );
    assert_eq!(spec.resolve().unwrap(), shards);
    let cfg = shuffled_config();
    let mut loader = WebDatasetLoader::new(spec.clone(), cfg, wds(2, 4)).unwrap();
    let full: Vec<Seen> = (0..16)
        .map(|_| seen(&loader.next_batch().unwrap()))
        .collect();

    // One epoch is 7 batches of 4 (2 of 30 dropped), without repeats.
    let epoch0: Vec<usize> = full[..7].iter().flat_map(|s| s.indices.clone()).collect();
    assert_eq!(epoch0.iter().collect::<BTreeSet<_>>().len(), 28);
    assert!(full[..7].iter().all(|s| s.epoch == 0));
    assert!(full[7..14].iter().all(|s| s.epoch == 1));
    // The shards are shuffled, and so are samples inside a shard.
    let shard_seq: Vec<usize> = epoch0.iter().map(|&i| split_sample_index(i).0).collect();
    let first_shards: Vec<usize> = shard_seq.iter().step_by(6).copied().collect();
    assert_ne!(first_shards, [0, 1, 2, 3, 4]);
    let ordinals: Vec<usize> = epoch0[..6]
        .iter()
        .map(|&i| split_sample_index(i).1)
        .collect();
    assert_ne!(ordinals, [0, 1, 2, 3, 4, 5]);
    assert_ne!(
        full[0].indices, full[7].indices,
        "epoch 1 has another order"
    );

    // The stream does not depend on the number of reader threads.
    for threads in [1, 4] {
        let mut l = WebDatasetLoader::new(spec.clone(), cfg, wds(threads, 4)).unwrap();
        for (i, want) in full.iter().enumerate().take(9) {
            assert_eq!(
                &seen(&l.next_batch().unwrap()),
                want,
                "batch {i}, {threads} threads"
            );
        }
    }

    // Resume after every batch, through a JSON round trip of the position as a
    // checkpoint stores it, with another thread count.
    let (mut boundary, mut mid) = (0, 0);
    for k in 1..full.len() {
        let pos = full[k - 1].position;
        let c = pos.shard.unwrap();
        if c.offset == 0 || c.offset == 6 {
            boundary += 1;
        } else {
            mid += 1;
        }
        let text = serde_json::to_string(&pos).unwrap();
        let pos: DataPosition = serde_json::from_str(&text).unwrap();
        let mut l = WebDatasetLoader::new(spec.clone(), cfg, wds(1 + k % 3, 4)).unwrap();
        l.set_position(pos).unwrap();
        for (i, want) in full.iter().enumerate().skip(k).take(3) {
            assert_eq!(
                &seen(&l.next_batch().unwrap()),
                want,
                "resumed after {k}, batch {i}"
            );
        }
    }
    assert!(
        boundary >= 4 && mid >= 8,
        "{boundary} boundary, {mid} mid-shard"
    );

    // A boundary written as "next shard, nothing consumed" resumes the same.
    let pos = full[2].position; // 12 samples: the end of the epoch's second shard
    let c = pos.shard.unwrap();
    assert_eq!((pos.cursor, c.shard, c.offset), (12, 1, 6));
    let mut l = WebDatasetLoader::new(spec.clone(), cfg, wds(2, 4)).unwrap();
    l.set_position(DataPosition {
        shard: Some(ShardCursor {
            shard: 2,
            offset: 0,
            ..c
        }),
        ..pos
    })
    .unwrap();
    assert_eq!(seen(&l.next_batch().unwrap()), full[3]);

    // Old checkpoints (no shard field) parse; a manifest position is refused here and a
    // shard position by the manifest loader.
    let old: DataPosition =
        serde_json::from_str(r#"{"epoch":2,"cursor":7,"skipped_total":1}"#).unwrap();
    assert_eq!(old.shard, None);
    let e = l.set_position(old).unwrap_err();
    assert!(matches!(e, Error::Data { .. }), "{e}");
    let m = Manifest::open(&dir.path().join("data/train.jsonl")).unwrap();
    let mut dl = DataLoader::new(m, DataConfig::new(2, 6)).unwrap();
    assert!(dl.set_position(full[3].position).is_err());
    // A position past the rank's shards, or of a changed shard list, is refused.
    let bad = DataPosition {
        shard: Some(ShardCursor {
            shard: 9,
            offset: 0,
            ..c
        }),
        ..pos
    };
    assert!(l.set_position(bad).is_err());
    let bad = DataPosition {
        shard: Some(ShardCursor { num_shards: 6, ..c }),
        ..pos
    };
    assert!(l.set_position(bad).is_err());
    // An offset beyond the shard's samples (the shard changed) is an error, not a hang.
    let bad = DataPosition {
        shard: Some(ShardCursor { offset: 50, ..c }),
        ..pos
    };
    l.set_position(bad).unwrap();
    let e = l.next_batch().unwrap_err().to_string();
    assert!(e.contains("only 6"), "{e}");
}

#[test]
fn webdataset_fit_resumes_from_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let shards = thirty(dir.path());
    let run = |ckpt: &Path, total: u64, resume: bool| -> Vec<(u64, f64)> {
        let vm = VarMap::new();
        let w = vm
            .get(
                (1,),
                "w",
                candle_nn::Init::Const(0.5),
                DType::F32,
                &Device::Cpu,
            )
            .unwrap();
        let mut trainer = Trainer::from_varmap(&vm, TrainerConfig::default()).unwrap();
        let mut loader =
            WebDatasetLoader::new(shards.clone(), shuffled_config(), wds(2, 4)).unwrap();
        let mgr = CheckpointManager::new(ckpt, 2).unwrap();
        let s = Fit::new(&mut trainer, &mut loader, total)
            .checkpoints(&mgr, 3)
            .resume(resume)
            .run(|b, _| {
                let m = b.images.mean_all()?.reshape(1)?;
                (m - &w)?.sqr()?.sum_all().map_err(Into::into)
            })
            .unwrap();
        s.losses
    };
    let a = run(&dir.path().join("a"), 10, false);
    assert_eq!(run(&dir.path().join("b"), 5, false), a[..5]);
    // Steps 5..10 from the checkpoint at step 5 (mid-shard, mid-epoch, then past the
    // epoch's end).
    assert_eq!(run(&dir.path().join("b"), 10, true), a[5..]);
}

#[test]
fn webdataset_ranks_see_disjoint_samples_covering_everything() {
    let dir = tempfile::tempdir().unwrap();
    let shards = thirty(dir.path());
    let cfg = DataConfig {
        drop_last: false,
        ..shuffled_config()
    };
    for epoch in 0..2 {
        let mut per_rank = Vec::new();
        for rank in 0..2 {
            let w = WebDatasetConfig {
                rank,
                world_size: 2,
                ..wds(2, 4)
            };
            let mut l = WebDatasetLoader::new(shards.clone(), cfg, w).unwrap();
            let start = l.position();
            l.set_position(DataPosition { epoch, ..start }).unwrap();
            let mut idx = Vec::new();
            while let Some(b) = l.next_batch_in_epoch().unwrap() {
                assert_eq!(b.epoch, epoch);
                idx.extend(b.indices);
            }
            let set: BTreeSet<usize> = idx.iter().copied().collect();
            assert_eq!(set.len(), idx.len(), "no repeats");
            // Whole shards go to one rank.
            let rank_shards: BTreeSet<usize> = l.epoch_shards(epoch).into_iter().collect();
            assert!(set
                .iter()
                .all(|&i| rank_shards.contains(&split_sample_index(i).0)));
            per_rank.push(set);
        }
        assert!(per_rank[0].is_disjoint(&per_rank[1]));
        let all: BTreeSet<usize> = per_rank[0].union(&per_rank[1]).copied().collect();
        let want: BTreeSet<usize> = (0..5)
            .flat_map(|s| (0..6).map(move |o| sample_index(s, o)))
            .collect();
        assert_eq!(all, want, "epoch {epoch}");
        assert_eq!(per_rank[0].len() + per_rank[1].len(), 30);
    }
    // A position belongs to its rank.
    let mut r0 = WebDatasetLoader::new(shards.clone(), cfg, WebDatasetConfig::rank(0, 2)).unwrap();
    let pos = r0.next_batch().unwrap().position_after;
    let mut r1 = WebDatasetLoader::new(shards.clone(), cfg, WebDatasetConfig::rank(1, 2)).unwrap();
    let e = r1.set_position(pos).unwrap_err().to_string();
    assert!(e.contains("rank 0 of 2"), "{e}");
}

fn png_bytes(seed: u8) -> Vec<u8> {
    let img = image::RgbImage::from_fn(8, 6, |x, y| {
        image::Rgb([seed, (x * 20) as u8, (y * 30) as u8])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

#[test]
fn webdataset_bad_members_are_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let shard_dir = dir.path().join("shards");
    std::fs::create_dir_all(&shard_dir).unwrap();
    // Shard 0, by hand: good, garbage JPEG, no .txt, broken JSON, good.
    let members: Vec<(&str, Vec<u8>)> = vec![
        ("a/good0.png", png_bytes(1)),
        ("a/good0.txt", "好的".as_bytes().to_vec()),
        (
            "a/badimg.jpg",
            b"\xff\xd8\xff\xe0 this is not a jpeg".to_vec(),
        ),
        ("a/badimg.txt", b"garbage".to_vec()),
        ("a/notxt.png", png_bytes(2)),
        ("a/notxt.json", br#"{"id": 3}"#.to_vec()),
        ("a/badjson.png", png_bytes(3)),
        ("a/badjson.txt", b"json".to_vec()),
        ("a/badjson.json", b"{not json".to_vec()),
        ("a/good1.PNG", png_bytes(4)),
        (
            "a/good1.json",
            br#"{"captions": ["c1"], "id": 7, "url": "x"}"#.to_vec(),
        ),
    ];
    let mut b = tar::Builder::new(std::fs::File::create(shard_dir.join("x-00000.tar")).unwrap());
    for (name, data) in &members {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, data.as_slice()).unwrap();
    }
    b.into_inner().unwrap();
    // Shard 1 by the writer (named after shard 0), then cut inside its third image.
    let mut w = ShardWriter::new(&shard_dir, "y", 100).unwrap();
    w.write(&ShardSample {
        key: Some("k0".into()),
        image: png_bytes(5),
        image_ext: "png".into(),
        captions: vec!["第一".into()],
        ..Default::default()
    })
    .unwrap();
    for i in 1..4u8 {
        w.write(&ShardSample {
            image: png_bytes(5 + i),
            image_ext: "png".into(),
            captions: vec![format!("第{i}")],
            ..Default::default()
        })
        .unwrap();
    }
    let written = w.finish().unwrap();
    assert_eq!(written, [shard_dir.join("y-00000.tar")]);
    let cut = {
        let mut a = tar::Archive::new(std::fs::File::open(&written[0]).unwrap());
        let e = a.entries().unwrap().nth(6).unwrap().unwrap();
        assert_eq!(e.path().unwrap().display().to_string(), "000000002.png");
        e.raw_file_position() + e.size() / 2
    };
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&written[0])
        .unwrap();
    f.set_len(cut).unwrap();
    drop(f);

    let spec = ShardSpec::parse(&shard_dir.display().to_string());
    assert_eq!(spec, ShardSpec::Dir(shard_dir.clone()));
    let mut l = WebDatasetLoader::new(spec, ordered(3, 5), wds(2, 0)).unwrap();
    let mut captions = Vec::new();
    let mut ids = Vec::new();
    let mut skipped = Vec::new();
    while let Some(b) = l.next_batch_in_epoch().unwrap() {
        captions.extend(b.captions.clone());
        ids.extend(b.ids.clone());
        skipped.extend(b.skipped.clone());
    }
    assert_eq!(captions, ["好的", "c1", "第一", "第1"]);
    assert_eq!(ids, [None, Some("7".to_string()), None, None]);
    let reasons: Vec<String> = skipped.iter().map(|s| s.reason.clone()).collect();
    for r in &reasons {
        println!("skipped: {r}");
    }
    assert_eq!(reasons.len(), 4, "{reasons:?}");
    assert!(
        reasons[0].contains("a/badimg") && reasons[0].contains("image"),
        "{}",
        reasons[0]
    );
    assert!(reasons[1].contains("a/notxt") && reasons[1].contains("missing caption"));
    assert!(reasons[2].contains("a/badjson") && reasons[2].contains("JSON"));
    assert!(reasons[3].contains("y-00000.tar") && reasons[3].contains("truncated"));
    assert_eq!(
        skipped[0].image,
        shard_dir.join("x-00000.tar").join("a/badimg")
    );
    assert_eq!(l.position().skipped_total, 4);
    assert_eq!(l.position().epoch, 1);
    // Members over the size limit are not held in memory: their samples are skipped.
    let noise = image::RgbImage::from_fn(64, 64, |x, y| {
        let v = derive_rng(3, &[x as u64, y as u64]).random::<[u8; 3]>();
        image::Rgb(v)
    });
    let mut big = std::io::Cursor::new(Vec::new());
    noise.write_to(&mut big, image::ImageFormat::Png).unwrap();
    let mut w = ShardWriter::new(dir.path().join("sizes"), "z", 10).unwrap();
    for (caption, image) in [("big", big.into_inner()), ("small", png_bytes(9))] {
        assert_eq!(image.len() > 5000, caption == "big");
        w.write(&ShardSample {
            key: Some(caption.into()),
            image,
            image_ext: "png".into(),
            captions: vec![caption.into()],
            ..Default::default()
        })
        .unwrap();
    }
    let sizes = w.finish().unwrap();
    let small = WebDatasetConfig {
        max_member_bytes: 5000,
        ..wds(1, 0)
    };
    let mut l = WebDatasetLoader::new(sizes, ordered(2, 5), small).unwrap();
    let b = l.next_batch_in_epoch().unwrap().unwrap();
    assert_eq!(b.captions, ["small"]);
    assert_eq!(b.skipped.len(), 1);
    let r = &b.skipped[0].reason;
    assert!(
        r.contains("big.png is") && r.contains("5000-byte limit"),
        "{r}"
    );
    // A rank with nothing usable fails clearly instead of looping.
    let mut w = ShardWriter::new(dir.path().join("bad"), "b", 10).unwrap();
    w.write(&ShardSample {
        image: b"nope".to_vec(),
        image_ext: "jpg".into(),
        captions: vec!["x".into()],
        ..Default::default()
    })
    .unwrap();
    let only_bad = w.finish().unwrap();
    let mut l = WebDatasetLoader::new(only_bad, ordered(1, 5), wds(1, 0)).unwrap();
    let e = l.next_batch().unwrap_err().to_string();
    assert!(e.contains("no batch"), "{e}");
}

#[test]
fn webdataset_writer_is_atomic_and_checks_its_input() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let sample = |i: u8| ShardSample {
        image: png_bytes(i),
        image_ext: "png".into(),
        captions: vec![format!("{i}")],
        id: Some(format!("{i}")),
        boxes: Some(vec![[0.0, 0.0, 2.0, 2.0]]),
        ..Default::default()
    };
    let mut w = ShardWriter::new(&out, "part", 2).unwrap();
    for i in 0..3 {
        w.write(&sample(i)).unwrap();
    }
    assert_eq!(w.shards(), [out.join("part-00000.tar")]);
    // The open shard exists only under its temporary name, which shard specs ignore.
    assert!(!out.join("part-00001.tar").exists());
    assert!(out.join("part-00001.tar.partial").exists());
    assert_eq!(
        ShardSpec::Dir(out.clone()).resolve().unwrap(),
        [out.join("part-00000.tar")]
    );
    // Bad input is refused without touching the shard.
    for bad in [
        ShardSample {
            captions: vec![],
            ..sample(9)
        },
        ShardSample {
            image_ext: "txt".into(),
            ..sample(9)
        },
        ShardSample {
            key: Some("a.b".into()),
            ..sample(9)
        },
        ShardSample {
            key: Some("000000000".into()),
            ..sample(9)
        },
    ] {
        assert!(matches!(w.write(&bad), Err(Error::InvalidArgument(_))));
    }
    assert_eq!(w.len(), 3);
    drop(w); // as if killed: no shard under the final name, no partial file left
    assert!(!out.join("part-00001.tar").exists());
    assert!(!out.join("part-00001.tar.partial").exists());
    assert!(ShardWriter::new(&out, "", 2).is_err());
    assert!(ShardWriter::new(&out, "p", 0).is_err());
}

#[test]
fn webdataset_bad_specs_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let shards = thirty(dir.path());
    let data_err = |spec: ShardSpec, want: &str| {
        let e = spec.resolve().unwrap_err();
        assert!(matches!(e, Error::Data { .. }), "{e:?}");
        assert!(e.to_string().contains(want), "{e} (wanted {want})");
    };
    data_err(ShardSpec::Dir(dir.path().join("nowhere")), "cannot list");
    data_err(ShardSpec::Dir(dir.path().join("data")), "no .tar shards");
    data_err(ShardSpec::Paths(vec![]), "no shards");
    data_err(
        ShardSpec::Paths(vec![shards[0].clone(), dir.path().join("gone.tar")]),
        "gone.tar does not exist",
    );
    let pat = |p: &str| ShardSpec::Pattern(dir.path().join(p).display().to_string());
    data_err(
        pat("shards/s-{00000..00005}.tar"),
        "s-00005.tar does not exist",
    );
    data_err(pat("shards/s-{00000..00004.tar"), "unclosed");
    data_err(pat("shards/s-{x..4}.tar"), "not a number");
    data_err(pat("shards/s-{4..0}.tar"), "backwards");
    assert_eq!(
        pat("shards/s-{00000,00003}.tar").resolve().unwrap(),
        [shards[0].clone(), shards[3].clone()]
    );
    assert!(matches!(
        ShardSpec::parse("a/b-{0..1}.tar"),
        ShardSpec::Pattern(_)
    ));
    // Loader settings.
    let cfg = DataConfig::new(2, 6);
    let e =
        WebDatasetLoader::new(shards[..2].to_vec(), cfg, WebDatasetConfig::rank(0, 3)).unwrap_err();
    assert!(
        matches!(e, Error::Data { .. }) && e.to_string().contains("3 ranks"),
        "{e}"
    );
    let e = WebDatasetLoader::new(shards.clone(), cfg, WebDatasetConfig::rank(2, 2)).unwrap_err();
    assert!(matches!(e, Error::Config(_)), "{e}");
    let e = WebDatasetLoader::new(shards.clone(), cfg, wds(0, 0)).unwrap_err();
    assert!(matches!(e, Error::Config(_)), "{e}");
}

// ------------------------------------------------------------ data-parallel resume

/// 4 shards of 6 samples: each of 2 ranks reads 2 shards, 3 batches of 4 per epoch.
fn twenty_four(dir: &Path) -> Vec<PathBuf> {
    let m = Manifest::open(&dataset(&dir.join("data"), 24)).unwrap();
    write_manifest(&m, dir.join("shards"), "s", 6).unwrap()
}

/// `(rank, step, epoch, sample indices)` of every batch a loss saw.
type Consumed = Mutex<Vec<(usize, u64, u64, Vec<usize>)>>;

/// What one rank of a data-parallel run did.
struct RankRun {
    losses: Vec<(u64, f64)>,
    weights: Vec<u32>,
    summary: FitSummary,
    /// Files this rank's checkpoint manager was about to write.
    writes: usize,
}

/// Trains a 3-parameter model (per-channel image means) on `world` ranks of a
/// [`LocalGroup`], each over its share of the shards, checkpointing every 2 steps into
/// `ckpt`. With `crash_at`, rank `world - 1` fails in that step like a dying worker.
/// `(rank, step, epoch, sample indices)` of every batch the loss sees go to `sink`.
#[allow(clippy::too_many_arguments)]
fn dp_run(
    sink: &Consumed,
    shards: &[PathBuf],
    ckpt: &Path,
    world: usize,
    total: u64,
    resume: bool,
    crash_at: Option<u64>,
    init: f64,
) -> tuwen::Result<Vec<RankRun>> {
    LocalGroup::run(world, |comm| {
        let rank = comm.rank();
        let vm = VarMap::new();
        // Another start per rank: rank 0's weights are broadcast (or the checkpoint's).
        let w = vm.get(
            (3,),
            "w",
            candle_nn::Init::Const(init + rank as f64),
            DType::F32,
            &Device::Cpu,
        )?;
        let cfg = TrainerConfig {
            optimizer: AdamWConfig {
                lr: 0.05,
                ..Default::default()
            },
            seed: 3,
            ..Default::default()
        };
        let mut trainer = Trainer::from_varmap(&vm, cfg)?;
        if world > 1 {
            trainer.set_collective(comm.clone())?;
        }
        let mut loader = WebDatasetLoader::new(
            shards.to_vec(),
            shuffled_config(),
            WebDatasetConfig {
                rank,
                world_size: world,
                ..wds(2, 4)
            },
        )?;
        let mut mgr = CheckpointManager::new(ckpt, 2)?;
        let writes = Arc::new(AtomicUsize::new(0));
        let counter = writes.clone();
        mgr.set_before_write(Some(Box::new(move |p| {
            counter.fetch_add(1, Ordering::SeqCst);
            if rank == 0 {
                Ok(())
            } else {
                Err(std::io::Error::other(format!(
                    "rank {rank} must not write {}",
                    p.display()
                )))
            }
        })));
        let summary = Fit::new(&mut trainer, &mut loader, total)
            .checkpoints(&mgr, 2)
            .resume(resume)
            .run(|b, ctx| {
                if crash_at == Some(ctx.step) && rank + 1 == world {
                    return Err(Error::Training("simulated crash".into()));
                }
                sink.lock()
                    .unwrap()
                    .push((rank, ctx.step, b.epoch, b.indices.clone()));
                let m = b
                    .images
                    .mean_keepdim(3)?
                    .mean_keepdim(2)?
                    .mean(0)?
                    .flatten_all()?;
                Ok((m - &w)?.sqr()?.sum_all()?)
            })?;
        let weights = w.to_vec1::<f32>()?.iter().map(|x| x.to_bits()).collect();
        Ok(RankRun {
            losses: summary.losses.clone(),
            weights,
            summary,
            writes: writes.load(Ordering::SeqCst),
        })
    })
}

#[test]
fn webdataset_two_ranks_resume_exactly_with_one_checkpoint_writer() {
    let dir = tempfile::tempdir().unwrap();
    let shards = twenty_four(dir.path());
    let sink = Mutex::new(Vec::new());
    let total = 6; // two epochs of 3 steps
    let a = dp_run(
        &sink,
        &shards,
        &dir.path().join("a"),
        2,
        total,
        false,
        None,
        0.5,
    )
    .unwrap();
    // The ranks took the same steps on different data.
    assert_eq!(a[0].weights, a[1].weights);
    assert_ne!(a[0].losses, a[1].losses);
    assert!(a[1].writes == 0 && a[0].writes > 0, "only rank 0 writes");
    for r in &a {
        let steps: Vec<&str> = r
            .summary
            .checkpoints
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap())
            .collect();
        assert_eq!(
            steps,
            ["step-000000002", "step-000000004", "step-000000006"]
        );
    }

    // The interrupted run: a worker dies in step 5, after the checkpoint at step 4.
    let b = dir.path().join("b");
    sink.lock().unwrap().clear();
    let e = dp_run(&sink, &shards, &b, 2, total, false, Some(5), 0.5)
        .err()
        .expect("the crash stops the group");
    assert!(e.to_string().contains("simulated crash"), "{e}");
    // One checkpoint set in the folder, with both ranks' positions, mid-epoch and
    // mid-shard.
    let mut names: Vec<String> = std::fs::read_dir(&b)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    assert_eq!(names, ["latest", "step-000000002", "step-000000004"]);
    let ck = CheckpointManager::load(&b.join("step-000000004")).unwrap();
    assert_eq!(ck.meta.world_size, 2);
    assert_eq!(ck.meta.rank_data.len(), 2);
    assert_eq!(ck.meta.data, Some(ck.meta.rank_data[0]));
    for (r, pos) in ck.meta.rank_data.iter().enumerate() {
        let c = pos.shard.unwrap();
        assert_eq!((c.rank, c.world_size), (r, 2));
        assert_eq!((pos.epoch, pos.cursor), (1, 4), "rank {r}: mid-epoch");
        assert!(c.offset > 0 && c.offset < 6, "rank {r}: mid-shard, {c:?}");
    }
    assert_ne!(ck.meta.rank_data[0], ck.meta.rank_data[1]);

    // Fresh workers (another initialisation) resume from step 4.
    let crashed_len = sink.lock().unwrap().len();
    let c = dp_run(&sink, &shards, &b, 2, total, true, None, -3.0).unwrap();
    for (r, run) in c.iter().enumerate() {
        assert_eq!(run.summary.start_step, 4, "rank {r}");
        assert!(run
            .summary
            .resumed_from
            .as_ref()
            .unwrap()
            .ends_with("step-000000004"));
        assert_eq!(run.losses, a[r].losses[4..], "rank {r}: resumed losses");
        assert_eq!(run.weights, a[r].weights, "rank {r}: final weights");
    }
    assert_eq!(c[1].writes, 0);

    // Across the two runs, each epoch's samples were used exactly once over the ranks
    // (the crashed run's steps after its checkpoint were lost and redone).
    let mut per_epoch: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
    let mut steps = BTreeSet::new();
    for (i, (rank, step, epoch, idx)) in sink.lock().unwrap().iter().enumerate() {
        if i < crashed_len && *step >= 4 {
            continue;
        }
        if i >= crashed_len {
            assert!(*step >= 4, "the resumed run starts at step 4");
        }
        assert!(
            steps.insert((*rank, *step)),
            "step {step} of rank {rank} twice"
        );
        per_epoch.entry(*epoch).or_default().extend(idx);
    }
    assert_eq!(
        steps.len(),
        2 * total as usize,
        "every step of both ranks once"
    );
    let all: Vec<usize> = (0..4)
        .flat_map(|s| (0..6).map(move |o| sample_index(s, o)))
        .collect();
    assert_eq!(per_epoch.len(), 2);
    for (epoch, mut idx) in per_epoch {
        idx.sort();
        assert_eq!(idx, all, "epoch {epoch}: no repeats, no gaps");
    }
}

#[test]
fn webdataset_resume_with_another_world_size_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let shards = twenty_four(dir.path());
    let sink = Mutex::new(Vec::new());
    // A checkpoint of 2 ranks resumed by 1.
    let two = dir.path().join("two");
    dp_run(&sink, &shards, &two, 2, 2, false, None, 0.5).unwrap();
    let e = dp_run(&sink, &shards, &two, 1, 4, true, None, 0.5)
        .err()
        .expect("refused");
    assert!(
        matches!(
            e,
            Error::WorldSizeMismatch {
                saved: 2,
                current: 1,
                ..
            }
        ),
        "{e}"
    );
    let text = e.to_string();
    assert!(
        text.contains("2 rank(s)") && text.contains("resumed with 1"),
        "{text}"
    );
    // The refused resume changed nothing on disk.
    let mgr = CheckpointManager::new(&two, 2).unwrap();
    let steps: Vec<u64> = mgr.list().unwrap().iter().map(|(s, _)| *s).collect();
    assert_eq!(steps, [2]);

    // A single-process checkpoint resumed by 2 ranks.
    let one = dir.path().join("one");
    let single = dp_run(&sink, &shards, &one, 1, 2, false, None, 0.5).unwrap();
    let e = dp_run(&sink, &shards, &one, 2, 4, true, None, 0.5)
        .err()
        .expect("refused");
    assert!(
        matches!(
            e,
            Error::WorldSizeMismatch {
                saved: 1,
                current: 2,
                ..
            }
        ),
        "{e}"
    );

    // A checkpoint written before world sizes were recorded (one position, no
    // `world_size`) loads as a single rank and resumes.
    let meta_path = one.join("step-000000002/meta.json");
    let mut meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&meta_path).unwrap()).unwrap();
    let obj = meta.as_object_mut().unwrap();
    assert_eq!(obj.remove("world_size"), Some(serde_json::json!(1)));
    assert!(obj.get("rank_data").is_none());
    std::fs::write(&meta_path, serde_json::to_vec_pretty(&meta).unwrap()).unwrap();
    let ck = CheckpointManager::load(&one.join("step-000000002")).unwrap();
    assert_eq!((ck.meta.world_size, ck.meta.rank_data.len()), (1, 0));
    let resumed = dp_run(&sink, &shards, &one, 1, 4, true, None, 7.0).unwrap();
    assert_eq!(resumed[0].summary.start_step, 2);
    let full = dp_run(
        &sink,
        &shards,
        &dir.path().join("full"),
        1,
        4,
        false,
        None,
        0.5,
    )
    .unwrap();
    assert_eq!(single[0].losses, full[0].losses[..2]);
    assert_eq!(resumed[0].losses, full[0].losses[2..]);
    assert_eq!(resumed[0].weights, full[0].weights);
}
