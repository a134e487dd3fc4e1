//! Helpers for a filter's own config: values written the same way in every filter.

use std::time::Duration;

/// Longest duration accepted: beyond it a value is a mistake, and arithmetic on it could
/// overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// Parses a duration written `250ms`, `60s`, `10m`, `1h`, or a bare number of seconds, as in
/// `weir.toml`. `field` names the config field in the error (`retry.backoff.base: ...`).
/// Zero is allowed; values over [`MAX_DURATION`] are refused.
///
/// ```
/// use std::time::Duration;
/// assert_eq!(weir_sdk::config::parse_duration("per", "2m"), Ok(Duration::from_secs(120)));
/// assert!(weir_sdk::config::parse_duration("per", "1d").unwrap_err().contains("unit"));
/// ```
pub fn parse_duration(field: &str, s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let (n, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{field}: {s:?} is not a duration like \"1s\""))?;
    let secs = |per: u64| {
        n.checked_mul(per)
            .map(Duration::from_secs)
            .ok_or_else(|| format!("{field}: {s:?} is too long"))
    };
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" | "" => Duration::from_secs(n),
        "m" => secs(60)?,
        "h" => secs(3600)?,
        _ => return Err(format!("{field}: unknown unit {unit:?} (ms, s, m, h)")),
    };
    if d > MAX_DURATION {
        return Err(format!("{field}: {s:?} is longer than a year"));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units_and_refuse_what_would_overflow() {
        assert_eq!(parse_duration("f", "250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("f", " 90 "), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("f", "1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("f", "0s"), Ok(Duration::ZERO));
        assert!(parse_duration("f", "1d")
            .unwrap_err()
            .starts_with("f: unknown unit"));
        assert!(parse_duration("f", "s")
            .unwrap_err()
            .contains("is not a duration"));
        assert!(parse_duration("f", "99999999999999999h")
            .unwrap_err()
            .contains("too long"));
        assert!(parse_duration("f", "9000h")
            .unwrap_err()
            .contains("longer than a year"));
    }
}
