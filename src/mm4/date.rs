//! RFC 5322 date-times: formatted for `Received:` lines, parsed for
//! `X-Mms-Expiry` (which may also be relative: a number of seconds).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// Days since 1970-01-01 of a civil date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil date of a count of days since 1970-01-01: (year, month, day).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

/// A date such as `Thu, 26 Nov 2026 03:26:51 +0000`, in UTC.
pub fn format(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    format!(
        "{}, {:02} {} {} {:02}:{:02}:{:02} +0000",
        WEEKDAYS[(days % 7) as usize],
        day,
        MONTHS[(month - 1) as usize],
        year,
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// RFC 3339 in UTC with milliseconds, `2026-11-26T03:26:51.042Z`: fixed
/// width, so such times sort as text.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (year, month, day) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// The compact form for file names, `20261126T032651Z`.
pub fn compact(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (year, month, day) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    format!(
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Parses `[Day,] DD Mon YYYY HH:MM[:SS] +hhmm` (zone names UT/GMT/Z too).
pub fn parse(s: &str) -> Option<SystemTime> {
    let s = s.trim();
    let s = s.split_once(',').map_or(s, |(_, rest)| rest).trim();
    let mut parts = s.split_whitespace();
    let day: i64 = parts.next()?.parse().ok()?;
    let month = parts.next()?;
    let month = MONTHS.iter().position(|m| m.eq_ignore_ascii_case(month))? as i64 + 1;
    let year: i64 = parts.next()?.parse().ok()?;
    let mut hms = parts.next()?.split(':');
    let h: i64 = hms.next()?.parse().ok()?;
    let m: i64 = hms.next()?.parse().ok()?;
    let sec: i64 = hms.next().map_or(Some(0), |v| v.parse().ok())?;
    let zone = parts.next().unwrap_or("+0000");
    let offset = match zone {
        "UT" | "GMT" | "Z" => 0,
        z if z.len() == 5 && (z.starts_with('+') || z.starts_with('-')) => {
            let n: i64 = z[1..].parse().ok().filter(|n| (0..=9959).contains(n))?;
            let mins = n / 100 * 60 + n % 100;
            if z.starts_with('-') { -mins } else { mins }
        }
        _ => return None,
    };
    // Four-digit years only (RFC 5322 §3.3): no arithmetic below can
    // overflow, whatever a sender writes.
    if !(1..=31).contains(&day)
        || !(1000..=9999).contains(&year)
        || !(0..24).contains(&h)
        || !(0..60).contains(&m)
        || !(0..=60).contains(&sec)
    {
        return None;
    }
    let secs = days_from_civil(year, month, day) * 86_400 + h * 3600 + m * 60 + sec - offset * 60;
    u64::try_from(secs)
        .ok()
        .map(|s| UNIX_EPOCH + Duration::from_secs(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_dates() {
        let t = UNIX_EPOCH + Duration::from_secs(1_795_663_611);
        assert_eq!(format(t), "Thu, 26 Nov 2026 03:26:51 +0000");
        assert_eq!(format(UNIX_EPOCH), "Thu, 01 Jan 1970 00:00:00 +0000");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(format(leap), "Tue, 29 Feb 2000 00:00:00 +0000");
    }

    #[test]
    fn parses_dates() {
        let t = UNIX_EPOCH + Duration::from_secs(1_795_663_611);
        assert_eq!(parse("Thu, 26 Nov 2026 03:26:51 +0000"), Some(t));
        assert_eq!(parse(&format(t)), Some(t));
        assert_eq!(parse("26 Nov 2026 04:26:51 +0100"), Some(t));
        assert_eq!(parse("Wed, 25 Nov 2026 22:26:51 -0500"), Some(t));
        assert_eq!(
            parse("26 nov 2026 03:26 GMT"),
            Some(t - Duration::from_secs(51))
        );
        for bad in [
            "",
            "600",
            "32 Nov 2026 00:00:00 +0000",
            "26 Foo 2026 00:00 +0000",
            "26 Nov 2026 25:00 +0000",
            "26 Nov 99999999999999999 00:00 +0000",
            "26 Nov -9223372036854775808 00:00 +0000",
            "26 Nov 2026 00:00 +9999",
        ] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }
}
