#!/usr/bin/python3
"""Strict check of an OTLP/HTTP JSON lines file, as `fathom-stat trace --otlp-file` writes it.

Usage: PYTHONPATH=<dir with opentelemetry-proto and protobuf> validate_otlp.py FILE

Every line must be one ExportTraceServiceRequest in OTLP's JSON encoding. It is checked
against that encoding's rules (lowerCamelCase keys, lowercase hex ids, integer enums, 64-bit
integers as decimal strings), then parsed strictly with the official protobuf definitions
(unknown fields are errors). The spans of the whole file must then form one tree per trace:
span ids unique in their trace, every parent either a span of the same trace or the caller's
span (a remote parent: one per trace, shared by all of the trace's roots on this node), exactly
one root when the trace starts here, no cycles, start <= end.

On success it prints a JSON summary on stdout and exits 0; otherwise it prints every problem
on stderr and exits 1 (2 when the protobuf modules are missing).

protobuf's json_format expects base64 ids and would silently mis-decode OTLP's hex ones, so
ids are checked as hex here and rewritten to base64 before json_format sees them.
"""
import base64
import collections
import copy
import json
import re
import sys

try:
    from google.protobuf import json_format
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
except ImportError as error:
    print(
        f"validate_otlp.py: {error}: PYTHONPATH must hold opentelemetry-proto 1.45.2 and "
        "protobuf 7.36.2; run scripts/test, which installs them into target/otlp-py",
        file=sys.stderr,
    )
    sys.exit(2)

HEX_ID = {"traceId": 32, "spanId": 16, "parentSpanId": 16}
CAMEL = re.compile(r"^[a-z][A-Za-z0-9]*$")
U64_STRING = re.compile(r"^(0|[1-9][0-9]{0,19})$")
I64_STRING = re.compile(r"^-?(0|[1-9][0-9]{0,18})$")
ENUMS = ("kind", "code")
TIMES = ("startTimeUnixNano", "endTimeUnixNano", "timeUnixNano")


def walk(node, path, errors):
    """Checks OTLP's JSON rules in place and rewrites hex ids to base64 for json_format."""
    if isinstance(node, dict):
        for key, value in list(node.items()):
            at = f"{path}.{key}"
            if not CAMEL.match(key):
                errors.append(f"{at}: key is not lowerCamelCase")
            if key in HEX_ID:
                digits = HEX_ID[key]
                if not isinstance(value, str):
                    errors.append(f"{at}: id is not a string")
                elif key == "parentSpanId" and value == "":
                    pass  # a root span: empty is allowed
                elif not re.fullmatch(r"[0-9a-f]{%d}" % digits, value):
                    errors.append(f"{at}: want {digits} lowercase hex digits, got {value!r}")
                elif set(value) == {"0"}:
                    errors.append(f"{at}: an all-zero id is invalid")
                else:
                    node[key] = base64.b64encode(bytes.fromhex(value)).decode()
            elif key in ENUMS:
                # bool is an int to Python, not to JSON.
                if not isinstance(value, int) or isinstance(value, bool):
                    errors.append(f"{at}: an enum must be a JSON integer, got {value!r}")
            elif key in TIMES:
                if not (isinstance(value, str) and U64_STRING.match(value)):
                    errors.append(f"{at}: want a uint64 as a decimal string, got {value!r}")
            elif key == "intValue":
                if not (isinstance(value, str) and I64_STRING.match(value)):
                    errors.append(f"{at}: want an int64 as a decimal string, got {value!r}")
            else:
                walk(value, at, errors)
    elif isinstance(node, list):
        for index, value in enumerate(node):
            walk(value, f"{path}[{index}]", errors)


def no_duplicate_keys(pairs):
    keys = [key for key, _ in pairs]
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    if duplicates:
        raise ValueError(f"duplicate keys {duplicates}")
    return dict(pairs)


def attributes(key_values):
    return {kv.key: kv.value for kv in key_values}


def check_line(text, where, errors):
    """The request on one line, parsed, or None (with its problems in errors)."""
    try:
        document = json.loads(text, object_pairs_hook=no_duplicate_keys)
    except ValueError as error:
        errors.append(f"{where}: not JSON: {error}")
        return None
    if not isinstance(document, dict):
        errors.append(f"{where}: not a JSON object")
        return None
    problems = []
    converted = copy.deepcopy(document)
    walk(converted, where, problems)
    if problems:
        errors.extend(problems)
        return None
    request = ExportTraceServiceRequest()
    try:
        json_format.Parse(json.dumps(converted), request)  # unknown fields are errors
    except json_format.ParseError as error:
        errors.append(f"{where}: json_format: {error}")
        return None
    return request


def main(path):
    errors = []
    spans = []  # (where, resource attributes, span)
    lines = resources = 0
    with open(path, encoding="utf-8") as file:
        text = file.read()
    if not text.endswith("\n"):
        errors.append("the file does not end with a newline (a torn last line?)")
    for number, line in enumerate(text.splitlines(), 1):
        where = f"line {number}"
        if not line.strip():
            errors.append(f"{where}: empty line")
            continue
        request = check_line(line, where, errors)
        if request is None:
            continue
        lines += 1
        for r, resource_spans in enumerate(request.resource_spans):
            resources += 1
            resource = attributes(resource_spans.resource.attributes)
            if resource.get("service.name") is None or not resource["service.name"].string_value:
                errors.append(f"{where} resource {r}: no service.name")
            if not resource_spans.scope_spans:
                errors.append(f"{where} resource {r}: no scopeSpans")
            for scope_spans in resource_spans.scope_spans:
                if not scope_spans.scope.name:
                    errors.append(f"{where} resource {r}: a scope without a name")
                for span in scope_spans.spans:
                    spans.append((where, resource, span))

    traces = collections.defaultdict(dict)  # trace id -> span id -> span
    for where, _, span in spans:
        name = f"{where} span {span.name!r} {span.span_id.hex()}"
        if len(span.trace_id) != 16 or len(span.span_id) != 8 or len(span.parent_span_id) not in (0, 8):
            errors.append(f"{name}: an id of the wrong length")
        if not span.name:
            errors.append(f"{name}: no name")
        if span.end_time_unix_nano < span.start_time_unix_nano:
            errors.append(f"{name}: ends ({span.end_time_unix_nano}) before it starts ({span.start_time_unix_nano})")
        if span.span_id in traces[span.trace_id]:
            errors.append(f"{name}: span id used twice in trace {span.trace_id.hex()}")
        traces[span.trace_id][span.span_id] = span

    external_parents = []
    for trace_id, members in traces.items():
        trace = trace_id.hex()
        tops = {span.parent_span_id for span in members.values() if span.parent_span_id not in members}
        roots = [span for span in members.values() if not span.parent_span_id]
        if len(tops) != 1:
            shown = sorted(top.hex() or "(none)" for top in tops)
            errors.append(f"trace {trace}: not one tree: its spans hang from {shown}")
        elif roots and len(roots) != 1:
            errors.append(f"trace {trace}: {len(roots)} root spans, want exactly one")
        elif not roots:
            external_parents.append([trace, next(iter(tops)).hex()])
        # Every span must reach the top by its parents within len(members) steps.
        for span in members.values():
            at, steps = span, 0
            while at.parent_span_id in members and steps <= len(members):
                at, steps = members[at.parent_span_id], steps + 1
            if steps > len(members):
                errors.append(f"trace {trace}: span {span.span_id.hex()} is on a cycle of parents")
                break

    if errors:
        for error in errors:
            print(error, file=sys.stderr)
        return 1
    names = collections.Counter(span.name for _, _, span in spans)
    summary = {
        "lines": lines,
        "resources": resources,
        "spans": len(spans),
        "traces": len(traces),
        "names": dict(sorted(names.items())),
        "kinds": dict(sorted(collections.Counter(str(span.kind) for _, _, span in spans).items())),
        "errors": sum(1 for _, _, span in spans if span.status.code == 2),
        "external_parents": sorted(external_parents),
        "volumes": sorted({resource["fathom.volume"].string_value for _, resource, _ in spans if "fathom.volume" in resource}),
        "nodes": sorted({resource["fathom.node"].string_value for _, resource, _ in spans if "fathom.node" in resource}),
        "start_min": min((span.start_time_unix_nano for _, _, span in spans), default=0),
        "end_max": max((span.end_time_unix_nano for _, _, span in spans), default=0),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
