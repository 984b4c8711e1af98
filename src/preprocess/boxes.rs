//! Region boxes for BriVL's image tower: reading them from JSON, validating, clipping and
//! scaling them to model pixels, grid boxes for images without any, and padding a batch.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use super::image::ImageInput;
use crate::error::{Error, Result};

/// Reads region boxes for one image from a JSON file: either a list of `[x1, y1, x2, y2]`
/// or an object with a `bbox` list (the format of BriVL's example `jsonl` lines).
pub fn boxes_from_json(path: &Path) -> Result<Vec<[f32; 4]>> {
    let origin = path.display().to_string();
    let s = std::fs::read_to_string(path).map_err(|e| Error::io(format!("reading {origin}"), e))?;
    let v: serde_json::Value = serde_json::from_str(&s).map_err(|e| Error::parse(&origin, e))?;
    let list = match &v {
        serde_json::Value::Array(_) => &v,
        serde_json::Value::Object(o) => o
            .get("bbox")
            .ok_or_else(|| Error::parse(&origin, "object has no `bbox` field"))?,
        _ => {
            return Err(Error::parse(
                &origin,
                "expected a list of boxes or an object with `bbox`",
            ))
        }
    };
    let rows = list
        .as_array()
        .ok_or_else(|| Error::parse(&origin, "`bbox` is not a list"))?;
    rows.iter()
        .enumerate()
        .map(|(i, r)| {
            let bad = || Error::parse(&origin, format!("box {i} is not four numbers: {r}"));
            let a = r.as_array().ok_or_else(bad)?;
            if a.len() != 4 {
                return Err(bad());
            }
            let mut b = [0f32; 4];
            for (slot, x) in b.iter_mut().zip(a) {
                // Every coordinate must be a JSON number: a string, null or nested value is
                // an error, never skipped (which would shift the others into other slots).
                *slot = x.as_f64().ok_or_else(bad)? as f32;
            }
            Ok(b)
        })
        .collect()
}

/// Image inputs from paths, each with the boxes of the JSON file at the same position in
/// `box_files` (see [`boxes_from_json`]); `box_files` is either empty or one per image.
pub fn inputs_with_box_files(paths: &[PathBuf], box_files: &[PathBuf]) -> Result<Vec<ImageInput>> {
    if !box_files.is_empty() && box_files.len() != paths.len() {
        return Err(Error::InvalidArgument(format!(
            "{} box files for {} images: give one per image",
            box_files.len(),
            paths.len()
        )));
    }
    paths
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let input = ImageInput::path(p);
            match box_files.get(i) {
                Some(b) => Ok(input.with_boxes(boxes_from_json(b)?)),
                None => Ok(input),
            }
        })
        .collect()
}

/// Validates, clips and scales one image's boxes to model pixels and appends the whole
/// image; without boxes, a `grid × grid` grid (none for 0) plus the whole image.
///
/// Errors ([`Error::InvalidBox`]): a non-finite coordinate, `x2 < x1` or `y2 < y1`, a box
/// that does not overlap the image or has a coordinate more than one image width / height
/// beyond its border (boxes in the wrong units), and more than `max_img_len − 1` boxes.
pub fn prepare_boxes(
    boxes: Option<&[[f32; 4]]>,
    width: u32,
    height: u32,
    img_size: usize,
    max_img_len: usize,
    grid: usize,
    origin: &str,
) -> Result<Vec<[f32; 4]>> {
    let s = img_size as f64;
    let mut out = Vec::with_capacity(max_img_len);
    match boxes {
        Some(bs) => {
            let bad = |index: usize, value: [f32; 4], reason: String| Error::InvalidBox {
                origin: origin.to_string(),
                index,
                value,
                reason,
            };
            if bs.len() + 1 > max_img_len {
                let i = max_img_len.saturating_sub(1);
                return Err(bad(
                    i,
                    bs.get(i).copied().unwrap_or_default(),
                    format!(
                        "too many boxes: {} given, the model takes at most {} (plus the whole \
                         image); the original code keeps the first {}",
                        bs.len(),
                        i,
                        i
                    ),
                ));
            }
            let (wf, hf) = (width as f64, height as f64);
            for (i, b) in bs.iter().enumerate() {
                if b.iter().any(|v| !v.is_finite()) {
                    return Err(bad(i, *b, "a coordinate is not finite".into()));
                }
                let [x1, y1, x2, y2] = b.map(|v| v as f64);
                if x2 < x1 || y2 < y1 {
                    return Err(bad(i, *b, "inverted box (x2 < x1 or y2 < y1)".into()));
                }
                if x2 == x1 || y2 == y1 {
                    return Err(bad(i, *b, "zero-area box (x2 = x1 or y2 = y1)".into()));
                }
                let far = x1 < -wf || y1 < -hf || x2 > 2.0 * wf || y2 > 2.0 * hf;
                let outside = x1 >= wf || y1 >= hf || x2 <= 0.0 || y2 <= 0.0;
                if far || outside {
                    return Err(bad(
                        i,
                        *b,
                        format!(
                            "the box lies {} the {width}x{height} image (boxes are [x1, y1, \
                             x2, y2] in original-image pixels)",
                            if far { "far outside" } else { "outside" }
                        ),
                    ));
                }
                let (x1, x2) = (x1.clamp(0.0, wf), x2.clamp(0.0, wf));
                let (y1, y2) = (y1.clamp(0.0, hf), y2.clamp(0.0, hf));
                out.push([
                    (x1 * (s / wf)) as f32,
                    (y1 * (s / hf)) as f32,
                    (x2 * (s / wf)) as f32,
                    (y2 * (s / hf)) as f32,
                ]);
            }
        }
        None => {
            // Checked: a grid from a user or a config must not wrap around in release builds.
            let needed = grid.checked_mul(grid).and_then(|g| g.checked_add(1));
            if needed.is_none_or(|n| n > max_img_len) {
                return Err(Error::Config(format!(
                    "a {grid}x{grid} box grid plus the whole image needs {} boxes, but \
                     MAX_IMG_LEN is {max_img_len}; pass boxes or choose a smaller box_grid",
                    needed.map_or("more than 2^64".to_string(), |n| n.to_string())
                )));
            }
            let step = s / grid.max(1) as f64;
            // The NMI code's order: x index outer, y index inner.
            for i in 0..grid {
                for j in 0..grid {
                    out.push([
                        (i as f64 * step) as f32,
                        (j as f64 * step) as f32,
                        ((i + 1) as f64 * step) as f32,
                        ((j + 1) as f64 * step) as f32,
                    ]);
                }
            }
        }
    }
    out.push([0.0, 0.0, img_size as f32, img_size as f32]);
    Ok(out)
}

/// Pads per-image box lists to `[n, max_img_len, 4]` with a 0/1 mask `[n, max_img_len]`.
pub fn pad_boxes(
    rows: &[Vec<[f32; 4]>],
    max_img_len: usize,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let n = rows.len();
    let mut boxes = vec![0f32; n * max_img_len * 4];
    let mut mask = vec![0f32; n * max_img_len];
    for (i, r) in rows.iter().enumerate() {
        if r.len() > max_img_len {
            return Err(Error::InvalidArgument(format!(
                "image {i} has {} boxes, more than MAX_IMG_LEN {max_img_len}",
                r.len()
            )));
        }
        for (j, b) in r.iter().enumerate() {
            boxes[(i * max_img_len + j) * 4..(i * max_img_len + j + 1) * 4].copy_from_slice(b);
            mask[i * max_img_len + j] = 1.0;
        }
    }
    Ok((
        Tensor::from_vec(boxes, (n, max_img_len, 4), device)?,
        Tensor::from_vec(mask, (n, max_img_len), device)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boxes_are_scaled_clipped_and_checked() {
        let b = prepare_boxes(
            Some(&[[10.0, -2.0, 250.0, 50.0]]),
            200,
            100,
            380,
            37,
            6,
            "x",
        )
        .unwrap();
        assert_eq!(b.len(), 2);
        assert_eq!(b[0], [19.0, 0.0, 380.0, 190.0]);
        assert_eq!(b[1], [0.0, 0.0, 380.0, 380.0]);
        let grid = prepare_boxes(None, 200, 100, 456, 37, 6, "x").unwrap();
        assert_eq!(grid.len(), 37);
        assert_eq!(grid[1], [0.0, 76.0, 76.0, 152.0]);
        let whole = prepare_boxes(None, 200, 100, 380, 37, 0, "x").unwrap();
        assert_eq!(whole, vec![[0.0, 0.0, 380.0, 380.0]]);
        assert!(matches!(
            prepare_boxes(None, 200, 100, 96, 6, 6, "x"),
            Err(Error::Config(_))
        ));
        for bad in [
            [f32::NAN, 0.0, 1.0, 1.0],
            [5.0, 0.0, 4.0, 1.0],
            [300.0, 0.0, 310.0, 10.0],
            [0.0, 0.0, 1000.0, 10.0],
        ] {
            assert!(matches!(
                prepare_boxes(
                    Some(&[[0.0, 0.0, 5.0, 5.0], bad]),
                    200,
                    100,
                    380,
                    37,
                    6,
                    "x"
                ),
                Err(Error::InvalidBox { index: 1, .. })
            ));
        }
        let many = vec![[0.0, 0.0, 5.0, 5.0]; 37];
        assert!(matches!(
            prepare_boxes(Some(&many), 200, 100, 380, 37, 6, "x"),
            Err(Error::InvalidBox { index: 36, .. })
        ));
    }
}
