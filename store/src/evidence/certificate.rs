//! `pgtrail certify`: a signed statement that the archive holds every change of some tables
//! over an LSN range, with no gap or with the gaps it names, bound to a checkpoint (its size
//! and root). The statement is what an auditor bundle of the same scope proves, so a
//! certificate is made by bundling the scope into a scratch directory, verifying that bundle,
//! and signing what the verification found; it is checked against the archive (recomputed the
//! same way, with the checkpoint of its size) or against a bundle of its scope.

use std::path::Path;

use serde::Serialize;

use super::bundle::{BundleError, BundleReport, Scope, bundle_against, verify_bundle};
use super::note::{Checkpoint, VerifierKey};
use super::signer::Signer;
use super::verify::Problem;
use crate::lsn::Lsn;

/// The first line of a certificate's statement.
pub const CERTIFICATE_HEADER: &str = "pgtrail.dev/coverage@v1";

/// What a certificate states.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Coverage {
    /// The checkpoint it is bound to: its origin, size and root (base64).
    pub origin: String,
    pub tree_size: u64,
    pub root: String,
    pub tables: Vec<String>,
    pub from: Option<String>,
    /// Every change of the scope is held from `from` through this LSN.
    pub through: Option<String>,
    pub changes: u64,
    /// The gaps the capture recorded inside the range (their payloads, JSON).
    pub gaps: Vec<String>,
}

impl Coverage {
    fn from_report(r: &BundleReport) -> Coverage {
        Coverage {
            origin: r.origin.clone(),
            tree_size: r.tree_size,
            root: r.root.clone(),
            tables: r.scope.tables.clone(),
            from: r.scope.from.map(|l| l.to_string()),
            through: r.complete_through.map(|l| l.to_string()),
            changes: r.changes,
            gaps: r.gaps.clone(),
        }
    }

    /// The statement, as the lines a signed note carries.
    pub fn text(&self) -> String {
        let mut text = format!(
            "{CERTIFICATE_HEADER}\norigin {}\ntree {} {}\ntables {}\nfrom {}\nthrough {}\nchanges {}\n",
            self.origin,
            self.tree_size,
            self.root,
            if self.tables.is_empty() {
                "*".to_string()
            } else {
                self.tables.join(",")
            },
            self.from.as_deref().unwrap_or("start"),
            self.through.as_deref().unwrap_or("none"),
            self.changes,
        );
        for gap in &self.gaps {
            text.push_str(&format!("gap {gap}\n"));
        }
        text
    }

    /// Read a statement [`text`](Self::text) wrote.
    pub fn parse(text: &str) -> Result<Coverage, String> {
        // A signed note's text holds no control character; a `\r` here made `lines()` read a
        // second text of one statement (found by the evidence_texts fuzz target).
        if text.chars().any(|c| c.is_control() && c != '\n') {
            return Err("a statement holds a control character".into());
        }
        let mut lines = text.lines();
        if lines.next() != Some(CERTIFICATE_HEADER) {
            return Err(format!("not a {CERTIFICATE_HEADER} statement"));
        }
        let mut field = |name: &str| -> Result<String, String> {
            lines
                .next()
                .and_then(|l| l.strip_prefix(name))
                .and_then(|l| l.strip_prefix(' '))
                .map(str::to_string)
                .ok_or_else(|| format!("no `{name}` line where one belongs"))
        };
        let origin = field("origin")?;
        let tree = field("tree")?;
        let (size, root) = tree.split_once(' ').ok_or("a `tree` line is `SIZE ROOT`")?;
        let tables = field("tables")?;
        let from = field("from")?;
        let through = field("through")?;
        let changes = field("changes")?;
        let mut gaps = Vec::new();
        for line in lines {
            gaps.push(
                line.strip_prefix("gap ")
                    .ok_or_else(|| format!("unexpected line {line:?}"))?
                    .to_string(),
            );
        }
        let lsn_or = |text: String, none: &str| -> Result<Option<String>, String> {
            if text == none {
                return Ok(None);
            }
            // Kept as the LSN's own spelling: `0/20\r` read as `0/20` but kept as written
            // was a second text of one statement (found by the evidence_texts fuzz target).
            let lsn = text
                .parse::<Lsn>()
                .map_err(|_| format!("{text:?} is not an LSN"))?;
            Ok(Some(lsn.to_string()))
        };
        Ok(Coverage {
            origin,
            tree_size: size.parse().map_err(|_| "the tree size is not a number")?,
            root: root.to_string(),
            tables: if tables == "*" {
                Vec::new()
            } else {
                tables.split(',').map(str::to_string).collect()
            },
            from: lsn_or(from, "start")?,
            through: lsn_or(through, "none")?,
            changes: changes
                .parse()
                .map_err(|_| "the change count is not a number")?,
            gaps,
        })
    }

    fn scope(&self) -> Result<Scope, String> {
        let lsn = |t: &Option<String>| {
            t.as_deref()
                .map(|t| t.parse::<Lsn>().map_err(|_| format!("{t:?} is not an LSN")))
                .transpose()
        };
        Ok(Scope {
            tables: self.tables.clone(),
            from: lsn(&self.from)?,
            // The scope certified ends where the statement says it is complete.
            to: lsn(&self.through)?,
        })
    }
}

/// Bundle `scope` against the checkpoint `note` into a scratch directory inside the archive
/// (it holds a copy of production data: never the system's temporary directory), verify the
/// bundle, remove it, and return what it proved.
fn covered(dir: &Path, scope: &Scope, note: &str) -> Result<Coverage, BundleError> {
    let scratch = dir.join(format!(".certify-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    let result =
        bundle_against(dir, scope, &scratch, note).and_then(|_| verify_bundle(&scratch, &[]));
    let _ = std::fs::remove_dir_all(&scratch);
    let report = result?;
    if let Some(p) = report.problems.first() {
        return Err(BundleError::Bug(format!(
            "the scope's bundle does not verify ({}: {})",
            p.place, p.what
        )));
    }
    Ok(Coverage::from_report(&report))
}

/// A certificate of `scope` bound to the archive's latest checkpoint, signed with `key` (the
/// key that signs the archive's checkpoints).
pub fn certify(dir: &Path, scope: &Scope, key: &Signer) -> Result<String, BundleError> {
    let note = std::fs::read_to_string(dir.join(super::state::EVIDENCE_DIR).join("checkpoint"))
        .map_err(|_| BundleError::NoCheckpoint)?;
    let checkpoint = Checkpoint::in_note_unverified(&note)
        .map_err(|e| BundleError::Checkpoint(e.to_string()))?;
    if checkpoint.origin != key.name() {
        return Err(BundleError::Key(format!(
            "the archive's checkpoints are of origin {:?}, the key is {:?}: sign with the key that signs them",
            checkpoint.origin,
            key.name()
        )));
    }
    let coverage = covered(dir, scope, &note)?;
    Ok(key.sign(&coverage.text())?)
}

/// What checking a certificate found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CertificateReport {
    pub ok: bool,
    pub problems: Vec<Problem>,
    pub signature_verified: bool,
    pub statement: Option<Coverage>,
}

impl CertificateReport {
    fn problem(&mut self, place: &str, what: impl Into<String>) {
        self.problems.push(Problem {
            place: place.to_string(),
            what: what.into(),
        });
    }
}

/// Open a certificate note with `keys`: its statement, or why not.
fn open(note: &str, keys: &[VerifierKey]) -> Result<Coverage, String> {
    let Some((body, name)) = keys
        .iter()
        .find_map(|k| k.open(note).ok().map(|b| (b, k.name())))
    else {
        return Err(if keys.is_empty() {
            "give the verifier key (--key): a certificate is only as good as its signature".into()
        } else {
            "no given --key verifies its signature (edited, or signed by another key)".into()
        });
    };
    let c = Coverage::parse(body)?;
    if c.origin != name {
        return Err(format!(
            "its origin {:?} is not the signing key's name {name:?}",
            c.origin
        ));
    }
    Ok(c)
}

/// The statement of a certificate whose signature verifies, with a report that says so; or
/// the report of why not.
fn opened(note: &str, keys: &[VerifierKey]) -> (Option<Coverage>, CertificateReport) {
    let mut report = CertificateReport::default();
    match open(note, keys) {
        Ok(c) => {
            report.signature_verified = true;
            (Some(c), report)
        }
        Err(why) => {
            report.problem("the certificate", why);
            (None, report)
        }
    }
}

/// Compare what a certificate states with what was found; each difference is a problem.
fn compare(stated: Coverage, found: Coverage, mut report: CertificateReport) -> CertificateReport {
    let fields: [(&str, String, String); 7] = [
        ("origin", stated.origin.clone(), found.origin.clone()),
        (
            "tree",
            format!("{} {}", stated.tree_size, stated.root),
            format!("{} {}", found.tree_size, found.root),
        ),
        ("tables", stated.tables.join(","), found.tables.join(",")),
        (
            "from",
            format!("{:?}", stated.from),
            format!("{:?}", found.from),
        ),
        (
            "through",
            format!("{:?}", stated.through),
            format!("{:?}", found.through),
        ),
        (
            "changes",
            stated.changes.to_string(),
            found.changes.to_string(),
        ),
        ("gaps", stated.gaps.join("\n"), found.gaps.join("\n")),
    ];
    for (name, said, is) in fields {
        if said != is {
            report.problem(
                &format!("the certificate's {name}"),
                format!("states {said}, the evidence gives {is}"),
            );
        }
    }
    report.statement = Some(stated);
    report.ok = report.problems.is_empty();
    report
}

/// Check a certificate against the archive in `dir`: its signature, and its statement
/// recomputed with the archive's checkpoint of the size it names.
pub fn check_with_archive(
    dir: &Path,
    note: &str,
    keys: &[VerifierKey],
) -> Result<CertificateReport, BundleError> {
    let (stated, mut report) = opened(note, keys);
    let Some(stated) = stated else {
        return Ok(report);
    };
    let scope = match stated.scope() {
        Ok(s) => s,
        Err(why) => {
            report.problem("the certificate", why);
            return Ok(report);
        }
    };
    let path = dir
        .join(super::state::EVIDENCE_DIR)
        .join("checkpoints")
        .join(stated.tree_size.to_string());
    let Ok(checkpoint) = std::fs::read_to_string(&path) else {
        report.problem(
            "the certificate's tree",
            format!(
                "the archive holds no checkpoint of size {} ({} is missing): it is not this archive's, or the archive lost it",
                stated.tree_size,
                path.display()
            ),
        );
        return Ok(report);
    };
    let found = covered(dir, &scope, &checkpoint)?;
    Ok(compare(stated, found, report))
}

/// Check a certificate against a bundle of its scope (`pgtrail bundle`): its signature, and
/// that the bundle proves what it states.
pub fn check_with_bundle(
    bundle: &Path,
    note: &str,
    keys: &[VerifierKey],
) -> Result<CertificateReport, BundleError> {
    let (stated, mut report) = opened(note, keys);
    let Some(stated) = stated else {
        return Ok(report);
    };
    let verified = verify_bundle(bundle, keys)?;
    if !verified.ok {
        for p in verified.problems {
            report.problems.push(p);
        }
        report.statement = Some(stated);
        return Ok(report);
    }
    Ok(compare(stated, Coverage::from_report(&verified), report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_statement_reads_back_as_written_and_refuses_what_it_did_not_write() {
        let c = Coverage {
            origin: "pgtrail.test/shop".into(),
            tree_size: 77,
            root: "QjU1".into(),
            tables: vec!["public.a".into(), "billing.b".into()],
            from: Some("0/1925978".into()),
            through: Some("0/19262D0".into()),
            changes: 15,
            gaps: vec![r#"{"from":"0/1","to":"0/2"}"#.into()],
        };
        assert_eq!(Coverage::parse(&c.text()).unwrap(), c);
        let all = Coverage {
            tables: Vec::new(),
            from: None,
            through: None,
            gaps: Vec::new(),
            ..c.clone()
        };
        assert_eq!(Coverage::parse(&all.text()).unwrap(), all);
        assert!(Coverage::parse(&c.text().replace("changes 15", "changes many")).is_err());
        assert!(Coverage::parse(&c.text().replace("from 0/1925978", "from yesterday")).is_err());
        assert!(Coverage::parse(&format!("{}extra\n", all.text())).is_err());
        assert!(Coverage::parse("pgtrail.test/shop\n77\nQjU1\n").is_err());
    }
}
