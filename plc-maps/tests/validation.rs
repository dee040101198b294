//! One test per validation rule: a bad map → the expected error on the expected line.

use mes_plc_maps::{DataType, Kind, MapError, RegisterMap, Role, WordOrder};

/// Join lines; line N of the result is `lines[N - 1]`.
fn doc(lines: &[&str]) -> String {
    lines.join("\n") + "\n"
}

/// The standard two-line header followed by `lines` (which therefore start on line 3).
fn with_header(lines: &[&str]) -> String {
    let mut all = vec!["name = \"t\"", "version = 1"];
    all.extend_from_slice(lines);
    doc(&all)
}

fn errors(text: &str) -> Vec<(usize, MapError)> {
    match RegisterMap::from_str(text, "m.toml") {
        Ok(map) => panic!("expected errors, map loaded: {map:#?}"),
        Err(e) => e.problems.into_iter().map(|p| (p.line, p.error)).collect(),
    }
}

fn one_error(text: &str) -> (usize, MapError) {
    let mut all = errors(text);
    assert_eq!(all.len(), 1, "expected exactly one error, got {all:#?}");
    all.remove(0)
}

fn ok(text: &str) -> RegisterMap {
    RegisterMap::from_str(text, "m.toml").unwrap_or_else(|e| panic!("{e}"))
}

fn at(name: &str) -> String {
    format!("point `{name}`")
}

// ---------------------------------------------------------------------------- syntax

#[test]
fn syntax_error_reports_its_line() {
    let (line, e) = one_error(&doc(&["name = \"t\"", "version = 1", "", "kind = "]));
    assert_eq!(line, 4);
    assert!(matches!(e, MapError::Syntax(_)), "{e:?}");
}

#[test]
fn unterminated_string_and_duplicate_key_are_syntax_errors_with_lines() {
    let (line, e) = one_error(&doc(&["name = \"t", "version = 1"]));
    assert_eq!(line, 1);
    assert!(matches!(e, MapError::Syntax(_)));
    let (line, e) = one_error(&with_header(&["[[points]]", "name = \"a\"", "name = \"b\""]));
    assert_eq!(line, 5);
    assert!(matches!(e, MapError::Syntax(_)));
}

// ---------------------------------------------------------------------- map-level keys

#[test]
fn unknown_top_level_key() {
    let text = with_header(&[
        "wordorder = \"CDAB\"",
        "[[points]]",
        "name = \"a\"",
        "kind = \"holding\"",
        "address = 0",
        "type = \"u16\"",
    ]);
    let (line, e) = one_error(&text);
    assert_eq!(line, 3);
    assert!(matches!(e, MapError::UnknownKey { ref at, ref key, .. } if at == "map" && key == "wordorder"));
}

#[test]
fn unknown_map_word_order() {
    let text = doc(&[
        "name = \"t\"",
        "version = 1",
        "word_order = \"ACBD\"",
        "[[points]]",
        "name = \"a\"",
        "kind = \"holding\"",
        "address = 0",
        "type = \"u32\"",
    ]);
    let (line, e) = one_error(&text);
    assert_eq!(line, 3);
    assert!(matches!(e, MapError::UnknownValue { key: "word_order", ref value, .. } if value == "ACBD"));
}

#[test]
fn missing_map_keys_and_bad_version() {
    let all = errors(&doc(&["version = 0"]));
    assert_eq!(
        all,
        vec![
            (
                1,
                MapError::InvalidValue {
                    at: "map".into(),
                    key: "version",
                    message: "0 is not a version number in 1..=4294967295".into()
                }
            ),
            (1, MapError::MissingKey { at: "map".into(), key: "name" }),
            (1, MapError::MissingKey { at: "map".into(), key: "points" }),
        ]
    );
}

#[test]
fn empty_points_and_points_as_a_single_table() {
    let (line, e) = one_error(&with_header(&["", "points = []"]));
    assert_eq!((line, e), (4, MapError::NoPoints));
    let (line, e) = one_error(&with_header(&["[points]", "name = \"a\""]));
    assert_eq!(line, 3);
    assert!(matches!(e, MapError::WrongType { ref key, found: "a table", .. } if key == "points"));
}

// -------------------------------------------------------------------- point-level keys

#[test]
fn unknown_point_key_and_the_missing_key_it_hides_are_both_reported() {
    let text = with_header(&["[[points]]", "name = \"a\"", "kind = \"holding\"", "adress = 0", "type = \"u16\""]);
    let all = errors(&text);
    assert_eq!(
        all,
        vec![
            (3, MapError::MissingKey { at: at("a"), key: "address" }),
            (
                6,
                MapError::UnknownKey {
                    at: at("a"),
                    key: "adress".into(),
                    allowed: "name, kind, address, type, role, scale, word_order, writable, enum, unit"
                }
            ),
        ]
    );
}

#[test]
fn unknown_kind_type_role_and_point_word_order() {
    let text = with_header(&[
        "[[points]]",
        "name = \"a\"",
        "kind = \"register\"",
        "address = 0",
        "type = \"u8\"",
        "role = \"goods\"",
        "word_order = \"abcd\"",
    ]);
    let all = errors(&text);
    let got: Vec<(usize, &'static str, String)> = all
        .into_iter()
        .map(|(line, e)| match e {
            MapError::UnknownValue { key, value, .. } => (line, key, value),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (5, "kind", "register".to_string()),
            (7, "type", "u8".to_string()),
            (8, "role", "goods".to_string()),
            (9, "word_order", "abcd".to_string()),
        ]
    );
}

#[test]
fn wrong_toml_types_name_point_and_key() {
    let text = with_header(&[
        "[[points]]",
        "name = \"a\"",
        "kind = \"holding\"",
        "address = \"3\"",
        "type = \"u16\"",
        "writable = \"yes\"",
        "unit = 1979-05-27",
    ]);
    let all = errors(&text);
    assert_eq!(
        all,
        vec![
            (6, MapError::WrongType { at: at("a"), key: "address".into(), expected: "an integer", found: "a string" }),
            (
                8,
                MapError::WrongType {
                    at: at("a"),
                    key: "writable".into(),
                    expected: "true or false",
                    found: "a string"
                }
            ),
            (9, MapError::WrongType { at: at("a"), key: "unit".into(), expected: "a string", found: "a date/time" }),
        ]
    );
}

#[test]
fn bad_point_names() {
    let text =
        with_header(&["[[points]]", "name = \"good count\"", "kind = \"holding\"", "address = 0", "type = \"u16\""]);
    let (line, e) = one_error(&text);
    assert_eq!(line, 4);
    assert!(matches!(e, MapError::InvalidValue { key: "name", .. }));
    // A point without a usable name is identified by its position.
    let text = with_header(&["[[points]]", "kind = \"holding\"", "address = 0", "type = \"u16\""]);
    let (line, e) = one_error(&text);
    assert_eq!((line, e), (3, MapError::MissingKey { at: "point `#1`".into(), key: "name" }));
}

// ------------------------------------------------------------------ addresses and kinds

#[test]
fn overlapping_points_of_the_same_kind() {
    let text = with_header(&[
        "[[points]]", // 3
        "name = \"wide\"",
        "kind = \"holding\"",
        "address = 2",
        "type = \"u32\"",
        "[[points]]", // 8
        "name = \"narrow\"",
        "kind = \"holding\"",
        "address = 3", // 11
        "type = \"u16\"",
        "[[points]]", // 13: same address, other kind: fine
        "name = \"in\"",
        "kind = \"input\"",
        "address = 3",
        "type = \"u16\"",
    ]);
    let (line, e) = one_error(&text);
    assert_eq!(line, 11);
    assert_eq!(
        e,
        MapError::Overlap {
            point: "narrow".into(),
            kind: Kind::Holding,
            start: 3,
            end: 3,
            other: "wide".into(),
            other_start: 2,
            other_end: 3,
            other_line: 3,
        }
    );
}

#[test]
fn overlap_is_reported_on_the_later_point_even_when_it_has_the_lower_address() {
    let text = with_header(&[
        "[[points]]", // 3
        "name = \"b\"",
        "kind = \"input\"",
        "address = 10",
        "type = \"u16\"",
        "[[points]]", // 8
        "name = \"a\"",
        "kind = \"input\"",
        "address = 8", // 11
        "type = \"u64\"",
    ]);
    let (line, e) = one_error(&text);
    assert_eq!(line, 11);
    assert!(matches!(e, MapError::Overlap { ref point, ref other, .. } if point == "a" && other == "b"));
}

#[test]
fn coils_overlap_on_equal_addresses_only() {
    let text = with_header(&[
        "[[points]]",
        "name = \"a\"",
        "kind = \"coil\"",
        "address = 5",
        "type = \"bool\"",
        "[[points]]",
        "name = \"b\"",
        "kind = \"coil\"",
        "address = 6",
        "type = \"bool\"",
        "[[points]]",
        "name = \"c\"",
        "kind = \"coil\"",
        "address = 5",
        "type = \"bool\"",
    ]);
    let (line, e) = one_error(&text);
    assert_eq!(line, 16);
    assert!(matches!(e, MapError::Overlap { ref point, ref other, .. } if point == "c" && other == "a"));
}

#[test]
fn type_too_wide_for_a_bit_kind() {
    let text = with_header(&["[[points]]", "name = \"lamp\"", "kind = \"coil\"", "address = 0", "type = \"u32\""]);
    assert_eq!(
        one_error(&text),
        (7, MapError::TypeNotAllowed { point: "lamp".into(), ty: DataType::U32, kind: Kind::Coil })
    );
}

#[test]
fn reads_past_the_last_address() {
    let text = with_header(&[
        "[[points]]",
        "name = \"edge\"",
        "kind = \"holding\"",
        "address = 65535",
        "type = \"u16\"",
        "[[points]]",
        "name = \"past\"",
        "kind = \"input\"",
        "address = 65534",
        "type = \"u64\"",
        "[[points]]",
        "name = \"beyond\"",
        "kind = \"input\"",
        "address = 65536",
        "type = \"u16\"",
        "[[points]]",
        "name = \"negative\"",
        "kind = \"input\"",
        "address = -1",
        "type = \"u16\"",
    ]);
    let all = errors(&text);
    assert_eq!(all.len(), 3, "{all:#?}");
    assert_eq!(
        all[0],
        (
            11,
            MapError::AddressOverflow {
                point: "past".into(),
                kind: Kind::Input,
                ty: DataType::U64,
                address: 65534,
                last: 65537
            }
        )
    );
    assert!(matches!(all[1], (16, MapError::InvalidValue { key: "address", .. })));
    assert!(matches!(all[2], (21, MapError::InvalidValue { key: "address", .. })));
}

#[test]
fn writable_only_on_holding_and_coil() {
    let text = with_header(&[
        "[[points]]",
        "name = \"a\"",
        "kind = \"input\"",
        "address = 0",
        "type = \"u16\"",
        "writable = true",
        "[[points]]",
        "name = \"b\"",
        "kind = \"discrete\"",
        "address = 0",
        "type = \"bool\"",
        "writable = true",
        "[[points]]",
        "name = \"c\"",
        "kind = \"coil\"",
        "address = 0",
        "type = \"bool\"",
        "writable = true",
        "[[points]]",
        "name = \"d\"",
        "kind = \"holding\"",
        "address = 0",
        "type = \"u16\"",
        "writable = true",
        "[[points]]",
        "name = \"e\"",
        "kind = \"input\"",
        "address = 1",
        "type = \"u16\"",
        "writable = false",
    ]);
    assert_eq!(
        errors(&text),
        vec![
            (8, MapError::NotWritableKind { point: "a".into(), kind: Kind::Input }),
            (14, MapError::NotWritableKind { point: "b".into(), kind: Kind::Discrete }),
        ]
    );
}

// -------------------------------------------------------------------- names and roles

#[test]
fn duplicate_point_names() {
    let text = with_header(&[
        "[[points]]",
        "name = \"a\"",
        "kind = \"holding\"",
        "address = 0",
        "type = \"u16\"",
        "[[points]]",
        "name = \"a\"",
        "kind = \"holding\"",
        "address = 1",
        "type = \"u16\"",
    ]);
    assert_eq!(one_error(&text), (9, MapError::DuplicateName { point: "a".into(), first_line: 3 }));
}

#[test]
fn a_role_used_twice() {
    let text = with_header(&[
        "[[points]]",
        "name = \"a\"",
        "kind = \"holding\"",
        "address = 0",
        "type = \"u32\"",
        "role = \"good\"",
        "[[points]]",
        "name = \"b\"",
        "kind = \"input\"",
        "address = 0",
        "type = \"u32\"",
        "role = \"good\"",
    ]);
    assert_eq!(
        one_error(&text),
        (14, MapError::DuplicateRole { point: "b".into(), role: Role::Good, other: "a".into(), other_line: 3 })
    );
}

#[test]
fn counters_need_unsigned_types_and_no_scale_or_enum() {
    let text = with_header(&[
        "[[points]]",
        "name = \"good\"",
        "kind = \"holding\"",
        "address = 0",
        "type = \"i32\"", // 7
        "role = \"good\"",
        "[[points]]",
        "name = \"scrap\"",
        "kind = \"holding\"",
        "address = 2",
        "type = \"u16\"",
        "role = \"scrap\"",
        "scale = 0.5", // 15
        "[[points]]",
        "name = \"boot\"",
        "kind = \"holding\"",
        "address = 3",
        "type = \"f32\"", // 20
        "role = \"boot\"",
        "enum = { 0 = \"cold\" }", // 22
    ]);
    assert_eq!(
        errors(&text),
        vec![
            (7, MapError::RoleType { point: "good".into(), role: Role::Good, ty: DataType::I32 }),
            (15, MapError::RoleScale { point: "scrap".into(), role: Role::Scrap }),
            (20, MapError::RoleType { point: "boot".into(), role: Role::Boot, ty: DataType::F32 }),
            (22, MapError::EnumOnNonInteger { point: "boot".into(), ty: DataType::F32 }),
            (22, MapError::RoleEnum { point: "boot".into(), role: Role::Boot }),
        ]
    );
}

#[test]
fn state_without_enum() {
    let text = with_header(&[
        "[[points]]",
        "name = \"s\"",
        "kind = \"holding\"",
        "address = 0",
        "type = \"u16\"",
        "role = \"state\"",
    ]);
    assert_eq!(one_error(&text), (8, MapError::StateWithoutEnum { point: "s".into() }));
}

#[test]
fn state_labels_must_be_mes_states() {
    let text = with_header(&[
        "[[points]]",
        "name = \"s\"",
        "kind = \"holding\"",
        "address = 0",
        "type = \"u16\"",
        "role = \"state\"",
        "[points.enum]",
        "0 = \"stopped\"",
        "1 = \"runing\"",
        "2 = \"running\"",
    ]);
    assert_eq!(one_error(&text), (11, MapError::StateLabel { point: "s".into(), label: "runing".into() }));
}

#[test]
fn target_and_command_must_be_writable() {
    let text = with_header(&[
        "[[points]]",
        "name = \"target\"",
        "kind = \"holding\"",
        "address = 0",
        "type = \"u32\"",
        "role = \"target\"",
        "[[points]]",
        "name = \"cmd\"",
        "kind = \"input\"",
        "address = 0",
        "type = \"u16\"",
        "role = \"command\"",
    ]);
    assert_eq!(
        errors(&text),
        vec![
            (8, MapError::RoleNotWritable { point: "target".into(), role: Role::Target }),
            (14, MapError::RoleNotWritable { point: "cmd".into(), role: Role::Command }),
        ]
    );
}

#[test]
fn roles_on_bit_points_are_rejected_by_type() {
    let text = with_header(&[
        "[[points]]",
        "name = \"run\"",
        "kind = \"coil\"",
        "address = 0",
        "type = \"bool\"",
        "role = \"command\"",
        "writable = true",
    ]);
    assert_eq!(
        one_error(&text),
        (7, MapError::RoleType { point: "run".into(), role: Role::Command, ty: DataType::Bool })
    );
}

// ----------------------------------------------------------------------------- enums

#[test]
fn enum_keys_must_be_integers() {
    let text = with_header(&[
        "[[points]]",
        "name = \"mode\"",
        "kind = \"holding\"",
        "address = 0",
        "type = \"u16\"",
        "[points.enum]", // 8
        "0 = \"manual\"",
        "auto = \"automatic\"", // 10
        "70000 = \"huge\"",     // 11
        "-1 = \"negative\"",    // 12
    ]);
    let all = errors(&text);
    let keys: Vec<(usize, String)> = all
        .into_iter()
        .map(|(line, e)| match e {
            MapError::EnumKey { key, max: 65535, .. } => (line, key),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(keys, vec![(10, "auto".to_string()), (11, "70000".to_string()), (12, "-1".to_string()),]);
}

#[test]
fn enum_keys_must_fit_a_signed_type_and_must_not_repeat() {
    let text = with_header(&[
        "[[points]]",
        "name = \"mode\"",
        "kind = \"holding\"",
        "address = 0",
        "type = \"i16\"",
        "enum = { 1 = \"one\", 01 = \"uno\", 40000 = \"big\", 2 = 7 }",
    ]);
    let all = errors(&text);
    assert_eq!(all.len(), 3, "{all:#?}");
    assert!(all.iter().all(|(line, _)| *line == 8));
    assert!(all.iter().any(|(_, e)| matches!(e, MapError::EnumDuplicate { .. })));
    assert!(all.iter().any(|(_, e)| matches!(e, MapError::EnumKey { key, max: 32767, .. } if key == "40000")));
    assert!(all.iter().any(|(_, e)| matches!(e, MapError::EnumLabel { key, .. } if key == "2")));
}

#[test]
fn enum_on_a_non_integer_type() {
    let text = with_header(&[
        "[[points]]",
        "name = \"flag\"",
        "kind = \"coil\"",
        "address = 0",
        "type = \"bool\"",
        "enum = { 0 = \"off\", 1 = \"on\" }",
    ]);
    assert_eq!(one_error(&text), (8, MapError::EnumOnNonInteger { point: "flag".into(), ty: DataType::Bool }));
    let text = with_header(&[
        "[[points]]",
        "name = \"t\"",
        "kind = \"input\"",
        "address = 0",
        "type = \"u16\"",
        "enum = [\"a\"]",
    ]);
    let (line, e) = one_error(&text);
    assert_eq!(line, 8);
    assert!(matches!(e, MapError::WrongType { ref key, found: "an array", .. } if key == "enum"));
}

// ------------------------------------------------------------- scale and word order

#[test]
fn scale_rules() {
    let text = with_header(&[
        "[[points]]",
        "name = \"b\"",
        "kind = \"holding\"",
        "address = 0",
        "type = \"bool\"",
        "scale = 2", // 8
        "[[points]]",
        "name = \"e\"",
        "kind = \"holding\"",
        "address = 1",
        "type = \"u16\"",
        "enum = { 0 = \"x\" }",
        "scale = 0.5", // 15
        "[[points]]",
        "name = \"z\"",
        "kind = \"holding\"",
        "address = 2",
        "type = \"u16\"",
        "scale = 0.0", // 21
        "[[points]]",
        "name = \"s\"",
        "kind = \"holding\"",
        "address = 3",
        "type = \"u16\"",
        "scale = \"x\"", // 27
    ]);
    let all = errors(&text);
    assert_eq!(all.len(), 4, "{all:#?}");
    assert!(matches!(all[0], (8, MapError::ScaleNotAllowed { .. })));
    assert!(matches!(all[1], (15, MapError::ScaleNotAllowed { .. })));
    assert!(matches!(all[2], (21, MapError::InvalidValue { key: "scale", .. })));
    assert!(matches!(all[3], (27, MapError::WrongType { .. })));
}

#[test]
fn word_order_on_a_single_register_type() {
    let text = with_header(&[
        "[[points]]",
        "name = \"a\"",
        "kind = \"holding\"",
        "address = 0",
        "type = \"i16\"",
        "word_order = \"CDAB\"",
    ]);
    assert_eq!(one_error(&text), (8, MapError::WordOrderUnused { point: "a".into(), ty: DataType::I16 }));
}

// ------------------------------------------------------- whole-file behaviour, formats

#[test]
fn all_problems_are_collected_sorted_and_displayed_with_file_and_line() {
    let text = with_header(&[
        "colour = \"red\"", // 3
        "[[points]]",       // 4
        "name = \"a\"",
        "kind = \"coil\"",
        "address = 0",
        "type = \"u16\"", // 8
        "[[points]]",     // 9
        "name = \"a\"",   // 10
        "kind = \"holding\"",
        "address = 0",
        "type = \"u32\"",
        "role = \"state\"", // 14
    ]);
    let err = RegisterMap::from_str(&text, "maps/bad.toml").expect_err("bad map");
    let lines: Vec<usize> = err.problems.iter().map(|p| p.line).collect();
    assert_eq!(lines, vec![3, 8, 10, 14]);
    let shown = err.to_string();
    let shown: Vec<&str> = shown.lines().collect();
    assert_eq!(shown.len(), 4);
    assert_eq!(
        shown[0],
        "maps/bad.toml:3: map: unknown key `colour` (allowed keys: name, version, word_order, points)"
    );
    assert_eq!(
        shown[1],
        "maps/bad.toml:8: point `a`: key `type`: `u16` does not fit a coil point; \
         coils and discrete inputs carry only `bool`"
    );
    assert_eq!(shown[2], "maps/bad.toml:10: point `a`: duplicate point name (first defined on line 4)");
    assert_eq!(
        shown[3],
        "maps/bad.toml:14: point `a`: key `role`: role `state` needs an `enum` table \
         mapping codes to state names"
    );
}

#[test]
fn a_metrics_only_map_is_fine() {
    let map = ok(&with_header(&[
        "[[points]]",
        "name = \"temp\"",
        "kind = \"input\"",
        "address = 0",
        "type = \"f32\"",
        "unit = \"degC\"",
    ]));
    assert_eq!(map.word_order, WordOrder::ABCD);
    assert!(map.point_by_role(Role::Good).is_none());
    assert_eq!(map.points[0].line, 3);
}

#[test]
fn inline_points_dotted_enum_keys_and_defaults_work() {
    let map = ok(&doc(&[
        "name = \"t\"",
        "version = 3",
        "word_order = \"DCBA\"",
        "points = [",
        "  { name = \"a\", kind = \"holding\", address = 0, type = \"u32\" },",
        "  { name = \"b\", kind = \"holding\", address = 2, type = \"u32\", word_order = \"ABCD\" },",
        "]",
    ]));
    assert_eq!(map.version, 3);
    assert_eq!(map.points[0].word_order, WordOrder::DCBA);
    assert_eq!(map.points[1].word_order, WordOrder::ABCD);
    assert_eq!((map.points[0].line, map.points[1].line), (5, 6));
    assert!(!map.points[0].writable);

    let map = ok(&with_header(&[
        "[[points]]",
        "name = \"s\"",
        "kind = \"holding\"",
        "address = 0",
        "type = \"u16\"",
        "role = \"state\"",
        "enum.0 = \"stopped\"",
        "enum.1 = \"running\"",
    ]));
    let state = &map.points[0];
    assert_eq!(state.enum_values.get(&1).map(String::as_str), Some("running"));
    assert_eq!(state.wrap_bits(), Some(16));
}

#[test]
fn errors_in_dotted_enum_keys_still_get_a_line() {
    let text = with_header(&[
        "[[points]]",
        "name = \"s\"",
        "kind = \"holding\"",
        "address = 0",
        "type = \"u16\"",
        "enum.0 = \"stopped\"",
        "enum.x = \"running\"",
    ]);
    let (line, e) = one_error(&text);
    assert_eq!(line, 9);
    assert!(matches!(e, MapError::EnumKey { ref key, .. } if key == "x"));
}
