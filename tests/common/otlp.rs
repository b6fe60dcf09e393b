//! The strict OTLP JSON validator (tests/trace/validate_otlp.py, with the official
//! opentelemetry-proto definitions), for the tests that check what fathom-stat trace exports.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

const VALIDATOR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/trace/validate_otlp.py");

/// Where opentelemetry-proto and protobuf are installed for the validator: `FATHOM_OTLP_PY`
/// (scripts/test sets it), else the workspace's target/otlp-py.
pub fn python_path() -> PathBuf {
    let dir = std::env::var_os("FATHOM_OTLP_PY")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/otlp-py"));
    assert!(
        dir.join("opentelemetry/proto").is_dir(),
        "{} holds no opentelemetry-proto: run scripts/test, which installs opentelemetry-proto \
         1.45.2 and protobuf 7.36.2 there, or point FATHOM_OTLP_PY at a directory that has them",
        dir.display()
    );
    dir
}

/// The validator's summary of `file`, or what it found wrong.
pub fn validate(file: &Path) -> Result<Value, String> {
    let output = Command::new("/usr/bin/python3")
        .arg(VALIDATOR)
        .arg(file)
        .env("PYTHONPATH", python_path())
        .output()
        .expect("run /usr/bin/python3");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    match output.status.code() {
        Some(0) => Ok(serde_json::from_slice(&output.stdout)
            .unwrap_or_else(|e| panic!("the validator's summary is not JSON ({e}): {stderr}"))),
        Some(1) => Err(stderr),
        other => panic!("the validator could not run ({other:?}): {stderr}"),
    }
}
