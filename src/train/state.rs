//! Crash-safe training checkpoints.
//!
//! A checkpoint is a directory `step-NNNNNNNNN` under the run's checkpoint folder:
//!
//! | file | contents |
//! |---|---|
//! | `model.safetensors` | every var under the model's names (f32 masters for half-precision trained vars); loadable by the inference API |
//! | `optimizer.safetensors` | AdamW `m.{name}`, `v.{name}`, `t.{name}` |
//! | `extra.safetensors` | any named tensors the run adds (MoCo queues and pointers, EMA shadows) |
//! | `meta.json` | [`CheckpointMeta`]: step, data position (one per rank for a data-parallel run), world size, seed, schedule, counters, config, and the list of files with their sizes |
//!
//! **Atomicity.** Everything is written into a temporary directory `.tmp-step-…` in the
//! same folder; each file is fsynced, then the directory, then it is renamed to its final
//! name and the folder is fsynced; then the `latest` pointer file is replaced atomically.
//! A crash or a failed write (a full disk, say) leaves at worst a temporary directory,
//! which loading ignores and removes; the previous checkpoint stays loadable. A step
//! directory counts as complete only when `meta.json` parses and every file it lists has
//! the recorded size. After a save, only the newest `keep_last` complete checkpoints are
//! kept. One writer per folder is assumed: in a data-parallel run
//! [`Fit`](super::fit::Fit) gathers every rank's data position and rank 0 alone writes.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::data::DataPosition;
use super::schedule::Schedule;
use super::trainer::TrainerCounters;
use crate::error::{Error, Result};

/// The checkpoint format version written in `meta.json`.
pub const FORMAT_VERSION: u32 = 1;

/// The metadata of a training checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub format_version: u32,
    /// Optimiser steps completed (the next step's index).
    pub step: u64,
    /// The data loader's position after the last consumed batch (rank 0's in a
    /// data-parallel run; see [`CheckpointMeta::rank_data`]).
    pub data: Option<DataPosition>,
    /// The number of ranks of the run that wrote it: 1 for single-process runs and for
    /// checkpoints written before ranks were recorded.
    #[serde(default = "one_rank")]
    pub world_size: usize,
    /// With several ranks, every rank's data position in rank order (`data` is the first);
    /// empty for a single rank.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rank_data: Vec<DataPosition>,
    /// The run seed (all randomness derives from it and the position).
    pub seed: u64,
    pub schedule: Schedule,
    /// The base learning rate of the last step.
    pub lr: f64,
    pub counters: TrainerCounters,
    /// Optimiser groups (names, multipliers, members) at save time.
    pub groups: Vec<super::optim::GroupSummary>,
    /// The run's own configuration, stored as given.
    pub config: serde_json::Value,
    /// Files of the checkpoint and their sizes in bytes.
    pub files: BTreeMap<String, u64>,
    /// Seconds since the Unix epoch at save time.
    pub created_unix: u64,
    /// The crate version that wrote it.
    pub writer: String,
}

fn one_rank() -> usize {
    1
}

impl CheckpointMeta {
    /// The data position that rank `rank` of a run of `world_size` ranks resumes from.
    /// Fails with [`Error::WorldSizeMismatch`] when the checkpoint was written by a run
    /// with another number of ranks (`path` names the checkpoint in the error).
    pub fn position_for(
        &self,
        rank: usize,
        world_size: usize,
        path: &Path,
    ) -> Result<Option<DataPosition>> {
        if self.world_size != world_size {
            return Err(Error::WorldSizeMismatch {
                path: path.to_path_buf(),
                saved: self.world_size,
                current: world_size,
            });
        }
        if world_size <= 1 {
            return Ok(self.data);
        }
        if self.rank_data.len() != world_size {
            return Err(Error::Checkpoint {
                path: path.to_path_buf(),
                reason: format!(
                    "written by {world_size} ranks but holds {} rank data positions",
                    self.rank_data.len()
                ),
            });
        }
        Ok(self.rank_data.get(rank).copied())
    }
}

/// Everything a run needs to resume.
#[derive(Debug, Clone)]
pub struct TrainCheckpoint {
    pub meta: CheckpointMeta,
    pub weights: BTreeMap<String, Tensor>,
    pub optimizer: BTreeMap<String, Tensor>,
    pub extra: BTreeMap<String, Tensor>,
}

/// A hook called with each file's final path just before it is written; an error aborts
/// the save. Used to inject failures in tests and to observe progress.
pub type WriteHook = Box<dyn Fn(&Path) -> std::io::Result<()> + Send + Sync>;

/// Saves, lists, loads and prunes the checkpoints of one run folder.
pub struct CheckpointManager {
    dir: PathBuf,
    keep_last: usize,
    before_write: Option<WriteHook>,
}

impl std::fmt::Debug for CheckpointManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointManager")
            .field("dir", &self.dir)
            .field("keep_last", &self.keep_last)
            .finish()
    }
}

const LATEST: &str = "latest";
const META: &str = "meta.json";
const TMP_PREFIX: &str = ".tmp-step-";

/// The directory name of the checkpoint after `step` steps.
pub fn step_dir_name(step: u64) -> String {
    format!("step-{step:09}")
}

fn parse_step_dir(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("step-")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn io_err(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let context = format!("{what} {}", path.display());
    move |e| Error::io(context, e)
}

fn fsync_dir(dir: &Path) -> Result<()> {
    match std::fs::File::open(dir) {
        // Some platforms cannot fsync a directory; the data files were synced already.
        Ok(d) => {
            let _ = d.sync_all();
            Ok(())
        }
        Err(e) => Err(Error::io(format!("opening {}", dir.display()), e)),
    }
}

/// Prefix of a step directory being pruned: renamed first, then deleted, so an
/// interrupted prune never leaves a half-deleted `step-…` directory that looks real.
const PRUNE_PREFIX: &str = ".pruned-step-";

/// The pid in a temporary directory name `{prefix}{step}-{pid}-{nonce}`.
fn temp_owner(name: &str) -> Option<u32> {
    let rest = [TMP_PREFIX, PRUNE_PREFIX, ".old-step-"]
        .iter()
        .find_map(|p| name.strip_prefix(p))?;
    rest.split('-').nth(1)?.parse().ok()
}

/// Whether process `pid` is alive (another process than this one, on this machine).
fn process_alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return false;
    }
    #[cfg(unix)]
    {
        // SAFETY: signal 0 sends nothing; it only checks that the pid exists.
        let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
        r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
    }
    #[cfg(not(unix))]
    {
        true
    }
}

/// An exclusive advisory lock on a run directory (`<dir>/.lock`), held until dropped (or
/// the process exits, however it exits). A second run on the same directory fails at once
/// with an error naming the holder's pid, before it touches anything.
#[derive(Debug)]
pub struct RunLock {
    file: std::fs::File,
    path: PathBuf,
}

impl RunLock {
    /// Takes the lock on `dir` (created if missing).
    pub fn acquire(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(io_err("creating run folder", dir))?;
        let path = dir.join(".lock");
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err("opening lock file", &path))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                let holder = holder.trim();
                return Err(Error::Training(format!(
                    "run directory {} is in use by another run (process {}; lock file {}); \
                     wait for it to finish or choose another --out",
                    dir.display(),
                    if holder.is_empty() { "unknown" } else { holder },
                    path.display()
                )));
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(Error::io(format!("locking {}", path.display()), e))
            }
        }
        file.set_len(0)
            .map_err(io_err("writing lock file", &path))?;
        writeln!(file, "{}", std::process::id()).map_err(io_err("writing lock file", &path))?;
        let _ = file.sync_all();
        Ok(Self { file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        let _ = self.file.unlock();
    }
}

impl CheckpointManager {
    /// A manager for `dir` (created if missing) keeping the newest `keep_last` checkpoints
    /// (at least one).
    pub fn new(dir: impl Into<PathBuf>, keep_last: usize) -> Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(io_err("creating checkpoint folder", &dir))?;
        Ok(Self {
            dir,
            keep_last: keep_last.max(1),
            before_write: None,
        })
    }

    /// The run folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Sets a hook run before each file is written (see [`WriteHook`]).
    pub fn set_before_write(&mut self, hook: Option<WriteHook>) {
        self.before_write = hook;
    }

    fn write_file(&self, path: &Path, bytes: &[u8]) -> Result<()> {
        let result = (|| -> std::io::Result<()> {
            if let Some(h) = &self.before_write {
                h(path)?;
            }
            let mut f = std::fs::File::create(path)?;
            f.write_all(bytes)?;
            f.flush()?;
            f.sync_all()
        })();
        result.map_err(|e| Error::io(format!("writing checkpoint file {}", path.display()), e))
    }

    /// Writes `ckpt` as `step-{meta.step}` atomically, points `latest` at it and prunes
    /// older checkpoints. Returns the checkpoint's directory. On error nothing but a
    /// temporary directory (removed here when possible) is left behind.
    pub fn save(&self, ckpt: &TrainCheckpoint) -> Result<PathBuf> {
        let name = step_dir_name(ckpt.meta.step);
        let nonce = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let tmp = self.dir.join(format!(
            "{TMP_PREFIX}{:09}-{}-{nonce}",
            ckpt.meta.step,
            std::process::id()
        ));
        let result = self.save_into(&tmp, &name, ckpt);
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        let final_dir = result?;
        self.prune()?;
        Ok(final_dir)
    }

    fn save_into(&self, tmp: &Path, name: &str, ckpt: &TrainCheckpoint) -> Result<PathBuf> {
        std::fs::create_dir(tmp).map_err(io_err("creating", tmp))?;
        let mut meta = ckpt.meta.clone();
        meta.format_version = FORMAT_VERSION;
        meta.files.clear();
        for (file, tensors) in [
            ("model.safetensors", &ckpt.weights),
            ("optimizer.safetensors", &ckpt.optimizer),
            ("extra.safetensors", &ckpt.extra),
        ] {
            let bytes = serialize(tensors, &tmp.join(file))?;
            self.write_file(&tmp.join(file), &bytes)?;
            meta.files.insert(file.to_string(), bytes.len() as u64);
        }
        let json = serde_json::to_vec_pretty(&meta).map_err(|e| Error::Serialize {
            what: "checkpoint meta".into(),
            reason: e.to_string(),
        })?;
        // meta.json last: a directory with a valid meta has all its files.
        self.write_file(&tmp.join(META), &json)?;
        fsync_dir(tmp)?;
        let final_dir = self.dir.join(name);
        if final_dir.exists() {
            // Saving the same step again (e.g. after a resume): move the old one aside
            // first; rename cannot replace a non-empty directory.
            let old = self
                .dir
                .join(format!(".old-{name}-{}-0", std::process::id()));
            std::fs::rename(&final_dir, &old).map_err(io_err("moving aside", &final_dir))?;
            std::fs::rename(tmp, &final_dir).map_err(io_err("renaming into", &final_dir))?;
            let _ = std::fs::remove_dir_all(&old);
        } else {
            std::fs::rename(tmp, &final_dir).map_err(io_err("renaming into", &final_dir))?;
        }
        fsync_dir(&self.dir)?;
        let latest = self.dir.join(LATEST);
        if let Some(h) = &self.before_write {
            h(&latest).map_err(|e| Error::io(format!("writing {}", latest.display()), e))?;
        }
        crate::checkpoint::write_atomic(&latest, name.as_bytes())?;
        Ok(final_dir)
    }

    /// Complete checkpoints, oldest first, as `(step, directory)`.
    pub fn list(&self) -> Result<Vec<(u64, PathBuf)>> {
        let mut out = Vec::new();
        let rd = std::fs::read_dir(&self.dir).map_err(io_err("listing", &self.dir))?;
        for entry in rd {
            let entry = entry.map_err(io_err("listing", &self.dir))?;
            let name = entry.file_name().to_string_lossy().to_string();
            if let Some(step) = parse_step_dir(&name) {
                let path = entry.path();
                if is_complete(&path) {
                    out.push((step, path));
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Removes temporary directories left by interrupted saves and prunes; returns how
    /// many. A temporary directory is only removed when it is provably stale: the process
    /// that made it (named in it) is no longer running.
    pub fn clean_temp(&self) -> Result<usize> {
        let mut n = 0;
        let rd = std::fs::read_dir(&self.dir).map_err(io_err("listing", &self.dir))?;
        for entry in rd.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            let temporary = name.starts_with(TMP_PREFIX)
                || name.starts_with(PRUNE_PREFIX)
                || name.starts_with(".old-step-");
            if !temporary || temp_owner(&name).is_some_and(process_alive) {
                continue;
            }
            std::fs::remove_dir_all(entry.path()).map_err(io_err("removing", &entry.path()))?;
            n += 1;
        }
        Ok(n)
    }

    /// Makes sure a run that does not resume cannot silently mix with an earlier one in
    /// the same folder: with checkpoints present, `resume` continues them, `overwrite`
    /// deletes them (and the `latest` pointer) first, and neither is an error that says
    /// so. Returns the checkpoints that were deleted.
    pub fn prepare_start(&self, resume: bool, overwrite: bool) -> Result<Vec<PathBuf>> {
        self.clean_temp()?;
        let list = self.list()?;
        if resume || list.is_empty() {
            return Ok(Vec::new());
        }
        if !overwrite {
            let (step, path) = &list[list.len() - 1];
            return Err(Error::Training(format!(
                "{} already holds {} checkpoint(s) (newest: step {step}, {}); pass --resume \
                 to continue that run or --overwrite to delete them and start over",
                self.dir.display(),
                list.len(),
                path.display()
            )));
        }
        let mut removed = Vec::new();
        for (_, p) in &list {
            self.remove_step_dir(p)?;
            removed.push(p.clone());
        }
        let latest = self.dir.join(LATEST);
        if latest.exists() {
            std::fs::remove_file(&latest).map_err(io_err("removing", &latest))?;
        }
        Ok(removed)
    }

    /// Deletes a step directory atomically: it is renamed to a temporary name first (one
    /// rename, so it is either a complete checkpoint or gone), then removed; a leftover of
    /// an interrupted removal is cleaned by [`CheckpointManager::clean_temp`].
    fn remove_step_dir(&self, p: &Path) -> Result<()> {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let step = name.strip_prefix("step-").unwrap_or(&name);
        let aside = self
            .dir
            .join(format!("{PRUNE_PREFIX}{step}-{}-0", std::process::id()));
        std::fs::rename(p, &aside).map_err(io_err("moving aside old checkpoint", p))?;
        fsync_dir(&self.dir)?;
        std::fs::remove_dir_all(&aside).map_err(io_err("removing old checkpoint", &aside))
    }

    /// The newest complete checkpoint directory, cleaning temporary directories first.
    ///
    /// The `latest` pointer is written after the rename, so the newest complete step
    /// directory is always at least as new as the one it names; the pointer is kept for
    /// people and other tools.
    pub fn latest(&self) -> Result<Option<PathBuf>> {
        self.clean_temp()?;
        Ok(self.list()?.pop().map(|(_, p)| p))
    }

    /// The step directory named by the `latest` pointer file, if it is present.
    pub fn latest_pointer(&self) -> Option<String> {
        std::fs::read_to_string(self.dir.join(LATEST))
            .ok()
            .map(|s| s.trim().to_string())
    }

    /// Loads the newest complete checkpoint onto the CPU, if any.
    pub fn load_latest(&self) -> Result<Option<TrainCheckpoint>> {
        match self.latest()? {
            Some(p) => Ok(Some(Self::load(&p)?)),
            None => Ok(None),
        }
    }

    /// Loads a checkpoint directory onto the CPU.
    pub fn load(dir: &Path) -> Result<TrainCheckpoint> {
        let meta = read_meta(dir)?;
        if meta.format_version > FORMAT_VERSION {
            return Err(Error::Checkpoint {
                path: dir.join(META),
                reason: format!(
                    "format version {} is newer than this crate's {FORMAT_VERSION}",
                    meta.format_version
                ),
            });
        }
        let load = |file: &str| -> Result<BTreeMap<String, Tensor>> {
            let path = dir.join(file);
            let map = candle_core::safetensors::load(&path, &Device::Cpu).map_err(|e| {
                Error::Checkpoint {
                    path: path.clone(),
                    reason: format!("cannot read: {e}"),
                }
            })?;
            Ok(map.into_iter().collect())
        };
        Ok(TrainCheckpoint {
            weights: load("model.safetensors")?,
            optimizer: load("optimizer.safetensors")?,
            extra: load("extra.safetensors")?,
            meta,
        })
    }

    /// Keeps the newest `keep_last` complete checkpoints and deletes the others.
    pub fn prune(&self) -> Result<Vec<PathBuf>> {
        let list = self.list()?;
        let mut removed = Vec::new();
        if list.len() > self.keep_last {
            for (_, p) in &list[..list.len() - self.keep_last] {
                self.remove_step_dir(p)?;
                removed.push(p.clone());
            }
        }
        Ok(removed)
    }
}

fn serialize(tensors: &BTreeMap<String, Tensor>, path: &Path) -> Result<Vec<u8>> {
    let mut prepared = Vec::with_capacity(tensors.len());
    for (k, t) in tensors {
        prepared.push((k.clone(), t.to_device(&Device::Cpu)?.contiguous()?));
    }
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    safetensors::tensor::serialize(prepared.iter().map(|(k, t)| (k.as_str(), t)), Some(meta))
        .map_err(|e| Error::Checkpoint {
            path: path.to_path_buf(),
            reason: format!("cannot serialise: {e}"),
        })
}

fn read_meta(dir: &Path) -> Result<CheckpointMeta> {
    let path = dir.join(META);
    let s = std::fs::read_to_string(&path).map_err(io_err("reading", &path))?;
    serde_json::from_str(&s).map_err(|e| Error::parse(path.display().to_string(), e))
}

/// Whether a step directory holds a parseable meta and every file it lists, at the
/// recorded size.
pub fn is_complete(dir: &Path) -> bool {
    let Ok(meta) = read_meta(dir) else {
        return false;
    };
    !meta.files.is_empty()
        && meta.files.iter().all(|(f, size)| {
            std::fs::metadata(dir.join(f))
                .map(|m| m.is_file() && m.len() == *size)
                .unwrap_or(false)
        })
}

impl super::trainer::Trainer {
    /// Captures the trainer's state (weights, optimiser, counters) plus the data position,
    /// extra tensors and the run's configuration as a checkpoint.
    pub fn checkpoint(
        &self,
        data: Option<DataPosition>,
        extra: BTreeMap<String, Tensor>,
        config: serde_json::Value,
    ) -> Result<TrainCheckpoint> {
        let opt = self.optimizer();
        let counters = self.counters();
        Ok(TrainCheckpoint {
            meta: CheckpointMeta {
                format_version: FORMAT_VERSION,
                step: counters.step,
                data,
                world_size: 1,
                rank_data: Vec::new(),
                seed: self.config().seed,
                schedule: self.config().schedule,
                lr: self.lr_at(counters.step.saturating_sub(1)),
                counters,
                groups: opt.groups(),
                config,
                files: BTreeMap::new(),
                created_unix: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
                writer: format!("tuwen {}", env!("CARGO_PKG_VERSION")),
            },
            weights: opt.weights()?,
            optimizer: opt.state_tensors()?,
            extra,
        })
    }

    /// Restores weights, optimiser state and counters from a checkpoint. Fails, naming
    /// the tensor, when the checkpoint does not match the model or the freezing rules, and
    /// when it was written with another seed (the resumed randomness would differ). The
    /// data position and extra tensors are the caller's to restore ([`super::Fit`] does).
    pub fn restore(&mut self, ckpt: &TrainCheckpoint) -> Result<()> {
        if ckpt.meta.seed != self.config().seed {
            return Err(Error::StateMismatch(format!(
                "checkpoint at step {} was written with seed {}, this run uses seed {}",
                ckpt.meta.step,
                ckpt.meta.seed,
                self.config().seed
            )));
        }
        let origin = format!("checkpoint step {}", ckpt.meta.step);
        let opt = self.optimizer_mut();
        opt.load_weights(&ckpt.weights, &origin)?;
        opt.load_state_tensors(&ckpt.optimizer, &origin)?;
        self.set_counters(ckpt.meta.counters);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_dir_names() {
        assert_eq!(step_dir_name(123), "step-000000123");
        assert_eq!(parse_step_dir("step-000000123"), Some(123));
        assert_eq!(parse_step_dir("step-"), None);
        assert_eq!(parse_step_dir("step-12a"), None);
        assert_eq!(parse_step_dir(".tmp-step-1"), None);
    }
}
