//! Process-wide `malloc` settings for the CPU paths.
//!
//! candle allocates a fresh buffer for every op's output. For activations of tens of MB
//! (BriVL's EfficientNet at 380 px, batch 8) glibc's `malloc` maps each such block with
//! `mmap` and unmaps it when it is freed: the kernel then zeroes every page on first touch,
//! and every unmap flushes the TLB of every thread of the process. On a 2-core VM that
//! was about a third of BriVL's image-tower time. [`tune_allocator`] makes `malloc` serve
//! large blocks from its heap and keep freed memory for the next pass instead.

/// Makes glibc's `malloc` keep large blocks in its heap (`M_MMAP_MAX = 0`) and keep freed
/// memory for reuse (`M_TRIM_THRESHOLD` at its maximum) rather than mapping and unmapping a
/// block per tensor. Peak memory is unchanged; memory freed after a forward pass stays with
/// the process for the next one (`malloc_trim(0)` from `libc` hands it back).
///
/// [`crate::load`] and [`crate::registry::load_path`] call this after loading a model for
/// the CPU unless [`crate::LoadOptions::tune_allocator`] is false. It applies once per
/// process; returns whether the settings are in effect (false on other platforms and C
/// libraries, where it does nothing).
pub fn tune_allocator() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static APPLIED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *APPLIED.get_or_init(|| {
            // SAFETY: `mallopt` only changes glibc's tuning parameters; it is safe to call
            // at any time from any thread.
            unsafe {
                libc::mallopt(libc::M_MMAP_MAX, 0) == 1
                    && libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1
            }
        })
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn settings_apply_and_large_blocks_still_allocate() {
        assert!(super::tune_allocator());
        assert!(
            super::tune_allocator(),
            "applies once, then reports the same"
        );
        // A 64 MiB block now comes from the heap; it must still be usable.
        let v = vec![1u8; 64 << 20];
        assert_eq!(v.iter().map(|&x| x as usize).sum::<usize>(), 64 << 20);
    }
}
