//! Durations in configuration files: `"5s"`, `"1h 30m"`, or a plain number of seconds.

use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Parse `"5s"`, `"250ms"`, `"2m"`, or `"7"` (seconds).
pub fn parse(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<f64>() {
        if secs.is_finite() && (0.0..1e10).contains(&secs) {
            return Ok(Duration::from_secs_f64(secs));
        }
        return Err(format!("{s:?} is not a usable number of seconds"));
    }
    humantime::parse_duration(s).map_err(|e| format!("{s:?} is not a duration such as \"5s\" or \"2m\": {e}"))
}

/// Format for display: `"5s"`, `"1h 30m"`.
pub fn show(d: Duration) -> String {
    humantime::format_duration(Duration::from_millis(d.as_millis() as u64)).to_string()
}

/// serde: a duration from a string or a number of seconds.
pub fn de<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Secs(f64),
        Text(String),
    }
    match Raw::deserialize(d)? {
        Raw::Secs(s) => parse(&s.to_string()).map_err(serde::de::Error::custom),
        Raw::Text(t) => parse(&t).map_err(serde::de::Error::custom),
    }
}

/// serde: an optional duration.
pub fn de_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    de(d).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses() {
        assert_eq!(parse("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("1h 30m"), Ok(Duration::from_secs(5400)));
        assert!(parse("-1").is_err());
        assert!(parse("soon").is_err());
        assert_eq!(show(Duration::from_secs(90)), "1m 30s");
    }
}
