//! Checkpoint reading and writing.
//!
//! * [`TensorSource`] reads `.safetensors` (memory-mapped, sharded or not) and PyTorch `.pth`
//!   zip archives (optionally selecting a key such as `'model'` or `'learnable'`), all in
//!   pure Rust; [`pth`] is the bounded reader of the latter, which names every tensor it
//!   cannot read.
//! * [`Loader`] turns a source into a [`candle_nn::VarBuilder`] that checks every tensor the
//!   model asks for: a missing tensor or a wrong shape becomes a typed [`Error`] that names
//!   the key and both shapes, and after construction [`Loader::finish`] reports the keys the
//!   model did not use.
//! * [`save_safetensors`] writes atomically (temporary file, fsync, rename), so an
//!   interrupted save never damages the previous file.
//! * [`discover`] finds out which model family a file or directory holds and where its
//!   weights and configuration are; [`pattern`] matches parameter names (freezing,
//!   parameter groups, which tensors a [`Loader`] makes trainable).

pub mod convert;
pub mod discover;
#[cfg(feature = "hub")]
pub mod hub;
pub mod pattern;
pub mod pth;
mod report;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{VarBuilder, VarMap};

use crate::error::{Error, Result};
use crate::nn::linear::{inference_layout, is_weight_hint};

pub use self::discover::Family;
pub use self::pattern::Patterns;

/// Where tensors come from.
pub enum TensorSource {
    /// One or more memory-mapped safetensors files.
    Safetensors(candle_core::safetensors::MmapedSafetensors),
    /// A PyTorch zip checkpoint.
    Pth(pth::PthReader),
    /// Tensors already in memory.
    Map(HashMap<String, Tensor>),
}

impl std::fmt::Debug for TensorSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TensorSource::Safetensors(_) => f.write_str("TensorSource::Safetensors"),
            TensorSource::Pth(_) => f.write_str("TensorSource::Pth"),
            TensorSource::Map(m) => write!(f, "TensorSource::Map({} tensors)", m.len()),
        }
    }
}

/// Reads a safetensors file, mapping every failure to a [`Error::Checkpoint`] that names it.
pub fn open_safetensors(paths: &[PathBuf]) -> Result<TensorSource> {
    for p in paths {
        check_file(p)?;
    }
    // SAFETY: the files are opened read-only; as with every mmap, modifying them while the
    // mapping is alive is undefined behaviour, which the docs of the loaders point out.
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(paths) }.map_err(|e| {
        Error::Checkpoint {
            path: paths.first().cloned().unwrap_or_default(),
            reason: format!("not a valid safetensors file ({e})"),
        }
    })?;
    Ok(TensorSource::Safetensors(st))
}

/// Reads a PyTorch zip checkpoint; `key` selects a nested state dict such as `"model"`.
/// Tensors that cannot be read are listed by [`TensorSource::unsupported`]; a state dict
/// with no tensor at all is an error.
pub fn open_pth(path: &Path, key: Option<&str>) -> Result<TensorSource> {
    check_file(path)?;
    let pth = pth::PthReader::open(path, key)?;
    if pth.tensor_infos().is_empty() && pth.unsupported().is_empty() {
        return Err(Error::Checkpoint {
            path: path.to_path_buf(),
            reason: match key {
                Some(k) => format!("no tensors under key '{k}'"),
                None => "no tensors found".into(),
            },
        });
    }
    Ok(TensorSource::Pth(pth))
}

/// The keys under which PyTorch checkpoints nest their state dict, in the order they are
/// looked for.
pub const NESTED_STATE_DICT_KEYS: &[&str] = &["model", "learnable", "state_dict", "module"];

/// Lists the top-level keys of a PyTorch zip checkpoint whose value is a dict of tensors
/// (readable or not), among [`NESTED_STATE_DICT_KEYS`] and in their order. An empty result
/// means the top level is a state dict (or no dict at all). The file is parsed once.
pub fn pth_top_level_keys(path: &Path) -> Result<Vec<String>> {
    check_file(path)?;
    pth::nested_state_dicts(path, NESTED_STATE_DICT_KEYS)
}

fn check_file(path: &Path) -> Result<()> {
    let meta =
        std::fs::metadata(path).map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    if !meta.is_file() {
        return Err(Error::Checkpoint {
            path: path.to_path_buf(),
            reason: "not a regular file".into(),
        });
    }
    if meta.len() == 0 {
        return Err(Error::Checkpoint {
            path: path.to_path_buf(),
            reason: "the file is empty".into(),
        });
    }
    Ok(())
}

impl TensorSource {
    /// Opens a checkpoint by its extension: `.safetensors`, or `.pth`/`.pt`/`.bin` (zip).
    pub fn open(path: &Path, pth_key: Option<&str>) -> Result<Self> {
        if discover::is_safetensors(path) {
            open_safetensors(&[path.to_path_buf()])
        } else if discover::is_pth(path) {
            open_pth(path, pth_key)
        } else {
            Err(Error::Checkpoint {
                path: path.to_path_buf(),
                reason: "unknown checkpoint extension (expected .safetensors or .pth)".into(),
            })
        }
    }

    /// Every tensor name with its shape.
    pub fn shapes(&self) -> BTreeMap<String, Vec<usize>> {
        match self {
            TensorSource::Safetensors(st) => st
                .tensors()
                .into_iter()
                .map(|(k, v)| (k, v.shape().to_vec()))
                .collect(),
            TensorSource::Pth(p) => p
                .tensor_infos()
                .iter()
                .map(|(k, v)| (k.clone(), v.shape.clone()))
                .collect(),
            TensorSource::Map(m) => m
                .iter()
                .map(|(k, v)| (k.clone(), v.dims().to_vec()))
                .collect(),
        }
    }

    /// Whether a tensor of this name exists. A `.pth` tensor that cannot be read (see
    /// [`TensorSource::unsupported`]) exists: loading it is an error that says why.
    pub fn contains(&self, name: &str) -> bool {
        match self {
            TensorSource::Safetensors(st) => st.get(name).is_ok(),
            TensorSource::Pth(p) => {
                p.tensor_infos().contains_key(name) || p.unsupported_reason(name).is_some()
            }
            TensorSource::Map(m) => m.contains_key(name),
        }
    }

    /// The tensors of a `.pth` that cannot be read, `(name, reason)`: a dtype candle has no
    /// type for, a view beyond its storage, a quantized or sparse tensor. Empty for the
    /// other sources. [`TensorSource::shapes`] leaves them out.
    pub fn unsupported(&self) -> Vec<(String, String)> {
        match self {
            TensorSource::Pth(p) => p.unsupported().to_vec(),
            TensorSource::Safetensors(_) | TensorSource::Map(_) => Vec::new(),
        }
    }

    /// Loads one tensor onto the CPU in its stored dtype: `Ok(None)` when there is no
    /// tensor of that name, an error naming it when it exists but cannot be read.
    pub fn load(&self, name: &str) -> candle_core::Result<Option<Tensor>> {
        match self {
            TensorSource::Safetensors(st) => match st.get(name) {
                Ok(v) => Ok(Some(candle_core::safetensors::Load::load(
                    &v,
                    &Device::Cpu,
                )?)),
                Err(_) => Ok(None),
            },
            TensorSource::Pth(p) => p.get(name).map_err(|e| match e {
                // The reason names the tensor; the caller knows the file.
                Error::Checkpoint { reason, .. } => candle_core::Error::Msg(reason),
                other => candle_core::Error::Msg(other.to_string()),
            }),
            TensorSource::Map(m) => Ok(m.get(name).cloned()),
        }
    }

    /// Loads every tensor (used by the converter and by tests).
    pub fn load_all(&self) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        for name in self.shapes().into_keys() {
            if let Some(t) = self.load(&name)? {
                out.insert(name, t);
            }
        }
        Ok(out)
    }
}

/// What a [`Loader`] found after a model was built from it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Keys in the checkpoint that the model did not read and that no ignore rule covers.
    pub unexpected: Vec<String>,
    /// Keys the model did not read but that an ignore rule says are expected to be unused
    /// (optimiser state, `position_ids`, unused embedding tables, ...).
    pub ignored: Vec<String>,
    /// Number of tensors read.
    pub loaded: usize,
}

struct Checked {
    source: TensorSource,
    source_name: String,
    /// Maps the model's tensor name to the checkpoint's key.
    rename: Box<dyn Fn(&str) -> String + Send + Sync>,
    used: Mutex<HashSet<String>>,
    problem: Arc<Mutex<Option<Error>>>,
    vars: Option<VarMap>,
    /// With `vars`: only names matching these track gradients (all when `None`).
    tracked: Option<Patterns>,
}

/// Whether `name` is a normalisation buffer (running statistics), which never trains.
pub fn is_buffer(name: &str) -> bool {
    name.ends_with("running_mean")
        || name.ends_with("running_var")
        || name.ends_with("num_batches_tracked")
}

impl Checked {
    fn record(&self, e: Error) -> candle_core::Error {
        let msg = e.to_string();
        if let Ok(mut p) = self.problem.lock() {
            if p.is_none() {
                *p = Some(e);
            }
        }
        candle_core::Error::Msg(msg)
    }

    /// Reads `name` (checked against `shape` when given). `linear_weight`: the model asked
    /// for it as a linear layer's weight (see [`crate::nn::linear::WEIGHT_HINT`]); without
    /// variables it is then stored in [`crate::nn::linear::inference_layout`].
    fn fetch(
        &self,
        name: &str,
        shape: Option<&Shape>,
        linear_weight: bool,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let key = (self.rename)(name);
        let tensor = match self.source.load(&key) {
            Ok(Some(t)) => t,
            Ok(None) => {
                return Err(self.record(Error::MissingTensor {
                    source_name: self.source_name.clone(),
                    key,
                    expected: shape.map(|s| s.dims().to_vec()).unwrap_or_default(),
                }))
            }
            Err(e) => {
                let e = e.to_string();
                // A `.pth` reader's reason already names the tensor.
                let reason = match e.strip_prefix(&format!("tensor `{key}`: ")) {
                    Some(why) => format!("cannot read tensor `{key}`: {why}"),
                    None => format!("cannot read tensor `{key}`: {e}"),
                };
                return Err(self.record(Error::Checkpoint {
                    path: PathBuf::from(&self.source_name),
                    reason,
                }));
            }
        };
        if let Some(shape) = shape {
            if tensor.shape() != shape {
                return Err(self.record(Error::ShapeMismatch {
                    source_name: self.source_name.clone(),
                    key,
                    expected: shape.dims().to_vec(),
                    found: tensor.dims().to_vec(),
                }));
            }
        }
        if let Ok(mut used) = self.used.lock() {
            used.insert(key.clone());
        }
        let tensor = tensor.to_dtype(dtype)?.to_device(dev)?;
        match &self.vars {
            None if linear_weight => inference_layout(tensor),
            None => Ok(tensor),
            Some(vars) => {
                let mut data = vars
                    .data()
                    .lock()
                    .map_err(|_| candle_core::Error::Msg("var map poisoned".into()))?;
                let tracked =
                    !is_buffer(name) && self.tracked.as_ref().is_none_or(|p| p.matches(name));
                let var = match data.get(name) {
                    Some(v) => v.clone(),
                    None => {
                        let v = Var::from_tensor(&tensor)?;
                        data.insert(name.to_string(), v.clone());
                        v
                    }
                };
                // A frozen tensor shares the var's storage (so restoring a checkpoint
                // reaches the model) but records no gradient: backward skips it.
                Ok(if tracked {
                    var.as_tensor().clone()
                } else {
                    var.as_detached_tensor()
                })
            }
        }
    }
}

impl SimpleBackend for Checked {
    fn get(
        &self,
        s: Shape,
        name: &str,
        hint: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.fetch(name, Some(&s), is_weight_hint(&hint), dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.fetch(name, None, false, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.source.contains(&(self.rename)(name))
    }
}

/// Builds models from a [`TensorSource`] with strict, typed checks.
///
/// ```no_run
/// # use tuwen::checkpoint::{Loader, TensorSource};
/// # fn main() -> tuwen::Result<()> {
/// let src = TensorSource::open("model.safetensors".as_ref(), None)?;
/// let loader = Loader::new(src, "model.safetensors");
/// let vb = loader.var_builder(candle_core::DType::F32, &candle_core::Device::Cpu);
/// // let model = Model::new(&cfg, vb).map_err(|e| loader.error(e))?;
/// let report = loader.finish(&[]);
/// # Ok(()) }
/// ```
pub struct Loader {
    inner: Arc<Checked>,
}

impl Loader {
    /// A loader reading `source`, described as `source_name` in errors.
    pub fn new(source: TensorSource, source_name: impl Into<String>) -> Self {
        Self::with_rename(source, source_name, |s| s.to_string())
    }

    /// A loader whose model names are mapped to checkpoint keys by `rename`.
    pub fn with_rename(
        source: TensorSource,
        source_name: impl Into<String>,
        rename: impl Fn(&str) -> String + Send + Sync + 'static,
    ) -> Self {
        Self {
            inner: Arc::new(Checked {
                source,
                source_name: source_name.into(),
                rename: Box::new(rename),
                used: Mutex::new(HashSet::new()),
                problem: Arc::new(Mutex::new(None)),
                vars: None,
                tracked: None,
            }),
        }
    }

    /// Makes every loaded tensor a trainable [`Var`], collected in the returned [`VarMap`]
    /// under the model's names. Call it before [`Loader::var_builder`].
    pub fn trainable(mut self) -> Result<(Self, VarMap)> {
        let vars = VarMap::new();
        match Arc::get_mut(&mut self.inner) {
            Some(c) => c.vars = Some(vars.clone()),
            None => {
                return Err(Error::InvalidArgument(
                    "Loader::trainable must be called before var_builder".into(),
                ))
            }
        }
        Ok((self, vars))
    }

    /// Like [`Loader::trainable`], but only tensors whose model name matches `patterns`
    /// (and is not a normalisation buffer) track gradients. The others are still in the
    /// [`VarMap`] (so checkpoints hold the whole model and restoring reaches them) but the
    /// model sees them as constants: backward passes never compute their gradients, and
    /// inference kernels (fused ops, folded BatchNorm) stay available for them.
    pub fn trainable_matching(mut self, patterns: Patterns) -> Result<(Self, VarMap)> {
        let vars = VarMap::new();
        match Arc::get_mut(&mut self.inner) {
            Some(c) => {
                c.vars = Some(vars.clone());
                c.tracked = Some(patterns);
            }
            None => {
                return Err(Error::InvalidArgument(
                    "Loader::trainable_matching must be called before var_builder".into(),
                ))
            }
        }
        Ok((self, vars))
    }

    /// The source this loader reads.
    pub fn source(&self) -> &TensorSource {
        &self.inner.source
    }

    /// A var builder over the checked source.
    ///
    /// Without [`Loader::trainable`] it builds an inference model: the weights of linear
    /// layers are copied into [`crate::nn::linear::inference_layout`] on the CPU in `f32`, so
    /// the model does not share their storage with the source's tensors.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(
            Box::new(SharedChecked(self.inner.clone())),
            dtype,
            device.clone(),
        )
    }

    /// Converts a construction error into the typed error recorded while loading, if any.
    pub fn error(&self, e: impl Into<Error>) -> Error {
        if let Ok(mut p) = self.inner.problem.lock() {
            if let Some(problem) = p.take() {
                return problem;
            }
        }
        e.into()
    }

    /// Reports the keys the model did not read. Keys matching any of `ignore` (substring
    /// match, or a prefix when the pattern ends with `*`) are listed as ignored.
    pub fn finish(&self, ignore: &[&str]) -> LoadReport {
        let used = self
            .inner
            .used
            .lock()
            .map(|u| u.clone())
            .unwrap_or_default();
        let mut report = LoadReport {
            loaded: used.len(),
            ..LoadReport::default()
        };
        for key in self.inner.source.shapes().into_keys() {
            if used.contains(&key) {
                continue;
            }
            if ignore.iter().any(|pat| matches_pattern(&key, pat)) {
                report.ignored.push(key);
            } else {
                report.unexpected.push(key);
            }
        }
        report
    }

    /// Builds an inference model with `build` from a [`Loader::var_builder`] in `dtype` on
    /// `device`: the typed error of a missing or misshapen tensor, or the model with the
    /// report of [`Loader::finish`] for `ignore`.
    pub fn build_model<M>(
        &self,
        dtype: DType,
        device: &Device,
        ignore: &[&str],
        build: impl FnOnce(VarBuilder<'static>) -> candle_core::Result<M>,
    ) -> Result<(M, LoadReport)> {
        let model = build(self.var_builder(dtype, device)).map_err(|e| self.error(e))?;
        Ok((model, self.finish(ignore)))
    }
}

/// Substring match, or prefix match when `pat` ends with `*`.
pub fn matches_pattern(key: &str, pat: &str) -> bool {
    match pat.strip_suffix('*') {
        Some(prefix) => key.starts_with(prefix),
        None => key.contains(pat),
    }
}

struct SharedChecked(Arc<Checked>);

impl SimpleBackend for SharedChecked {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0.get(s, name, h, dtype, dev)
    }
    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.0.get_unchecked(name, dtype, dev)
    }
    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains_tensor(name)
    }
}

/// Writes tensors to a safetensors file atomically: the data goes to a temporary file in
/// the same directory, is flushed and fsynced, then renamed over `path`. If anything fails
/// (a full disk, say), the temporary file is removed and `path` is left as it was.
pub fn save_safetensors(
    tensors: &BTreeMap<String, Tensor>,
    metadata: Option<HashMap<String, String>>,
    path: &Path,
) -> Result<()> {
    let mut prepared = Vec::with_capacity(tensors.len());
    for (k, t) in tensors {
        // Views need contiguous CPU data.
        let t = t.to_device(&Device::Cpu)?.contiguous()?;
        prepared.push((k.clone(), t));
    }
    let bytes =
        safetensors::tensor::serialize(prepared.iter().map(|(k, t)| (k.as_str(), t)), metadata)
            .map_err(|e| Error::Checkpoint {
                path: path.to_path_buf(),
                reason: format!("cannot serialise: {e}"),
            })?;
    write_atomic(path, &bytes)
}

/// Writes `bytes` to `path` atomically (temporary file, fsync, rename, directory fsync).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| Error::InvalidArgument(format!("{} has no file name", path.display())))?
        .to_string_lossy()
        .to_string();
    let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.flush()?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = std::fs::File::open(&dir) {
            // Not every platform can fsync a directory; the rename already happened.
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(format!("writing {}", path.display()), e));
    }
    Ok(())
}

/// A backend that hands out cheap broadcast zeros and records every requested name and
/// shape, so that a full-size model's parameter list can be read without its weights.
struct Recorder(Arc<Mutex<BTreeMap<String, Vec<usize>>>>);

impl SimpleBackend for Recorder {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        if let Ok(mut m) = self.0.lock() {
            m.insert(name.to_string(), s.dims().to_vec());
        }
        Tensor::zeros(1, dtype, dev)?
            .reshape(vec![1; s.rank()])?
            .broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("shape recorder cannot serve `{name}` without a shape")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// Builds a model with `build` on a recording backend and returns every parameter name
/// the model asked for, with its shape. No weight memory is allocated.
pub fn parameter_shapes<T>(
    build: impl FnOnce(VarBuilder<'static>) -> candle_core::Result<T>,
) -> Result<BTreeMap<String, Vec<usize>>> {
    let seen = Arc::new(Mutex::new(BTreeMap::new()));
    let vb = VarBuilder::from_backend(Box::new(Recorder(seen.clone())), DType::F32, Device::Cpu);
    build(vb)?;
    let map = seen.lock().map(|m| m.clone()).unwrap_or_default();
    Ok(map)
}

/// A backend that creates seeded random weights (normal, std 0.02; ones for norm scales)
/// for benchmarks and tests that need a real-size model without a checkpoint.
struct RandomInit {
    seed: u64,
    counter: Mutex<u64>,
}

impl SimpleBackend for RandomInit {
    fn get(
        &self,
        s: Shape,
        name: &str,
        hint: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let n = {
            let mut c = self
                .counter
                .lock()
                .map_err(|_| candle_core::Error::Msg("poisoned".into()))?;
            *c += 1;
            *c
        };
        let is_norm_scale =
            (name.contains("norm") || name.contains("LayerNorm")) && name.ends_with("weight");
        if is_norm_scale {
            return Tensor::ones(s, dtype, dev);
        }
        // A cheap, seeded generator so that benches are reproducible.
        let mut state = self.seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let count = s.elem_count();
        let mut data = Vec::with_capacity(count);
        for _ in 0..count {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            // Uniform in [-1, 1) scaled to std 0.02.
            let u = (state >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0;
            data.push((u * 0.02 * 3f64.sqrt()) as f32);
        }
        let t = Tensor::from_vec(data, s, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(dev)?;
        if is_weight_hint(&hint) {
            inference_layout(t)
        } else {
            Ok(t)
        }
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random init cannot serve `{name}` without a shape")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// A var builder that fills every parameter with seeded random values (plain tensors,
/// not trainable variables), for benchmarks at real sizes.
pub fn random_var_builder(seed: u64, dtype: DType, device: &Device) -> VarBuilder<'static> {
    VarBuilder::from_backend(
        Box::new(RandomInit {
            seed: seed.max(1),
            counter: Mutex::new(0),
        }),
        dtype,
        device.clone(),
    )
}
