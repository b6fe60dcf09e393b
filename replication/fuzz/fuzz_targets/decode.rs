//! Arbitrary bytes into the replication frame decoder, cut into chunks of sizes the input
//! itself picks. The decoder must not panic, must not stall (after `next` says it needs more,
//! `push` takes at least one byte), must stay poisoned after an error, and every frame it
//! yields must re-encode to exactly the bytes it was decoded from.
//!
//! Input: byte 0 seeds the chunk sizes, the rest is the stream.

#![no_main]

use fathom_replication::proto::FrameDecoder;
use libfuzzer_sys::fuzz_target;

/// Small enough that the fuzzer reaches the payload limit and the buffer's compaction.
const MAX_PAYLOAD_BYTES: u32 = 1024;

fuzz_target!(|data: &[u8]| {
    let Some((&seed, stream)) = data.split_first() else {
        return;
    };
    // xorshift32 over the seed: chunk sizes from 1 to 256 bytes.
    let mut state = u32::from(seed) | 0x100;
    let mut chunk_len = move || {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        (state % 256) as usize + 1
    };

    let mut decoder = FrameDecoder::new(MAX_PAYLOAD_BYTES);
    let mut encoded = Vec::new();
    let mut fed = 0;
    let mut consumed = 0;
    while fed < stream.len() {
        let end = stream.len().min(fed + chunk_len());
        let taken = decoder.push(&stream[fed..end]);
        assert!(taken > 0, "the decoder took no byte after asking for more");
        fed += taken;
        loop {
            match decoder.next() {
                None => break,
                Some(Ok(frame)) => {
                    encoded.clear();
                    frame
                        .encode(&mut encoded)
                        .expect("a decoded frame re-encodes");
                    assert_eq!(
                        encoded[..],
                        stream[consumed..consumed + encoded.len()],
                        "a decoded frame re-encodes to other bytes"
                    );
                    consumed += encoded.len();
                }
                Some(Err(error)) => {
                    assert_eq!(decoder.next().map(Result::unwrap_err), Some(error));
                    assert_eq!(decoder.push(&[0]), 0);
                    return;
                }
            }
        }
    }
    assert_eq!(decoder.buffered(), stream.len() - consumed);
});
