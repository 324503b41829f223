//! `pgtrail setup`: an event trigger in the source that publishes each new table in the
//! transaction that creates it, so that its history starts at its first row.
//!
//! Without it, the catalog watch (`table_sync`) finds a new table some seconds after it was
//! created and reads it whole: its rows up to then arrive as one snapshot, their inserts (and
//! the application context of those inserts) are not known, and `as_of` before that snapshot
//! refuses. With it, `CREATE TABLE` runs `ALTER PUBLICATION … ADD TABLE` at the end of the
//! command, inside the creating transaction; the changes that transaction makes to the table
//! afterwards, and every later one, are published (logical decoding reads publication
//! membership with the catalog as of each change). The trigger also emits a transactional
//! logical message [`CREATED_PREFIX`] with the table's shape and storage layout as that
//! transaction sees them; the capture records it as the table's (empty) snapshot at that
//! transaction's commit, so a replay of the table starts there, and the watch holds the table
//! without reading it.
//!
//! What it publishes: an ordinary permanent table created with a primary key (the default
//! selection's rule: its UPDATE and DELETE cannot fail for want of a replica identity), when
//! the publication exists and is not `FOR ALL TABLES`. `CREATE TABLE … AS` and `SELECT INTO`
//! write their rows inside the command, before the trigger runs: those tables are left to the
//! watch. `--tables` patterns are not applied by the trigger: with patterns or exclusions, do
//! not install it (the watch applies them).
//!
//! Every OID in the messages is written as a JSON number (`::bigint`): `json_build_object`
//! writes the `oid` type as a string.
//!
//! Installing an event trigger needs a superuser (PostgreSQL 15); the function runs with its
//! owner's rights (`SECURITY DEFINER`, `search_path` fixed) so that any role creating a table
//! publishes it.

use pgtrail_store::{ChangeKey, Column, RelationVersion, StorageLayout};
use serde::{Deserialize, Serialize};

use crate::error::CaptureError;

/// The prefix of the trigger's message for a table it published as it was created.
pub const CREATED_PREFIX: &str = "pgtrail.created";
/// The prefix of the trigger's message for `ALTER TABLE` on a published table, or `DROP
/// TABLE`: the exact point of that DDL (its transaction's commit), which the catalog watch
/// otherwise knows only as "after its previous look"; after `ALTER TABLE` on a table of the
/// publication, also the table's schema, recorded as a version at the message's place.
pub const DDL_PREFIX: &str = "pgtrail.ddl";

/// What an installed trigger was installed for, kept as the comment of its function (JSON):
/// a capture compares it with its own publication and `--tables`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Installed {
    /// `None` for a trigger an older pgtrail installed: it does not say.
    pub publication: Option<String>,
    /// The `--tables` entries it takes new tables by (none: every table with a primary key).
    pub tables: Vec<String>,
}

/// The SQL that installs (or replaces) the trigger for `publication`, taking in the new
/// tables `tables` (the `--tables` entries of the capture) takes in.
pub fn install_sql(publication: &str, tables: &[String]) -> String {
    let installed = Installed {
        publication: Some(publication.to_string()),
        tables: tables.to_vec(),
    };
    let comment = quote_literal(&serde_json::to_string(&installed).unwrap_or_default());
    let publication = quote_literal(publication);
    let enum_labels = format!(
        "COALESCE((SELECT l.labels FROM ({}) l(rel, labels)), ARRAY[]::text[])",
        crate::slot::enum_labels_sql("a.attrelid = c.oid")
    );
    let selection = crate::slot::selection_sql(tables, "n.nspname", "c.relname");
    let relation_fields = relation_fields_sql();
    let [missing, column_versions, table_version, names] = crate::slot::LAYOUT_COLUMNS_SQL;
    format!(
        r#"CREATE SCHEMA IF NOT EXISTS pgtrail;
CREATE OR REPLACE FUNCTION pgtrail.publish_new_tables() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $pgtrail$
DECLARE
  created oid;
  shape json;
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = {publication} AND NOT puballtables) THEN
    RETURN;
  END IF;
  -- The exact point of DDL, for the archive's unknown spans: ALTER TABLE names the table and
  -- every table below it (partitions, children); any other command but CREATE TABLE and
  -- those that cannot change a table's rows may change some (ALTER TYPE ... CASCADE) and
  -- names none (relation 0).
  FOR created IN
    WITH RECURSIVE altered(relid) AS (
      SELECT d.objid FROM pg_event_trigger_ddl_commands() d
      WHERE d.command_tag = 'ALTER TABLE' AND d.classid = 'pg_class'::regclass
      UNION SELECT i.inhrelid FROM pg_inherits i JOIN altered a ON i.inhparent = a.relid)
    SELECT relid FROM altered
    UNION ALL
    SELECT 0 WHERE EXISTS (SELECT 1 FROM pg_event_trigger_ddl_commands() d
                           WHERE d.command_tag NOT IN ('ALTER TABLE', 'CREATE TABLE',
                             'ALTER PUBLICATION', 'CREATE INDEX', 'CREATE SCHEMA', 'CREATE SEQUENCE',
                             'ALTER SEQUENCE', 'CREATE VIEW', 'CREATE FUNCTION', 'CREATE TRIGGER',
                             'COMMENT', 'GRANT', 'REVOKE'))
  LOOP
    -- A table of the publication's shape after the command, so that the archive records a
    -- new name or column at this point rather than at the watch's next look.
    SELECT json_build_object('relation_id', created::bigint, 'shape',
      (SELECT json_build_object({relation_fields})
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.oid = created
          AND EXISTS (SELECT 1 FROM pg_publication_rel r JOIN pg_publication p ON p.oid = r.prpubid
                      WHERE p.pubname = {publication} AND r.prrelid = c.oid)))
      INTO shape;
    PERFORM pg_logical_emit_message(true, '{DDL_PREFIX}', shape::text);
  END LOOP;
  FOR created IN
    SELECT c.oid FROM pg_event_trigger_ddl_commands() d JOIN pg_class c ON c.oid = d.objid
      JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE d.command_tag = 'CREATE TABLE' AND d.classid = 'pg_class'::regclass
      AND c.relkind = 'r' AND c.relpersistence = 'p'
      AND {selection}
      AND EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary)
      AND NOT EXISTS (SELECT 1 FROM pg_publication_rel r JOIN pg_publication p ON p.oid = r.prpubid
                      WHERE p.pubname = {publication} AND r.prrelid = c.oid)
  LOOP
    EXECUTE format('ALTER PUBLICATION %I ADD TABLE %s', {publication}, created::regclass);
    SELECT json_build_object({relation_fields},
      'file_node', COALESCE(pg_relation_filenode(c.oid), 0)::bigint,
      'missing_values', {missing},
      'column_versions', {column_versions},
      'table_version', {table_version},
      'column_names', {names},
      'enum_labels', {enum_labels})
      INTO shape
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = created;
    PERFORM pg_logical_emit_message(true, '{CREATED_PREFIX}', shape::text);
  END LOOP;
EXCEPTION WHEN OTHERS THEN
  -- Never fail the application's DDL: the catalog watch finds what this missed.
  RAISE WARNING 'pgtrail: the event trigger did not publish or note this DDL (%); pgtrail''s catalog watch will', SQLERRM;
END
$pgtrail$;
CREATE OR REPLACE FUNCTION pgtrail.note_dropped_tables() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $pgtrail$
DECLARE
  dropped oid;
BEGIN
  FOR dropped IN
    SELECT DISTINCT o.objid FROM pg_event_trigger_dropped_objects() o
    WHERE o.classid = 'pg_class'::regclass AND o.object_type IN ('table', 'table column')
  LOOP
    PERFORM pg_logical_emit_message(true, '{DDL_PREFIX}', json_build_object('relation_id', dropped::bigint)::text);
  END LOOP;
EXCEPTION WHEN OTHERS THEN
  RAISE WARNING 'pgtrail: the event trigger did not note this drop (%); pgtrail''s catalog watch will', SQLERRM;
END
$pgtrail$;
COMMENT ON FUNCTION pgtrail.publish_new_tables() IS {comment};
REVOKE ALL ON FUNCTION pgtrail.publish_new_tables() FROM PUBLIC;
REVOKE ALL ON FUNCTION pgtrail.note_dropped_tables() FROM PUBLIC;
DROP EVENT TRIGGER IF EXISTS pgtrail_publish_new_tables;
CREATE EVENT TRIGGER pgtrail_publish_new_tables ON ddl_command_end
  EXECUTE FUNCTION pgtrail.publish_new_tables();
DROP EVENT TRIGGER IF EXISTS pgtrail_note_dropped_tables;
CREATE EVENT TRIGGER pgtrail_note_dropped_tables ON sql_drop
  EXECUTE FUNCTION pgtrail.note_dropped_tables();
"#
    )
}

/// The fields of a table's schema version for `json_build_object`, of the `pg_class` row `c`
/// joined to its `pg_namespace` row `n`: what pgoutput's Relation message says of it (see
/// [`RelationMessage`]).
fn relation_fields_sql() -> String {
    let primary_key = crate::slot::primary_key_sql("c.oid");
    let in_index = |which: &str| {
        format!(
            "COALESCE(a.attnum = ANY ((SELECT i.indkey FROM pg_index i WHERE i.indrelid = c.oid AND i.{which})::int2[]), false)"
        )
    };
    format!(
        "'relation_id', c.oid::bigint,
      'schema', n.nspname,
      'name', c.relname,
      'replica_identity', c.relreplident,
      'columns', ARRAY(
        SELECT json_build_object('name', a.attname, 'type_oid', a.atttypid::bigint, 'type_modifier', a.atttypmod,
          'in_key', {in_key}, 'in_identity', {in_identity})
        FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
        ORDER BY a.attnum),
      'primary_key', ARRAY({primary_key})",
        in_key = in_index("indisprimary"),
        in_identity = in_index("indisreplident"),
    )
}

/// The SQL that removes what [`install_sql`] installed.
pub const REMOVE_SQL: &str = "DROP EVENT TRIGGER IF EXISTS pgtrail_publish_new_tables;
DROP EVENT TRIGGER IF EXISTS pgtrail_note_dropped_tables;
DROP FUNCTION IF EXISTS pgtrail.publish_new_tables();
DROP FUNCTION IF EXISTS pgtrail.note_dropped_tables();";

/// Whether the trigger is installed and enabled in the source: the catalog watch then waits
/// for the stream to pass a look before it dates a rewrite, so that the DDL's own point (its
/// [`DDL_PREFIX`] message) is known.
/// What for: a trigger an older pgtrail installed has no comment, and takes in every new
/// table with a primary key, for a publication it does not say.
pub async fn installed(sql: &tokio_postgres::Client) -> Result<Option<Installed>, CaptureError> {
    let row = sql
        .query_opt(
            "SELECT obj_description(evtfoid, 'pg_proc') \
             FROM pg_event_trigger WHERE evtname = 'pgtrail_publish_new_tables' AND evtenabled <> 'D'",
            &[],
        )
        .await
        .map_err(|e| CaptureError::sql("looking for pgtrail's event trigger", e))?;
    Ok(row.map(|row| {
        row.get::<_, Option<String>>(0)
            .and_then(|c| serde_json::from_str(&c).ok())
            .unwrap_or(Installed {
                publication: None,
                tables: Vec::new(),
            })
    }))
}

/// An error when the trigger, installed for `publication`, takes in other new tables than
/// `tables` does: it would publish tables this capture leaves out (their changes would reach
/// the archive before a look could take them out again), or leave out tables it takes in.
pub fn check_selection(
    installed: &Installed,
    publication: &str,
    tables: &[String],
) -> Result<(), CaptureError> {
    let normal = |t: &[String]| {
        let mut t: Vec<String> = t.iter().map(|e| e.trim().to_string()).collect();
        t.sort();
        t.dedup();
        t
    };
    let for_publication = installed
        .publication
        .as_deref()
        .is_none_or(|p| p == publication);
    let takes = normal(&installed.tables);
    if !for_publication || takes == normal(tables) {
        return Ok(());
    }
    let given = if tables.is_empty() {
        String::new()
    } else {
        format!(" --tables {}", quote_shell(&tables.join(",")))
    };
    Err(CaptureError::setup(
        format!(
            "pgtrail setup's event trigger takes in other new tables ({}) than this capture's --tables ({})",
            if takes.is_empty() {
                "every table with a primary key".to_string()
            } else {
                takes.join(",")
            },
            if tables.is_empty() {
                "every table that can be captured safely".to_string()
            } else {
                tables.join(",")
            },
        ),
        format!(
            "install it again with the same selection: pgtrail setup --publication {}{given}  (as a superuser; or remove it with pgtrail setup --remove)",
            quote_shell(publication)
        ),
    ))
}

/// `text` quoted for a POSIX shell when it needs it.
fn quote_shell(text: &str) -> String {
    if !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-,/".contains(c))
    {
        text.to_string()
    } else {
        format!("'{}'", text.replace('\'', "'\\''"))
    }
}

/// What a [`DDL_PREFIX`] message says: the table the DDL was on (0: a command that names
/// none), and, for a table of the publication, its schema version after the command.
#[derive(Debug)]
pub struct Ddl {
    pub relation_id: u32,
    pub relation: Option<RelationVersion>,
}

/// Read a [`DDL_PREFIX`] message; `None` when it is not one this build understands.
pub fn parse_ddl(content: &[u8]) -> Option<Ddl> {
    #[derive(Deserialize)]
    struct DdlMessage {
        relation_id: u32,
        /// Absent from the message of a trigger installed by an older pgtrail.
        #[serde(default)]
        shape: Option<RelationMessage>,
    }
    let message = serde_json::from_slice::<DdlMessage>(content).ok()?;
    Some(Ddl {
        relation_id: message.relation_id,
        relation: message.shape.map(RelationMessage::into_version),
    })
}

/// Install (or, with `remove`, take out) the trigger through `sql`, in one transaction.
pub async fn run(
    sql: &tokio_postgres::Client,
    publication: &str,
    tables: &[String],
    remove: bool,
) -> Result<(), CaptureError> {
    let body = if remove {
        REMOVE_SQL.to_string()
    } else {
        install_sql(publication, tables)
    };
    match sql.batch_execute(&format!("BEGIN;\n{body}\nCOMMIT;")).await {
        Ok(()) => Ok(()),
        Err(e) => {
            // Nothing of it stays: the failed transaction is rolled back (and would be by the
            // server when the connection closes).
            let _ = sql.batch_execute("ROLLBACK").await;
            Err(CaptureError::sql(
                "installing the event trigger (it needs a superuser: CREATE EVENT TRIGGER; or print the SQL with --print-sql for one to run)",
                e,
            ))
        }
    }
}

/// A table the trigger published at its creation: its first schema version and its storage
/// layout, as the creating transaction saw them.
#[derive(Debug)]
pub struct Created {
    pub relation: RelationVersion,
    pub layout: StorageLayout,
}

/// A table's schema version as the trigger writes it ([`relation_fields_sql`]).
#[derive(Deserialize)]
struct RelationMessage {
    relation_id: u32,
    schema: String,
    name: String,
    replica_identity: String,
    columns: Vec<ColumnMessage>,
    primary_key: Vec<String>,
}

#[derive(Deserialize)]
struct ColumnMessage {
    name: String,
    type_oid: u32,
    type_modifier: i32,
    in_key: bool,
    /// In the replica identity index (`USING INDEX`). Absent from the message of a trigger
    /// installed by an older pgtrail, which wrote only new tables (which have no such index).
    #[serde(default)]
    in_identity: bool,
}

impl RelationMessage {
    fn into_version(self) -> RelationVersion {
        let replica_identity = self.replica_identity.bytes().next().unwrap_or(b'd');
        let columns = self
            .columns
            .into_iter()
            .map(|c| Column {
                name: c.name,
                type_oid: c.type_oid,
                type_modifier: c.type_modifier,
                is_key: crate::slot::flagged_as_key(replica_identity, c.in_key, c.in_identity),
            })
            .collect();
        RelationVersion {
            relation_id: self.relation_id,
            valid_from: ChangeKey::default(),
            schema: self.schema,
            name: self.name,
            replica_identity,
            columns,
            primary_key: self.primary_key,
        }
    }
}

#[derive(Deserialize)]
struct CreatedMessage {
    #[serde(flatten)]
    relation: RelationMessage,
    file_node: u32,
    missing_values: Vec<i16>,
    column_versions: Vec<i64>,
    table_version: i64,
    column_names: Vec<String>,
    /// Absent from the message of a trigger installed by an older pgtrail.
    #[serde(default)]
    enum_labels: Vec<String>,
}

/// Read the trigger's message; `None` (logged) when it is not one this build understands,
/// so the table is left to the catalog watch, which reads it whole.
pub fn parse_created(content: &[u8]) -> Option<Created> {
    let message: CreatedMessage = match serde_json::from_slice(content) {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(error = %e, "a {CREATED_PREFIX} message this pgtrail does not read (is the trigger from another version? run `pgtrail setup` again); the table is read whole instead");
            return None;
        }
    };
    Some(Created {
        relation: message.relation.into_version(),
        layout: StorageLayout {
            file_node: message.file_node,
            missing_values: message.missing_values,
            column_versions: message
                .column_versions
                .into_iter()
                .map(|x| x as u32)
                .collect(),
            table_version: message.table_version as u32,
            column_names: message.column_names,
            enum_labels: crate::slot::enum_labels_from(&message.enum_labels),
            // A table just created has no partitions yet; the capture's looks record them.
            partitions: Vec::new(),
        },
    })
}

/// `name` as an SQL string literal.
fn quote_literal(name: &str) -> String {
    format!("'{}'", name.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ddl_note_gives_the_tables_schema_with_its_key_flags_as_pgoutput_sets_them() {
        let note = br#"{"relation_id": 16390, "shape": {"relation_id": 16390, "schema": "other",
            "name": "t2", "replica_identity": "i", "primary_key": ["id"],
            "columns": [
              {"name": "id", "type_oid": 23, "type_modifier": -1, "in_key": true, "in_identity": false},
              {"name": "code", "type_oid": 25, "type_modifier": -1, "in_key": false, "in_identity": true}]}}"#;
        let ddl = parse_ddl(note).unwrap();
        assert_eq!(ddl.relation_id, 16390);
        let relation = ddl.relation.unwrap();
        assert_eq!(
            (relation.schema.as_str(), relation.name.as_str()),
            ("other", "t2")
        );
        // USING INDEX: the identity index's columns are the key, not the primary key's.
        let keys: Vec<bool> = relation.columns.iter().map(|c| c.is_key).collect();
        assert_eq!(keys, [false, true]);
        // A trigger installed by an older pgtrail names the table only; a command that names
        // none gives no schema.
        let old = parse_ddl(br#"{"relation_id": 16390}"#).unwrap();
        assert!(old.relation.is_none());
        let none = parse_ddl(br#"{"relation_id": 0, "shape": null}"#).unwrap();
        assert!(none.relation.is_none());
        assert!(parse_ddl(b"not json").is_none());
    }
}
