//! Figures for people: 1.5 GiB, 5m12s.

/// `1.5 GiB`, `12 B`.
pub fn bytes(n: u64) -> String {
    const U: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < U.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 { format!("{n} B") } else { format!("{v:.1} {}", U[i]) }
}

/// `3d4h`, `5m12s`, `42s`.
pub fn duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs % 86_400 / 3600, secs % 3600 / 60, secs % 60);
    if d > 0 {
        format!("{d}d{h}h")
    } else if h > 0 {
        format!("{h}h{m}m")
    } else if m > 0 {
        format!("{m}m{s}s")
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures() {
        assert_eq!(duration(42), "42s");
        assert_eq!(duration(312), "5m12s");
        assert_eq!(duration(3 * 86_400 + 4 * 3600), "3d4h");
        assert_eq!(bytes(1536 << 20), "1.5 GiB");
        assert_eq!(bytes(12), "12 B");
    }
}

/// Parse a size: plain bytes, or a number with a binary suffix `K`, `M`, `G`, `T`, `P` (also
/// `KiB`…), e.g. `64T`, `500G`, `1048576`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits_end);
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a size such as 64T, 500G or 1048576"))?;
    let shift = match unit.trim().to_ascii_lowercase().trim_end_matches("ib").trim_end_matches('b') {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        "p" => 50,
        _ => return Err(format!("{s:?} is not a size such as 64T, 500G or 1048576")),
    };
    n.checked_mul(1u64 << shift).ok_or_else(|| format!("{s:?} is too large"))
}

/// Deserialize an optional size ([`parse_size`]) from a string or an integer.
pub fn de_size_opt<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Raw {
        N(u64),
        S(String),
    }
    match <Option<Raw> as serde::Deserialize>::deserialize(d)? {
        None => Ok(None),
        Some(Raw::N(n)) => Ok(Some(n)),
        Some(Raw::S(s)) => parse_size(&s).map(Some).map_err(serde::de::Error::custom),
    }
}

#[cfg(test)]
mod size_tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64T"), Ok(64 << 40));
        assert_eq!(parse_size("500GiB"), Ok(500 << 30));
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert!(parse_size("12X").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999P").is_err());
    }
}
