//! Read planning (fewest Modbus reads per poll) and turning replies into point values.

use serde::Serialize;

use crate::codec::{decode, decode_bits, encode, encode_bits, Value};
use crate::error::MapError;
use crate::schema::{Kind, Point, RegisterMap, Role};

/// Most registers one Modbus read (function 3 or 4) may return.
pub const MAX_READ_REGISTERS: u16 = 125;
/// Most bits one Modbus read (function 1 or 2) may return.
pub const MAX_READ_BITS: u16 = 2000;
/// Default number of unused registers the planner reads through to join two points.
pub const DEFAULT_REGISTER_GAP: u16 = 8;
/// Default number of unused bits the planner reads through to join two points.
pub const DEFAULT_BIT_GAP: u16 = 64;

/// One Modbus read: `count` registers (or bits) of `kind` from `start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct ReadRequest {
    /// The table to read.
    pub kind: Kind,
    /// First address.
    pub start: u16,
    /// Number of registers (input/holding) or bits (coil/discrete).
    pub count: u16,
}

impl ReadRequest {
    /// One past the last address read.
    pub fn end(&self) -> u32 {
        u32::from(self.start) + u32::from(self.count)
    }

    /// True if the request reads every address of `point`.
    pub fn covers(&self, point: &Point) -> bool {
        point.kind == self.kind && point.address >= self.start && point.last_address() < self.end()
    }

    /// The Modbus function code to use.
    pub fn function_code(&self) -> u8 {
        self.kind.read_function_code()
    }
}

impl std::fmt::Display for ReadRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let unit = match (self.kind.is_bit(), self.count) {
            (true, 1) => "bit",
            (true, _) => "bits",
            (false, 1) => "register",
            (false, _) => "registers",
        };
        write!(f, "{} {}..={} ({} {unit})", self.kind, self.start, self.end().saturating_sub(1), self.count)
    }
}

/// Limits the planner works within.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanOptions {
    /// Largest register read (clamped to 1..=125).
    pub max_registers: u16,
    /// Largest bit read (clamped to 1..=2000).
    pub max_bits: u16,
    /// Unused registers that may be read through to merge two neighbouring points.
    pub register_gap: u16,
    /// Unused bits that may be read through to merge two neighbouring points.
    pub bit_gap: u16,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions {
            max_registers: MAX_READ_REGISTERS,
            max_bits: MAX_READ_BITS,
            register_gap: DEFAULT_REGISTER_GAP,
            bit_gap: DEFAULT_BIT_GAP,
        }
    }
}

/// Plan the reads for one poll of `map` with the default limits: see [`plan_with`].
pub fn plan(map: &RegisterMap) -> Vec<ReadRequest> {
    plan_with(map, &PlanOptions::default())
}

/// Plan the reads for one poll of `map`.
///
/// Points are grouped by kind and sorted by address; a request grows to take in the next
/// point while the hole before it is at most the allowed gap and the whole request stays
/// within the protocol limit. Growing greedily like this gives the fewest requests for the
/// given limits. Requests come out ordered by kind (coil, discrete, input, holding), then
/// address.
pub fn plan_with(map: &RegisterMap, options: &PlanOptions) -> Vec<ReadRequest> {
    let mut requests = Vec::new();
    for kind in Kind::ALL {
        let (limit, gap) = if kind.is_bit() {
            (options.max_bits.clamp(1, MAX_READ_BITS), options.bit_gap)
        } else {
            (options.max_registers.clamp(1, MAX_READ_REGISTERS), options.register_gap)
        };
        let mut ranges: Vec<(u32, u32)> = map
            .points
            .iter()
            .filter(|p| p.kind == kind)
            .map(|p| (u32::from(p.address), p.last_address() + 1))
            .collect();
        ranges.sort_unstable();

        let mut current: Option<(u32, u32)> = None;
        for (start, end) in ranges {
            current = match current {
                Some((s, e)) if start <= e + u32::from(gap) && end.max(e) - s <= u32::from(limit) => {
                    Some((s, end.max(e)))
                }
                Some(done) => {
                    requests.extend(to_request(kind, done));
                    Some((start, end))
                }
                None => Some((start, end)),
            };
        }
        if let Some(done) = current {
            requests.extend(to_request(kind, done));
        }
    }
    requests
}

fn to_request(kind: Kind, (start, end): (u32, u32)) -> Option<ReadRequest> {
    Some(ReadRequest { kind, start: u16::try_from(start).ok()?, count: u16::try_from(end - start).ok()? })
}

/// The data a read returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawData {
    /// Reply to an input or holding register read.
    Registers(Vec<u16>),
    /// Reply to a coil or discrete input read.
    Bits(Vec<bool>),
}

impl RawData {
    fn len(&self) -> usize {
        match self {
            RawData::Registers(w) => w.len(),
            RawData::Bits(b) => b.len(),
        }
    }
}

/// One decoded point.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Reading {
    /// Point name.
    pub name: String,
    /// Point role, if any.
    pub role: Option<Role>,
    /// The decoded value.
    pub value: Value,
}

/// The values of one poll, decoded per point.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct Snapshot {
    readings: Vec<Reading>,
    missing: Vec<String>,
}

/// The MES-relevant readings of a snapshot, by role.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct Counters {
    /// Raw `good` counter (wraps at 2^bits, see [`Point::wrap_bits`]).
    pub good: Option<u64>,
    /// Raw `scrap` counter.
    pub scrap: Option<u64>,
    /// Raw `boot` counter.
    pub boot: Option<u64>,
    /// State label, when the state code is listed in the enum.
    pub state: Option<String>,
    /// Raw state code (also set when the code has no label).
    pub state_code: Option<u64>,
    /// Raw reason code.
    pub reason: Option<u64>,
    /// Current target as read back.
    pub target: Option<u64>,
    /// Current order slot as read back.
    pub order: Option<u64>,
}

impl Snapshot {
    /// Decode every point of `map` from the replies to a set of reads (normally the
    /// [`plan`] for that map), each paired with the request it answers.
    ///
    /// A point is decoded from the first reply of its kind that covers it completely; the
    /// reply may be shorter than requested, and then only the points it still covers are
    /// decoded. Points no reply covers (for instance because that read failed and was left
    /// out) are listed in [`Snapshot::missing`]. Never panics on malformed replies.
    pub fn extract(map: &RegisterMap, replies: &[(ReadRequest, RawData)]) -> Snapshot {
        let mut snapshot = Snapshot::default();
        for point in &map.points {
            let value = replies.iter().find_map(|(req, data)| {
                if !req.covers(point) {
                    return None;
                }
                let offset = usize::from(point.address - req.start);
                let width = usize::from(point.width());
                let available = data.len().min(usize::from(req.count));
                if offset + width > available {
                    return None;
                }
                match data {
                    RawData::Registers(words) if !point.kind.is_bit() => decode(point, words.get(offset..)?).ok(),
                    RawData::Bits(bits) if point.kind.is_bit() => decode_bits(point, bits.get(offset..)?).ok(),
                    _ => None,
                }
            });
            match value {
                Some(value) => snapshot.readings.push(Reading { name: point.name.clone(), role: point.role, value }),
                None => snapshot.missing.push(point.name.clone()),
            }
        }
        snapshot
    }

    /// The decoded points, in map order.
    pub fn readings(&self) -> &[Reading] {
        &self.readings
    }

    /// Names of the points no reply covered.
    pub fn missing(&self) -> &[String] {
        &self.missing
    }

    /// The value of the point called `name`.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.readings.iter().find(|r| r.name == name).map(|r| &r.value)
    }

    /// The value of the point with `role`.
    pub fn by_role(&self, role: Role) -> Option<&Value> {
        self.readings.iter().find(|r| r.role == Some(role)).map(|r| &r.value)
    }

    /// `(name, value)` pairs, in map order.
    pub fn into_pairs(self) -> Vec<(String, Value)> {
        self.readings.into_iter().map(|r| (r.name, r.value)).collect()
    }

    /// The counter, state and order readings.
    pub fn counters(&self) -> Counters {
        let num = |role| self.by_role(role).and_then(Value::as_u64);
        Counters {
            good: num(Role::Good),
            scrap: num(Role::Scrap),
            boot: num(Role::Boot),
            state: self.by_role(Role::State).and_then(Value::label).map(str::to_owned),
            state_code: num(Role::State),
            reason: num(Role::Reason),
            target: num(Role::Target),
            order: num(Role::Order),
        }
    }
}

/// Decode `(point name, value)` pairs from replies; shorthand for
/// [`Snapshot::extract`] followed by [`Snapshot::into_pairs`].
pub fn extract(map: &RegisterMap, replies: &[(ReadRequest, RawData)]) -> Vec<(String, Value)> {
    Snapshot::extract(map, replies).into_pairs()
}

/// A write the MES wants to make: the data to put at `address` of `kind`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteRequest {
    /// The point written.
    pub point: String,
    /// Holding register or coil.
    pub kind: Kind,
    /// First address.
    pub address: u16,
    /// Registers (function 6 for one, 16 for several) or a single coil (function 5).
    pub data: RawData,
}

impl RegisterMap {
    /// Build the write that sets point `name` to `value`. Fails if there is no such
    /// point, it is not `writable`, or the value does not fit its type.
    pub fn write_request(&self, name: &str, value: &Value) -> Result<WriteRequest, MapError> {
        let point = self.point(name).ok_or_else(|| MapError::UnknownPoint(name.to_owned()))?;
        if !point.writable {
            return Err(MapError::NotWritable(name.to_owned()));
        }
        let data = if point.kind.is_bit() {
            RawData::Bits(vec![encode_bits(point, value)?])
        } else {
            RawData::Registers(encode(point, value)?)
        };
        Ok(WriteRequest { point: point.name.clone(), kind: point.kind, address: point.address, data })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map_from(points: &str) -> RegisterMap {
        let text = format!("name = \"t\"\nversion = 1\n{points}");
        RegisterMap::from_str(&text, "t.toml").unwrap_or_else(|e| panic!("{e}"))
    }

    fn u16_points(kind: &str, addresses: impl IntoIterator<Item = u32>) -> String {
        let ty = if kind == "coil" || kind == "discrete" { "bool" } else { "u16" };
        addresses
            .into_iter()
            .map(|a| format!("[[points]]\nname = \"{kind}{a}\"\nkind = \"{kind}\"\naddress = {a}\ntype = \"{ty}\"\n"))
            .collect()
    }

    fn req(kind: Kind, start: u16, count: u16) -> ReadRequest {
        ReadRequest { kind, start, count }
    }

    #[test]
    fn three_hundred_contiguous_registers_need_three_reads() {
        let map = map_from(&u16_points("holding", 0..300));
        assert_eq!(
            plan(&map),
            vec![req(Kind::Holding, 0, 125), req(Kind::Holding, 125, 125), req(Kind::Holding, 250, 50),]
        );
    }

    #[test]
    fn bit_reads_are_limited_to_2000() {
        let map = map_from(&u16_points("coil", 0..4500));
        assert_eq!(
            plan(&map),
            vec![req(Kind::Coil, 0, 2000), req(Kind::Coil, 2000, 2000), req(Kind::Coil, 4000, 500),]
        );
    }

    #[test]
    fn small_gaps_are_read_through_large_gaps_split() {
        // 0..=1, then a hole of 8 (2..=9) → merged; then a hole of 9 (12..=20) → split.
        let map = map_from(&u16_points("input", [0, 1, 10, 11, 21]));
        assert_eq!(plan(&map), vec![req(Kind::Input, 0, 12), req(Kind::Input, 21, 1)]);
        let options = PlanOptions { register_gap: 0, ..PlanOptions::default() };
        assert_eq!(
            plan_with(&map, &options),
            vec![req(Kind::Input, 0, 2), req(Kind::Input, 10, 2), req(Kind::Input, 21, 1)]
        );
    }

    #[test]
    fn kinds_are_never_mixed_and_multi_register_points_stay_whole() {
        let mut text = String::from(
            "word_order = \"CDAB\"\n\
            [[points]]\nname = \"a\"\nkind = \"holding\"\naddress = 0\ntype = \"u64\"\n\
            [[points]]\nname = \"b\"\nkind = \"holding\"\naddress = 122\ntype = \"u32\"\n\
            [[points]]\nname = \"c\"\nkind = \"holding\"\naddress = 124\ntype = \"u32\"\n\
            [[points]]\nname = \"d\"\nkind = \"input\"\naddress = 0\ntype = \"u16\"\n\
            [[points]]\nname = \"e\"\nkind = \"discrete\"\naddress = 3\ntype = \"bool\"\n",
        );
        text.push_str(&u16_points("holding", 4..122));
        let map = map_from(&text);
        // c (124..=125) would make the first read 126 long, so it starts a new one.
        assert_eq!(
            plan(&map),
            vec![
                req(Kind::Discrete, 3, 1),
                req(Kind::Input, 0, 1),
                req(Kind::Holding, 0, 124),
                req(Kind::Holding, 124, 2),
            ]
        );
    }

    #[test]
    fn greedy_plan_covers_every_point_exactly_once_on_random_maps() {
        let mut seed = 7u64;
        let mut next = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            seed >> 33
        };
        for _ in 0..30 {
            let mut addresses = Vec::new();
            let mut a = next() % 50;
            while a < 65000 && addresses.len() < 200 {
                addresses.push(a as u32);
                a += 1 + next() % 20;
            }
            let map = map_from(&u16_points("holding", addresses));
            let requests = plan(&map);
            for w in requests.windows(2) {
                assert!(w[0].end() <= u32::from(w[1].start));
            }
            for p in &map.points {
                assert_eq!(requests.iter().filter(|r| r.covers(p)).count(), 1);
            }
            for r in &requests {
                assert!(r.count >= 1 && r.count <= MAX_READ_REGISTERS);
            }
        }
    }

    #[test]
    fn snapshot_decodes_points_and_counters() {
        let map = crate::RegisterMap::from_str(crate::shipped_map("press-v1").expect("shipped"), "press-v1.toml")
            .unwrap_or_else(|e| panic!("{e}"));
        let requests = plan(&map);
        // Build the device image by encoding values, like the simulator does.
        let values = [
            ("state", Value::U64(1)),
            ("good_count", Value::U64(70_000)),
            ("scrap_count", Value::U64(12)),
            ("reason_code", Value::U64(0)),
            ("boot_count", Value::U64(3)),
            ("temperature", Value::F64(f64::from(41.5f32) * 0.1)),
            ("order_target", Value::U64(500)),
            ("command", Value::U64(1)),
        ];
        let mut holding = vec![0u16; 200];
        let mut input = vec![0u16; 10];
        for (name, v) in &values {
            let p = map.point(name).expect("point");
            let words = encode(p, v).expect("encode");
            let image = if p.kind == Kind::Holding { &mut holding } else { &mut input };
            let at = usize::from(p.address);
            image[at..at + words.len()].copy_from_slice(&words);
        }
        let replies: Vec<(ReadRequest, RawData)> = requests
            .iter()
            .map(|r| {
                let image = if r.kind == Kind::Holding { &holding } else { &input };
                let s = usize::from(r.start);
                (*r, RawData::Registers(image[s..s + usize::from(r.count)].to_vec()))
            })
            .collect();
        let snap = Snapshot::extract(&map, &replies);
        assert!(snap.missing().is_empty());
        assert_eq!(
            snap.counters(),
            Counters {
                good: Some(70_000),
                scrap: Some(12),
                boot: Some(3),
                state: Some("running".into()),
                state_code: Some(1),
                reason: Some(0),
                target: Some(500),
                order: None,
            }
        );
        assert_eq!(snap.get("temperature"), Some(&Value::F64(f64::from(41.5f32) * 0.1)));
        // good_count is CDAB: low word first.
        assert_eq!(&holding[2..4], &[(70_000u32 & 0xFFFF) as u16, 1]);
        assert_eq!(extract(&map, &replies).len(), map.points.len());
    }

    #[test]
    fn short_failed_or_mismatched_replies_leave_points_missing() {
        let map = map_from(&u16_points("holding", 0..4));
        let r = req(Kind::Holding, 0, 4);
        // Only two of four words came back.
        let snap = Snapshot::extract(&map, &[(r, RawData::Registers(vec![5, 6]))]);
        assert_eq!(snap.get("holding1"), Some(&Value::U64(6)));
        assert_eq!(snap.missing(), &["holding2".to_string(), "holding3".to_string()]);
        // Bits for a register request, and no replies at all.
        let snap = Snapshot::extract(&map, &[(r, RawData::Bits(vec![true; 4]))]);
        assert_eq!(snap.missing().len(), 4);
        let snap = Snapshot::extract(&map, &[]);
        assert_eq!(snap.missing().len(), 4);
        assert_eq!(snap.counters(), Counters::default());
    }

    #[test]
    fn write_requests_check_writability_and_encode() {
        let map = crate::RegisterMap::from_str(crate::shipped_map("press-v1").expect("shipped"), "press-v1.toml")
            .unwrap_or_else(|e| panic!("{e}"));
        // order_target is u32 in the map's default CDAB order.
        assert_eq!(
            map.write_request("order_target", &Value::U64(0x0001_0002)),
            Ok(WriteRequest {
                point: "order_target".into(),
                kind: Kind::Holding,
                address: 100,
                data: RawData::Registers(vec![0x0002, 0x0001]),
            })
        );
        let start = Value::U64(u64::from(crate::COMMAND_START));
        assert!(map.write_request("command", &start).is_ok());
        assert_eq!(map.write_request("good_count", &Value::U64(0)), Err(MapError::NotWritable("good_count".into())));
        assert_eq!(map.write_request("nope", &Value::U64(0)), Err(MapError::UnknownPoint("nope".into())));
        assert!(map.write_request("command", &Value::I64(-1)).is_err());
    }

    #[test]
    fn bit_points_decode_from_bit_replies() {
        let map = map_from(&u16_points("discrete", [0, 5]));
        let requests = plan(&map);
        assert_eq!(requests, vec![req(Kind::Discrete, 0, 6)]);
        let mut bits = vec![false; 6];
        bits[5] = true;
        let pairs = extract(&map, &[(requests[0], RawData::Bits(bits))]);
        assert_eq!(
            pairs,
            vec![("discrete0".to_string(), Value::Bool(false)), ("discrete5".to_string(), Value::Bool(true)),]
        );
    }
}
