//! `pgtrail checkpoint` and `pgtrail verify` (issue 20): sign the archive's evidence tree, and
//! prove the archive complete and unaltered against signed checkpoints.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use pgtrail_store::evidence::note::{Checkpoint, VerifierKey};
use pgtrail_store::evidence::verify::{VerifyOptions, VerifyReport, verify_archive};
use pgtrail_store::{ChangeLog, Compactor, LogError};

#[derive(clap::Args)]
pub struct CheckpointArgs {
    /// Archive directory.
    #[arg(long, env = "PGTRAIL_ARCHIVE")]
    pub archive: PathBuf,
    /// How to compact, and `--signing-key` (required here): the key to sign with.
    #[command(flatten)]
    pub segments: crate::compact::SegmentArgs,
}

/// Compact first (so that the log tail is covered), then sign the tree.
pub async fn checkpoint(args: CheckpointArgs) -> anyhow::Result<()> {
    if !args.segments.signer.is_set() {
        bail!(
            "pgtrail checkpoint needs --signing-key FILE (or PGTRAIL_SIGNING_KEY; make one with `pgtrail keygen`), or --signer-command and --signer-key"
        );
    }
    let options = args.segments.options()?;
    let archive = args.archive.clone();
    let (report, signed) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        if !archive.join(pgtrail_store::LOG_FILE).exists() {
            return Err(LogError::NotAnArchive {
                path: archive.clone(),
            }
            .into());
        }
        let log = ChangeLog::open(&archive).map_err(|e| match e {
            LogError::InUse => anyhow::anyhow!(
                "the archive is held by a running `pgtrail capture`: give the capture \
                 --signing-key and it signs a checkpoint at every compaction"
            ),
            e => anyhow::Error::new(e)
                .context(format!("cannot open the archive {}", archive.display())),
        })?;
        let compactor = Compactor::for_log(&log, options);
        let report = compactor.run().context(
            "compaction failed; the log still holds every change not listed in a segment",
        )?;
        let signed = compactor
            .publish_evidence()
            .context("cannot sign a checkpoint")?;
        Ok((report, signed))
    })
    .await??;
    let Some(path) = signed else {
        bail!(
            "the archive's evidence tree is empty (nothing compacted since it keeps evidence): nothing to sign"
        );
    };
    let note = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    eprintln!(
        "checkpoint: compacted {} changes; signed {} (tree size {}); keep a copy outside the archive",
        report.changes,
        path.display(),
        Checkpoint::in_note_unverified(&note)?.size,
    );
    std::io::stdout().write_all(note.as_bytes())?;
    Ok(())
}

#[derive(clap::Args)]
pub struct ProveArgs {
    /// Archive directory.
    #[arg(long, env = "PGTRAIL_ARCHIVE")]
    pub archive: PathBuf,
    /// The change: its commit LSN and position in its transaction, as `pgtrail sql` shows
    /// them (`lsn`, `seq`), e.g. `0/1A2B3C4:5`.
    #[arg(long, required_unless_present = "consistency_from")]
    pub change: Option<String>,
    /// Instead of a change: prove that the tree this older checkpoint pins is a prefix of the
    /// tree `--checkpoint` pins (the archive only grew between them).
    #[arg(long, conflicts_with = "change")]
    pub consistency_from: Option<PathBuf>,
    /// The signed checkpoint whose tree the proof is for (default: the archive's latest,
    /// `evidence/checkpoint`).
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
}

/// Print a C2SP tlog-proof that the change is in the tree the checkpoint pins, or the
/// consistency proof between two checkpoints.
pub async fn prove(args: ProveArgs) -> anyhow::Result<()> {
    let checkpoint = args
        .checkpoint
        .clone()
        .unwrap_or_else(|| args.archive.join("evidence/checkpoint"));
    let read = |path: &PathBuf| {
        std::fs::read_to_string(path).with_context(|| {
            format!(
                "cannot read the checkpoint {} (sign one with `pgtrail checkpoint`)",
                path.display()
            )
        })
    };
    let note = read(&checkpoint)?;
    if let Some(old) = &args.consistency_from {
        let old = read(old)?;
        let archive = args.archive.clone();
        let proof = tokio::task::spawn_blocking(move || {
            pgtrail_store::evidence::prove::prove_consistency(&archive, &old, &note)
        })
        .await??;
        std::io::stdout().write_all(proof.as_bytes())?;
        return Ok(());
    }
    let key = parse_change(args.change.as_deref().unwrap_or_default())?;
    let archive = args.archive.clone();
    let proof = tokio::task::spawn_blocking(move || {
        pgtrail_store::evidence::prove::prove(&archive, key, &note)
    })
    .await??;
    std::io::stdout().write_all(proof.as_bytes())?;
    Ok(())
}

/// Which changes a bundle or a certificate is for.
#[derive(clap::Args)]
pub struct ScopeArgs {
    /// The tables in scope, as `schema.table` (a name without a schema is in `public`),
    /// comma-separated, by the name each bore at its changes (default: every table, and the
    /// messages).
    #[arg(long, value_delimiter = ',')]
    pub tables: Vec<String>,
    /// The first commit LSN in scope (0/1A2B3C4), or a time (2026-07-01 00:00:00+00): from the
    /// first change committed at or after it (default: the archive's start).
    #[arg(long)]
    pub from: Option<String>,
    /// The last commit LSN in scope, or a time: through the last change committed at or before
    /// it (default: the latest signed checkpoint's end).
    #[arg(long)]
    pub to: Option<String>,
}

impl ScopeArgs {
    /// The scope, times turned into commit LSNs read from the archive in `dir`: the range of
    /// LSNs that holds every change committed between the times (a change committed later
    /// than another may have the lower LSN, so the range may hold a few changes beside the
    /// window, never fewer). Each turn is told on stderr.
    pub async fn scope(
        &self,
        dir: &Path,
    ) -> anyhow::Result<pgtrail_store::evidence::bundle::Scope> {
        use pgtrail_query::Moment;
        let parse = |flag: &str, text: &Option<String>| {
            text.as_deref()
                .map(|t| crate::export::moment(t, flag).map(|m| (m, t.to_string())))
                .transpose()
        };
        let (from, to) = (parse("--from", &self.from)?, parse("--to", &self.to)?);
        let is_time = |m: &Option<(Moment, String)>| matches!(m, Some((Moment::Time(_), _)));
        let (from, to) = if is_time(&from) || is_time(&to) {
            let dir = dir.to_path_buf();
            tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
                let archive = pgtrail_query::ArchiveSnapshot::open(&dir)?;
                // `--from` a time: the first change committed at or after it; `--to`: the last
                // at or before it.
                let lsn = |flag: &str, moment: Option<(Moment, String)>, from: bool| {
                    use pgtrail_query::export::commit_lsns_between;
                    let Some((moment, text)) = moment else {
                        return Ok(None);
                    };
                    let t = match moment {
                        Moment::Lsn(lsn) => return Ok(Some(lsn)),
                        Moment::Time(t) => t,
                    };
                    let (times, side, which) = match from {
                        true => ((t, i64::MAX), "at or after", "first"),
                        false => ((i64::MIN, t), "at or before", "last"),
                    };
                    let Some((first, last)) = commit_lsns_between(&archive, times)? else {
                        bail!(
                            "{flag} {text}: the archive holds no change committed {side} it, so no position in it stands for that time; give an LSN instead"
                        );
                    };
                    let lsn = if from { first } else { last };
                    eprintln!(
                        "scope: {flag} {text} is commit LSN {lsn}, the {which} change committed {side} it"
                    );
                    anyhow::Ok(Some(lsn))
                };
                Ok((lsn("--from", from, true)?, lsn("--to", to, false)?))
            })
            .await??
        } else {
            let lsn = |m: Option<(Moment, String)>| match m {
                Some((Moment::Lsn(lsn), _)) => Some(lsn),
                _ => None,
            };
            (lsn(from), lsn(to))
        };
        let scope = pgtrail_store::evidence::bundle::Scope {
            tables: self
                .tables
                .iter()
                .map(|t| t.trim())
                .filter(|t| !t.is_empty())
                .map(|t| {
                    if t.contains('.') {
                        t.to_string()
                    } else {
                        format!("public.{t}")
                    }
                })
                .collect(),
            from,
            to,
        };
        if let (Some(from), Some(to)) = (scope.from, scope.to)
            && from > to
        {
            bail!("--from {from} is after --to {to}: nothing would be in scope");
        }
        Ok(scope)
    }
}

#[derive(clap::Args)]
pub struct BundleArgs {
    /// Archive directory.
    #[arg(long, env = "PGTRAIL_ARCHIVE")]
    pub archive: PathBuf,
    #[command(flatten)]
    pub scope: ScopeArgs,
    /// The directory to write (it must not exist yet).
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(clap::Args)]
pub struct CertifyArgs {
    /// Archive directory.
    #[arg(long, env = "PGTRAIL_ARCHIVE")]
    pub archive: PathBuf,
    #[command(flatten)]
    pub scope: ScopeArgs,
    /// The signer of the archive's checkpoints.
    #[command(flatten)]
    pub signer: crate::compact::SignerArgs,
}

/// Print a signed coverage certificate of the scope, bound to the latest checkpoint.
pub async fn certify(args: CertifyArgs) -> anyhow::Result<()> {
    let scope = args.scope.scope(&args.archive).await?;
    let Some(key) = args.signer.signer()? else {
        bail!(
            "pgtrail certify needs the signer of the archive's checkpoints: --signing-key FILE, or --signer-command and --signer-key"
        );
    };
    let archive = args.archive.clone();
    let note = tokio::task::spawn_blocking(move || {
        pgtrail_store::evidence::certificate::certify(&archive, &scope, &key)
    })
    .await??;
    std::io::stdout().write_all(note.as_bytes())?;
    Ok(())
}

/// Write an auditor bundle: the changes in scope, and the proof that they are complete for it
/// and included in the archive's latest signed checkpoint.
pub async fn bundle(args: BundleArgs) -> anyhow::Result<()> {
    use pgtrail_store::evidence::bundle::bundle;
    let scope = args.scope.scope(&args.archive).await?;
    let (archive, out) = (args.archive.clone(), args.out.clone());
    let done = tokio::task::spawn_blocking(move || bundle(&archive, &scope, &out)).await??;
    eprintln!(
        "bundle: {} changes in scope in {} files, leaves {}..{} of the checkpoint's tree of {}; wrote {}",
        done.changes,
        done.files,
        done.first,
        done.first + done.count,
        done.tree_size,
        args.out.display()
    );
    Ok(())
}

/// A change as `--change` names it: its commit LSN and position, `LSN:SEQ`.
fn parse_change(change: &str) -> anyhow::Result<pgtrail_store::ChangeKey> {
    let (lsn, seq) = change
        .rsplit_once(':')
        .with_context(|| format!("--change {change:?}: write LSN:SEQ, e.g. 0/1A2B3C4:5"))?;
    Ok(pgtrail_store::ChangeKey::new(
        lsn.parse()
            .with_context(|| format!("--change: {lsn:?} is not an LSN (like 0/1A2B3C4)"))?,
        seq.parse()
            .with_context(|| format!("--change: {seq:?} is not a position (a number)"))?,
    ))
}

#[derive(clap::Args)]
pub struct VerifyArgs {
    /// Archive directory.
    #[arg(long, env = "PGTRAIL_ARCHIVE", required_unless_present = "bundle")]
    pub archive: Option<PathBuf>,
    /// Check an auditor bundle (`pgtrail bundle --out`) instead of an archive.
    #[arg(long, conflicts_with_all = ["archive", "trusted"])]
    pub bundle: Option<PathBuf>,
    /// Check a coverage certificate (`pgtrail certify`) against the archive, or against the
    /// bundle of its scope with --bundle.
    #[arg(long, conflicts_with = "trusted")]
    pub certificate: Option<PathBuf>,
    /// A verifier key (as `pgtrail keygen` printed it, or a file holding it) whose signatures
    /// count; repeat for several. Take it from the archive's owner, never from the archive.
    #[arg(long = "key")]
    pub keys: Vec<String>,
    /// A checkpoint kept outside the archive (an earlier copy, a published one): the archive
    /// must extend it. Repeat for several.
    #[arg(long = "trusted-checkpoint")]
    pub trusted: Vec<PathBuf>,
    /// A cosigner's (witness's, auditor's) verifier key, as `pgtrail keygen --cosigner`
    /// printed it (or a file holding it): its cosignatures on checkpoints are checked and
    /// reported. Repeat for several.
    #[arg(long = "witness-key")]
    pub witness_keys: Vec<String>,
    /// Print the report as JSON on stdout (for programs).
    #[arg(long)]
    pub json: bool,
}

/// `verify` found something wrong (exit status 1; other errors exit 2).
#[derive(Debug)]
pub struct VerificationFailed(pub usize);

impl std::fmt::Display for VerificationFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "verification FAILED: {} problem(s), listed above",
            self.0
        )
    }
}

impl std::error::Error for VerificationFailed {}

/// The signed checkpoint note in the file `flag` names, refused unless it is one: the archive is
/// checked against it only after every segment is read (minutes on a large archive), too late
/// to learn that the file was the wrong one.
fn read_checkpoint_note(flag: &str, path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{flag} {}: cannot read it", path.display()))?;
    if let Err(e) = pgtrail_store::evidence::note::Checkpoint::in_note_unverified(&text) {
        bail!(
            "{flag} {}: not a signed checkpoint ({e}); give a copy of a file `pgtrail checkpoint` \
             wrote (the archive's evidence/checkpoints/<size>)",
            path.display()
        );
    }
    Ok(text)
}

/// The verifier keys `--key` gives: each a key as `pgtrail keygen` printed it, or a file
/// holding one.
fn verifier_keys(given: &[String]) -> anyhow::Result<Vec<VerifierKey>> {
    let mut keys = Vec::new();
    for key in given {
        let text = match std::fs::read_to_string(key) {
            Ok(text) => text,
            Err(_) if key.contains('+') => key.clone(),
            Err(e) => bail!("--key {key}: neither a verifier key nor a readable file: {e}"),
        };
        keys.push(VerifierKey::parse(text.trim()).with_context(|| {
            format!("--key {key}: not a verifier key (pgtrail keygen prints one)")
        })?);
    }
    Ok(keys)
}

pub async fn verify(args: VerifyArgs) -> anyhow::Result<()> {
    if let Some(certificate) = args.certificate.clone() {
        return verify_certificate(&args, certificate).await;
    }
    if let Some(bundle) = args.bundle.clone() {
        return verify_bundle(bundle, verifier_keys(&args.keys)?, args.json).await;
    }
    let Some(archive) = args.archive.clone() else {
        bail!("give --archive DIR (or --bundle DIR)");
    };
    let mut options = VerifyOptions {
        keys: verifier_keys(&args.keys)?,
        derived: true,
        ..VerifyOptions::default()
    };
    for key in &args.witness_keys {
        let text = std::fs::read_to_string(key).unwrap_or_else(|_| key.clone());
        options.witnesses.push(
            pgtrail_store::evidence::note::WitnessKey::parse(text.trim()).with_context(|| {
                format!(
                    "--witness-key {key}: not a cosigner key (pgtrail keygen --cosigner prints one)"
                )
            })?,
        );
    }
    // A trusted checkpoint that is no checkpoint at all, or one no key could count, is the
    // caller's mistake: say so now rather than after reading every segment (minutes on a large
    // archive). A note that parses but whose signature fails is a finding, and stays in the report.
    for path in &args.trusted {
        let text = read_checkpoint_note("--trusted-checkpoint", path)?;
        options.trusted.push((path.clone(), text));
    }
    if !options.trusted.is_empty() && options.keys.is_empty() {
        bail!(
            "--trusted-checkpoint needs --key: a checkpoint kept outside the archive counts only \
             when a verifier key you pinned verifies its signature"
        );
    }
    let shown = archive.clone();
    let report = tokio::task::spawn_blocking(move || {
        let mut last_shown = std::time::Instant::now();
        verify_archive(&archive, &options, |done, total| {
            if total >= 20 && (last_shown.elapsed().as_secs() >= 2 || done == total) {
                eprintln!("verify: {done}/{total} segments read");
                last_shown = std::time::Instant::now();
            }
        })
    })
    .await?
    .with_context(|| format!("cannot read the archive {}", shown.display()))?;
    // Keyframes are derived, not evidence: each is computed again from the segments and
    // compared, so that an `as_of` starting from one answers what the changes say.
    let keyframes = if report.ok {
        let dir = shown.clone();
        Some(
            tokio::task::spawn_blocking(move || check_keyframes(&dir))
                .await?
                .with_context(|| format!("cannot check the keyframes of {}", shown.display()))?,
        )
    } else {
        None
    };
    let keyframe_problems = keyframes.as_ref().map_or(0, |(_, p)| p.len());
    if args.json {
        let mut json = serde_json::to_value(&report)?;
        if let Some((checked, problems)) = &keyframes {
            json["keyframes"] = serde_json::json!({
                "checked": checked,
                "problems": problems.iter().map(|p| serde_json::json!({
                    "file": p.file_name, "table": p.table, "at": p.at.to_string(), "reason": p.reason,
                })).collect::<Vec<_>>(),
            });
            if !problems.is_empty() {
                json["ok"] = serde_json::json!(false);
            }
        }
        println!("{json}");
    } else {
        print_report(&report);
        if let Some((checked, problems)) = &keyframes {
            for p in problems {
                println!(
                    "PROBLEM: keyframe {} ({} at {}): {}; remove it with `pgtrail keyframes --archive A --rebuild`",
                    p.file_name, p.table, p.at, p.reason
                );
            }
            if *checked > 0 && problems.is_empty() {
                println!("keyframes: {checked} checked, each equal to the replay of the changes");
            }
        }
        if report.key_indexes_checked > 0 {
            println!(
                "key indexes: {} checked, each equal to its segment's keys; key-ordered copies: {} checked, each row equal to the segment row it copies",
                report.key_indexes_checked, report.key_copies_checked
            );
        }
    }
    if !report.ok || keyframe_problems > 0 {
        return Err(VerificationFailed(report.problems.len() + keyframe_problems).into());
    }
    Ok(())
}

/// Check every keyframe of the archive in `dir` against the replay: how many, and the ones
/// that differ.
fn check_keyframes(
    dir: &Path,
) -> anyhow::Result<(usize, Vec<pgtrail_query::keyframes::KeyframeProblem>)> {
    let archive = pgtrail_query::ArchiveSnapshot::open(dir)?;
    let mut last_shown = std::time::Instant::now();
    let mut checked = 0;
    let problems = pgtrail_query::keyframes::check_keyframes(&archive, |done, total| {
        checked = total;
        if last_shown.elapsed().as_secs() >= 2 || (done == total && total >= 20) {
            eprintln!("verify: {done}/{total} keyframes checked");
            last_shown = std::time::Instant::now();
        }
    })?;
    Ok((checked, problems))
}

async fn verify_certificate(args: &VerifyArgs, certificate: PathBuf) -> anyhow::Result<()> {
    use pgtrail_store::evidence::certificate::{check_with_archive, check_with_bundle};
    let note = std::fs::read_to_string(&certificate)
        .with_context(|| format!("--certificate {}: cannot read it", certificate.display()))?;
    let keys = verifier_keys(&args.keys)?;
    let (archive, bundle) = (args.archive.clone(), args.bundle.clone());
    let r = tokio::task::spawn_blocking(move || match (bundle, archive) {
        (Some(bundle), _) => check_with_bundle(&bundle, &note, &keys),
        (None, Some(archive)) => check_with_archive(&archive, &note, &keys),
        (None, None) => unreachable!("clap requires --archive or --bundle"),
    })
    .await??;
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        let mut out = format!(
            "verify: {}: certificate {}",
            if r.ok { "OK" } else { "FAILED" },
            certificate.display()
        );
        if let Some(c) = &r.statement {
            out.push_str(&format!(
                ": {} changes of {} from {} through {}, {} gaps, tree {} of {}",
                c.changes,
                if c.tables.is_empty() {
                    "every table".to_string()
                } else {
                    c.tables.join(", ")
                },
                c.from.as_deref().unwrap_or("the start"),
                c.through.as_deref().unwrap_or("(none)"),
                c.gaps.len(),
                c.tree_size,
                c.origin
            ));
        }
        out.push('\n');
        for p in &r.problems {
            out.push_str(&format!("  PROBLEM: {}: {}\n", p.place, p.what));
        }
        print!("{out}");
    }
    if !r.ok {
        return Err(VerificationFailed(r.problems.len()).into());
    }
    Ok(())
}

async fn verify_bundle(dir: PathBuf, keys: Vec<VerifierKey>, json: bool) -> anyhow::Result<()> {
    use pgtrail_store::evidence::bundle::verify_bundle;
    let shown = dir.clone();
    let r = tokio::task::spawn_blocking(move || verify_bundle(&dir, &keys))
        .await?
        .with_context(|| format!("cannot read the bundle {}", shown.display()))?;
    if json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        let mut out = format!(
            "verify: {}: bundle {}: {} changes in scope ({}{}{}), checkpoint {} size {}: signature {}\n",
            if r.ok { "OK" } else { "FAILED" },
            shown.display(),
            r.changes,
            if r.scope.tables.is_empty() {
                "every table".to_string()
            } else {
                r.scope.tables.join(", ")
            },
            r.scope
                .from
                .map_or(String::new(), |l| format!(", from {l}")),
            r.complete_through
                .map_or(String::new(), |l| format!(", complete through {l}")),
            r.origin,
            r.tree_size,
            if r.signature_verified {
                "verified"
            } else {
                "NOT checked"
            },
        );
        findings(&mut out, &r.gaps, &r.warnings, &r.problems);
        print!("{out}");
    }
    if !r.ok {
        return Err(VerificationFailed(r.problems.len()).into());
    }
    Ok(())
}

fn print_report(r: &VerifyReport) {
    let mut out = String::new();
    let verdict = if r.ok { "OK" } else { "FAILED" };
    out.push_str(&format!(
        "verify: {verdict}: {} segments, {} changes; tree of {} leaves, root {}\n",
        r.segments, r.rows, r.tree_size, r.root
    ));
    for c in &r.checkpoints {
        out.push_str(&format!(
            "  checkpoint {} (size {}, {}): signature {}, {}\n",
            c.file,
            c.size,
            if c.trusted {
                "trusted, kept outside"
            } else {
                "in the archive"
            },
            if c.signature_verified {
                "verified"
            } else {
                "NOT checked"
            },
            if c.matches_tree {
                "matches the tree"
            } else {
                "does NOT match the tree"
            },
        ));
    }
    for c in &r.checkpoints {
        for w in &c.cosigned_by {
            out.push_str(&format!(
                "  checkpoint {} cosigned by {} (time {})\n",
                c.file, w.witness, w.time
            ));
        }
    }
    if r.attested_size > 0 {
        out.push_str(&format!(
            "  attested by a verified signature: the first {} changes\n",
            r.attested_size
        ));
    }
    if r.witnessed_size > 0 {
        out.push_str(&format!(
            "  cosigned by a given witness: the first {} changes\n",
            r.witnessed_size
        ));
    }
    findings(&mut out, &r.gaps, &r.warnings, &r.problems);
    print!("{out}");
}

/// The gaps, warnings and problems of a report, a line each, for people.
fn findings(
    out: &mut String,
    gaps: &[String],
    warnings: &[String],
    problems: &[pgtrail_store::evidence::verify::Problem],
) {
    for gap in gaps {
        out.push_str(&format!("  gap recorded by the capture: {gap}\n"));
    }
    for w in warnings {
        out.push_str(&format!("  warning: {w}\n"));
    }
    for p in problems {
        out.push_str(&format!("  PROBLEM: {}: {}\n", p.place, p.what));
    }
}

#[derive(clap::Args)]
pub struct CosignArgs {
    /// The archive the checkpoint is of: it is verified, and the checkpoint must match its
    /// tree, before anything is cosigned.
    #[arg(long, env = "PGTRAIL_ARCHIVE")]
    pub archive: PathBuf,
    /// The checkpoint to cosign (a signed note).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// The archive's verifier key: the checkpoint's signature must verify with it.
    #[arg(long = "log-key")]
    pub log_key: String,
    /// The cosigner's key (`pgtrail keygen --cosigner`).
    #[arg(long)]
    pub key: PathBuf,
}

/// An auditor's or witness's cosignature: verify the archive against the checkpoint, then
/// print the checkpoint with a C2SP `cosignature/v1` line of `--key` added.
pub async fn cosign(args: CosignArgs) -> anyhow::Result<()> {
    let key = pgtrail_store::evidence::note::SigningKey::read_file(&args.key)
        .with_context(|| format!("--key {}", args.key.display()))?;
    let note = read_checkpoint_note("--checkpoint", &args.checkpoint)?;
    let options = VerifyOptions {
        keys: verifier_keys(std::slice::from_ref(&args.log_key))?,
        trusted: vec![(args.checkpoint.clone(), note.clone())],
        ..VerifyOptions::default()
    };
    let archive = args.archive.clone();
    let report = tokio::task::spawn_blocking(move || verify_archive(&archive, &options, |_, _| {}))
        .await??;
    if !report.ok {
        print_report(&report);
        bail!("the archive does not verify against the checkpoint: nothing was cosigned");
    }
    let time = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .context("the system clock is before 1970")?
        .as_secs();
    let cosigned = key.cosign(&note, time)?;
    std::io::stdout().write_all(cosigned.as_bytes())?;
    Ok(())
}

#[derive(clap::Args)]
pub struct RedactArgs {
    /// Archive directory (a capture running on it carries the redaction out).
    #[arg(long, env = "PGTRAIL_ARCHIVE")]
    pub archive: PathBuf,
    /// A change to redact, as `pgtrail sql` shows it (`lsn`, `seq`): `0/1A2B3C4:5`. Repeat for
    /// several.
    #[arg(long = "change", required = true)]
    pub changes: Vec<String>,
    /// What to erase: any of context, before, after (comma-separated); of a logical message,
    /// its content (`content`, or `context`: its part 0).
    #[arg(long, value_delimiter = ',', default_values_t = ["context".to_string(), "before".to_string(), "after".to_string()])]
    pub parts: Vec<String>,
    /// Why (kept in the redaction's receipt, a leaf of the tree): a ticket, a request number.
    #[arg(long)]
    pub reason: String,
    /// With a capture running on the archive: how long to wait for it to take the redaction
    /// (it does between its compactions); once taken, the command waits until it is done.
    #[arg(long, default_value_t = 300)]
    pub wait_secs: u64,
}

/// Erase values of archived changes, keeping the evidence whole.
pub async fn redact(args: RedactArgs) -> anyhow::Result<()> {
    use pgtrail_store::evidence::redact::part_number;
    use pgtrail_store::evidence::requests::{Answer, Request};
    let keys = args
        .changes
        .iter()
        .map(|c| parse_change(c))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut parts = Vec::new();
    for part in &args.parts {
        let k = part_number(part).with_context(|| {
            format!("--parts: {part:?} is not one of context, before, after (content for a logical message)")
        })?;
        parts.push(k);
    }
    if args.reason.trim().is_empty() {
        bail!("--reason must say why (it is kept in the redaction's receipt)");
    }
    let archive = args.archive.clone();
    let reason = args.reason.clone();
    let wait = std::time::Duration::from_secs(args.wait_secs);
    let (counts, resumed) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let request = Request::Redact {
            changes: keys.clone(),
            parts: parts.clone(),
            reason: reason.clone(),
        };
        crate::retention::erase(
            &archive,
            "redact",
            wait,
            |compactor| Ok(compactor.redact_changes(&keys, &parts, &reason)?),
            request,
            |answer| match answer {
                Answer::Redacted { counts, resumed } => Ok((counts, resumed)),
                other => Err(crate::retention::unexpected(other)),
            },
        )
    })
    .await??;
    if resumed {
        eprintln!(
            "redact: the capture had begun this redaction and stopped before it was done; it finished it when it started again, and what follows is what was left then"
        );
    }
    if counts.erased_already > 0 {
        eprintln!(
            "redact: {} of the changes had every part asked erased already: left as they are, with no second receipt",
            counts.erased_already
        );
    }
    if counts.redacted == 0 {
        eprintln!("redact: nothing left to erase");
        return Ok(());
    }
    eprintln!(
        "redact: erased {} of {} changes; their receipts become leaves at the next compaction. \
         The old segment files are deleted after the retire grace period (run `pgtrail compact`, \
         or a running capture does it at its compactions); backups still hold the values",
        args.parts.join(", "),
        counts.redacted
    );
    Ok(())
}

/// The archive's log opened for writing, or None when a running capture holds it.
pub fn try_open_alone(archive: &Path) -> anyhow::Result<Option<ChangeLog>> {
    // A directory that is not an archive is named, not made into an empty one.
    if !archive.join(pgtrail_store::LOG_FILE).exists() {
        return Err(LogError::NotAnArchive {
            path: archive.to_path_buf(),
        }
        .into());
    }
    match ChangeLog::open(archive) {
        Ok(log) => Ok(Some(log)),
        Err(LogError::InUse) => Ok(None),
        Err(e) => {
            Err(anyhow::Error::new(e)
                .context(format!("cannot open the archive {}", archive.display())))
        }
    }
}
