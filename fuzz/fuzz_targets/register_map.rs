//! The register-map loader (plc-maps) from text, and for a map that loads, the read
//! planner, the decoders and the encoder over arbitrary register words.
//!
//! Input: map text, then a NUL byte, then register words (big-endian u16 pairs; also used
//! as bits and as planner limits). Properties checked beyond "no panic":
//! * every error carries a line within the text;
//! * a map that loads satisfies the loader's own rules (unique names and roles, points
//!   inside the address space and not overlapping, bit points are bools, writable only
//!   on writable tables, roles on unsigned integers, `state` with an enum of MES states,
//!   `target`/`command` writable, scales finite and non-zero);
//! * every plan (default and fuzzed limits) covers every point, stays within the Modbus
//!   limits and never reads the same address twice;
//! * replies of any content and length decode without panic: a full reply decodes every
//!   point, a short one lists the rest as missing; unscaled integers re-encode to the exact
//!   words read; a counter never exceeds its type's range.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mes_plc_maps::{
    decode, encode, plan, plan_with, DataType, Kind, PlanOptions, RawData, ReadRequest, RegisterMap, Snapshot, Value,
    MAX_READ_BITS, MAX_READ_REGISTERS, STATE_LABELS,
};
use std::collections::HashSet;

fuzz_target!(|data: &[u8]| {
    let (text, tail) = match data.iter().position(|b| *b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let Ok(text) = std::str::from_utf8(text) else { return };
    let words: Vec<u16> = tail.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect();

    let map = match RegisterMap::from_str(text, "fuzz.toml") {
        Ok(map) => map,
        Err(errors) => {
            assert!(!errors.is_empty(), "an error without problems");
            let lines = text.lines().count().max(1);
            for p in errors.iter() {
                assert!(p.line <= lines + 1, "problem on line {} of {lines}: {p}", p.line);
                assert!(!p.to_string().is_empty());
            }
            return;
        }
    };
    invariants(&map);

    let summary = mes_plc_maps::check_str(text, "fuzz.toml").expect("a map that loads checks");
    assert_eq!(summary.points, map.points.len());

    let default_plan = plan(&map);
    assert_eq!(summary.requests, default_plan);
    plan_is_sound(&map, &default_plan, MAX_READ_REGISTERS, MAX_READ_BITS);
    let w = |i: usize| words.get(i).copied().unwrap_or(0);
    let options = PlanOptions { max_registers: w(0), max_bits: w(1), register_gap: w(2), bit_gap: w(3) };
    let fuzzed_plan = plan_with(&map, &options);
    plan_is_sound(
        &map,
        &fuzzed_plan,
        options.max_registers.clamp(1, MAX_READ_REGISTERS),
        options.max_bits.clamp(1, MAX_READ_BITS),
    );

    // Replies: full (the words repeated to length), then cut short by the fuzz data.
    let fill = |req: &ReadRequest, len: usize| -> RawData {
        let at = |i: usize| if words.is_empty() { i as u16 } else { words[i % words.len()] };
        if req.kind.is_bit() {
            RawData::Bits((0..len).map(|i| at(i) & 1 == 1).collect())
        } else {
            RawData::Registers((0..len).map(at).collect())
        }
    };
    let full: Vec<(ReadRequest, RawData)> = default_plan.iter().map(|r| (*r, fill(r, usize::from(r.count)))).collect();
    let snapshot = Snapshot::extract(&map, &full);
    assert!(snapshot.missing().is_empty(), "a full reply left {:?} missing", snapshot.missing());
    assert_eq!(snapshot.readings().len(), map.points.len());
    let counters = snapshot.counters();
    for (role, v) in [("good", counters.good), ("scrap", counters.scrap), ("boot", counters.boot)] {
        if let (Some(v), Some(p)) = (v, map.points.iter().find(|p| p.role.map(|r| r.as_str()) == Some(role))) {
            let max = p.ty.int_range().map_or(0, |(_, max)| max);
            assert!(i128::from(v) <= max, "{role} {v} exceeds {}", p.ty);
        }
    }
    let short: Vec<(ReadRequest, RawData)> = fuzzed_plan
        .iter()
        .enumerate()
        .map(|(i, r)| (*r, fill(r, usize::from(w(4 + i)) % (usize::from(r.count) + 2))))
        .collect();
    let partial = Snapshot::extract(&map, &short);
    assert_eq!(partial.readings().len() + partial.missing().len(), map.points.len());

    // Unscaled integers (and enum codes) re-encode to the very words they came from.
    for point in map.points.iter().filter(|p| !p.kind.is_bit()) {
        let n = usize::from(point.width());
        let raw: Vec<u16> = (0..n).map(|i| w(i + 5)).collect();
        let value = decode(point, &raw).expect("enough words");
        let exact = point.scale.is_none() && point.ty.is_integer();
        if exact {
            assert_eq!(encode(point, &value).ok(), Some(raw.clone()), "{} {value:?}", point.name);
            if point.writable {
                let req = map.write_request(&point.name, &value).expect("a decoded value writes back");
                assert_eq!(req.data, RawData::Registers(raw));
            }
        }
        if let Value::F64(x) = value {
            assert!(point.ty == DataType::F32 || point.scale.is_some(), "{} decoded to a float", point.name);
            let _ = x;
        }
    }
});

fn invariants(map: &RegisterMap) {
    assert!(map.version >= 1);
    assert!(!map.points.is_empty());
    let mut names = HashSet::new();
    let mut roles = HashSet::new();
    for p in &map.points {
        assert!(names.insert(p.name.as_str()), "duplicate name {}", p.name);
        if let Some(role) = p.role {
            assert!(roles.insert(role), "duplicate role {role}");
            assert!(p.ty.is_unsigned_int(), "{} role {role} on {}", p.name, p.ty);
            assert!(p.scale.is_none());
            if role == mes_plc_maps::Role::State {
                assert!(!p.enum_values.is_empty());
                assert!(p.enum_values.values().all(|l| STATE_LABELS.contains(&l.as_str())));
            }
            if role.requires_writable() {
                assert!(p.writable);
            }
            if !p.enum_values.is_empty() {
                assert!(role.allows_enum());
            }
        }
        assert!(p.last_address() <= u32::from(u16::MAX), "{} ends at {}", p.name, p.last_address());
        if p.kind.is_bit() {
            assert_eq!(p.ty, DataType::Bool);
        }
        if p.writable {
            assert!(p.kind.is_writable());
        }
        if let Some(s) = p.scale {
            assert!(s.is_finite() && s != 0.0);
        }
        if !p.enum_values.is_empty() {
            assert!(p.ty.is_integer());
        }
    }
    for k in Kind::ALL {
        let mut spans: Vec<(u32, u32)> =
            map.points.iter().filter(|p| p.kind == k).map(|p| (u32::from(p.address), p.last_address())).collect();
        spans.sort_unstable();
        for pair in spans.windows(2) {
            assert!(pair[0].1 < pair[1].0, "{k} points overlap: {pair:?}");
        }
    }
}

fn plan_is_sound(map: &RegisterMap, requests: &[ReadRequest], max_registers: u16, max_bits: u16) {
    for r in requests {
        // A single point wider than a (fuzzed) register limit is still read whole.
        let limit = if r.kind.is_bit() { max_bits } else { max_registers.max(4).min(MAX_READ_REGISTERS) };
        assert!(r.count >= 1 && r.count <= limit, "{r} exceeds {limit}");
        assert!(r.end() <= 1 << 16, "{r} runs past the address space");
    }
    for k in Kind::ALL {
        let mut spans: Vec<(u32, u32)> =
            requests.iter().filter(|r| r.kind == k).map(|r| (u32::from(r.start), r.end())).collect();
        spans.sort_unstable();
        for pair in spans.windows(2) {
            assert!(pair[0].1 <= pair[1].0, "{k} reads overlap: {pair:?}");
        }
    }
    for p in &map.points {
        assert!(requests.iter().any(|r| r.covers(p)), "no read covers {} ({} {})", p.name, p.kind, p.address);
    }
}
