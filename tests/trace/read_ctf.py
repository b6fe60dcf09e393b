#!/usr/bin/python3
"""Reads a CTF trace written by fathom's CtfWriter with babeltrace2's bt2 module and prints
it as JSON for tests/trace_ctf.rs: the trace (uuid, env), its clock, and every `io` event in
the order babeltrace2 delivers them (muxed by time across streams).

It checks what bt2 itself does not refuse: every event is an `io`, and the timestamps of each
stream never go backwards. On a failed check it prints why to stderr and exits 1.

Usage: /usr/bin/python3 tests/trace/read_ctf.py TRACE_DIR
"""
import json
import sys

import bt2


def read(path):
    trace, clock, events = None, None, []
    last_by_stream = {}
    for msg in bt2.TraceCollectionMessageIterator(path):
        if type(msg) is not bt2._EventMessageConst:
            continue
        event = msg.event
        if event.name != "io":
            raise SystemExit(f"unexpected event {event.name!r}")
        snapshot = msg.default_clock_snapshot
        stream = event.stream.id
        if snapshot.value < last_by_stream.get(stream, 0):
            raise SystemExit(
                f"stream {stream}: timestamp {snapshot.value} after {last_by_stream[stream]}"
            )
        last_by_stream[stream] = snapshot.value
        if trace is None:
            t = event.stream.trace
            trace = {
                "uuid": str(t.uuid),
                "env": {key: (str(v) if isinstance(v, bt2._StringValueConst) else int(v))
                        for key, v in t.environment.items()},
            }
            c = snapshot.clock_class
            clock = {
                "name": c.name,
                "frequency": c.frequency,
                "offset_seconds": c.offset.seconds,
                "offset_cycles": c.offset.cycles,
                "origin_is_unix_epoch": c.origin_is_unix_epoch,
            }
        p = event.payload_field
        events.append({
            "stream_id": stream,
            "cpu_id": int(event.packet.context_field["cpu_id"]),
            "ts_cycles": snapshot.value,
            "ts_ns": snapshot.ns_from_origin,
            "trace_id": str(p["trace_id"]),
            "span_id": str(p["span_id"]),
            "parent_span_id": str(p["parent_span_id"]),
            "volume": str(p["volume"]),
            "op": str(p["op"]),
            "offset": int(p["offset"]),
            "lba": int(p["lba"]),
            "len": int(p["len"]),
            "status": int(p["status"]),
            "core": int(p["core"]),
            "queue": int(p["queue"]),
            "reason": int(p["reason"]),
            "spans": [{
                "name": str(s["name"]),
                "span_id": str(s["span_id"]),
                "parent": str(s["parent"]),
                "begin_ticks": int(s["begin_ticks"]),
                "end_ticks": int(s["end_ticks"]),
            } for s in p["spans"]],
        })
    return {"trace": trace, "clock": clock, "events": events}


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    json.dump(read(sys.argv[1]), sys.stdout)
    print()
