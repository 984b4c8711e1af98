//! The evaluation sets, in the formats the Chinese benchmarks ship in.
//!
//! # Retrieval ([`RetrievalDataset`])
//!
//! * **Chinese-CLIP's format**, in which Flickr30K-CN, COCO-CN and MUGE are distributed:
//!   `{split}_imgs.tsv` holds one image a line, `image_id<TAB>base64 image`, and
//!   `{split}_texts.jsonl` one text a line,
//!   `{"text_id": 8428, "text": "…", "image_ids": [1076, 4007]}`. Ids may be numbers or
//!   strings. Images stay in the TSV: the reader records where each line starts and decodes
//!   it only when it is encoded, so a 30k-image split costs a few hundred kilobytes until
//!   then. See [`RetrievalDataset::from_cnclip`] and [`RetrievalDataset::open`].
//! * **The crate's JSON Lines manifest**: `{"image": "a.jpg", "captions": ["…", "…"]}` (or
//!   the training manifest's `{"image": …, "caption": "…"}`), optionally with
//!   `"boxes": [[x1, y1, x2, y2], …]` for BriVL. Lines naming the same image are merged;
//!   relative paths resolve against the manifest's folder.
//!
//! Every text names one or more images (MUGE's queries have several), and an image may
//! have no text (a distractor in the gallery).
//!
//! # Zero-shot classification ([`ClassificationDataset`])
//!
//! * **The ELEVATER layout** that Chinese-CLIP prepares: a folder with one sub-folder per
//!   class, named by the class index (`test/000/…`, `test/001/…`), and a class-name file
//!   with one name a line (`label_cn.txt`). Sub-folders whose names are not numbers are
//!   classes named by the folder, in sorted order, when no name file is given.
//! * **A CSV** of `path,label` lines (an optional `path,label` header), where a label is a
//!   class name or a 0-based index into the name file.
//!
//! # Matching ([`MatchingDataset`])
//!
//! R2D2's ICM / IQM tasks: JSON Lines of `{"image": …, "text": …, "label": 0 | 1}`.
//!
//! Every reader fails with [`Error::Data`] naming the file and line (or the id) of the
//! first problem: bad base64, an unknown or duplicate id, an empty split or text, a class
//! folder with no images, more classes than names.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine;
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::preprocess::ImageInput;

/// The image file extensions the folder readers pick up.
pub const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"];

/// The largest base64 field of a TSV line that is decoded (a 96 MB image), so that a
/// corrupt file without newlines cannot exhaust memory.
pub const MAX_TSV_IMAGE_BYTES: u64 = 128 << 20;

/// Where an image of an evaluation set comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum ImageRef {
    /// An image file.
    Path(PathBuf),
    /// The base64 field of one line of a Chinese-CLIP `*_imgs.tsv`.
    Tsv {
        file: Arc<PathBuf>,
        /// 1-based line number, for messages.
        line: usize,
        /// Byte offset of the base64 field and its length.
        offset: u64,
        len: u64,
    },
}

impl ImageRef {
    /// A short description for messages: the path, or `file line N`.
    pub fn origin(&self) -> String {
        match self {
            ImageRef::Path(p) => p.display().to_string(),
            ImageRef::Tsv { file, line, .. } => format!("{} line {line}", file.display()),
        }
    }

    /// Reads the image's bytes (decoding base64 for a TSV line).
    pub fn read_bytes(&self) -> Result<Vec<u8>> {
        match self {
            ImageRef::Path(p) => std::fs::read(p).map_err(|e| Error::Image {
                origin: p.display().to_string(),
                reason: format!("cannot read file: {e}"),
            }),
            ImageRef::Tsv {
                file,
                line,
                offset,
                len,
            } => {
                let data_err = |reason: String| Error::Data {
                    origin: file.display().to_string(),
                    line: Some(*line),
                    reason,
                };
                let mut f = File::open(file.as_path())
                    .map_err(|e| Error::io(format!("opening {}", file.display()), e))?;
                f.seek(SeekFrom::Start(*offset))
                    .map_err(|e| Error::io(format!("reading {}", file.display()), e))?;
                let mut field = Vec::with_capacity(*len as usize);
                f.take(*len)
                    .read_to_end(&mut field)
                    .map_err(|e| Error::io(format!("reading {}", file.display()), e))?;
                if field.len() as u64 != *len {
                    return Err(data_err("the file changed since it was indexed".into()));
                }
                base64::engine::general_purpose::STANDARD
                    .decode(field.trim_ascii())
                    .map_err(|e| data_err(format!("bad base64 image: {e}")))
            }
        }
    }

    /// Reads and decodes the image (with the decoder's size limits) into an input.
    pub fn load(&self) -> Result<ImageInput> {
        let origin = self.origin();
        let input = match self {
            ImageRef::Path(p) => ImageInput::path(p),
            ImageRef::Tsv { .. } => ImageInput::bytes(self.read_bytes()?),
        };
        let rgb = input.decode_rgb().map_err(|e| match e {
            Error::Image { reason, .. } => Error::Image { origin, reason },
            other => other,
        })?;
        Ok(ImageInput::image(image::DynamicImage::ImageRgb8(rgb)))
    }
}

/// An image–text retrieval set.
#[derive(Debug, Clone, PartialEq)]
pub struct RetrievalDataset {
    /// Where it came from (for reports).
    pub origin: String,
    /// Image ids (the TSV's ids, or the paths of a manifest).
    pub image_ids: Vec<String>,
    pub images: Vec<ImageRef>,
    /// BriVL region boxes per image, where the manifest gives them.
    pub boxes: Vec<Option<Vec<[f32; 4]>>>,
    /// Text ids (the JSONL's ids, or the 0-based caption numbers of a manifest).
    pub text_ids: Vec<String>,
    pub texts: Vec<String>,
    /// For each text, the indices of its images (one or more).
    pub txt2img: Vec<Vec<usize>>,
    /// For each image, the indices of its texts (possibly none).
    pub img2txt: Vec<Vec<usize>>,
}

#[derive(Deserialize)]
struct ManifestLine {
    image: PathBuf,
    #[serde(default)]
    captions: Option<Vec<String>>,
    #[serde(default, alias = "caption")]
    text: Option<String>,
    #[serde(default)]
    boxes: Option<Vec<Vec<serde_json::Value>>>,
}

/// A JSON id (number or string) as a string.
#[derive(Deserialize)]
#[serde(untagged)]
enum Id {
    Int(i64),
    Str(String),
}

impl Id {
    fn into_string(self) -> String {
        match self {
            Id::Int(i) => i.to_string(),
            Id::Str(s) => s,
        }
    }
}

#[derive(Deserialize)]
struct CnClipText {
    text_id: Id,
    text: String,
    image_ids: Vec<Id>,
}

fn data_err(origin: &Path, line: Option<usize>, reason: impl Into<String>) -> Error {
    Error::Data {
        origin: origin.display().to_string(),
        line,
        reason: reason.into(),
    }
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::io(format!("reading {}", path.display()), e))
}

fn check_text(path: &Path, line: usize, text: &str) -> Result<()> {
    if text.trim().is_empty() {
        return Err(data_err(path, Some(line), "empty text"));
    }
    Ok(())
}

/// Parses `[[x1, y1, x2, y2], …]`, rejecting non-numbers, non-finite and zero-area boxes.
fn parse_boxes(path: &Path, line: usize, raw: &[Vec<serde_json::Value>]) -> Result<Vec<[f32; 4]>> {
    raw.iter()
        .enumerate()
        .map(|(i, b)| {
            let nums: Option<Vec<f32>> = b.iter().map(|v| v.as_f64().map(|x| x as f32)).collect();
            match nums {
                Some(n) if n.len() == 4 && n.iter().all(|x| x.is_finite()) => {
                    if n[2] <= n[0] || n[3] <= n[1] {
                        Err(data_err(
                            path,
                            Some(line),
                            format!("box {i} {n:?} has zero or negative area"),
                        ))
                    } else {
                        Ok([n[0], n[1], n[2], n[3]])
                    }
                }
                _ => Err(data_err(
                    path,
                    Some(line),
                    format!("box {i} is not four finite numbers: {b:?}"),
                )),
            }
        })
        .collect()
}

impl RetrievalDataset {
    fn empty(origin: String) -> Self {
        Self {
            origin,
            image_ids: Vec::new(),
            images: Vec::new(),
            boxes: Vec::new(),
            text_ids: Vec::new(),
            texts: Vec::new(),
            txt2img: Vec::new(),
            img2txt: Vec::new(),
        }
    }

    /// Number of images.
    pub fn num_images(&self) -> usize {
        self.images.len()
    }

    /// Number of texts.
    pub fn num_texts(&self) -> usize {
        self.texts.len()
    }

    /// Builds from `(image path, captions)` pairs; entries naming the same image are merged.
    pub fn from_entries(entries: impl IntoIterator<Item = (PathBuf, Vec<String>)>) -> Result<Self> {
        let mut d = Self::empty("entries".into());
        let mut index: HashMap<PathBuf, usize> = HashMap::new();
        for (image, captions) in entries {
            if captions.is_empty() {
                return Err(Error::InvalidArgument(format!(
                    "image {} has no captions",
                    image.display()
                )));
            }
            let i = d.intern_image(&mut index, image, None);
            for c in captions {
                d.push_text(d.texts.len().to_string(), c, vec![i]);
            }
        }
        d.check_nonempty()?;
        Ok(d)
    }

    fn intern_image(
        &mut self,
        index: &mut HashMap<PathBuf, usize>,
        image: PathBuf,
        boxes: Option<Vec<[f32; 4]>>,
    ) -> usize {
        if let Some(&i) = index.get(&image) {
            if self.boxes[i].is_none() {
                self.boxes[i] = boxes;
            }
            return i;
        }
        self.image_ids.push(image.display().to_string());
        self.images.push(ImageRef::Path(image.clone()));
        self.boxes.push(boxes);
        self.img2txt.push(Vec::new());
        index.insert(image, self.images.len() - 1);
        self.images.len() - 1
    }

    fn push_text(&mut self, id: String, text: String, images: Vec<usize>) {
        let t = self.texts.len();
        for &i in &images {
            self.img2txt[i].push(t);
        }
        self.text_ids.push(id);
        self.texts.push(text);
        self.txt2img.push(images);
    }

    fn check_nonempty(&self) -> Result<()> {
        if self.images.is_empty() {
            return Err(Error::Data {
                origin: self.origin.clone(),
                line: None,
                reason: "the split has no images".into(),
            });
        }
        if self.texts.is_empty() {
            return Err(Error::Data {
                origin: self.origin.clone(),
                line: None,
                reason: "the split has no texts".into(),
            });
        }
        Ok(())
    }

    /// Reads the crate's JSON Lines manifest (see the module docs).
    pub fn from_jsonl(path: &Path) -> Result<Self> {
        let s = read_text(path)?;
        let root = path.parent().unwrap_or(Path::new("")).to_path_buf();
        let mut d = Self::empty(path.display().to_string());
        let mut index = HashMap::new();
        for (n, line) in s.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let m: ManifestLine = serde_json::from_str(line)
                .map_err(|e| data_err(path, Some(n + 1), e.to_string()))?;
            let captions = match (m.captions, m.text) {
                (Some(c), None) => c,
                (None, Some(t)) => vec![t],
                (Some(_), Some(_)) => {
                    return Err(data_err(
                        path,
                        Some(n + 1),
                        "give `captions` or `text`, not both",
                    ))
                }
                (None, None) => {
                    return Err(data_err(path, Some(n + 1), "no `captions` and no `text`"))
                }
            };
            if captions.is_empty() {
                return Err(data_err(path, Some(n + 1), "`captions` is empty"));
            }
            for c in &captions {
                check_text(path, n + 1, c)?;
            }
            let boxes = match &m.boxes {
                Some(b) => Some(parse_boxes(path, n + 1, b)?),
                None => None,
            };
            let image = if m.image.is_absolute() {
                m.image
            } else {
                root.join(m.image)
            };
            let i = d.intern_image(&mut index, image, boxes);
            for c in captions {
                d.push_text(d.texts.len().to_string(), c, vec![i]);
            }
        }
        d.check_nonempty()?;
        Ok(d)
    }

    /// Reads Chinese-CLIP's `{split}_imgs.tsv` and `{split}_texts.jsonl`.
    pub fn from_cnclip(images_tsv: &Path, texts_jsonl: &Path) -> Result<Self> {
        let mut d = Self::empty(format!(
            "{} + {}",
            images_tsv.display(),
            texts_jsonl.display()
        ));
        let mut index: HashMap<String, usize> = HashMap::new();
        let file = Arc::new(images_tsv.to_path_buf());
        for (id, r) in index_tsv(images_tsv, &file)? {
            let line = match &r {
                ImageRef::Tsv { line, .. } => *line,
                ImageRef::Path(_) => 0,
            };
            if let Some(&first) = index.get(&id) {
                let first_line = match &d.images[first] {
                    ImageRef::Tsv { line, .. } => *line,
                    ImageRef::Path(_) => 0,
                };
                return Err(data_err(
                    images_tsv,
                    Some(line),
                    format!("duplicate image id `{id}` (first on line {first_line})"),
                ));
            }
            index.insert(id.clone(), d.images.len());
            d.image_ids.push(id);
            d.images.push(r);
            d.boxes.push(None);
            d.img2txt.push(Vec::new());
        }
        if d.images.is_empty() {
            return Err(data_err(images_tsv, None, "the split has no images"));
        }
        let s = read_text(texts_jsonl)?;
        let mut text_index: HashMap<String, usize> = HashMap::new();
        for (n, line) in s.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let t: CnClipText = serde_json::from_str(line)
                .map_err(|e| data_err(texts_jsonl, Some(n + 1), e.to_string()))?;
            let id = t.text_id.into_string();
            if let Some(&first) = text_index.get(&id) {
                return Err(data_err(
                    texts_jsonl,
                    Some(n + 1),
                    format!(
                        "duplicate text id `{id}` (first as text {})",
                        d.text_ids[first]
                    ),
                ));
            }
            check_text(texts_jsonl, n + 1, &t.text)?;
            if t.image_ids.is_empty() {
                return Err(data_err(
                    texts_jsonl,
                    Some(n + 1),
                    format!("text `{id}` has no image_ids"),
                ));
            }
            let mut imgs = Vec::with_capacity(t.image_ids.len());
            for iid in t.image_ids {
                let iid = iid.into_string();
                let &i = index.get(&iid).ok_or_else(|| {
                    data_err(
                        texts_jsonl,
                        Some(n + 1),
                        format!(
                            "text `{id}` names image `{iid}`, which {} does not hold",
                            images_tsv.display()
                        ),
                    )
                })?;
                if !imgs.contains(&i) {
                    imgs.push(i);
                }
            }
            text_index.insert(id.clone(), d.texts.len());
            d.push_text(id, t.text, imgs);
        }
        d.check_nonempty()?;
        Ok(d)
    }

    /// Opens a retrieval set from a path:
    /// * a folder holding Chinese-CLIP's `{split}_imgs.tsv` and `{split}_texts.jsonl`
    ///   (`split` may be left out when the folder holds only one split);
    /// * a `*_imgs.tsv` file, with its `*_texts.jsonl` beside it;
    /// * otherwise a JSON Lines manifest.
    pub fn open(path: &Path, split: Option<&str>) -> Result<Self> {
        if !path.exists() {
            return Err(Error::InvalidArgument(format!(
                "{} does not exist",
                path.display()
            )));
        }
        if path.is_dir() {
            let split = match split {
                Some(s) => s.to_string(),
                None => {
                    let splits = cnclip_splits(path)?;
                    match splits.as_slice() {
                        [one] => one.clone(),
                        [] => {
                            return Err(data_err(
                                path,
                                None,
                                "no `{split}_imgs.tsv` in the folder (Chinese-CLIP's format)",
                            ))
                        }
                        many => {
                            return Err(Error::InvalidArgument(format!(
                                "{} holds the splits {}: name one",
                                path.display(),
                                many.join(", ")
                            )))
                        }
                    }
                }
            };
            let imgs = path.join(format!("{split}_imgs.tsv"));
            let texts = path.join(format!("{split}_texts.jsonl"));
            for f in [&imgs, &texts] {
                if !f.is_file() {
                    return Err(data_err(
                        path,
                        None,
                        format!("split `{split}` has no {}", f.display()),
                    ));
                }
            }
            return Self::from_cnclip(&imgs, &texts);
        }
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if let Some(prefix) = name.strip_suffix("_imgs.tsv") {
            let texts = path.with_file_name(format!("{prefix}_texts.jsonl"));
            return Self::from_cnclip(path, &texts);
        }
        Self::from_jsonl(path)
    }

    /// A gallery of every image in a folder (sorted by name), with no texts: for
    /// [`crate::eval::retrieve`]-style search.
    pub fn image_folder(dir: &Path) -> Result<Vec<ImageRef>> {
        Ok(list_images(dir)?.into_iter().map(ImageRef::Path).collect())
    }
}

/// The splits a Chinese-CLIP folder holds (the `{split}` of each `{split}_imgs.tsv`).
pub fn cnclip_splits(dir: &Path) -> Result<Vec<String>> {
    let mut out: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(format!("listing {}", dir.display()), e))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_suffix("_imgs.tsv"))
                .map(String::from)
        })
        .collect();
    out.sort();
    Ok(out)
}

/// Indexes a `*_imgs.tsv`: the id and where the base64 field lies, for every line.
fn index_tsv(path: &Path, file: &Arc<PathBuf>) -> Result<Vec<(String, ImageRef)>> {
    let f = File::open(path).map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    let mut r = BufReader::with_capacity(1 << 20, f);
    let mut out = Vec::new();
    let mut offset = 0u64;
    let mut line_no = 0usize;
    let mut id = Vec::new();
    loop {
        line_no += 1;
        id.clear();
        // The id, up to the tab (bounded: ids are short).
        let n = r
            .by_ref()
            .take(4096)
            .read_until(b'\t', &mut id)
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        if n == 0 {
            break;
        }
        // Blank lines before the id.
        while let Some(p) = id.iter().position(|&c| c == b'\n') {
            if !id[..p].trim_ascii().is_empty() {
                return Err(data_err(
                    path,
                    Some(line_no),
                    "expected `image_id<TAB>base64 image`",
                ));
            }
            id.drain(..=p);
            line_no += 1;
        }
        if id.last() != Some(&b'\t') {
            if id.trim_ascii().is_empty() {
                break;
            }
            return Err(data_err(
                path,
                Some(line_no),
                "expected `image_id<TAB>base64 image`",
            ));
        }
        let id_str = std::str::from_utf8(&id[..id.len() - 1])
            .map_err(|_| data_err(path, Some(line_no), "the image id is not UTF-8"))?
            .trim()
            .to_string();
        if id_str.is_empty() || id_str.contains('\n') {
            return Err(data_err(path, Some(line_no), "empty image id"));
        }
        let field_start = offset + n as u64;
        // Skip the base64 field up to the newline, counting its bytes.
        let mut len = 0u64;
        loop {
            let buf = r
                .fill_buf()
                .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
            if buf.is_empty() {
                break;
            }
            match buf.iter().position(|&c| c == b'\n') {
                Some(p) => {
                    len += p as u64;
                    r.consume(p + 1);
                    offset = field_start + len + 1;
                    break;
                }
                None => {
                    let l = buf.len();
                    len += l as u64;
                    r.consume(l);
                    offset = field_start + len;
                }
            }
            if len > MAX_TSV_IMAGE_BYTES {
                return Err(data_err(
                    path,
                    Some(line_no),
                    format!("the image field is over {MAX_TSV_IMAGE_BYTES} bytes"),
                ));
            }
        }
        if len == 0 {
            return Err(data_err(
                path,
                Some(line_no),
                format!("image `{id_str}` has an empty base64 field"),
            ));
        }
        out.push((
            id_str,
            ImageRef::Tsv {
                file: file.clone(),
                line: line_no,
                offset: field_start,
                len,
            },
        ));
    }
    Ok(out)
}

/// The images in a folder (not recursive), sorted by name.
pub fn list_images(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| Error::io(format!("listing {}", dir.display()), e))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        })
        .collect();
    files.sort();
    Ok(files)
}

/// A zero-shot classification set.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassificationDataset {
    pub origin: String,
    /// Class names, in label order.
    pub classes: Vec<String>,
    pub images: Vec<ImageRef>,
    /// The label of each image, an index into `classes`.
    pub labels: Vec<usize>,
}

/// Reads a class-name file: one name a line, blank lines not allowed in between.
pub fn read_class_names(path: &Path) -> Result<Vec<String>> {
    if !path.is_file() {
        return Err(data_err(path, None, "the class-name file does not exist"));
    }
    let s = read_text(path)?;
    let mut names: Vec<String> = s.lines().map(|l| l.trim().to_string()).collect();
    while names.last().is_some_and(|l| l.is_empty()) {
        names.pop();
    }
    if let Some(i) = names.iter().position(String::is_empty) {
        return Err(data_err(path, Some(i + 1), "empty class name"));
    }
    if names.is_empty() {
        return Err(data_err(path, None, "no class names"));
    }
    Ok(names)
}

impl ClassificationDataset {
    /// Reads the ELEVATER layout: `dir` holds one sub-folder per class. Numeric folder
    /// names (`000`, `001`, …) are class indices into `class_names` (required then);
    /// other names are the classes themselves, sorted, unless `class_names` is given, in
    /// which case each folder must be one of its names.
    pub fn from_folder(dir: &Path, class_names: Option<&Path>) -> Result<Self> {
        if !dir.is_dir() {
            return Err(data_err(dir, None, "not a folder"));
        }
        let mut folders: Vec<(String, PathBuf)> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(format!("listing {}", dir.display()), e))?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .map(|e| (e.file_name().to_string_lossy().to_string(), e.path()))
            .collect();
        folders.sort();
        if folders.is_empty() {
            return Err(data_err(dir, None, "no class sub-folders"));
        }
        let numeric = folders
            .iter()
            .all(|(n, _)| !n.is_empty() && n.bytes().all(|c| c.is_ascii_digit()));
        let names = match class_names {
            Some(p) => Some(read_class_names(p)?),
            None => None,
        };
        let classes: Vec<String> = match (&names, numeric) {
            (Some(n), _) => n.clone(),
            (None, false) => folders.iter().map(|(n, _)| n.clone()).collect(),
            (None, true) => {
                return Err(data_err(
                    dir,
                    None,
                    "the class folders are numbered: give the class-name file (label_cn.txt)",
                ))
            }
        };
        let mut d = Self {
            origin: dir.display().to_string(),
            classes,
            images: Vec::new(),
            labels: Vec::new(),
        };
        for (name, path) in &folders {
            let label = if numeric {
                let i: usize = name
                    .parse()
                    .map_err(|_| data_err(path, None, "bad class index"))?;
                if i >= d.classes.len() {
                    return Err(data_err(
                        path,
                        None,
                        format!(
                            "class {i} has no name: the name file lists {} classes",
                            d.classes.len()
                        ),
                    ));
                }
                i
            } else {
                d.classes.iter().position(|c| c == name).ok_or_else(|| {
                    data_err(
                        path,
                        None,
                        format!("class `{name}` is not in the name file"),
                    )
                })?
            };
            let files = list_images(path)?;
            if files.is_empty() {
                return Err(data_err(path, None, "the class folder has no images"));
            }
            for f in files {
                d.images.push(ImageRef::Path(f));
                d.labels.push(label);
            }
        }
        Ok(d)
    }

    /// Reads a CSV of `path,label` lines (see the module docs). Relative paths resolve
    /// against the CSV's folder. Without `class_names`, the labels are the class names, in
    /// order of first appearance.
    pub fn from_csv(csv: &Path, class_names: Option<&Path>) -> Result<Self> {
        let s = read_text(csv)?;
        let root = csv.parent().unwrap_or(Path::new("")).to_path_buf();
        let mut classes = match class_names {
            Some(p) => read_class_names(p)?,
            None => Vec::new(),
        };
        let fixed = class_names.is_some();
        let mut d = Self {
            origin: csv.display().to_string(),
            classes: Vec::new(),
            images: Vec::new(),
            labels: Vec::new(),
        };
        for (n, line) in s.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || (n == 0 && line.eq_ignore_ascii_case("path,label")) {
                continue;
            }
            let (path, label) = line
                .rsplit_once(',')
                .ok_or_else(|| data_err(csv, Some(n + 1), "expected `path,label`"))?;
            let (path, label) = (path.trim(), label.trim());
            if path.is_empty() || label.is_empty() {
                return Err(data_err(csv, Some(n + 1), "empty path or label"));
            }
            let idx = if let Some(i) = classes.iter().position(|c| c == label) {
                i
            } else if let (true, Ok(i)) = (fixed, label.parse::<usize>()) {
                if i >= classes.len() {
                    return Err(data_err(
                        csv,
                        Some(n + 1),
                        format!("label {i} has no name: {} classes", classes.len()),
                    ));
                }
                i
            } else if fixed {
                return Err(data_err(
                    csv,
                    Some(n + 1),
                    format!("label `{label}` is not in the name file"),
                ));
            } else {
                classes.push(label.to_string());
                classes.len() - 1
            };
            let p = PathBuf::from(path);
            let p = if p.is_absolute() { p } else { root.join(p) };
            d.images.push(ImageRef::Path(p));
            d.labels.push(idx);
        }
        if d.images.is_empty() {
            return Err(data_err(csv, None, "no images"));
        }
        d.classes = classes;
        Ok(d)
    }

    /// Opens a CSV file, or a folder: an ELEVATER dataset root (`{root}/{split}/000/…` with
    /// `{root}/label_cn.txt`), or the split folder itself. `class_names` overrides the
    /// name file; `split` defaults to `test`.
    pub fn open(path: &Path, split: Option<&str>, class_names: Option<&Path>) -> Result<Self> {
        if !path.exists() {
            return Err(Error::InvalidArgument(format!(
                "{} does not exist",
                path.display()
            )));
        }
        if path.is_file() {
            return Self::from_csv(path, class_names);
        }
        let split_dir = path.join(split.unwrap_or("test"));
        let (dir, root) = if split_dir.is_dir() {
            (split_dir, path.to_path_buf())
        } else if split.is_some() {
            return Err(data_err(
                path,
                None,
                format!("no split folder {}", split_dir.display()),
            ));
        } else {
            (
                path.to_path_buf(),
                path.parent().unwrap_or(Path::new("")).to_path_buf(),
            )
        };
        let names = match class_names {
            Some(p) => Some(p.to_path_buf()),
            None => ["label_cn.txt", "label.txt"]
                .iter()
                .map(|n| root.join(n))
                .chain(["label_cn.txt", "label.txt"].iter().map(|n| dir.join(n)))
                .find(|p| p.is_file()),
        };
        Self::from_folder(&dir, names.as_deref())
    }
}

/// Labelled image–text pairs (R2D2's ICM / IQM matching tasks).
#[derive(Debug, Clone, PartialEq)]
pub struct MatchingDataset {
    pub origin: String,
    pub images: Vec<ImageRef>,
    pub texts: Vec<String>,
    /// Whether each pair matches.
    pub labels: Vec<bool>,
}

#[derive(Deserialize)]
struct MatchingLine {
    image: PathBuf,
    text: String,
    label: serde_json::Value,
}

impl MatchingDataset {
    /// Reads JSON Lines of `{"image": …, "text": …, "label": 0 | 1}`.
    pub fn from_jsonl(path: &Path) -> Result<Self> {
        let s = read_text(path)?;
        let root = path.parent().unwrap_or(Path::new("")).to_path_buf();
        let mut d = Self {
            origin: path.display().to_string(),
            images: Vec::new(),
            texts: Vec::new(),
            labels: Vec::new(),
        };
        for (n, line) in s.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let m: MatchingLine = serde_json::from_str(line)
                .map_err(|e| data_err(path, Some(n + 1), e.to_string()))?;
            check_text(path, n + 1, &m.text)?;
            let label = match &m.label {
                serde_json::Value::Bool(b) => *b,
                v if v.as_u64() == Some(0) => false,
                v if v.as_u64() == Some(1) => true,
                v => {
                    return Err(data_err(
                        path,
                        Some(n + 1),
                        format!("label must be 0 or 1, found {v}"),
                    ))
                }
            };
            let p = if m.image.is_absolute() {
                m.image
            } else {
                root.join(m.image)
            };
            d.images.push(ImageRef::Path(p));
            d.texts.push(m.text);
            d.labels.push(label);
        }
        if d.images.is_empty() {
            return Err(data_err(path, None, "no pairs"));
        }
        Ok(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tsv_index_finds_fields() {
        let dir = tempfile::tempdir().unwrap();
        let tsv = dir.path().join("valid_imgs.tsv");
        let b = base64::engine::general_purpose::STANDARD;
        std::fs::write(
            &tsv,
            format!("7\t{}\n\n12\t{}\r\n", b.encode(b"abc"), b.encode(b"hello")),
        )
        .unwrap();
        let file = Arc::new(tsv.clone());
        let idx = index_tsv(&tsv, &file).unwrap();
        assert_eq!(idx.len(), 2);
        assert_eq!(idx[0].0, "7");
        assert_eq!(idx[1].0, "12");
        assert_eq!(idx[0].1.read_bytes().unwrap(), b"abc");
        assert_eq!(idx[1].1.read_bytes().unwrap(), b"hello");
        match &idx[1].1 {
            ImageRef::Tsv { line, .. } => assert_eq!(*line, 3),
            _ => panic!(),
        }
        std::fs::write(&tsv, "1\tnot base64!!\n").unwrap();
        let idx = index_tsv(&tsv, &file).unwrap();
        let e = idx[0].1.read_bytes().unwrap_err().to_string();
        assert!(e.contains("line 1") && e.contains("base64"), "{e}");
        std::fs::write(&tsv, "no tab here\n").unwrap();
        assert!(index_tsv(&tsv, &file).is_err());
    }
}
