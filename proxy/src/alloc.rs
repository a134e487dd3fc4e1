//! The process's allocator: mimalloc, called the way its fast paths expect.
//!
//! A request allocates a few dozen times (hyper's buffers, header maps, the filter host's
//! strings), and glibc's malloc/free pair costs about three times mimalloc's. The `mimalloc`
//! crate's `GlobalAlloc` passes every allocation to `mi_malloc_aligned`, even those whose
//! alignment plain `mi_malloc` already gives. In mimalloc 3 that aligned entry is fast only
//! while a small block of the right size class is at hand; otherwise (every block over
//! 1 KiB, and a small one whose page's free list is empty) it takes the generic path, and
//! for a size class that is not a power of two it over-allocates by `align - 1` bytes and
//! marks the page as holding interior pointers. Measured under callgrind (release build,
//! no filters): about 4 allocations per proxied request went that way, 1.3k instructions.
//!
//! [`Allocator`] does what std's `System` allocator does with `malloc`: when the alignment is
//! at most the one `mi_malloc` guarantees and not larger than the size, it calls `mi_malloc`
//! (`mi_zalloc`, `mi_realloc`); only larger alignments go to the aligned entries.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// The alignment `mi_malloc` gives every block of at least that size (`MI_MAX_ALIGN_SIZE` on
/// 64-bit targets). A smaller block is aligned to its size class, a multiple of the word
/// size, so `align <= size` (checked with it) is always met too.
const MI_MAX_ALIGN: usize = 16;

/// mimalloc as the global allocator (`#[global_allocator] static A: Allocator = Allocator;`).
pub struct Allocator;

/// Whether plain `mi_malloc` gives `layout`'s alignment (std's `System` rule, with mimalloc's
/// guarantee).
#[inline(always)]
fn natural(align: usize, size: usize) -> bool {
    align <= MI_MAX_ALIGN && align <= size
}

// SAFETY: every block comes from mimalloc and goes back to it; each entry is called with the
// alignment it guarantees (the unaligned ones only when `natural` holds), and a null return
// (out of memory) is passed on as `GlobalAlloc` requires.
unsafe impl GlobalAlloc for Allocator {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: plain FFI calls with a size and a power-of-two alignment.
        unsafe {
            if natural(layout.align(), layout.size()) {
                mi::mi_malloc(layout.size()).cast()
            } else {
                mi::mi_malloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as in `alloc`.
        unsafe {
            if natural(layout.align(), layout.size()) {
                mi::mi_zalloc(layout.size()).cast()
            } else {
                mi::mi_zalloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from this allocator (the caller's contract), so from mimalloc.
        unsafe { mi::mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from this allocator with `layout`; the new block keeps its
        // alignment (`natural` is checked against the new size, the one that must hold it).
        unsafe {
            if natural(layout.align(), new_size) {
                mi::mi_realloc(ptr.cast::<c_void>(), new_size).cast()
            } else {
                mi::mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()).cast()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Allocates `n` blocks of every size in `sizes` with alignment `align` and checks each
    /// is aligned, writable over its whole length, and keeps what was written (no overlap).
    fn blocks_are_aligned_and_distinct(sizes: impl Iterator<Item = usize> + Clone, align: usize, n: usize) {
        let a = Allocator;
        let mut live = Vec::new();
        for round in 0..n {
            for size in sizes.clone() {
                let layout = Layout::from_size_align(size, align).unwrap();
                // SAFETY: a non-zero size; the block is freed below with the same layout.
                let p = unsafe { a.alloc(layout) };
                assert!(!p.is_null(), "size {size} align {align}: null");
                assert_eq!(p as usize % align, 0, "size {size} align {align}: misaligned");
                let tag = (size + round) as u8;
                // SAFETY: the block is `size` bytes long.
                unsafe { p.write_bytes(tag, size) };
                live.push((p, layout, tag));
            }
        }
        for (p, layout, tag) in live {
            // SAFETY: written above with `tag` over its whole length.
            let bytes = unsafe { std::slice::from_raw_parts(p, layout.size()) };
            assert!(bytes.iter().all(|&b| b == tag), "a block was overwritten");
            // SAFETY: allocated above with this layout.
            unsafe { a.dealloc(p, layout) };
        }
    }

    #[test]
    fn every_size_gets_its_alignment() {
        for align in [1, 2, 4, 8, 16] {
            blocks_are_aligned_and_distinct(
                (1..=2048).step_by(7).chain([4096, 8192, 65_536, 1 << 20]),
                align,
                3,
            );
        }
    }

    #[test]
    fn alignments_beyond_mallocs_go_to_the_aligned_entry() {
        for align in [32, 64, 128, 4096] {
            blocks_are_aligned_and_distinct([1, 24, 100, 1000, 1500, 5000, 70_000].into_iter(), align, 3);
        }
    }

    #[test]
    fn zeroed_blocks_are_zero() {
        let a = Allocator;
        for (size, align) in [(10, 8), (3000, 8), (3000, 64), (1 << 20, 16)] {
            let layout = Layout::from_size_align(size, align).unwrap();
            // SAFETY: non-zero size; freed below.
            let p = unsafe { a.alloc_zeroed(layout) };
            assert_eq!(p as usize % align, 0);
            // SAFETY: `size` bytes, just allocated.
            assert!(unsafe { std::slice::from_raw_parts(p, size) }
                .iter()
                .all(|&b| b == 0));
            // SAFETY: allocated above with this layout.
            unsafe { a.dealloc(p, layout) };
        }
    }

    #[test]
    fn realloc_keeps_the_contents_and_the_alignment() {
        let a = Allocator;
        for align in [8, 16, 64] {
            let mut layout = Layout::from_size_align(8, align).unwrap();
            // SAFETY: non-zero size.
            let mut p = unsafe { a.alloc(layout) };
            // SAFETY: 8 bytes.
            unsafe { p.write_bytes(0xab, 8) };
            let mut filled = 8;
            // Up through the small, medium and large classes, then back down.
            for new_size in [24, 1000, 1500, 5000, 70_000, 1 << 20, 3000, 12] {
                // SAFETY: `p` was allocated with `layout`; the new size is non-zero.
                p = unsafe { a.realloc(p, layout, new_size) };
                assert!(!p.is_null());
                assert_eq!(p as usize % align, 0, "realloc to {new_size} align {align}");
                let kept = filled.min(new_size);
                // SAFETY: the block holds at least `kept` bytes from before.
                assert!(unsafe { std::slice::from_raw_parts(p, kept) }
                    .iter()
                    .all(|&b| b == 0xab));
                // SAFETY: `new_size` bytes.
                unsafe { p.write_bytes(0xab, new_size) };
                filled = new_size;
                layout = Layout::from_size_align(new_size, align).unwrap();
            }
            // SAFETY: allocated with `layout`.
            unsafe { a.dealloc(p, layout) };
        }
    }
}
