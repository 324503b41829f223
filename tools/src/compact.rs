//! `pgtrail compact`: move the log's finished transactions into Parquet segments on demand.

use pgtrail_store::error_chain;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context as _;
use pgtrail_query::keyframes::{DueKeyframes, KeyframePolicy};
use pgtrail_store::evidence::note::{SigningKey, VerifierKey};
use pgtrail_store::evidence::signer::{CommandSigner, Signer};
use pgtrail_store::evidence::state::{CheckpointSink, DirectorySink};
use pgtrail_store::segment::SegmentOptions;
use pgtrail_store::{ChangeLog, CompactOptions, Compactor, LogError};

/// How segments are written (shared by `capture` and `compact`).
#[derive(clap::Args, Clone, Debug)]
pub struct SegmentArgs {
    /// zstd level of segment files (1 fastest … 22 smallest).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=22))]
    pub zstd_level: i32,
    /// Segments are closed at, and small ones merged up to, this size in MiB.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u64).range(1..))]
    pub target_segment_mib: u64,
    /// Sign a checkpoint of the archive's evidence tree after every compaction with this key
    /// (made by `pgtrail keygen`; refused if others can read it). Keep it outside the archive.
    #[command(flatten)]
    pub signer: SignerArgs,
    /// Copy every checkpoint signed to this directory or `s3://bucket/prefix` too (somewhere
    /// the archive's host cannot rewrite: another machine's mount, a WORM volume, a bucket with
    /// object lock); signing is refused for an archive behind the latest checkpoint there. S3
    /// settings come from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
    /// AWS_REGION, AWS_ENDPOINT_URL).
    #[arg(long, env = "PGTRAIL_PUBLISH_CHECKPOINTS")]
    pub publish_checkpoints: Option<String>,
    /// Keep a keyframe of a table (its rows at one point, which `as_of` starts from) once it
    /// has this many changes since its previous one ... (0: no keyframes)
    #[arg(long, default_value_t = KeyframePolicy::default().min_changes)]
    pub keyframe_changes: u64,
    /// ... and this many times the rows that one held; a keyframe is kept only when it holds
    /// at most 1/this as many rows as those changes (a table mostly inserted into gets none).
    #[arg(long, default_value_t = KeyframePolicy::default().rows_factor, value_parser = clap::value_parser!(u64).range(1..))]
    pub keyframe_rows_factor: u64,
}

/// An S3 bucket (or any export destination) as the place checkpoints are published.
struct DestinationSink(pgtrail_query::export::Destination);

impl std::fmt::Debug for DestinationSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DestinationSink({})", self.0.display())
    }
}

impl CheckpointSink for DestinationSink {
    fn describe(&self) -> String {
        self.0.display().to_string()
    }

    fn latest(&self) -> Result<Option<String>, String> {
        match self.0.get("checkpoint") {
            Ok(None) => Ok(None),
            Ok(Some(bytes)) => String::from_utf8(bytes)
                .map(Some)
                .map_err(|_| "it is not text".to_string()),
            Err(e) => Err(error_chain(&e)),
        }
    }

    fn put(&self, name: &str, note: &str) -> Result<(), String> {
        self.0
            .put_bytes(name, note.as_bytes().to_vec())
            .map_err(|e| error_chain(&e))
    }
}

/// Who signs checkpoints (and certificates): a key file, or an external command.
#[derive(clap::Args, Clone, Debug)]
pub struct SignerArgs {
    /// Sign with this key (made by `pgtrail keygen`; refused if others can read it). Keep it
    /// outside the archive.
    #[arg(long, env = "PGTRAIL_SIGNING_KEY", conflicts_with = "signer_command")]
    pub signing_key: Option<PathBuf>,
    /// Sign with this command instead (run by `sh -c`; an HSM, a KMS, a signing service): it
    /// gets the note's text on standard input and prints the signed note. Its output must
    /// verify with --signer-key, or nothing is signed.
    #[arg(long, env = "PGTRAIL_SIGNER_COMMAND", requires = "signer_key")]
    pub signer_command: Option<String>,
    /// The verifier key of --signer-command's signatures (as `pgtrail keygen` prints one, or a
    /// file holding it).
    #[arg(long, env = "PGTRAIL_SIGNER_KEY", requires = "signer_command")]
    pub signer_key: Option<String>,
}

impl SignerArgs {
    pub fn is_set(&self) -> bool {
        self.signing_key.is_some() || self.signer_command.is_some()
    }

    pub fn signer(&self) -> anyhow::Result<Option<Signer>> {
        if let Some(path) = &self.signing_key {
            let key = SigningKey::read_file(path)
                .with_context(|| format!("--signing-key {}", path.display()))?;
            return Ok(Some(Signer::Key(key)));
        }
        let (Some(command), Some(key)) = (&self.signer_command, &self.signer_key) else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(key).unwrap_or_else(|_| key.clone());
        let verifier = VerifierKey::parse(text.trim()).with_context(|| {
            format!("--signer-key {key}: not a verifier key (pgtrail keygen prints one)")
        })?;
        Ok(Some(Signer::Command(CommandSigner::new(
            command.clone(),
            verifier,
        ))))
    }
}

impl SegmentArgs {
    pub fn options(&self) -> anyhow::Result<CompactOptions> {
        if self.publish_checkpoints.is_some() && !self.signer.is_set() {
            anyhow::bail!(
                "--publish-checkpoints needs a signer: --signing-key FILE or --signer-command"
            );
        }
        let signer = self.signer.signer()?.map(std::sync::Arc::new);
        let publish_checkpoints: Option<std::sync::Arc<dyn CheckpointSink>> =
            match self.publish_checkpoints.as_deref() {
                None => None,
                Some(url) if url.starts_with("s3://") => {
                    let destination = pgtrail_query::export::Destination::open(
                        url,
                        tokio::runtime::Handle::current(),
                    )
                    .with_context(|| format!("--publish-checkpoints {url}"))?;
                    Some(std::sync::Arc::new(DestinationSink(destination)))
                }
                Some(dir) => Some(std::sync::Arc::new(DirectorySink(PathBuf::from(dir)))),
            };
        Ok(CompactOptions {
            segment: SegmentOptions {
                zstd_level: self.zstd_level,
                ..SegmentOptions::default()
            },
            target_segment_bytes: self.target_segment_mib << 20,
            signer,
            publish_checkpoints,
            keyframes: (self.keyframe_changes > 0).then(|| {
                std::sync::Arc::new(DueKeyframes(KeyframePolicy {
                    min_changes: self.keyframe_changes,
                    rows_factor: self.keyframe_rows_factor,
                })) as std::sync::Arc<dyn pgtrail_store::keyframe::KeyframeWriter>
            }),
            ..CompactOptions::default()
        })
    }
}

#[derive(clap::Args)]
pub struct CompactArgs {
    /// Archive directory.
    #[arg(long, env = "PGTRAIL_ARCHIVE")]
    pub archive: PathBuf,
    #[command(flatten)]
    pub segments: SegmentArgs,
    /// Print the report as JSON on stdout (for programs).
    #[arg(long)]
    pub json: bool,
}

/// The log of `archive` opened for writing (this process then holds the archive), or an error
/// that says what to do: `when_held` ends the message for an archive a capture holds.
fn open_held_log(archive: &std::path::Path, when_held: &str) -> anyhow::Result<ChangeLog> {
    if !archive.join(pgtrail_store::LOG_FILE).exists() {
        return Err(LogError::NotAnArchive {
            path: archive.to_path_buf(),
        }
        .into());
    }
    ChangeLog::open(archive).map_err(|e| match e {
        LogError::InUse => {
            anyhow::anyhow!("the archive is held by a running `pgtrail capture`, {when_held}")
        }
        e => {
            anyhow::Error::new(e).context(format!("cannot open the archive {}", archive.display()))
        }
    })
}

pub async fn run(args: CompactArgs) -> anyhow::Result<()> {
    let archive = args.archive.clone();
    let options = args.segments.options()?;
    let started = Instant::now();
    let report = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let log = open_held_log(
            &archive,
            "which compacts in the background (see --compact-after-changes); stop it first to compact by hand",
        )?;
        let compactor = Compactor::for_log(&log, options);
        compactor.run().context("compaction failed; the log still holds every change not listed in a segment")
    })
    .await??;
    let secs = started.elapsed().as_secs_f64();
    if args.json {
        let mut json = serde_json::to_value(&report)?;
        json["seconds"] = serde_json::json!(secs);
        println!("{json}");
    } else {
        eprintln!(
            "compact: {} changes of {} transactions into {} segments ({} bytes) in {:.2} s ({:.0} changes/s), through {}; merged {} small segments into {}; removed {} orphaned and {} retired files",
            report.changes,
            report.transactions,
            report.segments_written,
            report.bytes_written,
            secs,
            report.changes as f64 / secs.max(1e-9),
            report.compacted_through,
            report.merged_inputs,
            report.merged_outputs,
            report.orphans_removed,
            report.retired_removed,
        );
        if report.key_indexes_written > 0 {
            eprintln!(
                "compact: wrote the key index of {} segments that had none",
                report.key_indexes_written
            );
        }
        if report.key_copies_written > 0 {
            eprintln!(
                "compact: wrote the key-ordered copy of {} segments (one row's history reads it)",
                report.key_copies_written
            );
        }
        if let Some(path) = &report.checkpoint {
            eprintln!(
                "compact: signed checkpoint {} (tree size {})",
                path.display(),
                report.tree_size
            );
        }
        if report.keyframes_written > 0 {
            eprintln!(
                "compact: wrote {} keyframes (tables' rows at a point, where as_of starts)",
                report.keyframes_written
            );
        }
    }
    if let Some(e) = &report.keyframe_error {
        eprintln!(
            "compact: warning: keyframes were not written ({e}); the changes are all compacted, as_of reads more history until a later run writes them"
        );
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct KeyframesArgs {
    /// Archive directory.
    #[arg(long, env = "PGTRAIL_ARCHIVE")]
    pub archive: PathBuf,
    /// Unlist every keyframe and write the due ones again from the segments (after a
    /// `pgtrail verify` that found one wrong, or to apply other --keyframe-* settings). Needs
    /// the archive to itself, like `pgtrail compact`.
    #[arg(long)]
    pub rebuild: bool,
    /// Keyframe settings for --rebuild (as `pgtrail compact` takes them).
    #[arg(long, default_value_t = KeyframePolicy::default().min_changes, value_parser = clap::value_parser!(u64).range(1..))]
    pub keyframe_changes: u64,
    #[arg(long, default_value_t = KeyframePolicy::default().rows_factor, value_parser = clap::value_parser!(u64).range(1..))]
    pub keyframe_rows_factor: u64,
    /// Print the keyframes as JSON lines on stdout (for programs).
    #[arg(long)]
    pub json: bool,
}

/// `pgtrail keyframes`: list them, or (--rebuild) unlist them all and write the due ones.
pub async fn keyframes(args: KeyframesArgs) -> anyhow::Result<()> {
    let archive = args.archive.clone();
    if args.rebuild {
        let policy = KeyframePolicy {
            min_changes: args.keyframe_changes,
            rows_factor: args.keyframe_rows_factor,
        };
        let dir = archive.clone();
        let run = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let log = open_held_log(&dir, "stop it first to rebuild its keyframes")?;
            let shared = log.shared();
            // Unlisted first, in one commit (their files retired, removed by a later
            // compaction after the grace period): a crash after it leaves an archive
            // without keyframes, which answers the same, only slower.
            let listed: Vec<u64> = pgtrail_store::LogReader::of_shared(&shared)?
                .keyframes()?
                .iter()
                .map(|k| k.id)
                .collect();
            pgtrail_store::keyframe::unlist_keyframes(&shared, &listed)?;
            let run = pgtrail_query::keyframes::write_due_keyframes(&shared, &dir, &policy, |k| {
                eprintln!(
                    "keyframes: {} at {}: {} rows, {} bytes",
                    k.table_name(),
                    k.at,
                    k.rows,
                    k.bytes
                );
            })?;
            Ok((listed.len(), run))
        })
        .await??;
        let (removed, run) = run;
        eprintln!("keyframes: unlisted {removed}, wrote {}", run.written.len());
        for (table, why) in &run.skipped {
            eprintln!("keyframes: none for {table}: {why}");
        }
    }
    let reader = pgtrail_store::LogReader::open(&archive)?;
    let list = reader.keyframes()?;
    for k in &list {
        if args.json {
            println!(
                "{}",
                serde_json::json!({
                    "table": k.table_name(), "at": k.at.to_string(), "changes": k.changes,
                    "rows": k.rows, "bytes": k.bytes, "file": k.file_name, "sha256": k.sha256,
                })
            );
        } else {
            println!(
                "{}  at {}  after {} changes  {} rows  {} bytes  {}",
                k.table_name(),
                k.at,
                k.changes,
                k.rows,
                k.bytes,
                k.file_name
            );
        }
    }
    if list.is_empty() && !args.json {
        eprintln!(
            "keyframes: none (a table gets one once compacted with enough changes; see --keyframe-changes)"
        );
    }
    Ok(())
}
