//! The publication, the table list and the replication slot.

use pgtrail_store::{
    ChangeKey, Column, Lsn, RelationVersion, StorageLayout, always_quoted, quote_ident,
};

use crate::error::CaptureError;

/// A table chosen for capture.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CapturedTable {
    pub oid: u32,
    pub schema: String,
    pub name: String,
}

impl CapturedTable {
    /// `schema.name` for messages, quoted as PostgreSQL's `quote_ident` would.
    pub fn qualified(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }

    /// `"schema"."name"`, for SQL sent to the source.
    pub fn sql_name(&self) -> String {
        format!(
            "{}.{}",
            always_quoted(&self.schema),
            always_quoted(&self.name)
        )
    }
}

/// A table left out of the default list, and why.
#[derive(Clone, Debug)]
pub struct ExcludedTable {
    pub oid: u32,
    pub qualified: String,
    pub reason: String,
}

const TABLE_INFO: &str = "SELECT c.oid, n.nspname::text, c.relname::text, c.relreplident::text, c.relkind::text, \
        EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary) \
     FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace";

/// One entry of `--tables`: a table name as PostgreSQL parses it, a pattern (`*` any
/// characters, `?` one; unquoted letters fold to lower case, as psql's patterns), or either
/// after `!`, which leaves matching tables out.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Selector {
    Name(String),
    Pattern(TablePattern),
    Exclude(TablePattern),
}

fn selector(entry: &str) -> Selector {
    let entry = entry.trim();
    if let Some(rest) = entry.strip_prefix('!') {
        Selector::Exclude(TablePattern::parse(rest.trim()))
    } else if has_wildcard(entry) {
        Selector::Pattern(TablePattern::parse(entry))
    } else {
        Selector::Name(entry.to_string())
    }
}

/// A wildcard outside double quotes.
fn has_wildcard(entry: &str) -> bool {
    let mut quoted = false;
    entry.chars().any(|c| {
        if c == '"' {
            quoted = !quoted;
        }
        !quoted && (c == '*' || c == '?')
    })
}

/// Whether `--tables` lists exact names only (a fixed set of tables, decided at start).
pub fn is_exact_list(listed: &[String]) -> bool {
    !listed.is_empty()
        && listed
            .iter()
            .all(|e| matches!(selector(e), Selector::Name(_)))
}

/// A `schema.table` pattern; without a schema part it matches the name in every schema.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TablePattern {
    schema: Option<Vec<Glob>>,
    name: Vec<Glob>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Glob {
    Any,
    One,
    Char(char),
}

impl TablePattern {
    fn parse(text: &str) -> TablePattern {
        let mut parts: Vec<Vec<Glob>> = vec![Vec::new()];
        let mut quoted = false;
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            let first_part = parts.len() == 1;
            let part = parts.last_mut().expect("one part at least");
            match c {
                '"' if quoted && chars.peek() == Some(&'"') => {
                    chars.next();
                    part.push(Glob::Char('"'));
                }
                '"' => quoted = !quoted,
                '.' if !quoted && first_part => parts.push(Vec::new()),
                '*' if !quoted => part.push(Glob::Any),
                '?' if !quoted => part.push(Glob::One),
                c if !quoted => part.extend(c.to_lowercase().map(Glob::Char)),
                c => part.push(Glob::Char(c)),
            }
        }
        let name = parts.pop().unwrap_or_default();
        TablePattern {
            schema: parts.pop(),
            name,
        }
    }

    pub fn matches(&self, schema: &str, name: &str) -> bool {
        self.schema.as_ref().is_none_or(|s| glob(s, schema)) && glob(&self.name, name)
    }
}

fn glob(pattern: &[Glob], text: &str) -> bool {
    let text: Vec<char> = text.chars().collect();
    // Classic two-pointer wildcard match with backtracking to the last `*`.
    let (mut p, mut t, mut star, mut mark) = (0, 0, None, 0);
    while t < text.len() {
        match pattern.get(p) {
            Some(Glob::Char(c)) if *c == text[t] => (p, t) = (p + 1, t + 1),
            Some(Glob::One) => (p, t) = (p + 1, t + 1),
            Some(Glob::Any) => {
                star = Some(p);
                mark = t;
                p += 1;
            }
            _ => match star {
                Some(s) => {
                    p = s + 1;
                    mark += 1;
                    t = mark;
                }
                None => return false,
            },
        }
    }
    pattern[p.min(pattern.len())..]
        .iter()
        .all(|g| *g == Glob::Any)
}

impl TablePattern {
    /// This pattern as an SQL condition on a table's schema and name columns (`LIKE`, with
    /// `*`/`?` as `%`/`_` and every other character matched as itself).
    fn sql(&self, schema: &str, name: &str) -> String {
        let like = |globs: &[Glob]| {
            let mut text = String::new();
            for g in globs {
                match g {
                    Glob::Any => text.push('%'),
                    Glob::One => text.push('_'),
                    Glob::Char(c @ ('%' | '_' | '\\')) => {
                        text.push('\\');
                        text.push(*c);
                    }
                    Glob::Char(c) => text.push(*c),
                }
            }
            format!("'{}' ESCAPE '\\'", text.replace('\'', "''"))
        };
        match &self.schema {
            Some(s) => format!(
                "({schema} LIKE {} AND {name} LIKE {})",
                like(s),
                like(&self.name)
            ),
            None => format!("{name} LIKE {}", like(&self.name)),
        }
    }
}

/// `--tables` as an SQL condition on a table's `schema` and `name` columns: whether the
/// selection takes the table in (by name: an exact name is matched as a pattern without
/// wildcards, in every schema when it names none). `pgtrail setup`'s trigger publishes only
/// new tables it takes in, the same tables a capture with that `--tables` takes in.
pub fn selection_sql(listed: &[String], schema: &str, name: &str) -> String {
    let (mut takes, mut leaves) = (Vec::new(), Vec::new());
    for entry in listed {
        match selector(entry) {
            Selector::Name(n) => takes.push(TablePattern::parse(&n).sql(schema, name)),
            Selector::Pattern(p) => takes.push(p.sql(schema, name)),
            Selector::Exclude(p) => leaves.push(p.sql(schema, name)),
        }
    }
    let takes = if takes.is_empty() {
        "true".to_string()
    } else {
        format!("({})", takes.join(" OR "))
    };
    if leaves.is_empty() {
        takes
    } else {
        format!("({takes} AND NOT ({}))", leaves.join(" OR "))
    }
}

/// Resolve the tables to capture from `--tables`: exact names (parsed by PostgreSQL itself,
/// so quoted identifiers work; one that cannot be captured safely is an error), patterns and
/// exclusions; with no entry but exclusions, every table that can be captured safely (a
/// primary key, REPLICA IDENTITY FULL or USING INDEX). Tables a pattern or the default takes
/// in but that cannot be captured safely are returned as excluded, with the reason.
pub async fn choose_tables(
    sql: &tokio_postgres::Client,
    listed: &[String],
) -> Result<(Vec<CapturedTable>, Vec<ExcludedTable>), CaptureError> {
    let selectors: Vec<Selector> = listed.iter().map(|e| selector(e)).collect();
    let mut chosen = Vec::new();
    let mut excluded = Vec::new();
    let (mut names, mut patterns, mut excludes) = (Vec::new(), Vec::new(), Vec::new());
    for selector in &selectors {
        match selector {
            Selector::Name(n) => names.push(n),
            Selector::Pattern(p) => patterns.push(p),
            Selector::Exclude(p) => excludes.push(p),
        }
    }
    let left_out = |t: &CapturedTable| excludes.iter().any(|p| p.matches(&t.schema, &t.name));
    if names.is_empty() || !patterns.is_empty() {
        let rows = sql
            .query(
                &format!(
                    "{TABLE_INFO} WHERE c.relkind IN ('r','p') AND NOT c.relispartition \
                     AND n.nspname NOT IN ('pg_catalog','information_schema') \
                     AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%' \
                     ORDER BY 2, 3"
                ),
                &[],
            )
            .await
            .map_err(|e| CaptureError::sql("listing tables", e))?;
        for row in rows {
            let table = CapturedTable {
                oid: row.get(0),
                schema: row.get(1),
                name: row.get(2),
            };
            let selected = if names.is_empty() && patterns.is_empty() {
                true
            } else {
                patterns
                    .iter()
                    .any(|p| p.matches(&table.schema, &table.name))
            };
            if !selected || left_out(&table) {
                continue;
            }
            match ineligible_reason(&row.get::<_, String>(3), row.get(5)) {
                None => chosen.push(table),
                Some(reason) => excluded.push(ExcludedTable {
                    oid: table.oid,
                    qualified: table.qualified(),
                    reason,
                }),
            }
        }
    }
    for name in names {
        let row = sql
            .query_opt(&format!("{TABLE_INFO} WHERE c.oid = to_regclass($1)"), &[name])
            .await
            .map_err(|e| CaptureError::sql(format!("looking up table {name}"), e))?
            .ok_or_else(|| {
                CaptureError::setup(
                    format!("table {name} does not exist in the source database"),
                    "check the name in --tables (write it as PostgreSQL would parse it, e.g. public.\"Odd Name\")",
                )
            })?;
        let table = CapturedTable {
            oid: row.get(0),
            schema: row.get(1),
            name: row.get(2),
        };
        let kind: String = row.get(4);
        if kind != "r" && kind != "p" {
            return Err(CaptureError::setup(
                format!("{name} is not a table"),
                "list only tables in --tables",
            ));
        }
        if left_out(&table) {
            continue;
        }
        if let Some(reason) = ineligible_reason(&row.get::<_, String>(3), row.get(5)) {
            return Err(CaptureError::setup(
                format!(
                    "table {} cannot be captured safely: {reason}",
                    table.qualified()
                ),
                format!(
                    "run `ALTER TABLE {} REPLICA IDENTITY FULL;` or add a primary key",
                    table.qualified()
                ),
            ));
        }
        if !chosen.contains(&table) {
            chosen.push(table);
        }
    }
    Ok((chosen, excluded))
}

fn ineligible_reason(replident: &str, has_pk: bool) -> Option<String> {
    match (replident, has_pk) {
        ("f", _) | ("i", _) | ("d", true) => None,
        ("n", _) => Some("REPLICA IDENTITY NOTHING: publishing it would make UPDATE and DELETE fail in the application".into()),
        _ => Some(
            "no primary key and REPLICA IDENTITY is not FULL: publishing it would make UPDATE and DELETE fail in the application; run ALTER TABLE ... REPLICA IDENTITY FULL to capture it".into(),
        ),
    }
}

/// Make the publication list `tables` and return the tables capture reads.
///
/// A publication the role may not change (a DBA made it, as least privilege asks: in
/// PostgreSQL 15 a publication `FOR TABLE` needs the tables' owner) is used as it is: its
/// tables are the ones captured, and it is never altered. `explicit` says the user named the
/// tables (`--tables`): then a publication that lists others is an error, with the SQL that
/// fixes it. A publication the role cannot create is an error with the SQL a DBA runs.
pub async fn ensure_publication(
    sql: &tokio_postgres::Client,
    publication: &str,
    tables: Vec<CapturedTable>,
    explicit: bool,
) -> Result<Vec<CapturedTable>, CaptureError> {
    let list = |tables: &[CapturedTable]| {
        tables
            .iter()
            .map(CapturedTable::sql_name)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let create_sql = |tables: &[CapturedTable]| {
        format!(
            "CREATE PUBLICATION {} FOR TABLE {} WITH (publish_via_partition_root = true);",
            always_quoted(publication),
            list(tables)
        )
    };
    let existing = publication_owner(sql, publication).await?;
    if let Some((owner, false)) = &existing {
        let published = publication_tables(sql, publication).await?;
        if published.is_empty() {
            return Err(CaptureError::setup(
                format!("publication {publication:?} (owned by {owner:?}) publishes no table"),
                format!(
                    "have its owner add the tables: ALTER PUBLICATION {} ADD TABLE ...;",
                    always_quoted(publication)
                ),
            ));
        }
        let oids = |t: &[CapturedTable]| {
            t.iter()
                .map(|t| t.oid)
                .collect::<std::collections::BTreeSet<_>>()
        };
        if explicit && oids(&published) != oids(&tables) {
            return Err(CaptureError::setup(
                format!(
                    "publication {publication:?} belongs to {owner:?} and publishes {}, not the tables given with --tables",
                    list(&published)
                ),
                format!(
                    "have its owner run: ALTER PUBLICATION {} SET TABLE {};  (or leave out --tables to capture what it publishes)",
                    always_quoted(publication),
                    list(&tables)
                ),
            ));
        }
        tracing::info!(
            publication,
            owner = %owner,
            tables = published.len(),
            "using the publication as its owner made it (not changed by pgtrail)"
        );
        return Ok(published);
    }
    if tables.is_empty() {
        return Err(CaptureError::setup(
            "there is no table to capture",
            "create a table with a primary key, or name tables with --tables",
        ));
    }
    let stmt = if existing.is_some() {
        format!(
            "ALTER PUBLICATION {} SET TABLE {}",
            always_quoted(publication),
            list(&tables)
        )
    } else {
        create_sql(&tables)
    };
    sql.batch_execute(&stmt).await.map_err(|e| {
        if e.code().is_some_and(|c| c.code() == "42501") {
            CaptureError::setup(
                format!(
                    "not allowed to create publication {publication:?}: {} (PostgreSQL lets only the tables' owner publish them)",
                    e.as_db_error().map(|d| d.message()).unwrap_or_default()
                ),
                format!(
                    "have the tables' owner or a superuser run: {}  then start capture again with --publication {publication}",
                    create_sql(&tables)
                ),
            )
        } else {
            CaptureError::sql(format!("creating publication {publication}"), e)
        }
    })?;
    Ok(tables)
}

/// A publication's owner, and whether this role may change it (it is, or is a member of, the
/// owner, or a superuser); `None` when the publication does not exist.
pub(crate) async fn publication_owner(
    sql: &tokio_postgres::Client,
    publication: &str,
) -> Result<Option<(String, bool)>, CaptureError> {
    let row = sql
        .query_opt(
            "SELECT pg_get_userbyid(p.pubowner)::text, \
                    pg_has_role(current_user, p.pubowner, 'USAGE') \
                    OR (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) \
             FROM pg_publication p WHERE p.pubname = $1",
            &[&publication],
        )
        .await
        .map_err(|e| CaptureError::sql("looking up the publication", e))?;
    Ok(row.map(|r| (r.get(0), r.get(1))))
}

/// Add `tables` to a publication this role may change; a refusal (the tables' owner must
/// publish them in PostgreSQL 15) is a setup error with the SQL a DBA runs. One statement per
/// table: a table something else published meanwhile (`pgtrail setup`'s trigger, another
/// capture) or dropped meanwhile is no error, and does not keep the others out.
pub(crate) async fn add_to_publication(
    sql: &tokio_postgres::Client,
    publication: &str,
    tables: &[CapturedTable],
) -> Result<(), CaptureError> {
    for table in tables {
        let stmt = format!(
            "ALTER PUBLICATION {} ADD TABLE {}",
            always_quoted(publication),
            table.sql_name()
        );
        let Err(e) = sql.batch_execute(&stmt).await else {
            continue;
        };
        match e.code().map(|c| c.code()) {
            // Already a member (duplicate_object), or gone (undefined_table): either way
            // nothing to add; the next look at the catalog sees which.
            Some("42710" | "42P01") => {
                tracing::debug!(table = %table.qualified(), error = %e, "not added to the publication");
            }
            Some("42501") => {
                return Err(CaptureError::setup(
                    format!(
                        "not allowed to add tables to publication {publication:?}: {}",
                        e.as_db_error().map(|d| d.message()).unwrap_or_default()
                    ),
                    format!("have the tables' owner or a superuser run: {stmt};"),
                ));
            }
            _ => {
                return Err(CaptureError::sql(
                    format!("adding tables to publication {publication}"),
                    e,
                ));
            }
        }
    }
    Ok(())
}

/// The tables a publication publishes (what `pg_publication_tables` lists: partitions'
/// roots, `FOR ALL TABLES`, `FOR TABLES IN SCHEMA` resolved by the server).
pub(crate) async fn publication_tables(
    sql: &tokio_postgres::Client,
    publication: &str,
) -> Result<Vec<CapturedTable>, CaptureError> {
    let rows = sql
        .query(
            "SELECT c.oid, t.schemaname::text, t.tablename::text              FROM pg_publication_tables t              JOIN pg_namespace n ON n.nspname = t.schemaname              JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = t.tablename              WHERE t.pubname = $1 ORDER BY 2, 3",
            &[&publication],
        )
        .await
        .map_err(|e| CaptureError::sql("listing the publication's tables", e))?;
    Ok(rows
        .iter()
        .map(|row| CapturedTable {
            oid: row.get(0),
            schema: row.get(1),
            name: row.get(2),
        })
        .collect())
}

/// Whether the server has publications of schemas (`pg_publication_namespace`, PostgreSQL 15
/// and later): asked once a session, for [`publication_memberships`].
pub(crate) async fn has_schema_publications(
    sql: &tokio_postgres::Client,
) -> Result<bool, CaptureError> {
    Ok(sql
        .query_one(
            "SELECT current_setting('server_version_num')::int >= 150000",
            &[],
        )
        .await
        .map_err(|e| CaptureError::sql("reading the server's version", e))?
        .get::<_, bool>(0))
}

/// What makes each table of `publication` a member of it, by table OID: the publication's own
/// OID and that of the catalog row listing the table or a partitioned table above it
/// (`pg_publication_rel`; `pg_partition_ancestors` lists no row for a table that is not a
/// partition, hence the table itself too), or its schema (`pg_publication_namespace`, when
/// `schemas`: see [`has_schema_publications`]), or 0 for a publication of all tables. A table
/// taken out and put back, or a publication dropped and made again, has a new one: the catalog
/// then shows it published as before, though its changes in between never reached the stream.
pub(crate) async fn publication_memberships(
    sql: &tokio_postgres::Client,
    publication: &str,
    schemas: bool,
) -> Result<std::collections::BTreeMap<u32, (u32, u32)>, CaptureError> {
    let (by_schema_join, by_schema) = match schemas {
        true => (
            "LEFT JOIN pg_publication_namespace pn ON pn.pnpubid = p.oid AND pn.pnnspid = n.oid",
            "pn.oid",
        ),
        false => ("", "NULL::oid"),
    };
    let rows = sql
        .query(
            &format!(
                "SELECT c.oid, p.oid, coalesce( \
                   (SELECT max(pr.oid) FROM pg_publication_rel pr WHERE pr.prpubid = p.oid \
                      AND (pr.prrelid = c.oid \
                        OR pr.prrelid IN (SELECT relid FROM pg_partition_ancestors(c.oid)))), \
                   {by_schema}, 0::oid) \
                 FROM pg_publication p \
                 JOIN pg_publication_tables t ON t.pubname = p.pubname \
                 JOIN pg_namespace n ON n.nspname = t.schemaname \
                 JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = t.tablename \
                 {by_schema_join} \
                 WHERE p.pubname = $1"
            ),
            &[&publication],
        )
        .await
        .map_err(|e| CaptureError::sql("listing the publication's memberships", e))?;
    Ok(rows
        .iter()
        .map(|row| (row.get(0), (row.get(1), row.get(2))))
        .collect())
}

/// The state of a replication slot, as `pg_replication_slots` shows it.
#[derive(Clone, Debug)]
pub struct SlotState {
    pub plugin: Option<String>,
    pub database: Option<String>,
    pub active: bool,
    /// The walsender holding the slot, while it is active.
    pub active_pid: Option<i32>,
    pub confirmed_flush: Option<Lsn>,
    pub wal_status: Option<String>,
}

pub async fn slot_state(
    sql: &tokio_postgres::Client,
    slot: &str,
) -> Result<Option<SlotState>, CaptureError> {
    let row = sql
        .query_opt(
            "SELECT plugin::text, database::text, active, confirmed_flush_lsn::text, wal_status, active_pid \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| CaptureError::sql("reading pg_replication_slots", e))?;
    Ok(row.map(|row| SlotState {
        plugin: row.get(0),
        database: row.get(1),
        active: row.get(2),
        confirmed_flush: row.get::<_, Option<String>>(3).and_then(|s| s.parse().ok()),
        wal_status: row.get(4),
        active_pid: row.get(5),
    }))
}

pub async fn drop_slot(sql: &tokio_postgres::Client, slot: &str) -> Result<(), CaptureError> {
    sql.execute(
        "SELECT pg_drop_replication_slot($1) FROM pg_replication_slots WHERE slot_name = $1",
        &[&slot],
    )
    .await
    .map_err(|e| CaptureError::sql(format!("dropping slot {slot}"), e))?;
    Ok(())
}

/// A table's storage layout as the catalog says now (see [`StorageLayout`]), with what a
/// layout change is judged by.
#[derive(Clone, Debug)]
pub struct LayoutNow {
    pub layout: StorageLayout,
    /// The file node as the running transaction's snapshot sees it: it differs from the
    /// current one in a snapshot taken before a rewrite.
    pub file_node_in_snapshot: u32,
    /// A partitioned table's leaf partitions that hold no page yet (`pg_relation_size` 0):
    /// one created by `CREATE TABLE … PARTITION OF` and not written, which brought no row.
    pub empty_partitions: Vec<u32>,
    /// The transaction that last wrote each leaf's `pg_class` row (`xmin`), in the order of
    /// `layout.partitions`: the one that gave a leaf a new file.
    pub partition_versions: Vec<u32>,
}

/// A query of the labels of every enum type the columns of the tables `relations` (an SQL
/// condition on `a.attrelid`) use (directly, as an array's element, under a domain or inside
/// a composite): a row per table using one, its OID and the labels as `'<label oid>=<label>'`
/// texts in OID order (see [`StorageLayout::enum_labels`]). One query for every table of a
/// look: timed once by hand with psql on PostgreSQL 15 with 1,000 tables (500 using an enum),
/// about 25 ms, as much as the rest of the layouts query, where an expression per table took
/// 550 ms (not a benchmark of `pgtrail-bench`; see commit af72896). Types that
/// cannot reach an enum (base types that are not arrays) end the search at once. The
/// catalog look and `pgtrail setup`'s trigger both use it, so they record the same labels.
pub(crate) fn enum_labels_sql(relations: &str) -> String {
    format!(
        "WITH RECURSIVE used(rel, t) AS ( \
           SELECT a.attrelid, a.atttypid FROM pg_attribute a JOIN pg_type ty ON ty.oid = a.atttypid \
           WHERE {relations} AND a.attnum > 0 AND NOT a.attisdropped \
             AND (ty.typtype <> 'b' OR ty.typelem <> 0) \
           UNION \
           SELECT used.rel, x.t FROM used JOIN pg_type ty ON ty.oid = used.t, \
             LATERAL (SELECT ty.typbasetype UNION ALL SELECT ty.typelem \
                      UNION ALL SELECT f.atttypid FROM pg_attribute f \
                      WHERE f.attrelid = ty.typrelid AND f.attnum > 0 AND NOT f.attisdropped) x(t) \
           WHERE x.t <> 0) \
         SELECT used.rel, array_agg(e.oid::text || '=' || e.enumlabel ORDER BY e.oid) \
         FROM used JOIN pg_enum e ON e.enumtypid = used.t GROUP BY used.rel"
    )
}

/// The enum type under each column type of the tables `oids` that has one (the column's type
/// is the enum, an array of it, or a domain over either, at any depth), by the column type's
/// OID: the enum's schema, name and labels in sort order. Composite types are not looked into:
/// the segment description names columns, not fields.
pub async fn enum_types(
    sql: &tokio_postgres::Client,
    oids: &[u32],
) -> Result<pgtrail_store::EnumTypes, CaptureError> {
    let rows = sql
        .query(
            "WITH RECURSIVE under(col_type, t) AS ( \
               SELECT DISTINCT a.atttypid, a.atttypid FROM pg_attribute a JOIN pg_type ty ON ty.oid = a.atttypid \
               WHERE a.attrelid = ANY($1) AND a.attnum > 0 AND NOT a.attisdropped \
                 AND (ty.typtype IN ('e', 'd') OR ty.typcategory = 'A') \
               UNION \
               SELECT under.col_type, CASE WHEN ty.typtype = 'd' THEN ty.typbasetype ELSE ty.typelem END \
               FROM under JOIN pg_type ty ON ty.oid = under.t \
               WHERE ty.typtype = 'd' OR ty.typcategory = 'A') \
             SELECT under.col_type, n.nspname::text, e.typname::text, \
                    ARRAY(SELECT l.enumlabel::text FROM pg_enum l WHERE l.enumtypid = e.oid ORDER BY l.enumsortorder) \
             FROM under JOIN pg_type e ON e.oid = under.t AND e.typtype = 'e' \
             JOIN pg_namespace n ON n.oid = e.typnamespace",
            &[&oids],
        )
        .await
        .map_err(|e| CaptureError::sql("reading the enum types the tables use", e))?;
    Ok(rows
        .iter()
        .map(|row| {
            let enum_type = pgtrail_store::EnumType {
                schema: row.get(1),
                name: row.get(2),
                labels: row.get(3),
            };
            (row.get::<_, u32>(0), enum_type)
        })
        .collect())
}

/// [`enum_labels_sql`]'s texts as (label OID, label); a text that is not one is passed over.
pub(crate) fn enum_labels_from(texts: &[String]) -> Vec<(u32, String)> {
    texts
        .iter()
        .filter_map(|l| {
            let (oid, label) = l.split_once('=')?;
            Some((oid.parse().ok()?, label.to_string()))
        })
        .collect()
}

/// The catalog facts of the table `pg_class c` that tell whether its stored rows may have
/// changed, as SQL expressions in [`StorageLayout`]'s order: the columns that have a missing
/// value (`ADD COLUMN … DEFAULT`), each column's catalog row version, the table's, and the
/// column names (`''` for a dropped one). The catalog watch and `pgtrail setup`'s trigger
/// read them with this same SQL, so that their layouts compare.
pub(crate) const LAYOUT_COLUMNS_SQL: [&str; 4] = [
    "ARRAY(SELECT a.attnum FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0 \
       AND a.atthasmissing AND NOT a.attisdropped ORDER BY a.attnum)",
    "ARRAY(SELECT a.xmin::text::bigint FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0 \
       ORDER BY a.attnum)",
    "c.xmin::text::bigint",
    "ARRAY(SELECT CASE WHEN a.attisdropped THEN '' ELSE a.attname::text END \
       FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0 ORDER BY a.attnum)",
];

/// The primary key's column names of the table whose OID is `relation` (an SQL expression),
/// in key order: a query of one column, a row each.
pub(crate) fn primary_key_sql(relation: &str) -> String {
    format!(
        "SELECT a.attname::text FROM pg_index i \
           JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY k(attnum, ord) ON true \
           JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
         WHERE i.indrelid = {relation} AND i.indisprimary ORDER BY k.ord"
    )
}

/// [`LayoutNow`] of one table; `None` when it does not exist (in the snapshot).
pub async fn storage_layout(
    sql: &tokio_postgres::Client,
    oid: u32,
) -> Result<Option<LayoutNow>, CaptureError> {
    Ok(storage_layouts(sql, &[oid]).await?.remove(&oid))
}

/// [`LayoutNow`] of several tables at once.
pub async fn storage_layouts(
    sql: &tokio_postgres::Client,
    oids: &[u32],
) -> Result<std::collections::BTreeMap<u32, LayoutNow>, CaptureError> {
    // A partitioned table's leaf partitions (`leaves`), at every level, read once: their
    // OIDs, storage files, and the ones without a page. A leaf's file is its `pg_class` row's,
    // read in the statement's snapshot like the row's xmin beside it: `pg_relation_filenode()`
    // reads the relcache, whose catalog snapshot can be newer, and a look racing a TRUNCATE
    // then saw the new files with the old xmin and took the TRUNCATE for a rewrite by the
    // older transaction; none for a table with storage of its
    // own (an aggregate without GROUP BY gives every table its row). The parent's missing
    // values are its columns that have one in a leaf (the parent itself keeps none: `ADD
    // COLUMN … DEFAULT` on it sets them there). `pg_partition_tree` reads the newest catalog,
    // so it can list a leaf created after the statement's snapshot, whose `pg_class` row
    // (file, xmin) the snapshot cannot see: only the leaves the snapshot holds are taken, the
    // others are seen by the next look (reading their NULL file panicked capture once).
    let [missing, column_versions, table_version, names] = LAYOUT_COLUMNS_SQL;
    let rows = sql
        .query(
            &format!("SELECT c.oid, COALESCE(pg_relation_filenode(c.oid), 0::oid), c.relfilenode, \
                    {missing}, {column_versions}, {table_version}, {names}, \
                    leaves.ids, leaves.files, leaves.empty, \
                    ARRAY(SELECT a.attnum FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
                          AND EXISTS (SELECT 1 FROM pg_attribute l WHERE l.attrelid = ANY (leaves.ids) \
                                      AND l.attname = a.attname AND l.atthasmissing AND NOT l.attisdropped) \
                          ORDER BY a.attnum), \
                    leaves.versions \
             FROM pg_class c, LATERAL ( \
               SELECT COALESCE(array_agg(t.relid::oid ORDER BY t.relid), '{{}}') AS ids, \
                      COALESCE(array_agg((SELECT l.relfilenode FROM pg_class l WHERE l.oid = t.relid) ORDER BY t.relid), '{{}}') AS files, \
                      COALESCE(array_agg(t.relid::oid ORDER BY t.relid) FILTER (WHERE pg_relation_size(t.relid) = 0), '{{}}') AS empty, \
                      COALESCE(array_agg((SELECT l.xmin::text::bigint FROM pg_class l WHERE l.oid = t.relid) ORDER BY t.relid), '{{}}') AS versions \
               FROM pg_partition_tree(c.oid) t WHERE c.relkind = 'p' AND t.isleaf \
                 AND EXISTS (SELECT 1 FROM pg_class l WHERE l.oid = t.relid)) leaves \
             WHERE c.oid = ANY($1)"),
            &[&oids],
        )
        .await
        .map_err(|e| CaptureError::sql("reading the tables' storage", e))?;
    let mut labels: std::collections::BTreeMap<u32, Vec<(u32, String)>> = sql
        .query(&enum_labels_sql("a.attrelid = ANY($1)"), &[&oids])
        .await
        .map_err(|e| CaptureError::sql("reading the enum labels the tables use", e))?
        .iter()
        .map(|row| (row.get(0), enum_labels_from(&row.get::<_, Vec<String>>(1))))
        .collect();
    Ok(rows
        .iter()
        .map(|row| {
            let versions: Vec<i64> = row.get(4);
            let table_version: i64 = row.get(5);
            let mut missing_values: Vec<i16> = row.get(3);
            missing_values.extend(row.get::<_, Vec<i16>>(10));
            missing_values.sort_unstable();
            missing_values.dedup();
            let leaves: Vec<u32> = row.get(7);
            let now = LayoutNow {
                layout: StorageLayout {
                    file_node: row.get(1),
                    missing_values,
                    column_versions: versions.into_iter().map(|x| x as u32).collect(),
                    table_version: table_version as u32,
                    column_names: row.get(6),
                    enum_labels: labels.remove(&row.get::<_, u32>(0)).unwrap_or_default(),
                    partitions: leaves.into_iter().zip(row.get::<_, Vec<u32>>(8)).collect(),
                },
                file_node_in_snapshot: row.get(2),
                empty_partitions: row.get(9),
                partition_versions: row
                    .get::<_, Vec<i64>>(11)
                    .into_iter()
                    .map(|x| x as u32)
                    .collect(),
            };
            (row.get(0), now)
        })
        .collect())
}

/// Build a table's relation version from the catalog, shaped as pgoutput's Relation message
/// shapes it (published columns in attnum order, replica identity flags).
pub async fn relation_from_catalog(
    sql: &tokio_postgres::Client,
    oid: u32,
) -> Result<RelationVersion, CaptureError> {
    let head = sql
        .query_one(
            "SELECT n.nspname::text, c.relname::text, c.relreplident::text FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1",
            &[&oid],
        )
        .await
        .map_err(|e| CaptureError::sql("reading the table's catalog entry", e))?;
    let replident: String = head.get(2);
    let replica_identity = replident.bytes().next().unwrap_or(b'd');
    let rows = sql
        .query(
            "SELECT a.attname::text, a.atttypid, a.atttypmod, \
                    COALESCE(a.attnum = ANY ((SELECT i.indkey FROM pg_index i WHERE i.indrelid = a.attrelid AND i.indisprimary)::int2[]), false), \
                    COALESCE(a.attnum = ANY ((SELECT i.indkey FROM pg_index i WHERE i.indrelid = a.attrelid AND i.indisreplident)::int2[]), false) \
             FROM pg_attribute a WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '' \
             ORDER BY a.attnum",
            &[&oid],
        )
        .await
        .map_err(|e| CaptureError::sql("reading the table's columns", e))?;
    let mut columns = Vec::new();
    let primary_key = primary_key(sql, oid).await?;
    for row in rows {
        let name: String = row.get(0);
        let in_pk: bool = row.get(3);
        let in_replident_index: bool = row.get(4);
        let is_key = flagged_as_key(replica_identity, in_pk, in_replident_index);
        columns.push(Column {
            name,
            type_oid: row.get(1),
            type_modifier: row.get(2),
            is_key,
        });
    }
    Ok(RelationVersion {
        relation_id: oid,
        valid_from: ChangeKey::default(),
        schema: head.get(0),
        name: head.get(1),
        replica_identity,
        columns,
        primary_key,
    })
}

/// Whether pgoutput's Relation message flags a column as part of the replica identity: every
/// column under FULL, the identity index's under USING INDEX, the primary key's under DEFAULT.
pub(crate) fn flagged_as_key(replica_identity: u8, in_pk: bool, in_replident_index: bool) -> bool {
    match replica_identity {
        b'f' => true,
        b'i' => in_replident_index,
        b'd' => in_pk,
        _ => false,
    }
}

/// Primary key column names of a relation (empty when it has none).
pub async fn primary_key(
    sql: &tokio_postgres::Client,
    oid: u32,
) -> Result<Vec<String>, CaptureError> {
    let rows = sql
        .query(&primary_key_sql("$1"), &[&oid])
        .await
        .map_err(|e| CaptureError::sql("reading the primary key", e))?;
    Ok(rows.into_iter().map(|r| r.get(0)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A table something else published meanwhile (`pgtrail setup`'s trigger, another capture)
    /// or dropped meanwhile does not fail the addition, nor keep the other tables out.
    #[tokio::test]
    async fn adding_a_table_already_published_or_gone_is_no_error() {
        let cluster = crate::cluster::Cluster::shared();
        let db = cluster.fresh_database("addpub").unwrap();
        cluster
            .psql(
                &db,
                "CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE b (id int PRIMARY KEY);
                 CREATE TABLE c (id int PRIMARY KEY); CREATE PUBLICATION p FOR TABLE a;",
            )
            .unwrap();
        let table = |name: &str| {
            let oid: u32 = cluster
                .psql(&db, &format!("SELECT '{name}'::regclass::oid"))
                .unwrap()
                .parse()
                .unwrap();
            CapturedTable {
                oid,
                schema: "public".into(),
                name: name.into(),
            }
        };
        let tables = [table("a"), table("c"), table("b")];
        cluster.psql(&db, "DROP TABLE c").unwrap();
        let sql = crate::SourceConfig::parse(&cluster.url(&db))
            .unwrap()
            .connect_sql()
            .await
            .unwrap();
        add_to_publication(&sql, "p", &tables).await.unwrap();
        assert_eq!(
            cluster
                .psql(&db, "SELECT string_agg(tablename, ',' ORDER BY tablename) FROM pg_publication_tables WHERE pubname = 'p'")
                .unwrap(),
            "a,b"
        );
    }

    #[test]
    fn table_patterns_match_as_psql_patterns_do() {
        let p = |s: &str| TablePattern::parse(s);
        assert!(p("public.*").matches("public", "orders"));
        assert!(!p("public.*").matches("billing", "orders"));
        assert!(p("billing.invoice_*").matches("billing", "invoice_2026"));
        assert!(!p("billing.invoice_*").matches("billing", "invoices"));
        assert!(p("invoice_?").matches("any", "invoice_1"));
        assert!(!p("invoice_?").matches("any", "invoice_12"));
        // Unquoted letters fold to lower case; quoted ones keep theirs, and a quoted `*` or
        // `.` is a character.
        assert!(p("Public.Orders").matches("public", "orders"));
        assert!(!p("Public.Orders").matches("Public", "Orders"));
        assert!(p("\"Odd\".\"A*b\"").matches("Odd", "A*b"));
        assert!(!p("\"Odd\".\"A*b\"").matches("Odd", "Axb"));
        assert!(p("\"a.b\"").matches("s", "a.b"));
        assert!(p("*.*_log").matches("s", "audit_log"));
        assert!(p("*").matches("s", ""));
        assert!(p("a*b*c").matches("s", "aXbYbZc"));
        assert!(!p("a*b*c").matches("s", "aXbYbZ"));
    }

    #[test]
    fn exact_lists_are_told_from_patterns_and_exclusions() {
        let list = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(is_exact_list(&list(&["public.a", "\"Odd*\""])));
        assert!(!is_exact_list(&list(&[])));
        assert!(!is_exact_list(&list(&["public.*"])));
        assert!(!is_exact_list(&list(&["public.a", "!public.b"])));
        assert_eq!(
            selector("!public.audit"),
            Selector::Exclude(TablePattern::parse("public.audit"))
        );
    }
}
