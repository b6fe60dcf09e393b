//! A session's byte stream, the thin socket part both ends share: the transport (plain TCP or
//! TLS), frames in through the bounded [`FrameDecoder`], frames out through a bounded buffer
//! written as the socket takes it. Non-blocking throughout: a reactor polls it.

use std::io;

use fathom_net::Transport;

use crate::proto::{encode, Frame, FrameDecoder, Header, ProtoError};

/// Bytes read from one stream per call of [`FrameStream::fill`], so that one busy peer cannot
/// starve the rest of its reactor.
const READ_BUDGET: usize = 1 << 20;

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

    /// Encodes a frame straight into the queue.
    pub fn queue_frame(&mut self, header: &Header, payload: &[u8]) -> Result<(), StreamError> {
        let len = crate::proto::HEADER_LEN + payload.len();
        if len > self.room() {
            return Err(StreamError::Congested(self.unsent()));
        }
        self.compact();
        encode(header, payload, &mut self.out)?;
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
            match self.transport.write(&self.out[self.sent..]) {
                Ok(0) => return Err(StreamError::Closed),
                Ok(written) => self.sent += written,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(error.into()),
            }
        }
        self.out.clear();
        self.sent = 0;
        Ok(self.transport.flush()?)
    }
}
