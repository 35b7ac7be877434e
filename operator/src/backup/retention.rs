//! Retention: which backups to keep. A pure function of the catalog, the rules and the time zone, with the
//! semantics of restic's `forget` (the engine K8up uses): a backup is kept when any rule keeps it.
//!
//! - `keepLast N`: the N newest backups.
//! - `keepDaily N`: the newest backup of each of the N newest calendar days that have a backup.
//! - `keepWeekly N`: the same per ISO week; `keepMonthly N`: per calendar month.
//!
//! Days, weeks and months are those of the schedule's time zone. The newest backup is always kept, whatever
//! the rules say, so retention can never leave a policy without its newest verified backup.

use std::collections::BTreeSet;

use jiff::Timestamp;
use jiff::tz::TimeZone;

use crate::api::backup_policy::Retention;

/// One backup as retention sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub id: String,
    pub completed: Timestamp,
}

/// Why a backup is kept.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum KeepReason {
    Newest,
    Last,
    Daily,
    Weekly,
    Monthly,
}

/// The decision for one catalog.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Decision {
    /// Kept backups (newest first) with every reason that keeps them.
    pub keep: Vec<(String, Vec<KeepReason>)>,
    /// Backups to delete (newest first).
    pub delete: Vec<String>,
}

fn count(n: Option<i32>) -> usize {
    n.map(|n| n.max(0) as usize).unwrap_or(0)
}

/// Maps a local time to its calendar bucket (day, ISO week or month).
type BucketOf = fn(&jiff::Zoned) -> (i32, i32);

/// Applies the rules to the backups. Without rules (`None`) every backup is kept.
pub fn decide(backups: &[Candidate], rules: Option<&Retention>, tz: &TimeZone) -> Decision {
    let mut sorted: Vec<&Candidate> = backups.iter().collect();
    // Newest first; ties broken by id so the result does not depend on input order.
    sorted.sort_by(|a, b| b.completed.cmp(&a.completed).then_with(|| b.id.cmp(&a.id)));
    let Some(rules) = rules else {
        return Decision {
            keep: sorted.iter().map(|c| (c.id.clone(), vec![KeepReason::Last])).collect(),
            delete: Vec::new(),
        };
    };
    let mut reasons: Vec<Vec<KeepReason>> = vec![Vec::new(); sorted.len()];
    if let Some(r) = reasons.first_mut() {
        r.push(KeepReason::Newest);
    }
    for r in reasons.iter_mut().take(count(rules.keep_last)) {
        r.push(KeepReason::Last);
    }
    let buckets: [(usize, KeepReason, BucketOf); 3] = [
        (count(rules.keep_daily), KeepReason::Daily, |z| (i32::from(z.year()), i32::from(z.day_of_year()))),
        (count(rules.keep_weekly), KeepReason::Weekly, |z| {
            let w = z.date().iso_week_date();
            (i32::from(w.year()), i32::from(w.week()))
        }),
        (count(rules.keep_monthly), KeepReason::Monthly, |z| (i32::from(z.year()), i32::from(z.month()))),
    ];
    for (n, reason, bucket_of) in buckets {
        let mut seen = BTreeSet::new();
        for (i, c) in sorted.iter().enumerate() {
            if seen.len() >= n {
                break;
            }
            // Newest first, so the first backup seen in a bucket is that bucket's newest.
            if seen.insert(bucket_of(&c.completed.to_zoned(tz.clone()))) {
                reasons[i].push(reason.clone());
            }
        }
    }
    let mut decision = Decision::default();
    for (c, r) in sorted.iter().zip(reasons) {
        if r.is_empty() {
            decision.delete.push(c.id.clone());
        } else {
            decision.keep.push((c.id.clone(), r));
        }
    }
    decision
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::ToSpan;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    /// One backup a day at 02:15 UTC for `days` days up to 2026-11-29.
    fn daily(days: i64) -> Vec<Candidate> {
        let last = ts("2026-11-29T02:15:00Z");
        (0..days)
            .map(|d| {
                let t = last.checked_sub((d * 24).hours()).unwrap();
                Candidate { id: t.strftime("%Y%m%dT%H%M%SZ").to_string(), completed: t }
            })
            .collect()
    }

    fn kept(d: &Decision) -> Vec<String> {
        d.keep.iter().map(|(id, _)| id.clone()).collect()
    }

    #[test]
    fn a_synthetic_year_keeps_exactly_the_expected_set() {
        let backups = daily(400);
        let rules = Retention { keep_last: Some(3), keep_daily: Some(7), keep_weekly: Some(4), keep_monthly: Some(12) };
        let d = decide(&backups, Some(&rules), &TimeZone::UTC);
        let kept = kept(&d);
        // 7 daily (Nov 23..29), weekly: Sundays ending the ISO weeks before the current one (Nov 22, 15, 8)
        // plus this week's newest (Nov 29 is a Sunday), monthly: the last day of each month Dec 2025..Oct 2026
        // plus Nov 29.
        let expected: BTreeSet<&str> = [
            "20261129T021500Z",
            "20261128T021500Z",
            "20261127T021500Z",
            "20261126T021500Z",
            "20261125T021500Z",
            "20261124T021500Z",
            "20261123T021500Z",
            "20261122T021500Z",
            "20261115T021500Z",
            "20261108T021500Z",
            "20261031T021500Z",
            "20260930T021500Z",
            "20260831T021500Z",
            "20260731T021500Z",
            "20260630T021500Z",
            "20260531T021500Z",
            "20260430T021500Z",
            "20260331T021500Z",
            "20260228T021500Z",
            "20260131T021500Z",
            "20251231T021500Z",
        ]
        .into_iter()
        .collect();
        assert_eq!(kept.iter().map(String::as_str).collect::<BTreeSet<_>>(), expected);
        assert_eq!(d.keep.len() + d.delete.len(), 400);
        assert_eq!(
            d.keep[0].1,
            vec![KeepReason::Newest, KeepReason::Last, KeepReason::Daily, KeepReason::Weekly, KeepReason::Monthly]
        );
    }

    #[test]
    fn the_newest_backup_is_kept_even_by_rules_that_keep_nothing_else() {
        let backups = daily(5);
        let rules = Retention { keep_monthly: Some(0), ..Retention::default() };
        let d = decide(&backups, Some(&rules), &TimeZone::UTC);
        assert_eq!(kept(&d), vec!["20261129T021500Z".to_string()]);
        assert_eq!(d.delete.len(), 4);
    }

    #[test]
    fn without_rules_everything_is_kept_and_input_order_does_not_matter() {
        let mut backups = daily(10);
        assert!(decide(&backups, None, &TimeZone::UTC).delete.is_empty());
        let rules = Retention { keep_last: Some(2), keep_daily: Some(4), ..Retention::default() };
        let a = decide(&backups, Some(&rules), &TimeZone::UTC);
        backups.reverse();
        assert_eq!(decide(&backups, Some(&rules), &TimeZone::UTC), a);
        assert_eq!(a.keep.len(), 4);
    }

    #[test]
    fn several_backups_a_day_keep_only_the_newest_of_each_day() {
        let mut backups = Vec::new();
        for day in 20..=22 {
            for hour in [1, 9, 17] {
                let t = ts(&format!("2026-11-{day}T{hour:02}:00:00Z"));
                backups.push(Candidate { id: format!("{day}-{hour}"), completed: t });
            }
        }
        let rules = Retention { keep_daily: Some(2), ..Retention::default() };
        let d = decide(&backups, Some(&rules), &TimeZone::UTC);
        assert_eq!(kept(&d), vec!["22-17".to_string(), "21-17".to_string()]);
    }

    #[test]
    fn days_are_those_of_the_schedule_time_zone() {
        // 23:30 UTC on Nov 21 is already Nov 22 in Berlin, so in Berlin these two backups share a day.
        let backups = vec![
            Candidate { id: "late".into(), completed: ts("2026-11-21T23:30:00Z") },
            Candidate { id: "next".into(), completed: ts("2026-11-22T10:00:00Z") },
        ];
        let rules = Retention { keep_daily: Some(5), ..Retention::default() };
        let berlin = TimeZone::get("Europe/Berlin").unwrap();
        assert_eq!(decide(&backups, Some(&rules), &berlin).delete, vec!["late".to_string()]);
        assert!(decide(&backups, Some(&rules), &TimeZone::UTC).delete.is_empty());
    }
}
