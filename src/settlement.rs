//! Builds the settlement rules (standard costs, BOM inputs per work center) from the
//! plant file; the rules themselves are pure, in `mes_actors::ledger`.

use crate::plant::Plant;
use mes_actors::ledger::{Account, Input, WorkCenterSpec};
use std::collections::BTreeMap;

/// Settlement rules per work center.
#[derive(Debug, Clone, Default)]
pub struct Ledger {
    pub by_wc: BTreeMap<String, WorkCenterSpec>,
    /// The work center that makes each produced sku (the first one in the plant file).
    pub producer: BTreeMap<String, String>,
}

impl Ledger {
    pub fn from_plant(plant: &Plant) -> Ledger {
        let mut producer = BTreeMap::new();
        for w in &plant.work_centers {
            if let Some(sku) = plant.output_sku(w) {
                producer.entry(sku.to_string()).or_insert_with(|| w.id.clone());
            }
        }
        let mut memo: BTreeMap<String, i64> = BTreeMap::new();
        let mut by_wc = BTreeMap::new();
        for w in &plant.work_centers {
            if let Some(spec) = spec_for(plant, &producer, &w.id, &mut memo, 0) {
                by_wc.insert(w.id.clone(), spec);
            }
        }
        Ledger { by_wc, producer }
    }

    /// The rules for an order: its work center's, else the producer's of its sku.
    pub fn for_order(&self, work_center: Option<&str>, sku: &str) -> Option<&WorkCenterSpec> {
        work_center
            .and_then(|w| self.by_wc.get(w))
            .filter(|s| s.output_sku == sku)
            .or_else(|| self.producer.get(sku).and_then(|w| self.by_wc.get(w)))
    }

    /// Standard cost of one unit of `sku` (computed for produced skus).
    pub fn unit_cost(&self, plant: &Plant, sku: &str) -> i64 {
        match self.producer.get(sku).and_then(|w| self.by_wc.get(w)) {
            Some(spec) => spec.standard_unit_cost,
            None => plant.material(sku).map(|m| m.standard_cost.minor()).unwrap_or(0),
        }
    }

    /// The inventory account a sku is carried in.
    pub fn account(&self, sku: &str) -> Account {
        if self.producer.contains_key(sku) {
            Account::FinishedGoods
        } else {
            Account::RawMaterials
        }
    }
}

/// Depth bound for BOM recursion (the plant file rejects self-consumption; this bounds cycles).
const MAX_BOM_DEPTH: usize = 32;

fn unit_cost(
    plant: &Plant,
    producer: &BTreeMap<String, String>,
    sku: &str,
    memo: &mut BTreeMap<String, i64>,
    depth: usize,
) -> i64 {
    if let Some(c) = memo.get(sku) {
        return *c;
    }
    let cost = match producer.get(sku) {
        Some(wc) if depth < MAX_BOM_DEPTH => {
            spec_for(plant, producer, wc, memo, depth + 1).map(|s| s.standard_unit_cost).unwrap_or(0)
        }
        _ => plant.material(sku).map(|m| m.standard_cost.minor()).unwrap_or(0),
    };
    memo.insert(sku.to_string(), cost);
    cost
}

fn spec_for(
    plant: &Plant,
    producer: &BTreeMap<String, String>,
    wc_id: &str,
    memo: &mut BTreeMap<String, i64>,
    depth: usize,
) -> Option<WorkCenterSpec> {
    let w = plant.work_center(wc_id)?;
    let out_sku = plant.output_sku(w)?.to_string();
    let mut inputs = Vec::new();
    if let Some(bom) = plant.boms.iter().find(|b| b.sku == out_sku) {
        for c in &bom.components {
            let buffer = w.inputs.iter().find(|i| plant.buffer(i).is_some_and(|b| b.sku == c.sku))?.clone();
            let account = if producer.contains_key(&c.sku) { Account::FinishedGoods } else { Account::RawMaterials };
            let unit = unit_cost(plant, producer, &c.sku, memo, depth + 1);
            inputs.push(Input { sku: c.sku.clone(), per_unit: c.quantity.0, buffer, account, unit_cost: unit });
        }
    }
    let rate = w.conversion_rate_per_hour.map(|m| m.minor()).unwrap_or(0);
    Some(WorkCenterSpec::new(out_sku, w.output.clone(), inputs, rate, w.ideal_cycle_ms()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_plant_standard_costs_roll_up() {
        let plant = Plant::load(None).expect("demo plant");
        let l = Ledger::from_plant(&plant);
        // BLANK: 1 × COIL-STEEL 0.80 + 90.00/h × 0.5 s = 0.80 + 0.0125
        assert_eq!(l.by_wc["BLANK-1"].standard_unit_cost, 8_000 + 125);
        // HOUSING: 2 × BLANK + 120.00/h × 1 s
        assert_eq!(l.by_wc["FORM-1"].standard_unit_cost, 2 * 8_125 + 333);
        assert_eq!(l.by_wc["FORM-1"].inputs[0].account, Account::FinishedGoods);
        assert_eq!(l.by_wc["BLANK-1"].inputs[0].account, Account::RawMaterials);
        assert_eq!(l.unit_cost(&plant, "MOTOR"), 75_000);
        assert_eq!(l.for_order(None, "HOUSING").map(|s| s.output_sku.as_str()), Some("HOUSING"));
    }
}
