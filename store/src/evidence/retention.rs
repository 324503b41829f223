//! Retention on a schedule (`pgtrail capture --retain TABLES=AGE`): while it captures, the
//! capture purges each rule's tables of the history older than the rule's age, as `pgtrail
//! purge` does (see [`super::redact::plan_purge`]), at most once per interval.
//!
//! A rule's position is the first change of any table committed at or after now − age, as
//! `pgtrail purge --before TIME` reads a time, but never past what is compacted: a change
//! still in the log is purged by a later run, once it is in a segment. Changes under a legal
//! hold are left whole ([`PurgeMode::Scheduled`]), and the first run after the hold's release
//! erases them. A run erases nothing twice (a change erased already is skipped), so a run with
//! nothing new to erase verifies the archive, reads the tables' segments and writes nothing.

use std::path::Path;
use std::time::Duration;

use super::redact::{PurgeCounts, PurgeMode};
use crate::Compactor;
use crate::error::{CompactError, SegmentError};
use crate::log::{LogReader, SharedLog};
use crate::lsn::Lsn;
use crate::manifest::SegmentManifest;
use crate::segment::SegmentReader;

/// One retention rule: the history of `tables` (`schema.table`) is kept whole for `keep`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetentionRule {
    pub tables: Vec<String>,
    pub keep: Duration,
    /// The rule as it was given (`public.sessions=30d`), for receipts and logs.
    pub text: String,
}

impl std::str::FromStr for RetentionRule {
    type Err = String;

    /// `TABLES=AGE`: tables comma-separated (a name without a schema is in `public`), the age
    /// a number and a unit: `s`, `m`, `h`, `d` or `w` (`public.sessions,audit_log=90d`).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let hint = "give TABLES=AGE, e.g. public.sessions,audit_log=90d (units s, m, h, d, w)";
        let Some((tables, age)) = text.rsplit_once('=') else {
            return Err(format!("{text:?} has no '=': {hint}"));
        };
        let tables: Vec<String> = tables
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(|t| match t.contains('.') {
                true => t.to_string(),
                false => format!("public.{t}"),
            })
            .collect();
        if tables.is_empty() {
            return Err(format!("{text:?} names no table: {hint}"));
        }
        let keep = parse_age(age.trim()).map_err(|e| format!("{text:?}: {e}; {hint}"))?;
        Ok(RetentionRule {
            tables,
            keep,
            text: text.trim().to_string(),
        })
    }
}

/// An age: a whole number and a unit (`s`, `m`, `h`, `d`, `w`), more than zero.
pub fn parse_age(text: &str) -> Result<Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("age {text:?} has no unit"))?;
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("age {text:?} does not start with a whole number"))?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => {
            return Err(format!(
                "age {text:?} has unit {unit:?}, not s, m, h, d or w"
            ));
        }
    };
    match number.checked_mul(seconds) {
        Some(0) => Err(format!(
            "age {text:?} is zero: the history would be purged as it comes"
        )),
        Some(s) => Ok(Duration::from_secs(s)),
        None => Err(format!("age {text:?} is too large")),
    }
}

/// A capture's retention policy.
#[derive(Clone, Debug)]
pub struct RetentionPolicy {
    pub rules: Vec<RetentionRule>,
    /// Why (each purge's receipt keeps it, with the rule).
    pub reason: String,
    /// How often the rules are applied.
    pub every: Duration,
}

/// What one rule's run did.
#[derive(Clone, Debug)]
pub struct RetentionOutcome {
    pub rule: String,
    /// The position the history was purged before.
    pub before: Lsn,
    pub redacted: u64,
    pub counts: PurgeCounts,
}

/// Apply every rule of `policy` once, as of `now_us`, with the compactor of this process's
/// archive (the capture's, between its compactions). A rule that fails stops the run with its
/// error; the rules before it are done (each purge is crash safe on its own, see
/// [`Compactor::redact`]).
pub fn apply(
    compactor: &Compactor,
    log: &SharedLog,
    policy: &RetentionPolicy,
    now_us: i64,
) -> Result<Vec<RetentionOutcome>, CompactError> {
    let mut outcomes = Vec::new();
    for rule in &policy.rules {
        let keep = i64::try_from(rule.keep.as_micros()).unwrap_or(i64::MAX);
        let manifest = LogReader::of_shared(log)?.manifest()?;
        let dir = compactor.segments_dir().to_path_buf();
        let before = position(&manifest, &dir, now_us.saturating_sub(keep))?;
        let reason = format!("{} (retention {})", policy.reason, rule.text);
        let (redacted, counts) =
            compactor.purge(&rule.tables, before, &reason, PurgeMode::Scheduled)?;
        outcomes.push(RetentionOutcome {
            rule: rule.text.clone(),
            before,
            redacted,
            counts,
        });
    }
    Ok(outcomes)
}

/// The position a retention purges before, for the moment `at_us`: the lowest commit LSN of a
/// compacted change committed at or after it (of any table), or the end of the compacted
/// history when every compacted change is older. Segments wholly before or after the moment
/// answer from the manifest; only those straddling it are read (their LSN and time columns).
fn position(manifest: &SegmentManifest, dir: &Path, at_us: i64) -> Result<Lsn, SegmentError> {
    let end = Lsn(manifest.compacted_through.0.saturating_add(1));
    let mut first = end;
    for seg in &manifest.segments {
        if seg.max_committed_at_us < at_us || seg.min_key.commit_lsn >= first {
            continue;
        }
        if seg.min_committed_at_us >= at_us {
            first = first.min(seg.min_key.commit_lsn);
            continue;
        }
        let columns = SegmentReader::key_and_time_columns();
        SegmentReader::open_selected(
            &dir.join(&seg.file_name),
            Some(&seg.sha256),
            8192,
            (0, u64::MAX),
            (at_us, i64::MAX),
            Some(&columns),
            None,
        )?
        .for_each_key_and_time(|key, at| {
            if at >= at_us {
                first = first.min(key.commit_lsn);
            }
        })?;
    }
    Ok(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rule_names_tables_and_an_age_and_a_wrong_one_says_how_to_write_it() {
        let rule: RetentionRule = "public.sessions, audit_log=90d".parse().unwrap();
        assert_eq!(rule.tables, ["public.sessions", "public.audit_log"]);
        assert_eq!(rule.keep, Duration::from_secs(90 * 86_400));
        assert_eq!(parse_age("12h"), Ok(Duration::from_secs(43_200)));
        assert_eq!(parse_age("2w"), Ok(Duration::from_secs(14 * 86_400)));
        for wrong in [
            "sessions",
            "=30d",
            "sessions=30",
            "sessions=0d",
            "sessions=3y",
            "t=d",
        ] {
            let e = wrong.parse::<RetentionRule>().unwrap_err();
            assert!(e.contains("TABLES=AGE"), "{wrong}: {e}");
        }
        assert!(parse_age("99999999999999999999d").is_err());
    }
}
