//! OTLP/HTTP JSON output of traced IOs (being written).
