"""A Sparkplug B edge node for the MES integration tests, built on an independent
implementation: payloads are encoded and decoded by `pysparkplug` (its own protobuf
bindings), MQTT is `paho-mqtt`. Nothing here comes from the MES.

One edge node with one device. Commands, one per line on stdin:

    connect              connect (will: NDEATH with this connection's bdSeq), NBIRTH, DBIRTH
    count G S N          N times: good += G, scrap += S, DDATA with aliases only
    temp X               DDATA with the Temperature metric only
    skip                 skip one seq number (a gap the host must notice)
    sleep MS             pause
    quit                 clean shutdown: NDEATH, DISCONNECT

Every command answers `ok ...` on stdout; `rebirth` is printed when an NCMD
`Node Control/Rebirth` arrives (the births are published again), `dcmd NAME=VALUE` for each
metric of a DCMD. Data go out at QoS given by --qos (the specification says 0).
"""

import argparse
import sys
import threading
import time

import paho.mqtt.client as mqtt
from pysparkplug import DataType, DBirth, DCmd, DData, Metric, NBirth, NCmd, NDeath

GOOD, SCRAP, STATE, ORDER, TEMP = 1, 2, 3, 4, 5


def now_ms():
    return int(time.time() * 1000)


class Edge:
    def __init__(self, args):
        self.a = args
        self.lock = threading.RLock()
        self.seq = 0
        self.bd_seq = 0
        self.good = 0
        self.scrap = 0
        self.order = ""
        self.temp = 20.0
        self.connected = threading.Event()
        self.client = mqtt.Client(client_id=f"edge-{args.node}-{time.time_ns()}", clean_session=True)
        self.client.on_connect = self.on_connect
        self.client.on_disconnect = lambda *_: self.connected.clear()
        self.client.on_message = self.on_message
        self.client.reconnect_delay_set(min_delay=1, max_delay=2)
        self.client.max_queued_messages_set(100000)
        self.set_will()

    def topic(self, kind, device=False):
        t = f"spBv1.0/{self.a.group}/{kind}/{self.a.node}"
        return f"{t}/{self.a.device}" if device else t

    def bd_metric(self):
        return Metric(timestamp=now_ms(), name="bdSeq", datatype=DataType.INT64, value=self.bd_seq)

    def set_will(self):
        death = NDeath(timestamp=now_ms(), bd_seq_metric=self.bd_metric())
        self.client.will_set(self.topic("NDEATH"), death.encode(), qos=1, retain=False)

    def next_seq(self):
        s = self.seq
        self.seq = (self.seq + 1) % 256
        return s

    def births(self):
        """NBIRTH (seq 0) and DBIRTH with every metric, its alias and datatype."""
        with self.lock:
            self.seq = 0
            ts = now_ms()
            node = (
                self.bd_metric(),
                Metric(timestamp=ts, name="Node Control/Rebirth", datatype=DataType.BOOLEAN, value=False),
            )
            self.publish(self.topic("NBIRTH"), NBirth(timestamp=ts, seq=self.next_seq(), metrics=node), True)
            dev = (
                Metric(timestamp=ts, name="Counts/Good", alias=GOOD, datatype=DataType.UINT64, value=self.good),
                Metric(timestamp=ts, name="Counts/Scrap", alias=SCRAP, datatype=DataType.UINT32, value=self.scrap),
                Metric(timestamp=ts, name="State", alias=STATE, datatype=DataType.STRING, value="running"),
                Metric(timestamp=ts, name="Order", alias=ORDER, datatype=DataType.STRING, value=self.order),
                Metric(timestamp=ts, name="Temperature", alias=TEMP, datatype=DataType.DOUBLE, value=self.temp),
            )
            self.publish(self.topic("DBIRTH", True), DBirth(timestamp=ts, seq=self.next_seq(), metrics=dev), True)

    def publish(self, topic, payload, dtypes, qos=0):
        self.client.publish(topic, payload.encode(include_dtypes=dtypes), qos=qos, retain=False)

    def on_connect(self, client, _userdata, _flags, rc):
        if rc != 0:
            print(f"connect failed {rc}", flush=True)
            return
        client.subscribe(self.topic("NCMD"), qos=1)
        client.subscribe(self.topic("DCMD", True), qos=1)
        self.births()
        # The next connection's will carries the next bdSeq.
        with self.lock:
            self.bd_seq = (self.bd_seq + 1) % 256
            self.set_will()
        self.connected.set()

    def on_message(self, _client, _userdata, msg):
        if "/NCMD/" in msg.topic:
            cmd = NCmd.decode(msg.payload)
            if any(m.name == "Node Control/Rebirth" and m.value for m in cmd.metrics):
                # The births of this MQTT session again: same bdSeq (the one just used).
                with self.lock:
                    self.bd_seq = (self.bd_seq - 1) % 256
                    self.births()
                    self.bd_seq = (self.bd_seq + 1) % 256
                print("rebirth", flush=True)
        elif "/DCMD/" in msg.topic:
            cmd = DCmd.decode(msg.payload)
            for m in cmd.metrics:
                if m.name == "Order":
                    with self.lock:
                        self.order = m.value
                print(f"dcmd {m.name}={m.value}", flush=True)

    def data(self, metrics):
        with self.lock:
            payload = DData(timestamp=now_ms(), seq=self.next_seq(), metrics=tuple(metrics))
            # Aliases only, no names and no datatypes: the host must know them from the DBIRTH.
            self.publish(self.topic("DDATA", True), payload, False, self.a.qos)

    def run(self):
        for line in sys.stdin:
            words = line.split()
            if not words:
                continue
            cmd = words[0]
            if cmd == "connect":
                self.client.connect(self.a.host, self.a.port, keepalive=5)
                self.client.loop_start()
                if not self.connected.wait(10):
                    print("error not connected", flush=True)
                    continue
            elif cmd == "count":
                g, s, n = int(words[1]), int(words[2]), int(words[3])
                for _ in range(n):
                    with self.lock:
                        self.good += g
                        self.scrap += s
                        metrics = [Metric(timestamp=now_ms(), name=None, alias=GOOD, datatype=DataType.UINT64, value=self.good)]
                        if s:
                            metrics.append(
                                Metric(timestamp=now_ms(), name=None, alias=SCRAP, datatype=DataType.UINT32, value=self.scrap)
                            )
                        self.data(metrics)
                    if self.a.pace_ms:
                        time.sleep(self.a.pace_ms / 1000)
            elif cmd == "temp":
                with self.lock:
                    self.temp = float(words[1])
                    self.data([Metric(timestamp=now_ms(), name=None, alias=TEMP, datatype=DataType.DOUBLE, value=self.temp)])
            elif cmd == "skip":
                with self.lock:
                    self.next_seq()
            elif cmd == "sleep":
                time.sleep(int(words[1]) / 1000)
            elif cmd == "quit":
                with self.lock:
                    self.bd_seq = (self.bd_seq - 1) % 256
                    death = NDeath(timestamp=now_ms(), bd_seq_metric=self.bd_metric())
                self.client.publish(self.topic("NDEATH"), death.encode(), qos=1).wait_for_publish(5)
                self.client.disconnect()
                self.client.loop_stop()
                print("ok quit", flush=True)
                return
            else:
                print(f"error unknown command {cmd}", flush=True)
                continue
            with self.lock:
                print(f"ok {cmd} good={self.good} scrap={self.scrap}", flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=1883)
    p.add_argument("--group", required=True)
    p.add_argument("--node", required=True)
    p.add_argument("--device", required=True)
    p.add_argument("--qos", type=int, default=0)
    p.add_argument("--pace-ms", type=float, default=0)
    Edge(p.parse_args()).run()


if __name__ == "__main__":
    main()
