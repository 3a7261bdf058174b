//! Cron schedules (DESIGN §3): a 5-field expression (minute hour day-of-month month day-of-week)
//! read in an IANA time zone, and the ticks it gives. Evaluation is croner's, on the wall clock of
//! the zone, so a daily 09:00 stays at 09:00 local time across daylight saving changes: a time
//! that a spring-forward gap skips fires at the first instant after the gap, and a time that a
//! fall-back overlap repeats fires once.

use chrono::{DateTime, TimeZone as _, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};
use time::OffsetDateTime;

/// The time zone of a cron trigger registered without one.
pub const DEFAULT_TIMEZONE: &str = "UTC";

/// Why a schedule or time zone was refused. The message says what is wrong, so an API can hand
/// it to the caller; [`CronError::field`] names the trigger field it is about.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CronError {
    /// Not exactly five fields.
    #[error(
        "expected 5 fields (minute hour day-of-month month day-of-week) separated by spaces, found {found}"
    )]
    FieldCount {
        /// How many fields there were.
        found: usize,
    },
    /// Five fields, but one of them is not valid.
    #[error("invalid schedule {schedule:?}: {reason}")]
    Expression {
        /// The refused schedule.
        schedule: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A valid expression that no date matches (such as the 30th of February).
    #[error("schedule {schedule:?} matches no date, so it would never fire")]
    NeverMatches {
        /// The refused schedule.
        schedule: String,
    },
    /// Not a time zone of the IANA database.
    #[error("unknown time zone {timezone:?}: expected an IANA name such as Europe/Berlin or UTC")]
    TimeZone {
        /// The refused zone.
        timezone: String,
    },
}

impl CronError {
    /// The field of a cron trigger the error is about: `schedule` or `timezone`.
    pub fn field(&self) -> &'static str {
        match self {
            CronError::TimeZone { .. } => "timezone",
            CronError::FieldCount { .. } | CronError::Expression { .. } | CronError::NeverMatches { .. } => {
                "schedule"
            }
        }
    }
}

/// A schedule in its time zone, with the text it was parsed from: what a trigger keeps, so that
/// it is parsed once, when it is registered or read, and shown as it was written. One read from
/// the database that this version cannot parse (another version stored it) is kept as written
/// and has no tick ([`CronSchedule::stored`]); one registered now always parses.
#[derive(Debug, Clone)]
pub struct CronSchedule {
    rule: Result<Rule, CronError>,
    expression: String,
    timezone: String,
}

/// When a schedule ticks.
#[derive(Debug, Clone)]
struct Rule {
    /// Boxed: croner's parsed fields are half a kilobyte, and every trigger carries a schedule.
    cron: Box<Cron>,
    zone: Tz,
}

/// Two schedules are the same when they were written the same.
impl PartialEq for CronSchedule {
    fn eq(&self, other: &Self) -> bool {
        self.expression == other.expression && self.timezone == other.timezone
    }
}

impl Eq for CronSchedule {}

impl CronSchedule {
    /// Parses a 5-field expression and an IANA time zone (pass [`DEFAULT_TIMEZONE`] when none was
    /// given). Fields take numbers, ranges, lists, steps (`*/15`, `1-5/2`), month and weekday
    /// names, and croner's `L`, `W` and `#`; seconds, years and `@` nicknames are refused.
    pub fn parse(schedule: &str, timezone: &str) -> Result<Self, CronError> {
        let stored = Self::stored(schedule, timezone);
        match stored.rule {
            Ok(_) => Ok(stored),
            Err(e) => Err(e),
        }
    }

    /// The schedule a trigger was stored with: parsed when this version can, else kept as
    /// written with the reason ([`CronSchedule::unparsed`]) and no tick, so that the trigger can
    /// still be read, shown and deleted.
    pub fn stored(schedule: &str, timezone: &str) -> Self {
        CronSchedule {
            rule: Rule::parse(schedule, timezone),
            expression: schedule.to_owned(),
            timezone: timezone.to_owned(),
        }
    }

    /// Why this version cannot parse the stored schedule, if it cannot.
    pub fn unparsed(&self) -> Option<&CronError> {
        self.rule.as_ref().err()
    }

    /// The 5-field expression, as written.
    pub fn expression(&self) -> &str {
        &self.expression
    }

    /// The IANA time zone, as written.
    pub fn timezone(&self) -> &str {
        &self.timezone
    }

    /// The first tick strictly after `instant`; `None` when there is none (no date matches, the
    /// search ran out of the supported range of dates, or the schedule does not parse).
    pub fn next_after(&self, instant: OffsetDateTime) -> Option<OffsetDateTime> {
        self.rule.as_ref().ok()?.next_after(instant)
    }

    /// The last tick at or before `instant`; `None` when there is none.
    pub fn last_at_or_before(&self, instant: OffsetDateTime) -> Option<OffsetDateTime> {
        let rule = self.rule.as_ref().ok()?;
        let found = rule.cron.find_previous_occurrence(&rule.zoned(instant)?, true).ok()?;
        instant_of(&found)
    }
}

impl Rule {
    fn parse(schedule: &str, timezone: &str) -> Result<Rule, CronError> {
        let found = schedule.split_whitespace().count();
        if found != 5 {
            return Err(CronError::FieldCount { found });
        }
        let invalid = |reason: String| CronError::Expression { schedule: schedule.to_owned(), reason };
        if schedule.contains('@') {
            return Err(invalid("nicknames such as @daily are not supported; write the 5 fields".into()));
        }
        let parser = CronParser::builder().seconds(Seconds::Disallowed).year(Year::Disallowed).build();
        let cron = parser.parse(schedule).map_err(|e| invalid(e.to_string()))?;
        let zone: Tz = timezone.parse().map_err(|_| CronError::TimeZone { timezone: timezone.to_owned() })?;
        let rule = Rule { cron: Box::new(cron), zone };
        // Every date comes back within 28 years (the calendar's cycle of weekdays and leap
        // years), so a schedule with no tick in the first 28 years of the epoch has none at all.
        let epoch = OffsetDateTime::UNIX_EPOCH;
        let cycle = epoch.replace_year(1998).expect("1998 is a valid year");
        if rule.next_after(epoch).is_none_or(|tick| tick > cycle) {
            return Err(CronError::NeverMatches { schedule: schedule.to_owned() });
        }
        Ok(rule)
    }

    fn next_after(&self, instant: OffsetDateTime) -> Option<OffsetDateTime> {
        let found = self.cron.find_next_occurrence(&self.zoned(instant)?, false).ok()?;
        instant_of(&found)
    }

    /// `instant` on the wall clock of the schedule's zone.
    fn zoned(&self, instant: OffsetDateTime) -> Option<DateTime<Tz>> {
        let utc = DateTime::<Utc>::from_timestamp(instant.unix_timestamp(), instant.nanosecond())?;
        Some(self.zone.from_utc_datetime(&utc.naive_utc()))
    }
}

fn instant_of(t: &DateTime<Tz>) -> Option<OffsetDateTime> {
    let nanos = i128::from(t.timestamp()) * 1_000_000_000 + i128::from(t.timestamp_subsec_nanos());
    OffsetDateTime::from_unix_timestamp_nanos(nanos).ok()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use time::macros::datetime;

    use super::*;

    fn utc(schedule: &str) -> CronSchedule {
        CronSchedule::parse(schedule, DEFAULT_TIMEZONE).unwrap()
    }

    #[test]
    fn every_minute_ticks_on_the_next_whole_minute_strictly_after_the_instant() {
        let s = utc("* * * * *");
        assert_eq!(
            s.next_after(datetime!(2026-01-01 10:00:00 UTC)),
            Some(datetime!(2026-01-01 10:01:00 UTC))
        );
        assert_eq!(
            s.next_after(datetime!(2026-01-01 10:00:00.5 UTC)),
            Some(datetime!(2026-01-01 10:01:00 UTC))
        );
        assert_eq!(
            s.next_after(datetime!(2026-01-01 09:59:59.999 UTC)),
            Some(datetime!(2026-01-01 10:00:00 UTC))
        );
        assert_eq!(
            s.next_after(datetime!(2026-12-31 23:59:30 UTC)),
            Some(datetime!(2027-01-01 00:00:00 UTC))
        );
    }

    #[test]
    fn the_last_tick_at_or_before_an_instant_includes_the_instant_itself() {
        let s = utc("*/15 * * * *");
        assert_eq!(
            s.last_at_or_before(datetime!(2026-01-01 10:15:00 UTC)),
            Some(datetime!(2026-01-01 10:15:00 UTC))
        );
        assert_eq!(
            s.last_at_or_before(datetime!(2026-01-01 10:29:59.9 UTC)),
            Some(datetime!(2026-01-01 10:15:00 UTC))
        );
    }

    #[test]
    fn a_daily_nine_oclock_in_berlin_stays_at_nine_local_time_across_both_dst_changes() {
        let s = CronSchedule::parse("0 9 * * *", "Europe/Berlin").unwrap();
        // Winter time is UTC+1: 09:00 in Berlin is 08:00 UTC.
        assert_eq!(
            s.next_after(datetime!(2026-03-28 12:00:00 UTC)),
            Some(datetime!(2026-03-29 07:00:00 UTC)),
            "on the morning clocks spring forward (02:00 → 03:00), 09:00 is already summer time"
        );
        assert_eq!(
            s.next_after(datetime!(2026-03-27 12:00:00 UTC)),
            Some(datetime!(2026-03-28 08:00:00 UTC))
        );
        assert_eq!(
            s.next_after(datetime!(2026-10-24 12:00:00 UTC)),
            Some(datetime!(2026-10-25 08:00:00 UTC)),
            "on the morning clocks fall back, 09:00 is winter time again"
        );
        assert_eq!(
            s.next_after(datetime!(2026-10-23 12:00:00 UTC)),
            Some(datetime!(2026-10-24 07:00:00 UTC))
        );
    }

    #[test]
    fn a_time_skipped_by_spring_forward_fires_once_right_after_the_gap_and_a_repeated_one_fires_once() {
        let s = CronSchedule::parse("30 2 * * *", "Europe/Berlin").unwrap();
        // 02:30 does not exist on 2026-03-29: clocks go from 02:00 (01:00 UTC) to 03:00.
        assert_eq!(
            s.next_after(datetime!(2026-03-28 12:00:00 UTC)),
            Some(datetime!(2026-03-29 01:00:00 UTC))
        );
        assert_eq!(
            s.next_after(datetime!(2026-03-29 01:00:00 UTC)),
            Some(datetime!(2026-03-30 00:30:00 UTC))
        );
        // 02:30 happens twice on 2026-10-25 (00:30 and 01:30 UTC); the schedule fires on the first.
        assert_eq!(
            s.next_after(datetime!(2026-10-24 12:00:00 UTC)),
            Some(datetime!(2026-10-25 00:30:00 UTC))
        );
        assert_eq!(
            s.next_after(datetime!(2026-10-25 00:30:00 UTC)),
            Some(datetime!(2026-10-26 01:30:00 UTC))
        );
    }

    #[test]
    fn the_zone_defaults_to_utc_and_names_are_accepted() {
        let s = utc("0 12 * JAN MON-FRI");
        assert_eq!(
            s.next_after(datetime!(2026-01-03 00:00:00 UTC)),
            Some(datetime!(2026-01-05 12:00:00 UTC))
        );
    }

    #[test]
    fn a_schedule_without_exactly_five_fields_is_refused_with_the_count() {
        for (schedule, found) in [("0 * * * * *", 6), ("* * * *", 4), ("", 0), ("0 0 1 1 * 2030", 6)] {
            let err = CronSchedule::parse(schedule, "UTC").unwrap_err();
            assert_eq!(err, CronError::FieldCount { found }, "{schedule:?}");
            assert_eq!(err.field(), "schedule");
            assert!(err.to_string().contains("expected 5 fields"), "{err}");
        }
    }

    #[test]
    fn out_of_range_and_malformed_fields_are_refused_naming_the_schedule() {
        for schedule in [
            "60 * * * *",
            "* 24 * * *",
            "* * 0 * *",
            "* * 32 * *",
            "* * * 13 *",
            "* * * * 8",
            "every minute x y z",
            "*/0 * * * *",
            "5-1/x * * * *",
        ] {
            let err = CronSchedule::parse(schedule, "UTC").unwrap_err();
            assert!(matches!(err, CronError::Expression { .. }), "{schedule:?}: {err:?}");
            assert_eq!(err.field(), "schedule");
            assert!(err.to_string().contains(schedule), "{err}");
        }
    }

    #[test]
    fn nicknames_and_dates_that_never_come_are_refused() {
        let err = CronSchedule::parse("@daily * * * *", "UTC").unwrap_err();
        assert!(err.to_string().contains("nicknames"), "{err}");
        let err = CronSchedule::parse("0 0 30 2 *", "UTC").unwrap_err();
        assert_eq!(err, CronError::NeverMatches { schedule: "0 0 30 2 *".into() });
        assert!(CronSchedule::parse("0 0 29 2 *", "UTC").is_ok(), "leap days come every four years");
    }

    #[test]
    fn an_unknown_time_zone_is_refused_naming_the_zone() {
        for zone in ["Mars/Olympus", "", "europe/berlin", "UTC+1"] {
            let err = CronSchedule::parse("* * * * *", zone).unwrap_err();
            assert_eq!(err, CronError::TimeZone { timezone: zone.into() });
            assert_eq!(err.field(), "timezone");
            assert!(err.to_string().contains("IANA"), "{err}");
        }
    }

    /// One field of a schedule: numbers, names, ranges, lists, steps and croner's specials.
    fn field() -> impl Strategy<Value = String> {
        prop_oneof![
            3 => Just("*".to_owned()),
            3 => "[1-2]?[0-9]",
            2 => "(\\*|[0-9]{1,2})(-[0-9]{1,2})?(/[0-9]{1,3})?(,[0-9]{1,2})?",
            1 => "(JAN|FEB|DEC|MON|FRI|SUN|[0-7])(-(JAN|FEB|DEC|MON|FRI|SUN|[0-7]))?",
            1 => "[0-9]{1,2}[LW#][0-9]?|L|\\?",
            1 => "[0-9*/,LW#?-]{1,6}",
            1 => "\\PC{0,4}",
        ]
    }

    /// A time zone: real ones, near misses, and anything.
    fn zone() -> impl Strategy<Value = String> {
        prop_oneof![
            2 => Just("UTC".to_owned()),
            2 => Just("Europe/Berlin".to_owned()),
            2 => Just("America/St_Johns".to_owned()),
            2 => Just("Australia/Lord_Howe".to_owned()),
            1 => "[A-Za-z_/+-]{0,20}",
            1 => any::<String>(),
        ]
    }

    /// Any instant `time` can hold.
    fn instant() -> impl Strategy<Value = OffsetDateTime> {
        (-377_705_116_800i64..253_402_300_799).prop_map(|s| OffsetDateTime::from_unix_timestamp(s).unwrap())
    }

    proptest! {
        #[test]
        fn parsing_any_schedule_in_any_zone_never_panics(
            schedule in prop_oneof![
                any::<String>(),
                prop::collection::vec(field(), 0..7).prop_map(|f| f.join(" ")),
            ],
            zone in zone(),
        ) {
            if let Err(e) = CronSchedule::parse(&schedule, &zone) {
                prop_assert!(["schedule", "timezone"].contains(&e.field()));
                prop_assert!(!e.to_string().is_empty());
            }
        }

        #[test]
        fn the_ticks_of_any_schedule_lie_on_the_right_side_of_any_instant(
            fields in prop::collection::vec(field(), 5),
            zone in zone(),
            at in instant(),
        ) {
            if let Ok(schedule) = CronSchedule::parse(&fields.join(" "), &zone) {
                if let Some(next) = schedule.next_after(at) {
                    prop_assert!(next > at, "{next} is not after {at}");
                }
                if let Some(last) = schedule.last_at_or_before(at) {
                    prop_assert!(last <= at, "{last} is after {at}");
                }
            }
        }
    }

    #[test]
    fn a_stored_schedule_that_does_not_parse_is_kept_as_written_and_never_ticks() {
        let stored = CronSchedule::stored("61 * * * *", "Europe/Paris");
        assert_eq!((stored.expression(), stored.timezone()), ("61 * * * *", "Europe/Paris"));
        assert_eq!(stored.unparsed(), CronSchedule::parse("61 * * * *", "Europe/Paris").err().as_ref());
        assert_eq!(stored.next_after(OffsetDateTime::UNIX_EPOCH), None);
        assert_eq!(stored.last_at_or_before(OffsetDateTime::now_utc()), None);
        let fine = CronSchedule::stored("*/5 * * * *", "UTC");
        assert_eq!(fine.unparsed(), None);
        assert_eq!(Ok(fine), CronSchedule::parse("*/5 * * * *", "UTC"));
    }
}
