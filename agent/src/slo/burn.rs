//! Error budgets and multiwindow, multi-burn-rate alerts (SRE Workbook, chapter 5): for a
//! 28-day period, page when the burn rate is above 14.4 over both 1 h and 5 min, or above 6 over
//! both 6 h and 30 min; open a ticket when it is above 1 over both 3 d and 6 h. Other periods
//! scale the windows by period / 28 d (a 28-minute SLO's first rule looks at 2.5 s and 0.21 s).
//! A window with fewer events than the SLO's `minEvents` is "no data", which never fires.

use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The period the rules are written for.
const BASE_PERIOD: Duration = Duration::from_hours(672);

/// One alerting rule.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rule {
    /// `page` or `ticket`.
    pub severity: &'static str,
    /// The burn rate both windows must exceed.
    pub factor: f64,
    /// The long window.
    pub long: Duration,
    /// The short window.
    pub short: Duration,
}

/// The three rules, scaled to `period`.
#[must_use]
pub fn rules(period: Duration) -> [Rule; 3] {
    let scale = period.as_secs_f64() / BASE_PERIOD.as_secs_f64();
    let w = |secs: u32| Duration::from_secs_f64(f64::from(secs) * scale);
    [
        Rule {
            severity: "page",
            factor: 14.4,
            long: w(3600),
            short: w(300),
        },
        Rule {
            severity: "page",
            factor: 6.0,
            long: w(6 * 3600),
            short: w(1800),
        },
        Rule {
            severity: "ticket",
            factor: 1.0,
            long: w(3 * 86_400),
            short: w(6 * 3600),
        },
    ]
}

/// Good and total events in some span.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Events {
    /// Good events.
    pub good: u64,
    /// All events.
    pub total: u64,
}

impl Events {
    /// Bad events.
    #[must_use]
    pub const fn bad(self) -> u64 {
        self.total.saturating_sub(self.good)
    }
}

/// How fast the budget burns: the bad share divided by the share the objective allows (1.0
/// spends exactly the budget over the period). `None` without events.
#[must_use]
pub fn burn_rate(e: Events, target: f64) -> Option<f64> {
    if e.total == 0 {
        return None;
    }
    #[expect(clippy::cast_precision_loss, reason = "event counts far below 2^52")]
    let bad_share = e.bad() as f64 / e.total as f64;
    Some(bad_share / (1.0 - target))
}

/// The share of the period's budget left (1: untouched, 0: spent, below 0: overspent). `None`
/// without events.
#[must_use]
pub fn budget_remaining(e: Events, target: f64) -> Option<f64> {
    burn_rate(e, target).map(|b| 1.0 - b)
}

/// What a rule says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Both windows burn faster than the rule's factor.
    Firing,
    /// At least one does not.
    Quiet,
    /// A window has fewer events than `minEvents`.
    NoData,
}

/// The rule's state from the events of its long and short windows.
#[must_use]
pub fn evaluate(rule: &Rule, long: Events, short: Events, target: f64, min_events: u64) -> State {
    if long.total < min_events || short.total < min_events {
        return State::NoData;
    }
    match (burn_rate(long, target), burn_rate(short, target)) {
        (Some(l), Some(s)) if l > rule.factor && s > rule.factor => State::Firing,
        _ => State::Quiet,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn rules_scale_with_the_period() {
        let [fast, slow, ticket] = rules(BASE_PERIOD);
        assert_eq!(
            (fast.long, fast.short),
            (Duration::from_hours(1), Duration::from_mins(5))
        );
        assert_eq!(
            (slow.long, slow.short),
            (Duration::from_hours(6), Duration::from_mins(30))
        );
        assert_eq!(
            (ticket.long, ticket.short),
            (Duration::from_hours(72), Duration::from_hours(6))
        );
        // 28 minutes: everything 1,440 times shorter.
        let [fast, _, ticket] = rules(Duration::from_mins(28));
        assert_eq!(fast.long, Duration::from_secs_f64(2.5));
        assert!((fast.short.as_secs_f64() - 300.0 / 1440.0).abs() < 1e-9);
        assert_eq!(ticket.long, Duration::from_mins(3));
    }

    #[test]
    fn burn_rates_and_budgets_by_hand() {
        // 99.9 %: 1,000,000 requests may fail 1,000. 2,000 failed of 100,000 is a 2 % bad
        // share, 20 times the 0.1 % allowed.
        let e = Events {
            good: 98_000,
            total: 100_000,
        };
        assert!(close(burn_rate(e, 0.999).unwrap(), 20.0));
        assert!(close(budget_remaining(e, 0.999).unwrap(), -19.0));
        // 99 %: 5 bad of 1,000 is half the budget.
        let e = Events {
            good: 995,
            total: 1000,
        };
        assert!(close(burn_rate(e, 0.99).unwrap(), 0.5));
        assert!(close(budget_remaining(e, 0.99).unwrap(), 0.5));
        assert_eq!(burn_rate(Events::default(), 0.99), None);
        assert!(close(
            burn_rate(
                Events {
                    good: 10,
                    total: 10
                },
                0.99
            )
            .unwrap(),
            0.0
        ));
    }

    #[test]
    fn both_windows_must_burn_and_too_few_events_is_no_data() {
        let [fast, ..] = rules(BASE_PERIOD);
        // 99.9 %: a 2 % bad share burns at 20 > 14.4.
        let burning = Events {
            good: 980,
            total: 1000,
        };
        let calm = Events {
            good: 1000,
            total: 1000,
        };
        assert_eq!(evaluate(&fast, burning, burning, 0.999, 10), State::Firing);
        assert_eq!(evaluate(&fast, burning, calm, 0.999, 10), State::Quiet);
        assert_eq!(evaluate(&fast, calm, burning, 0.999, 10), State::Quiet);
        // Below the factor: 1.4 % bad burns at 14.
        let at = Events {
            good: 9860,
            total: 10_000,
        };
        assert_eq!(evaluate(&fast, at, at, 0.999, 10), State::Quiet);
        let few = Events { good: 0, total: 9 };
        assert_eq!(evaluate(&fast, burning, few, 0.999, 10), State::NoData);
    }
}
