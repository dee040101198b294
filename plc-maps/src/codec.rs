//! Turning raw Modbus registers and bits into values and back.

use std::fmt;

use serde::Serialize;

use crate::error::MapError;
use crate::schema::{DataType, Point};

/// A decoded point value.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Value {
    /// A bool point (coil, discrete input, or register where nonzero is true).
    Bool(bool),
    /// An unscaled unsigned integer (`u16`, `u32`, `u64`).
    U64(u64),
    /// An unscaled signed integer (`i16`, `i32`).
    I64(i64),
    /// A scaled value, or an `f32`.
    F64(f64),
    /// An integer point whose code is listed in its `enum` table. Codes not in the table
    /// decode as plain integers.
    Enum {
        /// The raw code.
        code: u16,
        /// Its label from the map.
        label: String,
    },
}

impl Value {
    /// The value as an unsigned integer: `U64`, an enum code, or a non-negative `I64`.
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Value::U64(v) => Some(*v),
            Value::I64(v) => u64::try_from(*v).ok(),
            Value::Enum { code, .. } => Some(u64::from(*code)),
            Value::Bool(_) | Value::F64(_) => None,
        }
    }

    /// The value as a float (bools are 0.0 / 1.0, enums their code).
    pub fn as_f64(&self) -> f64 {
        match self {
            Value::Bool(b) => f64::from(u8::from(*b)),
            Value::U64(v) => *v as f64,
            Value::I64(v) => *v as f64,
            Value::F64(v) => *v,
            Value::Enum { code, .. } => f64::from(*code),
        }
    }

    /// The value as a bool, if it is one.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// The enum label, if the value is an enum.
    pub fn label(&self) -> Option<&str> {
        match self {
            Value::Enum { label, .. } => Some(label),
            _ => None,
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Bool(b) => write!(f, "{b}"),
            Value::U64(v) => write!(f, "{v}"),
            Value::I64(v) => write!(f, "{v}"),
            Value::F64(v) => write!(f, "{v}"),
            Value::Enum { code, label } => write!(f, "{label} ({code})"),
        }
    }
}

/// Decode a point from the registers starting at its address (`words[0]` is the
/// register at `point.address`; extra trailing words are ignored). The words of a
/// multi-register value are un-shuffled according to the point's word order (single
/// registers are always plain big-endian), then interpreted as its type;
/// an `enum` label or `scale` is applied last.
///
/// Bit points (coils, discrete inputs) may be decoded here too, from one word holding 0
/// or 1; see [`decode_bits`] for bit replies.
pub fn decode(point: &Point, words: &[u16]) -> Result<Value, MapError> {
    let needed = usize::from(point.width());
    let Some(words) = words.get(..needed) else {
        return Err(MapError::ShortData { point: point.name.clone(), needed, got: words.len(), unit: "registers" });
    };
    if point.kind.is_bit() {
        return Ok(Value::Bool(words[0] != 0));
    }
    let mut canonical = words.to_vec();
    if canonical.len() > 1 {
        point.word_order.reorder(&mut canonical);
    }
    let raw = canonical.iter().fold(0u64, |acc, w| (acc << 16) | u64::from(*w));
    Ok(interpret(point, raw))
}

/// Decode a bit point (coil or discrete input) from the bits starting at its address
/// (`bits[0]` is the bit at `point.address`).
pub fn decode_bits(point: &Point, bits: &[bool]) -> Result<Value, MapError> {
    if !point.kind.is_bit() {
        return Err(MapError::DataKind { point: point.name.clone(), kind: point.kind, expected: "registers" });
    }
    match bits.first() {
        Some(b) => Ok(Value::Bool(*b)),
        None => Err(MapError::ShortData { point: point.name.clone(), needed: 1, got: 0, unit: "bits" }),
    }
}

/// Interpret a canonical (big-endian) raw value as the point's type.
fn interpret(point: &Point, raw: u64) -> Value {
    // Truncating casts are intended: `raw` holds exactly `ty.bits()` significant bits.
    let number = match point.ty {
        DataType::Bool => return Value::Bool(raw != 0),
        DataType::U16 | DataType::U32 | DataType::U64 => Value::U64(raw),
        DataType::I16 => Value::I64(i64::from(raw as u16 as i16)),
        DataType::I32 => Value::I64(i64::from(raw as u32 as i32)),
        DataType::F32 => Value::F64(f64::from(f32::from_bits(raw as u32))),
    };
    if !point.enum_values.is_empty() {
        let code = match number {
            Value::U64(v) => u16::try_from(v).ok(),
            Value::I64(v) => u16::try_from(v).ok(),
            _ => None,
        };
        if let Some((code, label)) = code.and_then(|c| point.enum_values.get_key_value(&c)) {
            return Value::Enum { code: *code, label: label.clone() };
        }
    }
    match point.scale {
        Some(scale) => Value::F64(number.as_f64() * scale),
        None => number,
    }
}

/// Encode a value for a point as the registers to write at its address, in the point's
/// word order. This is the exact inverse of [`decode`]: scaled points take the
/// engineering value and divide by `scale` (rounding to the nearest raw integer), enum
/// points take an [`Value::Enum`] or a plain code. Integer values must fit the type.
///
/// Bit points encode to one word, 0 or 1. Writability is not checked here (the
/// simulator uses this to serve every point); see [`crate::RegisterMap::write_request`].
pub fn encode(point: &Point, value: &Value) -> Result<Vec<u16>, MapError> {
    let fail = |reason: &str| MapError::Encode {
        point: point.name.clone(),
        value: value.to_string(),
        ty: point.ty,
        reason: reason.to_owned(),
    };
    if point.kind.is_bit() || point.ty == DataType::Bool {
        let bit = encode_bool(value).ok_or_else(|| fail("expected a bool (or 0/1)"))?;
        return Ok(vec![u16::from(bit)]);
    }

    let raw: u64 = if point.ty == DataType::F32 {
        let v = match point.scale {
            Some(scale) => value.as_f64() / scale,
            None => value.as_f64(),
        };
        if matches!(value, Value::Bool(_)) {
            return Err(fail("expected a number"));
        }
        let single = v as f32;
        if v.is_finite() && !single.is_finite() {
            return Err(fail("out of range for f32"));
        }
        u64::from(single.to_bits())
    } else {
        let int = match (value, point.scale) {
            (Value::Bool(_), _) => return Err(fail("expected a number")),
            (_, Some(scale)) => float_to_int(value.as_f64() / scale, true),
            (Value::U64(v), None) => Some(i128::from(*v)),
            (Value::I64(v), None) => Some(i128::from(*v)),
            (Value::Enum { code, .. }, None) => Some(i128::from(*code)),
            (Value::F64(v), None) => float_to_int(*v, false),
        }
        .ok_or_else(|| fail("not an integer"))?;
        let (min, max) = point.ty.int_range().unwrap_or((0, 0));
        if int < min || int > max {
            return Err(fail(&format!("outside {min}..={max}")));
        }
        // Two's complement, truncated to the type's width below.
        int as u64
    };

    let n = usize::from(point.ty.registers());
    let mut words: Vec<u16> = (0..n).rev().map(|i| (raw >> (16 * i)) as u16).collect();
    if n > 1 {
        point.word_order.reorder(&mut words);
    }
    Ok(words)
}

/// Encode a value for a bit point (coil or discrete input).
pub fn encode_bits(point: &Point, value: &Value) -> Result<bool, MapError> {
    if !point.kind.is_bit() {
        return Err(MapError::DataKind { point: point.name.clone(), kind: point.kind, expected: "registers" });
    }
    encode_bool(value).ok_or_else(|| MapError::Encode {
        point: point.name.clone(),
        value: value.to_string(),
        ty: point.ty,
        reason: "expected a bool (or 0/1)".to_owned(),
    })
}

fn encode_bool(value: &Value) -> Option<bool> {
    match value {
        Value::Bool(b) => Some(*b),
        Value::U64(0) | Value::I64(0) => Some(false),
        Value::U64(1) | Value::I64(1) => Some(true),
        _ => None,
    }
}

/// A finite float as an integer: rounded to nearest if `round`, else only if integral.
fn float_to_int(v: f64, round: bool) -> Option<i128> {
    if !v.is_finite() {
        return None;
    }
    let r = if round { v.round() } else { v };
    // Beyond ±2^100 nothing fits any type; keep the cast well-defined.
    (r.fract() == 0.0 && r.abs() < 2f64.powi(100)).then_some(r as i128)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{Kind, WordOrder};
    use std::collections::BTreeMap;

    fn point(kind: Kind, ty: DataType, order: WordOrder) -> Point {
        Point {
            name: "p".into(),
            kind,
            address: 0,
            ty,
            role: None,
            scale: None,
            word_order: order,
            writable: false,
            enum_values: BTreeMap::new(),
            unit: None,
            line: 1,
        }
    }

    fn reg(ty: DataType, order: WordOrder) -> Point {
        point(Kind::Holding, ty, order)
    }

    /// Deterministic 64-bit LCG (Knuth's MMIX constants), high bits mixed down.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            self.0 ^ (self.0 >> 29)
        }
    }

    #[test]
    fn known_vectors_u32() {
        let cases = [
            (WordOrder::ABCD, [0x1234, 0x5678]),
            (WordOrder::CDAB, [0x5678, 0x1234]),
            (WordOrder::BADC, [0x3412, 0x7856]),
            (WordOrder::DCBA, [0x7856, 0x3412]),
        ];
        for (order, words) in cases {
            let p = reg(DataType::U32, order);
            assert_eq!(encode(&p, &Value::U64(0x1234_5678)), Ok(words.to_vec()));
            assert_eq!(decode(&p, &words), Ok(Value::U64(0x1234_5678)), "{order}");
        }
    }

    #[test]
    fn known_vectors_f32() {
        // 1.5f32 = 0x3FC00000; -2.5f32 = 0xC0200000
        let cases = [
            (WordOrder::ABCD, 1.5, [0x3FC0, 0x0000]),
            (WordOrder::CDAB, 1.5, [0x0000, 0x3FC0]),
            (WordOrder::BADC, 1.5, [0xC03F, 0x0000]),
            (WordOrder::DCBA, 1.5, [0x0000, 0xC03F]),
            (WordOrder::ABCD, -2.5, [0xC020, 0x0000]),
            (WordOrder::DCBA, -2.5, [0x0000, 0x20C0]),
        ];
        for (order, v, words) in cases {
            let p = reg(DataType::F32, order);
            assert_eq!(encode(&p, &Value::F64(v)), Ok(words.to_vec()));
            assert_eq!(decode(&p, &words), Ok(Value::F64(v)));
        }
        // 123.456f32 = 0x42F6E979
        let p = reg(DataType::F32, WordOrder::CDAB);
        let Ok(Value::F64(v)) = decode(&p, &[0xE979, 0x42F6]) else { panic!("not a float") };
        assert!((v - 123.456).abs() < 1e-4);
    }

    #[test]
    fn known_vectors_u64() {
        let v = Value::U64(0x0102_0304_0506_0708);
        let cases = [
            (WordOrder::ABCD, [0x0102, 0x0304, 0x0506, 0x0708]),
            (WordOrder::CDAB, [0x0708, 0x0506, 0x0304, 0x0102]),
            (WordOrder::BADC, [0x0201, 0x0403, 0x0605, 0x0807]),
            (WordOrder::DCBA, [0x0807, 0x0605, 0x0403, 0x0201]),
        ];
        for (order, words) in cases {
            let p = reg(DataType::U64, order);
            assert_eq!(encode(&p, &v), Ok(words.to_vec()));
            assert_eq!(decode(&p, &words), Ok(v.clone()));
        }
    }

    #[test]
    fn known_vectors_signed_and_16_bit() {
        let p = reg(DataType::I16, WordOrder::ABCD);
        assert_eq!(decode(&p, &[0xFFFE]), Ok(Value::I64(-2)));
        assert_eq!(encode(&p, &Value::I64(-32768)), Ok(vec![0x8000]));
        let p = reg(DataType::I32, WordOrder::CDAB);
        assert_eq!(encode(&p, &Value::I64(-2)), Ok(vec![0xFFFE, 0xFFFF]));
        assert_eq!(decode(&p, &[0x0000, 0x8000]), Ok(Value::I64(i64::from(i32::MIN))));
        // Word order never touches single-register values.
        let p = reg(DataType::U16, WordOrder::DCBA);
        assert_eq!(decode(&p, &[0x1234]), Ok(Value::U64(0x1234)));
    }

    #[test]
    fn bools_in_bits_and_registers() {
        let coil = point(Kind::Coil, DataType::Bool, WordOrder::ABCD);
        assert_eq!(decode_bits(&coil, &[true, false]), Ok(Value::Bool(true)));
        assert_eq!(decode(&coil, &[0]), Ok(Value::Bool(false)));
        assert_eq!(encode_bits(&coil, &Value::Bool(true)), Ok(true));
        assert_eq!(encode(&coil, &Value::U64(1)), Ok(vec![1]));
        let reg_bool = reg(DataType::Bool, WordOrder::ABCD);
        assert_eq!(decode(&reg_bool, &[0x0100]), Ok(Value::Bool(true)));
        assert_eq!(decode(&reg_bool, &[0]), Ok(Value::Bool(false)));
        assert!(decode_bits(&reg_bool, &[true]).is_err());
        assert!(encode_bits(&reg_bool, &Value::Bool(true)).is_err());
        assert!(decode_bits(&coil, &[]).is_err());
        assert!(encode(&coil, &Value::U64(2)).is_err());
    }

    #[test]
    fn short_data_is_an_error_not_a_panic() {
        let p = reg(DataType::U64, WordOrder::ABCD);
        assert_eq!(
            decode(&p, &[1, 2, 3]),
            Err(MapError::ShortData { point: "p".into(), needed: 4, got: 3, unit: "registers" })
        );
        assert!(decode(&reg(DataType::U16, WordOrder::ABCD), &[]).is_err());
    }

    #[test]
    fn scale_and_enum() {
        let mut p = reg(DataType::I16, WordOrder::ABCD);
        p.scale = Some(0.1);
        assert_eq!(decode(&p, &[235]), Ok(Value::F64(235.0 * 0.1)));
        assert_eq!(encode(&p, &Value::F64(23.5)), Ok(vec![235]));
        assert_eq!(encode(&p, &Value::F64(-1.26)), Ok(vec![(-13i16) as u16]));
        assert!(encode(&p, &Value::F64(4000.0)).is_err()); // raw 40000 > i16::MAX

        let mut e = reg(DataType::U16, WordOrder::ABCD);
        e.enum_values.insert(0, "stopped".into());
        e.enum_values.insert(1, "running".into());
        let running = Value::Enum { code: 1, label: "running".into() };
        assert_eq!(decode(&e, &[1]), Ok(running.clone()));
        assert_eq!(decode(&e, &[9]), Ok(Value::U64(9)));
        assert_eq!(encode(&e, &running), Ok(vec![1]));
        assert_eq!(e.enum_code("stopped"), Some(0));
    }

    #[test]
    fn encode_rejects_values_that_do_not_fit() {
        let p = reg(DataType::U16, WordOrder::ABCD);
        assert!(encode(&p, &Value::U64(65536)).is_err());
        assert!(encode(&p, &Value::I64(-1)).is_err());
        assert!(encode(&p, &Value::F64(1.5)).is_err());
        assert!(encode(&p, &Value::F64(f64::NAN)).is_err());
        assert!(encode(&p, &Value::Bool(true)).is_err());
        assert_eq!(encode(&p, &Value::F64(7.0)), Ok(vec![7]));
        let p = reg(DataType::U64, WordOrder::ABCD);
        assert!(encode(&p, &Value::F64(1e30)).is_err());
        assert!(encode(&p, &Value::I64(-5)).is_err());
        let f = reg(DataType::F32, WordOrder::ABCD);
        assert!(encode(&f, &Value::F64(1e300)).is_err());
        assert!(encode(&f, &Value::Bool(false)).is_err());
    }

    /// Every word pattern decodes and re-encodes to itself, for every type and order.
    #[test]
    fn property_words_round_trip() {
        let mut rng = Lcg(0x5eed);
        for ty in DataType::ALL {
            for order in WordOrder::ALL {
                let p = reg(ty, order);
                for _ in 0..2000 {
                    let mut words: Vec<u16> = (0..ty.registers()).map(|_| rng.next() as u16).collect();
                    if ty == DataType::Bool {
                        words[0] &= 1;
                    }
                    let value = decode(&p, &words).expect("decode");
                    if matches!(value, Value::F64(v) if v.is_nan()) {
                        continue; // NaN payloads need not survive f64 widening
                    }
                    assert_eq!(encode(&p, &value), Ok(words.clone()), "{ty} {order}");
                }
            }
        }
    }

    /// Every representable value encodes and decodes back to itself, for every type and
    /// order, with and without scale.
    #[test]
    fn property_values_round_trip() {
        let mut rng = Lcg(42);
        let scales = [None, Some(0.1), Some(0.01), Some(0.5), Some(2.0), Some(10.0)];
        for ty in DataType::ALL {
            for order in WordOrder::ALL {
                for scale in scales {
                    if ty == DataType::Bool && scale.is_some() {
                        continue;
                    }
                    let mut p = reg(ty, order);
                    p.scale = scale;
                    for _ in 0..500 {
                        let r = rng.next();
                        let raw = match ty {
                            DataType::Bool => Value::Bool(r & 1 == 1),
                            DataType::U16 => Value::U64(r & 0xFFFF),
                            DataType::I16 => Value::I64(i64::from(r as u16 as i16)),
                            DataType::U32 => Value::U64(r & 0xFFFF_FFFF),
                            DataType::I32 => Value::I64(i64::from(r as u32 as i32)),
                            // Scaled u64 goes through f64: keep within exact range.
                            DataType::U64 if scale.is_some() => Value::U64(r >> 14),
                            DataType::U64 => Value::U64(r),
                            DataType::F32 => {
                                let f = f32::from_bits(r as u32);
                                if !f.is_finite() {
                                    continue;
                                }
                                Value::F64(f64::from(f))
                            }
                        };
                        // A scaled point is written in engineering units.
                        let value = match scale {
                            Some(s) => Value::F64(raw.as_f64() * s),
                            None => raw,
                        };
                        let words = encode(&p, &value).expect("encode");
                        assert_eq!(words.len(), usize::from(ty.registers()));
                        let back = decode(&p, &words).expect("decode");
                        assert_eq!(back, value, "{ty} {order} {scale:?}");
                    }
                }
            }
        }
    }
}
