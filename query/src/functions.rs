//! Small scalar functions for archive queries: LSN text ⇄ number, and JSON access for the
//! `context`, `before` and `after` JSON text of the `changes` view.

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, StringBuilder, UInt64Builder};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, UInt64Type};
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::{ColumnarValue, ScalarUDF, Volatility, create_udf};
use pgtrail_store::Lsn;

fn arrays(args: &[ColumnarValue]) -> Result<(Vec<ArrayRef>, bool)> {
    let scalar = args.iter().all(|a| matches!(a, ColumnarValue::Scalar(_)));
    let len = args.iter().find_map(|a| match a {
        ColumnarValue::Array(a) => Some(a.len()),
        _ => None,
    });
    let arrays = args
        .iter()
        .map(|a| a.clone().into_array(len.unwrap_or(1)))
        .collect::<Result<Vec<_>>>()?;
    Ok((arrays, scalar))
}

fn done(array: ArrayRef, scalar: bool) -> Result<ColumnarValue> {
    if scalar {
        Ok(ColumnarValue::Scalar(
            datafusion::common::ScalarValue::try_from_array(&array, 0)?,
        ))
    } else {
        Ok(ColumnarValue::Array(array))
    }
}

/// `pg_lsn(lsn)`: the commit LSN number of the history tables as PostgreSQL writes it.
fn pg_lsn() -> ScalarUDF {
    create_udf(
        "pg_lsn",
        vec![DataType::UInt64],
        DataType::Utf8,
        Volatility::Immutable,
        Arc::new(|args: &[ColumnarValue]| {
            let (arrays, scalar) = arrays(args)?;
            let values = cast(&arrays[0], &DataType::UInt64)?;
            let values = values.as_primitive::<UInt64Type>();
            let mut out = StringBuilder::new();
            for v in values.iter() {
                out.append_option(v.map(|v| Lsn(v).to_string()));
            }
            done(Arc::new(out.finish()), scalar)
        }),
    )
}

/// `lsn('16/B374D848')`: an LSN text as the number the `lsn` columns hold.
fn lsn_number() -> ScalarUDF {
    create_udf(
        "lsn",
        vec![DataType::Utf8],
        DataType::UInt64,
        Volatility::Immutable,
        Arc::new(|args: &[ColumnarValue]| {
            let (arrays, scalar) = arrays(args)?;
            let text = cast(&arrays[0], &DataType::Utf8)?;
            let mut out = UInt64Builder::new();
            for v in text.as_string::<i32>().iter() {
                match v {
                    Some(t) => out.append_value(
                        t.parse::<Lsn>()
                            .map_err(|e| DataFusionError::Execution(e.to_string()))?
                            .0,
                    ),
                    None => out.append_null(),
                }
            }
            done(Arc::new(out.finish()), scalar)
        }),
    )
}

/// `json_get(json_text, key)`: the member `key` of a JSON object (strings unquoted, other
/// values as JSON text; null when absent or not an object). `key` may be a path `a.b`.
fn json_get() -> ScalarUDF {
    create_udf(
        "json_get",
        vec![DataType::Utf8, DataType::Utf8],
        DataType::Utf8,
        Volatility::Immutable,
        Arc::new(|args: &[ColumnarValue]| {
            let (arrays, scalar) = arrays(args)?;
            let docs = cast(&arrays[0], &DataType::Utf8)?;
            let keys = cast(&arrays[1], &DataType::Utf8)?;
            let (docs, keys) = (docs.as_string::<i32>(), keys.as_string::<i32>());
            let mut out = StringBuilder::new();
            for i in 0..docs.len() {
                if docs.is_null(i) || keys.is_null(i) {
                    out.append_null();
                    continue;
                }
                match json_field(docs.value(i), keys.value(i)) {
                    Some(v) => out.append_value(v),
                    None => out.append_null(),
                }
            }
            done(Arc::new(out.finish()), scalar)
        }),
    )
}

/// The member `path` (`a.b` reaches into nested objects) of the JSON object `doc`: a string
/// unquoted, any other value as JSON text; `None` when absent, null, or `doc` is not JSON.
/// What `json_get` answers, and what `revert --context` matches.
pub(crate) fn json_field(doc: &str, path: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(doc).ok()?;
    let mut cur = &value;
    for part in path.split('.') {
        cur = cur.get(part)?;
    }
    match cur {
        serde_json::Value::Null => None,
        serde_json::Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

pub fn all() -> Vec<ScalarUDF> {
    vec![pg_lsn(), lsn_number(), json_get()]
}
