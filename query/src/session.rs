//! The SQL session over an archive: every table, the `changes` view, `pgtrail.messages`,
//! `pgtrail.schema_versions` and the point-in-time table functions, registered in one
//! DataFusion context.

use std::path::Path;
use std::sync::Arc;

use datafusion::arrow::array::{Array, AsArray, BinaryArray, RecordBatch};
use datafusion::arrow::datatypes::{Field, Schema, SchemaRef};
use datafusion::catalog::{MemTable, MemorySchemaProvider};
use datafusion::common::TableReference;
use datafusion::execution::context::SQLOptions;
use datafusion::prelude::{DataFrame, SessionConfig, SessionContext};
use pgtrail_store::segment::{
    SegmentContent, message_content_erased, records_to_batch, segment_schema,
};

use crate::archive::ArchiveSnapshot;
use crate::changes::ChangesTable;
use crate::error::QueryError;
use crate::history::HistoryTable;
use crate::pit::{AsOf, Diff, RowHistory};
use crate::read::open_segment;
use crate::view::ArchiveView;
use crate::{schema_versions, unknown_spans};

/// Open `dir` and build a session over it.
pub fn open_session(dir: &Path) -> Result<(SessionContext, Arc<ArchiveSnapshot>), QueryError> {
    let archive = Arc::new(ArchiveSnapshot::open(dir)?);
    Ok((session(archive.clone())?, archive))
}

/// A session over one consistent read of an archive.
pub fn session(archive: Arc<ArchiveSnapshot>) -> Result<SessionContext, QueryError> {
    register(SessionContext::new_with_config(config()), archive)
}

/// A session whose sorts, joins and aggregations may hold at most `memory_bytes` (a query
/// that needs more fails with DataFusion's "Resources exhausted" rather than growing the
/// process): for a server answering many people's queries at once.
pub fn bounded_session(
    archive: Arc<ArchiveSnapshot>,
    memory_bytes: usize,
) -> Result<SessionContext, QueryError> {
    let runtime = datafusion::execution::runtime_env::RuntimeEnvBuilder::new()
        .with_memory_limit(memory_bytes, 1.0)
        .build_arc()?;
    register(
        SessionContext::new_with_config_rt(config(), runtime),
        archive,
    )
}

fn config() -> SessionConfig {
    SessionConfig::new()
        .with_information_schema(true)
        .with_default_catalog_and_schema("datafusion", "public")
}

fn register(
    ctx: SessionContext,
    archive: Arc<ArchiveSnapshot>,
) -> Result<SessionContext, QueryError> {
    let catalog = ctx
        .catalog("datafusion")
        .ok_or_else(|| QueryError::BadTableName("datafusion catalog".into()))?;
    let mut schemas: Vec<String> = archive.tables.values().map(|t| t.schema.clone()).collect();
    schemas.push("pgtrail".into());
    for schema in schemas {
        if catalog.schema(&schema).is_none() {
            catalog.register_schema(&schema, Arc::new(MemorySchemaProvider::new()))?;
        }
    }
    for table in archive.tables.values() {
        let provider = HistoryTable::new(archive.clone(), table);
        ctx.register_table(
            TableReference::partial(table.schema.clone(), table.name.clone()),
            Arc::new(provider),
        )?;
    }
    ctx.register_table(
        TableReference::partial("public", "changes"),
        Arc::new(ChangesTable::new(archive.clone())),
    )?;
    ctx.register_table(
        TableReference::partial("pgtrail", "changes"),
        Arc::new(ChangesTable::new(archive.clone())),
    )?;
    ctx.register_table(
        TableReference::partial("pgtrail", "messages"),
        Arc::new(messages_table(&archive)?),
    )?;
    ctx.register_table(
        TableReference::partial("pgtrail", "schema_versions"),
        Arc::new(ArchiveView::new(
            "schema_versions",
            archive.clone(),
            schema_versions::schema(),
            schema_versions::batch,
        )),
    )?;
    ctx.register_table(
        TableReference::partial("pgtrail", "unknown_spans"),
        Arc::new(ArchiveView::new(
            "unknown_spans",
            archive.clone(),
            unknown_spans::schema(),
            unknown_spans::batch,
        )),
    )?;
    ctx.register_udtf(
        "as_of",
        Arc::new(AsOf {
            archive: archive.clone(),
            by_lsn: false,
        }),
    );
    ctx.register_udtf(
        "as_of_lsn",
        Arc::new(AsOf {
            archive: archive.clone(),
            by_lsn: true,
        }),
    );
    ctx.register_udtf(
        "diff",
        Arc::new(Diff {
            archive: archive.clone(),
        }),
    );
    ctx.register_udtf("row_history", Arc::new(RowHistory { archive }));
    for f in crate::functions::all() {
        ctx.register_udf(f);
    }
    Ok(ctx)
}

/// Plan `sql` on a session over an archive, for reading only: queries (`SELECT`, `WITH`,
/// `VALUES`, `EXPLAIN`). DDL (`CREATE [EXTERNAL] TABLE`, `CREATE VIEW`, `DROP`), DML (`INSERT`,
/// `COPY ... TO`) and other statements (`SET`, transactions) are refused, so SQL can neither
/// write files nor read any file but the archive's.
pub async fn read_only_query(ctx: &SessionContext, sql: &str) -> Result<DataFrame, QueryError> {
    let options = SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false);
    ctx.sql_with_options(sql, options).await.map_err(|e| {
        let text = e.to_string();
        if [
            "DDL not supported",
            "DML not supported",
            "Statement not supported",
        ]
        .iter()
        .any(|m| text.contains(m))
        {
            let what = text
                .rsplit("not supported: ")
                .next()
                .unwrap_or(&text)
                .trim()
                .to_string();
            QueryError::ReadOnly(what)
        } else {
            QueryError::DataFusion(e)
        }
    })
}

/// Logical messages are few: they are read into memory. A content a redaction erased (see
/// [`message_content_erased`]) reads as NULL: unknown, never the empty content it is stored as.
fn messages_table(archive: &ArchiveSnapshot) -> Result<MemTable, QueryError> {
    let stored = segment_schema(&SegmentContent::Messages);
    let schema = Arc::new(Schema::new_with_metadata(
        stored
            .fields()
            .iter()
            .map(|f| match f.name().as_str() {
                "content" => f.as_ref().clone().with_nullable(true),
                _ => f.as_ref().clone(),
            })
            .collect::<Vec<Field>>(),
        stored.metadata().clone(),
    ));
    let mut batches = Vec::new();
    for seg in &archive.message_segments {
        for batch in open_segment(&archive.segment_path(seg), &seg.sha256, 8192)? {
            batches.push(erased_as_null(&batch?, &schema)?);
        }
    }
    if !archive.message_tail.is_empty() {
        let tail = records_to_batch(&SegmentContent::Messages, &archive.message_tail)?;
        batches.push(erased_as_null(&tail, &schema)?);
    }
    Ok(MemTable::try_new(schema, vec![batches])?)
}

/// `batch` of messages under `schema`, each erased content NULL.
fn erased_as_null(batch: &RecordBatch, schema: &SchemaRef) -> Result<RecordBatch, QueryError> {
    let at = |name: &str| {
        batch
            .schema()
            .index_of(name)
            .map_err(datafusion::error::DataFusionError::from)
    };
    let (content_at, text_at) = (at("content")?, at("content_text")?);
    let content = batch.column(content_at).as_binary::<i32>();
    let text = batch.column(text_at);
    let mut columns = batch.columns().to_vec();
    columns[content_at] = Arc::new(
        (0..batch.num_rows())
            .map(|row| {
                let value = content.value(row);
                (!message_content_erased(value, text.is_null(row))).then_some(value)
            })
            .collect::<BinaryArray>(),
    );
    Ok(RecordBatch::try_new(schema.clone(), columns)
        .map_err(datafusion::error::DataFusionError::from)?)
}
