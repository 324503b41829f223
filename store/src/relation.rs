//! Schema versions of captured relations.

use serde::{Deserialize, Serialize};

use crate::lsn::ChangeKey;

/// One column of a relation version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Column {
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
    /// Flagged as part of the replica identity in the Relation message (every column under
    /// REPLICA IDENTITY FULL).
    pub is_key: bool,
}

/// The shape of a relation from a given change on: PostgreSQL sends a Relation message before
/// the first change of a relation in each session and after every schema change, and the
/// archive keeps every distinct version with the key from which it applies.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelationVersion {
    pub relation_id: u32,
    pub valid_from: ChangeKey,
    pub schema: String,
    pub name: String,
    /// `d` default, `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    pub columns: Vec<Column>,
    /// Primary key column names from the catalog (empty when the table has none). Under
    /// REPLICA IDENTITY FULL every column is flagged as key, so the real key comes from here.
    pub primary_key: Vec<String>,
}

impl RelationVersion {
    /// Whether two versions describe the same shape (a Relation message re-sent after a
    /// reconnect is not a new schema version).
    pub fn same_shape(&self, other: &RelationVersion) -> bool {
        self.schema == other.schema
            && self.name == other.name
            && self.replica_identity == other.replica_identity
            && self.columns == other.columns
            && self.primary_key == other.primary_key
    }

    /// Positions of the columns that identify a row: the replica identity columns, or under
    /// REPLICA IDENTITY FULL the primary key (empty when the table has none).
    pub fn key_positions(&self) -> Vec<usize> {
        if self.replica_identity == b'f' {
            self.primary_key
                .iter()
                .filter_map(|k| self.columns.iter().position(|c| &c.name == k))
                .collect()
        } else {
            self.columns
                .iter()
                .enumerate()
                .filter(|(_, c)| c.is_key)
                .map(|(i, _)| i)
                .collect()
        }
    }

    /// `schema.name` for people to read, each part quoted as [`quote_ident`] does.
    pub fn qualified_name(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

/// Quote an identifier for people to read, as PostgreSQL's `quote_ident` does: only when it
/// is not a plain lowercase name (`[a-z_][a-z0-9_]*`) or is a keyword that cannot stand alone
/// as a column name ([`QUOTED_KEYWORDS`]). Names in the archive's answers and messages use it;
/// SQL that pgtrail sends to PostgreSQL uses [`always_quoted`], which no keyword of any
/// version can change the meaning of.
pub fn quote_ident(name: &str) -> String {
    let plain = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && QUOTED_KEYWORDS.binary_search(&name).is_err();
    if plain {
        name.to_string()
    } else {
        always_quoted(name)
    }
}

/// An identifier as pgtrail writes it into SQL for PostgreSQL: always in double quotes (a
/// quote inside doubled), so that its meaning never depends on the server's keyword list.
/// Unquoted, a column named `user` or `current_date` reads as the connecting role or today's
/// date, silently.
pub fn always_quoted(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The keywords `quote_ident` quotes (every category but "unreserved"): PostgreSQL 15's
/// `pg_get_keywords()`, plus those later versions added (`system_user` in 16, the SQL/JSON
/// constructors in 16 and 17, `merge_action` in 17). Sorted, for binary search. Display only:
/// a later keyword missing here makes a name print unquoted, never a query wrong.
const QUOTED_KEYWORDS: &[&str] = &[
    "all",
    "analyse",
    "analyze",
    "and",
    "any",
    "array",
    "as",
    "asc",
    "asymmetric",
    "authorization",
    "between",
    "bigint",
    "binary",
    "bit",
    "boolean",
    "both",
    "case",
    "cast",
    "char",
    "character",
    "check",
    "coalesce",
    "collate",
    "collation",
    "column",
    "concurrently",
    "constraint",
    "create",
    "cross",
    "current_catalog",
    "current_date",
    "current_role",
    "current_schema",
    "current_time",
    "current_timestamp",
    "current_user",
    "dec",
    "decimal",
    "default",
    "deferrable",
    "desc",
    "distinct",
    "do",
    "else",
    "end",
    "except",
    "exists",
    "extract",
    "false",
    "fetch",
    "float",
    "for",
    "foreign",
    "freeze",
    "from",
    "full",
    "grant",
    "greatest",
    "group",
    "grouping",
    "having",
    "ilike",
    "in",
    "initially",
    "inner",
    "inout",
    "int",
    "integer",
    "intersect",
    "interval",
    "into",
    "is",
    "isnull",
    "join",
    "json",
    "json_array",
    "json_arrayagg",
    "json_exists",
    "json_object",
    "json_objectagg",
    "json_query",
    "json_scalar",
    "json_serialize",
    "json_table",
    "json_value",
    "lateral",
    "leading",
    "least",
    "left",
    "like",
    "limit",
    "localtime",
    "localtimestamp",
    "merge_action",
    "national",
    "natural",
    "nchar",
    "none",
    "normalize",
    "not",
    "notnull",
    "null",
    "nullif",
    "numeric",
    "offset",
    "on",
    "only",
    "or",
    "order",
    "out",
    "outer",
    "overlaps",
    "overlay",
    "placing",
    "position",
    "precision",
    "primary",
    "real",
    "references",
    "returning",
    "right",
    "row",
    "select",
    "session_user",
    "setof",
    "similar",
    "smallint",
    "some",
    "substring",
    "symmetric",
    "system_user",
    "table",
    "tablesample",
    "then",
    "time",
    "timestamp",
    "to",
    "trailing",
    "treat",
    "trim",
    "true",
    "union",
    "unique",
    "user",
    "using",
    "values",
    "varchar",
    "variadic",
    "verbose",
    "when",
    "where",
    "window",
    "with",
    "xmlattributes",
    "xmlconcat",
    "xmlelement",
    "xmlexists",
    "xmlforest",
    "xmlnamespaces",
    "xmlparse",
    "xmlpi",
    "xmlroot",
    "xmlserialize",
    "xmltable",
];

/// Split a `--tables` list at commas outside double quotes.
pub fn split_table_list(list: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for ch in list.chars() {
        match ch {
            '"' => {
                quoted = !quoted;
                cur.push(ch);
            }
            ',' if !quoted => {
                if !cur.trim().is_empty() {
                    out.push(cur.trim().to_string());
                }
                cur.clear();
            }
            _ => cur.push(ch),
        }
    }
    if !cur.trim().is_empty() {
        out.push(cur.trim().to_string());
    }
    out
}

/// Split `schema.table` with PostgreSQL's identifier rules: unquoted parts fold to lower case,
/// quoted parts keep their case and may contain dots and doubled quotes.
pub fn parse_qualified(name: &str) -> Option<(Option<String>, String)> {
    let mut parts = Vec::new();
    let mut chars = name.trim().chars().peekable();
    loop {
        let mut part = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next()? {
                    '"' if chars.peek() == Some(&'"') => {
                        chars.next();
                        part.push('"');
                    }
                    '"' => break,
                    c => part.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == '.' {
                    break;
                }
                part.push(c.to_ascii_lowercase());
                chars.next();
            }
            if part.is_empty() || part.contains(char::is_whitespace) {
                return None;
            }
        }
        parts.push(part);
        match chars.next() {
            None => break,
            Some('.') => {}
            Some(_) => return None,
        }
    }
    match parts.len() {
        1 => Some((None, parts.remove(0))),
        2 => {
            let table = parts.remove(1);
            Some((Some(parts.remove(0)), table))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::{QUOTED_KEYWORDS, always_quoted, parse_qualified, quote_ident, split_table_list};

    #[test]
    fn table_names_parse_like_postgres() {
        assert_eq!(parse_qualified("Orders"), Some((None, "orders".into())));
        assert_eq!(
            parse_qualified("public.orders"),
            Some((Some("public".into()), "orders".into()))
        );
        assert_eq!(
            parse_qualified("public.\"Odd Name\""),
            Some((Some("public".into()), "Odd Name".into()))
        );
        assert_eq!(
            parse_qualified("\"a.b\".\"q\"\"x\""),
            Some((Some("a.b".into()), "q\"x".into()))
        );
        assert_eq!(parse_qualified("a.b.c"), None);
        assert_eq!(parse_qualified("\"open"), None);
        assert_eq!(parse_qualified(""), None);
    }

    /// As PostgreSQL 15's `quote_ident` answers (checked against the server itself, keyword by
    /// keyword, in capture's identifier test).
    #[test]
    fn names_are_quoted_as_postgresql_quotes_them() {
        for plain in ["notes", "_x", "a1", "abort", "name"] {
            assert_eq!(quote_ident(plain), plain);
        }
        for (name, quoted) in [
            ("order", "\"order\""),
            ("user", "\"user\""),
            ("current_date", "\"current_date\""),
            ("between", "\"between\""),
            ("Mixed", "\"Mixed\""),
            ("a$b", "\"a$b\""),
            ("1a", "\"1a\""),
            ("naïve", "\"naïve\""),
            ("with space", "\"with space\""),
            ("q\"x", "\"q\"\"x\""),
            ("", "\"\""),
        ] {
            assert_eq!(quote_ident(name), quoted, "{name}");
        }
        assert_eq!(always_quoted("notes"), "\"notes\"");
        assert!(QUOTED_KEYWORDS.windows(2).all(|w| w[0] < w[1]), "sorted");
    }

    #[test]
    fn a_table_list_splits_at_commas_outside_quotes() {
        assert_eq!(
            split_table_list(" public.a, \"b,c\".d ,,e "),
            vec!["public.a", "\"b,c\".d", "e"]
        );
        assert!(split_table_list(" , ").is_empty());
    }
}
