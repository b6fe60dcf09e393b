//! The `uring` driver through the engine: what is written reads back and lands in the file at
//! the volume's offset; flush and write-zeroes work; bad set-ups are refused with clear errors.

mod common;

use std::time::Duration;

use common::{config_in, pattern, two_cores};
use fathom_engine::{Engine, IoRequest, Notify, VolumeId};

fn uring_node(dir: &std::path::Path, extra: &str) -> fathom_engine::Config {
    config_in(
        dir,
        &two_cores(),
        &format!(
            "[[device]]\nname = \"disk\"\ndriver = \"uring\"\npath = \"disk.img\"\nsize = \"8MiB\"\n{extra}\n\
             [[volume]]\nname = \"a\"\ndevice = \"disk\"\nsize = \"4MiB\"\n\
             [[volume]]\nname = \"b\"\ndevice = \"disk\"\noffset = \"4MiB\"\nsize = \"4MiB\"\n"
        ),
    )
}

#[test]
fn random_writes_read_back_and_land_in_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::start(&uring_node(dir.path(), "")).unwrap();
    let mut model = vec![vec![0u8; 4 << 20]; 2];
    let (tx, rx) = crossbeam_channel::unbounded();
    let mut seed = 7u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for round in 0..40 {
        // A batch of non-overlapping writes (one per 64 KiB slot), then reads of the same
        // slots, on both volumes at once.
        let mut batch = Vec::new();
        for slot in 0..16u64 {
            let volume = (next() % 2) as usize;
            let len = 512 * (1 + next() % 128) as usize;
            let offset = slot * (256 << 10) + 512 * (next() % 64);
            batch.push((volume, offset, len, next()));
        }
        for (tag, &(volume, offset, len, seed)) in batch.iter().enumerate() {
            let data = pattern(seed, len);
            model[volume][offset as usize..offset as usize + len].copy_from_slice(&data);
            let mut buf = engine.dma().alloc(len).unwrap();
            buf.write_at(0, &data);
            engine
                .submit(
                    IoRequest::write(VolumeId(volume as u32), offset, buf, tag as u64),
                    Notify::Channel(tx.clone()),
                )
                .unwrap();
        }
        for _ in 0..batch.len() {
            rx.recv_timeout(Duration::from_secs(10))
                .unwrap()
                .result
                .unwrap();
        }
        for (tag, &(volume, offset, len, _)) in batch.iter().enumerate() {
            let buf = engine.dma().alloc(len).unwrap();
            engine
                .submit(
                    IoRequest::read(VolumeId(volume as u32), offset, buf, tag as u64),
                    Notify::Channel(tx.clone()),
                )
                .unwrap();
        }
        for _ in 0..batch.len() {
            let done = rx.recv_timeout(Duration::from_secs(10)).unwrap();
            done.result.unwrap();
            let (volume, offset, len, _) = batch[done.tag as usize];
            assert!(
                done.buf.unwrap().to_vec() == model[volume][offset as usize..offset as usize + len],
                "round {round}: read differs"
            );
        }
    }
    engine
        .io(IoRequest::write_zeroes(VolumeId(1), 0, 64 << 10, 0))
        .result
        .unwrap();
    model[1][..64 << 10].fill(0);
    engine.io(IoRequest::flush(VolumeId(0), 0)).result.unwrap();
    engine.shutdown().unwrap();
    let file = std::fs::read(dir.path().join("disk.img")).unwrap();
    assert!(
        file[..4 << 20] == model[0][..],
        "volume a is the file's first 4 MiB"
    );
    assert!(
        file[4 << 20..] == model[1][..],
        "volume b is the file's second 4 MiB"
    );
}

#[test]
fn bad_setups_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_in(
        dir.path(),
        &[0],
        "[[device]]\nname = \"disk\"\ndriver = \"uring\"\npath = \"missing.img\"\n",
    );
    let error = Engine::start(&config).err().unwrap().to_string();
    assert!(
        error.contains("does not exist") && error.contains("device.size"),
        "{error}"
    );

    let text = format!("[node]\nid = \"x\"\ndata_dir = {:?}\n[[device]]\nname = \"d\"\ndriver = \"uring\"\nsize = \"1MiB\"\n", dir.path().display().to_string());
    let error = fathom_engine::Config::parse(&text)
        .err()
        .unwrap()
        .to_string();
    assert!(
        error.contains("device[0].path") && error.contains("uring"),
        "{error}"
    );
    let text = text.replace(
        "size = \"1MiB\"",
        "size = \"1MiB\"\npath = \"x.img\"\nmedia = \"ram\"",
    );
    let error = fathom_engine::Config::parse(&text)
        .err()
        .unwrap()
        .to_string();
    assert!(
        error.contains("device[0].media") && error.contains("only applies to driver = \"mem\""),
        "{error}"
    );
}
