//! Manifests: JSONL and CSV lists of (image, captions, boxes, id) samples.
//!
//! **Manifests.** JSONL, one object per line:
//! `{"image": "img/1.jpg", "caption": "…"}` or `"captions": ["…", "…"]`, with optional
//! `"boxes": [[x1, y1, x2, y2], …]` (original-image pixels) and `"id"` (string or number).
//! CSV with a header row naming an `image` column (or `image_path`, `path`, `file`) and a
//! `caption` column (or `text`, `title`), optionally `id`; fields may be quoted with `"`
//! (doubled inside), and quoted fields may span lines. Relative image paths are resolved
//! against the manifest's directory. A malformed line is an error naming file and line.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One image–text pair (or image with several captions).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// The image file (absolute, or relative to the working directory).
    pub image: PathBuf,
    /// At least one caption.
    pub captions: Vec<String>,
    /// Region boxes `[x1, y1, x2, y2]` in original-image pixels.
    pub boxes: Option<Vec<[f32; 4]>>,
    /// An identifier (pairs with the same id are positives for multi-positive losses).
    pub id: Option<String>,
}

/// A list of samples read from a manifest file.
#[derive(Debug, Clone, PartialEq)]
pub struct Manifest {
    /// Where it was read from (for messages).
    pub origin: String,
    pub samples: Vec<Sample>,
}

pub(crate) fn data_err(origin: &str, line: Option<usize>, reason: impl Into<String>) -> Error {
    Error::Data {
        origin: origin.to_string(),
        line,
        reason: reason.into(),
    }
}

impl Manifest {
    /// Reads a manifest by extension: `.jsonl`/`.json`/`.ndjson` or `.csv`.
    pub fn open(path: &Path) -> Result<Self> {
        match path
            .extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase())
        {
            Some(e) if e == "jsonl" || e == "ndjson" || e == "json" => Self::from_jsonl(path),
            Some(e) if e == "csv" => Self::from_csv(path),
            _ => Err(data_err(
                &path.display().to_string(),
                None,
                "unknown manifest extension (expected .jsonl or .csv)",
            )),
        }
    }

    /// Samples given directly.
    pub fn from_samples(origin: impl Into<String>, samples: Vec<Sample>) -> Self {
        Self {
            origin: origin.into(),
            samples,
        }
    }

    fn read(path: &Path) -> Result<(String, PathBuf, String)> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io(format!("reading manifest {origin}"), e))?;
        let base = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        Ok((origin, base, text))
    }

    /// Reads a JSONL manifest.
    pub fn from_jsonl(path: &Path) -> Result<Self> {
        let (origin, base, text) = Self::read(path)?;
        Self::parse_jsonl(&text, &origin, &base)
    }

    /// Parses JSONL text; relative image paths are joined to `base`.
    pub fn parse_jsonl(text: &str, origin: &str, base: &Path) -> Result<Self> {
        let mut samples = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let lineno = i + 1;
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(line)
                .map_err(|e| data_err(origin, Some(lineno), format!("invalid JSON: {e}")))?;
            let obj = v
                .as_object()
                .ok_or_else(|| data_err(origin, Some(lineno), "expected a JSON object"))?;
            let err = |r: &str| data_err(origin, Some(lineno), r);
            let image = obj
                .get("image")
                .and_then(|x| x.as_str())
                .filter(|s| !s.is_empty())
                .ok_or_else(|| err("missing string field `image`"))?;
            let captions = match (obj.get("caption"), obj.get("captions")) {
                (Some(c), None) => vec![c
                    .as_str()
                    .ok_or_else(|| err("`caption` is not a string"))?
                    .to_string()],
                (None, Some(cs)) => cs
                    .as_array()
                    .ok_or_else(|| err("`captions` is not a list"))?
                    .iter()
                    .map(|c| c.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| err("`captions` holds a non-string"))?,
                (Some(_), Some(_)) => return Err(err("both `caption` and `captions` given")),
                (None, None) => return Err(err("missing `caption` or `captions`")),
            };
            if captions.is_empty() {
                return Err(err("`captions` is empty"));
            }
            let boxes = match obj.get("boxes") {
                None | Some(serde_json::Value::Null) => None,
                Some(b) => Some(parse_boxes(b).map_err(|r| err(&r))?),
            };
            let id = match obj.get("id") {
                None | Some(serde_json::Value::Null) => None,
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                Some(serde_json::Value::Number(n)) => Some(n.to_string()),
                Some(_) => return Err(err("`id` must be a string or a number")),
            };
            samples.push(Sample {
                image: resolve(base, image),
                captions,
                boxes,
                id,
            });
        }
        if samples.is_empty() {
            return Err(data_err(origin, None, "the manifest has no samples"));
        }
        Ok(Self {
            origin: origin.to_string(),
            samples,
        })
    }

    /// Reads a CSV manifest (header required).
    pub fn from_csv(path: &Path) -> Result<Self> {
        let (origin, base, text) = Self::read(path)?;
        Self::parse_csv(&text, &origin, &base)
    }

    /// Parses CSV text; relative image paths are joined to `base`.
    pub fn parse_csv(text: &str, origin: &str, base: &Path) -> Result<Self> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let records =
            parse_csv_records(text).map_err(|(line, r)| data_err(origin, Some(line), r))?;
        let mut it = records.into_iter();
        let (_, header) = it
            .next()
            .ok_or_else(|| data_err(origin, None, "empty CSV (a header row is required)"))?;
        let header: Vec<String> = header
            .iter()
            .map(|h| h.trim().to_ascii_lowercase())
            .collect();
        let col = |names: &[&str]| header.iter().position(|h| names.contains(&h.as_str()));
        let image_col =
            col(&["image", "image_path", "path", "file", "filepath"]).ok_or_else(|| {
                data_err(
                    origin,
                    Some(1),
                    format!("no image column in header {header:?} (expected `image`)"),
                )
            })?;
        let caption_col = col(&["caption", "text", "title"]).ok_or_else(|| {
            data_err(
                origin,
                Some(1),
                format!("no caption column in header {header:?} (expected `caption`)"),
            )
        })?;
        let id_col = col(&["id"]);
        let mut samples = Vec::new();
        for (line, rec) in it {
            if rec.len() == 1 && rec[0].is_empty() {
                continue;
            }
            if rec.len() != header.len() {
                return Err(data_err(
                    origin,
                    Some(line),
                    format!("{} fields, the header has {}", rec.len(), header.len()),
                ));
            }
            let image = rec[image_col].trim();
            if image.is_empty() {
                return Err(data_err(origin, Some(line), "empty image path"));
            }
            samples.push(Sample {
                image: resolve(base, image),
                captions: vec![rec[caption_col].clone()],
                boxes: None,
                id: id_col.map(|c| rec[c].clone()).filter(|s| !s.is_empty()),
            });
        }
        if samples.is_empty() {
            return Err(data_err(origin, None, "the manifest has no samples"));
        }
        Ok(Self {
            origin: origin.to_string(),
            samples,
        })
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }
}

fn resolve(base: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

pub(crate) fn parse_boxes(v: &serde_json::Value) -> std::result::Result<Vec<[f32; 4]>, String> {
    let rows = v.as_array().ok_or("`boxes` is not a list")?;
    rows.iter()
        .enumerate()
        .map(|(i, r)| {
            let nums: Option<Vec<f32>> = r
                .as_array()
                .map(|a| a.iter().map(|x| x.as_f64().map(|f| f as f32)).collect())
                .unwrap_or(None);
            match nums.as_deref() {
                Some([a, b, c, d]) => Ok([*a, *b, *c, *d]),
                _ => Err(format!("box {i} is not four numbers: {r}")),
            }
        })
        .collect()
}

/// RFC 4180 records with the 1-based line each starts on.
#[allow(clippy::type_complexity)]
fn parse_csv_records(
    text: &str,
) -> std::result::Result<Vec<(usize, Vec<String>)>, (usize, String)> {
    let mut out = Vec::new();
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut in_quotes = false;
    let mut quoted_field = false;
    let mut line = 1usize;
    let mut rec_line = 1usize;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if in_quotes {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => in_quotes = false,
                '\n' => {
                    line += 1;
                    field.push(c)
                }
                _ => field.push(c),
            }
            continue;
        }
        match c {
            '"' if field.is_empty() && !quoted_field => {
                in_quotes = true;
                quoted_field = true;
            }
            '"' => return Err((line, "stray quote inside an unquoted field".into())),
            ',' => {
                fields.push(std::mem::take(&mut field));
                quoted_field = false;
            }
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' => {
                fields.push(std::mem::take(&mut field));
                out.push((rec_line, std::mem::take(&mut fields)));
                quoted_field = false;
                line += 1;
                rec_line = line;
            }
            _ if quoted_field => {
                return Err((line, "characters after a closing quote".into()));
            }
            _ => field.push(c),
        }
    }
    if in_quotes {
        return Err((rec_line, "unterminated quoted field".into()));
    }
    if !field.is_empty() || !fields.is_empty() || quoted_field {
        fields.push(field);
        out.push((rec_line, fields));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_records() {
        let t =
            "image,caption\na.jpg,\"hello, \"\"world\"\"\"\r\nb.jpg,\"two\nlines\"\n\nc.jpg,plain";
        let r = parse_csv_records(t).unwrap();
        assert_eq!(r[0], (1, vec!["image".into(), "caption".into()]));
        assert_eq!(r[1], (2, vec!["a.jpg".into(), "hello, \"world\"".into()]));
        assert_eq!(r[2], (3, vec!["b.jpg".into(), "two\nlines".into()]));
        assert_eq!(r[3], (5, vec!["".to_string()]));
        assert_eq!(r[4], (6, vec!["c.jpg".into(), "plain".into()]));
        assert_eq!(parse_csv_records("a,\"b").unwrap_err().0, 1);
        assert!(parse_csv_records("a,b\"c\n").is_err());
        assert!(parse_csv_records("a,\"b\"c\n").is_err());
    }

    #[test]
    fn jsonl_errors_name_the_line() {
        let base = Path::new("/data");
        let ok = Manifest::parse_jsonl(
            "{\"image\":\"a.jpg\",\"caption\":\"x\",\"id\":3}\n\n{\"image\":\"/abs/b.jpg\",\"captions\":[\"y\",\"z\"],\"boxes\":[[1,2,3,4]]}\n",
            "m.jsonl",
            base,
        )
        .unwrap();
        assert_eq!(ok.samples[0].image, PathBuf::from("/data/a.jpg"));
        assert_eq!(ok.samples[0].id.as_deref(), Some("3"));
        assert_eq!(ok.samples[1].image, PathBuf::from("/abs/b.jpg"));
        assert_eq!(ok.samples[1].boxes, Some(vec![[1.0, 2.0, 3.0, 4.0]]));
        for (bad, want) in [
            (
                "{\"image\":\"a\",\"caption\":\"x\"}\n{\"caption\":\"x\"}",
                "line 2",
            ),
            ("{\"image\":\"a\"}", "line 1"),
            ("not json", "line 1"),
            ("{\"image\":\"a\",\"captions\":[]}", "empty"),
            (
                "{\"image\":\"a\",\"caption\":\"x\",\"boxes\":[[1,2,3]]}",
                "box 0",
            ),
        ] {
            let e = Manifest::parse_jsonl(bad, "m.jsonl", base)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{e}");
        }
    }
}
