//! A fast hash for a filter's own maps.
//!
//! `std`'s `HashMap` hashes with SipHash-1-3, keyed at random: safe against keys chosen to
//! collide, and on wasm32 about ten times the cost of the Fx hash below for short keys
//! (an API key lookup in `auth` spent ~270 Wasm instructions in SipHash alone). Use
//! [`FastMap`]/[`FastSet`] where the keys are the filter's own (config entries, values it
//! validated, series it named) or where a lookup with a forged key can at worst walk the
//! probe sequence of entries the filter put there itself. Keep `std`'s default for maps that
//! grow from what clients send: there, forced collisions are a denial of service.
//!
//! ```
//! let mut seen: weir_sdk::hash::FastMap<Vec<u8>, usize> = Default::default();
//! seen.insert(b"key".to_vec(), 1);
//! assert_eq!(seen.get(b"key".as_slice()), Some(&1));
//! ```

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

/// The Fx hash of rustc: a word at a time, one rotate, xor and multiply per word; 64-bit
/// operations only (foldhash's 128-bit multiply is a library call on wasm32). Not keyed:
/// see the module's notes on where it belongs.
#[derive(Debug, Default, Clone, Copy)]
pub struct FxHasher(u64);

impl FxHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.add(u64::from_le_bytes(c.try_into().expect("8 bytes")));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(w));
        }
    }
    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }
    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }
    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }
    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
}

/// Builds [`FxHasher`]s (for `HashMap::with_hasher` and friends).
pub type FastBuildHasher = BuildHasherDefault<FxHasher>;

/// Builds [`FxHasher`]s that start from a random seed chosen when it is made: where the
/// bucket a key lands in should not be predictable from outside (a map of secrets a client's
/// input is looked up in), at the cost of one random number per map.
///
/// ```
/// use std::collections::HashMap;
/// let mut m: HashMap<Vec<u8>, u32, weir_sdk::hash::SeededFx> =
///     HashMap::with_hasher(weir_sdk::hash::SeededFx::random());
/// m.insert(b"k".to_vec(), 1);
/// ```
#[derive(Debug, Clone, Copy)]
pub struct SeededFx(u64);

impl SeededFx {
    /// A seed from the platform's random source (WASI `random` in a filter).
    pub fn random() -> SeededFx {
        use std::hash::BuildHasher;
        SeededFx(std::collections::hash_map::RandomState::new().hash_one(0x5eed_u64))
    }
}

impl std::hash::BuildHasher for SeededFx {
    type Hasher = FxHasher;
    fn build_hasher(&self) -> FxHasher {
        FxHasher(self.0)
    }
}

/// A `HashMap` hashed with [`FxHasher`].
pub type FastMap<K, V> = HashMap<K, V, FastBuildHasher>;

/// A `HashSet` hashed with [`FxHasher`].
pub type FastSet<T> = HashSet<T, FastBuildHasher>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::{BuildHasher, Hash};

    fn hash<T: Hash + ?Sized>(v: &T) -> u64 {
        FastBuildHasher::default().hash_one(v)
    }

    #[test]
    fn equal_keys_hash_alike_and_near_keys_apart() {
        assert_eq!(
            hash(b"0123456789abcdef-key".as_slice()),
            hash(b"0123456789abcdef-key".as_slice())
        );
        // Every key differing in one byte, at any position (word boundaries and the tail).
        let base = b"0123456789abcdef-key".to_vec();
        let mut seen = FastSet::default();
        seen.insert(hash(base.as_slice()));
        for i in 0..base.len() {
            let mut k = base.clone();
            k[i] ^= 1;
            assert!(seen.insert(hash(k.as_slice())), "byte {i}");
        }
        // The length is part of a slice's hash: a zero tail is not the same key.
        assert_ne!(hash(b"ab".as_slice()), hash(b"ab\0".as_slice()));
    }

    #[test]
    fn seeds_move_keys() {
        let (a, b) = (SeededFx::random(), SeededFx::random());
        assert_eq!(a.hash_one(b"key".as_slice()), a.hash_one(b"key".as_slice()));
        assert_ne!(a.hash_one(b"key".as_slice()), b.hash_one(b"key".as_slice()));
    }

    #[test]
    fn maps_work_as_maps() {
        let mut m: FastMap<String, usize> = FastMap::default();
        for i in 0..1000 {
            m.insert(format!("key-{i}"), i);
        }
        assert_eq!(m.len(), 1000);
        assert!((0..1000).all(|i| m[&format!("key-{i}")] == i));
    }
}
