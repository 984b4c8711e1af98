//! A synthetic captioned dataset for learning tests and smoke runs: coloured shapes on a
//! noisy background, captioned in Chinese ("红色的圆形", "一个蓝色的三角形", …).
//!
//! Every image shows one shape of one colour at a random position, size and background;
//! its caption names the colour and the shape, with a few phrasings. A model that learns
//! the pairing can retrieve the right caption for a held-out image, so image→caption
//! Recall@1 over the [`class_captions`] measures whether training really trains.
//!
//! ```no_run
//! # fn main() -> tuwen::Result<()> {
//! use tuwen::train::synthetic::{write_shapes_dataset, ShapesConfig};
//! let train = write_shapes_dataset("data/shapes-train".as_ref(), &ShapesConfig::new(512, 0))?;
//! let held_out = write_shapes_dataset("data/shapes-val".as_ref(), &ShapesConfig::new(96, 1))?;
//! println!("{} training pairs in {}", train.manifest.len(), train.manifest.origin);
//! # Ok(()) }
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};

use image::{Rgb, RgbImage};
use rand::Rng;
use serde_json::json;

use super::{Manifest, Sample};
use crate::error::{Error, Result};
use crate::train::rng::derive_rng;

/// The colours: Chinese name and RGB.
pub const COLOURS: &[(&str, [u8; 3])] = &[
    ("红色", [220, 30, 30]),
    ("绿色", [30, 170, 40]),
    ("蓝色", [30, 60, 220]),
    ("黄色", [235, 210, 20]),
    ("紫色", [150, 40, 190]),
    ("黑色", [20, 20, 20]),
];

/// The shapes, by Chinese name.
pub const SHAPES: &[&str] = &["圆形", "正方形", "三角形", "十字形"];

/// Caption templates; `{}` is "colour的shape".
const TEMPLATES: &[&str] = &["{}", "一个{}", "图中有一个{}", "这是{}"];

/// The number of (colour, shape) classes.
pub fn num_classes() -> usize {
    COLOURS.len() * SHAPES.len()
}

/// The canonical caption of class `c` ("红色的圆形"), in class order.
pub fn class_captions() -> Vec<String> {
    (0..num_classes())
        .map(|c| {
            format!(
                "{}的{}",
                COLOURS[c / SHAPES.len()].0,
                SHAPES[c % SHAPES.len()]
            )
        })
        .collect()
}

/// What to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShapesConfig {
    /// Number of images.
    pub samples: usize,
    /// Image side in pixels.
    pub size: u32,
    /// Seed: the same seed gives the same files.
    pub seed: u64,
    /// Vary the caption wording (otherwise every caption is the canonical one).
    pub vary_captions: bool,
    /// Record the shape's bounding box as the sample's one region box (`"boxes"` in the
    /// manifest, original-image pixels), as an object detector would give BriVL.
    pub boxes: bool,
}

impl ShapesConfig {
    /// `samples` images of 64×64 with varied captions and no boxes.
    pub fn new(samples: usize, seed: u64) -> Self {
        Self {
            samples,
            size: 64,
            seed,
            vary_captions: true,
            boxes: false,
        }
    }
}

/// A generated dataset.
#[derive(Debug, Clone)]
pub struct ShapesDataset {
    /// The samples (absolute image paths, one caption each, `id` = the class index).
    pub manifest: Manifest,
    /// The class of each sample, in manifest order.
    pub labels: Vec<usize>,
    /// The JSONL manifest written next to the images.
    pub manifest_path: PathBuf,
}

/// Draws one image of class `class` (see [`class_captions`]).
pub fn draw_shape<R: Rng>(class: usize, size: u32, rng: &mut R) -> RgbImage {
    draw_shape_boxed(class, size, rng).0
}

/// Draws one image of class `class` and returns it with the shape's bounding box
/// `[x1, y1, x2, y2]` in pixels.
pub fn draw_shape_boxed<R: Rng>(class: usize, size: u32, rng: &mut R) -> (RgbImage, [f32; 4]) {
    let colour = COLOURS[class / SHAPES.len() % COLOURS.len()].1;
    let shape = class % SHAPES.len();
    let s = size as f32;
    // A light, noisy background with a random tint.
    let base: [f32; 3] = std::array::from_fn(|_| rng.random_range(190.0..250.0));
    let mut img = RgbImage::from_fn(size, size, |_, _| {
        Rgb(std::array::from_fn(|c| {
            (base[c] + rng.random_range(-12.0..12.0)).clamp(0.0, 255.0) as u8
        }))
    });
    let r = s * rng.random_range(0.18..0.32);
    let cx = rng.random_range(r..s - r);
    let cy = rng.random_range(r..s - r);
    // Half the side of the shape's bounding box: the square is drawn a little smaller.
    let half = if shape == 1 { r * 0.85 } else { r };
    let inside = |x: f32, y: f32| -> bool {
        let (dx, dy) = (x - cx, y - cy);
        match shape {
            0 => dx * dx + dy * dy <= r * r,
            1 => dx.abs() <= half && dy.abs() <= half,
            2 => {
                // Upward triangle with apex at (cx, cy - r) and base at cy + r.
                let t = (dy + r) / (2.0 * r);
                (0.0..=1.0).contains(&t) && dx.abs() <= t * r
            }
            _ => (dx.abs() <= r && dy.abs() <= r * 0.3) || (dy.abs() <= r && dx.abs() <= r * 0.3),
        }
    };
    for (x, y, p) in img.enumerate_pixels_mut() {
        if inside(x as f32 + 0.5, y as f32 + 0.5) {
            *p = Rgb(std::array::from_fn(|c| {
                (colour[c] as f32 + rng.random_range(-10.0..10.0)).clamp(0.0, 255.0) as u8
            }));
        }
    }
    (img, [cx - half, cy - half, cx + half, cy + half])
}

/// Writes `config.samples` PNG images and `manifest.jsonl` into `dir` (created if
/// missing); classes are balanced (sample `i` has class `i mod num_classes()` before the
/// seeded shuffle of the order).
pub fn write_shapes_dataset(dir: &Path, config: &ShapesConfig) -> Result<ShapesDataset> {
    if config.samples == 0 {
        return Err(Error::InvalidArgument(
            "a synthetic dataset needs at least one sample".into(),
        ));
    }
    if config.size < 16 {
        return Err(Error::InvalidArgument(format!(
            "synthetic images must be at least 16 pixels wide, got {}",
            config.size
        )));
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    let dir = dir
        .canonicalize()
        .map_err(|e| Error::io(format!("resolving {}", dir.display()), e))?;
    let captions = class_captions();
    let mut order: Vec<usize> = (0..config.samples).map(|i| i % num_classes()).collect();
    let mut rng = derive_rng(config.seed, &[0x5348_4150_4553]);
    for i in (1..order.len()).rev() {
        order.swap(i, rng.random_range(0..=i));
    }
    let manifest_path = dir.join("manifest.jsonl");
    let mut lines = Vec::with_capacity(config.samples);
    let mut samples = Vec::with_capacity(config.samples);
    for (i, &class) in order.iter().enumerate() {
        let (img, bbox) = draw_shape_boxed(class, config.size, &mut rng);
        let name = format!("{i:06}.png");
        let path = dir.join(&name);
        img.save(&path).map_err(|e| Error::Image {
            origin: path.display().to_string(),
            reason: format!("cannot write: {e}"),
        })?;
        let caption = if config.vary_captions {
            let t = TEMPLATES[rng.random_range(0..TEMPLATES.len())];
            t.replace("{}", &captions[class])
        } else {
            captions[class].clone()
        };
        let boxes = config.boxes.then(|| vec![bbox]);
        let mut line = json!({"image": name, "caption": caption, "id": class});
        if let Some(b) = &boxes {
            line["boxes"] = json!(b);
        }
        lines.push(line.to_string());
        samples.push(Sample {
            image: path,
            captions: vec![caption],
            boxes,
            id: Some(class.to_string()),
        });
    }
    let mut f = std::fs::File::create(&manifest_path)
        .map_err(|e| Error::io(format!("creating {}", manifest_path.display()), e))?;
    for l in &lines {
        writeln!(f, "{l}")
            .map_err(|e| Error::io(format!("writing {}", manifest_path.display()), e))?;
    }
    Ok(ShapesDataset {
        manifest: Manifest::from_samples(manifest_path.display().to_string(), samples),
        labels: order,
        manifest_path,
    })
}

/// Image→caption Recall@1 in `[0, 1]`: the share of rows of `scores`
/// (`[n_images][n_classes]`, e.g. cosine similarities to the [`class_captions`]) whose
/// best-scoring class is the label.
pub fn class_recall_at_1(scores: &[Vec<f32>], labels: &[usize]) -> Result<f64> {
    if scores.len() != labels.len() || scores.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "{} score rows for {} labels",
            scores.len(),
            labels.len()
        )));
    }
    let hits = scores
        .iter()
        .zip(labels)
        .filter(|(row, &l)| {
            let best = row
                .iter()
                .enumerate()
                .fold((usize::MAX, f32::NEG_INFINITY), |acc, (j, &s)| {
                    if s > acc.1 {
                        (j, s)
                    } else {
                        acc
                    }
                })
                .0;
            best == l
        })
        .count();
    Ok(hits as f64 / labels.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dataset_is_deterministic_balanced_and_readable() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let cfg = ShapesConfig::new(48, 7);
        let da = write_shapes_dataset(a.path(), &cfg).unwrap();
        let db = write_shapes_dataset(b.path(), &cfg).unwrap();
        assert_eq!(da.labels, db.labels);
        for c in 0..num_classes() {
            assert_eq!(da.labels.iter().filter(|&&l| l == c).count(), 2);
        }
        let (ia, ib) = (
            image::open(&da.manifest.samples[5].image).unwrap(),
            image::open(&db.manifest.samples[5].image).unwrap(),
        );
        assert_eq!(ia.as_bytes(), ib.as_bytes());
        let m = Manifest::open(&da.manifest_path).unwrap();
        assert_eq!(m.len(), 48);
        for (s, &l) in m.samples.iter().zip(&da.labels) {
            assert!(s.captions[0].contains(&class_captions()[l]));
        }
        // The shape is drawn in its colour: some pixels are close to it.
        let img = draw_shape(0, 64, &mut derive_rng(1, &[]));
        assert!(img.pixels().filter(|p| p.0[0] > 180 && p.0[1] < 80).count() > 50);
    }

    #[test]
    fn boxes_enclose_the_shape_and_reach_the_manifest() {
        let red = |p: &Rgb<u8>| p.0[0] > 180 && p.0[1] < 80;
        for class in 0..SHAPES.len() {
            let (img, [x1, y1, x2, y2]) = draw_shape_boxed(class, 64, &mut derive_rng(3, &[]));
            let mut inside = 0;
            for (x, y, p) in img.enumerate_pixels() {
                let (x, y) = (x as f32 + 0.5, y as f32 + 0.5);
                let within = x >= x1 && x <= x2 && y >= y1 && y <= y2;
                assert!(
                    !red(p) || within,
                    "class {class}: a red pixel at {x},{y} outside"
                );
                inside += usize::from(red(p));
            }
            // The box is tight: the shape fills a fair part of it.
            assert!(inside as f32 > 0.3 * (x2 - x1) * (y2 - y1), "class {class}");
        }
        let dir = tempfile::tempdir().unwrap();
        let cfg = ShapesConfig {
            boxes: true,
            ..ShapesConfig::new(4, 2)
        };
        let d = write_shapes_dataset(dir.path(), &cfg).unwrap();
        let m = Manifest::open(&d.manifest_path).unwrap();
        for (a, b) in m.samples.iter().zip(&d.manifest.samples) {
            assert_eq!(a.boxes.as_ref().map(Vec::len), Some(1));
            assert_eq!(a.boxes, b.boxes);
        }
    }

    #[test]
    fn recall_counts_top1() {
        let s = vec![vec![0.1, 0.9], vec![0.8, 0.2], vec![0.4, 0.6]];
        assert!((class_recall_at_1(&s, &[1, 0, 0]).unwrap() - 2.0 / 3.0).abs() < 1e-12);
        assert!(class_recall_at_1(&s, &[1]).is_err());
    }
}
