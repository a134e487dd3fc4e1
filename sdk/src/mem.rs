//! `memcmp` and `bcmp` for filters, a word at a time.
//!
//! Every `==` on strings and byte slices, `starts_with`, and every map lookup by a string key
//! ends in `memcmp` (or `bcmp`). wasi-libc's compares a byte at a time: about 25 Wasm
//! instructions per byte, so comparing an 11-byte key cost ~280. Defining the two symbols here
//! keeps the linker from taking wasi-libc's (an archive member is only pulled in for a symbol
//! nothing else defines). On by default (the `memcmp` feature), Wasm builds only.

/// The sign of the first differing byte's difference (unsigned bytes), 0 if none: what
/// `memcmp` answers. Compares eight bytes at a time while it can.
pub(crate) fn compare(a: &[u8], b: &[u8]) -> i32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut i = 0;
    while i + 8 <= n {
        let x = u64::from_le_bytes(a[i..i + 8].try_into().expect("8 bytes"));
        let y = u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        if x != y {
            // Little-endian: the lowest differing bit is in the first differing byte.
            let d = i + ((x ^ y).trailing_zeros() / 8) as usize;
            return i32::from(a[d]) - i32::from(b[d]);
        }
        i += 8;
    }
    while i < n {
        if a[i] != b[i] {
            return i32::from(a[i]) - i32::from(b[i]);
        }
        i += 1;
    }
    0
}

#[cfg(all(feature = "memcmp", target_arch = "wasm32"))]
#[allow(unsafe_code)]
mod symbols {
    /// # Safety
    /// The C contract: `a` and `b` are readable for `n` bytes.
    #[no_mangle]
    pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
        if n == 0 {
            return 0;
        }
        // SAFETY: the caller's contract.
        let (a, b) = unsafe { (std::slice::from_raw_parts(a, n), std::slice::from_raw_parts(b, n)) };
        super::compare(a, b)
    }

    /// # Safety
    /// As [`memcmp`]; only zero or not matters.
    #[no_mangle]
    pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
        // SAFETY: the same contract.
        unsafe { memcmp(a, b, n) }
    }
}

#[cfg(test)]
mod tests {
    use super::compare;

    #[test]
    fn every_length_and_every_differing_position_orders_like_byte_slices() {
        let text: Vec<u8> = (0..40u8).map(|i| i.wrapping_mul(37).wrapping_add(11)).collect();
        for len in 0..text.len() {
            let a = &text[..len];
            assert_eq!(compare(a, a), 0, "equal, length {len}");
            for i in 0..len {
                for delta in [1u8, 0x80, 0xff] {
                    let mut b = a.to_vec();
                    b[i] = b[i].wrapping_add(delta);
                    let want = a.cmp(&b[..]);
                    let got = compare(a, &b);
                    assert_eq!(
                        got.signum(),
                        want as i32,
                        "length {len}, byte {i} changed by {delta}"
                    );
                    assert_eq!(
                        got,
                        i32::from(a[i]) - i32::from(b[i]),
                        "memcmp's value: the byte difference"
                    );
                }
            }
        }
    }

    #[test]
    fn only_the_first_difference_counts() {
        // The later difference points the other way; the first one decides.
        let a = b"abcdefgh-abcdefgh-Z";
        let b = b"abcdefgh-abcdefgi-A";
        assert!(compare(a, b) < 0);
        assert!(compare(b, a) > 0);
    }
}
