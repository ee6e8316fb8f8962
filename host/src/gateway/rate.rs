//! Inbound rate limiting per connection: a token bucket (sustained rate,
//! burst of twice the rate) and the rule that closes persistent abusers.

use std::time::{Duration, Instant};

/// A gap this long without a rejection ends an abuse streak.
const STREAK_GAP: Duration = Duration::from_secs(1);

/// What the limiter says about one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Within the rate.
    Allowed,
    /// Over the rate: answer `rate_limited`.
    Limited,
    /// Over the rate with no 1 s pause for the whole abuse window: close.
    Abusive,
}

/// Token bucket for one connection.
#[derive(Debug)]
pub struct RateLimiter {
    per_second: f64,
    burst: f64,
    tokens: f64,
    refilled_at: Instant,
    abuse_window: Duration,
    streak_started: Option<Instant>,
    last_rejection: Option<Instant>,
}

impl RateLimiter {
    /// `per_second == 0` disables limiting.
    pub fn new(per_second: u32, abuse_window: Duration, now: Instant) -> Self {
        let per_second = f64::from(per_second);
        Self {
            per_second,
            burst: per_second * 2.0,
            tokens: per_second * 2.0,
            refilled_at: now,
            abuse_window,
            streak_started: None,
            last_rejection: None,
        }
    }

    /// Takes one token for a frame arriving at `now`.
    pub fn check(&mut self, now: Instant) -> Verdict {
        if self.per_second == 0.0 {
            return Verdict::Allowed;
        }
        let elapsed = now
            .saturating_duration_since(self.refilled_at)
            .as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.burst);
        self.refilled_at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Verdict::Allowed;
        }
        let continues_streak = self
            .last_rejection
            .is_some_and(|last| now.saturating_duration_since(last) < STREAK_GAP);
        if !continues_streak {
            self.streak_started = Some(now);
        }
        self.last_rejection = Some(now);
        match self.streak_started {
            Some(started) if now.saturating_duration_since(started) >= self.abuse_window => {
                Verdict::Abusive
            }
            _ => Verdict::Limited,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_of_twice_the_rate_passes_then_frames_are_limited() {
        let start = Instant::now();
        let mut limiter = RateLimiter::new(10, Duration::from_secs(10), start);
        let allowed = (0..25)
            .filter(|_| limiter.check(start) == Verdict::Allowed)
            .count();
        assert_eq!(allowed, 20);
        // 100 ms refills one token.
        assert_eq!(
            limiter.check(start + Duration::from_millis(100)),
            Verdict::Allowed
        );
    }

    #[test]
    fn rejections_without_a_one_second_pause_for_the_window_are_abusive() {
        let start = Instant::now();
        let mut limiter = RateLimiter::new(1, Duration::from_secs(10), start);
        limiter.check(start);
        limiter.check(start);
        let mut now = start;
        let mut verdict = Verdict::Allowed;
        for _ in 0..2000 {
            now += Duration::from_millis(10);
            verdict = limiter.check(now);
            if verdict == Verdict::Abusive {
                break;
            }
        }
        assert_eq!(verdict, Verdict::Abusive);
        assert!(now - start >= Duration::from_secs(10));
    }

    #[test]
    fn a_pause_resets_the_streak() {
        let start = Instant::now();
        let mut limiter = RateLimiter::new(1, Duration::from_secs(2), start);
        limiter.check(start);
        limiter.check(start);
        assert_eq!(limiter.check(start), Verdict::Limited);
        // Exhaust tokens again after a long pause; the streak starts afresh.
        let later = start + Duration::from_secs(5);
        limiter.check(later);
        limiter.check(later);
        assert_eq!(limiter.check(later), Verdict::Limited);
    }

    #[test]
    fn zero_disables_limiting() {
        let start = Instant::now();
        let mut limiter = RateLimiter::new(0, Duration::from_secs(10), start);
        assert!((0..10_000).all(|_| limiter.check(start) == Verdict::Allowed));
    }
}
