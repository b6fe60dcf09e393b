//! Shared set-up for the engine's system tests: a data directory of their own, and DMA memory
//! from hugepages (reserved here when running as root and too few are free).

#![allow(dead_code)]

use std::sync::Once;

use fathom_engine::Config;

const HUGEPAGES: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB";

fn read(name: &str) -> u64 {
    std::fs::read_to_string(format!("{HUGEPAGES}/{name}"))
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(0)
}

/// Whether `pages` hugepages can be had: reserves more when root and short. The test scripts
/// reserve a pool for the whole run and put the old value back when it ends.
pub fn hugepages_available(pages: u64) -> bool {
    static NOTE: Once = Once::new();
    if read("free_hugepages") >= pages {
        return true;
    }
    let want = read("nr_hugepages") + pages;
    let _ = std::fs::write(format!("{HUGEPAGES}/nr_hugepages"), want.to_string());
    let ok = read("free_hugepages") >= pages;
    if !ok {
        NOTE.call_once(|| eprintln!("note: fewer than {pages} free 2 MiB hugepages and none could be reserved; these tests use normal pages"));
    }
    ok
}

/// A test node: its config and the directory that holds its data.
pub struct TestNode {
    pub config: Config,
    pub dir: tempfile::TempDir,
}

/// A config with `body` (devices and volumes) on reactor cores `cores`, 16 MiB of DMA memory.
pub fn node(cores: &[usize], body: &str) -> TestNode {
    let dir = tempfile::tempdir().expect("temporary directory");
    let config = config_in(dir.path(), cores, body);
    TestNode { config, dir }
}

pub fn config_in(dir: &std::path::Path, cores: &[usize], body: &str) -> Config {
    let cores: Vec<String> = cores.iter().map(|core| core.to_string()).collect();
    let text = format!(
        "[node]\nid = \"test\"\ndata_dir = {dir:?}\n[dma]\nsize = \"16MiB\"\nhugepages = {huge}\n\
         [reactor]\ncores = [{cores}]\nidle_spin = \"50us\"\n\
         [telemetry]\nregion = {region:?}\nmetrics = \"\"\n{body}",
        dir = dir.display().to_string(),
        huge = hugepages_available(8),
        region = dir.join("stats").display().to_string(),
        cores = cores.join(", "),
    );
    Config::parse(&text).unwrap_or_else(|error| panic!("test config: {error}\n{text}"))
}

/// Both cores where the machine has two, else core 0 twice over is not allowed: one core.
pub fn two_cores() -> Vec<usize> {
    let online = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    if online >= 2 {
        vec![0, 1]
    } else {
        vec![0]
    }
}

/// Deterministic pseudo-random bytes for a write, from `seed`.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}
