//! Process-wide thread settings for binaries.
//!
//! The crate's CPU kernels run on the rayon pool (`RAYON_NUM_THREADS`). candle runs its own
//! elementwise ops (additions, gradient accumulation, …) on a second pool of its own, sized by
//! `CANDLE_NUM_THREADS` (by default the rayon count), whose workers spin for a while after
//! every op before they sleep. With as many rayon threads as cores, a spinning worker takes a
//! core from the next matrix product: on a 2-core machine the SigLIP training step's
//! backward pass ran about 15% faster with `CANDLE_NUM_THREADS=1` (candle's ops on the
//! calling thread, no second pool), and no inference workload got slower.

/// The variable candle reads, once, when it starts its pool.
pub const CANDLE_THREADS_VAR: &str = "CANDLE_NUM_THREADS";

/// Unless `CANDLE_NUM_THREADS` is already set, sets it to 1, so that candle runs its own
/// elementwise ops on the calling thread (see the module documentation). Returns whether it
/// set the variable. The examples and the benchmark binaries call it first thing in `main`.
///
/// # Safety
/// It sets an environment variable: call it before the process starts any other thread
/// (none may read the environment meanwhile), and before the first candle op, since candle
/// reads the variable only once.
pub unsafe fn candle_ops_on_calling_thread() -> bool {
    if std::env::var_os(CANDLE_THREADS_VAR).is_some() {
        return false;
    }
    std::env::set_var(CANDLE_THREADS_VAR, "1");
    true
}
