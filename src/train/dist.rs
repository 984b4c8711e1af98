//! Data parallelism: collectives behind a small trait, an in-process CPU backend, an NCCL
//! backend (feature `nccl`), and an all-gather whose backward pass is exact.
//!
//! Every worker (rank) holds a full copy of the model and trains on its own shard of the
//! data. Three things make `N` workers with micro-batch `b` behave like one worker with
//! batch `N·b`:
//!
//! 1. the parameters are broadcast from rank 0 before the first step
//!    ([`crate::train::Trainer::set_collective`]);
//! 2. after gradient accumulation the gradients are summed over the ranks and divided by
//!    `N` ([`all_reduce_grads`]), before the global-norm clip and the optimiser step, so
//!    every rank takes the same step;
//! 3. losses that compare every sample with every other (InfoNCE, SigLIP's sigmoid loss)
//!    see the features of all ranks through [`all_gather_with_grad`], whose backward
//!    all-reduces the incoming gradient and keeps this rank's rows, like
//!    `torch.distributed.nn.all_gather`. A loss written as "my rows × all columns,
//!    averaged over my rows" then gives, after the averaging of step 2, exactly the
//!    gradient of the single-worker loss.
//!
//! Backends:
//!
//! * [`LocalGroup`]: one thread per worker in one process, exchanging tensors through
//!   shared memory. For tests (it proves the equivalence above) and multi-worker CPU runs.
//! * `NcclGroup` (feature `nccl`): one process per GPU. See below.
//!
//! Collectives are matched by call order: all ranks must issue the same collectives in the
//! same order with the same shapes (the same model, the same loss, equal batch sizes;
//! use `drop_last` in the data loader). [`LocalGroup`] checks this and reports a mismatch
//! as an error; NCCL would hang or produce garbage.
//!
//! # Launching on several GPUs (NCCL)
//!
//! Build with `--features nccl` (which implies `cuda`; NCCL itself, `libnccl.so.2`, is
//! loaded at run time). Start one process per GPU with the environment variables
//!
//! * `RANK`: this process's rank, `0..WORLD_SIZE`;
//! * `WORLD_SIZE`: the number of processes;
//! * `LOCAL_RANK`: the GPU ordinal on this machine (default: `RANK`);
//! * `TUWEN_NCCL_ID`: a path every process can read (a shared file system for several
//!   machines). Rank 0 creates the NCCL unique id and writes it there; the other ranks
//!   wait for the file. Delete a stale file before a new run.
//!
//! ```text
//! # one machine, 4 GPUs
//! rm -f /tmp/tuwen-nccl.id
//! for r in 0 1 2 3; do
//!   RANK=$r WORLD_SIZE=4 LOCAL_RANK=$r TUWEN_NCCL_ID=/tmp/tuwen-nccl.id \
//!     ./target/release/examples/train_siglip2 --model ckpt/siglip2 --train data.jsonl \
//!     --out runs/zh --nccl &
//! done; wait
//! ```
//!
//! and in the program `NcclGroup::from_env()` gives the collective and the rank's device.
//! Only rank 0 should write checkpoints and logs; every rank loads the same checkpoint on
//! resume (`examples/train_siglip2.rs` does both).

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Storage, Tensor, Var};

use super::optim::Grads;
use crate::error::{Error, Result};

/// The collectives data-parallel training needs. Implementations are handles of one rank
/// of a group; every rank calls the same methods in the same order.
pub trait Collective: Send + Sync + std::fmt::Debug {
    /// This worker's rank in `0..world_size()`.
    fn rank(&self) -> usize;
    /// The number of workers.
    fn world_size(&self) -> usize;
    /// The element-wise sum of `x` over all ranks (same shape and dtype on every rank).
    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor>;
    /// The tensors of all ranks concatenated along dimension 0, in rank order (same shape
    /// on every rank). The result carries no gradient; see [`all_gather_with_grad`].
    fn all_gather(&self, x: &Tensor) -> Result<Tensor>;
    /// Rank `root`'s `x` on every rank (`x` gives the shape and dtype on the others).
    fn broadcast(&self, x: &Tensor, root: usize) -> Result<Tensor>;
    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<()>;
}

/// Whether `c` is absent or a group of one (no communication needed).
pub fn is_single(c: Option<&Arc<dyn Collective>>) -> bool {
    c.is_none_or(|c| c.world_size() == 1)
}

// ---------------------------------------------------------------------------------------
// all_gather_with_grad
// ---------------------------------------------------------------------------------------

/// The backward of the gathered features: all-reduce the gradient, keep this rank's rows.
struct GatherWithGrad {
    gathered: Tensor,
    comm: Arc<dyn Collective>,
    offset: usize,
    rows: usize,
}

impl CustomOp1 for GatherWithGrad {
    fn name(&self) -> &'static str {
        "all-gather-with-grad"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (storage, _) = self.gathered.storage_and_layout();
        match &*storage {
            Storage::Cpu(s) => Ok((s.clone(), self.gathered.shape().clone())),
            _ => candle_core::bail!("all-gather-with-grad: the gathered tensor is not on the CPU"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (storage, layout) = self.gathered.storage_and_layout();
        match &*storage {
            Storage::Cuda(s) => Ok((
                candle_core::backend::BackendStorage::try_clone(s, layout)?,
                self.gathered.shape().clone(),
            )),
            _ => candle_core::bail!("all-gather-with-grad: the gathered tensor is not on CUDA"),
        }
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let summed = self
            .comm
            .all_reduce_sum(grad)
            .map_err(candle_core::Error::wrap)?;
        Ok(Some(summed.narrow(0, self.offset, self.rows)?))
    }
}

/// All-gathers `x` (`[b, …]` on every rank) into `[N·b, …]` in rank order, recording a
/// backward pass: the gradient of the result is summed over all ranks and this rank's
/// `b` rows flow back into `x` (as `torch.distributed.nn.all_gather` does).
///
/// With a loss `L_r` per rank computed from the gathered tensor, every rank's `x` then
/// receives `∂(Σ_r L_r)/∂x`, exactly what one process computing all `L_r` would give.
/// A group of one returns `x` itself.
pub fn all_gather_with_grad(x: &Tensor, comm: &Arc<dyn Collective>) -> Result<Tensor> {
    if comm.world_size() == 1 {
        return Ok(x.clone());
    }
    if x.rank() == 0 {
        return Err(Error::InvalidArgument(
            "all_gather_with_grad needs a tensor with a leading dimension".into(),
        ));
    }
    let rows = x.dim(0)?;
    // A fresh contiguous tensor at offset 0: the custom op hands its storage out as is.
    let gathered = comm.all_gather(&x.detach())?.force_contiguous()?;
    if gathered.dim(0)? != rows * comm.world_size() {
        return Err(Error::Collective(format!(
            "all_gather returned {} rows for {} ranks of {rows}",
            gathered.dim(0)?,
            comm.world_size()
        )));
    }
    if !x.track_op() {
        return Ok(gathered);
    }
    Ok(x.apply_op1(GatherWithGrad {
        gathered,
        comm: comm.clone(),
        offset: comm.rank() * rows,
        rows,
    })?)
}

// ---------------------------------------------------------------------------------------
// Gradients and parameters
// ---------------------------------------------------------------------------------------

/// Elements per all-reduce call when gradients are flattened into buckets.
pub const GRAD_BUCKET_ELEMS: usize = 1 << 25;

/// Sums `grads` over all ranks and divides by the world size (DDP's averaging), in
/// buckets of at most [`GRAD_BUCKET_ELEMS`] elements. `vars` are the trained parameters
/// in the order of `grads` ([`crate::train::AdamW::trained`]).
///
/// A parameter without a gradient on some ranks counts as zero there; it stays without a
/// gradient (untouched by the optimiser) only when no rank has one. Gradients are reduced
/// in f32, or f64 when any of them is f64.
pub fn all_reduce_grads(grads: &mut Grads, vars: &[Var], comm: &dyn Collective) -> Result<()> {
    let world = comm.world_size();
    if world == 1 {
        return Ok(());
    }
    if vars.len() != grads.grads.len() {
        return Err(Error::Collective(format!(
            "all_reduce_grads: {} parameters for {} gradients",
            vars.len(),
            grads.grads.len()
        )));
    }
    let Some(first) = vars.first() else {
        return Ok(());
    };
    let device = first.device().clone();
    let device = &device;
    let dtype = if vars.iter().any(|v| v.dtype() == DType::F64) {
        DType::F64
    } else {
        DType::F32
    };
    let world = world as f64;
    let shapes: Vec<&[usize]> = vars.iter().map(|v| v.dims()).collect();
    let n = shapes.len();
    let mut start = 0;
    while start < n {
        // [start, end): at least one parameter, at most GRAD_BUCKET_ELEMS elements.
        let mut end = start;
        let mut elems = 0;
        while end < n {
            let e: usize = shapes[end].iter().product();
            if end > start && elems + e > GRAD_BUCKET_ELEMS {
                break;
            }
            elems += e;
            end += 1;
        }
        let mut parts = Vec::with_capacity(end - start + 1);
        let mut present = Vec::with_capacity(end - start);
        for (shape, g) in shapes[start..end].iter().zip(&grads.grads[start..end]) {
            let numel: usize = shape.iter().product();
            match g {
                Some(g) => {
                    parts.push(g.to_dtype(dtype)?.flatten_all()?.to_device(device)?);
                    present.push(1f64);
                }
                None => {
                    parts.push(Tensor::zeros(numel, dtype, device)?);
                    present.push(0f64);
                }
            }
        }
        parts.push(Tensor::new(present, device)?.to_dtype(dtype)?);
        let flat = comm.all_reduce_sum(&Tensor::cat(&parts, 0)?)?;
        let flags = flat
            .narrow(0, elems, end - start)?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?;
        let mut off = 0;
        for (k, i) in (start..end).enumerate() {
            let numel: usize = shapes[i].iter().product();
            grads.grads[i] = if flags[k] > 0.0 {
                let g = flat
                    .narrow(0, off, numel)?
                    .reshape(shapes[i])?
                    .affine(1.0 / world, 0.0)?;
                let want = if vars[i].dtype() == DType::F64 {
                    DType::F64
                } else {
                    DType::F32
                };
                Some(g.to_dtype(want)?)
            } else {
                None
            };
            off += numel;
        }
        start = end;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// LocalGroup: one thread per worker
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Entry {
    op: &'static str,
    dims: Vec<usize>,
    dtype: DType,
    root: usize,
    tensor: Option<Tensor>,
}

#[derive(Debug)]
struct State {
    generation: u64,
    arrived: usize,
    /// Double-buffered by generation parity: a rank cannot write generation `g + 2`'s
    /// entries before every rank has arrived at (so finished reading) generation `g + 1`.
    slots: [Vec<Option<Entry>>; 2],
    broken: Option<String>,
}

#[derive(Debug)]
struct Shared {
    world: usize,
    timeout: Duration,
    state: Mutex<State>,
    cv: Condvar,
}

/// An in-process group: one handle per worker thread, exchanging tensors through shared
/// memory. Results are computed by every rank in rank order, so all ranks get bit-identical
/// results.
///
/// A handle that is dropped, or a rank that fails ([`LocalGroup::run`] aborts the group
/// when a worker returns an error), makes the other ranks' pending and later collectives
/// fail instead of waiting forever; so does a wait longer than the timeout.
#[derive(Debug)]
pub struct LocalGroup {
    rank: usize,
    shared: Arc<Shared>,
}

impl LocalGroup {
    /// Default wait for the slowest rank before a collective fails.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

    /// The `world_size` handles of a new group, in rank order.
    pub fn new(world_size: usize) -> Result<Vec<LocalGroup>> {
        Self::with_timeout(world_size, Self::DEFAULT_TIMEOUT)
    }

    /// Like [`LocalGroup::new`] with a custom timeout per collective.
    pub fn with_timeout(world_size: usize, timeout: Duration) -> Result<Vec<LocalGroup>> {
        if world_size == 0 {
            return Err(Error::InvalidArgument(
                "a group needs at least one rank".into(),
            ));
        }
        let shared = Arc::new(Shared {
            world: world_size,
            timeout,
            state: Mutex::new(State {
                generation: 0,
                arrived: 0,
                slots: [vec![None; world_size], vec![None; world_size]],
                broken: None,
            }),
            cv: Condvar::new(),
        });
        Ok((0..world_size)
            .map(|rank| LocalGroup {
                rank,
                shared: shared.clone(),
            })
            .collect())
    }

    /// Runs `worker(handle)` on `world_size` scoped threads, one per rank, and returns
    /// their results in rank order. When a worker fails, the group is aborted (the other
    /// ranks' collectives fail) and the error of the first worker to fail is returned.
    pub fn run<T, F>(world_size: usize, worker: F) -> Result<Vec<T>>
    where
        T: Send,
        F: Fn(Arc<dyn Collective>) -> Result<T> + Sync,
    {
        let handles = Self::new(world_size)?;
        let first_failure: Mutex<Option<usize>> = Mutex::new(None);
        let results: Vec<Result<T>> = std::thread::scope(|scope| {
            let joins: Vec<_> = handles
                .into_iter()
                .map(|h| {
                    let worker = &worker;
                    let first_failure = &first_failure;
                    scope.spawn(move || {
                        let shared = h.shared.clone();
                        let rank = h.rank;
                        // Keep a handle until the failure is recorded: dropping the last one
                        // would abort the group with a less telling reason first.
                        let handle: Arc<dyn Collective> = Arc::new(h);
                        let out = worker(handle.clone());
                        if let Err(e) = &out {
                            if let Ok(mut f) = first_failure.lock() {
                                f.get_or_insert(rank);
                            }
                            abort(&shared, format!("rank {rank} failed: {e}"));
                        }
                        drop(handle);
                        out
                    })
                })
                .collect();
            joins
                .into_iter()
                .enumerate()
                .map(|(rank, j)| {
                    j.join().unwrap_or_else(|_| {
                        Err(Error::Collective(format!(
                            "worker thread of rank {rank} panicked"
                        )))
                    })
                })
                .collect()
        });
        let first = first_failure.lock().ok().and_then(|f| *f);
        let mut out = Vec::with_capacity(world_size);
        let mut errors: Vec<(usize, Error)> = Vec::new();
        for (rank, r) in results.into_iter().enumerate() {
            match r {
                Ok(v) => out.push(v),
                Err(e) => errors.push((rank, e)),
            }
        }
        if errors.is_empty() {
            return Ok(out);
        }
        let pick = errors
            .iter()
            .position(|(r, _)| Some(*r) == first)
            .unwrap_or(0);
        Err(errors.swap_remove(pick).1)
    }

    /// Marks the group as failed: every pending and later collective of every rank fails.
    pub fn abort(&self, reason: &str) {
        abort(&self.shared, reason.to_string());
    }

    /// Deposits this rank's entry, waits for all ranks, returns all entries in rank order.
    fn exchange(&self, entry: Entry) -> Result<Vec<Entry>> {
        let sh = &*self.shared;
        let mut st = sh
            .state
            .lock()
            .map_err(|_| Error::LockPoisoned("collective state"))?;
        if let Some(why) = &st.broken {
            return Err(Error::Collective(format!(
                "collective group is broken: {why}"
            )));
        }
        let generation = st.generation;
        let parity = (generation % 2) as usize;
        st.slots[parity][self.rank] = Some(entry);
        st.arrived += 1;
        if st.arrived == sh.world {
            st.arrived = 0;
            st.generation += 1;
            sh.cv.notify_all();
        } else {
            let deadline = std::time::Instant::now() + sh.timeout;
            while st.generation == generation {
                if let Some(why) = &st.broken {
                    return Err(Error::Collective(format!(
                        "collective group is broken: {why}"
                    )));
                }
                let now = std::time::Instant::now();
                if now >= deadline {
                    let why = format!(
                        "rank {} waited more than {:?} for the other ranks",
                        self.rank, sh.timeout
                    );
                    st.broken = Some(why.clone());
                    sh.cv.notify_all();
                    return Err(Error::Collective(why));
                }
                st = sh
                    .cv
                    .wait_timeout(st, deadline - now)
                    .map_err(|_| Error::LockPoisoned("collective state"))?
                    .0;
            }
        }
        let entries: Vec<Entry> = st.slots[parity].iter().flatten().cloned().collect();
        drop(st);
        if entries.len() != sh.world {
            return Err(Error::Collective("missing entries".into()));
        }
        let first = &entries[0];
        for (r, e) in entries.iter().enumerate() {
            let same_shape = first.op == "all_gather" || e.dims == first.dims;
            if e.op != first.op || !same_shape || e.dtype != first.dtype || e.root != first.root {
                return Err(Error::Collective(format!(
                    "collective mismatch: rank 0 called {}({:?}, {:?}), rank {r} called \
                     {}({:?}, {:?}); every rank must issue the same collectives in the same \
                     order",
                    first.op, first.dims, first.dtype, e.op, e.dims, e.dtype
                )));
            }
            if first.op == "all_gather" && e.dims.get(1..) != first.dims.get(1..) {
                return Err(Error::Collective(format!(
                    "all_gather: rank {r} has shape {:?}, rank 0 {:?}",
                    e.dims, first.dims
                )));
            }
        }
        Ok(entries)
    }

    fn entry(
        op: &'static str,
        x: Option<&Tensor>,
        dims: &[usize],
        dtype: DType,
        root: usize,
    ) -> Entry {
        Entry {
            op,
            dims: dims.to_vec(),
            dtype,
            root,
            tensor: x.map(|t| t.detach()),
        }
    }
}

fn abort(shared: &Shared, reason: String) {
    if let Ok(mut st) = shared.state.lock() {
        if st.broken.is_none() {
            st.broken = Some(reason);
        }
        shared.cv.notify_all();
    }
}

impl Drop for LocalGroup {
    fn drop(&mut self) {
        if self.shared.world > 1 {
            abort(&self.shared, format!("rank {} left the group", self.rank));
        }
    }
}

fn tensor_of(e: &Entry) -> Result<&Tensor> {
    e.tensor
        .as_ref()
        .ok_or_else(|| Error::Collective(format!("{}: an entry has no tensor", e.op)))
}

impl Collective for LocalGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world
    }

    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor> {
        let entries = self.exchange(Self::entry(
            "all_reduce_sum",
            Some(x),
            x.dims(),
            x.dtype(),
            0,
        ))?;
        let mut acc = tensor_of(&entries[0])?.to_device(x.device())?;
        for e in &entries[1..] {
            acc = (acc + tensor_of(e)?.to_device(x.device())?)?;
        }
        Ok(acc)
    }

    fn all_gather(&self, x: &Tensor) -> Result<Tensor> {
        let entries = self.exchange(Self::entry("all_gather", Some(x), x.dims(), x.dtype(), 0))?;
        let parts = entries
            .iter()
            .map(|e| Ok(tensor_of(e)?.to_device(x.device())?))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, 0)?)
    }

    fn broadcast(&self, x: &Tensor, root: usize) -> Result<Tensor> {
        if root >= self.shared.world {
            return Err(Error::InvalidArgument(format!(
                "broadcast root {root} is not a rank of a group of {}",
                self.shared.world
            )));
        }
        let mine = (self.rank == root).then_some(x);
        let entries = self.exchange(Self::entry("broadcast", mine, x.dims(), x.dtype(), root))?;
        Ok(tensor_of(&entries[root])?.to_device(x.device())?.copy()?)
    }

    fn barrier(&self) -> Result<()> {
        self.exchange(Self::entry("barrier", None, &[], DType::U8, 0))?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// NCCL
// ---------------------------------------------------------------------------------------

#[cfg(feature = "nccl")]
pub use nccl::NcclGroup;

#[cfg(feature = "nccl")]
mod nccl {
    //! One process per GPU over NCCL (cudarc's bindings, through candle's re-export).

    use std::path::{Path, PathBuf};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, ValidAsZeroBits};
    use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, NcclType, ReduceOp};
    use candle_core::cuda_backend::{CudaDType, CudaStorageSlice};
    use candle_core::{
        CpuStorage, CudaDevice, CudaStorage, CustomOp1, DType, Device, Layout, Shape, Tensor,
    };

    use super::Collective;
    use crate::error::{Error, Result};

    /// The communicator; NCCL communicators may be used from any thread, one at a time
    /// (the mutex serialises all use).
    struct CommCell(Comm);

    // SAFETY: `Comm` holds a raw `ncclComm_t`, which NCCL allows to be used from any
    // thread as long as calls are not concurrent; every use goes through `NcclGroup::comm`'s
    // mutex.
    unsafe impl Send for CommCell {}

    /// One rank of an NCCL group: one process per GPU. Tensors must live on this rank's
    /// CUDA device and be f32, f64, bf16 or f16 (u8/u32/i64 for broadcasts and gathers).
    pub struct NcclGroup {
        comm: Arc<Mutex<CommCell>>,
        device: Device,
        rank: usize,
        world: usize,
    }

    impl std::fmt::Debug for NcclGroup {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("NcclGroup")
                .field("rank", &self.rank)
                .field("world", &self.world)
                .finish()
        }
    }

    fn nccl_err(what: &str, e: impl std::fmt::Debug) -> Error {
        Error::Collective(format!("NCCL {what}: {e:?}"))
    }

    impl NcclGroup {
        /// Joins the group described by `RANK`, `WORLD_SIZE`, `LOCAL_RANK` (default `RANK`)
        /// and `TUWEN_NCCL_ID` (the id file; see the module documentation).
        pub fn from_env() -> Result<Self> {
            let var = |k: &str| -> Result<Option<usize>> {
                match std::env::var(k) {
                    Ok(v) => v
                        .trim()
                        .parse()
                        .map(Some)
                        .map_err(|_| Error::Config(format!("{k}={v} is not a number"))),
                    Err(_) => Ok(None),
                }
            };
            let rank = var("RANK")?.ok_or_else(|| Error::Config("RANK is not set".into()))?;
            let world =
                var("WORLD_SIZE")?.ok_or_else(|| Error::Config("WORLD_SIZE is not set".into()))?;
            let local = var("LOCAL_RANK")?.unwrap_or(rank);
            let id_file = std::env::var_os("TUWEN_NCCL_ID")
                .map(PathBuf::from)
                .ok_or_else(|| Error::Config("TUWEN_NCCL_ID (the id file) is not set".into()))?;
            Self::new(rank, world, local, &id_file, Duration::from_secs(600))
        }

        /// Joins a group: rank 0 writes a fresh NCCL id to `id_file` (atomically), the
        /// others wait up to `wait` for it. `ordinal` is the CUDA device of this rank.
        pub fn new(
            rank: usize,
            world: usize,
            ordinal: usize,
            id_file: &Path,
            wait: Duration,
        ) -> Result<Self> {
            if rank >= world {
                return Err(Error::Config(format!("RANK {rank} >= WORLD_SIZE {world}")));
            }
            let device = Device::new_cuda(ordinal)?;
            let cuda = match &device {
                Device::Cuda(d) => d.clone(),
                _ => return Err(Error::Config("not a CUDA device".into())),
            };
            let id = if rank == 0 {
                let id = Id::new().map_err(|e| nccl_err("unique id", e))?;
                let bytes: Vec<u8> = id.internal().iter().map(|&c| c as u8).collect();
                crate::checkpoint::write_atomic(id_file, &bytes)?;
                id
            } else {
                let start = Instant::now();
                loop {
                    match std::fs::read(id_file) {
                        Ok(b) if b.len() == 128 => {
                            let mut internal = [0 as std::ffi::c_char; 128];
                            for (d, s) in internal.iter_mut().zip(&b) {
                                *d = *s as std::ffi::c_char;
                            }
                            break Id::uninit(internal);
                        }
                        _ if start.elapsed() > wait => {
                            return Err(Error::Collective(format!(
                                "rank {rank}: no NCCL id in {} after {wait:?}",
                                id_file.display()
                            )))
                        }
                        _ => std::thread::sleep(Duration::from_millis(100)),
                    }
                }
            };
            let comm = Comm::from_rank(cuda.cuda_stream(), rank, world, id)
                .map_err(|e| nccl_err("init", e))?;
            Ok(Self {
                comm: Arc::new(Mutex::new(CommCell(comm))),
                device,
                rank,
                world,
            })
        }

        /// This rank's CUDA device.
        pub fn device(&self) -> &Device {
            &self.device
        }

        fn run(&self, kind: Kind, x: &Tensor) -> Result<Tensor> {
            let x = x.contiguous()?;
            let op = NcclOp {
                comm: self.comm.clone(),
                kind,
                world: self.world,
            };
            Ok(x.apply_op1_no_bwd(&op)?)
        }
    }

    #[derive(Clone, Copy)]
    enum Kind {
        AllReduce,
        AllGather,
        Broadcast(usize),
    }

    struct NcclOp {
        comm: Arc<Mutex<CommCell>>,
        kind: Kind,
        world: usize,
    }

    impl NcclOp {
        fn go<T>(
            &self,
            src: &candle_core::cuda_backend::cudarc::driver::CudaSlice<T>,
            layout: &Layout,
            dev: &CudaDevice,
        ) -> candle_core::Result<(CudaStorage, Shape)>
        where
            T: CudaDType + NcclType + DeviceRepr + ValidAsZeroBits,
        {
            let (start, end) = layout
                .contiguous_offsets()
                .ok_or_else(|| candle_core::Error::msg("NCCL: the input is not contiguous"))?;
            let src = src.slice(start..end);
            let n = end - start;
            let dims = layout.shape().dims();
            let (out_len, shape) = match self.kind {
                Kind::AllGather => {
                    let mut d = dims.to_vec();
                    if let Some(d0) = d.first_mut() {
                        *d0 *= self.world;
                    }
                    (n * self.world, Shape::from(d))
                }
                _ => (n, layout.shape().clone()),
            };
            let mut dst = dev.alloc_zeros::<T>(out_len)?;
            let cell = self
                .comm
                .lock()
                .map_err(|_| candle_core::Error::msg("NCCL communicator lock poisoned"))?;
            let comm = &cell.0;
            match self.kind {
                Kind::AllReduce => comm.all_reduce(&src, &mut dst, &ReduceOp::Sum).map(|_| ()),
                Kind::AllGather => comm.all_gather(&src, &mut dst).map(|_| ()),
                Kind::Broadcast(root) => comm
                    .broadcast(Some(&src), &mut dst, root as i32)
                    .map(|_| ()),
            }
            .map_err(|e| candle_core::Error::msg(format!("NCCL: {e:?}")))?;
            Ok((CudaStorage::wrap_cuda_slice(dst, dev.clone()), shape))
        }
    }

    impl CustomOp1 for NcclOp {
        fn name(&self) -> &'static str {
            "nccl"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
            candle_core::bail!("NCCL collectives need tensors on the rank's CUDA device")
        }

        fn cuda_fwd(
            &self,
            s: &CudaStorage,
            l: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            let dev = s.device().clone();
            match &s.slice {
                CudaStorageSlice::F32(x) => self.go(x, l, &dev),
                CudaStorageSlice::F64(x) => self.go(x, l, &dev),
                CudaStorageSlice::BF16(x) => self.go(x, l, &dev),
                CudaStorageSlice::F16(x) => self.go(x, l, &dev),
                CudaStorageSlice::U8(x) => self.go(x, l, &dev),
                CudaStorageSlice::U32(x) => self.go(x, l, &dev),
                CudaStorageSlice::I64(x) => self.go(x, l, &dev),
                _ => candle_core::bail!("NCCL: unsupported dtype {:?}", s.dtype()),
            }
        }
    }

    impl Collective for NcclGroup {
        fn rank(&self) -> usize {
            self.rank
        }

        fn world_size(&self) -> usize {
            self.world
        }

        fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor> {
            let back = x.device().clone();
            let y = self.run(Kind::AllReduce, &x.to_device(&self.device)?)?;
            Ok(y.to_device(&back)?)
        }

        fn all_gather(&self, x: &Tensor) -> Result<Tensor> {
            let back = x.device().clone();
            let y = self.run(Kind::AllGather, &x.to_device(&self.device)?)?;
            Ok(y.to_device(&back)?)
        }

        fn broadcast(&self, x: &Tensor, root: usize) -> Result<Tensor> {
            if root >= self.world {
                return Err(Error::InvalidArgument(format!(
                    "broadcast root {root} is not a rank of a group of {}",
                    self.world
                )));
            }
            let back = x.device().clone();
            let y = self.run(Kind::Broadcast(root), &x.to_device(&self.device)?)?;
            Ok(y.to_device(&back)?)
        }

        fn barrier(&self) -> Result<()> {
            let one = Tensor::ones(1, DType::F32, &self.device)?;
            self.all_reduce_sum(&one)?.to_vec1::<f32>()?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(v: &[f32]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    #[test]
    fn local_group_collectives() {
        for world in [1, 2, 4] {
            let out = LocalGroup::run(world, |c| {
                let r = c.rank() as f32;
                let x = t(&[r, 10.0 * r]);
                let sum = c.all_reduce_sum(&x)?.to_vec1::<f32>()?;
                let gathered = c.all_gather(&x.reshape((1, 2))?)?.to_vec2::<f32>()?;
                let b = c.broadcast(&t(&[r + 100.0]), world - 1)?.to_vec1::<f32>()?;
                c.barrier()?;
                Ok((sum, gathered, b))
            })
            .unwrap();
            let s: f32 = (0..world).map(|r| r as f32).sum();
            for (sum, gathered, b) in out {
                assert_eq!(sum, vec![s, 10.0 * s]);
                assert_eq!(gathered.len(), world);
                for (r, row) in gathered.iter().enumerate() {
                    assert_eq!(row, &vec![r as f32, 10.0 * r as f32]);
                }
                assert_eq!(b, vec![(world - 1) as f32 + 100.0]);
            }
        }
    }

    #[test]
    fn mismatched_calls_and_failures_are_errors_not_hangs() {
        // Different collectives on different ranks.
        let r = LocalGroup::run(2, |c| {
            if c.rank() == 0 {
                c.all_reduce_sum(&t(&[1.0]))?;
            } else {
                c.barrier()?;
            }
            Ok(())
        });
        assert!(matches!(r, Err(Error::Collective(m)) if m.contains("mismatch")));
        // Different shapes.
        let r = LocalGroup::run(2, |c| {
            c.all_reduce_sum(&Tensor::zeros(c.rank() + 1, DType::F32, &Device::Cpu)?)?;
            Ok(())
        });
        assert!(r.is_err());
        // A rank that fails before a collective does not leave the other waiting.
        let r = LocalGroup::run(3, |c| {
            if c.rank() == 1 {
                return Err(Error::Training("boom".into()));
            }
            c.barrier()?;
            Ok(())
        });
        assert!(matches!(r, Err(Error::Training(m)) if m.contains("boom")));
        // A timeout.
        let hs = LocalGroup::with_timeout(2, Duration::from_millis(50)).unwrap();
        assert!(hs[0].barrier().is_err());
    }

    /// Gathered features with gradient: N ranks computing "my rows × all rows" losses give
    /// each rank the gradient one process computing the whole loss gives for those rows.
    #[test]
    fn all_gather_with_grad_matches_single_process() {
        let world = 4;
        let b = 3;
        let d = 5;
        let data: Vec<f32> = (0..world * b * d)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0)
            .collect();
        let full = Tensor::from_vec(data.clone(), (world * b, d), &Device::Cpu).unwrap();
        let w = Tensor::from_vec(
            (0..d * d)
                .map(|i| ((i * 13 % 17) as f32 - 8.0) / 9.0)
                .collect::<Vec<_>>(),
            (d, d),
            &Device::Cpu,
        )
        .unwrap();
        // Reference: L = sum_ij sigmoid((x_i W) · x_j) over all rows.
        let loss_of = |mine: &Tensor, all: &Tensor| -> candle_core::Result<Tensor> {
            candle_nn::ops::sigmoid(&mine.matmul(&w)?.matmul(&all.t()?)?)?.sum_all()
        };
        let xv = Var::from_tensor(&full).unwrap();
        let g_ref = loss_of(xv.as_tensor(), xv.as_tensor())
            .unwrap()
            .backward()
            .unwrap()
            .get(xv.as_tensor())
            .unwrap()
            .clone();
        let grads = LocalGroup::run(world, |c| {
            let mine = Var::from_tensor(&full.narrow(0, c.rank() * b, b)?)?;
            let all = all_gather_with_grad(mine.as_tensor(), &c)?;
            let store = loss_of(mine.as_tensor(), &all)?.backward()?;
            Ok(store
                .get(mine.as_tensor())
                .ok_or_else(|| Error::Training("no grad".into()))?
                .clone())
        })
        .unwrap();
        let ours = Tensor::cat(&grads, 0).unwrap();
        let diff = (ours - &g_ref)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-5, "gradient differs by {diff}");
    }

    #[test]
    fn grads_are_averaged_and_missing_ones_stay_missing() {
        let out = LocalGroup::run(2, |c| {
            let vars: Vec<Var> = [2usize, 1, 3]
                .iter()
                .map(|&n| Var::zeros(n, DType::F32, &Device::Cpu))
                .collect::<candle_core::Result<_>>()?;
            let r = c.rank() as f32;
            let mut g = Grads {
                grads: vec![
                    Some(t(&[r, 2.0 + r])),
                    if c.rank() == 0 { Some(t(&[4.0])) } else { None },
                    None,
                ],
            };
            all_reduce_grads(&mut g, &vars, &*c)?;
            Ok(g.grads
                .into_iter()
                .map(|x| x.map(|x| x.to_vec1::<f32>().unwrap_or_default()))
                .collect::<Vec<_>>())
        })
        .unwrap();
        for g in out {
            assert_eq!(g[0], Some(vec![0.5, 2.5]));
            assert_eq!(g[1], Some(vec![2.0]));
            assert_eq!(g[2], None);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Bytes through a group (per-rank metadata such as data positions in checkpoints)
// ---------------------------------------------------------------------------------------

/// Gathers every rank's `bytes` (of any length) on every rank, in rank order.
///
/// The bytes travel as `f32` values (exact for `0..=255`) in two all-gathers, the lengths
/// and then the padded payloads, in tensors on `device`, which must be the group's device
/// (the CPU for [`LocalGroup`], the rank's GPU for NCCL). Payloads are meant to be small
/// (serialised metadata); more than 2²⁴ bytes is refused. Every rank must call it.
pub fn all_gather_bytes(
    comm: &dyn Collective,
    bytes: &[u8],
    device: &candle_core::Device,
) -> Result<Vec<Vec<u8>>> {
    const MAX: usize = 1 << 24;
    if bytes.len() > MAX {
        return Err(Error::InvalidArgument(format!(
            "all_gather_bytes: {} bytes is more than the {MAX} a payload may hold",
            bytes.len()
        )));
    }
    if comm.world_size() <= 1 {
        return Ok(vec![bytes.to_vec()]);
    }
    let len = Tensor::new(&[bytes.len() as f32], device)?;
    let lens: Vec<usize> = comm
        .all_gather(&len)?
        .to_vec1::<f32>()?
        .into_iter()
        .map(|l| l as usize)
        .collect();
    let width = lens.iter().copied().max().unwrap_or(0).max(1);
    let mut padded: Vec<f32> = bytes.iter().map(|&b| b as f32).collect();
    padded.resize(width, 0.0);
    let all = comm
        .all_gather(&Tensor::from_vec(padded, width, device)?)?
        .to_vec1::<f32>()?;
    if all.len() != width * lens.len() {
        return Err(Error::Training(format!(
            "all_gather_bytes: gathered {} values, expected {} ranks × {width}",
            all.len(),
            lens.len()
        )));
    }
    Ok(lens
        .iter()
        .enumerate()
        .map(|(r, &n)| {
            all[r * width..r * width + n.min(width)]
                .iter()
                .map(|&v| v as u8)
                .collect()
        })
        .collect())
}

#[cfg(test)]
mod bytes_tests {
    use super::*;

    #[test]
    fn all_gather_bytes_of_different_lengths() {
        let got = LocalGroup::run(3, |c| {
            let mine: Vec<u8> = (0..c.rank() * 3).map(|i| (i * 97 + 255) as u8).collect();
            all_gather_bytes(c.as_ref(), &mine, &candle_core::Device::Cpu)
        })
        .unwrap();
        let want: Vec<Vec<u8>> = (0..3)
            .map(|r| (0..r * 3).map(|i| (i * 97 + 255) as u8).collect())
            .collect();
        for g in got {
            assert_eq!(g, want);
        }
    }
}
