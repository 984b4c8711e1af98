//! Streaming WebDataset tar shards: a writer in the img2dataset layout and a
//! deterministic, resumable, rank-aware loader producing the same [`Batch`] as the
//! manifest [`DataLoader`](super::DataLoader).
//!
//! **Layout.** A shard is a plain tar file. Each sample is a run of consecutive members
//! sharing a *key*, the member name up to the first dot of its file name (directories
//! included), as webdataset groups them: `000000012.jpg` (or `.jpeg`, `.png`, `.webp`,
//! `.bmp`, `.gif`, `.tif(f)`), `000000012.txt` (the caption, UTF-8) and an optional
//! `000000012.json`. The JSON may hold `id` (string or number; pairs sharing an id are
//! positives), `boxes` (`[[x1, y1, x2, y2], …]` in the stored image's pixels) and
//! `captions` (a list; when present and non-empty it replaces the `.txt`, and one caption
//! is chosen per `(seed, epoch, sample)`); other fields (img2dataset's `url`, `width`,
//! `height`, `status`, …) are ignored. Suffixes are compared in lower case; other members
//! are ignored. [`ShardWriter`] writes this layout, rolling over to a new
//! `{prefix}-{:05}.tar` every N samples; each shard is written to a temporary
//! `.tar.partial` file, synced and renamed, so a killed writer never leaves a partial
//! shard under a final name.
//!
//! **Shard lists.** [`ShardSpec`]: explicit paths, a directory (its `*.tar` files in name
//! order), or a brace pattern as webdataset URLs write them,
//! `data/shard-{00000..00099}.tar` (ranges keep the zero padding; `{a,b}` alternatives and
//! several braces are allowed). Every shard must exist when the loader is built.
//!
//! **Ranks and threads.** Each epoch orders the whole shard list by a permutation of
//! `(seed, epoch)` (identity when [`DataConfig::shuffle`] is off); rank `r` of `w` takes
//! every `w`-th shard of that order starting at `r`, so ranks see disjoint shards whose
//! union is the list (there must be at least `w` shards). Within a rank, `threads` reader
//! threads split the rank's shards round-robin (thread `t` reads shards `t, t + threads,
//! …`), each reading ahead into a bounded queue; the consumer drains the shards in order,
//! so the sample stream, and every batch, does not depend on the number of threads.
//! Images are decoded, augmented and normalised in parallel with rayon through the same
//! [`ImagePipeline`](super::ImagePipeline) as the manifest loader (pixels are
//! identical for the same image bytes). Ranks may see slightly different numbers of samples per epoch; each moves on to
//! its next epoch by itself, so a run of a fixed number of steps never waits for a rank.
//!
//! **Shuffling.** Besides the shard order, an optional in-shard shuffle buffer
//! ([`WebDatasetConfig::shuffle_buffer`]) permutes each shard's samples as webdataset's
//! `shuffle(n)` does, seeded by `(seed, epoch, shard)`; it never mixes shards, which is
//! what makes an exact mid-shard resume cheap. A batch therefore draws mostly from one or
//! two shards: write shards from a shuffled sample list (img2dataset keeps its input
//! order) so that every shard is a random sample of the corpus. With `shuffle` off,
//! samples come in stored order.
//!
//! **Bad data.** A sample whose image is corrupt or missing, whose caption is missing or
//! not UTF-8, or whose JSON cannot be decoded is skipped, counted, and reported in
//! [`Batch::skipped`] with the reason (its `image` is `shard.tar/key`); a truncated tar
//! ends its shard with one skipped entry saying so, and a shard that cannot be opened
//! counts as one skipped entry. Nothing panics: a panicking decoder or reader thread is
//! turned into a skip or an error.
//!
//! **Resume.** The position after every batch ([`Batch::position_after`]) holds the epoch,
//! the number of stream entries consumed in the epoch (`cursor`) and a [`ShardCursor`]:
//! the index of the current shard in this rank's epoch order and how many of its entries
//! (usable or skipped, counted after the in-shard shuffle) were consumed. Restoring it
//! re-reads that one shard from its start, replays its seeded shuffle, and drops the
//! consumed entries, so the run continues with exactly the next sample, at a shard
//! boundary or mid-shard, without repeating or skipping any. A position records the rank
//! and world size it belongs to and is refused by another rank: in a multi-rank run every
//! rank must checkpoint its own position.
//!
//! [`Batch::indices`] identify a sample as `shard << 32 | ordinal` (the shard's index in
//! the list and the key's ordinal in the tar); see [`sample_index`] and
//! [`split_sample_index`].

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;

use rand::Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

pub use super::loader::{BatchSource, ShardCursor};
use super::loader::{Decoded as Loaded, SkippedSample};
use super::manifest::parse_boxes;
use super::{Batch, DataConfig, DataPosition, Sample};
pub use crate::checkpoint::pattern::expand_braces;
use crate::error::{Error, Result};
use crate::preprocess::ImageInput;
use crate::train::rng::{derive_rng, streams};

/// Random stream of the per-epoch shard order.
const SHARD_ORDER_STREAM: u64 = 60;
/// Random stream of the in-shard shuffle buffer.
const SHARD_BUFFER_STREAM: u64 = 61;
/// The default largest tar member read into memory
/// ([`WebDatasetConfig::max_member_bytes`]).
pub const MAX_MEMBER_BYTES: u64 = 256 << 20;

/// Image suffixes recognised in a shard (lower case).
pub const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"];

fn data_err(origin: impl Into<String>, reason: impl Into<String>) -> Error {
    Error::Data {
        origin: origin.into(),
        line: None,
        reason: reason.into(),
    }
}

/// The sample index reported in [`Batch::indices`]: `shard << 32 | ordinal` (64-bit
/// targets).
pub fn sample_index(shard: usize, ordinal: usize) -> usize {
    (((shard as u64) << 32) | (ordinal as u64 & 0xFFFF_FFFF)) as usize
}

/// The `(shard, ordinal)` of a [`sample_index`].
pub fn split_sample_index(index: usize) -> (usize, usize) {
    let i = index as u64;
    ((i >> 32) as usize, (i & 0xFFFF_FFFF) as usize)
}

// ---------------------------------------------------------------- shard specs

/// Which shards to read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShardSpec {
    /// These files, in this order.
    Paths(Vec<PathBuf>),
    /// Every `*.tar` file directly in the directory, in name order.
    Dir(PathBuf),
    /// A brace pattern such as `data/shard-{00000..00099}.tar`.
    Pattern(String),
}

impl ShardSpec {
    /// Reads a spec from a string: a brace pattern when it contains `{`, else a directory
    /// when it names one, else a single file.
    pub fn parse(s: &str) -> Self {
        if s.contains('{') {
            ShardSpec::Pattern(s.to_string())
        } else if Path::new(s).is_dir() {
            ShardSpec::Dir(PathBuf::from(s))
        } else {
            ShardSpec::Paths(vec![PathBuf::from(s)])
        }
    }

    /// The shard files, checked to exist; fails with [`Error::Data`] on an empty list, a
    /// missing file, a directory without `.tar` files or a malformed pattern.
    pub fn resolve(&self) -> Result<Vec<PathBuf>> {
        let (origin, paths) = match self {
            ShardSpec::Paths(p) => ("shard list".to_string(), p.clone()),
            ShardSpec::Dir(d) => {
                let origin = d.display().to_string();
                let rd = std::fs::read_dir(d)
                    .map_err(|e| data_err(&origin, format!("cannot list the directory: {e}")))?;
                let mut v = Vec::new();
                for entry in rd {
                    let entry = entry.map_err(|e| {
                        data_err(&origin, format!("cannot list the directory: {e}"))
                    })?;
                    let p = entry.path();
                    let is_tar = p
                        .extension()
                        .and_then(|e| e.to_str())
                        .is_some_and(|e| e.eq_ignore_ascii_case("tar"));
                    if is_tar && p.is_file() {
                        v.push(p);
                    }
                }
                v.sort();
                if v.is_empty() {
                    return Err(data_err(origin, "the directory holds no .tar shards"));
                }
                (origin, v)
            }
            ShardSpec::Pattern(p) => (
                p.clone(),
                expand_braces(p)
                    .map_err(|r| data_err(p, format!("bad shard pattern: {r}")))?
                    .into_iter()
                    .map(PathBuf::from)
                    .collect(),
            ),
        };
        if paths.is_empty() {
            return Err(data_err(origin, "no shards given"));
        }
        for p in &paths {
            if !p.is_file() {
                return Err(data_err(
                    origin,
                    format!("shard {} does not exist or is not a file", p.display()),
                ));
            }
        }
        Ok(paths)
    }
}

impl From<Vec<PathBuf>> for ShardSpec {
    fn from(v: Vec<PathBuf>) -> Self {
        ShardSpec::Paths(v)
    }
}

// ---------------------------------------------------------------- writer

/// One sample to write into a shard.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ShardSample {
    /// The key (member basename); `None` numbers samples `000000000`, `000000001`, … in
    /// writing order. Must not contain `.` or end with `/`.
    pub key: Option<String>,
    /// The encoded image, stored as is.
    pub image: Vec<u8>,
    /// Its suffix (`jpg`, `png`, `webp`, …; see [`IMAGE_EXTENSIONS`]).
    pub image_ext: String,
    /// At least one caption: the first is the `.txt`; with several, all are listed in the
    /// JSON's `captions`.
    pub captions: Vec<String>,
    pub id: Option<String>,
    /// Boxes in the stored image's pixels.
    pub boxes: Option<Vec<[f32; 4]>>,
}

impl ShardSample {
    /// A sample from a manifest entry, reading its image file.
    pub fn from_sample(s: &Sample) -> Result<Self> {
        let image = std::fs::read(&s.image)
            .map_err(|e| Error::io(format!("reading image {}", s.image.display()), e))?;
        let image_ext = s
            .image
            .extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase())
            .ok_or_else(|| {
                Error::InvalidArgument(format!("image {} has no file extension", s.image.display()))
            })?;
        Ok(Self {
            key: None,
            image,
            image_ext,
            captions: s.captions.clone(),
            id: s.id.clone(),
            boxes: s.boxes.clone(),
        })
    }
}

struct OpenShard {
    builder: tar::Builder<BufWriter<File>>,
    tmp: PathBuf,
    dest: PathBuf,
}

/// Writes samples into `{prefix}-{:05}.tar` shards of at most `samples_per_shard`
/// samples each (see the module docs for the layout). Call [`ShardWriter::finish`] to
/// complete the last shard; a writer dropped without it removes its partial file. A shard
/// already present under a name the writer produces is replaced (atomically).
pub struct ShardWriter {
    dir: PathBuf,
    prefix: String,
    per_shard: usize,
    next_shard: usize,
    in_shard: usize,
    total: usize,
    current: Option<OpenShard>,
    written: Vec<PathBuf>,
    keys: HashSet<String>,
}

impl std::fmt::Debug for ShardWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardWriter")
            .field("dir", &self.dir)
            .field("prefix", &self.prefix)
            .field("per_shard", &self.per_shard)
            .field("total", &self.total)
            .field("written", &self.written)
            .finish()
    }
}

impl ShardWriter {
    /// A writer into `dir` (created if needed).
    pub fn new(dir: impl Into<PathBuf>, prefix: &str, samples_per_shard: usize) -> Result<Self> {
        let dir = dir.into();
        if samples_per_shard == 0 {
            return Err(Error::InvalidArgument(
                "samples per shard must be positive".into(),
            ));
        }
        if prefix.is_empty() || prefix.contains('/') || prefix.contains('\\') {
            return Err(Error::InvalidArgument(format!(
                "shard prefix `{prefix}` must be a non-empty file name"
            )));
        }
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("creating shard directory {}", dir.display()), e))?;
        Ok(Self {
            dir,
            prefix: prefix.to_string(),
            per_shard: samples_per_shard,
            next_shard: 0,
            in_shard: 0,
            total: 0,
            current: None,
            written: Vec::new(),
            keys: HashSet::new(),
        })
    }

    /// Completed shards so far.
    pub fn shards(&self) -> &[PathBuf] {
        &self.written
    }

    /// Samples written so far.
    pub fn len(&self) -> usize {
        self.total
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    fn open(&mut self) -> Result<&mut OpenShard> {
        if self.current.is_none() {
            let name = format!("{}-{:05}.tar", self.prefix, self.next_shard);
            let dest = self.dir.join(&name);
            let tmp = self.dir.join(format!("{name}.partial"));
            let f = File::create(&tmp)
                .map_err(|e| Error::io(format!("creating shard {}", tmp.display()), e))?;
            let mut builder = tar::Builder::new(BufWriter::new(f));
            builder.mode(tar::HeaderMode::Deterministic);
            self.current = Some(OpenShard { builder, tmp, dest });
            self.next_shard += 1;
            self.in_shard = 0;
        }
        self.current
            .as_mut()
            .ok_or_else(|| Error::Training("no open shard".into()))
    }

    /// Appends one sample, returning its key.
    pub fn write(&mut self, s: &ShardSample) -> Result<String> {
        let key = s
            .key
            .clone()
            .unwrap_or_else(|| format!("{:09}", self.total));
        if key.is_empty()
            || key.ends_with('/')
            || Path::new(&key)
                .file_name()
                .and_then(|n| n.to_str())
                .is_none_or(|n| n.contains('.'))
        {
            return Err(Error::InvalidArgument(format!(
                "sample key `{key}` must be a non-empty name without `.`"
            )));
        }
        let ext = s.image_ext.trim_start_matches('.').to_ascii_lowercase();
        if !IMAGE_EXTENSIONS.contains(&ext.as_str()) {
            return Err(Error::InvalidArgument(format!(
                "image suffix `{}` of sample {key} is not one of {IMAGE_EXTENSIONS:?}",
                s.image_ext
            )));
        }
        let caption = s
            .captions
            .first()
            .ok_or_else(|| Error::InvalidArgument(format!("sample {key} has no caption")))?;
        if !self.keys.insert(key.clone()) {
            return Err(Error::InvalidArgument(format!(
                "sample key `{key}` was already written"
            )));
        }
        let mut meta = serde_json::Map::new();
        meta.insert("key".into(), key.clone().into());
        if let Some(id) = &s.id {
            meta.insert("id".into(), id.clone().into());
        }
        if s.captions.len() > 1 {
            meta.insert("captions".into(), s.captions.clone().into());
        }
        if let Some(b) = &s.boxes {
            meta.insert("boxes".into(), serde_json::json!(b));
        }
        if let Ok((w, h)) = image::ImageReader::new(std::io::Cursor::new(&s.image))
            .with_guessed_format()
            .map_err(|_| ())
            .and_then(|r| r.into_dimensions().map_err(|_| ()))
        {
            meta.insert("width".into(), w.into());
            meta.insert("height".into(), h.into());
        }
        let json = serde_json::to_vec(&serde_json::Value::Object(meta))
            .map_err(|e| Error::parse(format!("metadata of sample {key}"), e))?;
        let shard = self.open()?;
        let members: [(String, &[u8]); 3] = [
            (format!("{key}.{ext}"), s.image.as_slice()),
            (format!("{key}.txt"), caption.as_bytes()),
            (format!("{key}.json"), json.as_slice()),
        ];
        for (name, data) in members {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_mtime(0);
            header.set_entry_type(tar::EntryType::Regular);
            shard
                .builder
                .append_data(&mut header, &name, data)
                .map_err(|e| Error::io(format!("writing {name} to {}", shard.tmp.display()), e))?;
        }
        self.in_shard += 1;
        self.total += 1;
        if self.in_shard >= self.per_shard {
            self.close()?;
        }
        Ok(key)
    }

    /// Appends a manifest sample (reads its image), returning its key.
    pub fn write_sample(&mut self, s: &Sample) -> Result<String> {
        self.write(&ShardSample::from_sample(s)?)
    }

    fn close(&mut self) -> Result<()> {
        let Some(shard) = self.current.take() else {
            return Ok(());
        };
        let OpenShard { builder, tmp, dest } = shard;
        let ctx = |what: &str| format!("{what} shard {}", tmp.display());
        let buf = builder
            .into_inner()
            .map_err(|e| Error::io(ctx("finishing"), e))?;
        let file = buf
            .into_inner()
            .map_err(|e| Error::io(ctx("flushing"), e.into_error()))?;
        file.sync_all().map_err(|e| Error::io(ctx("syncing"), e))?;
        drop(file);
        std::fs::rename(&tmp, &dest).map_err(|e| {
            Error::io(
                format!("renaming {} to {}", tmp.display(), dest.display()),
                e,
            )
        })?;
        // Make the rename durable too (best effort where directories cannot be opened).
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
        self.written.push(dest);
        Ok(())
    }

    /// Completes the last shard and returns every shard written.
    pub fn finish(mut self) -> Result<Vec<PathBuf>> {
        self.close()?;
        Ok(std::mem::take(&mut self.written))
    }
}

impl Drop for ShardWriter {
    fn drop(&mut self) {
        if let Some(shard) = self.current.take() {
            let tmp = shard.tmp.clone();
            drop(shard);
            let _ = std::fs::remove_file(tmp);
        }
    }
}

/// Writes a whole manifest as shards `{prefix}-{:05}.tar` in `dir`.
pub fn write_manifest(
    manifest: &super::Manifest,
    dir: impl Into<PathBuf>,
    prefix: &str,
    samples_per_shard: usize,
) -> Result<Vec<PathBuf>> {
    let mut w = ShardWriter::new(dir, prefix, samples_per_shard)?;
    for s in &manifest.samples {
        w.write_sample(s)?;
    }
    w.finish()
}

// ---------------------------------------------------------------- reading

/// One key's members as read from a shard (or a reading problem in its place).
#[derive(Debug)]
struct RawItem {
    /// Index of the shard in the loader's list.
    shard: usize,
    /// The key's ordinal in the tar.
    ordinal: usize,
    key: String,
    image: Option<Vec<u8>>,
    txt: Option<Vec<u8>>,
    json: Option<Vec<u8>>,
    /// Why the entry is unusable, when that is known from reading alone.
    error: Option<String>,
}

impl RawItem {
    fn new(shard: usize, ordinal: usize, key: String) -> Self {
        Self {
            shard,
            ordinal,
            key,
            image: None,
            txt: None,
            json: None,
            error: None,
        }
    }
}

/// Splits a member name into key and lower-case suffix (webdataset's `base_plus_ext`).
fn split_member(name: &str) -> Option<(String, String)> {
    let slash = name.rfind('/').map(|i| i + 1).unwrap_or(0);
    let dot = name[slash..].find('.')? + slash;
    if dot == slash {
        return None;
    }
    Some((
        name[..dot].to_string(),
        name[dot + 1..].to_ascii_lowercase(),
    ))
}

/// Reads a shard in file order, grouping members by key; `emit` returns `false` to stop.
/// Returns `false` when `emit` stopped it.
fn read_shard(
    path: &Path,
    shard: usize,
    max_member: u64,
    emit: &mut dyn FnMut(RawItem) -> bool,
) -> bool {
    let at = |ordinal: usize, key: &str, reason: String| {
        let mut it = RawItem::new(shard, ordinal, key.to_string());
        it.error = Some(reason);
        it
    };
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) => return emit(at(0, "", format!("cannot open shard: {e}"))),
    };
    let mut archive = tar::Archive::new(BufReader::with_capacity(1 << 20, file));
    let entries = match archive.entries() {
        Ok(e) => e,
        Err(e) => return emit(at(0, "", format!("cannot read shard: {e}"))),
    };
    let mut current: Option<RawItem> = None;
    let mut ordinal = 0usize;
    for entry in entries {
        let mut entry = match entry {
            Ok(e) => e,
            Err(e) => {
                if let Some(c) = current.take() {
                    if !emit(c) {
                        return false;
                    }
                }
                return emit(at(ordinal, "", format!("truncated or corrupt tar: {e}")));
            }
        };
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = match entry.path() {
            Ok(p) => p.to_string_lossy().into_owned(),
            Err(_) => continue,
        };
        let Some((key, ext)) = split_member(&name) else {
            continue;
        };
        if current.as_ref().is_some_and(|c| c.key != key) {
            if let Some(c) = current.take() {
                if !emit(c) {
                    return false;
                }
            }
        }
        let item = current.get_or_insert_with(|| {
            ordinal += 1;
            RawItem::new(shard, ordinal - 1, key.clone())
        });
        let size = entry.size();
        if size > max_member {
            // Read past it without holding it; the sample is unusable.
            match std::io::copy(&mut entry, &mut std::io::sink()) {
                Ok(n) if n == size => {
                    item.error = Some(format!(
                        "member {name} is {size} bytes, over the {max_member}-byte limit"
                    ));
                    continue;
                }
                Ok(n) => {
                    item.error = Some(format!(
                        "truncated tar: member {name} has {n} of its {size} bytes"
                    ))
                }
                Err(e) => item.error = Some(format!("truncated tar: member {name}: {e}")),
            }
            let c = current.take();
            return c.is_none_or(emit);
        }
        let mut data = Vec::with_capacity(size as usize);
        let read = entry.read_to_end(&mut data);
        if let Err(e) = read {
            item.error = Some(format!("truncated tar: member {name}: {e}"));
            let c = current.take();
            return c.is_none_or(emit);
        }
        if (data.len() as u64) < size {
            item.error = Some(format!(
                "truncated tar: member {name} has {} of its {size} bytes",
                data.len()
            ));
            let c = current.take();
            return c.is_none_or(emit);
        }
        if IMAGE_EXTENSIONS.contains(&ext.as_str()) {
            if item.image.is_none() {
                item.image = Some(data);
            }
        } else if ext == "txt" {
            item.txt = Some(data);
        } else if ext == "json" {
            item.json = Some(data);
        }
    }
    current.is_none_or(emit)
}

/// Reads a shard, passing its entries through the seeded in-shard shuffle buffer.
fn stream_shard(
    path: &Path,
    shard: usize,
    buffer: Option<(usize, u64, u64)>,
    max_member: u64,
    emit: &mut dyn FnMut(RawItem) -> bool,
) -> bool {
    let Some((size, seed, epoch)) = buffer.filter(|b| b.0 > 1) else {
        return read_shard(path, shard, max_member, emit);
    };
    let mut rng = derive_rng(seed, &[SHARD_BUFFER_STREAM, epoch, shard as u64]);
    let mut buf: Vec<RawItem> = Vec::with_capacity(size);
    let mut stopped = false;
    let complete = read_shard(path, shard, max_member, &mut |item| {
        buf.push(item);
        if buf.len() >= size {
            let k = rng.random_range(0..buf.len() as u64) as usize;
            if !emit(buf.swap_remove(k)) {
                stopped = true;
                return false;
            }
        }
        true
    });
    if !complete || stopped {
        return false;
    }
    while !buf.is_empty() {
        let k = rng.random_range(0..buf.len() as u64) as usize;
        if !emit(buf.swap_remove(k)) {
            return false;
        }
    }
    true
}

// ---------------------------------------------------------------- loader

/// WebDataset-specific loader settings (the rest is the shared [`DataConfig`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebDatasetConfig {
    /// This process's rank, `0..world_size`.
    pub rank: usize,
    pub world_size: usize,
    /// Reader threads per rank (at least 1); they split the rank's shards.
    pub threads: usize,
    /// In-shard shuffle buffer size (0 or 1: off); used only when
    /// [`DataConfig::shuffle`] is on.
    pub shuffle_buffer: usize,
    /// Samples each reader thread may read ahead of the consumer.
    pub read_ahead: usize,
    /// The largest tar member read into memory; a sample with a larger member is
    /// skipped (default [`MAX_MEMBER_BYTES`], 256 MiB).
    #[serde(default = "default_max_member")]
    pub max_member_bytes: u64,
}

fn default_max_member() -> u64 {
    MAX_MEMBER_BYTES
}

impl Default for WebDatasetConfig {
    /// Rank 0 of 1, 2 reader threads, a 1000-sample shuffle buffer, 256 read ahead,
    /// 256 MiB members at most.
    fn default() -> Self {
        Self {
            rank: 0,
            world_size: 1,
            threads: 2,
            shuffle_buffer: 1000,
            read_ahead: 256,
            max_member_bytes: MAX_MEMBER_BYTES,
        }
    }
}

impl WebDatasetConfig {
    /// Rank `rank` of `world_size`, other settings default.
    pub fn rank(rank: usize, world_size: usize) -> Self {
        Self {
            rank,
            world_size,
            ..Self::default()
        }
    }
}

enum Msg {
    Item(RawItem),
    /// The shard is over after `total` entries (replayed ones included).
    End {
        total: usize,
    },
}

/// The reader threads and consumer state of one epoch.
struct EpochStream {
    /// Shards (indices into the list) of this rank, in the epoch's order.
    order: Arc<Vec<usize>>,
    /// The first shard the threads were started at.
    base: usize,
    rx: Vec<Receiver<Msg>>,
    /// Current shard (index into `order`) and entries consumed from it.
    k: usize,
    offset: usize,
}

struct ReaderJob {
    paths: Arc<Vec<PathBuf>>,
    order: Arc<Vec<usize>>,
    first: usize,
    step: usize,
    base: usize,
    skip: usize,
    buffer: Option<(usize, u64, u64)>,
    max_member: u64,
}

fn reader_thread(job: ReaderJob, tx: SyncSender<Msg>) {
    let mut k = job.first;
    while k < job.order.len() {
        let shard = job.order[k];
        let skip = if k == job.base { job.skip } else { 0 };
        let mut total = 0usize;
        let path = &job.paths[shard];
        let work = std::panic::AssertUnwindSafe(|| {
            stream_shard(path, shard, job.buffer, job.max_member, &mut |item| {
                total += 1;
                total <= skip || tx.send(Msg::Item(item)).is_ok()
            })
        });
        let finished = match std::panic::catch_unwind(work) {
            Ok(f) => f,
            Err(_) => {
                let mut it = RawItem::new(shard, total, String::new());
                it.error = Some("the shard reader panicked".into());
                total += 1;
                total <= skip || tx.send(Msg::Item(it)).is_ok()
            }
        };
        if !finished || tx.send(Msg::End { total }).is_err() {
            return;
        }
        k += job.step;
    }
}

/// The streaming shard loader (see the module docs).
pub struct WebDatasetLoader {
    paths: Arc<Vec<PathBuf>>,
    config: DataConfig,
    wds: WebDatasetConfig,
    pos: DataPosition,
    stream: Option<EpochStream>,
}

impl std::fmt::Debug for WebDatasetLoader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebDatasetLoader")
            .field("shards", &self.paths.len())
            .field("config", &self.config)
            .field("wds", &self.wds)
            .field("pos", &self.pos)
            .finish()
    }
}

impl WebDatasetLoader {
    /// A loader over the shards of `spec` (resolved and checked now).
    pub fn new(
        spec: impl Into<ShardSpec>,
        config: DataConfig,
        wds: WebDatasetConfig,
    ) -> Result<Self> {
        let spec = spec.into();
        let paths = spec.resolve()?;
        if config.batch_size == 0 || config.pipeline.size() == 0 {
            return Err(Error::Config(
                "batch size and image size must be positive".into(),
            ));
        }
        config.pipeline.check()?;
        if wds.world_size == 0 || wds.rank >= wds.world_size {
            return Err(Error::Config(format!(
                "rank {} is not in 0..{} (world size)",
                wds.rank, wds.world_size
            )));
        }
        if wds.threads == 0 {
            return Err(Error::Config("at least one reader thread is needed".into()));
        }
        if paths.len() < wds.world_size {
            return Err(data_err(
                format!("{spec:?}"),
                format!(
                    "{} shards cannot be split across {} ranks: every rank needs at least one",
                    paths.len(),
                    wds.world_size
                ),
            ));
        }
        Ok(Self {
            paths: Arc::new(paths),
            config,
            wds,
            pos: DataPosition::default(),
            stream: None,
        })
    }

    /// The shard files, in list order.
    pub fn shards(&self) -> &[PathBuf] {
        &self.paths
    }

    pub fn config(&self) -> &DataConfig {
        &self.config
    }

    pub fn wds_config(&self) -> &WebDatasetConfig {
        &self.wds
    }

    /// This rank's shards (indices into [`WebDatasetLoader::shards`]) in epoch `epoch`'s
    /// order.
    pub fn epoch_shards(&self, epoch: u64) -> Vec<usize> {
        let n = self.paths.len();
        let mut all: Vec<usize> = (0..n).collect();
        if self.config.shuffle {
            let mut rng = derive_rng(self.config.seed, &[SHARD_ORDER_STREAM, epoch]);
            for i in (1..n).rev() {
                let j = rng.random_range(0..=(i as u64)) as usize;
                all.swap(i, j);
            }
        }
        all.into_iter()
            .skip(self.wds.rank)
            .step_by(self.wds.world_size)
            .collect()
    }

    fn cursor(&self, shard: usize, offset: usize) -> ShardCursor {
        ShardCursor {
            shard,
            offset,
            rank: self.wds.rank,
            world_size: self.wds.world_size,
            num_shards: self.paths.len(),
        }
    }

    /// The position of the next sample.
    pub fn position(&self) -> DataPosition {
        self.pos
    }

    /// Continues from `pos` (from a checkpoint of this rank): the next batch starts with
    /// exactly the sample that followed it.
    pub fn set_position(&mut self, pos: DataPosition) -> Result<()> {
        let origin = || format!("{} shards", self.paths.len());
        match pos.shard {
            None if pos.cursor != 0 => {
                return Err(data_err(
                    origin(),
                    "the position comes from a manifest loader, not from shards",
                ))
            }
            None => {}
            Some(c) => {
                if c.rank != self.wds.rank || c.world_size != self.wds.world_size {
                    return Err(data_err(
                        origin(),
                        format!(
                            "the position belongs to rank {} of {}, this loader is rank {} of {} \
                             (every rank must restore its own position)",
                            c.rank, c.world_size, self.wds.rank, self.wds.world_size
                        ),
                    ));
                }
                if c.num_shards != self.paths.len() {
                    return Err(data_err(
                        origin(),
                        format!(
                            "the position was taken over {} shards (did the shard list change?)",
                            c.num_shards
                        ),
                    ));
                }
                let mine = self.epoch_shards(pos.epoch).len();
                if c.shard > mine || (c.shard == mine && c.offset > 0) {
                    return Err(data_err(
                        origin(),
                        format!(
                            "position shard {} is beyond this rank's {mine} shards of epoch {}",
                            c.shard, pos.epoch
                        ),
                    ));
                }
            }
        }
        self.stream = None;
        self.pos = pos;
        Ok(())
    }

    fn start_stream(&mut self) -> &mut EpochStream {
        let epoch = self.pos.epoch;
        let (k, offset) = self
            .pos
            .shard
            .map(|c| (c.shard, c.offset))
            .unwrap_or((0, 0));
        let order = Arc::new(self.epoch_shards(epoch));
        let buffer = (self.config.shuffle && self.wds.shuffle_buffer > 1).then_some((
            self.wds.shuffle_buffer,
            self.config.seed,
            epoch,
        ));
        let threads = self.wds.threads.min(order.len().saturating_sub(k)).max(1);
        let mut rx = Vec::with_capacity(threads);
        for t in 0..threads {
            let (tx, r) = sync_channel(self.wds.read_ahead.max(1));
            let job = ReaderJob {
                paths: self.paths.clone(),
                order: order.clone(),
                first: k + t,
                step: threads,
                base: k,
                skip: offset,
                buffer,
                max_member: self.wds.max_member_bytes,
            };
            // A thread that cannot be spawned leaves its channel closed: the consumer
            // reports it when it reaches that thread's first shard.
            let _ = std::thread::Builder::new()
                .name(format!("wds-reader-{t}"))
                .spawn(move || reader_thread(job, tx));
            rx.push(r);
        }
        self.stream.insert(EpochStream {
            order,
            base: k,
            rx,
            k,
            offset,
        })
    }

    /// The next stream entry of the current epoch, `None` at the end of the epoch.
    fn next_item(&mut self) -> Result<Option<RawItem>> {
        if self.stream.is_none() {
            self.start_stream();
        }
        let paths = self.paths.clone();
        let Some(st) = self.stream.as_mut() else {
            return Ok(None);
        };
        loop {
            if st.k >= st.order.len() {
                return Ok(None);
            }
            let lane = (st.k - st.base) % st.rx.len();
            let shard_path = || paths[st.order[st.k]].display().to_string();
            match st.rx[lane].recv() {
                Ok(Msg::Item(it)) => {
                    st.offset += 1;
                    self.pos.cursor += 1;
                    self.pos.shard = Some(ShardCursor {
                        shard: st.k,
                        offset: st.offset,
                        rank: self.wds.rank,
                        world_size: self.wds.world_size,
                        num_shards: paths.len(),
                    });
                    return Ok(Some(it));
                }
                Ok(Msg::End { total }) => {
                    if total < st.offset {
                        let e = data_err(
                            shard_path(),
                            format!(
                                "the resumed position is {} samples into the shard, which has \
                                 only {total} (did the shards change?)",
                                st.offset
                            ),
                        );
                        self.stream = None;
                        return Err(e);
                    }
                    st.k += 1;
                    st.offset = 0;
                }
                Err(_) => {
                    let e = data_err(shard_path(), "the shard reader thread stopped unexpectedly");
                    self.stream = None;
                    return Err(e);
                }
            }
        }
    }

    /// The next full batch, moving on to the next epoch when one ends. Fails only when a
    /// whole epoch of this rank yields no batch, or when reading fails beyond a skip.
    pub fn next_batch(&mut self) -> Result<Batch> {
        loop {
            let epoch = self.pos.epoch;
            let whole_epoch = self.pos.cursor == 0;
            if let Some(b) = self.next_batch_in_epoch()? {
                return Ok(b);
            }
            if whole_epoch {
                return Err(data_err(
                    format!("{} shards", self.paths.len()),
                    format!(
                        "epoch {epoch} of rank {} yielded no batch of {}: too few usable \
                         samples ({} skipped in total so far)",
                        self.wds.rank, self.config.batch_size, self.pos.skipped_total
                    ),
                ));
            }
        }
    }

    /// The next batch of the current epoch, or `None` when the epoch is over (the
    /// position then moves to the start of the next epoch). With `drop_last` off, the
    /// epoch's last batch may be smaller.
    pub fn next_batch_in_epoch(&mut self) -> Result<Option<Batch>> {
        let epoch = self.pos.epoch;
        let bs = self.config.batch_size;
        let mut got: Vec<Loaded> = Vec::with_capacity(bs);
        let mut skipped = Vec::new();
        let mut ended = false;
        while got.len() < bs && !ended {
            let mut items = Vec::with_capacity(bs - got.len());
            while items.len() < bs - got.len() {
                match self.next_item()? {
                    Some(it) => items.push(it),
                    None => {
                        ended = true;
                        break;
                    }
                }
            }
            let paths = &self.paths;
            let cfg = &self.config;
            let results: Vec<(RawItem, std::result::Result<Loaded, String>)> = items
                .into_par_iter()
                .map(|mut it| {
                    let r = decode_item(&mut it, cfg, epoch);
                    (it, r)
                })
                .collect();
            for (it, r) in results {
                match r {
                    Ok(l) => got.push(l),
                    Err(reason) => {
                        let shard = &paths[it.shard];
                        skipped.push(SkippedSample {
                            index: sample_index(it.shard, it.ordinal),
                            image: shard.join(&it.key),
                            reason: format!("{} key `{}`: {reason}", shard.display(), it.key),
                        })
                    }
                }
            }
        }
        self.pos.skipped_total += skipped.len() as u64;
        let full = got.len() == bs;
        if !(full || (!got.is_empty() && !self.config.drop_last)) {
            self.stream = None;
            self.pos.epoch += 1;
            self.pos.cursor = 0;
            self.pos.shard = Some(self.cursor(0, 0));
            return Ok(None);
        }
        Ok(Some(Batch::assemble(
            got,
            self.config.pipeline.size(),
            epoch,
            self.pos,
            skipped,
        )?))
    }
}

impl BatchSource for WebDatasetLoader {
    fn next_batch(&mut self) -> Result<Batch> {
        WebDatasetLoader::next_batch(self)
    }

    fn position(&self) -> DataPosition {
        WebDatasetLoader::position(self)
    }

    fn set_position(&mut self, pos: DataPosition) -> Result<()> {
        WebDatasetLoader::set_position(self, pos)
    }
}

/// Metadata read from a sample's `.json`.
struct Meta {
    id: Option<String>,
    boxes: Option<Vec<[f32; 4]>>,
    captions: Option<Vec<String>>,
}

fn parse_meta(bytes: &[u8]) -> std::result::Result<Meta, String> {
    let v: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| format!("undecodable JSON: {e}"))?;
    let obj = v.as_object().ok_or("undecodable JSON: not an object")?;
    let id = match obj.get("id") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Number(n)) => Some(n.to_string()),
        Some(_) => return Err("JSON `id` must be a string or a number".into()),
    };
    let boxes = match obj.get("boxes") {
        None | Some(serde_json::Value::Null) => None,
        Some(b) => Some(parse_boxes(b).map_err(|r| format!("JSON {r}"))?),
    };
    let captions = match obj.get("captions") {
        None | Some(serde_json::Value::Null) => None,
        Some(cs) => Some(
            cs.as_array()
                .ok_or("JSON `captions` is not a list")?
                .iter()
                .map(|c| c.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or("JSON `captions` holds a non-string")?,
        )
        .filter(|c: &Vec<String>| !c.is_empty()),
    };
    Ok(Meta {
        id,
        boxes,
        captions,
    })
}

fn decode_item(
    it: &mut RawItem,
    cfg: &DataConfig,
    epoch: u64,
) -> std::result::Result<Loaded, String> {
    if let Some(e) = &it.error {
        return Err(e.clone());
    }
    let meta = match &it.json {
        Some(j) => parse_meta(j)?,
        None => Meta {
            id: None,
            boxes: None,
            captions: None,
        },
    };
    let captions = match meta.captions {
        Some(c) => c,
        None => match &it.txt {
            Some(t) => vec![String::from_utf8(t.clone())
                .map_err(|_| "the caption (.txt) is not UTF-8".to_string())?],
            None => return Err("missing caption (no .txt member)".into()),
        },
    };
    let image = it
        .image
        .take()
        .ok_or_else(|| format!("no image member (expected one of {IMAGE_EXTENSIONS:?})"))?;
    let (shard, ordinal) = (it.shard as u64, it.ordinal as u64);
    let work = std::panic::AssertUnwindSafe(|| -> Result<(Vec<f32>, (u32, u32))> {
        let (img, _permit) = ImageInput::bytes(image).decode_rgb_permit()?;
        let mut rng = derive_rng(cfg.seed, &[streams::AUGMENT, epoch, shard, ordinal]);
        let pixels = cfg.pipeline.process(&img, &mut rng)?;
        Ok((pixels, (img.width(), img.height())))
    });
    let (pixels, size) = match std::panic::catch_unwind(work) {
        Ok(r) => r.map_err(|e| e.to_string())?,
        Err(_) => return Err("the image decoder panicked".into()),
    };
    let caption = if captions.len() == 1 {
        captions[0].clone()
    } else {
        let mut r = derive_rng(cfg.seed, &[streams::CAPTION, epoch, shard, ordinal]);
        captions[r.random_range(0..captions.len() as u64) as usize].clone()
    };
    Ok(Loaded {
        index: sample_index(it.shard, it.ordinal),
        pixels,
        caption,
        id: meta.id,
        boxes: meta.boxes,
        size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn braces_and_members() {
        assert_eq!(
            expand_braces("s-{000..002}.tar").unwrap(),
            ["s-000.tar", "s-001.tar", "s-002.tar"]
        );
        assert_eq!(expand_braces("{8..10}").unwrap(), ["8", "9", "10"]);
        assert_eq!(
            expand_braces("{a,b}/{0..1}.tar").unwrap(),
            ["a/0.tar", "a/1.tar", "b/0.tar", "b/1.tar"]
        );
        assert_eq!(expand_braces("plain.tar").unwrap(), ["plain.tar"]);
        for bad in [
            "s-{0..", "s-}", "{x..3}", "{5..1}", "{abc}", "{{0..1}}", "{0..1}}",
        ] {
            assert!(expand_braces(bad).is_err(), "{bad}");
        }
        assert_eq!(
            split_member("dir/00001.seg.JPG"),
            Some(("dir/00001".to_string(), "seg.jpg".to_string()))
        );
        assert_eq!(split_member("a.b/noext"), None);
        assert_eq!(split_member(".hidden"), None);
        assert_eq!(split_sample_index(sample_index(7, 12345)), (7, 12345));
    }
}
