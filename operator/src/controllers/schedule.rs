//! Cron expressions and time zones as the Kubernetes CronJob controller accepts them, checked by the operator
//! because CEL cannot parse cron.

use croner::Cron;
use croner::parser::{CronParser, Seconds};

const MACROS: [&str; 7] = ["@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"];

/// Parses a 5-field cron expression or one of the macros Kubernetes accepts.
pub fn parse_cron(expr: &str) -> Result<Cron, String> {
    let trimmed = expr.trim();
    if trimmed.starts_with("TZ=") || trimmed.starts_with("CRON_TZ=") {
        return Err(format!("{expr:?}: set the time zone in timeZone, not inside the cron expression"));
    }
    if trimmed.starts_with('@') {
        if !MACROS.contains(&trimmed) {
            return Err(format!("{expr:?} is not a known macro; use one of {}", MACROS.join(", ")));
        }
    } else if trimmed.split_whitespace().count() != 5 {
        return Err(format!(
            "{expr:?} has {} fields; write 5 fields (minute hour day-of-month month day-of-week), e.g. \"15 2 * * *\"",
            trimmed.split_whitespace().count()
        ));
    }
    CronParser::builder()
        .seconds(Seconds::Disallowed)
        .build()
        .parse(trimmed)
        .map_err(|e| format!("{expr:?} is not a valid cron expression ({e}); e.g. \"15 2 * * *\" runs at 02:15 daily"))
}

/// Checks an IANA time zone name against the time zone database.
pub fn check_time_zone(tz: &str) -> Result<jiff::tz::TimeZone, String> {
    jiff::tz::db()
        .get(tz)
        .map_err(|_| format!("unknown time zone {tz:?}; use an IANA name such as Europe/Berlin or America/New_York"))
}

/// The next run strictly after `after`, in the schedule's time zone (UTC when none).
pub fn next_run(cron: &Cron, tz: Option<&jiff::tz::TimeZone>, after: jiff::Timestamp) -> Option<jiff::Timestamp> {
    let zone = tz.cloned().unwrap_or(jiff::tz::TimeZone::UTC);
    cron.find_next_occurrence(&after.to_zoned(zone), false).ok().map(|z| z.timestamp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_what_kubernetes_accepts() {
        for ok in ["15 2 * * *", "*/5 * * * *", "0 5 * * SUN", "0 0 1 JAN *", "@daily", "@hourly", "0 3 * * 1-5"] {
            parse_cron(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
    }

    #[test]
    fn refuses_with_a_reason() {
        assert!(parse_cron("0 15 2 * * *").unwrap_err().contains("has 6 fields"));
        assert!(parse_cron("61 * * * *").unwrap_err().contains("not a valid cron"));
        assert!(parse_cron("@fortnightly").unwrap_err().contains("not a known macro"));
        assert!(parse_cron("TZ=UTC 0 1 * * *").unwrap_err().contains("timeZone"));
        assert!(check_time_zone("Mars/Olympus").unwrap_err().contains("unknown time zone"));
        assert!(check_time_zone("Europe/Berlin").is_ok());
    }

    #[test]
    fn next_run_honours_the_time_zone() {
        let cron = parse_cron("15 2 * * *").unwrap();
        let tz = check_time_zone("Europe/Berlin").unwrap();
        let after: jiff::Timestamp = "2026-11-29T00:00:00Z".parse().unwrap();
        // 02:15 in Berlin (UTC+1 in winter) is 01:15 UTC.
        assert_eq!(next_run(&cron, Some(&tz), after).unwrap().to_string(), "2026-11-29T01:15:00Z");
        assert_eq!(next_run(&cron, None, after).unwrap().to_string(), "2026-11-29T02:15:00Z");
    }
}
