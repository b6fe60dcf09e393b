//! Volume health on the node: the probes each volume runs on its reactor ([`probe`]) and
//! the monitor thread that judges every volume each second and acts ([`monitor`]). The
//! judging itself is `fathom_health`'s, sans-IO.

pub mod monitor;
pub mod probe;
