//! Job identifiers: UUIDv7 (RFC 9562), unique across hosts and time and sortable by creation time.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A job's identity. Its text form (36 characters, lowercase hex and dashes) is used in file
/// names, so it never contains a path separator.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct JobId(uuid::Uuid);

impl JobId {
    /// A new id: 48 bits of milliseconds since the epoch, then 74 random bits.
    pub fn new() -> Self {
        JobId(uuid::Uuid::now_v7())
    }

    /// The creation time encoded in the id, in milliseconds since the Unix epoch.
    pub fn created_ms(&self) -> u64 {
        self.0
            .get_timestamp()
            .map(|ts| {
                let (secs, nanos) = ts.to_unix();
                secs * 1000 + u64::from(nanos) / 1_000_000
            })
            .unwrap_or(0)
    }

    /// The first 8 characters, for compact display.
    pub fn short(&self) -> String {
        self.to_string()[..8].to_string()
    }
}

impl Default for JobId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.hyphenated())
    }
}

impl fmt::Debug for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JobId({self})")
    }
}

/// The text was not a job id.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a job id (expected a UUID such as 01900000-0000-7000-8000-000000000000)")]
pub struct ParseJobIdError(String);

impl FromStr for JobId {
    type Err = ParseJobIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // Only the canonical hyphenated lowercase form: the id is a file name on shared storage and
        // two spellings of one id must never name two files.
        let parsed = uuid::Uuid::try_parse(s).map_err(|_| ParseJobIdError(s.to_string()))?;
        if parsed.hyphenated().to_string() != s {
            return Err(ParseJobIdError(s.to_string()));
        }
        Ok(JobId(parsed))
    }
}

impl TryFrom<String> for JobId {
    type Error = ParseJobIdError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<JobId> for String {
    fn from(id: JobId) -> String {
        id.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_sortable_and_round_trip() {
        let a = JobId::new();
        let b = JobId::new();
        assert_ne!(a, b);
        assert!(a < b, "v7 ids sort by creation time");
        assert_eq!(a.to_string().parse::<JobId>().expect("round trip"), a);
        assert!(a.created_ms() > 1_700_000_000_000);
    }

    #[test]
    fn only_the_canonical_form_parses() {
        let a = JobId::new();
        assert!(a.to_string().to_uppercase().parse::<JobId>().is_err());
        assert!(a.to_string().replace('-', "").parse::<JobId>().is_err());
        assert!("../etc".parse::<JobId>().is_err());
        assert!("".parse::<JobId>().is_err());
    }
}
