//! Process-wide memory settings for processes that move transfers.
//!
//! A link reads into 256 KiB buffers, and transfer payloads are slices of
//! them that live on until the reply is written, so every link keeps
//! allocating and freeing buffers of that size. glibc's defaults serve such
//! a buffer from a fresh `mmap`, or give the top of a heap back to the
//! kernel once 128 KiB are free there; either way the next buffer is new
//! memory, paid for with a page fault (and a page cleared) for every 4 KiB
//! written into it. Measured on the helper link benchmark, that was one
//! fault per 20 to 40 KiB moved.

/// Free memory a heap may keep for reuse before its top is given back.
pub const RETAINED_FREE_MEMORY: usize = 8 * 1024 * 1024;

/// Makes freed transfer buffers reusable: allocations below
/// [`RETAINED_FREE_MEMORY`] come from the heap, and a heap keeps up to that
/// much free memory instead of returning it to the kernel at once. Call
/// first thing in `main`. No effect where the C library is not glibc.
pub fn reuse_freed_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let limit = RETAINED_FREE_MEMORY as libc::c_int;
        // SAFETY: mallopt only adjusts allocator parameters; it is called
        // before the process starts other threads.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, limit);
            libc::mallopt(libc::M_TRIM_THRESHOLD, limit);
        }
    }
}
