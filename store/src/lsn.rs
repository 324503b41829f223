//! Log sequence numbers and the archive's ordering key.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A PostgreSQL WAL position, written as PostgreSQL writes it (`16/B374D848`).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Lsn(pub u64);

impl Lsn {
    pub const ZERO: Lsn = Lsn(0);
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// The text was not an LSN of the form `X/Y` with hexadecimal halves.
#[derive(Debug, thiserror::Error)]
#[error(
    "invalid LSN {text:?}: expected two hexadecimal numbers separated by '/', like 16/B374D848"
)]
pub struct ParseLsnError {
    text: String,
}

impl FromStr for Lsn {
    type Err = ParseLsnError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseLsnError {
            text: s.to_string(),
        };
        let (hi, lo) = s.trim().split_once('/').ok_or_else(err)?;
        let hi = u32::from_str_radix(hi, 16).map_err(|_| err())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| err())?;
        Ok(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }
}

/// The archive's ordering and deduplication key: the commit LSN of the source transaction
/// (the `final_lsn` of its Begin message) and the change's position inside it.
///
/// Several changes can share one WAL LSN (COPY, multi-row INSERT), so the per-change LSN
/// alone is not a key; the position inside the transaction is.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct ChangeKey {
    pub commit_lsn: Lsn,
    pub seq: u32,
}

impl ChangeKey {
    pub fn new(commit_lsn: Lsn, seq: u32) -> Self {
        ChangeKey { commit_lsn, seq }
    }
}

impl fmt::Display for ChangeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.commit_lsn, self.seq)
    }
}

/// The text was not a change key as [`ChangeKey`] displays one, `lsn#seq`.
#[derive(Debug, thiserror::Error)]
#[error("invalid change key {0:?}: expected an LSN, '#' and a position, like 16/B374D848#3")]
pub struct ParseChangeKeyError(String);

impl FromStr for ChangeKey {
    type Err = ParseChangeKeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseChangeKeyError(s.to_string());
        let (lsn, seq) = s.split_once('#').ok_or_else(err)?;
        Ok(ChangeKey::new(
            lsn.parse().map_err(|_| err())?,
            seq.parse().map_err(|_| err())?,
        ))
    }
}

/// Serialize an LSN as PostgreSQL writes it (`0/1A2B3C4`), for reports read by people and
/// programs alike.
pub(crate) fn serialize_as_text<S: serde::Serializer>(lsn: &Lsn, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(lsn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_text_round_trips_like_postgres_prints_it() {
        for text in ["0/0", "16/B374D848", "FFFFFFFF/FFFFFFFF", "0/1A2B3C4"] {
            let lsn: Lsn = text.parse().unwrap();
            assert_eq!(lsn.to_string(), text);
        }
        assert_eq!("1/0".parse::<Lsn>().unwrap(), Lsn(1 << 32));
    }

    #[test]
    fn malformed_lsn_text_is_an_error() {
        for text in ["", "12", "1/", "/1", "G/0", "1/2/3", "100000000/0"] {
            assert!(text.parse::<Lsn>().is_err(), "{text} parsed");
        }
    }

    #[test]
    fn change_key_text_round_trips_and_malformed_text_is_an_error() {
        let key = ChangeKey::new(Lsn(0x16_B374_D848), 3);
        assert_eq!(key.to_string(), "16/B374D848#3");
        assert_eq!("16/B374D848#3".parse::<ChangeKey>().unwrap(), key);
        for text in [
            "",
            "16/B374D848",
            "16/B374D848#",
            "#3",
            "16/B374D848#-1",
            "x#3",
        ] {
            assert!(text.parse::<ChangeKey>().is_err(), "{text} parsed");
        }
    }
}
