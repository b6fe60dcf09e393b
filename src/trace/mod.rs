//! What `fathom-stat trace` makes of a node's trace rings: CTF 1.8 for babeltrace2
//! ([`ctf`]) and OTLP/HTTP JSON for an OpenTelemetry collector or Jaeger ([`otlp`]).

pub mod ctf;
pub mod otlp;
