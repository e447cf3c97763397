//! The retry budget: retries may add at most a fixed share of load, plus a small floor.
//!
//! Retrying is what turns a partial outage into a full one when every client retries at once. Each new
//! tunneled connection deposits `ratio` tokens; each retry withdraws one; a floor of `min_per_second`
//! tokens accrues with time so that a quiet proxy can still retry. The balance is capped so that a long
//! quiet period cannot bank an unlimited burst. Pure logic: time is passed in.

use std::time::Instant;

/// Token-bucket retry budget.
#[derive(Debug, Clone)]
pub struct RetryBudget {
    ratio: f64,
    min_per_second: f64,
    cap: f64,
    balance: f64,
    last: Instant,
}

impl RetryBudget {
    /// A budget allowing `ratio` retries per request plus `min_per_second`, starting full at `now`.
    pub fn new(ratio: f64, min_per_second: u32, now: Instant) -> Self {
        let min = f64::from(min_per_second);
        // Ten seconds' worth of the floor, or at least one retry.
        let cap = (min * 10.0).max(1.0) + ratio * 100.0;
        Self {
            ratio,
            min_per_second: min,
            cap,
            balance: cap,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.balance = (self.balance + dt * self.min_per_second).min(self.cap);
    }

    /// Records a new request.
    pub fn deposit(&mut self, now: Instant) {
        self.refill(now);
        self.balance = (self.balance + self.ratio).min(self.cap);
    }

    /// Takes one retry token if there is one.
    pub fn try_withdraw(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.balance >= 1.0 {
            self.balance -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn ratio_bounds_retries_under_load() {
        let t0 = Instant::now();
        let mut b = RetryBudget::new(0.2, 0, t0);
        // Drain the initial balance.
        while b.try_withdraw(t0) {}
        let mut granted = 0;
        for _ in 0..1000 {
            b.deposit(t0);
            if b.try_withdraw(t0) {
                granted += 1;
            }
        }
        assert!((199..=201).contains(&granted), "granted {granted}");
    }

    #[test]
    fn floor_accrues_with_time_and_is_capped() {
        let t0 = Instant::now();
        let mut b = RetryBudget::new(0.0, 10, t0);
        while b.try_withdraw(t0) {}
        let t1 = t0 + Duration::from_secs(1);
        let n = std::iter::from_fn(|| b.try_withdraw(t1).then_some(())).count();
        assert_eq!(n, 10);
        let t2 = t1 + Duration::from_secs(3600);
        let n = std::iter::from_fn(|| b.try_withdraw(t2).then_some(())).count();
        assert_eq!(n, 100, "cap is ten seconds of the floor");
    }
}
