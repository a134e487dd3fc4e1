//! The coarse clock: milliseconds at the kernel's tick (1 to 10 ms), read without the cycle
//! counter. For what needs no better: how long a pooled connection sat idle.

/// Milliseconds on a monotonic clock of tick resolution (Linux's `CLOCK_MONOTONIC_COARSE`;
/// elsewhere the precise clock). Only differences between two reads mean anything.
#[cfg(target_os = "linux")]
pub fn coarse_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant the kernel
    // has had since 2.6.32. It cannot fail with these arguments.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    debug_assert_eq!(rc, 0);
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

/// Milliseconds on a monotonic clock (the precise one, off Linux).
#[cfg(not(target_os = "linux"))]
pub fn coarse_ms() -> u64 {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    EPOCH.get_or_init(std::time::Instant::now).elapsed().as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_coarse_clock_follows_the_precise_one_within_its_tick() {
        // The precise reads bracket the coarse ones: a preemption between two reads can only
        // widen the bracket, never fail the test.
        let before = std::time::Instant::now();
        let c0 = coarse_ms();
        std::thread::sleep(std::time::Duration::from_millis(120));
        let c1 = coarse_ms();
        let bracket = before.elapsed().as_millis() as u64;
        let coarse = c1 - c0;
        // A tick is at most 10 ms (HZ=100): each read lags the precise clock by less.
        assert!(coarse + 10 >= 120, "coarse {coarse} ms over a 120 ms sleep");
        assert!(
            coarse <= bracket + 10,
            "coarse {coarse} ms, precise bracket {bracket} ms"
        );
    }
}
