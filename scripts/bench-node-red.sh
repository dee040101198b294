#!/usr/bin/env bash
# The Node-RED peer baseline of `mes bench node-red` (docs/BENCHMARKS.md).
#
#   scripts/bench-node-red.sh install
#       installs node-red@4 and node-red-node-sqlite from npm into target/bench/node-red/
#       (Node-RED 5 needs Node >= 22; node-red-node-sqlite builds sqlite3 from source).
#   scripts/bench-node-red.sh run DIR BROKER_PORT HTTP_PORT DB TOPIC
#       writes DIR/settings.js and DIR/flows.json, then runs Node-RED headless in the
#       foreground (exec: the process id stays the same) on 127.0.0.1:HTTP_PORT with the
#       flow  MQTT in (TOPIC, QoS 1) -> JSON parse -> SQLite INSERT OR IGNORE into DB.
#       DB must already hold the `telemetry` table (the driver creates it).
#
# The same job as the MES's ingest, without the MES's work: one row per message with its
# idempotency key (device, boot, seq) and nothing else (no delta, no settlement).
set -euo pipefail
cd "$(dirname "$0")/.."
NR=target/bench/node-red

case "${1:-}" in
install)
  if [ -f "$NR/node_modules/node-red/red.js" ] \
    && [ -f "$NR/node_modules/sqlite3/build/Release/node_sqlite3.node" ]; then
    exit 0
  fi
  mkdir -p "$NR"
  # npm 11 runs a dependency's install script only when package.json allows it; sqlite3's
  # builds the native module. Its prebuilt binaries are not downloadable here: build from
  # source, against the local Node headers when they are installed.
  echo '{"name":"mes-bench-node-red","private":true,"allowScripts":{"sqlite3":true}}' >"$NR/package.json"
  export npm_config_build_from_source=true
  if [ -f /usr/include/node/node.h ]; then export npm_config_nodedir=/usr; fi
  echo "installing node-red@4 and node-red-node-sqlite into $NR (npm; sqlite3 compiles, ~2 min) ..." >&2
  (cd "$NR" && npm install --no-audit --no-fund --loglevel=error node-red@4 node-red-node-sqlite@1 >&2)
  [ -f "$NR/node_modules/sqlite3/build/Release/node_sqlite3.node" ] || {
    echo "sqlite3 was not built: see npm's output above" >&2
    exit 1
  }
  ;;
run)
  [ $# -eq 6 ] || { echo "usage: $0 run DIR BROKER_PORT HTTP_PORT DB TOPIC" >&2; exit 2; }
  dir=$2 broker_port=$3 http_port=$4 db=$5 topic=$6
  mkdir -p "$dir"
  cat >"$dir/settings.js" <<EOF
module.exports = {
  uiHost: "127.0.0.1",
  uiPort: $http_port,
  flowFile: "flows.json",
  credentialSecret: false,
  disableEditor: true,
  httpAdminRoot: "/admin",
  logging: { console: { level: "warn", metrics: false, audit: false } },
  editorTheme: { tours: false, projects: { enabled: false } },
  externalModules: { autoInstall: false, palette: { allowInstall: false } },
};
EOF
  # The device id is the topic's third level: <prefix>/devices/<device>/telemetry.
  cat >"$dir/flows.json" <<EOF
[
  { "id": "tab1", "type": "tab", "label": "bench" },
  { "id": "broker1", "type": "mqtt-broker", "name": "bench broker", "broker": "127.0.0.1",
    "port": "$broker_port", "clientid": "node-red-bench", "autoConnect": true, "usetls": false,
    "protocolVersion": "4", "keepalive": "60", "cleansession": true,
    "birthTopic": "", "closeTopic": "", "willTopic": "" },
  { "id": "db1", "type": "sqlitedb", "db": "$db", "mode": "RWC" },
  { "id": "in1", "type": "mqtt in", "z": "tab1", "name": "telemetry", "topic": "$topic",
    "qos": "1", "datatype": "utf8", "broker": "broker1", "nl": false, "rap": false,
    "inputs": 0, "x": 100, "y": 100, "wires": [["json1"]] },
  { "id": "json1", "type": "json", "z": "tab1", "name": "parse", "property": "payload",
    "action": "obj", "pretty": false, "x": 250, "y": 100, "wires": [["fn1"]] },
  { "id": "fn1", "type": "function", "z": "tab1", "name": "row",
    "func": "const p = msg.payload;\nconst device = msg.topic.split('/')[2];\nif (!p || typeof p.seq !== 'number' || typeof p.boot !== 'number') { return null; }\nmsg.params = { \$device: device, \$boot: p.boot, \$seq: p.seq, \$good: p.good, \$scrap: p.scrap, \$state: p.state, \$ts: p.ts, \$received: Date.now() };\nreturn msg;",
    "outputs": 1, "x": 400, "y": 100, "wires": [["sql1"]] },
  { "id": "sql1", "type": "sqlite", "z": "tab1", "mydb": "db1", "sqlquery": "prepared",
    "sql": "INSERT OR IGNORE INTO telemetry (device, boot, seq, good, scrap, state, ts, received_ms) VALUES (\$device, \$boot, \$seq, \$good, \$scrap, \$state, \$ts, \$received)",
    "name": "insert", "x": 550, "y": 100, "wires": [[]] },
  { "id": "once1", "type": "inject", "z": "tab1", "name": "pragma", "props": [],
    "repeat": "", "once": true, "onceDelay": "0.1", "topic": "", "x": 100, "y": 200, "wires": [["pragma1"]] },
  { "id": "pragma1", "type": "sqlite", "z": "tab1", "mydb": "db1", "sqlquery": "fixed",
    "sql": "PRAGMA synchronous=NORMAL", "name": "as the MES", "x": 300, "y": 200, "wires": [[]] }
]
EOF
  exec node --max-old-space-size=1024 "$NR/node_modules/node-red/red.js" \
    --userDir "$dir" --settings "$dir/settings.js" flows.json
  ;;
*)
  echo "usage: $0 install | run DIR BROKER_PORT HTTP_PORT DB TOPIC" >&2
  exit 2
  ;;
esac
