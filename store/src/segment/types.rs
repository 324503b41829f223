//! The mapping from PostgreSQL types to Arrow types, the conversion of PostgreSQL's text
//! output into typed Arrow values, and the rendering of those values back into text that
//! PostgreSQL reads as the same value.
//!
//! The capture side keeps every value exactly as PostgreSQL printed it (the session pins
//! `DateStyle=ISO`, `TimeZone=UTC`, `IntervalStyle=postgres`, `extra_float_digits=1` and
//! `bytea_output=hex`), so the conversion here parses one fixed format per type. A value
//! that does not fit its Arrow type (a numeric `NaN`, `24:00:00`, a multi-dimensional array)
//! is not lost: [`ValueBuilder::append_text`] refuses it and the segment writer keeps its
//! exact text in the image's `*_text` side column.

use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayBuilder, ArrayRef, AsArray, BinaryBuilder, BooleanBuilder, Date32Builder,
    Decimal128Builder, FixedSizeBinaryBuilder, Float32Builder, Float64Builder, Int16Builder,
    Int32Array, Int32Builder, Int64Array, Int64Builder, ListArray, StringBuilder, StructArray,
    Time64MicrosecondBuilder, TimestampMicrosecondBuilder,
};
use datafusion::arrow::buffer::OffsetBuffer;
use datafusion::arrow::datatypes::{
    DataType, Date32Type, Decimal128Type, Field, Fields, Float32Type, Float64Type, Int16Type,
    Int32Type, Int64Type, IntervalMonthDayNano, Time64MicrosecondType, TimeUnit,
    TimestampMicrosecondType,
};

/// How a PostgreSQL column type is kept in a segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PgKind {
    Bool,
    Int2,
    Int4,
    Int8,
    Float4,
    Float8,
    /// `numeric(p, s)` with 1 <= p <= 38 and 0 <= s <= p: exact in a Decimal128.
    Decimal {
        precision: u8,
        scale: i8,
    },
    /// Kept as PostgreSQL's text: text types, unconstrained numeric, and every type without a
    /// closer Arrow match.
    Text,
    /// json and jsonb: the JSON text.
    Json,
    Bytea,
    Uuid,
    Date,
    Time,
    Timestamp,
    TimestampTz,
    Interval,
    /// A one-dimensional array of a mapped element type.
    Array(Box<PgKind>),
}

const MICROS_PER_DAY: i64 = 86_400_000_000;

impl PgKind {
    /// The kind of a column from its type OID and type modifier (`atttypmod`).
    pub fn of(type_oid: u32, type_modifier: i32) -> PgKind {
        let element = |oid: u32| Some(PgKind::of(oid, type_modifier));
        let array = match type_oid {
            1000 => element(16),
            1001 => element(17),
            1005 => element(21),
            1007 => element(23),
            1016 => element(20),
            1021 => element(700),
            1022 => element(701),
            1231 => element(1700),
            1009 | 1015 | 1014 | 1003 | 1002 => element(25),
            199 | 3807 => element(114),
            2951 => element(2950),
            1182 => element(1082),
            1183 => element(1083),
            1115 => element(1114),
            1185 => element(1184),
            1187 => element(1186),
            _ => None,
        };
        if let Some(e) = array {
            return PgKind::Array(Box::new(e));
        }
        match type_oid {
            16 => PgKind::Bool,
            21 => PgKind::Int2,
            23 => PgKind::Int4,
            20 => PgKind::Int8,
            700 => PgKind::Float4,
            701 => PgKind::Float8,
            1700 => numeric_kind(type_modifier),
            114 | 3802 => PgKind::Json,
            17 => PgKind::Bytea,
            2950 => PgKind::Uuid,
            1082 => PgKind::Date,
            1083 => PgKind::Time,
            1114 => PgKind::Timestamp,
            1184 => PgKind::TimestampTz,
            1186 => PgKind::Interval,
            _ => PgKind::Text,
        }
    }

    /// The Arrow type values of this kind are stored as.
    pub fn arrow_type(&self) -> DataType {
        match self {
            PgKind::Bool => DataType::Boolean,
            PgKind::Int2 => DataType::Int16,
            PgKind::Int4 => DataType::Int32,
            PgKind::Int8 => DataType::Int64,
            PgKind::Float4 => DataType::Float32,
            PgKind::Float8 => DataType::Float64,
            PgKind::Decimal { precision, scale } => DataType::Decimal128(*precision, *scale),
            PgKind::Text | PgKind::Json => DataType::Utf8,
            PgKind::Bytea => DataType::Binary,
            PgKind::Uuid => DataType::FixedSizeBinary(16),
            PgKind::Date => DataType::Date32,
            PgKind::Time => DataType::Time64(TimeUnit::Microsecond),
            PgKind::Timestamp => DataType::Timestamp(TimeUnit::Microsecond, None),
            PgKind::TimestampTz => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            // Parquet has no exact interval type (its INTERVAL is unsigned milliseconds), so
            // PostgreSQL's three fields are kept as they are.
            PgKind::Interval => DataType::Struct(interval_fields()),
            PgKind::Array(e) => {
                DataType::List(Arc::new(Field::new("element", e.arrow_type(), true)))
            }
        }
    }
}

/// The fields of a stored interval: PostgreSQL's own representation, exact.
pub fn interval_fields() -> Fields {
    Fields::from(vec![
        Field::new("months", DataType::Int32, false),
        Field::new("days", DataType::Int32, false),
        Field::new("microseconds", DataType::Int64, false),
    ])
}

fn numeric_kind(type_modifier: i32) -> PgKind {
    // atttypmod of numeric(p, s) is ((p << 16) | s) + 4, with s a signed 11-bit field.
    if type_modifier < 4 {
        return PgKind::Text;
    }
    let m = type_modifier - 4;
    let precision = (m >> 16) & 0xFFFF;
    let scale = ((m & 0x7FF) ^ 1024) - 1024;
    if (1..=38).contains(&precision) && (0..=precision).contains(&scale) {
        PgKind::Decimal {
            precision: precision as u8,
            scale: scale as i8,
        }
    } else {
        PgKind::Text
    }
}

/// A builder for one column of a kind: takes PostgreSQL text, yields an Arrow array.
pub struct ValueBuilder {
    kind: PgKind,
    inner: Inner,
}

enum Inner {
    Bool(BooleanBuilder),
    I16(Int16Builder),
    I32(Int32Builder),
    I64(Int64Builder),
    F32(Float32Builder),
    F64(Float64Builder),
    Dec(Decimal128Builder),
    Str(StringBuilder),
    Bin(BinaryBuilder),
    Uuid(FixedSizeBinaryBuilder),
    Date(Date32Builder),
    Time(Time64MicrosecondBuilder),
    Ts(TimestampMicrosecondBuilder),
    /// months, days, microseconds, validity.
    Interval(Vec<i32>, Vec<i32>, Vec<i64>, Vec<bool>),
    /// Elements, list offsets and list validity.
    List(Box<ValueBuilder>, Vec<i32>, Vec<bool>),
}

/// The text did not fit the column's Arrow type; the caller keeps the exact text instead.
#[derive(Debug, PartialEq, Eq)]
pub struct DoesNotFit;

impl ValueBuilder {
    pub fn new(kind: &PgKind) -> ValueBuilder {
        let inner = match kind {
            PgKind::Bool => Inner::Bool(BooleanBuilder::new()),
            PgKind::Int2 => Inner::I16(Int16Builder::new()),
            PgKind::Int4 => Inner::I32(Int32Builder::new()),
            PgKind::Int8 => Inner::I64(Int64Builder::new()),
            PgKind::Float4 => Inner::F32(Float32Builder::new()),
            PgKind::Float8 => Inner::F64(Float64Builder::new()),
            PgKind::Decimal { precision, scale } => Inner::Dec(
                Decimal128Builder::new().with_data_type(DataType::Decimal128(*precision, *scale)),
            ),
            PgKind::Text | PgKind::Json => Inner::Str(StringBuilder::new()),
            PgKind::Bytea => Inner::Bin(BinaryBuilder::new()),
            PgKind::Uuid => Inner::Uuid(FixedSizeBinaryBuilder::new(16)),
            PgKind::Date => Inner::Date(Date32Builder::new()),
            PgKind::Time => Inner::Time(Time64MicrosecondBuilder::new()),
            PgKind::Timestamp => Inner::Ts(TimestampMicrosecondBuilder::new()),
            PgKind::TimestampTz => {
                Inner::Ts(TimestampMicrosecondBuilder::new().with_timezone("UTC"))
            }
            PgKind::Interval => Inner::Interval(Vec::new(), Vec::new(), Vec::new(), Vec::new()),
            PgKind::Array(e) => Inner::List(Box::new(ValueBuilder::new(e)), vec![0], Vec::new()),
        };
        ValueBuilder {
            kind: kind.clone(),
            inner,
        }
    }

    pub fn len(&self) -> usize {
        match &self.inner {
            Inner::Bool(b) => b.len(),
            Inner::I16(b) => b.len(),
            Inner::I32(b) => b.len(),
            Inner::I64(b) => b.len(),
            Inner::F32(b) => b.len(),
            Inner::F64(b) => b.len(),
            Inner::Dec(b) => b.len(),
            Inner::Str(b) => b.len(),
            Inner::Bin(b) => b.len(),
            Inner::Uuid(b) => b.len(),
            Inner::Date(b) => b.len(),
            Inner::Time(b) => b.len(),
            Inner::Ts(b) => b.len(),
            Inner::Interval(_, _, _, valid) => valid.len(),
            Inner::List(_, _, valid) => valid.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn append_null(&mut self) {
        match &mut self.inner {
            Inner::Bool(b) => b.append_null(),
            Inner::I16(b) => b.append_null(),
            Inner::I32(b) => b.append_null(),
            Inner::I64(b) => b.append_null(),
            Inner::F32(b) => b.append_null(),
            Inner::F64(b) => b.append_null(),
            Inner::Dec(b) => b.append_null(),
            Inner::Str(b) => b.append_null(),
            Inner::Bin(b) => b.append_null(),
            Inner::Uuid(b) => b.append_null(),
            Inner::Date(b) => b.append_null(),
            Inner::Time(b) => b.append_null(),
            Inner::Ts(b) => b.append_null(),
            Inner::Interval(m, d, us, valid) => {
                m.push(0);
                d.push(0);
                us.push(0);
                valid.push(false);
            }
            Inner::List(e, offsets, valid) => {
                offsets.push(e.len() as i32);
                valid.push(false);
            }
        }
    }

    /// Append the value PostgreSQL printed as `text`. On [`DoesNotFit`] nothing was appended.
    pub fn append_text(&mut self, text: &str) -> Result<(), DoesNotFit> {
        match &mut self.inner {
            Inner::Bool(b) => b.append_value(match text {
                "t" => true,
                "f" => false,
                _ => return Err(DoesNotFit),
            }),
            Inner::I16(b) => b.append_value(text.parse().map_err(|_| DoesNotFit)?),
            Inner::I32(b) => b.append_value(text.parse().map_err(|_| DoesNotFit)?),
            Inner::I64(b) => b.append_value(text.parse().map_err(|_| DoesNotFit)?),
            Inner::F32(b) => b.append_value(parse_float(text)?),
            Inner::F64(b) => b.append_value(parse_float(text)?),
            Inner::Dec(b) => {
                let PgKind::Decimal { precision, scale } = self.kind else {
                    return Err(DoesNotFit);
                };
                b.append_value(parse_decimal(text, precision, scale)?)
            }
            Inner::Str(b) => b.append_value(text),
            Inner::Bin(b) => b.append_value(parse_bytea(text)?),
            Inner::Uuid(b) => b.append_value(parse_uuid(text)?).map_err(|_| DoesNotFit)?,
            Inner::Date(b) => b.append_value(parse_date(text)?),
            Inner::Time(b) => b.append_value(parse_time(text)?),
            Inner::Ts(b) => {
                b.append_value(parse_timestamp(text, self.kind == PgKind::TimestampTz)?)
            }
            Inner::Interval(m, d, us, valid) => {
                let v = parse_interval(text)?;
                m.push(v.months);
                d.push(v.days);
                us.push(v.nanoseconds / 1000);
                valid.push(true);
            }
            Inner::List(e, offsets, valid) => {
                let elements = parse_array(text)?;
                // Check every element first so that a refused array appends nothing.
                let mut probe = ValueBuilder::new(&e.kind);
                for t in elements.iter().flatten() {
                    probe.append_text(t)?;
                }
                for el in &elements {
                    match el {
                        Some(t) => e.append_text(t)?,
                        None => e.append_null(),
                    }
                }
                offsets.push(e.len() as i32);
                valid.push(true);
            }
        }
        Ok(())
    }

    pub fn finish(&mut self) -> ArrayRef {
        match &mut self.inner {
            Inner::Bool(b) => Arc::new(b.finish()),
            Inner::I16(b) => Arc::new(b.finish()),
            Inner::I32(b) => Arc::new(b.finish()),
            Inner::I64(b) => Arc::new(b.finish()),
            Inner::F32(b) => Arc::new(b.finish()),
            Inner::F64(b) => Arc::new(b.finish()),
            Inner::Dec(b) => Arc::new(b.finish()),
            Inner::Str(b) => Arc::new(b.finish()),
            Inner::Bin(b) => Arc::new(b.finish()),
            Inner::Uuid(b) => Arc::new(b.finish()),
            Inner::Date(b) => Arc::new(b.finish()),
            Inner::Time(b) => Arc::new(b.finish()),
            Inner::Ts(b) => Arc::new(b.finish()),
            Inner::Interval(m, d, us, valid) => {
                let columns: Vec<ArrayRef> = vec![
                    Arc::new(Int32Array::from(std::mem::take(m))),
                    Arc::new(Int32Array::from(std::mem::take(d))),
                    Arc::new(Int64Array::from(std::mem::take(us))),
                ];
                let nulls = std::mem::take(valid).into();
                Arc::new(StructArray::new(interval_fields(), columns, Some(nulls)))
            }
            Inner::List(e, offsets, valid) => {
                let values = e.finish();
                let offsets = OffsetBuffer::new(std::mem::replace(offsets, vec![0]).into());
                let nulls = std::mem::take(valid).into();
                let PgKind::Array(ek) = &self.kind else {
                    unreachable!("list builder of a non-array kind")
                };
                let field = Arc::new(Field::new("element", ek.arrow_type(), true));
                Arc::new(ListArray::new(field, offsets, values, Some(nulls)))
            }
        }
    }
}

fn parse_float<F: std::str::FromStr>(text: &str) -> Result<F, DoesNotFit> {
    // Rust reads "NaN", "Infinity" and "-Infinity" the way PostgreSQL prints them.
    text.parse().map_err(|_| DoesNotFit)
}

fn parse_decimal(text: &str, precision: u8, scale: i8) -> Result<i128, DoesNotFit> {
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    let scale = usize::try_from(scale).map_err(|_| DoesNotFit)?;
    if int.is_empty()
        || frac.len() > scale
        || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit())
    {
        return Err(DoesNotFit);
    }
    let significant = int.trim_start_matches('0').len() + scale;
    if significant > usize::from(precision) {
        return Err(DoesNotFit);
    }
    let mut v: i128 = 0;
    for b in int.bytes().chain(frac.bytes()) {
        v = v
            .checked_mul(10)
            .and_then(|v| v.checked_add(i128::from(b - b'0')))
            .ok_or(DoesNotFit)?;
    }
    for _ in frac.len()..scale {
        v = v.checked_mul(10).ok_or(DoesNotFit)?;
    }
    Ok(if negative { -v } else { v })
}

fn parse_bytea(text: &str) -> Result<Vec<u8>, DoesNotFit> {
    let hex = text.strip_prefix("\\x").ok_or(DoesNotFit)?.as_bytes();
    if hex.len() % 2 != 0 {
        return Err(DoesNotFit);
    }
    hex.chunks(2)
        .map(|pair| Ok(hex_val(pair[0])? << 4 | hex_val(pair[1])?))
        .collect()
}

fn hex_val(b: u8) -> Result<u8, DoesNotFit> {
    match b {
        b'0'..=b'9' => Ok(b - b'0'),
        b'a'..=b'f' => Ok(b - b'a' + 10),
        b'A'..=b'F' => Ok(b - b'A' + 10),
        _ => Err(DoesNotFit),
    }
}

fn parse_uuid(text: &str) -> Result<[u8; 16], DoesNotFit> {
    let hex: Vec<u8> = text.bytes().filter(|&b| b != b'-').collect();
    if hex.len() != 32 || text.len() != 36 {
        return Err(DoesNotFit);
    }
    let mut out = [0u8; 16];
    for (i, pair) in hex.chunks(2).enumerate() {
        out[i] = hex_val(pair[0])? << 4 | hex_val(pair[1])?;
    }
    Ok(out)
}

/// Days from 1970-01-01 of a proleptic Gregorian date (astronomical year: 1 BC is year 0).
pub fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The inverse of [`days_from_civil`].
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// `YYYY-MM-DD` (the year may have more than four digits) into days from 1970, with the
/// year given as written and `bc` saying whether " BC" followed.
fn parse_ymd(text: &str, bc: bool) -> Result<i64, DoesNotFit> {
    let mut parts = text.splitn(3, '-');
    let y: i64 = parts
        .next()
        .ok_or(DoesNotFit)?
        .parse()
        .map_err(|_| DoesNotFit)?;
    let m: u32 = parts
        .next()
        .ok_or(DoesNotFit)?
        .parse()
        .map_err(|_| DoesNotFit)?;
    let d: u32 = parts
        .next()
        .ok_or(DoesNotFit)?
        .parse()
        .map_err(|_| DoesNotFit)?;
    if y < 1 || !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return Err(DoesNotFit);
    }
    let year = if bc { 1 - y } else { y };
    Ok(days_from_civil(year, m, d))
}

fn strip_bc(text: &str) -> (&str, bool) {
    match text.strip_suffix(" BC") {
        Some(rest) => (rest, true),
        None => (text, false),
    }
}

fn parse_date(text: &str) -> Result<i32, DoesNotFit> {
    // PostgreSQL's own sentinels for ±infinity are the extremes of its date range, which no
    // finite date reaches.
    match text {
        "infinity" => return Ok(i32::MAX),
        "-infinity" => return Ok(i32::MIN),
        _ => {}
    }
    let (ymd, bc) = strip_bc(text);
    let days = parse_ymd(ymd, bc)?;
    i32::try_from(days)
        .ok()
        .filter(|d| *d != i32::MAX && *d != i32::MIN)
        .ok_or(DoesNotFit)
}

/// `HH:MM:SS[.ffffff]` into microseconds (hours may exceed 24 only in intervals).
fn parse_hms(text: &str) -> Result<i64, DoesNotFit> {
    let mut parts = text.splitn(3, ':');
    let h: i64 = parts
        .next()
        .ok_or(DoesNotFit)?
        .parse()
        .map_err(|_| DoesNotFit)?;
    let m: i64 = parts
        .next()
        .ok_or(DoesNotFit)?
        .parse()
        .map_err(|_| DoesNotFit)?;
    let s = parts.next().ok_or(DoesNotFit)?;
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs: i64 = secs.parse().map_err(|_| DoesNotFit)?;
    if !(0..60).contains(&m) || !(0..=60).contains(&secs) || h < 0 || frac.len() > 6 {
        return Err(DoesNotFit);
    }
    let mut micros: i64 = if frac.is_empty() {
        0
    } else {
        frac.parse().map_err(|_| DoesNotFit)?
    };
    for _ in frac.len()..6 {
        micros *= 10;
    }
    h.checked_mul(3_600_000_000)
        .and_then(|v| v.checked_add(m * 60_000_000 + secs * 1_000_000 + micros))
        .ok_or(DoesNotFit)
}

fn parse_time(text: &str) -> Result<i64, DoesNotFit> {
    let v = parse_hms(text)?;
    // 24:00:00 is a valid PostgreSQL time but outside Arrow's time-of-day range.
    if v >= MICROS_PER_DAY {
        Err(DoesNotFit)
    } else {
        Ok(v)
    }
}

fn parse_timestamp(text: &str, with_zone: bool) -> Result<i64, DoesNotFit> {
    match text {
        "infinity" => return Ok(i64::MAX),
        "-infinity" => return Ok(i64::MIN),
        _ => {}
    }
    let (text, bc) = strip_bc(text);
    let (date, time) = text.split_once(' ').ok_or(DoesNotFit)?;
    let (time, offset_us) = if with_zone {
        let at = time.rfind(['+', '-']).ok_or(DoesNotFit)?;
        let (t, off) = time.split_at(at);
        let sign = if off.starts_with('-') { -1 } else { 1 };
        let mut fields = off[1..].split(':');
        let mut secs = 0i64;
        for unit in [3600, 60, 1] {
            if let Some(f) = fields.next() {
                secs += unit * f.parse::<i64>().map_err(|_| DoesNotFit)?;
            }
        }
        (t, sign * secs * 1_000_000)
    } else {
        (time, 0)
    };
    let days = parse_ymd(date, bc)?;
    let tod = parse_hms(time)?;
    let v = days
        .checked_mul(MICROS_PER_DAY)
        .and_then(|v| v.checked_add(tod))
        .and_then(|v| v.checked_sub(offset_us))
        .ok_or(DoesNotFit)?;
    if v == i64::MAX || v == i64::MIN {
        Err(DoesNotFit)
    } else {
        Ok(v)
    }
}

/// An interval in `IntervalStyle=postgres`: `1 year 2 mons -3 days +04:05:06.5`.
fn parse_interval(text: &str) -> Result<IntervalMonthDayNano, DoesNotFit> {
    let mut months: i64 = 0;
    let mut days: i64 = 0;
    let mut micros: i64 = 0;
    let mut words = text.split(' ').peekable();
    while let Some(w) = words.next() {
        if w.contains(':') {
            let (sign, hms) = match w.as_bytes().first() {
                Some(b'-') => (-1, &w[1..]),
                Some(b'+') => (1, &w[1..]),
                _ => (1, w),
            };
            micros = micros
                .checked_add(sign * parse_hms(hms)?)
                .ok_or(DoesNotFit)?;
            continue;
        }
        let n: i64 = w.parse().map_err(|_| DoesNotFit)?;
        match words.next().ok_or(DoesNotFit)? {
            "year" | "years" => {
                months = months
                    .checked_add(n.checked_mul(12).ok_or(DoesNotFit)?)
                    .ok_or(DoesNotFit)?
            }
            "mon" | "mons" => months = months.checked_add(n).ok_or(DoesNotFit)?,
            "day" | "days" => days = days.checked_add(n).ok_or(DoesNotFit)?,
            _ => return Err(DoesNotFit),
        }
    }
    Ok(IntervalMonthDayNano {
        months: i32::try_from(months).map_err(|_| DoesNotFit)?,
        days: i32::try_from(days).map_err(|_| DoesNotFit)?,
        nanoseconds: micros.checked_mul(1000).ok_or(DoesNotFit)?,
    })
}

/// The elements of a one-dimensional PostgreSQL array literal (`None` for NULL). Arrays with
/// explicit bounds or more than one dimension do not fit a flat list.
pub fn parse_array(text: &str) -> Result<Vec<Option<String>>, DoesNotFit> {
    let inner = text
        .strip_prefix('{')
        .and_then(|t| t.strip_suffix('}'))
        .ok_or(DoesNotFit)?;
    let mut out = Vec::new();
    if inner.is_empty() {
        return Ok(out);
    }
    let mut chars = inner.chars().peekable();
    loop {
        let mut value = String::new();
        let mut quoted = false;
        if chars.peek() == Some(&'"') {
            quoted = true;
            chars.next();
            loop {
                match chars.next().ok_or(DoesNotFit)? {
                    '"' => break,
                    '\\' => value.push(chars.next().ok_or(DoesNotFit)?),
                    c => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                match c {
                    ',' => break,
                    '{' | '}' | '"' => return Err(DoesNotFit),
                    '\\' => {
                        chars.next();
                        value.push(chars.next().ok_or(DoesNotFit)?);
                    }
                    c => {
                        value.push(c);
                        chars.next();
                    }
                }
            }
        }
        out.push(if !quoted && value.eq_ignore_ascii_case("NULL") {
            None
        } else {
            Some(value)
        });
        match chars.next() {
            None => return Ok(out),
            Some(',') => {}
            Some(_) => return Err(DoesNotFit),
        }
    }
}

/// Render row `i` of `array` (of `kind`) as text that PostgreSQL reads back as the same
/// value of the column's type; `None` for SQL NULL.
pub fn render(kind: &PgKind, array: &dyn Array, i: usize) -> Option<String> {
    if array.is_null(i) {
        return None;
    }
    Some(match kind {
        PgKind::Bool => if array.as_boolean().value(i) {
            "t"
        } else {
            "f"
        }
        .to_string(),
        PgKind::Int2 => array.as_primitive::<Int16Type>().value(i).to_string(),
        PgKind::Int4 => array.as_primitive::<Int32Type>().value(i).to_string(),
        PgKind::Int8 => array.as_primitive::<Int64Type>().value(i).to_string(),
        PgKind::Float4 => render_float(
            f64::from(array.as_primitive::<Float32Type>().value(i)),
            || array.as_primitive::<Float32Type>().value(i).to_string(),
        ),
        PgKind::Float8 => {
            let v = array.as_primitive::<Float64Type>().value(i);
            render_float(v, || v.to_string())
        }
        PgKind::Decimal { scale, .. } => render_decimal(
            array.as_primitive::<Decimal128Type>().value(i),
            usize::try_from(*scale).unwrap_or(0),
        ),
        PgKind::Text | PgKind::Json => array.as_string::<i32>().value(i).to_string(),
        PgKind::Bytea => {
            let bytes = array.as_binary::<i32>().value(i);
            let mut s = String::with_capacity(2 + bytes.len() * 2);
            s.push_str("\\x");
            for b in bytes {
                s.push_str(&format!("{b:02x}"));
            }
            s
        }
        PgKind::Uuid => {
            let b = array.as_fixed_size_binary().value(i);
            let hex: String = b.iter().map(|b| format!("{b:02x}")).collect();
            format!(
                "{}-{}-{}-{}-{}",
                &hex[0..8],
                &hex[8..12],
                &hex[12..16],
                &hex[16..20],
                &hex[20..32]
            )
        }
        PgKind::Date => render_date(array.as_primitive::<Date32Type>().value(i)),
        PgKind::Time => render_hms(array.as_primitive::<Time64MicrosecondType>().value(i)),
        PgKind::Timestamp | PgKind::TimestampTz => render_timestamp(
            array.as_primitive::<TimestampMicrosecondType>().value(i),
            *kind == PgKind::TimestampTz,
        ),
        PgKind::Interval => {
            let s = array.as_struct();
            let months = s.column(0).as_primitive::<Int32Type>().value(i);
            let days = s.column(1).as_primitive::<Int32Type>().value(i);
            let micros = s.column(2).as_primitive::<Int64Type>().value(i);
            let sign = if micros < 0 { "-" } else { "" };
            format!(
                "{months} mons {days} days {sign}{}",
                render_hms(micros.unsigned_abs() as i64)
            )
        }
        PgKind::Array(ek) => {
            let list = array.as_list::<i32>().value(i);
            let items: Vec<String> = (0..list.len())
                .map(|j| match render(ek, &list, j) {
                    None => "NULL".to_string(),
                    Some(t) => format!("\"{}\"", t.replace('\\', "\\\\").replace('"', "\\\"")),
                })
                .collect();
            format!("{{{}}}", items.join(","))
        }
    })
}

fn render_float(v: f64, shortest: impl FnOnce() -> String) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v == f64::INFINITY {
        "Infinity".into()
    } else if v == f64::NEG_INFINITY {
        "-Infinity".into()
    } else {
        // Rust prints the shortest decimal that reads back as the same float.
        shortest()
    }
}

fn render_decimal(v: i128, scale: usize) -> String {
    let digits = v.unsigned_abs().to_string();
    let digits = format!("{digits:0>width$}", width = scale + 1);
    let (int, frac) = digits.split_at(digits.len() - scale);
    let sign = if v < 0 { "-" } else { "" };
    if scale == 0 {
        format!("{sign}{int}")
    } else {
        format!("{sign}{int}.{frac}")
    }
}

fn render_ymd(days: i64) -> String {
    let (year, m, d) = civil_from_days(days);
    if year <= 0 {
        format!("{:04}-{m:02}-{d:02} BC", 1 - year)
    } else {
        format!("{year:04}-{m:02}-{d:02}")
    }
}

fn render_date(days: i32) -> String {
    match days {
        i32::MAX => "infinity".into(),
        i32::MIN => "-infinity".into(),
        d => render_ymd(i64::from(d)),
    }
}

fn render_hms(micros: i64) -> String {
    let (h, rest) = (micros / 3_600_000_000, micros % 3_600_000_000);
    let (m, rest) = (rest / 60_000_000, rest % 60_000_000);
    let (s, us) = (rest / 1_000_000, rest % 1_000_000);
    if us == 0 {
        format!("{h:02}:{m:02}:{s:02}")
    } else {
        format!("{h:02}:{m:02}:{s:02}.{us:06}")
    }
}

/// Microseconds since the Unix epoch as `YYYY-MM-DD HH:MM:SS.ffffff+00` (always six fraction
/// digits; for people reading status lines and messages).
pub fn format_utc_micros(micros: i64) -> String {
    let (year, m, d) = civil_from_days(micros.div_euclid(MICROS_PER_DAY));
    let tod = micros.rem_euclid(MICROS_PER_DAY);
    let (h, min, s, us) = (
        tod / 3_600_000_000,
        tod / 60_000_000 % 60,
        tod / 1_000_000 % 60,
        tod % 1_000_000,
    );
    format!("{year:04}-{m:02}-{d:02} {h:02}:{min:02}:{s:02}.{us:06}+00")
}

fn render_timestamp(micros: i64, with_zone: bool) -> String {
    match micros {
        i64::MAX => return "infinity".into(),
        i64::MIN => return "-infinity".into(),
        _ => {}
    }
    let days = micros.div_euclid(MICROS_PER_DAY);
    let tod = micros.rem_euclid(MICROS_PER_DAY);
    let (year, m, d) = civil_from_days(days);
    let zone = if with_zone { "+00" } else { "" };
    let (y, bc) = if year <= 0 {
        (1 - year, " BC")
    } else {
        (year, "")
    };
    format!("{y:04}-{m:02}-{d:02} {}{zone}{bc}", render_hms(tod))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_format_as_utc() {
        assert_eq!(format_utc_micros(0), "1970-01-01 00:00:00.000000+00");
        assert_eq!(
            format_utc_micros(1_795_000_000_123_456),
            "2026-11-18 11:06:40.123456+00"
        );
        assert_eq!(format_utc_micros(-1), "1969-12-31 23:59:59.999999+00");
    }

    fn round_trip(kind: &PgKind, text: &str) -> Option<String> {
        let mut b = ValueBuilder::new(kind);
        b.append_text(text).ok()?;
        let a = b.finish();
        render(kind, a.as_ref(), 0)
    }

    #[test]
    fn postgres_text_round_trips_through_arrow() {
        let cases: &[(PgKind, &str, &str)] = &[
            (PgKind::Int8, "-9223372036854775808", "-9223372036854775808"),
            (PgKind::Float8, "1e+300", &format!("1{}", "0".repeat(300))),
            (PgKind::Float8, "NaN", "NaN"),
            (PgKind::Float4, "-Infinity", "-Infinity"),
            (PgKind::Float4, "0.1", "0.1"),
            (
                PgKind::Decimal {
                    precision: 12,
                    scale: 2,
                },
                "-0.05",
                "-0.05",
            ),
            (
                PgKind::Decimal {
                    precision: 12,
                    scale: 2,
                },
                "1234567890.10",
                "1234567890.10",
            ),
            (PgKind::Bytea, "\\x00ff10", "\\x00ff10"),
            (
                PgKind::Uuid,
                "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
                "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            ),
            (PgKind::Date, "0044-03-15 BC", "0044-03-15 BC"),
            (PgKind::Date, "2026-02-28", "2026-02-28"),
            (PgKind::Date, "infinity", "infinity"),
            (PgKind::Time, "23:59:59.999999", "23:59:59.999999"),
            (
                PgKind::Timestamp,
                "1999-12-31 23:59:59.5",
                "1999-12-31 23:59:59.500000",
            ),
            (
                PgKind::TimestampTz,
                "2026-11-20 12:00:00+00",
                "2026-11-20 12:00:00+00",
            ),
            (
                PgKind::TimestampTz,
                "0001-01-01 00:00:00+00 BC",
                "0001-01-01 00:00:00+00 BC",
            ),
            (PgKind::TimestampTz, "-infinity", "-infinity"),
            (
                PgKind::TimestampTz,
                "10000-01-01 00:00:00+00",
                "10000-01-01 00:00:00+00",
            ),
            (
                PgKind::Interval,
                "1 year 2 mons -3 days +04:05:06.5",
                "14 mons -3 days 04:05:06.500000",
            ),
            (PgKind::Interval, "-00:00:01", "0 mons 0 days -00:00:01"),
            (
                PgKind::Array(Box::new(PgKind::Int4)),
                "{1,NULL,-3}",
                "{\"1\",NULL,\"-3\"}",
            ),
            (
                PgKind::Array(Box::new(PgKind::Text)),
                "{\"a b\",\"q\\\"u\",NULL,\"NULL\"}",
                "{\"a b\",\"q\\\"u\",NULL,\"NULL\"}",
            ),
            (PgKind::Array(Box::new(PgKind::Int4)), "{}", "{}"),
        ];
        for (kind, input, expected) in cases {
            assert_eq!(
                round_trip(kind, input).as_deref(),
                Some(*expected),
                "{kind:?} {input}"
            );
        }
    }

    #[test]
    fn values_that_do_not_fit_are_refused_not_mangled() {
        let refused: &[(PgKind, &str)] = &[
            (
                PgKind::Decimal {
                    precision: 5,
                    scale: 2,
                },
                "NaN",
            ),
            (
                PgKind::Decimal {
                    precision: 5,
                    scale: 2,
                },
                "1234.5",
            ),
            (PgKind::Time, "24:00:00"),
            (PgKind::Array(Box::new(PgKind::Int4)), "{{1,2},{3,4}}"),
            (PgKind::Array(Box::new(PgKind::Int4)), "[0:1]={1,2}"),
            (PgKind::Array(Box::new(PgKind::Int4)), "{1,x}"),
            (PgKind::Bool, "yes"),
        ];
        for (kind, input) in refused {
            let mut b = ValueBuilder::new(kind);
            assert_eq!(b.append_text(input), Err(DoesNotFit), "{kind:?} {input}");
            assert_eq!(b.len(), 0, "a refused value appends nothing");
        }
    }

    #[test]
    fn numeric_type_modifiers_decode() {
        // numeric(12,2): ((12 << 16) | 2) + 4
        assert_eq!(
            PgKind::of(1700, (12 << 16 | 2) + 4),
            PgKind::Decimal {
                precision: 12,
                scale: 2
            }
        );
        assert_eq!(PgKind::of(1700, -1), PgKind::Text);
        assert_eq!(PgKind::of(1700, (50 << 16) + 4), PgKind::Text);
        assert_eq!(
            PgKind::of(1231, (5 << 16 | 1) + 4),
            PgKind::Array(Box::new(PgKind::Decimal {
                precision: 5,
                scale: 1
            }))
        );
    }

    #[test]
    fn calendar_conversion_agrees_both_ways_over_a_wide_range() {
        for days in (-3_000_000..3_000_000).step_by(997) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
    }
}
