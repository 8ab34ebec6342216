//! How the process's allocator treats the log's I/O buffers.
//!
//! sled writes through I/O buffers of one segment (512 KiB) and, on every flush, seals the
//! current one and allocates the next: more than a thousand a second at full speed. glibc gives
//! an allocation of 128 KiB or more a mapping of its own only until the first such block is
//! freed; then it raises that threshold to the freed block's size, and every later buffer is
//! carved from a heap arena among small long-lived allocations, where the pages a buffer
//! touched stay resident after it is freed. Each process's memory grew with the sagas it had
//! served that way (BENCHMARKS.md, issue 11, 2026-12-03). Fixing the threshold keeps such
//! buffers in mappings of their own, given back to the system when freed.

/// Fixes glibc's mmap threshold at its initial 128 KiB, which also stops glibc from raising
/// it. Process-wide: each binary calls it once at the start of `main`. Returns whether the
/// allocator took the setting (`false` where the allocator is not glibc's).
pub fn keep_large_buffers_out_of_the_heap() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        /// glibc's initial threshold (`DEFAULT_MMAP_THRESHOLD_MIN`).
        const MMAP_THRESHOLD: libc::c_int = 128 * 1024;
        #[allow(unsafe_code, reason = "mallopt; see SAFETY")]
        // SAFETY: mallopt only sets a tunable of the allocator (under its own lock); a valid
        // parameter and value, and no pointer is involved.
        let taken = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) };
        taken == 1
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}
