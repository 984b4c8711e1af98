//! A bounded reader of PyTorch zip checkpoints (what `torch.save` writes since 1.6).
//!
//! A checkpoint is a zip archive holding `<prefix>/data.pkl` (a pickle describing the saved
//! object), `<prefix>/byteorder` and one entry `<prefix>/data/<key>` per tensor storage.
//! [`PthReader::open`] reads the archive's central directory and interprets the pickle with
//! an explicit stack machine that never recurses; every resource it uses is bounded by the
//! constants below, and every tensor's view (shape, stride, offset) is checked against the
//! real size of its storage entry before anything is allocated for it. Tensors that cannot
//! be read (a dtype candle has no type for, a view larger than its storage, a quantized or
//! sparse tensor) are listed by [`PthReader::unsupported`] with the reason, never dropped in
//! silence.
//!
//! Values the reader does not know (optimiser states, `argparse.Namespace`, numpy scalars,
//! any other global) are kept as opaque objects, so that only tensors matter.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor, WithDType};
use zip::{CompressionMethod, ZipArchive};

use crate::error::{Error, Result};

/// Deepest nesting of containers the pickle may build: open MARKs count, and so does the
/// depth of every value built over other values (tuples, lists, dicts, REDUCE arguments).
/// Python's own pickler recurses once per level and stops near this depth.
pub const MAX_DEPTH: usize = 1000;
/// Largest `data.pkl` read (the pickle is read into memory whole).
pub const MAX_PICKLE_BYTES: u64 = 256 << 20;
/// Most memo entries (`BINPUT`, `LONG_BINPUT`, `MEMOIZE`).
pub const MAX_MEMO: usize = 1 << 23;
/// Most values pushed on the pickle stack over the whole run (new objects and memo
/// references together); with values of 40 bytes this bounds the interpreter's memory
/// to about 640 MiB, and a list of ten million ints still loads.
pub const MAX_VALUES: usize = 1 << 24;
/// Most values on the pickle stack at one time (the pickler batches list and dict items by
/// 1000; a tuple's items all sit on the stack).
pub const MAX_STACK: usize = 1 << 22;
/// Most dimensions of a tensor.
pub const MAX_RANK: usize = 64;
/// Largest tensor read from a view whose strides overlap (zero or repeated strides), i.e. a
/// tensor with more elements than its storage holds (an `expand`ed tensor).
pub const MAX_EXPANDED_VIEW_BYTES: u64 = 1 << 30;
/// Deflate cannot compress by more than about 1032:1, so an entry declaring a larger
/// ratio is corrupt.
const MAX_DEFLATE_RATIO: u64 = 1032;
/// Largest `byteorder` entry read.
const MAX_BYTEORDER_BYTES: u64 = 64;

/// One readable tensor of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PthTensorInfo {
    /// The key in the state dict.
    pub name: String,
    /// The candle dtype it loads as.
    pub dtype: DType,
    /// The torch storage type, e.g. `"FloatStorage"`.
    pub stored: &'static str,
    pub shape: Vec<usize>,
    /// In elements.
    pub stride: Vec<usize>,
    /// In elements, from the start of the storage.
    pub offset: usize,
    /// The zip entry holding the storage, e.g. `archive/data/3`.
    pub storage: String,
    /// The size of that entry in bytes (uncompressed), from the central directory.
    pub storage_len: u64,
}

/// A PyTorch zip checkpoint whose state dict has been read; tensors are loaded on demand.
pub struct PthReader {
    path: PathBuf,
    infos: BTreeMap<String, PthTensorInfo>,
    unsupported: Vec<(String, String)>,
    archive: Mutex<ZipArchive<BufReader<File>>>,
}

impl std::fmt::Debug for PthReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PthReader")
            .field("path", &self.path)
            .field("tensors", &self.infos.len())
            .field("unsupported", &self.unsupported.len())
            .finish()
    }
}

impl PthReader {
    /// Opens `path` and reads its state dict: with `key`, the top-level object must be a
    /// dict whose entry `key` is a dict; without, the top-level dict. Only the state dict's
    /// direct values that are tensors count (nested dicts are not flattened).
    pub fn open(path: &Path, key: Option<&str>) -> Result<Self> {
        let parsed = Parsed::open(path)?;
        let dict = parsed.state_dict(key).map_err(|r| checkpoint(path, r))?;
        let (infos, unsupported) = parsed.tensors(dict);
        Ok(Self {
            path: path.to_path_buf(),
            infos,
            unsupported,
            archive: Mutex::new(parsed.archive),
        })
    }

    /// The file this reader reads.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The readable tensors, by name.
    pub fn tensor_infos(&self) -> &BTreeMap<String, PthTensorInfo> {
        &self.infos
    }

    /// The tensors that cannot be read, `(name, reason)`, sorted by name.
    pub fn unsupported(&self) -> &[(String, String)] {
        &self.unsupported
    }

    /// Why the tensor `name` cannot be read, if it is one of [`PthReader::unsupported`].
    pub fn unsupported_reason(&self, name: &str) -> Option<&str> {
        self.unsupported
            .binary_search_by(|(n, _)| n.as_str().cmp(name))
            .ok()
            .and_then(|i| self.unsupported.get(i))
            .map(|(_, r)| r.as_str())
    }

    /// Loads `name` onto the CPU in its stored dtype: `Ok(None)` when the state dict has no
    /// such tensor, an error naming it when it cannot be read.
    pub fn get(&self, name: &str) -> Result<Option<Tensor>> {
        if let Some(reason) = self.unsupported_reason(name) {
            return Err(checkpoint(&self.path, format!("tensor `{name}`: {reason}")));
        }
        let Some(info) = self.infos.get(name) else {
            return Ok(None);
        };
        let mut archive = self
            .archive
            .lock()
            .map_err(|_| Error::LockPoisoned("pth archive"))?;
        read_tensor(&mut archive, info)
            .map(Some)
            .map_err(|r| checkpoint(&self.path, format!("tensor `{name}`: {r}")))
    }
}

/// The candidates (in their order) that are top-level keys of the checkpoint whose value is
/// a dict holding at least one tensor, readable or not. The pickle is parsed once.
pub fn nested_state_dicts(path: &Path, candidates: &[&str]) -> Result<Vec<String>> {
    let parsed = Parsed::open(path)?;
    let root = parsed.root();
    let Some(top) = parsed.arena.dict(root) else {
        return Ok(Vec::new());
    };
    let mut found = Vec::new();
    for &key in candidates {
        let Some(value) = lookup(&parsed.arena, top, key) else {
            continue;
        };
        let Some(entries) = parsed.arena.dict(value) else {
            continue;
        };
        let holds_tensors = entries.iter().any(|&(k, v)| {
            parsed.arena.str(k).is_some() && !matches!(classify(&parsed.arena, v), Found::NotTensor)
        });
        if holds_tensors {
            found.push(key.to_string());
        }
    }
    Ok(found)
}

fn checkpoint(path: &Path, reason: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

// ---------------------------------------------------------------------------------------
// The archive.

/// The opened archive with its pickle interpreted.
struct Parsed {
    archive: ZipArchive<BufReader<File>>,
    file_len: u64,
    /// `archive/` for `archive/data.pkl` (empty for a bare `data.pkl`).
    prefix: String,
    arena: Arena,
    root: Id,
}

impl Parsed {
    fn open(path: &Path) -> Result<Self> {
        let file =
            File::open(path).map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        let file_len = file
            .metadata()
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?
            .len();
        let mut head = [0u8; 2];
        let head_len = (&file).read(&mut head).unwrap_or(0);
        let mut archive = match ZipArchive::new(BufReader::new(file)) {
            Ok(a) => a,
            Err(e) => {
                let reason = if head_len >= 1 && head[0] == 0x80 {
                    "a legacy (pre-1.6, not zip) PyTorch file, which is not supported; \
                     save it again with a recent torch.save"
                        .to_string()
                } else {
                    format!("not a zip archive, as PyTorch checkpoints are ({e})")
                };
                return Err(checkpoint(path, reason));
            }
        };
        let prefix = find_pickle(&archive).map_err(|r| checkpoint(path, r))?;
        let pkl = format!("{prefix}data.pkl");

        if let Some(i) = archive.index_for_name_raw(format!("{prefix}byteorder").as_bytes()) {
            let order = read_entry(&mut archive, i, file_len, MAX_BYTEORDER_BYTES)
                .map_err(|r| checkpoint(path, format!("`{prefix}byteorder`: {r}")))?;
            match String::from_utf8_lossy(&order).trim() {
                "little" => {}
                "big" => {
                    return Err(checkpoint(
                        path,
                        "written on a big-endian machine (byteorder `big`), which is not \
                         supported",
                    ))
                }
                other => {
                    return Err(checkpoint(
                        path,
                        format!("unknown byte order `{other}` in `{prefix}byteorder`"),
                    ))
                }
            }
        }

        let index = archive
            .index_for_name(&pkl)
            .ok_or_else(|| checkpoint(path, format!("`{pkl}` is not in the archive")))?;
        let data = read_entry(&mut archive, index, file_len, MAX_PICKLE_BYTES)
            .map_err(|r| checkpoint(path, format!("`{pkl}`: {r}")))?;
        let (arena, root) = Machine::new(&data)
            .run()
            .map_err(|r| checkpoint(path, format!("`{pkl}`: {r}")))?;
        Ok(Self {
            archive,
            file_len,
            prefix,
            arena,
            root,
        })
    }

    /// The saved object; a TorchScript module's state when the file holds one.
    fn root(&self) -> Id {
        if let Value::Object {
            callable,
            state: Some(state),
            ..
        } = self.arena.value(self.root)
        {
            if self.arena.global(*callable) == Some(("__torch__", "Module")) {
                return *state;
            }
        }
        self.root
    }

    /// The dict holding the tensors.
    fn state_dict(&self, key: Option<&str>) -> std::result::Result<Id, String> {
        let root = self.root();
        let kind = self.arena.kind(root);
        let Some(top) = self.arena.dict(root) else {
            return Err(match key {
                Some(k) => {
                    format!("the saved object is {kind}, not a dict, so it has no key '{k}'")
                }
                None => format!("the saved object is {kind}, not a state dict"),
            });
        };
        let Some(k) = key else {
            return Ok(root);
        };
        let Some(value) = lookup(&self.arena, top, k) else {
            let keys: Vec<String> = top
                .iter()
                .filter_map(|&(k, _)| self.arena.str(k).map(|s| format!("'{s}'")))
                .take(20)
                .collect();
            return Err(format!(
                "no key '{k}' at the top level (its keys: {})",
                if keys.is_empty() {
                    "none that are strings".to_string()
                } else {
                    keys.join(", ")
                }
            ));
        };
        if self.arena.dict(value).is_none() {
            return Err(format!(
                "the top-level '{k}' is {}, not a dict of tensors",
                self.arena.kind(value)
            ));
        }
        Ok(value)
    }

    /// Splits the state dict's tensors into readable ones and the others with a reason.
    fn tensors(&self, dict: Id) -> (BTreeMap<String, PthTensorInfo>, Vec<(String, String)>) {
        let mut all: BTreeMap<String, std::result::Result<PthTensorInfo, String>> = BTreeMap::new();
        for &(k, v) in self.arena.dict(dict).unwrap_or_default() {
            let Some(name) = self.arena.str(k) else {
                continue;
            };
            let result = match classify(&self.arena, v) {
                Found::NotTensor => continue,
                Found::Tensor(Err(reason)) => Err(reason),
                Found::Tensor(Ok(view)) => self.check(name, view),
            };
            // As in a Python dict, a later entry of the same name replaces an earlier one.
            all.insert(name.to_string(), result);
        }
        let mut infos = BTreeMap::new();
        let mut unsupported = Vec::new();
        for (name, r) in all {
            match r {
                Ok(info) => {
                    infos.insert(name, info);
                }
                Err(reason) => unsupported.push((name, reason)),
            }
        }
        (infos, unsupported)
    }

    /// Checks a view against its storage entry, from the central directory only.
    fn check(&self, name: &str, view: View) -> std::result::Result<PthTensorInfo, String> {
        let kind = view.kind;
        let Some(dtype) = kind.dtype else {
            return Err(format!(
                "dtype {} (torch {}) has no candle dtype",
                kind.torch, kind.name
            ));
        };
        let entry = format!("{}data/{}", self.prefix, view.key);
        // A hashed lookup of the raw name: `index_for_name` scans every entry when the name
        // is absent, which a file naming many missing storages would make quadratic.
        let Some(index) = self.archive.index_for_name_raw(entry.as_bytes()) else {
            return Err(format!("its storage `{entry}` is not in the archive"));
        };
        let meta = self
            .archive
            .by_index_data(index)
            .map_err(|e| format!("storage `{entry}`: {e}"))?;
        let storage_len = meta.size();
        entry_is_sane(
            meta.compression(),
            meta.encrypted(),
            storage_len,
            meta.compressed_size(),
            self.file_len,
        )
        .map_err(|r| format!("storage `{entry}`: {r}"))?;
        let extent =
            Extent::of(&view.shape, &view.stride, view.offset, kind.size).map_err(|r| {
                format!(
                    "shape {:?} with stride {:?} and offset {}: {r}",
                    view.shape, view.stride, view.offset
                )
            })?;
        if extent.end > storage_len {
            return Err(format!(
                "shape {:?} with stride {:?} and offset {} needs {} bytes but storage `{entry}` \
                 holds {storage_len}",
                view.shape, view.stride, view.offset, extent.end
            ));
        }
        if extent.out > storage_len && extent.out > MAX_EXPANDED_VIEW_BYTES {
            return Err(format!(
                "shape {:?} with stride {:?} repeats the {storage_len} bytes of storage \
                 `{entry}` into {} bytes, more than the {} bytes allowed for an expanded view",
                view.shape, view.stride, extent.out, MAX_EXPANDED_VIEW_BYTES
            ));
        }
        Ok(PthTensorInfo {
            name: name.to_string(),
            dtype,
            stored: kind.name,
            shape: view.shape,
            stride: view.stride,
            offset: view.offset,
            storage: entry,
            storage_len,
        })
    }
}

/// The prefix of the only `data.pkl` of the archive (the shallowest one).
fn find_pickle(archive: &ZipArchive<BufReader<File>>) -> std::result::Result<String, String> {
    let mut found: Vec<String> = Vec::new();
    for name in archive.file_names() {
        let Ok(name) = name else { continue };
        if name == "data.pkl" || name.ends_with("/data.pkl") {
            found.push(name.to_string());
        }
    }
    let Some(depth) = found.iter().map(|n| n.matches('/').count()).min() else {
        return Err("no `data.pkl` in the archive: not a PyTorch checkpoint".into());
    };
    found.retain(|n| n.matches('/').count() == depth);
    match found.as_slice() {
        [one] => Ok(one.trim_end_matches("data.pkl").to_string()),
        several => Err(format!(
            "several pickles in the archive ({}): not one PyTorch checkpoint",
            several.join(", ")
        )),
    }
}

/// Whether an entry's declared sizes are possible in a file of `file_len` bytes.
fn entry_is_sane(
    method: CompressionMethod,
    encrypted: bool,
    size: u64,
    compressed: u64,
    file_len: u64,
) -> std::result::Result<(), String> {
    if encrypted {
        return Err("the entry is encrypted".into());
    }
    if compressed > file_len {
        return Err(format!(
            "the entry declares {compressed} bytes in a file of {file_len}: the file is \
             truncated or corrupt"
        ));
    }
    if method == CompressionMethod::STORE {
        if size != compressed {
            return Err(format!(
                "the stored entry declares {size} bytes but occupies {compressed}: corrupt"
            ));
        }
        Ok(())
    } else if method == CompressionMethod::DEFLATE {
        if size
            > compressed
                .saturating_mul(MAX_DEFLATE_RATIO)
                .saturating_add(64)
        {
            return Err(format!(
                "the entry declares {size} bytes from {compressed} compressed ones, more than \
                 deflate can produce: corrupt"
            ));
        }
        Ok(())
    } else {
        Err(format!("compression {method} is not supported"))
    }
}

/// Reads a whole entry of at most `limit` bytes (Stored or Deflated), checking its size
/// and, for deflated entries, its CRC.
fn read_entry(
    archive: &mut ZipArchive<BufReader<File>>,
    index: usize,
    file_len: u64,
    limit: u64,
) -> std::result::Result<Vec<u8>, String> {
    let meta = archive.by_index_data(index).map_err(|e| e.to_string())?;
    let (method, size, crc) = (meta.compression(), meta.size(), meta.crc32());
    entry_is_sane(
        method,
        meta.encrypted(),
        size,
        meta.compressed_size(),
        file_len,
    )?;
    if size > limit {
        return Err(format!(
            "the entry holds {size} bytes, more than the limit of {limit}"
        ));
    }
    let mut out = Vec::new();
    let read = match method {
        m if m == CompressionMethod::DEFLATE => {
            let raw = archive.by_index_raw(index).map_err(|e| e.to_string())?;
            flate2::read::DeflateDecoder::new(raw)
                .take(limit.saturating_add(1))
                .read_to_end(&mut out)
        }
        _ => {
            let f = archive.by_index(index).map_err(|e| e.to_string())?;
            f.take(limit.saturating_add(1)).read_to_end(&mut out)
        }
    };
    read.map_err(|e| format!("cannot read the entry: {e}"))?;
    if out.len() as u64 != size {
        return Err(format!(
            "the entry declares {size} bytes but holds {}: the file is truncated or corrupt",
            out.len()
        ));
    }
    if method == CompressionMethod::DEFLATE {
        let mut c = flate2::Crc::new();
        c.update(&out);
        if c.sum() != crc {
            return Err("the entry's CRC does not match: corrupt".into());
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Tensor views.

/// A torch storage type.
#[derive(Debug, Clone, Copy)]
struct StorageKind {
    name: &'static str,
    /// `None`: candle has no such dtype.
    dtype: Option<DType>,
    torch: &'static str,
    size: usize,
}

const fn kind(
    name: &'static str,
    dtype: Option<DType>,
    torch: &'static str,
    size: usize,
) -> StorageKind {
    StorageKind {
        name,
        dtype,
        torch,
        size,
    }
}

const STORAGE_KINDS: &[StorageKind] = &[
    kind("FloatStorage", Some(DType::F32), "float32", 4),
    kind("DoubleStorage", Some(DType::F64), "float64", 8),
    kind("HalfStorage", Some(DType::F16), "float16", 2),
    kind("BFloat16Storage", Some(DType::BF16), "bfloat16", 2),
    kind("LongStorage", Some(DType::I64), "int64", 8),
    kind("IntStorage", Some(DType::I32), "int32", 4),
    kind("ShortStorage", Some(DType::I16), "int16", 2),
    kind("ByteStorage", Some(DType::U8), "uint8", 1),
    kind("CharStorage", None, "int8", 1),
    kind("BoolStorage", None, "bool", 1),
    kind("ComplexHalfStorage", None, "complex32", 4),
    kind("ComplexFloatStorage", None, "complex64", 8),
    kind("ComplexDoubleStorage", None, "complex128", 16),
    kind("QUInt8Storage", None, "quint8", 1),
    kind("QInt8Storage", None, "qint8", 1),
    kind("QInt32Storage", None, "qint32", 4),
    kind("QUInt4x2Storage", None, "quint4x2", 1),
    kind("QUInt2x4Storage", None, "quint2x4", 1),
];

/// A tensor as `_rebuild_tensor_v2` describes it.
#[derive(Debug)]
struct View {
    kind: StorageKind,
    key: String,
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

enum Found {
    NotTensor,
    Tensor(std::result::Result<View, String>),
}

/// Whether `v` is a tensor, and if so its view or why it cannot be read.
fn classify(arena: &Arena, mut v: Id) -> Found {
    // Parameters and tensor subclasses wrap the rebuilt tensor; a few levels at most.
    for _ in 0..8 {
        let Value::Object { callable, args, .. } = arena.value(v) else {
            return Found::NotTensor;
        };
        let Some((module, name)) = arena.global(*callable) else {
            return Found::NotTensor;
        };
        match (module, name) {
            ("torch._utils", "_rebuild_tensor_v2" | "_rebuild_tensor") => {
                return Found::Tensor(rebuild_args(arena, *args))
            }
            ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
                match arena.seq(*args).and_then(|a| a.first()) {
                    Some(&inner) => v = inner,
                    None => return Found::Tensor(Err(format!("malformed `{module}.{name}` call"))),
                }
            }
            ("torch._tensor", "_rebuild_from_type_v2") => {
                // (func, new_type, args, state): the tensor is func(*args).
                let Some(&[func, _, inner_args, ..]) = arena.seq(*args) else {
                    return Found::Tensor(Err(format!("malformed `{module}.{name}` call")));
                };
                match arena.global(func) {
                    Some(("torch._utils", "_rebuild_tensor_v2" | "_rebuild_tensor")) => {
                        return Found::Tensor(rebuild_args(arena, inner_args))
                    }
                    Some((m, n)) => {
                        return Found::Tensor(Err(format!(
                            "a tensor subclass rebuilt by `{m}.{n}`, which is not supported"
                        )))
                    }
                    None => return Found::Tensor(Err(format!("malformed `{module}.{name}` call"))),
                }
            }
            (m, n) if m.starts_with("torch") && n.starts_with("_rebuild") => {
                return Found::Tensor(Err(format!(
                    "a tensor rebuilt by `{m}.{n}` (quantized, sparse, nested or meta), which \
                     is not supported"
                )))
            }
            _ => return Found::NotTensor,
        }
    }
    Found::Tensor(Err("tensor wrappers nested too deeply".into()))
}

/// `(storage, storage_offset, size, stride, ...)` with the storage a persistent id
/// `('storage', torch.<Kind>Storage, key, location, numel)`.
fn rebuild_args(arena: &Arena, args: Id) -> std::result::Result<View, String> {
    let malformed = |what: &str| format!("malformed `_rebuild_tensor_v2` arguments: {what}");
    let Some(&[storage, offset, size, stride, ..]) = arena.seq(args) else {
        return Err(malformed("expected at least 4"));
    };
    let Value::PersId(pid) = arena.value(storage) else {
        return Err(malformed("the storage is not a persistent id"));
    };
    let Some(&[tag, class, key, _location, _numel, ..]) = arena.seq(*pid) else {
        return Err(malformed("the persistent id is not a 5-tuple"));
    };
    if arena.str(tag) != Some("storage") {
        return Err(malformed("the persistent id is not a storage"));
    }
    let kind = match arena.global(class) {
        Some(("torch", name)) => match STORAGE_KINDS.iter().find(|k| k.name == name) {
            Some(k) => *k,
            None => return Err(format!("unknown storage type `torch.{name}`")),
        },
        Some((m, n)) => return Err(format!("unknown storage type `{m}.{n}`")),
        None => return Err(malformed("the storage type is not a class")),
    };
    let key = match arena.value(key) {
        Value::Str(s) => s.to_string(),
        Value::Int(i) => i.to_string(),
        _ => return Err(malformed("the storage key is not a string")),
    };
    if key.is_empty() || key.contains('/') || key.contains("..") {
        return Err(malformed("the storage key is not a plain name"));
    }
    let offset = arena
        .usize(offset)
        .ok_or_else(|| malformed("the storage offset is not a non-negative integer"))?;
    let dims = |id: Id, what: &str| -> std::result::Result<Vec<usize>, String> {
        let items = arena
            .seq(id)
            .ok_or_else(|| malformed(&format!("the {what} is not a tuple")))?;
        if items.len() > MAX_RANK {
            return Err(format!(
                "{} dimensions, more than the {MAX_RANK} supported",
                items.len()
            ));
        }
        items
            .iter()
            .map(|&d| arena.usize(d))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| malformed(&format!("the {what} holds a negative or non-integer value")))
    };
    let shape = dims(size, "size")?;
    let stride = dims(stride, "stride")?;
    if shape.len() != stride.len() {
        return Err(malformed(&format!(
            "size {shape:?} and stride {stride:?} differ in length"
        )));
    }
    Ok(View {
        kind,
        key,
        offset,
        shape,
        stride,
    })
}

/// The bytes a view reaches in its storage.
#[derive(Debug, Clone, Copy)]
struct Extent {
    /// Number of elements.
    numel: usize,
    /// The first byte read (the offset).
    start: u64,
    /// One past the last byte read (0 for an empty tensor).
    end: u64,
    /// Bytes of the tensor once read.
    out: u64,
}

impl Extent {
    /// Checked: `offset + sum((dim - 1) * stride) + 1` elements of `size` bytes.
    fn of(
        shape: &[usize],
        stride: &[usize],
        offset: usize,
        size: usize,
    ) -> std::result::Result<Self, String> {
        let overflow = || "the extent overflows 64 bits".to_string();
        let numel = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| "the number of elements overflows 64 bits".to_string())?;
        let size = size as u64;
        let out = (numel as u64).checked_mul(size).ok_or_else(overflow)?;
        if out > isize::MAX as u64 {
            return Err(format!("{out} bytes do not fit in memory"));
        }
        if numel == 0 {
            return Ok(Self {
                numel,
                start: 0,
                end: 0,
                out: 0,
            });
        }
        let mut last = offset as u64;
        for (&d, &s) in shape.iter().zip(stride) {
            let step = ((d - 1) as u64)
                .checked_mul(s as u64)
                .ok_or_else(overflow)?;
            last = last.checked_add(step).ok_or_else(overflow)?;
        }
        let end = last
            .checked_add(1)
            .and_then(|e| e.checked_mul(size))
            .ok_or_else(overflow)?;
        let start = (offset as u64).checked_mul(size).ok_or_else(overflow)?;
        Ok(Self {
            numel,
            start,
            end,
            out,
        })
    }
}

/// Row-major contiguous, ignoring dimensions of size 1 (as candle does).
fn is_contiguous(shape: &[usize], stride: &[usize]) -> bool {
    let mut acc = 1usize;
    for (&d, &s) in shape.iter().zip(stride).rev() {
        if d > 1 && s != acc {
            return false;
        }
        acc = acc.saturating_mul(d);
    }
    shape.len() == stride.len()
}

/// An element type read from little-endian bytes.
trait Elem: WithDType {
    const SIZE: usize;
    fn from_le(b: &[u8]) -> Self;
}

macro_rules! elem {
    ($t:ty, $n:expr, $conv:expr) => {
        impl Elem for $t {
            const SIZE: usize = $n;
            fn from_le(b: &[u8]) -> Self {
                let mut a = [0u8; $n];
                for (x, y) in a.iter_mut().zip(b) {
                    *x = *y;
                }
                $conv(a)
            }
        }
    };
}

elem!(u8, 1, |a: [u8; 1]| a[0]);
elem!(i16, 2, i16::from_le_bytes);
elem!(i32, 4, i32::from_le_bytes);
elem!(i64, 8, i64::from_le_bytes);
elem!(f32, 4, f32::from_le_bytes);
elem!(f64, 8, f64::from_le_bytes);
elem!(half::f16, 2, |a| half::f16::from_bits(u16::from_le_bytes(
    a
)));
elem!(half::bf16, 2, |a| half::bf16::from_bits(
    u16::from_le_bytes(a)
));

/// Read buffer size; a multiple of every element size.
const CHUNK: usize = 1 << 16;

/// Reads `n` consecutive elements.
fn read_elems<T: Elem>(r: &mut dyn Read, n: usize) -> std::io::Result<Vec<T>> {
    let mut out = Vec::with_capacity(n);
    let mut buf = vec![0u8; CHUNK];
    let mut left = n * T::SIZE;
    while left > 0 {
        let want = left.min(CHUNK);
        let chunk = &mut buf[..want];
        r.read_exact(chunk)?;
        out.extend(chunk.chunks_exact(T::SIZE).map(T::from_le));
        left -= want;
    }
    Ok(out)
}

/// Gathers a strided view from `span`, the storage bytes from the view's offset on.
fn gather<T: Elem>(span: &[u8], shape: &[usize], stride: &[usize], numel: usize) -> Option<Vec<T>> {
    let mut out = Vec::with_capacity(numel);
    if numel == 0 {
        return Some(out);
    }
    let mut index = vec![0usize; shape.len()];
    let mut pos = 0usize;
    for _ in 0..numel {
        let at = pos.checked_mul(T::SIZE)?;
        out.push(T::from_le(span.get(at..at.checked_add(T::SIZE)?)?));
        // Odometer over the multi-index, last dimension fastest.
        for ((i, &d), &s) in index.iter_mut().zip(shape).zip(stride).rev() {
            *i += 1;
            pos += s;
            if *i < d {
                break;
            }
            pos -= s * d;
            *i = 0;
        }
    }
    Some(out)
}

fn read_typed<T: Elem>(
    r: &mut dyn Read,
    info: &PthTensorInfo,
    extent: &Extent,
    contiguous: bool,
) -> std::result::Result<Tensor, String> {
    let truncated = |e: std::io::Error| format!("cannot read storage `{}`: {e}", info.storage);
    let data: Vec<T> = if contiguous {
        read_elems(r, extent.numel).map_err(truncated)?
    } else {
        let span_len = usize::try_from(extent.end.saturating_sub(extent.start))
            .map_err(|_| "the view does not fit in memory".to_string())?;
        let mut span = vec![0u8; span_len];
        r.read_exact(&mut span).map_err(truncated)?;
        gather(&span, &info.shape, &info.stride, extent.numel)
            .ok_or_else(|| format!("the view leaves storage `{}`", info.storage))?
    };
    Tensor::from_vec(data, info.shape.as_slice(), &Device::Cpu)
        .map_err(|e| format!("cannot build the tensor: {e}"))
}

/// Reads a checked tensor: contiguous views stream into the tensor's buffer, others are
/// gathered from the bytes they span.
fn read_tensor(
    archive: &mut ZipArchive<BufReader<File>>,
    info: &PthTensorInfo,
) -> std::result::Result<Tensor, String> {
    let size = info.dtype.size_in_bytes();
    let extent = Extent::of(&info.shape, &info.stride, info.offset, size)?;
    let contiguous = is_contiguous(&info.shape, &info.stride);
    let index = archive
        .index_for_name_raw(info.storage.as_bytes())
        .ok_or_else(|| format!("storage `{}` is not in the archive", info.storage))?;
    let meta = archive
        .by_index_data(index)
        .map_err(|e| format!("storage `{}`: {e}", info.storage))?;
    let deflated = meta.compression() == CompressionMethod::DEFLATE;
    let inflated;
    let mut stored;
    let mut slice: &[u8];
    let reader: &mut dyn Read = if deflated {
        inflated = read_entry(archive, index, u64::MAX, info.storage_len)
            .map_err(|r| format!("storage `{}`: {r}", info.storage))?;
        let start = usize::try_from(extent.start).unwrap_or(usize::MAX);
        slice = inflated
            .get(start.min(inflated.len())..)
            .unwrap_or_default();
        &mut slice
    } else {
        stored = archive
            .by_index_seek(index)
            .map_err(|e| format!("storage `{}`: {e}", info.storage))?;
        stored
            .seek(SeekFrom::Start(extent.start))
            .map_err(|e| format!("cannot read storage `{}`: {e}", info.storage))?;
        &mut stored
    };
    match info.dtype {
        DType::U8 => read_typed::<u8>(reader, info, &extent, contiguous),
        DType::I16 => read_typed::<i16>(reader, info, &extent, contiguous),
        DType::I32 => read_typed::<i32>(reader, info, &extent, contiguous),
        DType::I64 => read_typed::<i64>(reader, info, &extent, contiguous),
        DType::F16 => read_typed::<half::f16>(reader, info, &extent, contiguous),
        DType::BF16 => read_typed::<half::bf16>(reader, info, &extent, contiguous),
        DType::F32 => read_typed::<f32>(reader, info, &extent, contiguous),
        DType::F64 => read_typed::<f64>(reader, info, &extent, contiguous),
        other => Err(format!("dtype {other:?} cannot be read")),
    }
}

// ---------------------------------------------------------------------------------------
// The pickle interpreter.

/// An index into the [`Arena`]. Values refer to each other by index, so that dropping
/// them never recurses, and memo references share a value as Python does.
type Id = u32;

#[derive(Debug)]
enum Value {
    None,
    Bool,
    Int(i64),
    /// An integer beyond 64 bits (its value is not kept).
    BigInt,
    Float,
    Str(Box<str>),
    /// Bytes or a bytearray (not kept).
    Bytes,
    /// `(module, name)`, boxed to keep every value small.
    Global(Box<(Box<str>, Box<str>)>),
    Tuple(Vec<Id>),
    List(Vec<Id>),
    Dict(Vec<(Id, Id)>),
    /// A set or frozenset (items are not kept).
    Set,
    /// `callable(*args)` (REDUCE, NEWOBJ), with the BUILD state if any.
    Object {
        callable: Id,
        args: Id,
        state: Option<Id>,
    },
    PersId(Id),
}

struct Node {
    value: Value,
    depth: u32,
}

struct Arena {
    nodes: Vec<Node>,
}

static NONE: Value = Value::None;

impl Arena {
    fn value(&self, id: Id) -> &Value {
        self.nodes.get(id as usize).map_or(&NONE, |n| &n.value)
    }
    fn depth(&self, id: Id) -> u32 {
        self.nodes.get(id as usize).map_or(0, |n| n.depth)
    }
    fn str(&self, id: Id) -> Option<&str> {
        match self.value(id) {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    fn usize(&self, id: Id) -> Option<usize> {
        match self.value(id) {
            Value::Int(i) => usize::try_from(*i).ok(),
            _ => None,
        }
    }
    fn seq(&self, id: Id) -> Option<&[Id]> {
        match self.value(id) {
            Value::Tuple(v) | Value::List(v) => Some(v),
            _ => None,
        }
    }
    fn dict(&self, id: Id) -> Option<&[(Id, Id)]> {
        match self.value(id) {
            Value::Dict(v) => Some(v),
            _ => None,
        }
    }
    fn global(&self, id: Id) -> Option<(&str, &str)> {
        match self.value(id) {
            Value::Global(g) => Some((&g.0, &g.1)),
            _ => None,
        }
    }
    /// A short description for messages.
    fn kind(&self, id: Id) -> String {
        match self.value(id) {
            Value::None => "None".into(),
            Value::Bool => "a bool".into(),
            Value::Int(_) | Value::BigInt => "an int".into(),
            Value::Float => "a float".into(),
            Value::Str(_) => "a string".into(),
            Value::Bytes => "bytes".into(),
            Value::Global(g) => format!("the global `{}.{}`", g.0, g.1),
            Value::Tuple(_) => "a tuple".into(),
            Value::List(_) => "a list".into(),
            Value::Dict(_) => "a dict".into(),
            Value::Set => "a set".into(),
            Value::Object { callable, .. } => match classify(self, id) {
                Found::Tensor(_) => "a tensor".into(),
                Found::NotTensor => match self.global(*callable) {
                    Some((m, n)) => format!("a `{m}.{n}` object"),
                    None => "an object".into(),
                },
            },
            Value::PersId(_) => "a persistent id".into(),
        }
    }
}

/// The last value of `key` in a dict's entries.
fn lookup(arena: &Arena, entries: &[(Id, Id)], key: &str) -> Option<Id> {
    entries
        .iter()
        .rev()
        .find(|&&(k, _)| arena.str(k) == Some(key))
        .map(|&(_, v)| v)
}

mod op {
    pub const MARK: u8 = b'(';
    pub const STOP: u8 = b'.';
    pub const POP: u8 = b'0';
    pub const POP_MARK: u8 = b'1';
    pub const DUP: u8 = b'2';
    pub const BININT: u8 = b'J';
    pub const BININT1: u8 = b'K';
    pub const BININT2: u8 = b'M';
    pub const NONE: u8 = b'N';
    pub const BINPERSID: u8 = b'Q';
    pub const REDUCE: u8 = b'R';
    pub const BINSTRING: u8 = b'T';
    pub const SHORT_BINSTRING: u8 = b'U';
    pub const BINUNICODE: u8 = b'X';
    pub const APPEND: u8 = b'a';
    pub const BUILD: u8 = b'b';
    pub const GLOBAL: u8 = b'c';
    pub const DICT: u8 = b'd';
    pub const EMPTY_DICT: u8 = b'}';
    pub const APPENDS: u8 = b'e';
    pub const BINGET: u8 = b'h';
    pub const LONG_BINGET: u8 = b'j';
    pub const LIST: u8 = b'l';
    pub const EMPTY_LIST: u8 = b']';
    pub const BINPUT: u8 = b'q';
    pub const LONG_BINPUT: u8 = b'r';
    pub const SETITEM: u8 = b's';
    pub const TUPLE: u8 = b't';
    pub const EMPTY_TUPLE: u8 = b')';
    pub const SETITEMS: u8 = b'u';
    pub const BINFLOAT: u8 = b'G';
    pub const PROTO: u8 = 0x80;
    pub const NEWOBJ: u8 = 0x81;
    pub const TUPLE1: u8 = 0x85;
    pub const TUPLE2: u8 = 0x86;
    pub const TUPLE3: u8 = 0x87;
    pub const NEWTRUE: u8 = 0x88;
    pub const NEWFALSE: u8 = 0x89;
    pub const LONG1: u8 = 0x8a;
    pub const LONG4: u8 = 0x8b;
    pub const BINBYTES: u8 = b'B';
    pub const SHORT_BINBYTES: u8 = b'C';
    pub const SHORT_BINUNICODE: u8 = 0x8c;
    pub const BINUNICODE8: u8 = 0x8d;
    pub const BINBYTES8: u8 = 0x8e;
    pub const EMPTY_SET: u8 = 0x8f;
    pub const ADDITEMS: u8 = 0x90;
    pub const FROZENSET: u8 = 0x91;
    pub const NEWOBJ_EX: u8 = 0x92;
    pub const STACK_GLOBAL: u8 = 0x93;
    pub const MEMOIZE: u8 = 0x94;
    pub const FRAME: u8 = 0x95;
    pub const BYTEARRAY8: u8 = 0x96;
}

/// The name of a pickle opcode this reader does not interpret, if it is one.
fn other_opcode(b: u8) -> Option<&'static str> {
    Some(match b {
        b'F' => "FLOAT",
        b'I' => "INT",
        b'L' => "LONG",
        b'P' => "PERSID",
        b'S' => "STRING",
        b'V' => "UNICODE",
        b'g' => "GET",
        b'i' => "INST",
        b'o' => "OBJ",
        b'p' => "PUT",
        0x82 => "EXT1",
        0x83 => "EXT2",
        0x84 => "EXT4",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        _ => return None,
    })
}

type Step<T> = std::result::Result<T, String>;

/// The stack machine. Marks are kept apart from values (as CPython's metastack), so a
/// value never sits below the innermost mark it did not come before.
struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    /// Where the current opcode starts (for messages).
    at: usize,
    arena: Arena,
    stack: Vec<Id>,
    marks: Vec<usize>,
    memo: HashMap<u32, Id>,
    pushes: usize,
}

impl<'a> Machine<'a> {
    fn new(data: &'a [u8]) -> Self {
        Self {
            data,
            pos: 0,
            at: 0,
            arena: Arena { nodes: Vec::new() },
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            pushes: 0,
        }
    }

    fn fail<T>(&self, msg: impl std::fmt::Display) -> Step<T> {
        Err(format!("{msg} at byte {}", self.at))
    }

    fn too_deep<T>(&self) -> Step<T> {
        self.fail(format!("pickle nesting deeper than {MAX_DEPTH} levels"))
    }

    fn bytes(&mut self, n: usize) -> Step<&'a [u8]> {
        let data = self.data;
        match self
            .pos
            .checked_add(n)
            .and_then(|end| data.get(self.pos..end))
        {
            Some(s) => {
                self.pos += n;
                Ok(s)
            }
            None => self.fail(format!(
                "truncated pickle: the opcode needs {n} more bytes, {} remain",
                data.len().saturating_sub(self.pos)
            )),
        }
    }

    fn array<const N: usize>(&mut self) -> Step<[u8; N]> {
        let b = self.bytes(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(b);
        Ok(a)
    }

    fn u8(&mut self) -> Step<u8> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> Step<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Step<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn len(&mut self, n: u64) -> Step<usize> {
        match usize::try_from(n) {
            Ok(n) if n <= self.data.len() => Ok(n),
            _ => self.fail(format!("truncated pickle: a length of {n} bytes")),
        }
    }

    fn line(&mut self) -> Step<String> {
        let rest = self.data.get(self.pos..).unwrap_or_default();
        let Some(end) = rest.iter().position(|&b| b == b'\n') else {
            return self.fail("truncated pickle: an unterminated GLOBAL name");
        };
        let line = self.bytes(end + 1)?;
        Ok(String::from_utf8_lossy(&line[..end]).into_owned())
    }

    fn text(&mut self, n: usize) -> Step<String> {
        Ok(String::from_utf8_lossy(self.bytes(n)?).into_owned())
    }

    /// The lowest stack index the current opcode may pop.
    fn floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn alloc(&mut self, value: Value, children_depth: u32) -> Step<Id> {
        let depth = children_depth.saturating_add(1);
        if depth as usize > MAX_DEPTH {
            return self.too_deep();
        }
        let Ok(id) = Id::try_from(self.arena.nodes.len()) else {
            return self.fail("too many pickle values");
        };
        self.arena.nodes.push(Node { value, depth });
        Ok(id)
    }

    fn push(&mut self, id: Id) -> Step<()> {
        self.pushes += 1;
        if self.pushes > MAX_VALUES {
            return self.fail(format!("more than {MAX_VALUES} pickle values"));
        }
        if self.stack.len() >= MAX_STACK {
            return self.fail(format!("more than {MAX_STACK} values on the pickle stack"));
        }
        self.stack.push(id);
        Ok(())
    }

    fn push_new(&mut self, value: Value, children_depth: u32) -> Step<()> {
        let id = self.alloc(value, children_depth)?;
        self.push(id)
    }

    fn pop(&mut self) -> Step<Id> {
        if self.stack.len() <= self.floor() {
            return self.fail("pickle stack underflow");
        }
        match self.stack.pop() {
            Some(id) => Ok(id),
            None => self.fail("pickle stack underflow"),
        }
    }

    fn top(&self) -> Step<Id> {
        match self.stack.last() {
            Some(&id) if self.stack.len() > self.floor() => Ok(id),
            _ => self.fail("pickle stack underflow"),
        }
    }

    fn pop_mark(&mut self) -> Step<Vec<Id>> {
        let Some(mark) = self.marks.pop() else {
            return self.fail("no MARK on the pickle stack");
        };
        if mark > self.stack.len() {
            return self.fail("pickle stack underflow");
        }
        Ok(self.stack.split_off(mark))
    }

    fn max_depth(&self, ids: &[Id]) -> u32 {
        ids.iter().map(|&i| self.arena.depth(i)).max().unwrap_or(0)
    }

    /// Records that `target` now holds values of `children_depth`.
    fn deepen(&mut self, target: Id, children_depth: u32) -> Step<()> {
        let depth = children_depth.saturating_add(1);
        if depth as usize > MAX_DEPTH {
            return self.too_deep();
        }
        if let Some(n) = self.arena.nodes.get_mut(target as usize) {
            n.depth = n.depth.max(depth);
        }
        Ok(())
    }

    fn memo_put(&mut self, index: u32) -> Step<()> {
        let top = self.top()?;
        if self.memo.len() >= MAX_MEMO && !self.memo.contains_key(&index) {
            return self.fail(format!("more than {MAX_MEMO} pickle memo entries"));
        }
        self.memo.insert(index, top);
        Ok(())
    }

    fn memo_get(&mut self, index: u32) -> Step<()> {
        match self.memo.get(&index) {
            Some(&id) => self.push(id),
            None => self.fail(format!("pickle memo entry {index} is undefined")),
        }
    }

    fn int(&mut self, v: i64) -> Step<()> {
        self.push_new(Value::Int(v), 0)
    }

    /// A little-endian two's-complement integer of `n` bytes.
    fn long(&mut self, n: usize) -> Step<()> {
        let b = self.bytes(n)?;
        if n > 8 {
            return self.push_new(Value::BigInt, 0);
        }
        let mut v: u64 = 0;
        for (i, &x) in b.iter().enumerate() {
            v |= u64::from(x) << (8 * i);
        }
        if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
            v |= u64::MAX << (8 * n);
        }
        self.int(v as i64)
    }

    fn tuple(&mut self, items: Vec<Id>) -> Step<()> {
        let d = self.max_depth(&items);
        self.push_new(Value::Tuple(items), d)
    }

    fn pairs(&self, items: Vec<Id>) -> Step<Vec<(Id, Id)>> {
        if !items.len().is_multiple_of(2) {
            return self.fail("an odd number of dict items");
        }
        Ok(items.chunks_exact(2).map(|p| (p[0], p[1])).collect())
    }

    fn append(&mut self, items: Vec<Id>) -> Step<()> {
        let target = self.top()?;
        let d = self.max_depth(&items);
        match self
            .arena
            .nodes
            .get_mut(target as usize)
            .map(|n| &mut n.value)
        {
            Some(Value::List(l)) => l.extend(items),
            // An instance of a list subclass; its items are not needed.
            Some(Value::Object { .. }) => return Ok(()),
            _ => {
                let kind = self.arena.kind(target);
                return self.fail(format!("APPEND to {kind}"));
            }
        }
        self.deepen(target, d)
    }

    fn set_items(&mut self, items: Vec<Id>) -> Step<()> {
        let target = self.top()?;
        let d = self.max_depth(&items);
        let pairs = self.pairs(items)?;
        match self
            .arena
            .nodes
            .get_mut(target as usize)
            .map(|n| &mut n.value)
        {
            Some(Value::Dict(entries)) => entries.extend(pairs),
            // An instance of a dict subclass; its items are not needed.
            Some(Value::Object { .. }) => return Ok(()),
            _ => {
                let kind = self.arena.kind(target);
                return self.fail(format!("SETITEM on {kind}"));
            }
        }
        self.deepen(target, d)
    }

    fn object(&mut self, callable: Id, args: Id) -> Step<()> {
        if let Some(("collections", "OrderedDict" | "defaultdict")) = self.arena.global(callable) {
            return self.push_new(Value::Dict(Vec::new()), 0);
        }
        let d = self.max_depth(&[callable, args]);
        self.push_new(
            Value::Object {
                callable,
                args,
                state: None,
            },
            d,
        )
    }

    fn run(mut self) -> Step<(Arena, Id)> {
        loop {
            self.at = self.pos;
            let Some(&code) = self.data.get(self.pos) else {
                return self.fail("truncated pickle: no STOP opcode");
            };
            self.pos += 1;
            match code {
                op::PROTO => {
                    let v = self.u8()?;
                    if v > 5 {
                        return self.fail(format!("pickle protocol {v} (newer than 5)"));
                    }
                }
                op::FRAME => {
                    self.u64()?;
                }
                op::STOP => {
                    let root = self.pop()?;
                    return Ok((self.arena, root));
                }
                op::MARK => {
                    if self.marks.len() >= MAX_DEPTH {
                        return self.too_deep();
                    }
                    self.marks.push(self.stack.len());
                }
                op::POP => {
                    if self.stack.len() > self.floor() {
                        self.pop()?;
                    } else {
                        self.pop_mark()?;
                    }
                }
                op::POP_MARK => {
                    self.pop_mark()?;
                }
                op::DUP => {
                    let top = self.top()?;
                    self.push(top)?;
                }
                op::NONE => self.push_new(Value::None, 0)?,
                op::NEWTRUE => self.push_new(Value::Bool, 0)?,
                op::NEWFALSE => self.push_new(Value::Bool, 0)?,
                op::BININT => {
                    let v = i32::from_le_bytes(self.array()?);
                    self.int(i64::from(v))?
                }
                op::BININT1 => {
                    let v = self.u8()?;
                    self.int(i64::from(v))?
                }
                op::BININT2 => {
                    let v = u16::from_le_bytes(self.array()?);
                    self.int(i64::from(v))?
                }
                op::LONG1 => {
                    let n = self.u8()?;
                    self.long(usize::from(n))?
                }
                op::LONG4 => {
                    let n = i32::from_le_bytes(self.array()?);
                    if n < 0 {
                        return self.fail("a negative LONG4 length");
                    }
                    let n = self.len(n as u64)?;
                    self.long(n)?
                }
                op::BINFLOAT => {
                    self.array::<8>()?;
                    self.push_new(Value::Float, 0)?
                }
                op::SHORT_BINUNICODE | op::SHORT_BINSTRING => {
                    let n = self.u8()?;
                    let s = self.text(usize::from(n))?;
                    self.push_new(Value::Str(s.into()), 0)?
                }
                op::BINUNICODE => {
                    let n = self.u32()?;
                    let n = self.len(u64::from(n))?;
                    let s = self.text(n)?;
                    self.push_new(Value::Str(s.into()), 0)?
                }
                op::BINSTRING => {
                    let n = i32::from_le_bytes(self.array()?);
                    if n < 0 {
                        return self.fail("a negative BINSTRING length");
                    }
                    let n = self.len(n as u64)?;
                    let s = self.text(n)?;
                    self.push_new(Value::Str(s.into()), 0)?
                }
                op::BINUNICODE8 => {
                    let n = self.u64()?;
                    let n = self.len(n)?;
                    let s = self.text(n)?;
                    self.push_new(Value::Str(s.into()), 0)?
                }
                op::SHORT_BINBYTES => {
                    let n = self.u8()?;
                    self.bytes(usize::from(n))?;
                    self.push_new(Value::Bytes, 0)?
                }
                op::BINBYTES => {
                    let n = self.u32()?;
                    let n = self.len(u64::from(n))?;
                    self.bytes(n)?;
                    self.push_new(Value::Bytes, 0)?
                }
                op::BINBYTES8 | op::BYTEARRAY8 => {
                    let n = self.u64()?;
                    let n = self.len(n)?;
                    self.bytes(n)?;
                    self.push_new(Value::Bytes, 0)?
                }
                op::EMPTY_TUPLE => self.push_new(Value::Tuple(Vec::new()), 0)?,
                op::EMPTY_LIST => self.push_new(Value::List(Vec::new()), 0)?,
                op::EMPTY_DICT => self.push_new(Value::Dict(Vec::new()), 0)?,
                op::EMPTY_SET => self.push_new(Value::Set, 0)?,
                op::TUPLE => {
                    let items = self.pop_mark()?;
                    self.tuple(items)?
                }
                op::TUPLE1 => {
                    let a = self.pop()?;
                    self.tuple(vec![a])?
                }
                op::TUPLE2 => {
                    let b = self.pop()?;
                    let a = self.pop()?;
                    self.tuple(vec![a, b])?
                }
                op::TUPLE3 => {
                    let c = self.pop()?;
                    let b = self.pop()?;
                    let a = self.pop()?;
                    self.tuple(vec![a, b, c])?
                }
                op::LIST => {
                    let items = self.pop_mark()?;
                    let d = self.max_depth(&items);
                    self.push_new(Value::List(items), d)?
                }
                op::DICT => {
                    let items = self.pop_mark()?;
                    let d = self.max_depth(&items);
                    let pairs = self.pairs(items)?;
                    self.push_new(Value::Dict(pairs), d)?
                }
                op::FROZENSET => {
                    let items = self.pop_mark()?;
                    let d = self.max_depth(&items);
                    self.push_new(Value::Set, d)?
                }
                op::APPEND => {
                    let v = self.pop()?;
                    self.append(vec![v])?
                }
                op::APPENDS => {
                    let items = self.pop_mark()?;
                    self.append(items)?
                }
                op::SETITEM => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.set_items(vec![k, v])?
                }
                op::SETITEMS => {
                    let items = self.pop_mark()?;
                    self.set_items(items)?
                }
                op::ADDITEMS => {
                    let items = self.pop_mark()?;
                    let target = self.top()?;
                    if !matches!(self.arena.value(target), Value::Set) {
                        let kind = self.arena.kind(target);
                        return self.fail(format!("ADDITEMS on {kind}"));
                    }
                    let d = self.max_depth(&items);
                    self.deepen(target, d)?
                }
                op::BINPUT => {
                    let i = self.u8()?;
                    self.memo_put(u32::from(i))?
                }
                op::LONG_BINPUT => {
                    let i = self.u32()?;
                    self.memo_put(i)?
                }
                op::MEMOIZE => {
                    let Ok(i) = u32::try_from(self.memo.len()) else {
                        return self.fail("too many pickle memo entries");
                    };
                    self.memo_put(i)?
                }
                op::BINGET => {
                    let i = self.u8()?;
                    self.memo_get(u32::from(i))?
                }
                op::LONG_BINGET => {
                    let i = self.u32()?;
                    self.memo_get(i)?
                }
                op::GLOBAL => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.push_new(Value::Global(Box::new((module.into(), name.into()))), 0)?
                }
                op::STACK_GLOBAL => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Some(m), Some(n)) = (self.arena.str(module), self.arena.str(name)) else {
                        return self.fail("STACK_GLOBAL on values that are not strings");
                    };
                    let value = Value::Global(Box::new((m.into(), n.into())));
                    self.push_new(value, 0)?
                }
                op::REDUCE | op::NEWOBJ => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    self.object(callable, args)?
                }
                op::NEWOBJ_EX => {
                    let _kwargs = self.pop()?;
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    self.object(callable, args)?
                }
                op::BUILD => {
                    let state = self.pop()?;
                    let target = self.top()?;
                    let d = self.arena.depth(state);
                    if let Some(Value::Object { state: s, .. }) = self
                        .arena
                        .nodes
                        .get_mut(target as usize)
                        .map(|n| &mut n.value)
                    {
                        *s = Some(state);
                        self.deepen(target, d)?;
                    }
                    // BUILD on a dict sets attributes (an OrderedDict's `_metadata`),
                    // not items; on other values it has no use here.
                }
                op::BINPERSID => {
                    let pid = self.pop()?;
                    let d = self.arena.depth(pid);
                    self.push_new(Value::PersId(pid), d)?
                }
                other => {
                    return match other_opcode(other) {
                        Some(name) => {
                            self.fail(format!("unsupported pickle opcode 0x{other:02x} ({name})"))
                        }
                        None => self.fail(format!("unknown pickle opcode 0x{other:02x}")),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(data: &[u8]) -> Step<(Arena, Id)> {
        Machine::new(data).run()
    }

    fn fixtures() -> Vec<(PathBuf, &'static str)> {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/original");
        vec![
            (dir.join("brivl_tiny.pth"), "learnable"),
            (dir.join("r2d2_tiny.pth"), "model"),
        ]
    }

    fn flat_f64(t: &Tensor) -> Vec<f64> {
        t.flatten_all()
            .and_then(|t| t.to_dtype(DType::F64))
            .and_then(|t| t.to_vec1::<f64>())
            .unwrap()
    }

    /// Same names, shapes, dtypes and values as candle's reader, with and without the key.
    #[test]
    fn fixtures_match_candle_reader() {
        for (path, key) in fixtures() {
            for k in [Some(key), None] {
                let ours = PthReader::open(&path, k);
                let theirs = candle_core::pickle::PthTensors::new(&path, k).unwrap();
                if theirs.tensor_infos().is_empty() {
                    // Without the key the top level holds no tensors.
                    let ours = ours.unwrap();
                    assert!(ours.tensor_infos().is_empty() && ours.unsupported().is_empty());
                    continue;
                }
                let ours = ours.unwrap();
                assert!(ours.unsupported().is_empty(), "{:?}", ours.unsupported());
                let mut names: Vec<&String> = theirs.tensor_infos().keys().collect();
                names.sort();
                let our_names: Vec<&String> = ours.tensor_infos().keys().collect();
                assert_eq!(names, our_names, "{}", path.display());
                for name in names {
                    let info = &ours.tensor_infos()[name];
                    let other = &theirs.tensor_infos()[name];
                    assert_eq!(info.dtype, other.dtype, "{name}");
                    assert_eq!(info.shape, other.layout.dims(), "{name}");
                    let a = ours.get(name).unwrap().unwrap();
                    let b = theirs.get(name).unwrap().unwrap();
                    assert_eq!(a.dtype(), b.dtype(), "{name}");
                    assert_eq!(a.dims(), b.dims(), "{name}");
                    let (fa, fb) = (flat_f64(&a), flat_f64(&b));
                    assert!(
                        fa.iter().zip(&fb).all(|(x, y)| x.to_bits() == y.to_bits()),
                        "{name}: values differ"
                    );
                }
            }
        }
    }

    #[test]
    fn top_level_keys_are_found_in_one_parse() {
        for (path, key) in fixtures() {
            let found = nested_state_dicts(&path, &["model", "learnable", "state_dict"]).unwrap();
            assert_eq!(found, vec![key.to_string()]);
        }
    }

    #[test]
    fn missing_and_non_dict_keys_are_named() {
        let (path, _) = &fixtures()[0];
        let e = PthReader::open(path, Some("nope")).unwrap_err().to_string();
        assert!(
            e.contains("no key 'nope'") && e.contains("'learnable'"),
            "{e}"
        );
    }

    #[test]
    fn memo_dup_pop_and_marks_follow_python() {
        // PROTO 2, [1, 2] memoised as 0, DUP, POP, MARK, POP_MARK, BINGET 0, TUPLE2, STOP.
        let p = b"\x80\x02]q\x00(K\x01K\x02e20(1h\x00\x86.";
        let (arena, root) = run(p).unwrap();
        let items = arena.seq(root).unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!(items[0], items[1], "memo references share the value");
        let inner = arena.seq(items[0]).unwrap();
        assert_eq!(
            inner.iter().map(|&i| arena.usize(i)).collect::<Vec<_>>(),
            vec![Some(1), Some(2)]
        );
        // LONG1: negative and 8-byte values, and a big one kept opaque.
        let (arena, root) = run(b"\x8a\x01\xff\x8a\x08\x00\x00\x00\x00\x00\x00\x00\x40\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x00\x01\x87.").unwrap();
        let v: Vec<&Value> = arena
            .seq(root)
            .unwrap()
            .iter()
            .map(|&i| arena.value(i))
            .collect();
        assert!(matches!(v[0], Value::Int(-1)));
        assert!(matches!(v[1], Value::Int(x) if *x == 1 << 62));
        assert!(matches!(v[2], Value::BigInt));
        // Protocol 4 strings, STACK_GLOBAL, MEMOIZE, FRAME.
        let p = b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00\x8c\x05torch\x94\x8c\x0cFloatStorage\x94\x93.";
        let (arena, root) = run(p).unwrap();
        assert_eq!(arena.global(root), Some(("torch", "FloatStorage")));
    }

    #[test]
    fn bad_pickles_fail_with_their_offset() {
        for (p, want) in [
            (
                &b"\x80\x02\xff."[..],
                "unknown pickle opcode 0xff at byte 2",
            ),
            (b"\x80\x02\x82\x01.", "opcode 0x82 (EXT1) at byte 2"),
            (b"\x80\x02X\x10\x00\x00\x00abc", "truncated pickle"),
            (b"\x80\x02K\x01", "no STOP"),
            (b"\x80\x02a.", "underflow"),
            (b"\x80\x02(K\x01K\x02s.", "underflow"),
            (b"\x80\x02h\x07.", "memo entry 7 is undefined"),
            (b"\x80\x02K\x01K\x02a.", "APPEND to an int"),
            (b"\x80\x02}(K\x01u.", "odd number"),
            (b"\x80\x02e.", "no MARK"),
        ] {
            let e = run(p).err().unwrap();
            assert!(e.contains(want), "{e} (want {want})");
        }
    }

    #[test]
    fn nesting_is_bounded() {
        let mut p = vec![0x80, 2];
        p.extend(std::iter::repeat_n(b']', 2000));
        p.extend(std::iter::repeat_n(b'a', 1999));
        p.push(b'.');
        let e = run(&p).err().unwrap();
        assert!(e.contains("nesting deeper than 1000 levels"), "{e}");
        // Exactly the bound is fine.
        let mut p = vec![0x80, 2, b')'];
        p.extend(std::iter::repeat_n(0x85, MAX_DEPTH - 1));
        p.push(b'.');
        assert!(run(&p).is_ok());
        p.insert(3, 0x85);
        assert!(run(&p).err().unwrap().contains("nesting"));
        let mut p = vec![0x80, 2];
        p.extend(std::iter::repeat_n(b'(', MAX_DEPTH + 1));
        assert!(run(&p).err().unwrap().contains("nesting deeper"));
    }

    #[test]
    fn values_stay_small() {
        // MAX_VALUES is sized for values of this size.
        assert!(
            std::mem::size_of::<Node>() <= 40,
            "{}",
            std::mem::size_of::<Node>()
        );
    }

    #[test]
    fn extents_are_checked() {
        let e = Extent::of(&[2, 3], &[3, 1], 0, 4).unwrap();
        assert_eq!((e.numel, e.start, e.end, e.out), (6, 0, 24, 24));
        let e = Extent::of(&[3, 2], &[1, 3], 1, 4).unwrap();
        assert_eq!((e.start, e.end), (4, 28));
        let e = Extent::of(&[4, 0], &[1, 1], 99, 4).unwrap();
        assert_eq!((e.numel, e.end), (0, 0));
        assert!(Extent::of(&[1 << 40, 1 << 40], &[1, 1], 0, 4).is_err());
        assert!(Extent::of(&[2, 2], &[usize::MAX, 1], 0, 4).is_err());
        let e = Extent::of(&[], &[], 5, 8).unwrap();
        assert_eq!((e.numel, e.start, e.end), (1, 40, 48));
        assert!(is_contiguous(&[2, 1, 3], &[3, 7, 1]));
        assert!(!is_contiguous(&[3, 2], &[1, 3]));
    }

    #[test]
    fn gather_reads_strided_views() {
        let bytes: Vec<u8> = (0..6u8).collect();
        let t: Vec<u8> = gather(&bytes, &[3, 2], &[1, 3], 6).unwrap();
        assert_eq!(t, vec![0, 3, 1, 4, 2, 5]);
        let t: Vec<u8> = gather(&bytes, &[2, 3], &[0, 1], 6).unwrap();
        assert_eq!(t, vec![0, 1, 2, 0, 1, 2]);
        assert!(gather::<u8>(&bytes, &[7], &[1], 7).is_none());
    }

    /// A minimal zip writer with deflated entries (the `zip` crate here writes only
    /// stored ones).
    fn deflated_zip(entries: &[(&str, &[u8])]) -> Vec<u8> {
        use std::io::Write;
        let mut out = Vec::new();
        let mut central = Vec::new();
        for (name, data) in entries {
            let mut enc =
                flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
            enc.write_all(data).unwrap();
            let comp = enc.finish().unwrap();
            let mut crc = flate2::Crc::new();
            crc.update(data);
            let offset = out.len() as u32;
            let header = |sig: u32, central: bool| {
                let mut h = Vec::new();
                h.extend(sig.to_le_bytes());
                if central {
                    h.extend(20u16.to_le_bytes());
                }
                h.extend(20u16.to_le_bytes());
                h.extend(0u16.to_le_bytes());
                h.extend(8u16.to_le_bytes());
                h.extend(0u32.to_le_bytes());
                h.extend(crc.sum().to_le_bytes());
                h.extend((comp.len() as u32).to_le_bytes());
                h.extend((data.len() as u32).to_le_bytes());
                h.extend((name.len() as u16).to_le_bytes());
                h.extend(0u16.to_le_bytes());
                if central {
                    // Comment length, disk, internal and external attributes.
                    h.extend([0u8; 10]);
                    h.extend(offset.to_le_bytes());
                }
                h.extend(name.as_bytes());
                h
            };
            out.extend(header(0x0403_4b50, false));
            out.extend(&comp);
            central.extend(header(0x0201_4b50, true));
        }
        let cd_offset = out.len() as u32;
        out.extend(&central);
        out.extend(0x0605_4b50u32.to_le_bytes());
        out.extend([0u8; 4]);
        out.extend((entries.len() as u16).to_le_bytes());
        out.extend((entries.len() as u16).to_le_bytes());
        out.extend((central.len() as u32).to_le_bytes());
        out.extend(cd_offset.to_le_bytes());
        out.extend(0u16.to_le_bytes());
        out
    }

    #[test]
    fn deflated_entries_are_read() {
        // {'w': _rebuild_tensor_v2(storage('storage', FloatStorage, '0', 'cpu', 6), 1,
        //  (2, 2), (1, 2), False, OrderedDict())}: the transpose of [[1, 2], [3, 4]] after
        // one element.
        let mut p = b"\x80\x02}(X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n(".to_vec();
        p.extend(b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x06tQ");
        p.extend(b"K\x01(K\x02K\x02t(K\x01K\x02t\x89ccollections\nOrderedDict\n)RtRu.");
        let data: Vec<u8> = [9f32, 1., 3., 2., 4., 0.]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let zip = deflated_zip(&[
            ("ck/data.pkl", &p),
            ("ck/byteorder", b"little"),
            ("ck/data/0", &data),
        ]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.pth");
        std::fs::write(&path, zip).unwrap();
        let r = PthReader::open(&path, None).unwrap();
        let info = &r.tensor_infos()["w"];
        assert_eq!(
            (info.stored, info.storage.as_str(), info.storage_len),
            ("FloatStorage", "ck/data/0", 24)
        );
        let t = r.get("w").unwrap().unwrap();
        assert_eq!(
            t.to_vec2::<f32>().unwrap(),
            vec![vec![1., 2.], vec![3., 4.]]
        );
        assert!(r.get("absent").unwrap().is_none());
    }
}
