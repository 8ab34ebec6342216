//! The allocator setting of `saga_storage::heap`, in a process of its own (it is
//! process-wide, and glibc's threshold moves with every large block freed).

/// A freed block the size of one of sled's I/O buffers must not send the next one into the
/// heap: with glibc's defaults the first is mapped on its own, freeing it raises the threshold,
/// and the second is carved from an arena.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn a_freed_io_buffer_does_not_move_the_next_into_the_heap() {
    const SEGMENT: usize = 512 * 1024;
    #[allow(unsafe_code, reason = "mallinfo2 only reads the allocator's counters")]
    fn mapped_bytes() -> usize {
        // SAFETY: mallinfo2 takes no arguments and returns a struct by value.
        unsafe { libc::mallinfo2() }.hblkhd
    }

    assert!(
        saga_storage::heap::keep_large_buffers_out_of_the_heap(),
        "glibc takes the setting"
    );
    let first: Vec<u8> = Vec::with_capacity(SEGMENT);
    drop(std::hint::black_box(first));
    let before = mapped_bytes();
    let second: Vec<u8> = Vec::with_capacity(SEGMENT);
    let after = mapped_bytes();
    drop(std::hint::black_box(second));
    assert!(
        after >= before + SEGMENT,
        "the second buffer came from the heap: mapped bytes {before} -> {after}"
    );
}
