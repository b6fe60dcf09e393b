//! CTF 1.8 output of traced IOs (being written).
