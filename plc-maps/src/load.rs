//! Loading a map from TOML text: structural checks, then semantic validation.
//!
//! All problems are collected; the map is only built when there are none.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use crate::error::{MapError, MapErrors, Problem};
use crate::schema::{DataType, Kind, Point, RegisterMap, Role, WordOrder, STATE_LABELS};
use crate::tree::{self, Located, Node};

const MAP_KEYS: &str = "name, version, word_order, points";
const POINT_KEYS: &str = "name, kind, address, type, role, scale, word_order, writable, enum, unit";
const KINDS: &str = "coil, discrete, input, holding";
const TYPES: &str = "bool, u16, i16, u32, i32, f32, u64";
const ROLES: &str = "state, good, scrap, boot, reason, target, command, order";
const WORD_ORDERS: &str = "ABCD, CDAB, BADC, DCBA";

impl RegisterMap {
    /// Parse and validate a map from TOML `text`. `source_name` labels the problems
    /// (normally the file name). On failure every problem found is returned, each with the
    /// line it concerns.
    pub fn from_str(text: &str, source_name: &str) -> Result<RegisterMap, MapErrors> {
        let mut loader = Loader::new(text);
        let map = loader.load(text);
        let mut problems = loader.problems;
        problems.sort_by_key(|p| p.line);
        match map {
            Some(map) if problems.is_empty() => Ok(map),
            _ => Err(MapErrors { source: source_name.to_owned(), problems }),
        }
    }

    /// Read and validate the map file at `path`. Problems are labelled with the path.
    pub fn load(path: impl AsRef<Path>) -> Result<RegisterMap, MapErrors> {
        let path = path.as_ref();
        let source = path.display().to_string();
        let text =
            std::fs::read_to_string(path).map_err(|e| MapErrors::single(&source, 0, MapError::Io(e.to_string())))?;
        RegisterMap::from_str(&text, &source)
    }
}

/// Byte offset → 1-based line number.
struct Lines {
    starts: Vec<usize>,
}

impl Lines {
    fn new(text: &str) -> Self {
        let mut starts = vec![0];
        starts.extend(text.bytes().enumerate().filter(|(_, b)| *b == b'\n').map(|(i, _)| i + 1));
        Lines { starts }
    }

    fn line(&self, offset: usize) -> usize {
        self.starts.partition_point(|&s| s <= offset).max(1)
    }
}

/// A value and the line it was found on.
type At<T> = Option<(T, usize)>;

/// One `[[points]]` table as parsed so far; `None` fields were absent or invalid.
#[derive(Default)]
struct Draft {
    line: usize,
    /// The point's name for messages (`#N` when it has none).
    id: String,
    name: At<String>,
    kind: At<Kind>,
    address: At<u16>,
    ty: At<DataType>,
    role: At<Role>,
    scale: At<f64>,
    word_order: At<WordOrder>,
    writable: At<bool>,
    /// (code, key as written, line) for every valid enum entry.
    enum_entries: Vec<(u16, String, usize)>,
    /// Line of the `enum` key, if present (even when invalid).
    enum_line: Option<usize>,
    unit: Option<String>,
}

impl Draft {
    fn width(&self) -> Option<u16> {
        let (kind, _) = self.kind?;
        let (ty, _) = self.ty?;
        Some(if kind.is_bit() { 1 } else { ty.registers() })
    }
}

struct Loader {
    lines: Lines,
    problems: Vec<Problem>,
}

impl Loader {
    fn new(text: &str) -> Self {
        Loader { lines: Lines::new(text), problems: Vec::new() }
    }

    fn report(&mut self, line: usize, error: MapError) {
        self.problems.push(Problem { line, error });
    }

    fn line_of(&self, l: &Located, fallback: usize) -> usize {
        l.span.as_ref().map_or(fallback, |s| self.lines.line(s.start))
    }

    fn wrong_type(&mut self, line: usize, at: &str, key: &str, expected: &'static str, found: &Node) {
        self.report(
            line,
            MapError::WrongType { at: at.to_owned(), key: key.to_owned(), expected, found: found.type_name() },
        );
    }

    fn invalid(&mut self, line: usize, at: &str, key: &'static str, message: impl Into<String>) {
        self.report(line, MapError::InvalidValue { at: at.to_owned(), key, message: message.into() });
    }

    fn string(&mut self, v: &Located, at: &str, key: &'static str, line: usize) -> Option<String> {
        match &v.node {
            Node::Str(s) => Some(s.clone()),
            other => {
                self.wrong_type(line, at, key, "a string", other);
                None
            }
        }
    }

    fn integer(&mut self, v: &Located, at: &str, key: &'static str, line: usize) -> Option<i64> {
        match &v.node {
            Node::Int(i) => Some(*i),
            other => {
                self.wrong_type(line, at, key, "an integer", other);
                None
            }
        }
    }

    /// A string from a fixed vocabulary.
    fn word<T>(
        &mut self,
        v: &Located,
        at: &str,
        key: &'static str,
        line: usize,
        expected: &'static str,
        parse: fn(&str) -> Option<T>,
    ) -> Option<T> {
        let s = self.string(v, at, key, line)?;
        let parsed = parse(&s);
        if parsed.is_none() {
            self.report(line, MapError::UnknownValue { at: at.to_owned(), key, value: s, expected });
        }
        parsed
    }

    fn load(&mut self, text: &str) -> Option<RegisterMap> {
        let root = match tree::parse(text) {
            Ok(root) => root,
            Err((message, span)) => {
                let line = span.map_or(1, |s| self.lines.line(s.start));
                self.report(line, MapError::Syntax(message));
                return None;
            }
        };
        let Node::Table(entries) = root.node else {
            self.wrong_type(1, "map", "(document)", "a table", &root.node);
            return None;
        };

        let mut name = None;
        let mut version = None;
        let mut word_order = None;
        let mut points = None;
        for (key, value) in &entries {
            let key_line = self.line_of(key, 1);
            let line = self.line_of(value, key_line);
            match key.key_str() {
                "name" => {
                    name = self.string(value, "map", "name", line);
                    if name.as_deref().is_some_and(|n| n.trim().is_empty()) {
                        self.invalid(line, "map", "name", "must not be empty");
                    }
                }
                "version" => {
                    if let Some(v) = self.integer(value, "map", "version", line) {
                        match u32::try_from(v) {
                            Ok(v) if v >= 1 => version = Some(v),
                            _ => self.invalid(
                                line,
                                "map",
                                "version",
                                format!("{v} is not a version number in 1..={}", u32::MAX),
                            ),
                        }
                    }
                }
                "word_order" => word_order = self.word(value, "map", "word_order", line, WORD_ORDERS, WordOrder::parse),
                "points" => points = Some((value, key_line)),
                other => self.report(
                    key_line,
                    MapError::UnknownKey { at: "map".to_owned(), key: other.to_owned(), allowed: MAP_KEYS },
                ),
            }
        }
        let has_key = |k: &str| entries.iter().any(|(key, _)| key.key_str() == k);
        for key in ["name", "version", "points"] {
            if !has_key(key) {
                self.report(1, MapError::MissingKey { at: "map".to_owned(), key });
            }
        }
        let default_order = word_order.unwrap_or_default();

        let mut drafts = Vec::new();
        if let Some((value, key_line)) = points {
            let line = self.line_of(value, key_line);
            match &value.node {
                Node::Array(items) => {
                    if items.is_empty() {
                        self.report(line, MapError::NoPoints);
                    }
                    for (i, item) in items.iter().enumerate() {
                        let item_line = self.line_of(item, line);
                        match &item.node {
                            Node::Table(fields) => {
                                drafts.push(self.point(i + 1, item_line, fields));
                            }
                            other => {
                                self.wrong_type(item_line, &format!("point `#{}`", i + 1), "points", "a table", other)
                            }
                        }
                    }
                }
                other => self.wrong_type(line, "map", "points", "an array of tables ([[points]])", other),
            }
        }

        for d in &drafts {
            self.check_point(d);
        }
        self.check_unique(&drafts);
        self.check_overlaps(&drafts);

        let points = drafts.into_iter().filter_map(|d| build_point(d, default_order)).collect();
        Some(RegisterMap { name: name?, version: version?, word_order: default_order, points })
    }

    /// Parse one point table's keys, reporting type and vocabulary problems.
    fn point(&mut self, index: usize, line: usize, fields: &[(Located, Located)]) -> Draft {
        let named = fields.iter().find_map(|(k, v)| match &v.node {
            Node::Str(s) if k.key_str() == "name" && !s.is_empty() => Some(s.as_str()),
            _ => None,
        });
        let id = named.map_or_else(|| format!("#{index}"), str::to_owned);
        let label = format!("point `{id}`");
        let at = label.as_str();
        let mut d = Draft { line, id: id.clone(), ..Draft::default() };

        for (key, value) in fields {
            let key_line = self.line_of(key, line);
            let vline = self.line_of(value, key_line);
            match key.key_str() {
                "name" => {
                    if let Some(n) = self.string(value, at, "name", vline) {
                        if n.is_empty() {
                            self.invalid(vline, at, "name", "must not be empty");
                        } else if let Some(c) = n.chars().find(|c| !(c.is_ascii_alphanumeric() || "_-.".contains(*c))) {
                            self.invalid(
                                vline,
                                at,
                                "name",
                                format!(
                                    "character {c:?} is not allowed \
                                     (use letters, digits, `_`, `-`, `.`)"
                                ),
                            );
                        } else {
                            d.name = Some((n, vline));
                        }
                    }
                }
                "kind" => {
                    d.kind = self.word(value, at, "kind", vline, KINDS, Kind::parse).map(|k| (k, vline));
                }
                "type" => {
                    d.ty = self.word(value, at, "type", vline, TYPES, DataType::parse).map(|t| (t, vline));
                }
                "role" => {
                    d.role = self.word(value, at, "role", vline, ROLES, Role::parse).map(|r| (r, vline));
                }
                "word_order" => {
                    d.word_order =
                        self.word(value, at, "word_order", vline, WORD_ORDERS, WordOrder::parse).map(|w| (w, vline));
                }
                "address" => {
                    if let Some(a) = self.integer(value, at, "address", vline) {
                        match u16::try_from(a) {
                            Ok(a) => d.address = Some((a, vline)),
                            Err(_) => self.invalid(
                                vline,
                                at,
                                "address",
                                format!("{a} is outside the 0-based address range 0..=65535"),
                            ),
                        }
                    }
                }
                "scale" => {
                    let scale = match &value.node {
                        Node::Float(f) => Some(*f),
                        Node::Int(i) => Some(*i as f64),
                        other => {
                            self.wrong_type(vline, at, "scale", "a number", other);
                            None
                        }
                    };
                    if let Some(s) = scale {
                        if s.is_finite() && s != 0.0 {
                            d.scale = Some((s, vline));
                        } else {
                            self.invalid(vline, at, "scale", "must be a finite, non-zero number");
                        }
                    }
                }
                "writable" => match &value.node {
                    Node::Bool(b) => d.writable = Some((*b, vline)),
                    other => self.wrong_type(vline, at, "writable", "true or false", other),
                },
                "unit" => d.unit = self.string(value, at, "unit", vline),
                "enum" => {
                    d.enum_line = Some(key_line);
                    self.enum_table(value, &id, vline, &mut d.enum_entries);
                }
                other => self.report(
                    key_line,
                    MapError::UnknownKey { at: at.to_owned(), key: other.to_owned(), allowed: POINT_KEYS },
                ),
            }
        }

        for key in ["name", "kind", "address", "type"] {
            if !fields.iter().any(|(k, _)| k.key_str() == key) {
                self.report(line, MapError::MissingKey { at: label.clone(), key });
            }
        }
        d
    }

    fn enum_table(&mut self, value: &Located, point: &str, line: usize, out: &mut Vec<(u16, String, usize)>) {
        let Node::Table(entries) = &value.node else {
            self.wrong_type(
                line,
                &format!("point `{point}`"),
                "enum",
                "a table such as { 0 = \"stopped\" }",
                &value.node,
            );
            return;
        };
        let point = point.to_owned();
        let mut codes: HashMap<u16, String> = HashMap::new();
        for (key, label) in entries {
            let key_line = self.line_of(key, line);
            let text = key.key_str().to_owned();
            let code =
                text.parse::<u16>().ok().filter(|_| !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()));
            let Some(code) = code else {
                self.report(key_line, MapError::EnumKey { point: point.clone(), key: text, max: u16::MAX });
                continue;
            };
            let label_text = match &label.node {
                Node::Str(s) if !s.trim().is_empty() => s.clone(),
                _ => {
                    self.report(self.line_of(label, key_line), MapError::EnumLabel { point: point.clone(), key: text });
                    continue;
                }
            };
            if let Some(prev) = codes.insert(code, text.clone()) {
                self.report(
                    key_line,
                    MapError::EnumDuplicate {
                        point: point.clone(),
                        message: format!("keys `{prev}` and `{text}` both mean code {code}"),
                    },
                );
                continue;
            }
            out.push((code, label_text, key_line));
        }
    }

    /// Rules that concern one point on its own.
    fn check_point(&mut self, d: &Draft) {
        let point = d.id.clone();
        let has_enum = d.enum_line.is_some();

        if let (Some((kind, _)), Some((ty, ty_line))) = (d.kind, d.ty) {
            if kind.is_bit() && ty != DataType::Bool {
                self.report(ty_line, MapError::TypeNotAllowed { point: point.clone(), ty, kind });
            }
        }
        if let (Some((kind, _)), Some((ty, _)), Some((address, a_line)), Some(width)) =
            (d.kind, d.ty, d.address, d.width())
        {
            let last = u32::from(address) + u32::from(width) - 1;
            if last > u32::from(u16::MAX) {
                self.report(a_line, MapError::AddressOverflow { point: point.clone(), kind, ty, address, last });
            }
        }
        if let (Some((true, w_line)), Some((kind, _))) = (d.writable, d.kind) {
            if !kind.is_writable() {
                self.report(w_line, MapError::NotWritableKind { point: point.clone(), kind });
            }
        }
        if let (Some((_, wo_line)), Some((ty, _))) = (d.word_order, d.ty) {
            if ty.registers() == 1 {
                self.report(wo_line, MapError::WordOrderUnused { point: point.clone(), ty });
            }
        }
        if let (Some(enum_line), Some((ty, _))) = (d.enum_line, d.ty) {
            if !ty.is_integer() {
                self.report(enum_line, MapError::EnumOnNonInteger { point: point.clone(), ty });
            } else if ty == DataType::I16 {
                let max = i16::MAX as u16;
                for (code, _, line) in &d.enum_entries {
                    if *code > max {
                        self.report(*line, MapError::EnumKey { point: point.clone(), key: code.to_string(), max });
                    }
                }
            }
        }

        match d.role {
            Some((role, role_line)) => {
                if let Some((ty, ty_line)) = d.ty {
                    if !ty.is_unsigned_int() {
                        self.report(ty_line, MapError::RoleType { point: point.clone(), role, ty });
                    }
                }
                if let Some((_, s_line)) = d.scale {
                    self.report(s_line, MapError::RoleScale { point: point.clone(), role });
                }
                if let Some(enum_line) = d.enum_line {
                    if !role.allows_enum() {
                        self.report(enum_line, MapError::RoleEnum { point: point.clone(), role });
                    }
                } else if role == Role::State {
                    self.report(role_line, MapError::StateWithoutEnum { point: point.clone() });
                }
                if role == Role::State {
                    for (_, label, line) in &d.enum_entries {
                        if !STATE_LABELS.contains(&label.as_str()) {
                            self.report(*line, MapError::StateLabel { point: point.clone(), label: label.clone() });
                        }
                    }
                }
                if role.requires_writable() && !matches!(d.writable, Some((true, _))) {
                    self.report(role_line, MapError::RoleNotWritable { point: point.clone(), role });
                }
            }
            None => {
                if let Some((_, s_line)) = d.scale {
                    let reason = match d.ty {
                        Some((DataType::Bool, _)) => Some("a bool cannot be scaled"),
                        _ if has_enum => Some("an enum point decodes to labels and cannot be scaled"),
                        _ => None,
                    };
                    if let Some(reason) = reason {
                        self.report(s_line, MapError::ScaleNotAllowed { point: point.clone(), reason });
                    }
                }
            }
        }
    }

    /// Duplicate names and duplicate roles.
    fn check_unique(&mut self, drafts: &[Draft]) {
        let mut names: HashMap<&str, usize> = HashMap::new();
        let mut roles: HashMap<Role, (&str, usize)> = HashMap::new();
        for d in drafts {
            if let Some((name, line)) = &d.name {
                if let Some(first) = names.get(name.as_str()) {
                    self.report(*line, MapError::DuplicateName { point: name.clone(), first_line: *first });
                } else {
                    names.insert(name, d.line);
                }
            }
            if let Some((role, line)) = d.role {
                let this = d.id.as_str();
                if let Some((other, other_line)) = roles.get(&role) {
                    self.report(
                        line,
                        MapError::DuplicateRole {
                            point: this.to_owned(),
                            role,
                            other: (*other).to_owned(),
                            other_line: *other_line,
                        },
                    );
                } else {
                    roles.insert(role, (this, d.line));
                }
            }
        }
    }

    /// Points of the same kind whose address ranges intersect. Each colliding pair found by
    /// a sweep in address order is reported once, on the point defined later in the file.
    fn check_overlaps(&mut self, drafts: &[Draft]) {
        struct Span<'a> {
            index: usize,
            kind: Kind,
            start: u32,
            end: u32,
            name: &'a str,
            line: usize,
            address_line: usize,
        }
        let mut spans: Vec<Span<'_>> = drafts
            .iter()
            .enumerate()
            .filter_map(|(index, d)| {
                let (kind, _) = d.kind?;
                let (address, address_line) = d.address?;
                let width = d.width()?;
                let start = u32::from(address);
                Some(Span {
                    index,
                    kind,
                    start,
                    end: start + u32::from(width) - 1,
                    name: d.id.as_str(),
                    line: d.line,
                    address_line,
                })
            })
            .collect();
        spans.sort_by_key(|s| (s.kind, s.start, s.index));

        let mut active: Option<usize> = None;
        for i in 0..spans.len() {
            if let Some(a) = active {
                let (prev, cur) = (&spans[a], &spans[i]);
                if prev.kind == cur.kind && cur.start <= prev.end {
                    let (later, earlier) = if cur.index > prev.index { (cur, prev) } else { (prev, cur) };
                    let error = MapError::Overlap {
                        point: later.name.to_owned(),
                        kind: later.kind,
                        start: clamp16(later.start),
                        end: clamp16(later.end),
                        other: earlier.name.to_owned(),
                        other_start: clamp16(earlier.start),
                        other_end: clamp16(earlier.end),
                        other_line: earlier.line,
                    };
                    self.report(later.address_line, error);
                }
                if prev.kind != cur.kind || cur.end > prev.end {
                    active = Some(i);
                }
            } else {
                active = Some(i);
            }
        }
    }
}

fn clamp16(v: u32) -> u16 {
    u16::try_from(v).unwrap_or(u16::MAX)
}

fn build_point(d: Draft, default_order: WordOrder) -> Option<Point> {
    let enum_values: BTreeMap<u16, String> = d.enum_entries.into_iter().map(|(code, label, _)| (code, label)).collect();
    Some(Point {
        name: d.name?.0,
        kind: d.kind?.0,
        address: d.address?.0,
        ty: d.ty?.0,
        role: d.role.map(|r| r.0),
        scale: d.scale.map(|s| s.0),
        word_order: d.word_order.map_or(default_order, |w| w.0),
        writable: d.writable.is_some_and(|w| w.0),
        enum_values,
        unit: d.unit,
        line: d.line,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_numbers_from_offsets() {
        let lines = Lines::new("ab\ncd\n\nef");
        assert_eq!(lines.line(0), 1);
        assert_eq!(lines.line(2), 1);
        assert_eq!(lines.line(3), 2);
        assert_eq!(lines.line(6), 3);
        assert_eq!(lines.line(7), 4);
        assert_eq!(lines.line(100), 4);
    }
}
