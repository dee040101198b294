//! Sparkplug B 3.0 payload messages (`org.eclipse.tahu.protobuf.Payload`), written from the
//! field list in the specification (chapter 6, "Payload"), proto2 encoding.
//!
//! Only what the MES reads or writes is declared: the payload's timestamp, metrics, seq,
//! uuid and body, and each metric's name, alias, timestamp, datatype, flags and scalar
//! value. Undeclared fields (metadata, properties, data sets, templates, extensions) are
//! skipped by the decoder as protobuf prescribes for unknown fields.

/// Sparkplug B datatype codes (specification §6.4.16).
pub mod datatype {
    pub const INT8: u32 = 1;
    pub const INT16: u32 = 2;
    pub const INT32: u32 = 3;
    pub const INT64: u32 = 4;
    pub const UINT8: u32 = 5;
    pub const UINT16: u32 = 6;
    pub const UINT32: u32 = 7;
    pub const UINT64: u32 = 8;
    pub const FLOAT: u32 = 9;
    pub const DOUBLE: u32 = 10;
    pub const BOOLEAN: u32 = 11;
    pub const STRING: u32 = 12;
    pub const DATETIME: u32 = 13;
    pub const TEXT: u32 = 14;
}

/// `Payload`: tags 1-5 (extensions from 6 are not used).
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct Payload {
    #[prost(uint64, optional, tag = "1")]
    pub timestamp: Option<u64>,
    #[prost(message, repeated, tag = "2")]
    pub metrics: Vec<Metric>,
    #[prost(uint64, optional, tag = "3")]
    pub seq: Option<u64>,
    #[prost(string, optional, tag = "4")]
    pub uuid: Option<String>,
    #[prost(bytes = "vec", optional, tag = "5")]
    pub body: Option<Vec<u8>>,
}

/// `Payload.Metric`: tags 1-7 and the scalar members of the `value` oneof (10-16).
/// `metadata` (8), `properties` (9) and the data set, template and extension values
/// (17-19) are not declared.
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct Metric {
    #[prost(string, optional, tag = "1")]
    pub name: Option<String>,
    #[prost(uint64, optional, tag = "2")]
    pub alias: Option<u64>,
    #[prost(uint64, optional, tag = "3")]
    pub timestamp: Option<u64>,
    #[prost(uint32, optional, tag = "4")]
    pub datatype: Option<u32>,
    #[prost(bool, optional, tag = "5")]
    pub is_historical: Option<bool>,
    #[prost(bool, optional, tag = "6")]
    pub is_transient: Option<bool>,
    #[prost(bool, optional, tag = "7")]
    pub is_null: Option<bool>,
    #[prost(oneof = "Value", tags = "10, 11, 12, 13, 14, 15, 16")]
    pub value: Option<Value>,
}

/// The scalar members of `Metric.value`.
#[derive(Clone, PartialEq, ::prost::Oneof)]
pub enum Value {
    #[prost(uint32, tag = "10")]
    IntValue(u32),
    #[prost(uint64, tag = "11")]
    LongValue(u64),
    #[prost(float, tag = "12")]
    FloatValue(f32),
    #[prost(double, tag = "13")]
    DoubleValue(f64),
    #[prost(bool, tag = "14")]
    BooleanValue(bool),
    #[prost(string, tag = "15")]
    StringValue(String),
    #[prost(bytes = "vec", tag = "16")]
    BytesValue(Vec<u8>),
}

impl Metric {
    /// A named metric with a value (commands, tests).
    pub fn named(name: &str, datatype: u32, value: Value) -> Metric {
        Metric { name: Some(name.to_string()), datatype: Some(datatype), value: Some(value), ..Default::default() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    /// Bytes laid out by hand from the specification's field numbers and wire types.
    #[test]
    fn decodes_hand_encoded_bytes() {
        // Payload { timestamp: 1000 (tag 1 varint), seq: 7 (tag 3 varint),
        //   metrics: [ Metric { alias: 2 (tag 2), datatype: 8 (tag 4), long_value: 300 (tag 11) } ] }
        let metric = [0x10, 0x02, 0x20, 0x08, 0x58, 0xac, 0x02];
        let mut bytes = vec![0x08, 0xe8, 0x07, 0x18, 0x07, 0x12, metric.len() as u8];
        bytes.extend_from_slice(&metric);
        // An unknown field (tag 9, a length-delimited property set) inside is skipped.
        let p = Payload::decode(bytes.as_slice()).expect("decodes");
        assert_eq!(p.timestamp, Some(1000));
        assert_eq!(p.seq, Some(7));
        assert_eq!(p.metrics.len(), 1);
        assert_eq!(p.metrics[0].alias, Some(2));
        assert_eq!(p.metrics[0].datatype, Some(datatype::UINT64));
        assert_eq!(p.metrics[0].value, Some(Value::LongValue(300)));
    }

    #[test]
    fn round_trips_and_skips_unknown_fields() {
        let p = Payload {
            timestamp: Some(1_700_000_000_000),
            seq: Some(255),
            metrics: vec![Metric::named("Node Control/Rebirth", datatype::BOOLEAN, Value::BooleanValue(true))],
            ..Default::default()
        };
        let mut bytes = p.encode_to_vec();
        // Append a metric-level unknown field in a second metric: tag 9 (properties), empty.
        bytes.extend_from_slice(&[0x12, 0x04, 0x4a, 0x00, 0x10, 0x05]);
        let q = Payload::decode(bytes.as_slice()).expect("decodes");
        assert_eq!(q.metrics[0], p.metrics[0]);
        assert_eq!(q.metrics[1].alias, Some(5));
        assert!(Payload::decode(&[0x12, 0x05, 0x01][..]).is_err());
    }
}
