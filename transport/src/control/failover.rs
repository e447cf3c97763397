//! Which controller a proxy talks to, and how long it waits before the next attempt.
//!
//! A mesh may run several controllers behind one store. Proxies start at a random one, so a fleet
//! configured with the same list spreads over all of them instead of piling onto the first; when the
//! one they follow goes away they move to the next in the list. After a controller restart every proxy
//! reconnects at once, so the first retry is spread over [`SPREAD`] (jitter from zero) and only a whole
//! round of failed controllers starts exponential backoff, jittered to 50–100 % so the rounds of many
//! proxies drift apart. Pure functions: the caller supplies the random numbers.

use std::time::Duration;

/// The first attempt after losing a controller waits a random share of this.
pub const SPREAD: Duration = Duration::from_millis(1000);
/// Backoff after the first whole round of failed controllers.
pub const BASE: Duration = Duration::from_millis(500);
/// Longest wait between attempts.
pub const MAX: Duration = Duration::from_secs(10);

/// Index of the controller to start with among `n`, from `rand01` in 0..1 (uniform over the list).
pub fn first_choice(n: usize, rand01: f64) -> usize {
    if n == 0 {
        return 0;
    }
    // `as` saturates; the `min` keeps rand01 = 1.0 in range.
    ((rand01.clamp(0.0, 1.0) * n as f64) as usize).min(n - 1)
}

/// Index of the controller to try after `current` failed: the next one, wrapping.
pub fn next_choice(current: usize, n: usize) -> usize {
    if n == 0 { 0 } else { (current + 1) % n }
}

/// Wait before attempt number `failures` + 1, `failures` (≥ 1) being the consecutive failed attempts
/// over `n` controllers, `jitter01` in 0..1. While some controller of the list is untried since the
/// last success the wait is `jitter01 × SPREAD`; then it doubles per whole round from [`BASE`], capped
/// at [`MAX`], scaled to 50–100 % by the jitter.
pub fn retry_delay(failures: u32, n: usize, jitter01: f64) -> Duration {
    let j = jitter01.clamp(0.0, 1.0);
    let n = u32::try_from(n.max(1)).unwrap_or(u32::MAX);
    let rounds = failures.saturating_sub(1) / n;
    if rounds == 0 {
        return SPREAD.mul_f64(j);
    }
    let exp = BASE.saturating_mul(1u32 << (rounds - 1).min(16));
    exp.min(MAX).mul_f64(0.5 + 0.5 * j)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_choice_is_uniform_over_the_list() {
        assert_eq!(first_choice(3, 0.0), 0);
        assert_eq!(first_choice(3, 0.34), 1);
        assert_eq!(first_choice(3, 0.99), 2);
        assert_eq!(first_choice(3, 1.0), 2, "upper edge stays in range");
        assert_eq!(first_choice(3, -1.0), 0);
        assert_eq!(first_choice(1, 0.7), 0);
        assert_eq!(first_choice(0, 0.7), 0);
        let mut counts = [0u32; 3];
        for i in 0..300 {
            counts[first_choice(3, f64::from(i) / 300.0)] += 1;
        }
        assert_eq!(counts, [100, 100, 100]);
    }

    #[test]
    fn next_choice_walks_the_list_and_wraps() {
        assert_eq!(next_choice(0, 3), 1);
        assert_eq!(next_choice(1, 3), 2);
        assert_eq!(next_choice(2, 3), 0);
        assert_eq!(next_choice(0, 1), 0);
        assert_eq!(next_choice(5, 0), 0);
    }

    #[test]
    fn the_first_round_fails_over_quickly_with_spread() {
        // Three controllers: the first two failures move on within SPREAD, jittered from zero.
        for failures in 1..=3 {
            assert_eq!(retry_delay(failures, 3, 0.0), Duration::ZERO);
            assert_eq!(retry_delay(failures, 3, 0.5), SPREAD / 2);
            assert_eq!(retry_delay(failures, 3, 1.0), SPREAD);
        }
        // One controller: only the first retry is quick.
        assert_eq!(retry_delay(1, 1, 1.0), SPREAD);
        assert_eq!(retry_delay(2, 1, 1.0), BASE);
    }

    #[test]
    fn whole_rounds_back_off_exponentially_with_jitter_and_a_cap() {
        assert_eq!(retry_delay(4, 3, 1.0), BASE);
        assert_eq!(retry_delay(4, 3, 0.0), BASE / 2);
        assert_eq!(retry_delay(7, 3, 1.0), BASE * 2);
        assert_eq!(retry_delay(10, 3, 1.0), BASE * 4);
        assert_eq!(retry_delay(1000, 3, 1.0), MAX);
        assert_eq!(retry_delay(u32::MAX, 3, 0.0), MAX / 2);
        assert_eq!(
            retry_delay(u32::MAX, 0, 2.0),
            MAX,
            "jitter clamped, n = 0 as one"
        );
        // Monotonic in the failures for a fixed jitter.
        let mut last = Duration::ZERO;
        for f in 1..200 {
            let d = retry_delay(f, 2, 0.3);
            assert!(d >= last, "{f}: {d:?} < {last:?}");
            last = d;
        }
    }
}
