//! What `fathom-stat trace` makes of a node's trace rings: it follows them across node
//! restarts ([`follow`]), shows traced IOs as lines, waterfalls and JSON ([`view`]), and
//! writes CTF 1.8 for babeltrace2 ([`ctf`]) and OTLP/HTTP JSON for an OpenTelemetry
//! collector or Jaeger ([`otlp`]).

pub mod command;
pub mod ctf;
pub mod follow;
pub mod otlp;
pub mod view;
