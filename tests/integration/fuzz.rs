//! Seeded mutation fuzzing of every reader that takes bytes from outside: image decoding
//! and preprocessing, the `.pth` (zip + pickle) reader, safetensors headers, config and
//! preprocessor JSON, box JSON, manifests and WebDataset shards.
//!
//! No coverage-guided fuzzer builds on stable Rust here (cargo-fuzz and AFL need nightly or
//! their own toolchains), so each target mutates the fixture files (and structured seeds
//! built here) with a fixed-seed generator: bit flips, interesting integers, inserted,
//! deleted and duplicated ranges, truncation, splices between seeds, and, for JSON and
//! pickles, mutations of the parsed structure. Every input must give `Ok` or `Err`: a
//! panic fails the test, and an execution that runs longer than [`HANG_SECONDS`] aborts
//! the binary; in both cases the input is saved under `target/fuzz-crashes/` first. Each
//! target runs for [`budget`] (8 s by default, `TUWEN_FUZZ_SECONDS` to change it) and
//! prints how many executions it ran (`cargo test fuzz -- --nocapture`).

use std::io::{Read, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use crate::common::{fixture, repo_dir};

/// One execution longer than this is a hang.
const HANG_SECONDS: u64 = 60;

/// How long each target runs.
fn budget() -> Duration {
    let secs = std::env::var("TUWEN_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(8.0);
    Duration::from_secs_f64(secs)
}

/// xorshift64*: a fixed, dependency-free generator so every run mutates the same way.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

const INTERESTING: &[u64] = &[
    0,
    1,
    0x7f,
    0x80,
    0xff,
    0x7fff,
    0xffff,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    1 << 20,
    1 << 32,
    u64::MAX,
    i64::MAX as u64,
];

/// Byte-level mutations of `data` within `lo..hi` (the region worth hitting), 1 to 4 of
/// them; `other` is a second seed to splice from.
fn mutate_bytes(rng: &mut Rng, data: &mut Vec<u8>, lo: usize, hi: usize, other: &[u8]) {
    for _ in 0..1 + rng.below(4) {
        let len = data.len();
        let hi = hi.min(len);
        let at = if hi > lo { lo + rng.below(hi - lo) } else { 0 };
        match rng.below(9) {
            0 if len > 0 => {
                let i = at.min(len - 1);
                data[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = at.min(len - 1);
                data[i] = INTERESTING[rng.below(INTERESTING.len())] as u8;
            }
            2 if len >= 4 => {
                let i = at.min(len - 4);
                let v = INTERESTING[rng.below(INTERESTING.len())] as u32;
                let b = if rng.chance(50) {
                    v.to_le_bytes()
                } else {
                    v.to_be_bytes()
                };
                data[i..i + 4].copy_from_slice(&b);
            }
            3 if len >= 8 => {
                let i = at.min(len - 8);
                let v = INTERESTING[rng.below(INTERESTING.len())];
                data[i..i + 8].copy_from_slice(&v.to_le_bytes());
            }
            4 => {
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                let i = at.min(len);
                data.splice(i..i, bytes);
            }
            5 if len > 0 => {
                let i = at.min(len - 1);
                let n = 1 + rng.below((len - i).min(64));
                data.drain(i..i + n);
            }
            6 if len > 0 => {
                // Truncate: the commonest real damage (an interrupted download).
                data.truncate(at.min(len - 1).max(1));
            }
            7 if len > 0 => {
                let i = at.min(len - 1);
                let n = 1 + rng.below((len - i).min(256));
                let chunk = data[i..i + n].to_vec();
                let j = rng.below(len);
                data.splice(j..j, chunk);
            }
            _ if !other.is_empty() && len > 0 => {
                let i = rng.below(other.len());
                let n = 1 + rng.below((other.len() - i).min(128));
                let j = at.min(len - 1);
                let end = (j + n).min(len);
                data.splice(j..end, other[i..i + n].iter().copied());
            }
            _ => {}
        }
    }
}

/// Replaces a random node of a JSON value with an extreme one (or removes it).
fn mutate_json(rng: &mut Rng, v: &mut Value) {
    fn nodes(v: &Value) -> usize {
        1 + match v {
            Value::Array(a) => a.iter().map(nodes).sum(),
            Value::Object(o) => o.values().map(nodes).sum(),
            _ => 0,
        }
    }
    /// The `k`-th node in pre-order.
    fn pick(v: &mut Value, k: usize) -> &mut Value {
        if k == 0 {
            return v;
        }
        let mut k = k - 1;
        let children: Vec<&mut Value> = match v {
            Value::Array(a) => a.iter_mut().collect(),
            Value::Object(o) => o.values_mut().collect(),
            _ => unreachable!("a leaf has no node {k}"),
        };
        for c in children {
            let n = nodes(c);
            if k < n {
                return pick(c, k);
            }
            k -= n;
        }
        unreachable!("node index within the count")
    }
    let extremes = || -> Vec<Value> {
        serde_json::from_str(
            r#"[0, -1, 1, 2, 3, 1000000000, 4294967296, 18446744073709551615, -9.9e300,
                1.7e308, 1e-300, -0.0, 0.5, "x", "", "siglip2", "gelu_pytorch_tanh", null,
                true, [], {}, [0, 0, 0, 0], [1e30, -1e30], [[0, 0, 0, 0]]]"#,
        )
        .expect("valid JSON literal")
    };
    let n = nodes(v);
    let node = pick(v, rng.below(n));
    match rng.below(4) {
        0 => {
            if let Value::Object(o) = node {
                if !o.is_empty() {
                    let key = o.keys().nth(rng.below(o.len())).cloned();
                    if let Some(key) = key {
                        o.remove(&key);
                    }
                    return;
                }
            }
            let e = extremes();
            *node = e[rng.below(e.len())].clone();
        }
        1 => {
            if let Some(x) = node.as_f64() {
                // A near neighbour of the real value: off by one, scaled, negated.
                let y = match rng.below(4) {
                    0 => x + 1.0,
                    1 => x - 1.0,
                    2 => -x,
                    _ => x * 1e6,
                };
                *node = serde_json::json!(y);
            } else {
                let e = extremes();
                *node = e[rng.below(e.len())].clone();
            }
        }
        _ => {
            let e = extremes();
            *node = e[rng.below(e.len())].clone();
        }
    }
}

/// Runs `target` on mutations of `seeds` until the budget is spent. A panic or a hang
/// saves the input and fails.
fn fuzz(
    name: &str,
    seeds: Vec<Vec<u8>>,
    mutate: impl Fn(&mut Rng, &[u8], &[u8]) -> Vec<u8>,
    target: impl Fn(&[u8]),
) {
    assert!(!seeds.is_empty(), "fuzz target {name} has no seeds");
    let crash_dir = repo_dir().join("target").join("fuzz-crashes");
    let mut rng = Rng::new(
        name.bytes()
            .fold(17u64, |h, b| h.wrapping_mul(31) ^ b as u64),
    );
    let started = Instant::now();
    let budget = budget();
    // A watchdog: the start time (ms since `started`) of the running execution, or 0.
    let running = Arc::new(AtomicU64::new(0));
    let current = Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let (running, current, done) = (running.clone(), current.clone(), done.clone());
        let (crash_dir, name) = (crash_dir.clone(), name.to_string());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(500));
                let t = running.load(Ordering::Relaxed);
                if t > 0 && started.elapsed().as_millis() as u64 > t + HANG_SECONDS * 1000 {
                    let _ = std::fs::create_dir_all(&crash_dir);
                    let p = crash_dir.join(format!("{name}-hang.bin"));
                    if let Ok(input) = current.lock() {
                        let _ = std::fs::write(&p, &*input);
                    }
                    eprintln!(
                        "fuzz {name}: an input ran over {HANG_SECONDS} s; saved to {}",
                        p.display()
                    );
                    std::process::abort();
                }
            }
        });
    }
    let mut executions = 0u64;
    // The seeds themselves first, unmutated.
    let mut queue: Vec<Vec<u8>> = seeds.clone();
    while started.elapsed() < budget || !queue.is_empty() {
        let input = match queue.pop() {
            Some(s) => s,
            None => {
                let a = &seeds[rng.below(seeds.len())];
                let b = &seeds[rng.below(seeds.len())];
                mutate(&mut rng, a, b)
            }
        };
        if let Ok(mut c) = current.lock() {
            c.clone_from(&input);
        }
        running.store(started.elapsed().as_millis() as u64 + 1, Ordering::Relaxed);
        let outcome = catch_unwind(AssertUnwindSafe(|| target(&input)));
        running.store(0, Ordering::Relaxed);
        executions += 1;
        if outcome.is_err() {
            done.store(true, Ordering::Relaxed);
            std::fs::create_dir_all(&crash_dir).unwrap();
            let p = crash_dir.join(format!("{name}-{executions}.bin"));
            std::fs::write(&p, &input).unwrap();
            panic!(
                "fuzz {name}: execution {executions} panicked; input saved to {}",
                p.display()
            );
        }
    }
    done.store(true, Ordering::Relaxed);
    eprintln!(
        "fuzz {name}: {executions} executions in {:.1} s, no panic, abort or hang",
        started.elapsed().as_secs_f64()
    );
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("fixture {}: {e}", p.display()))
}

/// A small image in each format the decoder reads.
fn encoded_images() -> Vec<Vec<u8>> {
    let img = image::RgbImage::from_fn(17, 11, |x, y| {
        image::Rgb([(x * 15) as u8, (y * 23) as u8, ((x * y) * 3) as u8])
    });
    let mut out = Vec::new();
    for fmt in [
        image::ImageFormat::Png,
        image::ImageFormat::Jpeg,
        image::ImageFormat::Gif,
        image::ImageFormat::Bmp,
        image::ImageFormat::Tiff,
        image::ImageFormat::WebP,
    ] {
        let mut buf = std::io::Cursor::new(Vec::new());
        image::DynamicImage::ImageRgb8(img.clone())
            .write_to(&mut buf, fmt)
            .unwrap_or_else(|e| panic!("encoding {fmt:?}: {e}"));
        out.push(buf.into_inner());
    }
    out
}

#[test]
fn fuzz_image_decoding_and_preprocessing() {
    use tuwen::preprocess::{ImageInput, ImageProcessor, NaFlexProcessor};
    let mut seeds = encoded_images();
    seeds.push(read(&fixture("data/images/baike_14361859_0.jpg")));
    seeds.push(read(&fixture("r2d2/resize_src.png")));
    let fixed = ImageProcessor::siglip2(32);
    let naflex = NaFlexProcessor::new(16, 16);
    fuzz(
        "image",
        seeds,
        |rng, a, b| {
            let mut d = a.to_vec();
            // Headers hold the sizes: hit the first 64 bytes half the time.
            let hi = if rng.chance(50) { 64 } else { d.len() };
            mutate_bytes(rng, &mut d, 0, hi, b);
            d
        },
        |bytes| {
            if let Ok(img) = ImageInput::bytes(bytes.to_vec()).decode_rgb() {
                let _ = fixed.process_rgb(&img);
                let _ = naflex.patchify(&img);
            }
        },
    );
}

/// The members of a zip, in order.
fn unzip(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut z = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
    (0..z.len())
        .map(|i| {
            let mut f = z.by_index(i).unwrap();
            let mut data = Vec::new();
            f.read_to_end(&mut data).unwrap();
            (f.name().unwrap().to_string(), data)
        })
        .collect()
}

fn rezip(members: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, data) in members {
        w.start_file(name.as_str(), opts).unwrap();
        w.write_all(data).unwrap();
    }
    w.finish().unwrap().into_inner()
}

#[test]
fn fuzz_pth_reader() {
    let seeds = vec![
        read(&fixture("fuzz/state_dict.pth")),
        read(&fixture("fuzz/nested.pth")),
    ];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("input.pth");
    fuzz(
        "pth",
        seeds,
        |rng, a, b| {
            if rng.chance(30) {
                // Raw damage to the zip.
                let mut d = a.to_vec();
                let hi = d.len();
                mutate_bytes(rng, &mut d, 0, hi, b);
                return d;
            }
            // Deep: a valid zip around a mutated pickle (or a mutated storage size).
            let mut members = unzip(a);
            let others = unzip(b);
            let pkl = members.iter().position(|(n, _)| n.ends_with("data.pkl"));
            let k = match pkl {
                Some(k) if rng.chance(85) => k,
                _ => rng.below(members.len()),
            };
            let other = others
                .iter()
                .find(|(n, _)| n.ends_with("data.pkl"))
                .map(|(_, d)| d.clone())
                .unwrap_or_default();
            let data = &mut members[k].1;
            let hi = data.len();
            mutate_bytes(rng, data, 0, hi, &other);
            rezip(&members)
        },
        |bytes| {
            std::fs::write(&path, bytes).unwrap();
            for key in [None, Some("model")] {
                if let Ok(src) = tuwen::checkpoint::TensorSource::open(&path, key) {
                    for name in src.shapes().into_keys() {
                        let _ = src.load(&name);
                    }
                }
            }
            let _ = tuwen::checkpoint::convert::list_pth(&path, None);
            let _ = tuwen::checkpoint::discover::identify(&path);
        },
    );
}

/// A safetensors file's header: its JSON and where the data starts.
fn split_safetensors(bytes: &[u8]) -> Option<(Value, &[u8])> {
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?) as usize;
    let header = bytes.get(8..8usize.checked_add(n)?)?;
    Some((serde_json::from_slice(header).ok()?, &bytes[8 + n..]))
}

#[test]
fn fuzz_safetensors_headers() {
    let dir = tempfile::tempdir().unwrap();
    let seed_path = dir.path().join("seed.safetensors");
    let dev = Device::Cpu;
    let mut tensors = std::collections::BTreeMap::new();
    tensors.insert(
        "a.weight".to_string(),
        Tensor::arange(0f32, 12., &dev)
            .unwrap()
            .reshape((3, 4))
            .unwrap(),
    );
    tensors.insert(
        "b.bias".to_string(),
        Tensor::ones(5, DType::F16, &dev).unwrap(),
    );
    tensors.insert("c.ids".to_string(), Tensor::arange(0i64, 4, &dev).unwrap());
    tuwen::checkpoint::save_safetensors(&tensors, None, &seed_path).unwrap();
    let seeds = vec![read(&seed_path)];
    let path = dir.path().join("input.safetensors");
    fuzz(
        "safetensors",
        seeds,
        |rng, a, b| {
            if rng.chance(50) {
                if let Some((mut header, data)) = split_safetensors(a) {
                    mutate_json(rng, &mut header);
                    let h = serde_json::to_vec(&header).unwrap();
                    let mut out = (h.len() as u64).to_le_bytes().to_vec();
                    out.extend_from_slice(&h);
                    out.extend_from_slice(data);
                    return out;
                }
            }
            let mut d = a.to_vec();
            let hi = if rng.chance(70) { 200 } else { d.len() };
            mutate_bytes(rng, &mut d, 0, hi, b);
            d
        },
        |bytes| {
            std::fs::write(&path, bytes).unwrap();
            if let Ok(src) = tuwen::checkpoint::open_safetensors(std::slice::from_ref(&path)) {
                for name in src.shapes().into_keys() {
                    let _ = src.load(&name);
                }
            }
        },
    );
}

#[test]
fn fuzz_config_and_preprocessor_json() {
    use tuwen::models::brivl::BrivlConfig;
    use tuwen::models::r2d2::R2d2Config;
    use tuwen::models::siglip2::SiglipConfig;
    // Model directories whose config.json (and preprocessor_config.json) is replaced by
    // the mutated input; the weights and tokenizer stay the tiny fixtures.
    let dirs = tempfile::tempdir().unwrap();
    let mut seeds = Vec::new();
    let mut model_dirs = Vec::new();
    for (k, model) in ["siglip2/siglip_tiny", "siglip2/siglip2_naflex_tiny"]
        .iter()
        .enumerate()
    {
        let d = dirs.path().join(format!("m{k}"));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(
            fixture(&format!("{model}/model.safetensors")),
            d.join("model.safetensors"),
        )
        .unwrap();
        std::fs::copy(
            fixture("siglip2/tokenizer/tokenizer.json"),
            d.join("tokenizer.json"),
        )
        .unwrap();
        let cfg: Value =
            serde_json::from_slice(&read(&fixture(&format!("{model}/config.json")))).unwrap();
        let pre = serde_json::json!({"max_num_patches": 16, "patch_size": 16});
        // One seed per directory: {"dir": k, "config": ..., "preprocessor": ...}.
        seeds.push(
            serde_json::to_vec(&serde_json::json!({"dir": k, "config": cfg, "pre": pre})).unwrap(),
        );
        model_dirs.push(d);
    }
    let brivl: Value = serde_json::from_slice(&read(&fixture("original/brivl_tiny.json"))).unwrap();
    let r2d2 = serde_json::to_value(crate::r2d2::tiny_config()).unwrap();
    for (k, cfg) in [brivl, r2d2].into_iter().enumerate() {
        seeds.push(serde_json::to_vec(&serde_json::json!({"dir": 2 + k, "config": cfg})).unwrap());
    }
    let img = tuwen::preprocess::ImageInput::image(image::DynamicImage::ImageRgb8(
        image::RgbImage::from_fn(20, 12, |x, y| {
            image::Rgb([(x * 9) as u8, (y * 17) as u8, 90])
        }),
    ));
    let scratch = dirs.path().join("scratch.json");
    fuzz(
        "config",
        seeds,
        |rng, a, b| {
            let mut v: Value = serde_json::from_slice(a).unwrap();
            for _ in 0..1 + rng.below(3) {
                // Mutate inside "config" or "pre", never the routing key.
                let part = if rng.chance(75) { "config" } else { "pre" };
                if let Some(p) = v.get_mut(part) {
                    mutate_json(rng, p);
                }
            }
            let mut out = serde_json::to_vec(&v).unwrap();
            if rng.chance(10) {
                // Sometimes damage the text itself; the harness then sees invalid JSON.
                let hi = out.len();
                mutate_bytes(rng, &mut out, 0, hi, b);
            }
            out
        },
        |bytes| {
            let Ok(v) = serde_json::from_slice::<Value>(bytes) else {
                return;
            };
            let k = v["dir"].as_u64().unwrap_or(0) as usize;
            let cfg = serde_json::to_vec(&v["config"]).unwrap();
            match k {
                0 | 1 => {
                    let d = &model_dirs[k];
                    std::fs::write(d.join("config.json"), &cfg).unwrap();
                    match v.get("pre") {
                        Some(p) => std::fs::write(
                            d.join("preprocessor_config.json"),
                            serde_json::to_vec(p).unwrap(),
                        )
                        .unwrap(),
                        None => {
                            let _ = std::fs::remove_file(d.join("preprocessor_config.json"));
                        }
                    }
                    let _ = SiglipConfig::from_json_file(&d.join("config.json"));
                    let opts = tuwen::LoadOptions {
                        tune_allocator: false,
                        ..Default::default()
                    };
                    if let Ok(m) = tuwen::load(d.to_str().unwrap(), &opts) {
                        let _ = m.embed_texts(&["红色的圆形", "a"]);
                        let _ = m.embed_images(std::slice::from_ref(&img));
                    }
                }
                2 => {
                    std::fs::write(&scratch, &cfg).unwrap();
                    if let Ok(c) = BrivlConfig::from_file(&scratch) {
                        let _ = c.validate();
                    }
                }
                _ => {
                    std::fs::write(&scratch, &cfg).unwrap();
                    if let Ok(c) = R2d2Config::from_json_file(&scratch) {
                        let _ = c.validate();
                    }
                }
            }
        },
    );
}

#[test]
fn fuzz_box_json() {
    use tuwen::preprocess::boxes::{boxes_from_json, prepare_boxes};
    let seeds: Vec<Vec<u8>> = [
        r#"[[0, 0, 10, 10], [2.5, 3, 50, 8], [1, 1, 99, 79]]"#,
        r#"{"bbox": [[1, 2, 3, 4], [10, 10, 60, 70]], "id": 3}"#,
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("boxes.json");
    fuzz(
        "boxes",
        seeds,
        |rng, a, b| {
            if rng.chance(60) {
                if let Ok(mut v) = serde_json::from_slice::<Value>(a) {
                    mutate_json(rng, &mut v);
                    return serde_json::to_vec(&v).unwrap();
                }
            }
            let mut d = a.to_vec();
            let hi = d.len();
            mutate_bytes(rng, &mut d, 0, hi, b);
            d
        },
        |bytes| {
            std::fs::write(&path, bytes).unwrap();
            if let Ok(b) = boxes_from_json(&path) {
                for (w, h) in [(100, 80), (1, 1), (u32::MAX, 3)] {
                    let _ = prepare_boxes(Some(&b), w, h, 64, 37, 6, "fuzz");
                }
            }
            // The grid comes from users too: any value, checked arithmetic.
            let grid = u64::from_le_bytes(
                bytes
                    .iter()
                    .copied()
                    .chain([0; 8])
                    .take(8)
                    .collect::<Vec<_>>()[..8]
                    .try_into()
                    .unwrap(),
            ) as usize;
            let _ = prepare_boxes(None, 100, 80, 64, 37, grid, "fuzz");
        },
    );
}

#[test]
fn fuzz_manifests_and_webdataset_shards() {
    use tuwen::train::webdataset::{ShardSample, ShardSpec, ShardWriter};
    use tuwen::train::{DataConfig, DataLoader, Manifest, WebDatasetConfig, WebDatasetLoader};
    let dir = tempfile::tempdir().unwrap();
    let images = encoded_images();
    std::fs::write(dir.path().join("a.png"), &images[0]).unwrap();
    std::fs::write(dir.path().join("b.jpg"), &images[1]).unwrap();
    // Manifests: JSONL and CSV, routed by their first byte ('{' or not).
    let jsonl = concat!(
        r#"{"image": "a.png", "caption": "红色的圆形", "id": "x"}"#,
        "\n",
        r#"{"image": "b.jpg", "captions": ["蓝色", "方形"], "boxes": [[0, 0, 5, 5]]}"#,
        "\n"
    );
    let csv = "image,caption\na.png,红色的圆形\nb.jpg,\"蓝色, 方形\"\n";
    // A shard of three samples.
    let shard_dir = dir.path().join("shards");
    let mut w = ShardWriter::new(&shard_dir, "s", 8).unwrap();
    for (i, img) in images.iter().take(3).enumerate() {
        w.write(&ShardSample {
            key: Some(format!("k{i}")),
            image: img.clone(),
            image_ext: ["png", "jpg", "gif"][i].into(),
            captions: vec![format!("第{i}张")],
            id: Some(format!("id{i}")),
            boxes: (i == 1).then(|| vec![[0.0, 0.0, 4.0, 4.0]]),
        })
        .unwrap();
    }
    let shard = w.finish().unwrap().remove(0);
    let tar_seed = read(&shard);
    let mut seeds = vec![jsonl.as_bytes().to_vec(), csv.as_bytes().to_vec()];
    // Shards are routed by a leading 0xff byte (stripped before use).
    seeds.push([&[0xffu8][..], &tar_seed].concat());
    let input_dir = dir.path().join("input");
    std::fs::create_dir_all(&input_dir).unwrap();
    let manifest_path = dir.path().join("m.jsonl");
    let csv_path = dir.path().join("m.csv");
    fuzz(
        "data",
        seeds,
        |rng, a, b| {
            let mut d = a.to_vec();
            let (lo, hi) = if d.first() == Some(&0xff) {
                // Tar headers are 512-byte blocks: hit them most of the time.
                let blocks = (d.len() - 1) / 512;
                let k = rng.below(blocks.max(1));
                if rng.chance(70) {
                    (1 + k * 512, 1 + k * 512 + 512)
                } else {
                    (1, d.len())
                }
            } else {
                (0, d.len())
            };
            let lo = lo.max(1).min(d.len());
            mutate_bytes(rng, &mut d, lo, hi, b);
            d
        },
        |bytes| {
            let cfg = DataConfig {
                shuffle: false,
                drop_last: false,
                ..DataConfig::new(2, 16)
            };
            if bytes.first() == Some(&0xff) {
                std::fs::write(input_dir.join("s-000000.tar"), &bytes[1..]).unwrap();
                let wcfg = WebDatasetConfig {
                    threads: 1,
                    ..WebDatasetConfig::default()
                };
                if let Ok(mut l) =
                    WebDatasetLoader::new(ShardSpec::Dir(input_dir.clone()), cfg, wcfg)
                {
                    for _ in 0..4 {
                        match l.next_batch_in_epoch() {
                            Ok(Some(_)) => {}
                            _ => break,
                        }
                    }
                }
                return;
            }
            let (path, text_path) = if bytes.first() == Some(&b'{') {
                (&manifest_path, &manifest_path)
            } else {
                (&csv_path, &csv_path)
            };
            std::fs::write(text_path, bytes).unwrap();
            if let Ok(m) = Manifest::open(path) {
                if let Ok(mut l) = DataLoader::new(m, cfg) {
                    let _ = l.next_batch();
                }
            }
            let _ = tuwen::eval::RetrievalDataset::open(path, None);
        },
    );
}
