//! Timestamps on the wire: RFC 3339 text written and read without going through `fmt`.
//!
//! chrono's serde support writes a `DateTime<Utc>` through `collect_str`
//! (a `String` per timestamp with MessagePack) and reads it through its
//! lenient `FromStr`; together they were about half a microsecond of every
//! event and every reply. The text is the same as chrono writes: seconds
//! with 0, 3, 6 or 9 fraction digits (whichever shows the value exactly)
//! and `Z`. Anything out of the common shape (years beyond 0..=9999, leap
//! seconds) goes through chrono; reading tries the strict RFC 3339 parser
//! first and falls back to chrono's lenient one, so nothing read before is
//! refused now.

use chrono::{DateTime, Datelike, ParseError, Timelike, Utc};
use serde::Serializer;

/// The longest text [`write`] produces: `YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ`.
pub(super) const MAX_LEN: usize = 30;

/// Writes `ts` as RFC 3339 into `buf`; `None` when it is out of the common
/// shape (the caller then lets chrono write it).
pub(super) fn write(ts: &DateTime<Utc>, buf: &mut [u8; MAX_LEN]) -> Option<usize> {
    let year = ts.year();
    let nanos = ts.nanosecond();
    if !(0..=9999).contains(&year) || nanos >= 1_000_000_000 {
        return None;
    }
    let mut pos = 0;
    let mut put = |value: u32, digits: u32, then: Option<u8>| {
        for i in (0..digits).rev() {
            // Each digit is < 10, so the cast cannot truncate.
            buf[pos] = b'0' + (value / 10u32.pow(i) % 10) as u8;
            pos += 1;
        }
        if let Some(sep) = then {
            buf[pos] = sep;
            pos += 1;
        }
    };
    put(year.unsigned_abs(), 4, Some(b'-'));
    put(ts.month(), 2, Some(b'-'));
    put(ts.day(), 2, Some(b'T'));
    put(ts.hour(), 2, Some(b':'));
    put(ts.minute(), 2, Some(b':'));
    let (fraction, digits) = match nanos {
        0 => (0, 0),
        n if n % 1_000_000 == 0 => (n / 1_000_000, 3),
        n if n % 1_000 == 0 => (n / 1_000, 6),
        n => (n, 9),
    };
    if digits == 0 {
        put(ts.second(), 2, Some(b'Z'));
    } else {
        put(ts.second(), 2, Some(b'.'));
        put(fraction, digits, Some(b'Z'));
    }
    Some(pos)
}

/// Serializes a timestamp as chrono does, without allocating.
pub(crate) fn serialize<S: Serializer>(ts: &&DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    let mut buf = [0u8; MAX_LEN];
    match write(ts, &mut buf) {
        // Only ASCII digits and separators were written.
        Some(len) => match std::str::from_utf8(&buf[..len]) {
            Ok(text) => s.serialize_str(text),
            Err(_) => s.collect_str(&ts.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)),
        },
        None => serde::Serialize::serialize(*ts, s),
    }
}

/// Reads an RFC 3339 timestamp: strictly first (fast), then as leniently
/// as chrono's `FromStr` (so text people type still reads).
pub(crate) fn parse(text: &str) -> Result<DateTime<Utc>, ParseError> {
    match DateTime::parse_from_rfc3339(text) {
        Ok(t) => Ok(t.with_timezone(&Utc)),
        Err(_) => text.parse::<DateTime<Utc>>(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn ours(ts: &DateTime<Utc>) -> String {
        #[derive(serde::Serialize)]
        struct W<'a> {
            #[serde(serialize_with = "serialize")]
            ts: &'a DateTime<Utc>,
        }
        serde_json::to_string(&W { ts }).unwrap()
    }

    fn chronos(ts: &DateTime<Utc>) -> String {
        #[derive(serde::Serialize)]
        struct W<'a> {
            ts: &'a DateTime<Utc>,
        }
        serde_json::to_string(&W { ts }).unwrap()
    }

    #[test]
    fn timestamps_are_written_exactly_as_chrono_writes_them() {
        let base = Utc.with_ymd_and_hms(2026, 11, 22, 16, 8, 51).unwrap();
        let mut cases = vec![
            base,
            Utc.with_ymd_and_hms(1970, 1, 1, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(9999, 12, 31, 23, 59, 59).unwrap(),
            Utc.with_ymd_and_hms(10_000, 1, 1, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(-1, 6, 1, 0, 0, 0).unwrap(),
        ];
        for nanos in [1, 10, 999, 1_000, 120_000, 1_000_000, 7_000_000, 123_456_789, 999_999_999] {
            cases.push(base + chrono::Duration::nanoseconds(nanos));
        }
        // A leap second, which chrono writes as :60.
        cases.push(
            chrono::NaiveDate::from_ymd_opt(2016, 12, 31)
                .unwrap()
                .and_hms_nano_opt(23, 59, 59, 1_500_000_000)
                .unwrap()
                .and_utc(),
        );
        // And a spread of ordinary ones.
        let mut t = Utc.with_ymd_and_hms(2001, 2, 3, 4, 5, 6).unwrap();
        for i in 0..2_000i64 {
            t += chrono::Duration::nanoseconds(i * 7_919_999_983 + 13);
            cases.push(t);
        }
        for ts in &cases {
            assert_eq!(ours(ts), chronos(ts), "{ts:?}");
        }
    }

    #[test]
    fn what_is_written_reads_back_and_lenient_text_still_reads() {
        let ts = Utc.with_ymd_and_hms(2026, 11, 22, 16, 8, 51).unwrap() + chrono::Duration::nanoseconds(5);
        let text = ours(&ts);
        assert_eq!(parse(text.trim_start_matches("{\"ts\":\"").trim_end_matches("\"}")).unwrap(), ts);
        for (text, expected) in [
            ("2026-11-22T16:08:51Z", "2026-11-22T16:08:51Z"),
            ("2026-11-22T17:08:51+01:00", "2026-11-22T16:08:51Z"),
            ("2026-11-22t16:08:51.5z", "2026-11-22T16:08:51.500Z"),
            // Accepted by chrono's FromStr only: the fallback keeps it.
            ("2026-11-22 16:08:51Z", "2026-11-22T16:08:51Z"),
        ] {
            let got = parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(got.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true), expected, "{text}");
        }
        assert!(parse("yesterday").is_err());
        assert!(parse("2026-13-01T00:00:00Z").is_err());
    }
}
