use fathom_engine::{Config, Engine, IoRequest};

#[test]
fn smoke() {
    let config = Config::parse(
        r#"
[node]
id = "t"
data_dir = "/tmp/fathom-smoke"
[reactor]
cores = [0, 1]
[[device]]
name = "d0"
driver = "mem"
media = "ram"
size = "16MiB"
[[volume]]
name = "v0"
device = "d0"
size = "16MiB"
"#,
    )
    .unwrap();
    let engine = Engine::start(&config).unwrap();
    let vol = engine.volume("v0").unwrap().id;
    let mut buf = engine.dma().alloc(128 * 1024).unwrap();
    buf.write_at(0, &vec![0xab; 128 * 1024]);
    let done = engine.io(IoRequest::write(vol, 4096, buf, 1));
    done.result.unwrap();
    let mut buf = done.buf.unwrap();
    buf.fill(0);
    let done = engine.io(IoRequest::read(vol, 4096, buf, 2));
    done.result.unwrap();
    assert!(done.buf.unwrap().to_vec().iter().all(|&b| b == 0xab));
    engine.shutdown().unwrap();
}
