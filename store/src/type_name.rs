//! A column's type as PostgreSQL's `format_type(oid, typmod)` prints it, from what the archive
//! knows: the built-in types by OID (their OIDs are fixed), the others by the name their Type
//! message gave.

use std::collections::BTreeMap;

use crate::relation::quote_ident;

/// Names of types that are not built in, by OID: `(schema, name)` from the Type messages.
pub type TypeNames = BTreeMap<u32, (String, String)>;

/// The enum type under a column's type (the enum itself, an array of it, a domain over either),
/// as the catalog held it when the capture last looked: its name and its labels in sort
/// order (PostgreSQL orders and compares an enum's values by this order, not by their text).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EnumType {
    pub schema: String,
    pub name: String,
    pub labels: Vec<String>,
}

impl EnumType {
    /// `schema.name`, each part quoted as PostgreSQL would.
    pub fn qualified_name(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

/// The enum types under column types, by the column type's OID.
pub type EnumTypes = BTreeMap<u32, EnumType>;

/// `format_type(oid, type_modifier)` as PostgreSQL prints it, or `unknown type (oid N)` for a
/// type the archive has no name for (never a guess).
pub fn format_type(oid: u32, type_modifier: i32, names: &TypeNames) -> String {
    if let Some(element) = array_element(oid) {
        return format!("{}[]", format_type(element, type_modifier, names));
    }
    if let Some(text) = builtin(oid, type_modifier) {
        return text;
    }
    match names.get(&oid) {
        // An array of a type that is not built in: pgoutput names it `_element`.
        Some((schema, name)) => {
            let (name, suffix) = match name.strip_prefix('_') {
                Some(element) if names.values().any(|(s, n)| s == schema && n == element) => {
                    (element, "[]")
                }
                _ => (name.as_str(), ""),
            };
            // format_type leaves out schemas on the search path; pgtrail cannot know the
            // path, so it leaves out only `public` and `pg_catalog`.
            if schema == "public" || schema == "pg_catalog" {
                format!("{}{suffix}", quote_ident(name))
            } else {
                format!("{}.{}{suffix}", quote_ident(schema), quote_ident(name))
            }
        }
        None => format!("unknown type (oid {oid})"),
    }
}

fn array_element(oid: u32) -> Option<u32> {
    Some(match oid {
        1000 => 16,
        1001 => 17,
        1002 => 18,
        1003 => 19,
        1016 => 20,
        1005 => 21,
        1007 => 23,
        1009 => 25,
        1028 => 26,
        199 => 114,
        143 => 142,
        1017 => 600,
        1020 => 603,
        651 => 650,
        1021 => 700,
        1022 => 701,
        791 => 790,
        1040 => 829,
        1041 => 869,
        1014 => 1042,
        1015 => 1043,
        1182 => 1082,
        1183 => 1083,
        1115 => 1114,
        1185 => 1184,
        1187 => 1186,
        1270 => 1266,
        1561 => 1560,
        1563 => 1562,
        1231 => 1700,
        2951 => 2950,
        3643 => 3614,
        3645 => 3615,
        3807 => 3802,
        3905 => 3904,
        3907 => 3906,
        3909 => 3908,
        3911 => 3910,
        3913 => 3912,
        3927 => 3926,
        _ => return None,
    })
}

fn builtin(oid: u32, typmod: i32) -> Option<String> {
    let modified = typmod >= 0;
    let name = match oid {
        16 => "boolean",
        17 => "bytea",
        18 => "\"char\"",
        19 => "name",
        20 => "bigint",
        21 => "smallint",
        23 => "integer",
        25 => "text",
        26 => "oid",
        114 => "json",
        142 => "xml",
        600 => "point",
        601 => "lseg",
        602 => "path",
        603 => "box",
        604 => "polygon",
        628 => "line",
        650 => "cidr",
        700 => "real",
        701 => "double precision",
        718 => "circle",
        774 => "macaddr8",
        790 => "money",
        829 => "macaddr",
        869 => "inet",
        1082 => "date",
        1186 => return Some(interval(typmod)),
        2950 => "uuid",
        3614 => "tsvector",
        3615 => "tsquery",
        3802 => "jsonb",
        3904 => "int4range",
        3906 => "numrange",
        3908 => "tsrange",
        3910 => "tstzrange",
        3912 => "daterange",
        3926 => "int8range",
        4451 => "int4multirange",
        4532 => "nummultirange",
        4533 => "tsmultirange",
        4534 => "tstzmultirange",
        4535 => "datemultirange",
        4536 => "int8multirange",
        1042 if modified => return Some(format!("character({})", typmod - 4)),
        1042 => "bpchar",
        1043 if modified => return Some(format!("character varying({})", typmod - 4)),
        1043 => "character varying",
        1560 if modified => return Some(format!("bit({typmod})")),
        1560 => "bit",
        1562 if modified => return Some(format!("bit varying({typmod})")),
        1562 => "bit varying",
        1700 if modified => {
            let precision = ((typmod - 4) >> 16) & 0xffff;
            // The scale is an 11-bit signed number (negative scales since PostgreSQL 15).
            let scale = (((typmod - 4) & 0x7ff) ^ 1024) - 1024;
            return Some(format!("numeric({precision},{scale})"));
        }
        1700 => "numeric",
        1083 | 1114 | 1184 | 1266 => {
            let (base, zone) = match oid {
                1083 => ("time", "without"),
                1114 => ("timestamp", "without"),
                1184 => ("timestamp", "with"),
                _ => ("time", "with"),
            };
            let precision = if modified {
                format!("({typmod})")
            } else {
                String::new()
            };
            return Some(format!("{base}{precision} {zone} time zone"));
        }
        _ => return None,
    };
    Some(name.to_string())
}

/// `interval`, its fields (`day to second`) and precision, as `intervaltypmodout` prints them.
fn interval(typmod: i32) -> String {
    if typmod < 0 {
        return "interval".into();
    }
    const MONTH: i32 = 1 << 1;
    const YEAR: i32 = 1 << 2;
    const DAY: i32 = 1 << 3;
    const HOUR: i32 = 1 << 10;
    const MINUTE: i32 = 1 << 11;
    const SECOND: i32 = 1 << 12;
    let range = (typmod >> 16) & 0x7fff;
    let precision = typmod & 0xffff;
    let fields = match range {
        YEAR => " year",
        MONTH => " month",
        DAY => " day",
        HOUR => " hour",
        MINUTE => " minute",
        SECOND => " second",
        r if r == YEAR | MONTH => " year to month",
        r if r == DAY | HOUR => " day to hour",
        r if r == DAY | HOUR | MINUTE => " day to minute",
        r if r == DAY | HOUR | MINUTE | SECOND => " day to second",
        r if r == HOUR | MINUTE => " hour to minute",
        r if r == HOUR | MINUTE | SECOND => " hour to second",
        r if r == MINUTE | SECOND => " minute to second",
        _ => "",
    };
    if precision == 0xffff {
        format!("interval{fields}")
    } else {
        format!("interval{fields}({precision})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modifiers_print_as_postgresql_prints_them() {
        let none = TypeNames::new();
        let t = |oid, typmod| format_type(oid, typmod, &none);
        assert_eq!(t(1700, (12 << 16 | 2) + 4), "numeric(12,2)");
        assert_eq!(t(1700, -1), "numeric");
        assert_eq!(t(1043, 14), "character varying(10)");
        assert_eq!(t(1042, 5), "character(1)");
        assert_eq!(t(1184, 3), "timestamp(3) with time zone");
        assert_eq!(t(1083, -1), "time without time zone");
        assert_eq!(t(1231, (5 << 16 | 1) + 4), "numeric(5,1)[]");
        assert_eq!(t(99999, -1), "unknown type (oid 99999)");
        let named = TypeNames::from([
            (70000, ("public".into(), "mood".into())),
            (70001, ("public".into(), "_mood".into())),
            (70002, ("billing".into(), "Money Kind".into())),
        ]);
        assert_eq!(format_type(70001, -1, &named), "mood[]");
        assert_eq!(format_type(70002, -1, &named), "billing.\"Money Kind\"");
    }
}
