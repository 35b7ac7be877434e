//! Learned, explainable volumes: how many reads each team (or named identity) makes of each table in each hour,
//! compared with the same hour of the week in the weeks before. An hour whose reads rise far above that hour's
//! median, counted in robust spreads (1.4826 × the median absolute deviation, at least one read), is unusual; the
//! finding shows the baseline it was compared with. Pure: accesses and their times go in, findings come out; the
//! learned counts are saved (and loaded) as JSON.

use std::collections::{BTreeMap, BTreeSet};

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use super::access::{Access, Kind};
use super::attribution::{Identities, Who};
use super::rules::Found;
use crate::api::access_monitor::{BaselineRule, FindingRule};

/// Hours in a week.
pub const WEEK: i64 = 168;
/// Most (identity, table) pairs learned; reads of further pairs are not learned (and so never unusual).
pub const MAX_PAIRS: usize = 200;
/// Most bytes of the saved baseline (a ConfigMap holds 1 MiB): beyond, the oldest weeks are dropped.
pub const MAX_BYTES: usize = 900 << 10;

/// The rule's settings, checked.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// Tables learned; empty: every table.
    pub tables: Vec<String>,
    pub weeks: i64,
    pub min_weeks: usize,
    pub spreads: f64,
    pub min_reads: u64,
}

impl Settings {
    pub fn of(r: &BaselineRule) -> Settings {
        let weeks = i64::from(r.weeks.clamp(1, 8));
        Settings {
            tables: r.tables.clone(),
            weeks,
            min_weeks: usize::try_from(r.min_weeks.clamp(1, r.weeks.clamp(1, 8))).unwrap_or(1),
            spreads: f64::from(r.spreads.max(1)),
            min_reads: u64::try_from(r.min_reads.max(1)).unwrap_or(1),
        }
    }
}

/// What was learned, and the hour being counted.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Baseline {
    /// Finished hours (hours since the epoch, UTC) that were read whole: an hour missing here was not observed (the
    /// monitor did not exist, the operator restarted during it, or the log could not be read), not quiet.
    #[serde(default)]
    pub observed: BTreeSet<i64>,
    /// Reads per identity (`team <policy>/<team>` or `identity <user>`), table and finished hour; hours without a
    /// read are left out.
    #[serde(default)]
    pub reads: BTreeMap<String, BTreeMap<String, BTreeMap<i64, u64>>>,
    /// The hour being counted, and whether it is counted from its start (not after a restart within it).
    #[serde(default)]
    pub hour: i64,
    #[serde(default)]
    pub whole: bool,
    /// The log was not read for a while (no pod, an unreadable log, another pod): the hours until the next read are
    /// not observed.
    #[serde(default)]
    pub gap: bool,
    /// The time of the last access counted (microseconds since the epoch): a pass read again (its status was not
    /// written) counts nothing twice. Not saved: the hour being counted is not learned after a restart anyway.
    #[serde(skip)]
    pub counted_until: Option<i64>,
    /// The hour's reads so far, and the pairs already flagged in it.
    #[serde(skip)]
    current: BTreeMap<(String, String), u64>,
    #[serde(skip)]
    flagged: BTreeSet<(String, String)>,
}

/// The baseline an hour was compared with.
#[derive(Clone, Debug, PartialEq)]
pub struct Compared {
    /// The same hour in the weeks observed, oldest first.
    pub samples: Vec<u64>,
    pub median: f64,
    /// 1.4826 × MAD, at least 1.
    pub spread: f64,
    /// Reads above this are unusual.
    pub limit: f64,
}

/// The baseline of `samples`: median, robust spread, limit at `spreads` spreads above the median.
pub fn compare(samples: &[u64], spreads: f64) -> Compared {
    let median = median(samples.iter().map(|&x| x as f64).collect());
    let mad = median_of_deviations(samples, median);
    let spread = (1.4826 * mad).max(1.0);
    Compared { samples: samples.to_vec(), median, spread, limit: median + spreads * spread }
}

fn median(mut xs: Vec<f64>) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 { xs[n / 2] } else { (xs[n / 2 - 1] + xs[n / 2]) / 2.0 }
}

fn median_of_deviations(samples: &[u64], m: f64) -> f64 {
    median(samples.iter().map(|&x| (x as f64 - m).abs()).collect())
}

fn hour_of(t: Timestamp) -> i64 {
    t.as_second().div_euclid(3600)
}

/// The learning key of who did it: teams by AccessPolicy and team (their users change with every lease), named
/// identities by user; unknown users and revoked credentials are findings of their own and teach nothing.
fn key(who: &Who, user: &str) -> Option<String> {
    match who {
        Who::Team { team, policy, .. } => Some(format!("team {policy}/{team}")),
        Who::Known { .. } => Some(format!("identity {user}")),
        Who::Revoked { .. } | Who::Unknown => None,
    }
}

/// "Tuesday 02:00 UTC".
fn hour_of_week(hour: i64) -> String {
    let t = Timestamp::from_second(hour * 3600).unwrap_or_default();
    let z = t.to_zoned(jiff::tz::TimeZone::UTC);
    format!("{:?} {:02}:00 UTC", z.weekday(), z.hour())
}

impl Baseline {
    /// A saved baseline, for a restart: the hour it was counting is not whole any more. Refused when its hours do
    /// not lie within its `weeks` before `now_hour` (an edited or foreign ConfigMap must not stop the learning, or
    /// make a pass run through years of hours).
    pub fn load(json: &str, now_hour: i64, weeks: i64) -> Result<Baseline, String> {
        let mut b: Baseline = serde_json::from_str(json).map_err(|e| e.to_string())?;
        let (from, to) = (now_hour - weeks * WEEK - 1, now_hour + 1);
        let inside = |h: &i64| (from..=to).contains(h);
        let hours_inside = b.observed.iter().all(inside)
            && b.reads.values().flat_map(|t| t.values()).flat_map(|h| h.keys()).all(inside);
        if b.hour != 0 && !inside(&b.hour) || !hours_inside {
            return Err(format!("its hours are not within the {weeks} weeks before now"));
        }
        if b.reads.values().map(BTreeMap::len).sum::<usize>() > MAX_PAIRS {
            return Err(format!("it holds more than {MAX_PAIRS} identity and table pairs"));
        }
        b.whole = false;
        Ok(b)
    }

    /// The log was not read (no pod, an unreadable log, another pod's log): the hour being counted and those up to
    /// the next read are not learned.
    pub fn interrupted(&mut self) {
        self.whole = false;
        self.gap = true;
    }

    /// As saved in the ConfigMap: at most [`MAX_BYTES`] (the oldest weeks go first).
    pub fn to_json(&self) -> String {
        let mut b = self.clone();
        loop {
            let json = serde_json::to_string(&b).unwrap_or_default();
            let Some(&first) = b.observed.first() else { return json };
            if json.len() <= MAX_BYTES {
                return json;
            }
            tracing::warn!(bytes = json.len(), "the learned baseline is too large to save: its oldest week is dropped");
            let keep = first + WEEK;
            b.observed.retain(|h| *h >= keep);
            for hours in b.reads.values_mut().flat_map(|t| t.values_mut()) {
                hours.retain(|h, _| *h >= keep);
            }
        }
    }

    /// Moves the count to `hour`: a finished hour that was read whole is learned (pairs without a read count 0),
    /// hours passed over (no line at all) are quiet hours when the monitor was reading through them. Keeps `weeks`
    /// weeks.
    pub fn advance(&mut self, hour: i64, weeks: i64) {
        if hour <= self.hour {
            return;
        }
        let first = self.hour == 0;
        if !first {
            if self.whole {
                self.observed.insert(self.hour);
                for ((who, table), n) in std::mem::take(&mut self.current) {
                    let pairs: usize = self.reads.values().map(BTreeMap::len).sum();
                    let known = self.reads.get(&who).is_some_and(|t| t.contains_key(&table));
                    if known || pairs < MAX_PAIRS {
                        self.reads.entry(who).or_default().entry(table).or_default().insert(self.hour, n);
                    }
                }
            }
            // The hours between were read (the log is read in order) and had no line, unless reading stopped.
            if !self.gap {
                for h in (self.hour + 1).max(hour - weeks * WEEK)..hour {
                    self.observed.insert(h);
                }
            }
        }
        self.current.clear();
        self.flagged.clear();
        // The first hour of a new baseline began before the monitor read it; so did one after a gap.
        self.whole = !first && !self.gap;
        self.gap = false;
        self.hour = hour;
        let oldest = hour - weeks * WEEK;
        self.observed.retain(|h| *h >= oldest);
        for tables in self.reads.values_mut() {
            for hours in tables.values_mut() {
                hours.retain(|h, _| *h >= oldest);
            }
            tables.retain(|_, hours| !hours.is_empty());
        }
        self.reads.retain(|_, tables| !tables.is_empty());
    }

    /// The same hour of the week in the weeks observed, oldest first.
    fn samples(&self, who: &str, table: &str, weeks: i64) -> Vec<u64> {
        (1..=weeks)
            .rev()
            .map(|w| self.hour - w * WEEK)
            .filter(|h| self.observed.contains(h))
            .map(|h| self.reads.get(who).and_then(|t| t.get(table)).and_then(|hs| hs.get(&h)).copied().unwrap_or(0))
            .collect()
    }

    /// Counts the reads of `accesses` (in log order) in their hours and flags a pair, once per hour, as soon as its
    /// reads in the hour rise above its baseline (with enough weeks observed).
    pub fn check(&mut self, s: &Settings, ids: &Identities, accesses: &[Access]) -> Vec<Found> {
        let mut out = Vec::new();
        let counted = self.counted_until;
        for a in accesses.iter().filter(|a| counted.is_none_or(|c| a.at.as_microsecond() > c)) {
            self.counted_until = Some(a.at.as_microsecond());
            self.advance(hour_of(a.at), s.weeks);
            if a.kind != Kind::Read {
                continue;
            }
            let Some(table) = a.object.as_deref().filter(|t| s.tables.is_empty() || s.tables.iter().any(|x| x == t))
            else {
                continue;
            };
            let who = ids.who(&a.user);
            let Some(k) = key(who, &a.user) else { continue };
            let pair = (k, table.to_string());
            let n = self.current.entry(pair.clone()).or_default();
            *n += 1;
            let n = *n;
            if n < s.min_reads || self.flagged.contains(&pair) {
                continue;
            }
            let samples = self.samples(&pair.0, table, s.weeks);
            if samples.len() < s.min_weeks {
                continue;
            }
            let c = compare(&samples, s.spreads);
            if (n as f64) > c.limit {
                self.flagged.insert(pair);
                let from = Timestamp::from_second(self.hour * 3600).unwrap_or_default();
                out.push(Found {
                    rule: FindingRule::UnusualVolume,
                    user: a.user.clone(),
                    identity: who.describe(),
                    origins: Default::default(),
                    object: Some(table.to_string()),
                    message: format!(
                        "{n} reads of {table} by {} in the hour from {from}, above its baseline for {}: median {}, \
                         robust spread {:.1}, limit {:.1} ({} weeks: {})",
                        who.describe(),
                        hour_of_week(self.hour),
                        c.median,
                        c.spread,
                        c.limit,
                        c.samples.len(),
                        c.samples.iter().map(u64::to_string).collect::<Vec<_>>().join(", "),
                    ),
                    at: a.at,
                });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::api::access_monitor::KnownIdentity;
    use crate::monitor::attribution::TeamUsers;

    fn ids() -> Identities {
        let policy: crate::api::AccessPolicy = serde_json::from_value(serde_json::json!({
            "apiVersion": "crmguard.io/v1alpha1", "kind": "AccessPolicy",
            "metadata": {"name": "crm-access", "namespace": "crm"},
            "spec": {"vault": {}, "teams": [{
                "name": "sales", "subjects": [{"kind": "Group", "name": "sales"}], "credentials": {},
                "database": {"connection": "crm", "grants": [{"schema": "crm", "tables": ["invoices"], "privileges": ["SELECT"]}]}
            }]}
        }))
        .unwrap();
        let known = [KnownIdentity { user: "crm_app".into(), name: "crm-web".into(), tables: vec![] }];
        let teams = [TeamUsers { policy: "crm-access".into(), team: "sales".into(), users: vec!["v-sales-2".into()] }];
        Identities::build(&[policy], &teams, &known, &Identities::default(), Timestamp::UNIX_EPOCH)
    }

    /// A Tuesday, 02:00 UTC.
    const H0: i64 = 1_796_090_400 / 3600;

    fn reads(hour: i64, n: usize, user: &str, table: &str) -> Vec<Access> {
        (0..n)
            .map(|i| Access {
                at: Timestamp::from_second(hour * 3600 + 60 + i as i64).unwrap(),
                user: user.into(),
                kind: Kind::Read,
                command: "SELECT".into(),
                object: Some(table.into()),
                client: Default::default(),
            })
            .collect()
    }

    fn settings(min_reads: u64) -> Settings {
        Settings { tables: vec![], weeks: 4, min_weeks: 3, spreads: 6.0, min_reads }
    }

    /// The robust spread as documented: the median and 1.4826 × the median absolute deviation (at least 1), the
    /// limit `spreads` of them above the median. Worked by hand.
    #[test]
    fn the_baseline_is_the_median_and_the_robust_spread() {
        // 2 3 4 5: median 3.5; deviations 1.5 .5 .5 1.5: MAD 1; spread 1.4826; limit 3.5 + 6 × 1.4826 = 12.3956.
        let c = compare(&[3, 4, 5, 2], 6.0);
        assert_eq!((c.median, c.spread), (3.5, 1.4826));
        assert!((c.limit - 12.3956).abs() < 1e-9, "{c:?}");
        // Never read then: median 0, MAD 0, the spread's floor of one read: limit 6.
        let c = compare(&[0, 0, 0], 6.0);
        assert_eq!((c.median, c.spread, c.limit), (0.0, 1.0, 6.0));
        // One wild week does not move it: 3 3 3 90: median 3, MAD 0, limit 9.
        assert_eq!(compare(&[3, 3, 90, 3], 6.0).limit, 9.0);
    }

    /// Four weeks of a team's reads at Tuesday 02:00 (3, 4, 5, 2; the monitor started in the hour of week 0, which is
    /// not learned), quiet hours in between counted as none: in week 5 the 13th read of the hour is unusual (limit
    /// 12.4), once; the finding shows the baseline; another team's table, read as much, is judged on its own (never
    /// read then: limit 6 but minReads 10).
    #[test]
    fn an_hour_far_above_its_weeks_is_flagged_once_with_its_baseline() {
        let ids = ids();
        let s = settings(10);
        let mut b = Baseline::default();
        let mut found = b.check(&s, &ids, &reads(H0, 50, "v-sales-2", "crm.invoices"));
        for (w, n) in [(1, 3), (2, 4), (3, 5), (4, 2)] {
            found.extend(b.check(&s, &ids, &reads(H0 + w * WEEK, n, "v-sales-2", "crm.invoices")));
        }
        assert_eq!(found, vec![], "learning");
        let week5 = reads(H0 + 5 * WEEK, 20, "v-sales-2", "crm.invoices");
        assert_eq!(b.check(&s, &ids, &week5[..12]), vec![], "12 reads are within the limit");
        let found = b.check(&s, &ids, &week5[12..]);
        assert_eq!(found.len(), 1, "{found:#?}");
        let f = &found[0];
        assert_eq!(
            (f.rule, f.user.as_str(), f.object.as_deref()),
            (FindingRule::UnusualVolume, "v-sales-2", Some("crm.invoices"))
        );
        assert_eq!(f.at, week5[12].at);
        assert!(
            f.message.starts_with("13 reads of crm.invoices by team sales (AccessPolicy crm-access) in the hour from"),
            "{}",
            f.message
        );
        assert!(
            f.message.contains("Tuesday 02:00 UTC: median 3.5, robust spread 1.5, limit 12.4 (4 weeks: 3, 4, 5, 2)"),
            "{}",
            f.message
        );
        // The application's user on a table it never read at that hour: its own baseline (0 0 0 0), minReads first.
        let later = |a: Access| Access { at: a.at.checked_add(jiff::SignedDuration::from_secs(30)).unwrap(), ..a };
        let app: Vec<Access> = reads(H0 + 5 * WEEK, 10, "crm_app", "crm.contacts").into_iter().map(later).collect();
        let found = b.check(&s, &ids, &app);
        assert_eq!(found.len(), 1);
        assert!(found[0].message.contains("median 0, robust spread 1.0, limit 6.0"), "{}", found[0].message);
        assert_eq!(found[0].at, app[9].at, "flagged at minReads, the 10th read");
    }

    /// Nothing is flagged before minWeeks of the hour were observed; an hour begun before a restart is not learned
    /// (its count is partial), nor are users nobody issued; what was learned survives being saved and loaded.
    #[test]
    fn learning_needs_whole_observed_weeks_and_survives_a_restart() {
        let ids = ids();
        let s = settings(5);
        let mut b = Baseline::default();
        b.check(&s, &ids, &reads(H0, 1, "v-sales-2", "crm.invoices"));
        for w in 1..=2 {
            b.check(&s, &ids, &reads(H0 + w * WEEK, 2, "v-sales-2", "crm.invoices"));
        }
        assert_eq!(b.check(&s, &ids, &reads(H0 + 3 * WEEK, 100, "v-sales-2", "crm.invoices")), vec![], "2 weeks < 3");
        b.check(&s, &ids, &reads(H0 + 3 * WEEK, 5, "nobody", "crm.invoices"));
        // Saved mid-hour and loaded: the hour it was in is not learned, the weeks before are kept.
        let saved = serde_json::to_string(&b).unwrap();
        let mut b = Baseline::load(&saved, H0 + 3 * WEEK, s.weeks).unwrap();
        b.advance(H0 + 3 * WEEK + 1, s.weeks);
        assert!(!b.observed.contains(&(H0 + 3 * WEEK)), "a partial hour is not observed");
        assert!(b.observed.contains(&(H0 + WEEK)) && b.observed.contains(&(H0 + 2 * WEEK)));
        assert!(b.observed.contains(&(H0 + WEEK + 1)), "a quiet hour the log was read through is observed");
        assert!(!b.observed.contains(&H0), "the monitor's first hour is partial");
        assert_eq!(b.reads.keys().collect::<Vec<_>>(), ["team crm-access/sales"], "unknown users teach nothing");
        // A pass read again (its status was not written) counts nothing twice.
        let again = reads(H0 + 3 * WEEK + 1, 3, "v-sales-2", "crm.invoices");
        b.check(&s, &ids, &again);
        b.check(&s, &ids, &again);
        assert_eq!(b.current.values().sum::<u64>(), 3);
        // Weeks older than `weeks` are forgotten.
        b.advance(H0 + 9 * WEEK, s.weeks);
        assert!(b.observed.iter().all(|h| *h >= H0 + 5 * WEEK) && b.reads.is_empty(), "{b:?}");
    }

    /// Hours the log was not read through (the pod was gone, the log unreadable) are not quiet hours: not observed,
    /// nor is the hour reading stopped in or the one it resumed in.
    #[test]
    fn hours_without_reading_are_not_learned_as_quiet() {
        let mut b = Baseline::default();
        b.advance(H0, 4);
        b.advance(H0 + 1, 4);
        b.advance(H0 + 2, 4);
        b.interrupted();
        b.advance(H0 + 10, 4);
        b.advance(H0 + 11, 4);
        assert_eq!(b.observed.iter().copied().collect::<Vec<_>>(), [H0 + 1], "{b:?}");
        b.advance(H0 + 12, 4);
        assert!(b.observed.contains(&(H0 + 11)));
    }

    /// A saved baseline whose hours lie outside its weeks (edited, or another's) is not used: a far-past hour
    /// would make the first pass walk through years of hours, a future one stop all learning.
    #[test]
    fn a_saved_baseline_out_of_its_window_is_refused() {
        let now = H0 + 5 * WEEK;
        let ok = Baseline { hour: now - 2, whole: true, observed: [now - 3].into(), ..Baseline::default() };
        let b = Baseline::load(&serde_json::to_string(&ok).unwrap(), now, 4).unwrap();
        assert!(!b.whole, "the hour a restart cut is not whole");
        for bad in [
            Baseline { hour: 1, ..ok.clone() },
            Baseline { hour: now + 100, ..ok.clone() },
            Baseline { observed: [now - 9 * WEEK].into(), ..ok.clone() },
        ] {
            let e = Baseline::load(&serde_json::to_string(&bad).unwrap(), now, 4).unwrap_err();
            assert!(e.contains("not within the 4 weeks"), "{e}");
        }
    }
}
