//! A session's byte stream, the thin socket part both ends share: the transport (plain TCP or
//! TLS), frames in through the bounded [`FrameDecoder`], frames out through a bounded buffer
//! written as the socket takes it. Non-blocking throughout: a reactor polls it.

use std::io;

use fathom_net::Transport;

use crate::proto::{encode, Frame, FrameDecoder, Header, ProtoError};

/// Bytes read from one stream per call of [`FrameStream::fill`], so that one busy peer cannot
/// starve the rest of its reactor.
const READ_BUDGET: usize = 1 << 20;

/// A payload at least this large is written from where it lies, not copied into the queue
/// first ([`FrameStream::queue_frame`]); smaller frames wait in the queue to go out together.
const DIRECT_PAYLOAD: usize = 64 << 10;

/// Why a stream ended.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("the peer closed the connection")]
    Closed,
    #[error("the peer closed the connection in the middle of a frame ({0} bytes of it in)")]
    ClosedMidFrame(usize),
    #[error("socket: {0}")]
    Io(#[from] io::Error),
    #[error("bad frame: {0}")]
    Frame(#[from] ProtoError),
    #[error(
        "{0} bytes wait for the peer to read them, the most a session may hold; it stopped reading"
    )]
    Congested(usize),
}

/// One session's stream.
pub struct FrameStream {
    transport: Transport,
    decoder: FrameDecoder,
    /// Frames encoded and not yet taken by the socket, from `sent` on.
    out: Vec<u8>,
    sent: usize,
    max_out: usize,
    /// The last read found nothing more: wait for epoll (or the next poll) before reading.
    drained: bool,
}

impl FrameStream {
    /// A stream over `transport` that takes frames of up to `max_payload` payload bytes and
    /// holds at most `max_out` bytes for the peer.
    pub fn new(transport: Transport, max_payload: u32, max_out: usize) -> Self {
        Self {
            transport,
            decoder: FrameDecoder::new(max_payload),
            out: Vec::with_capacity(max_out.min(4 << 20)),
            sent: 0,
            max_out,
            drained: false,
        }
    }

    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    pub fn transport_mut(&mut self) -> &mut Transport {
        &mut self.transport
    }

    /// epoll (or a caller that cannot know) says there may be bytes to read.
    pub fn set_readable(&mut self) {
        self.drained = false;
    }

    /// [`FrameStream::fill`], its error as text: "the `peer` closed the session" when it
    /// closed between frames.
    pub fn fill_from(&mut self, peer: &str) -> Result<usize, String> {
        self.fill().map_err(|error| match error {
            StreamError::Closed => format!("the {peer} closed the session"),
            error => error.to_string(),
        })
    }

    /// Reads what the socket has, up to the budget, into the decoder. Returns the bytes read;
    /// an error when the peer is gone.
    pub fn fill(&mut self) -> Result<usize, StreamError> {
        if fathom_net::fault::partitioned() {
            return Err(fathom_net::fault::partition_error().into());
        }
        let mut total = 0;
        while !self.drained && total < READ_BUDGET {
            let spare = self.decoder.spare();
            if spare.is_empty() {
                // A whole frame waits for `next`.
                break;
            }
            match self.transport.read(spare) {
                Ok(0) => {
                    return Err(match self.decoder.buffered() {
                        0 => StreamError::Closed,
                        partial => StreamError::ClosedMidFrame(partial),
                    })
                }
                Ok(read) => {
                    self.decoder.commit(read);
                    total += read;
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => self.drained = true,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(error.into()),
            }
        }
        Ok(total)
    }

    /// The next whole frame received, if any; an error ends the stream.
    pub fn next_frame(&mut self) -> Option<Result<Frame<'_>, StreamError>> {
        // A frame that filled the buffer leaves room for more once it is taken.
        self.drained = false;
        self.decoder
            .next()
            .map(|frame| frame.map_err(StreamError::from))
    }

    /// Bytes received and not yet taken as frames (part of one, when no frame is whole).
    pub fn buffered(&self) -> usize {
        self.decoder.buffered()
    }

    /// Bytes waiting for the socket.
    pub fn unsent(&self) -> usize {
        self.out.len() - self.sent
    }

    /// Room for more frames out.
    pub fn room(&self) -> usize {
        self.max_out.saturating_sub(self.unsent())
    }

    /// Queues encoded frames for the peer.
    pub fn queue(&mut self, bytes: &[u8]) -> Result<(), StreamError> {
        if bytes.len() > self.room() {
            return Err(StreamError::Congested(self.unsent()));
        }
        self.compact();
        self.out.extend_from_slice(bytes);
        Ok(())
    }

    /// Encodes a frame straight into the queue. A large payload (a resync chunk, a big
    /// write) with nothing queued before it goes to the socket at once, header and payload in
    /// one `writev` from where the payload lies (its DMA buffer): no copy into the queue but
    /// of what the socket did not take.
    pub fn queue_frame(&mut self, header: &Header, payload: &[u8]) -> Result<(), StreamError> {
        let len = crate::proto::HEADER_LEN + payload.len();
        if len > self.room() {
            return Err(StreamError::Congested(self.unsent()));
        }
        self.compact();
        if payload.len() < DIRECT_PAYLOAD || self.unsent() > 0 {
            encode(header, payload, &mut self.out)?;
            return Ok(());
        }
        let head = header.to_bytes(payload)?;
        let written = write_some(
            &mut self.transport,
            &[io::IoSlice::new(&head), io::IoSlice::new(payload)],
        )?
        .unwrap_or(0);
        // What the socket did not take waits in the queue, as any frame's would.
        if written < head.len() {
            self.out.extend_from_slice(&head[written..]);
            self.out.extend_from_slice(payload);
        } else {
            self.out.extend_from_slice(&payload[written - head.len()..]);
        }
        Ok(())
    }

    fn compact(&mut self) {
        if self.sent == self.out.len() {
            self.out.clear();
            self.sent = 0;
        } else if self.sent >= self.out.len() / 2 && self.sent > 64 << 10 {
            self.out.drain(..self.sent);
            self.sent = 0;
        }
    }

    /// Writes what the socket takes now. Returns whether everything went.
    pub fn flush(&mut self) -> Result<bool, StreamError> {
        while self.sent < self.out.len() {
            match write_some(
                &mut self.transport,
                &[io::IoSlice::new(&self.out[self.sent..])],
            )? {
                Some(written) => self.sent += written,
                None => return Ok(false),
            }
        }
        self.out.clear();
        self.sent = 0;
        Ok(self.transport.flush()?)
    }
}

/// One write of `slices` to the socket: the bytes it took, `None` when it takes none now
/// (would block); a closed peer or a socket error ends the stream.
fn write_some(
    transport: &mut Transport,
    slices: &[io::IoSlice<'_>],
) -> Result<Option<usize>, StreamError> {
    if fathom_net::fault::partitioned() {
        return Err(fathom_net::fault::partition_error().into());
    }
    loop {
        match transport.write_vectored(slices) {
            Ok(0) => return Err(StreamError::Closed),
            Ok(written) => return Ok(Some(written)),
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Kind;
    use std::io::Read;
    use std::net::{TcpListener, TcpStream};

    /// Frames small and large, some written from where their payload lies while others wait
    /// in the queue (a reader that has not read yet fills the socket), arrive whole and in
    /// order.
    #[test]
    fn large_payloads_written_in_place_arrive_in_order_with_the_queued_frames() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let writer = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut reader, _) = listener.accept().unwrap();
        writer.set_nonblocking(true).unwrap();
        let mut stream = FrameStream::new(Transport::plain(writer), 4 << 20, 64 << 20);
        let sizes = [
            4096usize,
            1 << 20,
            512,
            256 << 10,
            2 << 20,
            64 << 10,
            8,
            3 << 20,
        ];
        let mut expected = Vec::new();
        for (at, &size) in sizes.iter().enumerate() {
            let payload: Vec<u8> = (0..size).map(|i| (i * 7 + at) as u8).collect();
            let header = Header {
                epoch: 1,
                request_id: at as u64 + 1,
                lba: at as u64,
                block_count: 1,
                ..Header::new(Kind::Resync)
            };
            stream.queue_frame(&header, &payload).unwrap();
            encode(&header, &payload, &mut expected).unwrap();
        }
        let reading = std::thread::spawn(move || {
            let mut got = vec![0u8; expected.len()];
            reader.read_exact(&mut got).unwrap();
            assert!(
                got == expected,
                "the bytes differ from the frames' encoding"
            );
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !stream.flush().unwrap() {
            assert!(
                std::time::Instant::now() < deadline,
                "the reader never took it all"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        reading.join().unwrap();
    }
}
