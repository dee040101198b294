//! Promo surge planning: can the plant make an extra demand by its due date?
//!
//! Pure rough-cut check: a demand, the BOM, the work centers and the stock in; net
//! requirements, per work center load against capacity, the bottleneck and proposed
//! orders out. It checks capacity over the whole horizon, it does not schedule: components
//! and assemblies are checked against the same horizon `[now, due)`, and every proposed
//! order is due at the demand's due date.
//!
//! # Net requirements
//!
//! The skus reachable from the demanded sku through the BOM are visited once each, every
//! sku after all the skus that consume it (low-level order), so a component used in
//! several places is netted once against its total gross requirement:
//!
//! - `available = on_hand − reserved` (may be ≤ 0; only a positive part is usable);
//! - `net = gross − max(0, available) − open_supply`, floored at 0, where `open_supply` is
//!   the remaining quantity of orders already open for the sku (production or purchase);
//! - a sku made by at least one work center is *produced*: its net is split across those
//!   work centers, and each component line `(component, per_unit)` of its BOM adds
//!   `net × per_unit` to the component's gross requirement;
//! - a sku no work center makes is *purchased*: its net is its `shortfall`, and its BOM,
//!   if any, is not exploded.
//!
//! A cycle among the exploded skus is an error ([`PlanError::BomCycle`]), and so is a BOM
//! deeper than [`MAX_BOM_DEPTH`] levels.
//!
//! # Capacity
//!
//! For each work center: `horizon_ms = max(0, due − now)` and
//! `capacity_units = max(0, floor(horizon_ms × oee / ideal_cycle_ms) − committed_load_units)`.
//! OEE is the measured one, or [`DEFAULT_OEE`] (flagged `oee_source: "default"`) when none
//! was measured. It is taken in millionths (rounded) so the capacity is computed in exact
//! integers; values above 1 are used as given (they mean the ideal cycle is set too slow).
//!
//! A produced sku's net is split across the work centers that make it in proportion to
//! their capacity, by largest remainder (ties to the smaller id), so the split is integer,
//! exact and deterministic. If the net exceeds the total capacity the split stays
//! proportional, so every work center is loaded past its capacity by about the same ratio.
//! If no work center has any capacity the net is split evenly.
//!
//! Per work center: `load = required / capacity` (`None` when the capacity is 0) and
//! `short_units = max(0, required − capacity)`. The bottleneck is the work center with
//! the highest load among those with `required > 0`, a required load on no capacity
//! counting as the highest; ties go to the smaller id. The plan is `feasible` when no
//! purchased material is short and no work center is over capacity.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// OEE assumed for a work center with no measured OEE.
pub const DEFAULT_OEE: f64 = 0.60;
/// Deepest BOM explored (levels below the demanded sku).
pub const MAX_BOM_DEPTH: usize = 32;
const OEE_SCALE: i128 = 1_000_000;

/// An extra demand to plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Demand {
    pub sku: String,
    pub quantity: u64,
    pub due_ms: i64,
    pub now_ms: i64,
}

/// Bill of materials: sku → its components as `(component sku, quantity per unit)`.
pub type Bom = BTreeMap<String, Vec<(String, u64)>>;

/// What planning needs to know about one work center.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkCenterCapacity {
    pub id: String,
    pub output_sku: String,
    pub ideal_cycle_ms: i64,
    /// Measured OEE, if any.
    pub oee: Option<f64>,
    /// Units of open orders still to make there.
    pub committed_load_units: u64,
}

/// Stock of one sku.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Stock {
    pub on_hand: i64,
    pub reserved: i64,
}

impl Stock {
    /// `on_hand − reserved`; may be zero or negative.
    pub fn available(&self) -> i64 {
        self.on_hand.saturating_sub(self.reserved)
    }
}

/// The plant as planning sees it.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Plant {
    pub bom: Bom,
    pub work_centers: Vec<WorkCenterCapacity>,
    /// Stock per sku; a missing sku has none.
    pub stock: BTreeMap<String, Stock>,
    /// Remaining quantity of open orders per sku, counted as supply.
    pub open_supply: BTreeMap<String, u64>,
}

/// Where a work center's OEE came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OeeSource {
    Measured,
    Default,
}

/// Net requirement of one sku.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkuRequirement {
    pub sku: String,
    pub gross: u64,
    pub available: i64,
    pub open_supply: u64,
    pub net: u64,
    /// No work center makes it.
    pub purchased: bool,
    /// Net requirement of a purchased sku (0 for produced ones).
    pub shortfall: u64,
}

/// Load of one work center.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkCenterLoad {
    pub id: String,
    pub sku: String,
    pub required_units: u64,
    pub capacity_units: u64,
    /// `required / capacity`; `None` when the capacity is 0.
    pub load: Option<f64>,
    pub oee: f64,
    pub oee_source: OeeSource,
    pub short_units: u64,
}

/// An order to open for the surge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProposedOrder {
    pub sku: String,
    pub work_center: String,
    pub quantity: u64,
    pub due_ms: i64,
}

/// The outcome of planning one demand.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SurgePlan {
    pub sku: String,
    pub quantity: u64,
    pub due_ms: i64,
    /// `max(0, due − now)`.
    pub horizon_ms: i64,
    pub feasible: bool,
    pub bottleneck: Option<String>,
    /// One per sku, consumers before their components.
    pub requirements: Vec<SkuRequirement>,
    /// Work centers making a required sku, in the order of `requirements`, then by id.
    pub work_centers: Vec<WorkCenterLoad>,
    /// Orders with a quantity, components before the assemblies consuming them, then by
    /// work center id.
    pub proposed_orders: Vec<ProposedOrder>,
}

/// Why a plan could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("BOM cycle: {}", .0.join(" → "))]
    BomCycle(Vec<String>),
    #[error("BOM deeper than {MAX_BOM_DEPTH} levels below `{0}`")]
    TooDeep(String),
    #[error("work center `{0}` appears more than once")]
    DuplicateWorkCenter(String),
    #[error("work center `{0}` has a non-positive ideal cycle")]
    InvalidIdealCycle(String),
    #[error("work center `{0}` has an OEE that is negative or not a number")]
    InvalidOee(String),
    #[error("quantity overflow while exploding `{0}`")]
    Overflow(String),
}

/// Plans `demand` on `plant` (see the module docs for the rules).
pub fn plan_surge(demand: &Demand, plant: &Plant) -> Result<SurgePlan, PlanError> {
    // Work centers per output sku, sorted by id; validated.
    let mut seen = BTreeSet::new();
    let mut makers: BTreeMap<&str, Vec<&WorkCenterCapacity>> = BTreeMap::new();
    for wc in &plant.work_centers {
        if !seen.insert(wc.id.as_str()) {
            return Err(PlanError::DuplicateWorkCenter(wc.id.clone()));
        }
        if wc.ideal_cycle_ms <= 0 {
            return Err(PlanError::InvalidIdealCycle(wc.id.clone()));
        }
        if wc.oee.is_some_and(|o| !o.is_finite() || o < 0.0) {
            return Err(PlanError::InvalidOee(wc.id.clone()));
        }
        makers.entry(wc.output_sku.as_str()).or_default().push(wc);
    }
    for list in makers.values_mut() {
        list.sort_by(|a, b| a.id.cmp(&b.id));
    }

    let order = low_level_order(&demand.sku, &plant.bom, &makers)?;

    // Net requirements, consumers first.
    let mut gross: BTreeMap<&str, u64> = BTreeMap::new();
    gross.insert(demand.sku.as_str(), demand.quantity);
    let mut requirements = Vec::with_capacity(order.len());
    for &sku in &order {
        let g = gross.get(sku).copied().unwrap_or(0);
        let available = plant.stock.get(sku).map(Stock::available).unwrap_or(0);
        let open_supply = plant.open_supply.get(sku).copied().unwrap_or(0);
        let usable = u64::try_from(available).unwrap_or(0);
        let net = g.saturating_sub(usable).saturating_sub(open_supply);
        let purchased = !makers.contains_key(sku);
        if !purchased {
            for (component, per_unit) in plant.bom.get(sku).into_iter().flatten() {
                if *per_unit == 0 {
                    continue;
                }
                let add = net.checked_mul(*per_unit).ok_or_else(|| PlanError::Overflow(sku.to_string()))?;
                let slot = gross.entry(component.as_str()).or_insert(0);
                *slot = slot.checked_add(add).ok_or_else(|| PlanError::Overflow(component.clone()))?;
            }
        }
        requirements.push(SkuRequirement {
            sku: sku.to_string(),
            gross: g,
            available,
            open_supply,
            net,
            purchased,
            shortfall: if purchased { net } else { 0 },
        });
    }

    // Capacity and load per work center.
    let horizon_ms = demand.due_ms.saturating_sub(demand.now_ms).max(0);
    let mut work_centers = Vec::new();
    for req in requirements.iter().filter(|r| !r.purchased) {
        let wcs = makers.get(req.sku.as_str()).map(Vec::as_slice).unwrap_or(&[]);
        let caps: Vec<(u64, f64, OeeSource)> = wcs.iter().map(|wc| capacity(wc, horizon_ms)).collect();
        let weights: Vec<u64> = caps.iter().map(|c| c.0).collect();
        let split = split_proportional(req.net, &weights);
        for ((wc, (capacity_units, oee, oee_source)), required_units) in wcs.iter().zip(caps).zip(split) {
            work_centers.push(WorkCenterLoad {
                id: wc.id.clone(),
                sku: req.sku.clone(),
                required_units,
                capacity_units,
                load: (capacity_units > 0).then(|| required_units as f64 / capacity_units as f64),
                oee,
                oee_source,
                short_units: required_units.saturating_sub(capacity_units),
            });
        }
    }

    let mut bottleneck: Option<&WorkCenterLoad> = None;
    for wc in work_centers.iter().filter(|w| w.required_units > 0) {
        let key = |w: &WorkCenterLoad| w.load.unwrap_or(f64::INFINITY);
        let better = match bottleneck {
            None => true,
            Some(b) => key(wc) > key(b) || (key(wc) == key(b) && wc.id < b.id),
        };
        if better {
            bottleneck = Some(wc);
        }
    }
    let bottleneck = bottleneck.map(|w| w.id.clone());
    let feasible = requirements.iter().all(|r| r.shortfall == 0) && work_centers.iter().all(|w| w.short_units == 0);

    // Components first: walk the requirements backwards, work centers of a sku by id.
    let mut proposed_orders = Vec::new();
    for req in requirements.iter().rev().filter(|r| !r.purchased) {
        let mut of_sku: Vec<&WorkCenterLoad> =
            work_centers.iter().filter(|w| w.sku == req.sku && w.required_units > 0).collect();
        of_sku.sort_by(|a, b| a.id.cmp(&b.id));
        proposed_orders.extend(of_sku.into_iter().map(|w| ProposedOrder {
            sku: w.sku.clone(),
            work_center: w.id.clone(),
            quantity: w.required_units,
            due_ms: demand.due_ms,
        }));
    }

    Ok(SurgePlan {
        sku: demand.sku.clone(),
        quantity: demand.quantity,
        due_ms: demand.due_ms,
        horizon_ms,
        feasible,
        bottleneck,
        requirements,
        work_centers,
        proposed_orders,
    })
}

/// `(capacity_units, oee used, source)` of a work center over `horizon_ms`.
fn capacity(wc: &WorkCenterCapacity, horizon_ms: i64) -> (u64, f64, OeeSource) {
    let (oee, source) = match wc.oee {
        Some(o) => (o, OeeSource::Measured),
        None => (DEFAULT_OEE, OeeSource::Default),
    };
    // Validated finite and ≥ 0; the float-to-int cast saturates on absurd values.
    let oee_millionths = (oee * OEE_SCALE as f64).round() as i128;
    let units = i128::from(horizon_ms).saturating_mul(oee_millionths) / (i128::from(wc.ideal_cycle_ms) * OEE_SCALE);
    let free = units.saturating_sub(i128::from(wc.committed_load_units)).max(0);
    (u64::try_from(free).unwrap_or(u64::MAX), oee, source)
}

/// Splits `total` in proportion to `weights` by largest remainder; ties go to the earlier
/// weight. All weights zero: an even split.
pub fn split_proportional(total: u64, weights: &[u64]) -> Vec<u64> {
    if weights.is_empty() {
        return Vec::new();
    }
    let even = vec![1u64; weights.len()];
    let weights = if weights.iter().all(|&w| w == 0) { &even[..] } else { weights };
    let sum: u128 = weights.iter().map(|&w| u128::from(w)).sum();
    let mut parts = Vec::with_capacity(weights.len());
    let mut rems = Vec::with_capacity(weights.len());
    for (i, &w) in weights.iter().enumerate() {
        let exact = u128::from(total) * u128::from(w);
        // Each part is at most `total`, so it fits.
        parts.push(u64::try_from(exact / sum).unwrap_or(u64::MAX));
        rems.push((exact % sum, i));
    }
    let given: u64 = parts.iter().sum();
    let left = total - given;
    rems.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for &(_, i) in rems.iter().take(usize::try_from(left).unwrap_or(usize::MAX)) {
        parts[i] += 1;
    }
    debug_assert_eq!(parts.iter().sum::<u64>(), total);
    parts
}

/// The skus reachable from `root` through the BOM of produced skus, every sku after all
/// its consumers (a reverse post-order of a depth-first search).
fn low_level_order<'a>(
    root: &'a str,
    bom: &'a Bom,
    makers: &BTreeMap<&str, Vec<&WorkCenterCapacity>>,
) -> Result<Vec<&'a str>, PlanError> {
    #[derive(PartialEq)]
    enum Mark {
        OnPath,
        Done,
    }
    struct Walk<'a, 'm> {
        bom: &'a Bom,
        makers: &'m BTreeMap<&'m str, Vec<&'m WorkCenterCapacity>>,
        marks: BTreeMap<&'a str, Mark>,
        path: Vec<&'a str>,
        post: Vec<&'a str>,
    }
    impl<'a> Walk<'a, '_> {
        fn visit(&mut self, sku: &'a str) -> Result<(), PlanError> {
            match self.marks.get(sku) {
                Some(Mark::Done) => return Ok(()),
                Some(Mark::OnPath) => {
                    let start = self.path.iter().position(|s| *s == sku).unwrap_or(0);
                    let mut cycle: Vec<String> = self.path[start..].iter().map(|s| s.to_string()).collect();
                    cycle.push(sku.to_string());
                    return Err(PlanError::BomCycle(cycle));
                }
                None => {}
            }
            if self.path.len() > MAX_BOM_DEPTH {
                return Err(PlanError::TooDeep(self.path.first().map(|s| s.to_string()).unwrap_or_default()));
            }
            self.marks.insert(sku, Mark::OnPath);
            self.path.push(sku);
            if self.makers.contains_key(sku) {
                for (component, per_unit) in self.bom.get(sku).into_iter().flatten() {
                    if *per_unit > 0 {
                        self.visit(component)?;
                    }
                }
            }
            self.path.pop();
            self.marks.insert(sku, Mark::Done);
            self.post.push(sku);
            Ok(())
        }
    }
    let mut walk = Walk { bom, makers, marks: BTreeMap::new(), path: Vec::new(), post: Vec::new() };
    walk.visit(root)?;
    walk.post.reverse();
    Ok(walk.post)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: i64 = 3_600_000;

    fn wc(id: &str, sku: &str, ideal_cycle_ms: i64, oee: Option<f64>, committed: u64) -> WorkCenterCapacity {
        WorkCenterCapacity {
            id: id.into(),
            output_sku: sku.into(),
            ideal_cycle_ms,
            oee,
            committed_load_units: committed,
        }
    }

    fn bom(lines: &[(&str, &[(&str, u64)])]) -> Bom {
        lines
            .iter()
            .map(|(sku, comps)| (sku.to_string(), comps.iter().map(|(c, q)| (c.to_string(), *q)).collect()))
            .collect()
    }

    fn stock(items: &[(&str, i64, i64)]) -> BTreeMap<String, Stock> {
        items
            .iter()
            .map(|(s, on_hand, reserved)| (s.to_string(), Stock { on_hand: *on_hand, reserved: *reserved }))
            .collect()
    }

    fn demand(sku: &str, quantity: u64, due_ms: i64) -> Demand {
        Demand { sku: sku.into(), quantity, due_ms, now_ms: 0 }
    }

    fn plan(d: &Demand, p: &Plant) -> SurgePlan {
        match plan_surge(d, p) {
            Ok(x) => x,
            Err(e) => panic!("unexpected error: {e}"),
        }
    }

    fn req(sku: &str, gross: u64, available: i64, open_supply: u64, net: u64, purchased: bool) -> SkuRequirement {
        let shortfall = if purchased { net } else { 0 };
        SkuRequirement { sku: sku.into(), gross, available, open_supply, net, purchased, shortfall }
    }

    fn order(sku: &str, work_center: &str, quantity: u64, due_ms: i64) -> ProposedOrder {
        ProposedOrder { sku: sku.into(), work_center: work_center.into(), quantity, due_ms }
    }

    fn loads(p: &SurgePlan) -> Vec<(&str, u64, u64, u64)> {
        p.work_centers.iter().map(|w| (w.id.as_str(), w.required_units, w.capacity_units, w.short_units)).collect()
    }

    /// WIDGET ← 2 BLANK + 4 SCREW; BLANK ← 3 SHEET; SCREW and SHEET purchased.
    /// ASSY-1 makes WIDGET (30 s, OEE 0.75, 100 committed); PRESS-1 (10 s, no OEE → 0.60,
    /// 228 committed) and PRESS-2 (20 s, OEE 0.50) make BLANK.
    fn plant() -> Plant {
        Plant {
            bom: bom(&[("WIDGET", &[("BLANK", 2), ("SCREW", 4)]), ("BLANK", &[("SHEET", 3)])]),
            work_centers: vec![
                wc("PRESS-2", "BLANK", 20_000, Some(0.5), 0),
                wc("ASSY-1", "WIDGET", 30_000, Some(0.75), 100),
                wc("PRESS-1", "BLANK", 10_000, None, 228),
            ],
            stock: stock(&[("WIDGET", 150, 50), ("BLANK", 300, 100), ("SCREW", 5_000, 0), ("SHEET", 3_000, 500)]),
            open_supply: [("WIDGET".to_string(), 100), ("SHEET".to_string(), 700)].into_iter().collect(),
        }
    }

    /// 1 000 WIDGET due in 8 h (28 800 000 ms):
    ///
    /// WIDGET: net = 1 000 − (150 − 50) − 100 = 800
    /// SCREW:  gross 800 × 4 = 3 200, available 5 000 → net 0
    /// BLANK:  gross 800 × 2 = 1 600, available 300 − 100 = 200 → net 1 400
    /// SHEET:  gross 1 400 × 3 = 4 200, available 2 500, open 700 → short 1 000
    ///
    /// ASSY-1:  28 800 000 × 0.75 / 30 000 = 720 − 100 = 620; 800 required: short 180,
    ///          load 800/620 = 1.2903
    /// PRESS-1: 28 800 000 × 0.60 / 10 000 = 1 728 − 228 = 1 500
    /// PRESS-2: 28 800 000 × 0.50 / 20 000 = 720
    /// split 1 400 over 2 220: 1 400 × 1 500 / 2 220 = 945 r 2 100, 1 400 × 720 / 2 220 =
    /// 454 r 120; one unit left → PRESS-1 (larger remainder): 946 and 454.
    #[test]
    fn two_level_surge_names_bottleneck_and_short_material() {
        let p = plan(&demand("WIDGET", 1_000, 8 * HOUR), &plant());
        assert_eq!(
            p.requirements,
            vec![
                req("WIDGET", 1_000, 100, 100, 800, false),
                req("SCREW", 3_200, 5_000, 0, 0, true),
                req("BLANK", 1_600, 200, 0, 1_400, false),
                req("SHEET", 4_200, 2_500, 700, 1_000, true),
            ]
        );
        assert_eq!(loads(&p), vec![("ASSY-1", 800, 620, 180), ("PRESS-1", 946, 1_500, 0), ("PRESS-2", 454, 720, 0)]);
        let l: Vec<_> = p.work_centers.iter().map(|w| (w.load, w.oee, w.oee_source)).collect();
        assert_eq!(
            l,
            vec![
                (Some(800.0 / 620.0), 0.75, OeeSource::Measured),
                (Some(946.0 / 1_500.0), DEFAULT_OEE, OeeSource::Default),
                (Some(454.0 / 720.0), 0.5, OeeSource::Measured),
            ]
        );
        assert_eq!(p.bottleneck.as_deref(), Some("ASSY-1"));
        assert!(!p.feasible);
        assert_eq!(p.horizon_ms, 8 * HOUR);
        assert_eq!(
            p.proposed_orders,
            vec![
                order("BLANK", "PRESS-1", 946, 8 * HOUR),
                order("BLANK", "PRESS-2", 454, 8 * HOUR),
                order("WIDGET", "ASSY-1", 800, 8 * HOUR),
            ]
        );
    }

    /// 3 000 BLANK, none in stock, sheet enough: over the 2 220 capacity the split stays
    /// proportional. 3 000 × 1 500 / 2 220 = 2 027 r 60; 3 000 × 720 / 2 220 = 972 r 2 160
    /// → PRESS-2 gets the last unit: 2 027 (short 527) and 973 (short 253).
    /// Loads 2 027 / 1 500 = 1.35133 < 973 / 720 = 1.35138: PRESS-2 is the bottleneck.
    #[test]
    fn over_capacity_stays_proportional() {
        let mut plant = plant();
        plant.stock = stock(&[("SHEET", 9_000, 0)]);
        plant.open_supply.clear();
        let p = plan(&demand("BLANK", 3_000, 8 * HOUR), &plant);
        assert_eq!(
            p.requirements,
            vec![req("BLANK", 3_000, 0, 0, 3_000, false), req("SHEET", 9_000, 9_000, 0, 0, true)]
        );
        assert_eq!(loads(&p), vec![("PRESS-1", 2_027, 1_500, 527), ("PRESS-2", 973, 720, 253)]);
        assert_eq!(p.bottleneck.as_deref(), Some("PRESS-2"));
        assert!(!p.feasible);
    }

    #[test]
    fn stock_and_open_supply_cover_the_demand() {
        // 100 WIDGET: 80 available + 30 open ≥ 100 → nothing to make or buy.
        let mut plant = plant();
        plant.stock = stock(&[("WIDGET", 90, 10)]);
        plant.open_supply = [("WIDGET".to_string(), 30)].into_iter().collect();
        let p = plan(&demand("WIDGET", 100, 8 * HOUR), &plant);
        assert_eq!(p.requirements[0], req("WIDGET", 100, 80, 30, 0, false));
        assert!(p.requirements.iter().skip(1).all(|r| r.gross == 0 && r.net == 0));
        assert!(p.feasible);
        assert_eq!(p.bottleneck, None);
        assert!(p.proposed_orders.is_empty());
        assert!(p.work_centers.iter().all(|w| w.required_units == 0 && w.load == Some(0.0)));

        // Over-reserved stock (10 − 40 = −30) counts as none: net = 100 − 0 − 30 = 70.
        plant.stock = stock(&[("WIDGET", 10, 40), ("BLANK", 0, 0), ("SCREW", 1_000, 0), ("SHEET", 1_000, 0)]);
        let p = plan(&demand("WIDGET", 100, 8 * HOUR), &plant);
        assert_eq!(p.requirements[0], req("WIDGET", 100, -30, 30, 70, false));
        // BLANK 140 on 2 220 capacity, SHEET 420 ≤ 1 000, SCREW 280 ≤ 1 000, ASSY 70 ≤ 620.
        assert!(p.feasible);
        // 140 × 1 500 / 2 220 = 94 r 1 320; 140 × 720 / 2 220 = 45 r 900 → 95 and 45.
        assert_eq!(
            p.proposed_orders,
            vec![
                order("BLANK", "PRESS-1", 95, 8 * HOUR),
                order("BLANK", "PRESS-2", 45, 8 * HOUR),
                order("WIDGET", "ASSY-1", 70, 8 * HOUR),
            ]
        );
        // Highest load: ASSY-1 70/620 = 0.1129 > PRESS-1 95/1 500 = 0.0633 > PRESS-2 45/720.
        assert_eq!(p.bottleneck.as_deref(), Some("ASSY-1"));
    }

    /// WIDGET ← 2 BLANK + 1 SHEET, BLANK ← 3 SHEET: SHEET is netted once on its total
    /// gross 10 × 1 + 20 × 3 = 70 against 50 available → short 20.
    #[test]
    fn shared_component_is_netted_once() {
        for widget in [vec![("BLANK", 2), ("SHEET", 1)], vec![("SHEET", 1), ("BLANK", 2)]] {
            let plant = Plant {
                bom: bom(&[("WIDGET", &widget), ("BLANK", &[("SHEET", 3)])]),
                work_centers: vec![wc("A", "WIDGET", 1_000, Some(1.0), 0), wc("B", "BLANK", 1_000, Some(1.0), 0)],
                stock: stock(&[("SHEET", 50, 0)]),
                open_supply: BTreeMap::new(),
            };
            let p = plan(&demand("WIDGET", 10, HOUR), &plant);
            assert_eq!(
                p.requirements,
                vec![
                    req("WIDGET", 10, 0, 0, 10, false),
                    req("BLANK", 20, 0, 0, 20, false),
                    req("SHEET", 70, 50, 0, 20, true),
                ]
            );
            assert!(!p.feasible, "short of sheet");
        }
    }

    #[test]
    fn bom_cycles_and_depth_are_errors() {
        let mut plant = Plant {
            bom: bom(&[("A", &[("B", 1)]), ("B", &[("C", 1)]), ("C", &[("B", 2)])]),
            work_centers: vec![
                wc("W-A", "A", 1_000, None, 0),
                wc("W-B", "B", 1_000, None, 0),
                wc("W-C", "C", 1_000, None, 0),
            ],
            ..Plant::default()
        };
        assert_eq!(
            plan_surge(&demand("A", 1, HOUR), &plant),
            Err(PlanError::BomCycle(vec!["B".into(), "C".into(), "B".into()]))
        );
        // A cycle through a purchased sku is never exploded.
        plant.work_centers.pop();
        assert!(plan_surge(&demand("A", 1, HOUR), &plant).is_ok());

        // S0 ← S1 ← … ← S32 is 32 levels deep: fine; one more is too deep.
        let chain = |n: usize| Plant {
            bom: (0..n).map(|i| (format!("S{i}"), vec![(format!("S{}", i + 1), 1)])).collect(),
            work_centers: (0..=n).map(|i| wc(&format!("W{i}"), &format!("S{i}"), 1_000, None, 0)).collect(),
            ..Plant::default()
        };
        let p = plan(&demand("S0", 1, HOUR), &chain(MAX_BOM_DEPTH));
        assert_eq!(p.requirements.len(), MAX_BOM_DEPTH + 1);
        assert_eq!(p.proposed_orders.first().map(|o| o.sku.as_str()), Some("S32"));
        assert_eq!(plan_surge(&demand("S0", 1, HOUR), &chain(MAX_BOM_DEPTH + 1)), Err(PlanError::TooDeep("S0".into())));
    }

    #[test]
    fn zero_horizon_has_no_capacity() {
        // Due now (and due in the past): capacity 0 everywhere, the net split evenly.
        // BLANK net 1 400 → PRESS-1 700, PRESS-2 700; WIDGET 800 → ASSY-1.
        for due in [0, -5 * HOUR] {
            let p = plan(&demand("WIDGET", 1_000, due), &plant());
            assert_eq!(p.horizon_ms, 0);
            assert_eq!(loads(&p), vec![("ASSY-1", 800, 0, 800), ("PRESS-1", 700, 0, 700), ("PRESS-2", 700, 0, 700)]);
            assert!(p.work_centers.iter().all(|w| w.load.is_none()));
            assert_eq!(p.bottleneck.as_deref(), Some("ASSY-1"), "all unbounded: smallest id");
            assert!(!p.feasible);
        }
    }

    #[test]
    fn zero_quantity_is_trivially_feasible() {
        let p = plan(&demand("WIDGET", 0, 8 * HOUR), &plant());
        assert!(p.feasible);
        assert_eq!(p.bottleneck, None);
        assert!(p.proposed_orders.is_empty());
    }

    #[test]
    fn purchased_demand_is_a_shortfall() {
        let p = plan(&demand("SCREW", 6_000, HOUR), &plant());
        assert_eq!(p.requirements, vec![req("SCREW", 6_000, 5_000, 0, 1_000, true)]);
        assert!(p.work_centers.is_empty());
        assert!(!p.feasible);
    }

    #[test]
    fn rejects_bad_work_centers() {
        let mut plant = plant();
        plant.work_centers.push(wc("ASSY-1", "WIDGET", 1_000, None, 0));
        assert_eq!(
            plan_surge(&demand("WIDGET", 1, HOUR), &plant),
            Err(PlanError::DuplicateWorkCenter("ASSY-1".into()))
        );
        plant.work_centers.pop();
        plant.work_centers.push(wc("X", "WIDGET", 0, None, 0));
        assert_eq!(plan_surge(&demand("WIDGET", 1, HOUR), &plant), Err(PlanError::InvalidIdealCycle("X".into())));
        plant.work_centers.pop();
        plant.work_centers.push(wc("X", "WIDGET", 1_000, Some(f64::NAN), 0));
        assert_eq!(plan_surge(&demand("WIDGET", 1, HOUR), &plant), Err(PlanError::InvalidOee("X".into())));
    }

    #[test]
    fn overflow_is_an_error() {
        let plant = Plant {
            bom: bom(&[("A", &[("B", u64::MAX)])]),
            work_centers: vec![wc("W", "A", 1_000, None, 0)],
            ..Plant::default()
        };
        assert_eq!(plan_surge(&demand("A", 2, HOUR), &plant), Err(PlanError::Overflow("A".into())));
    }

    #[test]
    fn largest_remainder_split() {
        // 10 × 1/3 each = 3 r 1 ×3 → first gets the extra unit.
        assert_eq!(split_proportional(10, &[1, 1, 1]), vec![4, 3, 3]);
        // 7 × 5/10 = 3 r 5, 7 × 3/10 = 2 r 1, 7 × 2/10 = 1 r 4 → 4, 2, 1.
        assert_eq!(split_proportional(7, &[5, 3, 2]), vec![4, 2, 1]);
        assert_eq!(split_proportional(5, &[0, 0]), vec![3, 2]);
        assert_eq!(split_proportional(5, &[0, 4]), vec![0, 5]);
        assert_eq!(split_proportional(0, &[3, 4]), vec![0, 0]);
        assert!(split_proportional(5, &[]).is_empty());
        assert_eq!(split_proportional(u64::MAX, &[u64::MAX, u64::MAX]), vec![u64::MAX / 2 + 1, u64::MAX / 2]);
    }
}
