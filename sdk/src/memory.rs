//! The filter's memory allocator: small blocks from per-size free lists, the rest from the
//! system allocator (wasi-libc's dlmalloc).
//!
//! A filter allocates a handful of small blocks per request (every string or list the host
//! returns is a guest allocation, then the strings and vectors the filter builds) and frees
//! them before the phase returns. Through Rust's default path (`__rust_alloc` → `malloc` →
//! `dlmalloc`, and back through `free` → `dlfree`) an allocation and its free cost about 400
//! Wasm instructions; here they are a pop and a push on a free list.
//!
//! Sizes up to [`MAX_SMALL`] are rounded up to a power of two (a *class*, 16 B to 4 KiB). Each
//! class keeps a free list threaded through its free blocks and carves new blocks from slabs
//! it takes from the system allocator, aligned to the class size, so every block is aligned
//! to its size (Rust layouts have `size >= align`). Freed small blocks stay in their class
//! for the instance's life: the memory a class holds is the most it ever had live at once.
//! Larger blocks go to the system allocator and are returned to it.
//!
//! On by default (the `allocator` feature) for `wasm32` builds without threads; a filter
//! that wants its own `#[global_allocator]` turns the feature off.

use std::alloc::{GlobalAlloc, Layout};
use std::cell::UnsafeCell;
use std::ptr;

/// Smallest class: 16 bytes (a pointer-sized free-list link fits in any block).
const MIN_SHIFT: u32 = 4;
/// Classes 16, 32, …, 4096 bytes.
const CLASSES: usize = 9;
/// Largest size served from a class; larger allocations go to the system allocator.
pub const MAX_SMALL: usize = 1 << (MIN_SHIFT as usize + CLASSES - 1);

/// The class of a (non-zero) size: 0 for 1..=16, 1 for 17..=32, …
fn class(size: usize) -> usize {
    let bits = usize::BITS - (size.max(1) - 1).leading_zeros();
    bits.saturating_sub(MIN_SHIFT) as usize
}

fn class_size(c: usize) -> usize {
    1 << (MIN_SHIFT as usize + c)
}

/// Bytes a class takes from the system allocator at a time: 4 KiB for the small classes
/// (256 blocks of 16 B), up to 16 KiB (4 blocks of 4 KiB).
fn slab_size(c: usize) -> usize {
    (class_size(c) * 32).clamp(4096, 16 * 1024)
}

/// The rounded size a layout is served with, if it is small.
fn small(layout: Layout) -> Option<usize> {
    let size = layout.size().max(layout.align());
    (size <= MAX_SMALL).then(|| class(size))
}

struct Classes {
    /// Head of each class's free list (a free block's first word links to the next).
    free: [*mut u8; CLASSES],
    /// The unused part of each class's current slab: `next..end`.
    next: [*mut u8; CLASSES],
    end: [*mut u8; CLASSES],
}

/// Size classes over `A`, which serves the slabs and the large blocks.
///
/// Not thread-safe: one instance must only ever be used from one thread (a Wasm component
/// without threads is one thread; the unit tests use their own instance each).
pub(crate) struct SizeClasses<A> {
    system: A,
    classes: UnsafeCell<Classes>,
}

impl<A> SizeClasses<A> {
    pub(crate) const fn new(system: A) -> Self {
        SizeClasses {
            system,
            classes: UnsafeCell::new(Classes {
                free: [ptr::null_mut(); CLASSES],
                next: [ptr::null_mut(); CLASSES],
                end: [ptr::null_mut(); CLASSES],
            }),
        }
    }
}

// SAFETY: the global instance exists only on `wasm32` without the `atomics` target feature,
// where the whole program is one thread; `SizeClasses` is crate-private and the tests use an
// instance per test, from that test's thread.
#[allow(unsafe_code)]
unsafe impl<A: Sync> Sync for SizeClasses<A> {}

#[allow(unsafe_code)]
unsafe impl<A: GlobalAlloc> GlobalAlloc for SizeClasses<A> {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let Some(c) = small(layout) else {
            return unsafe { self.system.alloc(layout) };
        };
        // SAFETY: one thread (see `Sync`), and no reentrancy: `system` is another allocator.
        let classes = unsafe { &mut *self.classes.get() };
        let head = classes.free[c];
        if !head.is_null() {
            // SAFETY: a free block holds the link to the next free block in its first word,
            // written by `dealloc`; blocks are aligned to at least 16 bytes.
            classes.free[c] = unsafe { head.cast::<*mut u8>().read() };
            return head;
        }
        let size = class_size(c);
        let next = classes.next[c];
        if next != classes.end[c] {
            // SAFETY: `next..end` lies inside a slab this class owns.
            classes.next[c] = unsafe { next.add(size) };
            return next;
        }
        let slab_bytes = slab_size(c);
        // SAFETY: non-zero size; a power-of-two alignment no larger than the size.
        let slab = unsafe {
            self.system
                .alloc(Layout::from_size_align_unchecked(slab_bytes, size))
        };
        if slab.is_null() {
            return slab;
        }
        // SAFETY: both inside (or one past the end of) the slab just allocated.
        unsafe {
            classes.next[c] = slab.add(size);
            classes.end[c] = slab.add(slab_bytes);
        }
        slab
    }

    #[inline]
    unsafe fn dealloc(&self, block: *mut u8, layout: Layout) {
        let Some(c) = small(layout) else {
            return unsafe { self.system.dealloc(block, layout) };
        };
        // SAFETY: as in `alloc`; the block came from this class (same layout, same class) and
        // is at least 16 bytes, aligned, and no longer used by its owner.
        unsafe {
            let classes = &mut *self.classes.get();
            block.cast::<*mut u8>().write(classes.free[c]);
            classes.free[c] = block;
        }
    }

    #[inline]
    unsafe fn realloc(&self, block: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY (all below): the caller's contract for `realloc`: `block` was allocated with
        // `layout`, `new_size` is non-zero and, rounded to `layout.align()`, fits `isize`.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        match (small(layout), small(new_layout)) {
            // Same class: the block already has room (or more than enough).
            (Some(a), Some(b)) if a == b => block,
            // Both large: the system allocator may grow or shrink in place.
            (None, None) => unsafe { self.system.realloc(block, layout, new_size) },
            _ => {
                let new = unsafe { self.alloc(new_layout) };
                if !new.is_null() {
                    unsafe {
                        ptr::copy_nonoverlapping(block, new, layout.size().min(new_size));
                        self.dealloc(block, layout);
                    }
                }
                new
            }
        }
    }
}

#[cfg(test)]
#[allow(unsafe_code)]
mod tests {
    use super::*;
    use std::alloc::System;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// The system allocator, counting what passes through it.
    #[derive(Default)]
    struct Counting {
        allocs: AtomicUsize,
        frees: AtomicUsize,
    }

    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            self.allocs.fetch_add(1, Ordering::Relaxed);
            unsafe { System.alloc(layout) }
        }
        unsafe fn dealloc(&self, block: *mut u8, layout: Layout) {
            self.frees.fetch_add(1, Ordering::Relaxed);
            unsafe { System.dealloc(block, layout) }
        }
    }

    fn layout(size: usize, align: usize) -> Layout {
        Layout::from_size_align(size, align).unwrap()
    }

    /// A deterministic byte for block `i`, offset `j`.
    fn pattern(i: usize, j: usize) -> u8 {
        (i.wrapping_mul(31) ^ j.wrapping_mul(7)) as u8
    }

    #[test]
    fn classes_round_up_to_powers_of_two_from_16_bytes() {
        assert_eq!(class(1), 0);
        assert_eq!(class(16), 0);
        assert_eq!(class(17), 1);
        assert_eq!(class(32), 1);
        assert_eq!(class(33), 2);
        assert_eq!(class(MAX_SMALL), CLASSES - 1);
        assert_eq!(class_size(CLASSES - 1), MAX_SMALL);
        assert_eq!(small(layout(MAX_SMALL + 1, 1)), None);
        // Alignment counts as size: a 4-byte value aligned to 64 is served from the 64 class.
        assert_eq!(small(layout(4, 64)), Some(2));
        assert_eq!(small(layout(8, 2 * MAX_SMALL)), None);
    }

    #[test]
    fn blocks_are_aligned_disjoint_and_keep_their_contents() {
        let a = SizeClasses::new(System);
        let mut live: Vec<(usize, *mut u8, Layout)> = Vec::new();
        // Sizes over every class and past the largest, several alignments, interleaved frees.
        for i in 0..3000usize {
            let align = 1 << (i % 7);
            let size = (1 + (i * 37) % (MAX_SMALL + 600)).next_multiple_of(align);
            let l = layout(size, align);
            let p = unsafe { a.alloc(l) };
            assert!(!p.is_null());
            assert_eq!(p as usize % align, 0, "block {i} of {l:?} misaligned");
            for j in 0..size {
                unsafe { p.add(j).write(pattern(i, j)) };
            }
            live.push((i, p, l));
            if i % 3 == 2 {
                // Free an older block; its slot is reused by a later allocation.
                let (_, q, ql) = live.swap_remove(i % live.len());
                unsafe { a.dealloc(q, ql) };
            }
        }
        assert_eq!(live.len(), 2000);
        // Every live block still holds what was written into it: no two blocks overlapped,
        // and no free-list link was written over a live block.
        for &(i, p, l) in &live {
            for j in 0..l.size() {
                assert_eq!(
                    unsafe { p.add(j).read() },
                    pattern(i, j),
                    "block {i} byte {j} changed"
                );
            }
        }
        for (_, p, l) in live {
            unsafe { a.dealloc(p, l) };
        }
    }

    #[test]
    fn a_freed_block_is_reused_by_its_class_without_asking_the_system() {
        let a = SizeClasses::new(Counting::default());
        let system = &a.system;
        let l = layout(24, 8);
        let p = unsafe { a.alloc(l) };
        assert_eq!(
            system.allocs.load(Ordering::Relaxed),
            1,
            "one slab for the 32-byte class"
        );
        unsafe { a.dealloc(p, l) };
        // Same class (17..=32 bytes): the same block comes back.
        let q = unsafe { a.alloc(layout(32, 4)) };
        assert_eq!(p, q);
        // The slab serves 4096 / 32 = 128 blocks before the class asks for another.
        let more: Vec<_> = (0..127).map(|_| unsafe { a.alloc(l) }).collect();
        assert_eq!(system.allocs.load(Ordering::Relaxed), 1);
        let _next = unsafe { a.alloc(l) };
        assert_eq!(system.allocs.load(Ordering::Relaxed), 2);
        assert!(more.iter().all(|b| !b.is_null() && *b != q));
        assert_eq!(
            system.frees.load(Ordering::Relaxed),
            0,
            "small blocks stay in their class"
        );
    }

    #[test]
    fn large_blocks_go_to_the_system_and_back() {
        let a = SizeClasses::new(Counting::default());
        let system = &a.system;
        let l = layout(MAX_SMALL + 1, 8);
        let p = unsafe { a.alloc(l) };
        unsafe { a.dealloc(p, l) };
        assert_eq!(system.allocs.load(Ordering::Relaxed), 1);
        assert_eq!(system.frees.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn realloc_keeps_the_contents_across_classes_and_into_large_blocks() {
        let a = SizeClasses::new(System);
        let mut l = layout(5, 1);
        let mut p = unsafe { a.alloc(l) };
        for j in 0..5 {
            unsafe { p.add(j).write(j as u8) };
        }
        // Grow within the class (same block), across classes, past the largest class, then
        // shrink back into a class.
        for new_size in [16, 100, 3000, MAX_SMALL * 3, MAX_SMALL * 5, 40] {
            let old = p;
            p = unsafe { a.realloc(p, l, new_size) };
            assert!(!p.is_null());
            if new_size == 16 {
                assert_eq!(p, old, "growing inside the 16-byte class keeps the block");
            }
            for j in 0..5 {
                assert_eq!(
                    unsafe { p.add(j).read() },
                    j as u8,
                    "byte {j} after realloc to {new_size}"
                );
            }
            l = layout(new_size, 1);
        }
        unsafe { a.dealloc(p, l) };
    }

    #[test]
    fn alloc_zeroed_clears_a_reused_block() {
        let a = SizeClasses::new(System);
        let l = layout(64, 8);
        let p = unsafe { a.alloc(l) };
        unsafe { p.write_bytes(0xAB, 64) };
        unsafe { a.dealloc(p, l) };
        // The block comes back holding the free-list link and the old bytes; zeroed it must be.
        let q = unsafe { a.alloc_zeroed(l) };
        assert_eq!(p, q);
        assert!((0..64).all(|j| unsafe { q.add(j).read() } == 0));
        unsafe { a.dealloc(q, l) };
    }
}
