//! The OpenAPI document served at `/openapi.json`, generated from the route table the
//! server registers ([`crate::http::api::table`]): a route cannot exist without its entry
//! in the document, nor the document name a route that does not exist.

use crate::config::Role;
use serde_json::{json, Map, Value};

/// What the document says about one route.
#[derive(Debug, Clone)]
pub struct RouteDoc {
    pub method: &'static str,
    /// Full path, with `{name}` parameters.
    pub path: &'static str,
    /// Least role allowed; `None`: no token needed.
    pub role: Option<Role>,
    pub summary: &'static str,
    /// Query parameters: name and JSON type.
    pub query: &'static [(&'static str, &'static str)],
    /// Request body schema, by name in `components/schemas`.
    pub body: Option<&'static str>,
    /// Success status and the response schema's name (`None`: free-form).
    pub ok: (u16, Option<&'static str>),
    /// Honours an `Idempotency-Key` header.
    pub idempotent: bool,
}

impl RouteDoc {
    pub const fn new(method: &'static str, path: &'static str, role: Option<Role>, summary: &'static str) -> Self {
        Self { method, path, role, summary, query: &[], body: None, ok: (200, None), idempotent: false }
    }
    pub const fn query(mut self, q: &'static [(&'static str, &'static str)]) -> Self {
        self.query = q;
        self
    }
    pub const fn body(mut self, schema: &'static str) -> Self {
        self.body = Some(schema);
        self
    }
    pub const fn ok(mut self, status: u16, schema: Option<&'static str>) -> Self {
        self.ok = (status, schema);
        self
    }
    pub const fn idempotent(mut self) -> Self {
        self.idempotent = true;
        self
    }
}

fn schemas() -> Value {
    let s = json!({"type": "string"});
    let i = json!({"type": "integer"});
    let money = json!({"type": "string", "description": "decimal money, e.g. \"12.3400\""});
    let ratio = json!({"type": "number", "nullable": true});
    json!({
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "object",
            "required": ["code", "message"], "properties": {"code": s, "message": s,
            "available": {"type": "integer", "description": "on insufficient_stock: what is available"}}}}},
        "NewOrder": {"type": "object", "required": ["sku", "quantity"], "additionalProperties": false, "properties": {
            "id": s, "sku": s, "quantity": {"type": "integer", "minimum": 1}, "due": {"type": "string",
            "description": "YYYY-MM-DD or RFC 3339, in the future"}, "priority": i, "work_center": s}},
        "Order": {"type": "object", "required": ["id", "sku", "quantity", "status", "good", "scrap", "consumed"],
            "properties": {"id": s, "sku": s, "quantity": i, "work_center": {"type": "string", "nullable": true},
            "status": {"type": "string", "enum": ["planned", "released", "running", "completed", "closed", "cancelled"]},
            "good": i, "scrap": i, "consumed": {"type": "object", "additionalProperties": i}, "due": {"type": "string", "nullable": true},
            "priority": i}},
        "Cluster": {"type": "object", "required": ["enabled", "nodes", "leases"],
            "properties": {"enabled": {"type": "boolean"}, "node": {"type": "string", "nullable": true},
                "nodes": {"type": "array", "items": {"type": "object"}},
                "leases": {"type": "array", "items": {"type": "object"}}}},
        "WorkCenter": {"type": "object", "required": ["id", "name", "state", "good_total", "scrap_total", "device"],
            "properties": {"id": s, "name": s, "state": s, "good_total": i, "scrap_total": i,
            "current_order": {"type": "string", "nullable": true}, "device": {"type": "object", "properties": {"status": s}},
            "oee": {"type": "object", "nullable": true, "properties": {"availability": ratio, "performance": ratio,
            "quality": ratio, "oee": ratio}}}},
        "Oee": {"type": "object", "properties": {"availability": ratio, "performance": ratio, "quality": ratio, "oee": ratio,
            "planned_busy_ms": i, "run_ms": i, "good": i, "scrap": i, "losses": {"type": "object", "properties": {
            "breakdowns_ms": i, "setup_changeover_ms": i, "micro_stops_ms": i, "reduced_speed_ms": i,
            "startup_rejects": i, "production_rejects": i}}, "downtime_by_reason": {"type": "array", "items": {"type": "object"}}}},
        "Command": {"type": "object", "required": ["cmd"], "additionalProperties": false, "properties": {
            "cmd": {"type": "string", "enum": ["start", "stop"]}}},
        "PointWrite": {"type": "object", "required": ["value"], "additionalProperties": false, "properties": {
            "value": {"type": "integer", "minimum": 0}}},
        "NewReservation": {"type": "object", "required": ["sku", "quantity", "ref"], "additionalProperties": false,
            "properties": {"sku": s, "quantity": {"type": "integer", "minimum": 1}, "ref": s}},
        "Reservation": {"type": "object", "properties": {"id": s, "ref": s, "sku": s, "quantity": i, "status": s}},
        "NewAdjustment": {"type": "object", "required": ["buffer", "quantity", "reason", "ref"], "additionalProperties": false,
            "properties": {"buffer": s, "sku": s, "quantity": {"type": "integer", "minimum": -1_000_000_000,
            "maximum": 1_000_000_000, "not": {"enum": [0]}, "description": "signed, non-zero"},
            "reason": {"type": "string", "minLength": 1, "maxLength": 500}, "ref": {"type": "string", "minLength": 1,
            "maxLength": 200, "description": "idempotency key: a repeated ref returns the first adjustment"}}},
        "Adjustment": {"type": "object", "required": ["id", "ref", "buffer", "sku", "quantity", "reason", "on_hand"],
            "properties": {"id": s, "ref": s, "buffer": s, "sku": s, "quantity": i, "reason": s, "on_hand": i, "by": s,
            "created_at": s}},
        "StockMovement": {"type": "object", "required": ["id", "buffer", "sku", "quantity", "kind", "source"],
            "properties": {"id": i, "at": s, "buffer": s, "sku": s, "quantity": i, "kind": s,
            "order": {"type": "string", "nullable": true}, "source": {"type": "object", "required": ["kind", "id"],
            "properties": {"kind": {"type": "string", "description": "plant | telemetry | reservation | adjustment"},
            "id": s}}}},
        "InventoryRow": {"type": "object", "required": ["sku", "on_hand", "reserved", "available"], "properties": {
            "sku": s, "on_hand": i, "reserved": i, "available": i}},
        "TrialBalance": {"type": "object", "required": ["accounts", "total_debits", "total_credits"], "properties": {
            "accounts": {"type": "array", "items": {"type": "object", "properties": {"account": s, "name": s,
            "debit": money, "credit": money}}}, "total_debits": money, "total_credits": money}},
        "OrderCost": {"type": "object", "properties": {"standard": money, "actual": money, "variances": {"type": "object",
            "properties": {"material_usage": money, "efficiency": money, "yield": money}}}},
        "NewSurgePlan": {"type": "object", "required": ["sku", "quantity", "due"], "additionalProperties": false,
            "properties": {"sku": s, "quantity": {"type": "integer", "minimum": 1}, "due": {"type": "string",
            "description": "RFC 3339 or YYYY-MM-DD, in the future"}}},
        "SurgePlan": {"type": "object", "properties": {"id": s, "status": s, "sku": s, "quantity": i, "feasible": {"type": "boolean"},
            "bottleneck": {"type": "string", "nullable": true}, "requirements": {"type": "array", "items": {"type": "object"}},
            "work_centers": {"type": "array", "items": {"type": "object"}}, "proposed_orders": {"type": "array", "items": {"type": "object"}}}},
    })
}

/// The document for `routes`.
pub fn document(routes: &[RouteDoc]) -> Value {
    let mut paths: Map<String, Value> = Map::new();
    for r in routes {
        let mut op = Map::new();
        op.insert("summary".into(), json!(r.summary));
        let role =
            r.role.map(|x| format!("Role: {} or higher.", x.as_str())).unwrap_or_else(|| "No token needed.".into());
        op.insert("description".into(), json!(role));
        if r.role.is_some() {
            op.insert("security".into(), json!([{"bearer": []}]));
        } else {
            op.insert("security".into(), json!([]));
        }
        let mut params: Vec<Value> = Vec::new();
        let mut rest = r.path;
        while let Some(start) = rest.find('{') {
            let Some(len) = rest[start..].find('}') else { break };
            let name = &rest[start + 1..start + len];
            params.push(json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}));
            rest = &rest[start + len..];
        }
        for (name, ty) in r.query {
            params.push(json!({"name": name, "in": "query", "required": false, "schema": {"type": ty}}));
        }
        if r.idempotent {
            params.push(json!({"name": "Idempotency-Key", "in": "header", "required": false,
                               "schema": {"type": "string", "minLength": 1, "maxLength": 200}}));
        }
        if !params.is_empty() {
            op.insert("parameters".into(), Value::Array(params));
        }
        if let Some(b) = r.body {
            op.insert(
                "requestBody".into(),
                json!({"required": true, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{b}")}}}}),
            );
        }
        let ok_schema = match r.ok.1 {
            Some(name) if name.starts_with('[') => {
                json!({"type": "array", "items": {"$ref": format!("#/components/schemas/{}", name.trim_matches(['[', ']']))}})
            }
            Some(name) => json!({"$ref": format!("#/components/schemas/{name}")}),
            None => json!({}),
        };
        let content_type = match r.path {
            "/metrics" => "text/plain",
            "/" => "text/html",
            "/api/v1/events" => "text/event-stream",
            _ => "application/json",
        };
        let mut responses = Map::new();
        responses
            .insert(r.ok.0.to_string(), json!({"description": "OK", "content": {content_type: {"schema": ok_schema}}}));
        let errors: &[u16] = if r.role.is_some() { &[400, 401, 403, 404, 409, 422, 503] } else { &[503] };
        for code in errors {
            responses.insert(code.to_string(), json!({"$ref": "#/components/responses/Error"}));
        }
        op.insert("responses".into(), Value::Object(responses));
        let entry = paths.entry(r.path.to_string()).or_insert_with(|| json!({}));
        if let Some(m) = entry.as_object_mut() {
            m.insert(r.method.to_ascii_lowercase(), Value::Object(op));
        }
    }
    json!({
        "openapi": "3.0.3",
        "info": {"title": "MES API", "version": "1", "description":
            "Errors are {\"error\": {\"code\", \"message\"}}. Money is a decimal string; quantities are integers."},
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": schemas(),
            "responses": {"Error": {"description": "Error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}},
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_parameters_and_roles() {
        let d = document(&[
            RouteDoc::new("GET", "/api/v1/orders/{id}", Some(Role::Viewer), "One order").ok(200, Some("Order")),
            RouteDoc::new("POST", "/api/v1/orders", Some(Role::Planner), "Create")
                .body("NewOrder")
                .ok(201, Some("Order"))
                .idempotent(),
        ]);
        let get = &d["paths"]["/api/v1/orders/{id}"]["get"];
        assert_eq!(get["parameters"][0]["name"], "id");
        assert_eq!(get["description"], "Role: viewer or higher.");
        let post = &d["paths"]["/api/v1/orders"]["post"];
        assert_eq!(
            post["requestBody"]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/NewOrder"
        );
        assert_eq!(post["parameters"][0]["name"], "Idempotency-Key");
        assert!(post["responses"]["201"].is_object());
        // Every referenced schema exists.
        let text = d.to_string();
        for name in ["Order", "NewOrder", "Error"] {
            assert!(text.contains(&format!("#/components/schemas/{name}")));
            assert!(d["components"]["schemas"][name].is_object(), "{name}");
        }
    }
}
