//! The NBD front end with Debian's real clients: qemu-io, qemu-img, nbdinfo, nbdcopy and fio's
//! nbd engine against a running fathom-node, plus a hand-written client for what real
//! clients never send (garbage, cut handshakes, out-of-range and oversized requests).
//!
//! scripts/test installs the clients (qemu-utils, libnbd-bin, fio); without them these tests
//! fail and say which package to install.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

const NODE: &str = env!("CARGO_BIN_EXE_fathom-node");
const STAT: &str = env!("CARGO_BIN_EXE_fathom-stat");

mod common;

use common::{Node, VOLUME_BYTES};

/// Runs a client program; fails the test with its output (or the package to install).
fn run(program: &str, args: &[&str]) -> Output {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|error| {
            let package = match program {
                "qemu-io" | "qemu-img" | "qemu-nbd" => "qemu-utils",
                "nbdinfo" | "nbdcopy" => "libnbd-bin",
                other => other,
            };
            panic!("cannot run {program} ({error}): install Debian's {package} (scripts/test does)")
        });
    assert!(
        output.status.success(),
        "{program} {args:?} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A file of `bytes` of deterministic, incompressible data with zeroed stretches (so that
/// copies exercise both data and zero/trim paths).
fn image(path: &Path, bytes: u64, seed: u64) {
    let mut state = seed | 1;
    let mut data = vec![0u8; bytes as usize];
    for (index, chunk) in data.chunks_mut(64 << 10).enumerate() {
        if index % 5 == 3 {
            continue; // 64 KiB of zeros
        }
        for byte in chunk {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *byte = state as u8;
        }
    }
    std::fs::write(path, data).unwrap();
}

#[test]
fn qemu_io_writes_a_pattern_and_reads_it_back_on_a_new_connection() {
    let node = Node::start();
    let uri = node.uri("vol0");
    let write = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            &uri,
            "-c",
            "write -P 0xa5 0 1M",
            "-c",
            "write -P 0x5a 1M 64k",
            "-c",
            "write -z 2M 128k",
            "-c",
            "flush",
            "-c",
            "read -P 0xa5 0 1M",
        ],
    );
    let text = stdout(&write);
    assert!(text.contains("wrote 1048576/1048576 bytes"), "{text}");
    assert!(!text.contains("Pattern verification failed"), "{text}");
    // A second client, a new connection: the data is the volume's, not the connection's.
    let read = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            &uri,
            "-c",
            "read -P 0xa5 0 1M",
            "-c",
            "read -P 0x5a 1M 64k",
            "-c",
            "read -P 0 2M 128k",
            "-c",
            "read -P 0 63M 1M",
        ],
    );
    let text = stdout(&read);
    assert!(!text.contains("Pattern verification failed"), "{text}");
    assert_eq!(text.matches("read ").count(), 4, "{text}");
    // A pattern that is not there is caught (the check is real).
    let wrong = Command::new("qemu-io")
        .args(["-f", "raw", &uri, "-c", "read -P 0x11 0 4k"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&wrong.stdout).contains("Pattern verification failed"),
        "{}",
        String::from_utf8_lossy(&wrong.stdout)
    );
    let log = node.stop();
    assert!(log.contains("NBD client connected"), "{log}");
}

#[test]
fn qemu_img_converts_an_image_into_and_out_of_a_volume_unchanged() {
    let node = Node::start();
    let source = node.path("source.img");
    image(&source, VOLUME_BYTES, 7);
    let uri = node.uri("vol1");
    let source_arg = source.display().to_string();
    run(
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw", &source_arg, &uri],
    );
    let copy = node.path("copy.img");
    let copy_arg = copy.display().to_string();
    run(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", &uri, &copy_arg],
    );
    assert!(
        std::fs::read(&source).unwrap() == std::fs::read(&copy).unwrap(),
        "the image read back from the volume differs from the one written"
    );
    let compare = run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &source_arg, &uri],
    );
    assert!(
        stdout(&compare).contains("Images are identical"),
        "{}",
        stdout(&compare)
    );
}

#[test]
fn nbdinfo_lists_every_volume_with_its_size_and_block_sizes() {
    let node = Node::start();
    let list = run(
        "nbdinfo",
        &["--list", "--json", &format!("nbd://{}", node.address)],
    );
    let json: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    let exports = json["exports"].as_array().expect("exports");
    let names: Vec<&str> = exports
        .iter()
        .map(|export| export["export-name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["vol0", "vol1"], "{json}");
    for export in exports {
        assert_eq!(export["export-size"], VOLUME_BYTES, "{export}");
        assert_eq!(export["block_size_minimum"], 512, "{export}");
        assert_eq!(export["block_size_preferred"], 4096, "{export}");
        assert!(
            export["block_size_maximum"].as_u64().unwrap() >= 128 << 10,
            "{export}"
        );
        assert_eq!(export["can_flush"], true, "{export}");
        assert_eq!(export["can_fua"], true, "{export}");
        assert_eq!(export["can_zero"], true, "{export}");
        assert_eq!(export["can_multi_conn"], true, "{export}");
        assert_eq!(export["is_read_only"], false, "{export}");
    }
    assert!(
        exports[0]["description"].as_str().unwrap().contains("vol0"),
        "{json}"
    );
    // An export that does not exist is refused by name.
    let missing = Command::new("nbdinfo")
        .arg(node.uri("nope"))
        .output()
        .unwrap();
    assert!(!missing.status.success());
    let text = String::from_utf8_lossy(&missing.stderr);
    assert!(text.contains("nope"), "{text}");
}

#[test]
fn nbdcopy_copies_between_a_file_and_volumes_over_several_connections() {
    let node = Node::start();
    let source = node.path("source.img");
    image(&source, VOLUME_BYTES, 11);
    let source_arg = source.display().to_string();
    // nbdcopy opens several connections per export when the server allows multi-conn.
    run(
        "nbdcopy",
        &["--connections=4", &source_arg, &node.uri("vol0")],
    );
    run("nbdcopy", &[&node.uri("vol0"), &node.uri("vol1")]);
    let copy = node.path("copy.img");
    let copy_arg = copy.display().to_string();
    run("nbdcopy", &[&node.uri("vol1"), &copy_arg]);
    assert!(
        std::fs::read(&source).unwrap() == std::fs::read(&copy).unwrap(),
        "file -> vol0 -> vol1 -> file changed the data"
    );
}

#[test]
fn fio_nbd_engine_verifies_what_it_wrote() {
    let node = Node::start();
    let uri = node.uri("vol0");
    let output = run(
        "fio",
        &[
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bsrange=4k-64k",
            "--size=32M",
            "--iodepth=32",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--output-format=json",
        ],
    );
    // fio's nbd engine prints "fio: connected to NBD server" ahead of the JSON.
    let text = stdout(&output);
    let json: serde_json::Value = serde_json::from_str(&text[text.find('{').unwrap_or(0)..])
        .unwrap_or_else(|error| panic!("fio output: {error}\n{text}"));
    let job = &json["jobs"][0];
    assert_eq!(job["error"], 0, "{job}");
    assert!(
        job["write"]["io_bytes"].as_u64().unwrap() >= 32 << 20,
        "{job}"
    );
    assert!(
        job["read"]["io_bytes"].as_u64().unwrap() >= 32 << 20,
        "{job}"
    );
}

#[test]
fn telemetry_times_nbd_requests_from_socket_to_socket() {
    let node = Node::start();
    let uri = node.uri("vol0");
    // Reads for 3 s while fathom-stat takes two 1 s reports.
    let fio = Command::new("fio")
        .args([
            "--name=load",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randread",
            "--bs=4k",
            "--size=16M",
            "--iodepth=8",
            "--time_based=1",
            "--runtime=3",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("fio (install Debian's fio; scripts/test does)");
    std::thread::sleep(Duration::from_millis(700));
    let stat = Command::new(STAT)
        .args([
            "--region",
            &node.path("stats").display().to_string(),
            "--json",
            "1",
            "2",
        ])
        .output()
        .unwrap();
    let mut fio = fio;
    assert!(fio.wait().unwrap().success());
    assert!(
        stat.status.success(),
        "{}",
        String::from_utf8_lossy(&stat.stderr)
    );
    let text = String::from_utf8(stat.stdout).unwrap();
    let report: serde_json::Value =
        serde_json::from_str(text.lines().last().expect("a report")).unwrap();
    let row = report["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|row| row["volume"] == "vol0" && row["op"] == "read")
        .unwrap_or_else(|| panic!("no vol0 read row: {report}"));
    let stage = |name: &str| {
        row["stages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|stage| stage["stage"] == name)
            .unwrap_or_else(|| panic!("no {name} stage: {row}"))
            .clone()
    };
    let (receive, device, reply, total) = (
        stage("receive"),
        stage("device"),
        stage("reply"),
        stage("total"),
    );
    let ios = device["count"].as_f64().unwrap();
    assert!(ios > 100.0, "{row}");
    for (name, stage) in [("receive", &receive), ("reply", &reply), ("total", &total)] {
        let count = stage["count"].as_f64().unwrap();
        // Every IO of the interval passed through the front-end stages too. The stages of an
        // IO are recorded at different moments and a reader copies one histogram after the
        // other while the node goes on, so the counts differ by what is in flight at the
        // interval's edges plus what completes during the copy.
        assert!(
            (count - ios).abs() <= (ios * 0.05).max(2.0 * 8.0 + 1.0),
            "{name} count {count} against {ios} device completions: {row}"
        );
    }
    // Socket to socket spans the device and the front end.
    let p50 = |stage: &serde_json::Value| stage["p50_ns"].as_f64().unwrap();
    assert!(p50(&total) >= p50(&device), "{row}");
    assert!(
        p50(&total) >= p50(&reply) && p50(&total) >= p50(&receive),
        "{row}"
    );
}

/// A minimal NBD client: fixed newstyle handshake with NBD_OPT_GO, then raw requests.
struct RawClient {
    stream: TcpStream,
}

const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

impl RawClient {
    fn connect(address: SocketAddr) -> TcpStream {
        let stream = TcpStream::connect(address).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream
    }

    fn open(address: SocketAddr, export: &str) -> RawClient {
        let mut stream = Self::connect(address);
        let mut greeting = [0u8; 18];
        stream.read_exact(&mut greeting).unwrap();
        assert_eq!(&greeting[..8], b"NBDMAGIC");
        assert_eq!(&greeting[8..16], b"IHAVEOPT");
        // Client flags: fixed newstyle, no zeroes.
        stream.write_all(&3u32.to_be_bytes()).unwrap();
        let mut option = Vec::new();
        option.extend_from_slice(b"IHAVEOPT");
        option.extend_from_slice(&7u32.to_be_bytes()); // NBD_OPT_GO
        option.extend_from_slice(&(4 + export.len() as u32 + 2).to_be_bytes());
        option.extend_from_slice(&(export.len() as u32).to_be_bytes());
        option.extend_from_slice(export.as_bytes());
        option.extend_from_slice(&0u16.to_be_bytes());
        stream.write_all(&option).unwrap();
        loop {
            let mut header = [0u8; 20];
            stream.read_exact(&mut header).unwrap();
            let reply = u32::from_be_bytes(header[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(header[16..20].try_into().unwrap());
            let mut data = vec![0u8; len as usize];
            stream.read_exact(&mut data).unwrap();
            match reply {
                1 => break, // ACK
                3 => {}     // INFO
                other => panic!("NBD_OPT_GO refused: reply {other:#x} {data:?}"),
            }
        }
        RawClient { stream }
    }

    fn request(&mut self, command: u16, flags: u16, cookie: u64, offset: u64, length: u32) {
        let mut header = Vec::with_capacity(28);
        header.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        header.extend_from_slice(&flags.to_be_bytes());
        header.extend_from_slice(&command.to_be_bytes());
        header.extend_from_slice(&cookie.to_be_bytes());
        header.extend_from_slice(&offset.to_be_bytes());
        header.extend_from_slice(&length.to_be_bytes());
        self.stream.write_all(&header).unwrap();
    }

    /// Reads a simple reply: (cookie, error).
    fn reply(&mut self) -> (u64, u32) {
        let mut reply = [0u8; 16];
        self.stream.read_exact(&mut reply).unwrap();
        assert_eq!(
            u32::from_be_bytes(reply[..4].try_into().unwrap()),
            SIMPLE_REPLY_MAGIC
        );
        (
            u64::from_be_bytes(reply[8..16].try_into().unwrap()),
            u32::from_be_bytes(reply[4..8].try_into().unwrap()),
        )
    }

    fn closed(&mut self) -> bool {
        let mut byte = [0u8; 1];
        matches!(self.stream.read(&mut byte), Ok(0) | Err(_))
    }
}

const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;

#[test]
fn bad_requests_get_protocol_errors_and_the_connection_and_node_carry_on() {
    let node = Node::start();
    let mut client = RawClient::open(node.address, "vol0");
    // Write 4 KiB of 0x77 at 8 KiB, to check later that nothing else changed it.
    client.request(1, 0, 1, 8192, 4096);
    client.stream.write_all(&[0x77; 4096]).unwrap();
    assert_eq!(client.reply(), (1, 0));
    // Beyond the end: EINVAL for a read, ENOSPC for a write (its payload is skipped).
    client.request(0, 0, 2, VOLUME_BYTES - 512, 4096);
    assert_eq!(client.reply(), (2, EINVAL));
    client.request(1, 0, 3, VOLUME_BYTES, 4096);
    client.stream.write_all(&[0xee; 4096]).unwrap();
    assert_eq!(client.reply(), (3, ENOSPC));
    // Misaligned to the 512-byte minimum block.
    client.request(0, 0, 4, 100, 512);
    assert_eq!(client.reply(), (4, EINVAL));
    // Larger than the advertised maximum block (1 MiB on this device): refused, and the
    // payload is skipped so the stream stays in step.
    client.request(1, 0, 5, 0, 2 << 20);
    client.stream.write_all(&vec![0xdd; 2 << 20]).unwrap();
    assert_eq!(client.reply(), (5, EINVAL));
    // Unknown command, unknown flag.
    client.request(0x55, 0, 6, 0, 512);
    assert_eq!(client.reply(), (6, EINVAL));
    client.request(0, 0x8000, 7, 0, 512);
    assert_eq!(client.reply(), (7, EINVAL));
    // The connection still serves, and the data is intact.
    client.request(0, 0, 8, 8192, 4096);
    assert_eq!(client.reply(), (8, 0));
    let mut data = vec![0u8; 4096];
    client.stream.read_exact(&mut data).unwrap();
    assert!(data.iter().all(|&byte| byte == 0x77));
    // Garbage where a request belongs: the connection is closed, with a logged reason.
    client.stream.write_all(&[0xff; 28]).unwrap();
    assert!(client.closed());
    // A write announcing 4 GiB of payload is not worth reading: closed too.
    let mut greedy = RawClient::open(node.address, "vol0");
    greedy.request(1, 0, 9, 0, u32::MAX - 511);
    assert!(greedy.closed());

    // A handshake cut in the middle, garbage instead of a handshake, a client that connects
    // and says nothing: each loses its own connection only.
    {
        let mut cut = RawClient::connect(node.address);
        let mut greeting = [0u8; 18];
        cut.read_exact(&mut greeting).unwrap();
        cut.write_all(&3u32.to_be_bytes()).unwrap();
        cut.write_all(b"IHAVEOPT\0\0\0\x07\0\0").unwrap();
    }
    {
        let mut garbage = RawClient::connect(node.address);
        let mut greeting = [0u8; 18];
        garbage.read_exact(&mut greeting).unwrap();
        garbage.write_all(&[0x42; 4096]).unwrap();
        let mut rest = Vec::new();
        let _ = garbage.read_to_end(&mut rest);
    }
    let _silent = RawClient::connect(node.address);
    // Requests in flight on one connection while another misbehaves: all answered.
    let mut other = RawClient::open(node.address, "vol1");
    for cookie in 0..64u64 {
        other.request(0, 0, 100 + cookie, cookie * 4096, 4096);
    }
    let mut cookies: Vec<u64> = (0..64)
        .map(|_| {
            let (cookie, error) = other.reply();
            assert_eq!(error, 0);
            let mut data = vec![0u8; 4096];
            other.stream.read_exact(&mut data).unwrap();
            cookie
        })
        .collect();
    cookies.sort_unstable();
    assert_eq!(cookies, (100..164).collect::<Vec<u64>>());
    // Real clients still work.
    let check = run(
        "qemu-io",
        &["-f", "raw", &node.uri("vol0"), "-c", "read -P 0x77 8k 4k"],
    );
    assert!(!stdout(&check).contains("Pattern verification failed"));
    let log = node.stop();
    assert!(log.contains("bad request"), "{log}");
    assert!(
        log.contains("the client closed the connection during the handshake")
            || log.contains("handshake failed"),
        "{log}"
    );
}

/// A CA and a server certificate for 127.0.0.1 (ECDSA P-256, made with openssl), in `dir`:
/// ca-cert.pem for clients, server-cert.pem and server-key.pem for the node.
fn make_certificates(dir: &Path) {
    let openssl = |args: &[&str]| {
        let output = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl (install Debian's openssl; scripts/test does)");
        assert!(
            output.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        &[
            &["req", "-x509"][..],
            &ec,
            &[
                "-keyout",
                "ca-key.pem",
                "-out",
                "ca-cert.pem",
                "-days",
                "2",
                "-subj",
                "/CN=fathom-test-ca",
            ],
        ]
        .concat(),
    );
    openssl(
        &[
            &["req"][..],
            &ec,
            &[
                "-keyout",
                "server-key.pem",
                "-out",
                "server.csr",
                "-subj",
                "/CN=localhost",
            ],
        ]
        .concat(),
    );
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\nkeyUsage=digitalSignature\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca-cert.pem",
        "-CAkey",
        "ca-key.pem",
        "-CAcreateserial",
        "-out",
        "server-cert.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
    // What clients get: the CA only (qemu and libnbd read ca-cert.pem from a directory).
    std::fs::create_dir_all(dir.join("client")).unwrap();
    std::fs::copy(dir.join("ca-cert.pem"), dir.join("client/ca-cert.pem")).unwrap();
}

#[test]
fn tls_is_required_when_configured_and_real_clients_use_it() {
    let dir = tempfile::tempdir().unwrap();
    make_certificates(dir.path());
    let pem = |name: &str| dir.path().join(name).display().to_string();
    let extra = format!(
        "tls_cert = {:?}\ntls_key = {:?}\n",
        pem("server-cert.pem"),
        pem("server-key.pem")
    );
    let client = pem("client");
    let node = Node::start_with(dir, &extra);
    let port = node.address.port().to_string();
    // qemu-io over TLS: 4 MiB written and read back (replies larger than one TLS record).
    let creds = format!("tls-creds-x509,id=tls0,dir={client},endpoint=client");
    let image = format!("driver=nbd,host=127.0.0.1,port={port},export=vol0,tls-creds=tls0");
    let output = run(
        "qemu-io",
        &[
            "--object",
            &creds,
            "--image-opts",
            &image,
            "-c",
            "write -P 0x3c 0 4M",
            "-c",
            "read -P 0x3c 0 4M",
            "-c",
            "read -P 0 4M 64k",
        ],
    );
    let text = stdout(&output);
    assert!(text.contains("wrote 4194304/4194304 bytes"), "{text}");
    assert!(!text.contains("Pattern verification failed"), "{text}");
    // libnbd over TLS.
    let info = run(
        "nbdinfo",
        &[&format!(
            "nbds://127.0.0.1:{port}/vol0?tls-certificates={client}"
        )],
    );
    assert!(stdout(&info).contains("with TLS"), "{}", stdout(&info));
    // Without TLS: refused, the node says why and carries on.
    let plain = Command::new("nbdinfo")
        .arg(node.uri("vol0"))
        .output()
        .unwrap();
    assert!(!plain.status.success(), "a plaintext client got in");
    let again = run(
        "nbdinfo",
        &[
            "--size",
            &format!("nbds://127.0.0.1:{port}/vol0?tls-certificates={client}"),
        ],
    );
    assert_eq!(stdout(&again).trim(), VOLUME_BYTES.to_string());
    let log = node.stop();
    assert!(log.contains("NBD: TLS required (certificate"), "{log}");
    assert!(log.contains("tls=true"), "{log}");
}

#[test]
fn a_missing_certificate_stops_the_node_at_start_with_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.pem").display().to_string();
    let config = dir.path().join("node.toml");
    std::fs::write(
        &config,
        format!(
            "[node]\nid = \"tlsbad\"\ndata_dir = {d:?}\n[dma]\nsize = \"16MiB\"\nhugepages = false\n\
             [telemetry]\nregion = {r:?}\nmetrics = \"\"\n\
             [nbd]\nlisten = [\"127.0.0.1:0\"]\ntls_cert = {missing:?}\ntls_key = {missing:?}\n\
             [[device]]\nname = \"nvme0\"\ndriver = \"mem\"\nmedia = \"null\"\nsize = \"64MiB\"\n\
             [[volume]]\nname = \"vol0\"\ndevice = \"nvme0\"\nsize = \"64MiB\"\n",
            d = dir.path().display().to_string(),
            r = dir.path().join("stats").display().to_string(),
        ),
    )
    .unwrap();
    let output = Command::new(NODE)
        .arg("--config")
        .arg(&config)
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(
        text.contains("nope.pem") && text.contains("nbd.tls_cert"),
        "{text}"
    );
}

const BENCH: &str = env!("CARGO_BIN_EXE_fathom-bench");

/// Runs fathom-bench with `args`.
fn bench(args: &[&str]) -> Output {
    Command::new(BENCH).args(args).output().unwrap()
}

/// Runs fathom-bench with `args` and `--json`; fails the test with its stderr unless it
/// succeeds.
fn bench_json(args: &[&str]) -> serde_json::Value {
    let output = bench(&[args, &["--json"]].concat());
    assert!(
        output.status.success(),
        "fathom-bench {args:?} failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|error| panic!("fathom-bench {args:?}: {error}\n{}", stdout(&output)))
}

#[test]
fn fathom_bench_drives_a_running_node_through_its_nbd_client_path() {
    let node = Node::start();
    let uri = node.uri("vol0");
    // Two jobs, each on its own connection and its own 8 MiB of the export.
    let verify = bench_json(&[
        "--nbd",
        &uri,
        "--verify",
        "--bs",
        "4k",
        "--size",
        "8M",
        "--iodepth",
        "16",
        "--numjobs",
        "2",
    ]);
    assert_eq!(verify["mode"], "nbd-client", "{verify}");
    assert_eq!(verify["mismatches"], 0, "{verify}");
    assert_eq!(verify["errors"], 0, "{verify}");
    let jobs = verify["verify"].as_array().expect("per-job results");
    assert_eq!(jobs.len(), 2, "{verify}");
    for (job, result) in jobs.iter().enumerate() {
        assert_eq!(result["offset_bytes"], job as u64 * (8 << 20), "{result}");
        assert_eq!(result["blocks_written"], 2048, "{result}");
        assert_eq!(result["blocks_read"], 2048, "{result}");
    }

    // A timed run: the client's own latencies and CPU time.
    let run = bench_json(&[
        "--nbd",
        &uri,
        "--rw",
        "randread",
        "--bs",
        "4k",
        "--iodepth",
        "32",
        "--runtime",
        "1",
        "--ramp_time",
        "0",
    ]);
    assert_eq!(run["mode"], "nbd-client", "{run}");
    assert_eq!(run["target"], uri, "{run}");
    assert_eq!(run["errors"], 0, "{run}");
    assert!(run["iops"].as_f64().unwrap() > 0.0, "{run}");
    assert!(run["lat_ns"]["p50"].as_f64().unwrap() > 0.0, "{run}");
    assert!(
        run["lat_ns"]["p99"].as_f64().unwrap() >= run["lat_ns"]["p50"].as_f64().unwrap(),
        "{run}"
    );
    assert!(run["cpu_ns_per_io"].as_f64().unwrap() > 0.0, "{run}");
    assert_eq!(run["lat_ns"]["count"], run["ios"], "{run}");
    assert_eq!(run["per_job"].as_array().unwrap().len(), 1, "{run}");
    assert!(run["ops"]["read"]["ios"].as_u64().unwrap() > 0, "{run}");

    // Writes carry the verify pattern of their offset: after random writes by two jobs, one
    // job reading the whole 16 MiB back in other extents still finds what it expects.
    let writes = bench_json(&[
        "--nbd",
        &uri,
        "--rw",
        "randwrite",
        "--bs",
        "8k",
        "--size",
        "8M",
        "--numjobs",
        "2",
        "--runtime",
        "0.5",
        "--ramp_time",
        "0",
    ]);
    assert!(
        writes["ops"]["write"]["ios"].as_u64().unwrap() > 0,
        "{writes}"
    );
    let check = bench_json(&[
        "--nbd",
        &uri,
        "--verify",
        "--verify_only",
        "--bs",
        "64k",
        "--size",
        "16M",
    ]);
    assert_eq!(check["mismatches"], 0, "{check}");
    assert_eq!(check["verify"][0]["blocks_read"], 256, "{check}");
    let log = node.stop();
    assert!(log.contains("NBD client connected"), "{log}");
}

#[test]
fn fathom_bench_nbd_mode_refuses_what_the_export_cannot_take_before_any_io() {
    let node = Node::start();
    let uri = node.uri("vol0");
    let fails = |args: &[&str], expected: &str| {
        let output = bench(args);
        let text = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "fathom-bench {args:?} succeeded");
        assert!(text.contains(expected), "fathom-bench {args:?}: {text}");
    };
    fails(
        &["--nbd", &uri, "--bs", "100"],
        "512-byte minimum block size",
    );
    fails(&["--nbd", &uri, "--bs", "2M"], "maximum block size");
    fails(
        &["--nbd", &uri, "--size", "48M", "--numjobs", "2"],
        "need 100663296 bytes",
    );
    fails(&["--nbd", &uri, "--iodepth", "0"], "--iodepth 0");
    fails(
        &["--nbd", &uri, "--driver", "mem"],
        "--driver does not apply",
    );
    fails(
        &["--nbd", &uri.replace("nbd://", "nbds://")],
        "TLS is not supported by fathom-bench's client",
    );
    // An export that does not exist is named, with how to list the ones that do.
    let missing = node.uri("nope");
    fails(&["--nbd", &missing], "no export named \"nope\"");
    fails(
        &["--nbd", &missing],
        &format!("nbdinfo --list nbd://{}", node.address),
    );
    // The refusals came from the client, before any request: the node refused nothing.
    let log = node.stop();
    assert!(!log.contains("bad request"), "{log}");
}

#[test]
fn a_long_pipelined_handshake_is_served_in_full() {
    // 100 NBD_OPT_INFO for a 4000-byte export name nobody has (400 KiB of options, more than
    // the server's receive buffer), sent before reading any reply, then NBD_OPT_GO.
    let node = Node::start();
    let mut stream = RawClient::connect(node.address);
    let mut greeting = [0u8; 18];
    stream.read_exact(&mut greeting).unwrap();
    stream.write_all(&3u32.to_be_bytes()).unwrap();
    let name = "x".repeat(4000);
    let option = |code: u32, name: &str| {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(b"IHAVEOPT");
        bytes.extend_from_slice(&code.to_be_bytes());
        bytes.extend_from_slice(&(4 + name.len() as u32 + 2).to_be_bytes());
        bytes.extend_from_slice(&(name.len() as u32).to_be_bytes());
        bytes.extend_from_slice(name.as_bytes());
        bytes.extend_from_slice(&0u16.to_be_bytes());
        bytes
    };
    let writer = {
        let mut stream = stream.try_clone().unwrap();
        let info = option(6, &name);
        std::thread::spawn(move || {
            for _ in 0..100 {
                stream.write_all(&info).unwrap();
            }
        })
    };
    for _ in 0..100 {
        let mut header = [0u8; 20];
        if let Err(error) = stream.read_exact(&mut header) {
            panic!("reading an option reply: {error}\n{}", node.log());
        }
        let reply = u32::from_be_bytes(header[12..16].try_into().unwrap());
        assert_eq!(
            reply,
            (1 << 31) | 6,
            "NBD_REP_ERR_UNKNOWN for an unknown export"
        );
        let len = u32::from_be_bytes(header[16..20].try_into().unwrap());
        let mut message = vec![0u8; len as usize];
        stream.read_exact(&mut message).unwrap();
    }
    writer.join().unwrap();
    stream.write_all(&option(7, "vol0")).unwrap();
    loop {
        let mut header = [0u8; 20];
        stream.read_exact(&mut header).unwrap();
        let reply = u32::from_be_bytes(header[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(header[16..20].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        stream.read_exact(&mut data).unwrap();
        match reply {
            1 => break,
            3 => {}
            other => panic!("NBD_OPT_GO after a long handshake: reply {other:#x}"),
        }
    }
    let mut client = RawClient { stream };
    client.request(0, 0, 42, 0, 4096);
    assert_eq!(client.reply(), (42, 0));
}
